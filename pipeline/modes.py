"""Sampling modes as plug-ins: what a request runs once its settings, lookup result and schedule are known.

A mode is a :class:`SamplingMode` registered by name (:func:`register_mode`). The request path
(:meth:`.core.ChaiPipeline.generate`) resolves the size and the compatibility key, looks the prompt up
when the mode asks for it, encodes the caption and draws the noise; then it hands the mode one
:class:`ModeRequest` and gets back one :class:`ModeOutput`: the clean latent and what to store. It
decodes, and inserts what the mode asked to store only once the whole request has completed.

Built-in modes:

* ``chai``: CHAI. A hit runs ``fast_steps`` with Cache Attention on the served entry; a miss runs
  ``full_steps``, capturing the latents a later hit needs, and stores them;
* ``full``: the baseline, ``full_steps`` without the cache; nothing looked up or stored;
* ``plain`` (legacy ``plain_fast``): ``fast_steps`` without the cache (what a short schedule alone gives);
* ``warm``: ``full_steps`` with capture, stored whatever the lookup finds (fills a store ahead of a
  batch; the quality harness warms its store with it);
* ``chorus``, ``chorus_warm`` and ``auto`` (whole-prompt reuse after Chorus, and Chorus-else-CHAI-else-full
  per request) are registered by :mod:`.chorus`.

A mode says how the pipeline looks its requests up (:meth:`SamplingMode.lookup_spec`: entity or
whole-prompt keys, threshold, the settings part of the compatibility key), and may look up again as
another mode would (``ModeRequest.lookup_for``) and store under several keys (``ModeOutput.inserts``).

The command line's ``generate --mode``, the ComfyUI Sampler's mode list and the quality harness read
this registry, so a new mode is one file with one ``register_mode(...)`` call. Modes compose with named
model hooks (:func:`register_model_hook`, e.g. an intra-request cache): a mode spec such as
``chai8+mixcache`` (:func:`parse_mode_spec`) runs mode ``chai`` at 8 steps with hook ``mixcache``
attached to the model for the request; a spec that starts with a hook (``mixcache``, ``teacache30``)
runs the ``full`` mode with it, and ``@key=value`` suffixes set settings for that spec alone
(``teacache@teacache_threshold=0.2``).
"""

from __future__ import annotations

import abc
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..opensora.cache_attention import sample_fast, sample_full
from ..opensora.hooks import ModelHook
from ..opensora.rflow import RFlow, StepState
from .settings import SETTING_FIELDS, RequestSettings, parse_setting

__all__ = [
    "SamplingMode",
    "ModeRequest",
    "ModeOutput",
    "ModeSpec",
    "LookupSpec",
    "register_mode",
    "unregister_mode",
    "get_mode",
    "mode_names",
    "mode_choices",
    "parse_mode_spec",
    "register_model_hook",
    "unregister_model_hook",
    "model_hook_names",
    "keyed_hook_names",
    "make_model_hook",
    "match_reason",
    "DEFAULT_MODE",
]

log = logging.getLogger("comfyui_chai.pipeline")

#: The mode a request runs when none is named.
DEFAULT_MODE = "chai"


@dataclass(frozen=True)
class LookupSpec:
    """How the pipeline looks a request up for a mode (:meth:`SamplingMode.lookup_spec`).

    Attributes:
        mode: ``"entity"`` (CHAI: noun-phrase entities) or ``"prompt"`` (the whole normalised prompt).
        store_fingerprint: the settings part of the compatibility key: what the mode's entries hold
            (``RequestSettings.store_fingerprint`` for CHAI's). Entries of another key never match.
        threshold: least cosine similarity for a hit; None keeps the pipeline lookup's own.
        record: count the lookup in the store's statistics (a mode that may look up twice per request
            records the deciding lookup itself with ``ModeRequest.record_lookup``).
    """

    mode: str = "entity"
    store_fingerprint: str = ""
    threshold: Optional[float] = None
    record: bool = True


@dataclass
class ModeRequest:
    """What a mode is given: the request, its settings and schedule, its lookup result, the model.

    Attributes:
        prompt, seed, height, width, num_frames: the request (pixels, frames).
        settings: the request's :class:`.settings.RequestSettings` (schedule, attention, lookup).
        model: the denoiser (an STDiT3; hooks attach to it). rflow: the sampler.
        noise: initial noise [1, C, T, H, W] on the model's device.
        sample_kwargs: the keyword arguments of ``RFlow.sample`` other than the schedule and CFG
            (``y``, ``y_mask``, ``y_null``, ``height``, ``width``, ``num_frames``, ``size_dtype``,
            ``should_cancel``).
        callback: per-step callback (progress, ``on_step``); pass it to the sampler.
        lookup: the ``cache.lookup.LookupResult`` of this request (None when the mode does not look up,
            or the pipeline has no store); a hit carries the served entry's latents.
        load_entry: ``load_entry(entry_id) -> {name: tensor} | None``: another stored entry's latents
            (e.g. for per-entity fusion), checked by the store.
        measure: synchronise CUDA around timed sections.
        captions: the pipeline's caption encoder (``encode``, ``token_words``).
        lookup_for: ``lookup_for(mode_name, record=True) -> LookupResult | None``: this request looked up
            as the registered mode ``mode_name`` would be (its keys, threshold and compatibility key);
            None without a store. Its time counts as lookup time.
        record_lookup: ``record_lookup(result)``: count a lookup made with ``record=False`` in the store's
            statistics (the one that decided).
        compat_key_for: ``compat_key_for(mode_name) -> str``: the compatibility key that mode stores under.
    """

    prompt: str
    seed: int
    height: int
    width: int
    num_frames: int
    settings: RequestSettings
    model: torch.nn.Module
    rflow: RFlow
    noise: torch.Tensor
    sample_kwargs: Dict[str, Any]
    callback: Optional[Callable[[StepState], None]] = None
    lookup: Any = None
    load_entry: Optional[Callable[[int], Optional[Mapping[str, torch.Tensor]]]] = None
    measure: bool = False
    captions: Any = None
    lookup_for: Optional[Callable[..., Any]] = None
    record_lookup: Optional[Callable[[Any], None]] = None
    compat_key_for: Optional[Callable[[str], str]] = None

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        """(C, T, H, W) of the request's latent."""
        return tuple(self.noise.shape[1:])


@dataclass
class ModeOutput:
    """What a mode returns.

    Attributes:
        latent: the clean latent [1, C, T, H, W] (fp32).
        steps: denoising steps run.
        label: what ran, for reports (``"fast"``, ``"full"``, ``"plain_fast"``, or the mode's own word).
        hit: the request was served from the cache.
        store: ``{name: tensor}`` to insert under the request's key once it completes, or None.
        store_info: JSON-ready metadata kept with the stored entry.
        entry_ids: the cached entries whose latents were used (the served one first).
        kv_ms: time spent turning cached latents into K/V (ms).
        load_ms: time spent loading extra entries (ms; counted as lookup time, not denoising; lookups made
            through ``ModeRequest.lookup_for`` are counted by the pipeline).
        inserts: more ``(lookup result, tensors, info)`` to store, each under its lookup's key, once the
            request completed (``store`` goes under the request's own lookup).
        served_by: what served the request, for reports: the reuse method on a hit (``"chai"``,
            ``"chorus"``), ``"full"`` when a reuse mode ran the full schedule; default the mode's name.
        reason: why, in one line (the similarity against the threshold).
        lookup: the lookup result to report (default: the request's own lookup).
        compat_key: the key of ``lookup`` (default: the request's key).
        details: JSON-ready extras for reports (Chorus: its stage bounds and region).
    """

    latent: torch.Tensor
    steps: int
    label: str
    hit: bool = False
    store: Optional[Dict[str, torch.Tensor]] = None
    store_info: Dict[str, Any] = field(default_factory=dict)
    entry_ids: List[int] = field(default_factory=list)
    kv_ms: float = 0.0
    load_ms: float = 0.0
    inserts: List[Tuple[Any, Dict[str, torch.Tensor], Dict[str, Any]]] = field(default_factory=list)
    served_by: str = ""
    reason: str = ""
    lookup: Any = None
    compat_key: Optional[str] = None
    details: Dict[str, Any] = field(default_factory=dict)


class SamplingMode(abc.ABC):
    """One way to sample a request. Subclass, set the attributes, implement :meth:`sample`, register.

    Attributes:
        name: registry name (lower case letters, digits, ``_``; not ending in a digit).
        aliases: other names that select it (e.g. a legacy name saved in workflows).
        uses_lookup: the pipeline looks the prompt up before :meth:`sample` (and records the lookup).
        loads_latents: the lookup loads and checks the best entry's latents (a hit can be served).
        steps_setting: the ``ScheduleSettings`` field a spec's number sets (``chai4`` -> fast_steps 4).
        warm_with: the mode (or modes) that fill a store with entries this mode can be served (quality
            harness).
        reuse: a cross-request reuse method: offered by ``generate --reuse`` and the Sampler's ``reuse`` input.
        description: one line for the command line's and the node's help.
    """

    name: str = ""
    aliases: Tuple[str, ...] = ()
    uses_lookup: bool = False
    loads_latents: bool = True
    steps_setting: str = "fast_steps"
    warm_with: Union[str, Tuple[str, ...]] = "warm"
    reuse: bool = False
    description: str = ""

    def lookup_spec(self, settings: RequestSettings) -> LookupSpec:
        """How the pipeline looks this mode's requests up (default: CHAI's entity keys under CHAI's key)."""
        return LookupSpec(mode="entity", store_fingerprint=settings.store_fingerprint())

    @abc.abstractmethod
    def sample(self, request: ModeRequest) -> ModeOutput:
        """Sample ``request``; return the latent and what to store (see :class:`ModeOutput`)."""


def _full_run(request: ModeRequest, config, capture: bool = True
              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, Any]]:
    """``sample_full``; with ``capture`` the planned latents are kept (and the steps before them are exact)."""
    run = sample_full(request.rflow, request.model, request.noise, config, callback=request.callback,
                      capture=capture, **request.sample_kwargs)
    return run.latent, run.captured, {"full_step_index": run.plan, "full_timestep": run.timesteps}


class FullMode(SamplingMode):
    """The baseline: ``full_steps`` RFLOW steps, no cache, nothing stored."""

    name = "full"
    steps_setting = "full_steps"
    description = "full_steps without the cache; nothing looked up or stored (baseline)"

    def sample(self, request: ModeRequest) -> ModeOutput:
        config = request.settings.cache_attention_config()
        latent, _captured, _info = _full_run(request, config, capture=False)
        return ModeOutput(latent=latent, steps=config.full_steps, label="full")


class PlainMode(SamplingMode):
    """``fast_steps`` RFLOW steps without the cache: what the short schedule alone gives."""

    name = "plain"
    aliases = ("plain_fast",)
    description = "fast_steps without the cache (baseline)"

    def sample(self, request: ModeRequest) -> ModeOutput:
        config = request.settings.cache_attention_config()
        latent, _ = sample_fast(request.rflow, request.model, request.noise, config, cached=None,
                                callback=request.callback, **request.sample_kwargs)
        return ModeOutput(latent=latent, steps=config.fast_steps, label="plain_fast")


def _store_info(request: ModeRequest, info: Dict[str, Any]) -> Dict[str, Any]:
    return {"seed": int(request.seed), "height": request.height, "width": request.width,
            "num_frames": request.num_frames, "config": request.settings.tag(),
            "cache_steps": list(request.settings.attention.cache_steps), **info}


def match_reason(result: Any, what: str) -> str:
    """One line on a lookup's verdict, e.g. ``entity 'red fox' ~ 'red fox' 0.912 >= 0.72`` (for reports).

    Args:
        result: a ``cache.lookup.LookupResult`` or None (no store). what: ``"entity"`` or ``"prompt"``.
    """
    if result is None:
        return "no store"
    threshold = result.threshold
    if result.matched is None:
        return f"no stored {what} to compare (threshold {threshold:.2f})"
    verdict = ">=" if result.hit else "<"
    return f"{what} {result.entity!r} ~ {result.matched!r} {result.similarity:.3f} {verdict} {threshold:.2f}"


class ChaiMode(SamplingMode):
    """CHAI: a hit runs ``fast_steps`` with Cache Attention, a miss runs ``full_steps`` and stores its capture."""

    name = "chai"
    uses_lookup = True
    reuse = True
    description = "CHAI: look up; a hit runs fast_steps with Cache Attention, a miss runs full_steps and is stored"

    def sample(self, request: ModeRequest) -> ModeOutput:
        served = self.serve(request)
        if served is not None:
            return served
        config = request.settings.cache_attention_config()
        keep = request.lookup is not None and config.enabled
        latent, captured, info = _full_run(request, config, capture=keep)
        return ModeOutput(latent=latent, steps=config.full_steps, label="full", store=captured if keep else None,
                          store_info=_store_info(request, info) if keep else {}, served_by="full",
                          reason=match_reason(request.lookup, "entity"))

    def serve(self, request: ModeRequest) -> Optional[ModeOutput]:
        """The hit path: ``fast_steps`` with Cache Attention on ``request.lookup``'s entry (and fused ones);
        None when the lookup missed, Cache Attention is off or the entry holds no usable latents."""
        config = request.settings.cache_attention_config()
        if request.lookup is None or not request.lookup.hit or not config.enabled:
            return None
        t0 = time.perf_counter()
        entries, ids = self._entries(request, config)
        load_ms = (time.perf_counter() - t0) * 1000.0
        if not entries:
            return None
        latent, ca = sample_fast(request.rflow, request.model, request.noise, config, cached=entries,
                                 callback=request.callback, measure=request.measure, **request.sample_kwargs)
        return ModeOutput(latent=latent, steps=config.fast_steps, label="fast", hit=True, entry_ids=ids,
                          kv_ms=ca.kv_ms if ca is not None else 0.0, load_ms=load_ms, served_by="chai",
                          reason=match_reason(request.lookup, "entity"))

    @staticmethod
    def _entries(request: ModeRequest, config) -> Tuple[List[Dict[str, torch.Tensor]], List[int]]:
        """The cached entries to attend to: the served one, plus (per_entity fusion) the best entry of
        every other matched entity. Entries lacking a latent or of another shape are skipped."""
        want = request.latent_shape
        result = request.lookup

        def usable(latents: Optional[Mapping[str, torch.Tensor]]) -> bool:
            return latents is not None and all(
                n in latents and tuple(latents[n].shape) == want for n in config.latent_names)

        if not usable(result.latents):
            log.warning(
                "entry %s does not hold %s of shape %s; treated as a miss", result.entry_id, config.latent_names, want)
            return [], []
        entries: List[Dict[str, torch.Tensor]] = [dict(result.latents)]
        ids: List[int] = [int(result.entry_id)]
        if config.fusion == "per_entity" and request.load_entry is not None:
            ranked = sorted((s for s in result.per_entity if s.hit and s.entry_id is not None),
                            key=lambda s: -s.similarity)
            for score in ranked:
                if len(entries) >= config.max_fused:
                    break
                if score.entry_id in ids:
                    continue
                latents = request.load_entry(int(score.entry_id))
                if usable(latents):
                    entries.append(dict(latents))  # type: ignore[arg-type]
                    ids.append(int(score.entry_id))
        return entries, ids


class WarmMode(SamplingMode):
    """``full_steps`` with capture, stored whatever the lookup finds: fills a store ahead of a batch."""

    name = "warm"
    steps_setting = "full_steps"
    uses_lookup = True
    loads_latents = False
    description = "full_steps with capture, stored even when the store already holds a match (fill a store)"

    def sample(self, request: ModeRequest) -> ModeOutput:
        config = request.settings.cache_attention_config()
        keep = request.lookup is not None and config.enabled
        latent, captured, info = _full_run(request, config, capture=keep)
        return ModeOutput(latent=latent, steps=config.full_steps, label="full", store=captured if keep else None,
                          store_info=_store_info(request, info) if keep else {})


# ------------------------------------------------------------------------------------ registries

_NAME = re.compile(r"^[a-z][a-z0-9_]*[a-z_]$|^[a-z]$")
_MODES: Dict[str, SamplingMode] = {}
_ALIASES: Dict[str, str] = {}
_HOOKS: Dict[str, Callable[[ModeRequest], ModelHook]] = {}
_KEYED_HOOKS: set = set()


def register_mode(mode: SamplingMode, *, replace: bool = False) -> SamplingMode:
    """Add ``mode`` to the registry under ``mode.name`` (and its aliases); returns it.

    Raises:
        TypeError: not a :class:`SamplingMode`.
        ValueError: a malformed name (lower case, not ending in a digit, so ``<name><steps>`` parses),
            or a name or alias taken (pass ``replace=True`` to replace a mode of the same name).
    """
    if not isinstance(mode, SamplingMode):
        raise TypeError(f"a sampling mode must be a SamplingMode, got {type(mode).__name__}")
    for name in (mode.name, *mode.aliases):
        if not _NAME.match(name or ""):
            raise ValueError(f"mode name {name!r} must be lower-case letters, digits or _, not ending in a digit")
        owner = _ALIASES.get(name, name if name in _MODES else None)
        if owner is not None and not (replace and owner == mode.name):
            raise ValueError(f"the mode name {name!r} is taken by mode {owner!r}; pick another name")
        if name in _HOOKS:
            raise ValueError(f"{name!r} names a model hook; pick another name")
    if mode.steps_setting not in ("full_steps", "fast_steps"):
        raise ValueError(f"steps_setting must be 'full_steps' or 'fast_steps', got {mode.steps_setting!r}")
    if replace and mode.name in _MODES:
        unregister_mode(mode.name)
    _MODES[mode.name] = mode
    for alias in mode.aliases:
        _ALIASES[alias] = mode.name
    return mode


def unregister_mode(name: str) -> SamplingMode:
    """Remove a mode (and its aliases) from the registry; returns it. Raises ValueError when unknown."""
    mode = get_mode(name)
    del _MODES[mode.name]
    for alias in mode.aliases:
        _ALIASES.pop(alias, None)
    return mode


def get_mode(name: str) -> SamplingMode:
    """The registered mode called ``name`` (or an alias of it).

    Raises:
        ValueError: no such mode (the message lists the registered ones).
    """
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    mode = _MODES.get(key) if isinstance(key, str) else None
    if mode is None:
        raise ValueError(f"unknown sampling mode {name!r}; registered modes: {', '.join(mode_choices())}")
    return mode


def mode_names() -> List[str]:
    """Registered mode names, in registration order."""
    return list(_MODES)


def mode_choices() -> List[str]:
    """Every name that selects a mode: the names, then the aliases (for menus that must accept saved values)."""
    return list(_MODES) + list(_ALIASES)


def register_model_hook(name: str, factory: Callable[[ModeRequest], ModelHook], *, replace: bool = False,
                        keyed: bool = False) -> None:
    """Make ``+<name>`` in a mode spec attach ``factory(request)`` to the model for a request.

    Args:
        keyed: the hook changes what the model computes (an intra-request cache): its name becomes part of
            the compatibility key of requests that run it, so entries stored by such runs carry it.

    Raises:
        ValueError: a malformed name, or a name taken by a mode or (unless ``replace``) a hook.
    """
    if not _NAME.match(name or ""):
        raise ValueError(f"hook name {name!r} must be lower-case letters, digits or _, not ending in a digit")
    if name in _MODES or name in _ALIASES:
        raise ValueError(f"{name!r} names a sampling mode; pick another name")
    if name in _HOOKS and not replace:
        raise ValueError(f"a model hook named {name!r} is registered already")
    _HOOKS[name] = factory
    _KEYED_HOOKS.discard(name)
    if keyed:
        _KEYED_HOOKS.add(name)


def unregister_model_hook(name: str) -> None:
    """Remove a hook factory. Raises ValueError when unknown."""
    if name not in _HOOKS:
        raise ValueError(f"no model hook named {name!r} is registered")
    del _HOOKS[name]
    _KEYED_HOOKS.discard(name)


def model_hook_names() -> List[str]:
    """Registered model-hook names."""
    return list(_HOOKS)


def keyed_hook_names(names: Sequence[str]) -> Tuple[str, ...]:
    """Those of ``names`` registered ``keyed`` (they go into the compatibility key), in the order given."""
    return tuple(n for n in names if n in _KEYED_HOOKS)


def make_model_hook(name: str, request: ModeRequest) -> ModelHook:
    """The hook ``name`` builds for ``request``. Raises ValueError when no hook of that name is registered."""
    if name not in _HOOKS:
        raise ValueError(f"unknown model hook {name!r}; registered hooks: {', '.join(_HOOKS) or 'none'}")
    return _HOOKS[name](request)


@dataclass(frozen=True)
class ModeSpec:
    """A parsed mode spec such as ``chai8+mixcache``: the mode, its step count, the hooks to attach.

    Attributes:
        text: the spec as written (or a variant's name). mode: the registered mode's name. steps: the
        number after the name (sets ``mode.steps_setting``), or None. hooks: model-hook names to attach, in
        order. settings: ``(key, value)`` settings overrides of this spec (``@key=value``, or a
        variant's: :meth:`variant`), in order.
    """

    text: str
    mode: str
    steps: Optional[int] = None
    hooks: Tuple[str, ...] = ()
    settings: Tuple[Tuple[str, Any], ...] = ()

    def overrides(self) -> Dict[str, Any]:
        """The settings overrides of the spec: the step count's (e.g. ``{"fast_steps": 8}``), then its own
        ``settings`` (``@key=value``, a variant's) ({} without either)."""
        out: Dict[str, Any] = {} if self.steps is None else {get_mode(self.mode).steps_setting: self.steps}
        out.update(dict(self.settings))
        return out

    def variant(self, text: str, **settings: Any) -> "ModeSpec":
        """This spec under another name with settings of its own (an ablation in the quality harness, e.g.
        ``parse_mode_spec("chorus").variant("chorus-stage1", chorus_stage2=False)``)."""
        return ModeSpec(text=text, mode=self.mode, steps=self.steps, hooks=self.hooks,
                        settings=tuple(self.settings) + tuple(settings.items()))


#: A spec that starts with a hook runs this mode with it (``mixcache`` = ``full+mixcache``).
HOOK_SPEC_MODE = "full"


def parse_mode_spec(text: str) -> ModeSpec:
    """Parse ``<mode>[<steps>][+<hook>...][@<key>=<value>...]``, e.g. ``full30``, ``plain8``, ``chai4``,
    ``chai8+mixcache``, ``mixcache``, ``teacache@teacache_threshold=0.2``.

    The mode is any registered mode (or alias); the optional number sets its steps (``full``: full_steps,
    ``plain``/``chai``: fast_steps); every ``+<hook>`` must be a registered model hook. A spec that starts
    with a hook instead of a mode runs :data:`HOOK_SPEC_MODE` (``full``) with it: ``mixcache`` is
    ``full+mixcache``, ``teacache20`` is ``full20+teacache``. Each ``@key=value`` sets one setting
    (:data:`.settings.SETTING_FIELDS`; tuples ``/``-separated) for this spec only.

    Raises:
        ValueError: an empty spec, an unknown mode, hook or setting, a malformed value, or a step count
            below 1 (the message names it).
    """
    head, *assignments = str(text).split("@")
    parts = [p.strip().lower() for p in head.split("+")]
    if not parts[0]:
        raise ValueError(f"empty mode spec {text!r}; write e.g. chai8, plain4 or full30")
    match = re.fullmatch(r"(.*?)(\d*)", parts[0])
    name, digits = match.group(1), match.group(2)
    if name in _HOOKS:
        parts.insert(1, name)
        name = HOOK_SPEC_MODE
    mode = get_mode(name)
    steps = int(digits) if digits else None
    if steps is not None and steps < 1:
        raise ValueError(f"mode spec {text!r}: the step count must be >= 1")
    for hook in parts[1:]:
        if hook not in _HOOKS:
            raise ValueError(f"mode spec {text!r}: unknown model hook {hook!r}; registered hooks: "
                             f"{', '.join(_HOOKS) or 'none'}")
    settings = []
    for assignment in assignments:
        key, sep, value = assignment.strip().partition("=")
        if not sep or key not in SETTING_FIELDS:
            raise ValueError(f"mode spec {text!r}: {assignment!r} must be <setting>=<value> with a setting among "
                             f"{', '.join(SETTING_FIELDS)}")
        try:
            settings.append((key, parse_setting(key, value.strip())))
        except ValueError:
            raise ValueError(f"mode spec {text!r}: {value!r} is not a valid value for {key}") from None
    return ModeSpec(text=str(text), mode=mode.name, steps=steps, hooks=tuple(parts[1:]), settings=tuple(settings))


for _mode in (ChaiMode(), FullMode(), PlainMode(), WarmMode()):
    register_mode(_mode)
