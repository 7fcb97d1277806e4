"""The CHAI Sampler (lookup -> fast or full RFLOW -> store on a miss) and the OpenSora VAE Decode."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional, Tuple

import torch

from ..pipeline.modes import DEFAULT_MODE
from . import host, registry
from .adapter import comfy_entry, map_lists
from .cache_nodes import ChaiLookup
from .chorus_nodes import reuse_choices as _reuse_choices
from .chorus_nodes import reuse_help as _reuse_help
from .comfy_v3 import io
from .models import ChaiConditioning, ChaiModel, ChaiVAE
from .socket_types import CacheConfig, ChorusConfig, Conditioning, IntraCache, Lookup, Model, Vae

__all__ = ["CHAISampler", "CHAIVAEDecode", "LATENT_META_KEY", "REUSE_MODE_VALUES", "run_mode"]


#: Sampler ``mode`` values that run the ``reuse`` input's method. ``auto`` is what workflows saved before
#: auto reuse existed hold for CHAI's mode (its old name): with ``reuse`` left at chai they run CHAI as before.
REUSE_MODE_VALUES = ("chai", "auto")


def _mode_choices() -> list:
    """The ``mode`` list: chai (= the reuse input's method), the modes that are not a reuse method, and the
    older names saved workflows hold (auto = chai, plain_fast = plain)."""
    from ..pipeline.modes import get_mode, mode_choices, mode_names

    names = [n for n in mode_names() if n == "chai" or not get_mode(n).reuse]
    return names + [n for n in mode_choices() if n not in mode_names()] + ["auto"]


def _mode_help() -> list:
    from ..pipeline.modes import get_mode

    return [f"{name}: {get_mode(name).description}." for name in _mode_choices()
            if name != "chai" and name not in ("auto", "plain_fast")]


def run_mode(mode: str, reuse: str = DEFAULT_MODE) -> str:
    """The registered mode a Sampler request runs: ``reuse``'s method when ``mode`` is chai (or its saved
    older name auto), else ``mode``.

    Raises:
        ValueError: an unknown mode, or a ``reuse`` that is not a reuse method (the message lists them).
    """
    from ..pipeline.modes import get_mode
    from .chorus_nodes import reuse_choices

    if mode in REUSE_MODE_VALUES:
        if reuse not in reuse_choices():
            raise ValueError(f"reuse must be one of {', '.join(reuse_choices())}, got {reuse!r}")
        return reuse
    return get_mode(mode).name

log = logging.getLogger("comfyui_chai.nodes")

#: Key of the LATENT dict that carries the video's pixel size, frame count and fps to the decoder.
LATENT_META_KEY = "chai"


class _FixedCaptions:
    """Caption encoder for ``ChaiPipeline`` that returns an already-encoded prompt (Text Encode ran it).

    Another prompt (a Chorus donor's) and ``token_words`` go to the text encoder that made the conditioning
    (its model is placed on the device for that one encoding)."""

    def __init__(self, cond: ChaiConditioning) -> None:
        self.cond = cond
        self.fingerprint = cond.fingerprint
        self.max_length = cond.length

    def _encoder(self):
        if self.cond.text_encoder is None:
            raise ValueError("this conditioning carries no text encoder; make it with CHAI Text Encode "
                             "(Chorus encodes the donor's prompt with it)")
        return self.cond.text_encoder

    def encode(self, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if prompt != self.cond.prompt:  # a Chorus donor's prompt: the same encoder, once
            enc = self._encoder()
            if enc.placement is not None:
                enc.placement.load()
            try:
                with torch.no_grad():
                    y, mask = enc.captions.encode(prompt)
            finally:
                if enc.placement is not None:
                    enc.placement.release()
            return y.detach().to(torch.float32), mask.detach().to(torch.int64)
        # Fresh copies: the originals may be inference tensors made under ComfyUI's inference_mode.
        return self.cond.y.clone(), self.cond.mask.clone()

    def token_words(self, prompt: str):
        """The word of each real caption row (the text encoder's tokenizer; nothing runs on the device)."""
        return self._encoder().captions.token_words(prompt)


def _check_inputs(model, conditioning, lookup) -> Tuple[ChaiModel, ChaiConditioning, Optional[ChaiLookup]]:
    if not isinstance(model, ChaiModel):
        raise TypeError(f"model must come from CHAI Load STDiT3, got {type(model).__name__}")
    if not isinstance(conditioning, ChaiConditioning):
        raise TypeError(f"conditioning must come from CHAI Text Encode, got {type(conditioning).__name__}")
    if lookup is not None and not isinstance(lookup, ChaiLookup):
        raise TypeError(f"lookup must come from CHAI Cache Lookup, got {type(lookup).__name__}")
    if conditioning.channels != model.caption_channels or conditioning.length != model.max_length:
        raise ValueError(
            f"the text encoder '{conditioning.encoder}' gives {conditioning.length}-token, {conditioning.channels}-wide "
            f"captions but the model '{model.name}' takes {model.max_length} tokens, {model.caption_channels} wide: "
            "load the text encoder that goes with this model (T5-XXL for OpenSora 1.2, 'tiny' for the tiny model)")
    if lookup is not None and lookup.prompt != conditioning.prompt:
        raise ValueError(
            f"the lookup is for the prompt {lookup.prompt[:60]!r} but the conditioning is for {conditioning.prompt[:60]!r}: "
            "feed the Entity Extractor from the same CHAI Text Encode as the sampler")
    return model, conditioning, lookup


class CHAISampler(io.ComfyNode):
    """Samples a video latent with CHAI: 8 steps with Cache Attention on a hit, 30 steps (stored) on a miss."""

    DISPLAY_NAME = "CHAI Sampler"

    @classmethod
    def define_schema(cls):
        from ..opensora.buckets import list_aspect_ratios, list_resolutions

        return io.Schema(
            node_id="CHAI_Sampler", display_name=cls.DISPLAY_NAME, category="CHAI",
            description=("OpenSora 1.2 RFLOW sampling with CHAI. Right before sampling it looks the prompt up under "
                         "the exact key of this model, size and schedule: a hit runs fast_steps with Cache Attention "
                         "on the cached latents; a miss runs the full schedule and stores its latents once the run "
                         "completes. Reports progress, stops on Cancel (nothing stored), and re-runs when the store "
                         "changes."),
            inputs=[
                Model.Input("model", tooltip="From CHAI Load STDiT3."),
                Conditioning.Input("conditioning", tooltip="From CHAI Text Encode."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed: the same seed gives the same noise on any device."),
                io.Combo.Input("resolution", options=list(list_resolutions()), default="240p",
                               tooltip="OpenSora resolution bucket (240p 9:16 = 240x426 pixels)."),
                io.Combo.Input("aspect_ratio", options=list(list_aspect_ratios()), default="9:16",
                               tooltip="Height:width bucket of OpenSora 1.2."),
                io.Int.Input("num_frames", default=0, min=0, max=408, tooltip=(
                    "Video frames; 0 = the model's default (OpenSora 1.2: 51 = 2 s at 24 fps; tiny: 17; the bundled "
                    "reference model: 8). 1 = an image. OpenSora 1.2 refuses 2-16.")),
                io.Int.Input("height", default=0, min=0, max=2048, step=8, tooltip=(
                    "Pixel height; 0 = from resolution and aspect_ratio (a pixel-space model: its native size, and "
                    "resolution/aspect_ratio are ignored).")),
                io.Int.Input("width", default=0, min=0, max=2048, step=8, tooltip="Pixel width; 0 = as height."),
                io.Int.Input("steps", default=0, min=0, max=200, tooltip=(
                    "Steps of a full run (a miss, or mode=full); 0 = the model's own (OpenSora 1.2: 30; a bundled "
                    "model: its config.json).")),
                io.Int.Input("fast_steps", default=8, min=1, max=200,
                             tooltip="Steps on a cache hit (fast mode with Cache Attention). Paper: 8."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.5, tooltip=(
                    "Classifier-free guidance scale; 0 = the model's own (OpenSora 1.2: 7.0; the bundled reference "
                    "model: 1.5 from its config.json).")),
                io.Combo.Input("mode", options=_mode_choices(), default=DEFAULT_MODE, tooltip=(
                    "Sampling mode. chai: cross-request reuse, the method the reuse input picks. "
                    + " ".join(_mode_help()) + " (auto and plain_fast are the older names of chai and plain, kept "
                    "so saved workflows load and run as they did.)")),
                io.Boolean.Input("store_on_miss", default=True,
                                 tooltip="Store a miss's latents when its run completes (reuse modes)."),
                Lookup.Input("lookup", optional=True, tooltip=(
                    "From CHAI Cache Lookup. Without it every run is a full run and nothing is stored.")),
                CacheConfig.Input("settings", optional=True, tooltip="Optional CHAI Cache Attention Settings."),
                io.Combo.Input("reuse", options=_reuse_choices(), default=DEFAULT_MODE, optional=True,
                               tooltip="Cross-request reuse when mode is chai. " + _reuse_help()),
                ChorusConfig.Input("chorus_settings", optional=True,
                                   tooltip="Optional CHAI Chorus Settings (reuse chorus or auto)."),
                IntraCache.Input("intra_cache", optional=True, tooltip=(
                    "Optional CHAI Intra-Request Cache (MixCache or TeaCache inside each run; off without it).")),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", is_output_list=True, tooltip=(
                    "The clean video latent {'samples': [1, C, T, H, W]} with the video's size and fps, for CHAI "
                    "VAE Decode.")),
                io.String.Output(display_name="report", is_output_list=True, tooltip=(
                    "What happened: hit or miss, matched entity and similarity, steps, latency split in ms; with "
                    "intra-request caching, which steps were computed and which reused at which granularity.")),
            ],
            hidden=[io.Hidden.unique_id],
            is_input_list=True)  # nodes/adapter.py maps ComfyUI's lists: progress shows "prompt k of n"

    @classmethod
    def fingerprint_inputs(cls, **lists):
        """Per prompt (inputs arrive as lists; a linked input as ``(None,)``): for a mode that looks
        up, the generation of every store this process has open, so a result sampled against an older
        store state is never reused (the Cache node upstream does the same per store). Other modes do
        not read the store: their cache key is the inputs alone (``intra_cache`` and the other
        settings sockets included: ComfyUI keys a linked input by its upstream node)."""
        return tuple(cls._fingerprint_one(**kwargs) for kwargs in map_lists(lists))

    @classmethod
    def _fingerprint_one(cls, mode=DEFAULT_MODE, reuse=DEFAULT_MODE, **_inputs):
        from ..pipeline.modes import get_mode

        try:
            if not get_mode(run_mode(mode, reuse)).uses_lookup:
                return ""
        except ValueError as exc:  # ComfyUI shows the error when the node runs
            return f"invalid:{exc}"
        return ";".join(f"{h.id}@{h.store.generation}" for h in registry.open_stores())

    @classmethod
    @comfy_entry(batch=True)
    def execute(cls, model, conditioning, seed=42, resolution="240p", aspect_ratio="9:16", num_frames=0, height=0,
                width=0, steps=0, fast_steps=8, cfg=0.0, mode=DEFAULT_MODE, store_on_miss=True, lookup=None,
                settings=None, reuse=DEFAULT_MODE, chorus_settings=None, intra_cache=None):
        """One prompt (the adapter maps a batch): returns {"ui": {...}, "result": (LATENT, report)}.

        The request runs :func:`run_mode` (``mode`` chai or its saved older name auto: the ``reuse`` input's
        method, chai by default; else ``mode``). Settings (``pipeline.settings.resolve_settings``): the
        model's own (``model.defaults``), then this node's steps / fast_steps / cfg (0 = not given), then the
        Cache Attention Settings node, then the Chorus Settings node, then the Intra-Request Cache node,
        then the Cache Lookup node's threshold. The Intra-Request Cache node's method (``mixcache`` /
        ``teacache``) runs as a model hook of the request, with any reuse method.

        Raises:
            TypeError / ValueError: wrong sockets, mismatched text encoder, bad size, settings or mode
                (the message says what to change). ComfyUI's InterruptProcessingException on Cancel.
        """
        from ..opensora.rflow import SamplingCancelled
        from ..pipeline import ChaiPipeline
        from ..pipeline.modes import get_mode
        from ..pipeline.settings import resolve_settings

        model, cond, lookup = _check_inputs(model, conditioning, lookup)
        mode = get_mode(run_mode(mode, reuse)).name
        intra = intra_cache or {"hook": None, "settings": {}}
        if not isinstance(intra, dict) or "hook" not in intra:
            raise TypeError("intra_cache must come from CHAI Intra-Request Cache")
        hooks = (intra["hook"],) if intra["hook"] else ()
        if (height == 0) != (width == 0):
            raise ValueError(f"set both height and width (pixels), or both to 0 to use the bucket; got {height}x{width}")
        request_settings = resolve_settings(
            model.defaults, {"full_steps": int(steps) or None, "fast_steps": int(fast_steps), "cfg_scale": float(cfg) or None},
            dict(settings or {}), dict(chorus_settings or {}), dict(intra["settings"]),
            {"threshold": lookup.threshold if lookup is not None else None})
        cache_lookup = lookup.lookup if lookup is not None else None
        # Pixel-space models (the bundled reference model) size and decode in pixels: see the pipeline package.
        pipe = ChaiPipeline(model.module, None, _FixedCaptions(cond), cache_lookup, settings=request_settings,
                            model_defaults=model.defaults, model_fingerprint=model.fingerprint,
                            size_dtype=model.size_dtype, rflow=model.rflow, pixel_space=bool(model.pixel_space),
                            native_size=model.native_size, default_frames=int(model.default_frames), fps=int(model.fps))
        frames = int(num_frames) or int(model.default_frames)
        if model.pixel_space and not height:
            height, width = model.native_size or (0, 0)
        # Validate the size before placing a model on the GPU.
        size = pipe.resolve_size(None if height else resolution, aspect_ratio, height or None, width or None, frames)
        unique_id = cls.hidden.unique_id if cls.hidden is not None else None
        progress = host.ProgressReporter(unique_id)
        try:
            with host.model_compute(), host.interruptible(model.module):
                if model.placement is not None:
                    model.placement.load()
                result = pipe.generate(cond.prompt, seed=int(seed), height=size[0], width=size[1], num_frames=size[2],
                                       mode=mode, decode=False, store=bool(store_on_miss), progress=progress,
                                       should_cancel=host.interrupted, hooks=hooks,
                                       query=lookup.query if lookup is not None else None)
        except SamplingCancelled as exc:
            host.raise_interrupted(exc)
        finally:
            if model.placement is not None:
                model.placement.release()

        fps = model.fps if size[2] > 1 else 120  # OpenSora conditions single images on 120 fps
        latent = {"samples": result.latent[None].to(host.intermediate_device()),
                  LATENT_META_KEY: {"height": result.height, "width": result.width, "num_frames": result.num_frames,
                                    "fps": fps, "mode": result.mode, "hit": result.hit, "prompt": result.prompt,
                                    "space": "pixels" if model.pixel_space else "latent"}}
        summary = result.summary()
        summary["time"] = time.time()
        report = _report_line(summary)
        log.info("CHAI: %s", report)
        ui: Dict[str, Any] = {"chai_run": [summary], "text": [report]}
        if lookup is not None:
            lookup.cache.last_run = summary
            lookup.cache.count_steps(summary)
            payload = registry.stats_payload(lookup.cache)
            ui["chai_stats"] = [payload]
            host.send_event(registry.STATS_EVENT, payload)
        return {"ui": ui, "result": (latent, report)}


def _report_line(summary: Dict[str, Any]) -> str:
    """One prompt's verdict as the Sampler took it: hit or miss, what served it and why, steps, ms."""
    t = summary["timings_ms"]
    why = f" ({summary['reason']})" if summary.get("reason") else ""
    if summary["hit"]:
        head = (f"hit: served by {summary['served_by']}{why}, entry #{summary['entry_id']} -> "
                f"{summary['steps']} steps")
    elif summary["mode"] == "full" and summary.get("inserted_entry_ids"):
        stored = ", ".join(f"#{i}" for i in summary["inserted_entry_ids"])
        head = f"miss{why} -> full mode, {summary['steps']} steps, stored as entry {stored}"
    elif summary["mode"] == "full" and summary.get("not_stored"):
        head = f"miss{why} -> full mode, {summary['steps']} steps, {summary['not_stored']}"
    else:
        head = f"{summary['sampling_mode']} mode, {summary['steps']} steps (no cache)"
    from ..pipeline.mixcache import describe

    prompt = summary["prompt"] if len(summary["prompt"]) <= 60 else summary["prompt"][:57] + "..."
    intra = "".join(f"\n{describe(r)}" for r in summary.get("hook_reports", {}).values() if "map" in r)
    return (f"{head}; {summary['height']}x{summary['width']}, {summary['num_frames']} frames; "
            f"lookup {t['lookup_ms']:.0f} ms, denoise {t['denoise_ms']:.0f} ms, store {t['store_ms']:.0f} ms, "
            f"total {t['total_ms']:.0f} ms; prompt \"{prompt}\"{intra}")


class CHAIVAEDecode(io.ComfyNode):
    """Decodes a CHAI latent into video frames (an IMAGE batch, one image per frame) and its fps."""

    DISPLAY_NAME = "CHAI VAE Decode"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CHAI_VAEDecode", display_name=cls.DISPLAY_NAME, category="CHAI",
            description=("Decode with OpenSora's video VAE into an IMAGE batch of frames plus the fps; save it with "
                         "ComfyUI's CreateVideo + SaveVideo (mp4) or VideoHelperSuite's Video Combine."),
            inputs=[io.Latent.Input("latent", tooltip=(
                        "From the CHAI Sampler (carries the video's frame count and fps).")),
                    Vae.Input("vae", optional=True, tooltip=(
                        "From CHAI Load VAE (the family of the STDiT3 model). Not needed for a pixel-space model "
                        "such as the bundled reference model."))],
            outputs=[io.Image.Output(display_name="frames", tooltip=(
                         "Video frames [F, H, W, 3] float32 in 0..1 (ComfyUI's IMAGE batch), for CreateVideo -> "
                         "SaveVideo or VHS Video Combine.")),
                     io.Float.Output(display_name="fps", tooltip=(
                         "Frames per second of the video (OpenSora 1.2: 24), for CreateVideo's fps or VHS's "
                         "frame_rate."))])

    @classmethod
    @comfy_entry()
    def execute(cls, latent, vae=None):
        """Returns (IMAGE [F, H, W, 3], fps). Raises TypeError/ValueError on a latent that is not a CHAI video latent."""
        return _decode(latent, vae)


def _decode(latent, vae=None) -> Tuple[torch.Tensor, float]:
    """(IMAGE [F, H, W, 3], fps) of a CHAI latent. Raises TypeError/ValueError on a latent that is not a CHAI video latent."""
    if vae is not None and not isinstance(vae, ChaiVAE):
        raise TypeError(f"vae must come from CHAI Load VAE, got {type(vae).__name__}")
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise TypeError("latent must be a LATENT dict with 'samples' (from the CHAI Sampler)")
    meta = latent.get(LATENT_META_KEY)
    samples = latent["samples"]
    if not isinstance(meta, dict) or "num_frames" not in meta:
        raise ValueError("this LATENT has no CHAI video metadata (frame count): connect it straight from the "
                         "CHAI Sampler; latents from other samplers are not OpenSora video latents")
    if samples.ndim != 5:
        raise ValueError(f"a CHAI video latent is [B, C, T, H, W], got {tuple(samples.shape)}")
    mm = host.comfy_module("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
    fps = float(meta.get("fps", 24))
    if meta.get("space") == "pixels":  # the sample is the RGB clip in [-1, 1]: no VAE
        frames = ((samples.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
        return (frames.reshape(-1, *frames.shape[2:]).contiguous().to(host.intermediate_device()), fps)
    if vae is None or vae.module is None:
        raise ValueError("this latent needs a VAE to decode: connect CHAI Load VAE (the family of the STDiT3 "
                         "model: the tiny VAE with the tiny model, OpenSora VAE v1.2 with STDiT-v3)")
    module = vae.module
    try:
        with host.model_compute():
            device = vae.placement.load() if vae.placement is not None else host._module_device(module)
            z = samples.to(device=device, dtype=module.dtype)
            video = module.decode(z, num_frames=int(meta["num_frames"]))  # [B, 3, F, H, W] in [-1, 1]
            frames = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
            frames = frames.reshape(-1, *frames.shape[2:]).contiguous()
    finally:
        if vae.placement is not None:
            vae.placement.release()
    return (frames.to(host.intermediate_device()), fps)
