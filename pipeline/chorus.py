"""Whole-prompt reuse after Chorus (arXiv 2604.04451) on CHAI's store: the ``chorus``, ``chorus_warm``
and ``auto`` sampling modes.

* ``chorus``: the request is looked up by its **whole prompt** (the normalised prompt embedded with
  MiniLM, the lookup's ``"prompt"`` mode) among Chorus entries of its compatibility key. A donor at
  cosine similarity >= ``chorus_threshold`` serves it in three stages (``opensora.chorus.sample_chorus``):
  stage 1 starts from the donor's latent at step K1, stage 2 re-denoises only the region of the words the
  donor's prompt lacks (with their cross-attention amplified) up to K2, stage 3 runs plain; K1 and K2
  grow with the similarity (``ChorusSettings.stage_bounds``). A miss runs ``full_steps`` and stores the
  donor latents of the stage window (``chorus_z<k>``).
* ``chorus_warm``: a full run whose Chorus entry is stored whatever the lookup finds (fills a store).
* ``auto``: per request, Chorus when a whole-prompt donor clears its threshold, else CHAI on an entity
  hit, else a full run that stores both a Chorus and a CHAI entry (one trajectory, one capture). The
  result's ``served_by`` and ``reason`` say which and why; the store counts the lookup that decided.

New tokens (the rule, :func:`new_token_columns`): a caption row of the request is *new* when the word
it belongs to (the caption encoder's ``token_words``: lower case, letters and digits only; every sub-word
piece of a word shares it) occurs nowhere in the donor's prompt. Special rows ([CLS], [SEP], ``</s>``),
punctuation and the articles "a", "an", "the" never count. For OpenSora's T5 the words are those of the
prepared caption (cleaned, aesthetic score appended, identical in both prompts); for the reference
model, MiniLM's WordPiece tokens.

A Chorus hit does not use the request's noise: the result continues the donor's trajectory (its seed),
as any latent-reuse method does. Entry size: ``chorus_entry_bytes``; at 240p, 51 frames, fp16 (latent
(4, 15, 30, 53), 190,800 bytes each) the default window (steps 0-21 of 30) holds 22 latents: 4,197,600
bytes (4.00 MiB), against CHAI's 572,400.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..opensora.cache_attention import capture_plan, sample_capturing
from ..opensora.chorus import chorus_capture_plan, sample_chorus
from .modes import (
    LookupSpec,
    ModeOutput,
    ModeRequest,
    SamplingMode,
    get_mode,
    match_reason,
    register_mode,
)
from .settings import RequestSettings

__all__ = ["IGNORED_WORDS", "new_token_columns", "chorus_entry_bytes", "ChorusMode", "ChorusWarmMode",
           "AutoReuseMode"]

#: Words that never make a token new (articles carry nothing a region could show).
IGNORED_WORDS = frozenset({"a", "an", "the"})
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def new_token_columns(words: Sequence[Optional[str]], donor_words: Sequence[Optional[str]]) -> List[int]:
    """Indices (among the request's real caption rows) of the tokens whose word the donor's prompt lacks.

    Args:
        words: the request's ``token_words`` (one entry per real caption row; None = special row).
        donor_words: the donor prompt's ``token_words``.
    """
    have = {w for w in donor_words if w}
    return [i for i, w in enumerate(words) if w and w not in IGNORED_WORDS and w not in have]


def chorus_entry_bytes(settings: RequestSettings, latent_shape: Sequence[int]) -> int:
    """Bytes of the tensors one Chorus entry holds: the window's latents of ``latent_shape`` (C, T, H, W)
    in the capture dtype. 240p, 51 frames, fp16, default window: 22 x 190,800 = 4,197,600."""
    first, last = settings.chorus.window(settings.schedule.full_steps)
    itemsize = torch.empty((), dtype=_DTYPES[settings.schedule.capture_dtype]).element_size()
    return (last - first + 1) * math.prod(int(v) for v in latent_shape) * itemsize


def _chorus_spec(settings: RequestSettings, record: bool = True) -> LookupSpec:
    return LookupSpec(mode="prompt", store_fingerprint=settings.chorus_store_fingerprint(),
                      threshold=float(settings.chorus.chorus_threshold), record=record)


def _chorus_plan(settings: RequestSettings) -> Dict[str, int]:
    return chorus_capture_plan(*settings.chorus.window(settings.schedule.full_steps))


def _full_capture(request: ModeRequest, plan: Dict[str, int]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor],
                                                                        Dict[str, float]]:
    """``full_steps`` from the request's noise, keeping the latents ``plan`` names."""
    schedule_settings = request.settings.schedule
    kw = request.sample_kwargs
    schedule = request.rflow.schedule(height=kw["height"], width=kw["width"], num_frames=kw["num_frames"],
                                      num_steps=schedule_settings.full_steps,
                                      size_dtype=kw.get("size_dtype", torch.bfloat16))
    run = sample_capturing(request.rflow, request.model, request.noise, plan, schedule=schedule,
                           cfg_scale=schedule_settings.cfg_scale, dtype=_DTYPES[schedule_settings.capture_dtype],
                           callback=request.callback, **kw)
    return run.latent, run.captured, run.timesteps


def _chorus_info(request: ModeRequest) -> Dict[str, Any]:
    first, last = request.settings.chorus.window(request.settings.schedule.full_steps)
    return {"seed": int(request.seed), "height": request.height, "width": request.width,
            "num_frames": request.num_frames, "method": "chorus", "window": [first, last],
            "config": request.settings.chorus_store_fingerprint()}


def _chorus_reason(result: Any) -> str:
    if result is None:
        return "no store"
    if result.prompt_matched is None and result.matched is None:
        return f"no stored prompt to compare (threshold {result.threshold:.2f})"
    verdict = ">=" if result.hit else "<"
    donor = result.prompt_matched if result.hit else result.matched
    return f"whole prompt ~ {donor!r} {result.similarity:.3f} {verdict} {result.threshold:.2f}"


def serve_chorus(request: ModeRequest, result: Any) -> Optional[ModeOutput]:
    """A Chorus hit from ``result`` (a whole-prompt lookup); None when it missed or its entry lacks the
    window's latents of this shape.

    Raises:
        TypeError: the caption encoder has no ``token_words`` (Chorus needs it to find the new words).
    """
    if result is None or not result.hit or result.latents is None:
        return None
    settings = request.settings
    n = settings.schedule.full_steps
    plan = _chorus_plan(settings)
    shape = request.latent_shape
    if any(name not in result.latents or tuple(result.latents[name].shape[-4:]) != shape for name in plan):
        return None
    words_of = getattr(request.captions, "token_words", None)
    if words_of is None:
        raise TypeError(f"the caption encoder {type(request.captions).__name__} has no token_words(prompt); Chorus "
                        "needs it to find the words the donor's prompt lacks")
    words, donor_words = words_of(request.prompt), words_of(result.prompt_matched)
    columns = new_token_columns(words, donor_words)
    donor_columns = new_token_columns(donor_words, words)
    chorus = settings.chorus
    k1, k2 = chorus.stage_bounds(result.similarity, n)
    donor_caption = None
    if donor_columns and k2 > k1:
        y, mask = request.captions.encode(result.prompt_matched)
        donor_caption = (y.to(request.noise.device), mask.to(request.noise.device))
    run = sample_chorus(request.rflow, request.model, result.latents, k1=k1, k2=k2, full_steps=n,
                        cfg_scale=settings.schedule.cfg_scale, columns=columns,
                        mask_threshold=chorus.chorus_mask_threshold, dilation=chorus.chorus_dilation,
                        tgaa=chorus.chorus_tgaa, tgaa_decay=chorus.chorus_tgaa_decay, stride=chorus.chorus_stride,
                        donor_caption=donor_caption,
                        donor_columns=donor_columns, callback=request.callback, **request.sample_kwargs)
    details = {"k1": k1, "k2": run.k2, "stride": run.stride, "full_steps": n, "model_steps": run.model_steps,
               "step_equivalents": round(run.step_equivalents, 3), "new_words": sorted({words[c] for c in columns}),
               "missing_words": sorted({donor_words[c] for c in donor_columns}), "region": round(run.region, 4),
               "donor_prompt": result.prompt_matched}
    return ModeOutput(latent=run.latent, steps=run.model_steps, label="chorus", hit=True,
                      entry_ids=[int(result.entry_id)], served_by="chorus", reason=_chorus_reason(result),
                      details=details)


class ChorusMode(SamplingMode):
    """Chorus: a whole-prompt donor serves the request in three stages; a miss runs full and stores its window."""

    name = "chorus"
    uses_lookup = True
    reuse = True
    steps_setting = "full_steps"
    warm_with = "chorus_warm"
    description = ("Chorus: the closest earlier prompt as a whole (donor) skips the first steps, the regions of "
                   "the words it lacks are re-denoised with amplified attention, the last steps run plain; "
                   "a miss runs full_steps and is stored")

    def lookup_spec(self, settings: RequestSettings) -> LookupSpec:
        """Whole-prompt keys, Chorus's threshold, under the Chorus entries' key."""
        return _chorus_spec(settings)

    def sample(self, request: ModeRequest) -> ModeOutput:
        served = serve_chorus(request, request.lookup)
        if served is not None:
            return served
        latent, captured, _timesteps = _full_capture(request, _chorus_plan(request.settings))
        keep = request.lookup is not None
        return ModeOutput(latent=latent, steps=request.settings.schedule.full_steps, label="full",
                          store=captured if keep else None, store_info=_chorus_info(request) if keep else {},
                          served_by="full", reason=_chorus_reason(request.lookup))


class ChorusWarmMode(ChorusMode):
    """``full_steps`` whose Chorus entry is stored whatever the lookup finds (fills a store for ``chorus``)."""

    name = "chorus_warm"
    reuse = False
    loads_latents = False
    description = "full_steps, its Chorus entry stored even when the store already holds a donor (fill a store)"

    def sample(self, request: ModeRequest) -> ModeOutput:
        latent, captured, _timesteps = _full_capture(request, _chorus_plan(request.settings))
        keep = request.lookup is not None
        return ModeOutput(latent=latent, steps=request.settings.schedule.full_steps, label="full",
                          store=captured if keep else None, store_info=_chorus_info(request) if keep else {})


class AutoReuseMode(SamplingMode):
    """Auto reuse: Chorus on a whole-prompt donor, else CHAI on an entity hit, else full (stored for both)."""

    name = "auto"
    uses_lookup = True
    reuse = True
    steps_setting = "full_steps"
    warm_with = ("warm", "chorus_warm")
    description = ("auto reuse: Chorus when a whole-prompt donor clears its threshold, else CHAI on an entity "
                   "hit, else full_steps stored for both")

    def lookup_spec(self, settings: RequestSettings) -> LookupSpec:
        """Chorus's lookup first; the store counts only the lookup that decided."""
        return _chorus_spec(settings, record=False)

    def sample(self, request: ModeRequest) -> ModeOutput:
        chorus_result = request.lookup
        served = serve_chorus(request, chorus_result)
        if served is not None:
            request.record_lookup(chorus_result)
            served.reason = f"whole-prompt donor: {served.reason}"
            return served
        no_donor = f"no whole-prompt donor ({_chorus_reason(chorus_result)})"
        chai = get_mode("chai")
        chai_result = request.lookup_for("chai") if request.lookup_for is not None else None
        chai_request = dataclasses.replace(request, lookup=chai_result)
        served = chai.serve(chai_request)
        if served is not None:
            served.reason = f"{no_donor}; {match_reason(chai_result, 'entity')}"
            served.lookup, served.compat_key = chai_result, request.compat_key_for("chai")
            return served
        settings = request.settings
        config = settings.cache_attention_config()
        chorus_plan = _chorus_plan(settings)
        plan = dict(chorus_plan)
        if config.enabled:
            kw = request.sample_kwargs
            size = dict(height=kw["height"], width=kw["width"], num_frames=kw["num_frames"],
                        size_dtype=kw.get("size_dtype", torch.bfloat16))
            plan.update(capture_plan(config, request.rflow.schedule(num_steps=config.full_steps, **size),
                                     request.rflow.schedule(num_steps=config.fast_steps, **size)))
        latent, captured, timesteps = _full_capture(request, plan)
        out = ModeOutput(latent=latent, steps=settings.schedule.full_steps, label="full", served_by="full",
                         reason=f"{no_donor}; no entity hit ({match_reason(chai_result, 'entity')})")
        if chorus_result is not None:
            out.store = {name: captured[name] for name in chorus_plan}
            out.store_info = _chorus_info(request)
        if chai_result is not None and config.enabled:
            chai_names = [name for name in captured if name not in chorus_plan]
            info = {"seed": int(request.seed), "height": request.height, "width": request.width,
                    "num_frames": request.num_frames, "config": settings.tag(),
                    "cache_steps": list(settings.attention.cache_steps), "method": "chai",
                    "full_timestep": {name: timesteps[name] for name in chai_names}}
            out.inserts.append((chai_result, {name: captured[name] for name in chai_names}, info))
        return out


for _mode in (ChorusMode(), ChorusWarmMode(), AutoReuseMode()):
    register_mode(_mode)
