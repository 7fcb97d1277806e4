"""One settings object per request, resolved in one function, and the cache's compatibility key.

A request's CHAI settings come in three parts, each a frozen dataclass with a fingerprint (in the
style of diffusers' per-technique cache configs):

* :class:`ScheduleSettings`: the sampler schedule: steps of a miss and of a hit, CFG scale, the dtype
  a miss stores its latents in;
* :class:`AttentionSettings`: how Cache Attention uses cached latents: at which fast steps, in which
  block, replacing or extending that block's keys and values, in which CFG half;
* :class:`LookupSettings`: which cached entries a request is served: the similarity threshold, and
  one best entry or one per matched entity (fusion);
* :class:`MixCacheSettings`: the intra-request caches' knobs (``opensora.mixcache``: warm-up, the cap on
  consecutive reuse, the trigger and per-granularity thresholds, the block span; the TeaCache
  baseline's threshold). They act only when a request names the ``mixcache`` or ``teacache`` hook.

:func:`resolve_settings` is the one place they are assembled, with one precedence, lowest first:

1. **built-in defaults**: OpenSora 1.2 and the CHAI paper (the dataclass defaults: 30 / 8 steps,
   CFG 7.0, cache steps 2-4 in block 0, replace, conditional half, one best entry, the lookup's
   calibrated threshold);
2. **the model's own defaults**: its folder's ``config.json``, as its family reads it (the bundled
   reference model: CFG 1.5 from "sampler", K/V mode ``concat`` from "cache_attention"; see
   ``refmodel.model.cache_attention_defaults``); OpenSora 1.2's files add nothing;
3. **the user's overrides**, in the order given (a later one wins): command-line flags; the ComfyUI
   Sampler's inputs, then a Cache Attention Settings node, then the Cache Lookup node's threshold;
   the quality harness's arguments. A value of ``None`` means "not given" and never overrides.

One rule ties the layers: cache steps that no override named are cut to the fast schedule (a model's
steps 2-4 under ``fast_steps=3`` become 2-3), while cache steps an override names beyond it are an
error.

Overrides are flat mappings whose keys are :data:`SETTING_FIELDS` (the names ``CacheAttentionConfig``
and a model's ``config.json`` use). The compatibility key a request is stored and found under is built
by :func:`compat_key`, only there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..opensora.cache_attention import CacheAttentionConfig
from ..opensora.mixcache import MixCacheConfig

__all__ = [
    "ScheduleSettings",
    "AttentionSettings",
    "LookupSettings",
    "MixCacheSettings",
    "RequestSettings",
    "SETTING_FIELDS",
    "resolve_settings",
    "parse_setting",
    "compat_key",
]


@dataclass(frozen=True)
class ScheduleSettings:
    """The sampler schedule of a request.

    Attributes:
        full_steps: RFLOW steps of a miss (and of the ``full`` mode). OpenSora 1.2: 30.
        fast_steps: RFLOW steps of a hit (and of the ``plain`` mode). CHAI: 8.
        cfg_scale: classifier-free guidance scale. OpenSora 1.2: 7.0.
        capture_dtype: dtype a miss stores its latents in, ``"float16"`` (half the bytes) or ``"float32"``.
    """

    full_steps: int = 30
    fast_steps: int = 8
    cfg_scale: float = 7.0
    capture_dtype: str = "float16"

    def fingerprint(self) -> str:
        """E.g. ``SCHED_N30_F8_G7_float16``."""
        return f"SCHED_N{self.full_steps}_F{self.fast_steps}_G{float(self.cfg_scale):g}_{self.capture_dtype}"


@dataclass(frozen=True)
class AttentionSettings:
    """How Cache Attention uses the cached latents (``opensora.cache_attention``; CHAI section 3).

    Attributes:
        cache_steps: 1-based fast steps at which block ``block_index`` attends to the cache; () = off.
        block_index: spatial block whose self-attention takes the cached K/V. CHAI: 0.
        mode: ``"replace"`` the block's K/V (CHAI) or ``"concat"`` the cached ones after them.
        branches: ``"cond"``: only the conditional CFG half sees the cache; ``"both"``.
    """

    cache_steps: Tuple[int, ...] = (2, 3, 4)
    block_index: int = 0
    mode: str = "replace"
    branches: str = "cond"

    def fingerprint(self) -> str:
        """E.g. ``ATTN_C2-3-4_B0_replace_cond``."""
        steps = "-".join(str(s) for s in self.cache_steps) or "none"
        return f"ATTN_C{steps}_B{self.block_index}_{self.mode}_{self.branches}"


@dataclass(frozen=True)
class LookupSettings:
    """Which cached entries a request is served.

    Attributes:
        threshold: least cosine similarity for a hit; None keeps the lookup's calibrated 0.72.
        fusion: ``"best"``: the single best entry (CHAI); ``"per_entity"``: also the best entry of
            every other matched entity, their K/V concatenated.
        max_fused: most entries fused with ``per_entity``.
    """

    threshold: Optional[float] = None
    fusion: str = "best"
    max_fused: int = 3

    def fingerprint(self) -> str:
        """E.g. ``LOOKUP_Tlookup_best`` or ``LOOKUP_T0.80_per_entity3``."""
        threshold = "lookup" if self.threshold is None else f"{float(self.threshold):.2f}"
        fusion = self.fusion if self.fusion == "best" else f"{self.fusion}{self.max_fused}"
        return f"LOOKUP_T{threshold}_{fusion}"


#: The intra-request caches' settings (``opensora.mixcache.MixCacheConfig``, the dataclass the hooks take;
#: its fingerprint names every knob). Defaults chosen on the reference model's validation stream.
MixCacheSettings = MixCacheConfig

_GROUPS = {"schedule": ScheduleSettings, "attention": AttentionSettings, "lookup": LookupSettings,
           "mixcache": MixCacheSettings}
#: The parts that make up a ``CacheAttentionConfig``.
_CHAI_GROUPS = ("schedule", "attention", "lookup")
#: Flat override key -> (part, field). The keys are ``CacheAttentionConfig``'s keyword names and
#: ``MixCacheSettings``' field names.
SETTING_FIELDS: Dict[str, Tuple[str, str]] = {
    f.name: (group, f.name) for group, cls in _GROUPS.items() for f in fields(cls)}


@dataclass(frozen=True)
class RequestSettings:
    """Everything CHAI needs to know about how to serve one request: schedule, attention, lookup, and the
    intra-request caches' knobs.

    Build it with :func:`resolve_settings` (or :meth:`updated` on top of another). The three parts
    are checked together on construction (cache steps within the fast schedule, known names, ranges).

    Raises:
        ValueError: a value out of range or an unknown name (the message names the field).
    """

    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    attention: AttentionSettings = field(default_factory=AttentionSettings)
    lookup: LookupSettings = field(default_factory=LookupSettings)
    mixcache: MixCacheSettings = field(default_factory=MixCacheSettings)

    def __post_init__(self) -> None:
        attention = replace(self.attention, cache_steps=tuple(int(s) for s in self.attention.cache_steps))
        object.__setattr__(self, "attention", attention)
        self.cache_attention_config()  # validates every field and the cross-field rules once

    def flat(self) -> Dict[str, Any]:
        """Every setting under its flat key (:data:`SETTING_FIELDS`)."""
        return {key: getattr(getattr(self, group), name) for key, (group, name) in SETTING_FIELDS.items()}

    def cache_attention_config(self) -> CacheAttentionConfig:
        """The ``opensora.cache_attention.CacheAttentionConfig`` that the sampling functions take."""
        return CacheAttentionConfig(**{key: getattr(getattr(self, group), name)
                                       for key, (group, name) in SETTING_FIELDS.items() if group in _CHAI_GROUPS})

    def store_fingerprint(self) -> str:
        """The part of the compatibility key that names what a miss stores (which noise levels, from which
        trajectory, in which dtype), e.g. ``CHAI_F8_C2-3-4_N30_G7_float16``. Attention and lookup
        settings that only change how entries are used are not in it, so entries stay valid across them."""
        return self.cache_attention_config().fingerprint()

    def fingerprint(self) -> str:
        """Every part's fingerprint, for reports: ``SCHED_...|ATTN_...|LOOKUP_...|MIX_...``."""
        return "|".join(getattr(self, group).fingerprint() for group in _GROUPS)

    def tag(self) -> str:
        """Every knob in one line, as ``CacheAttentionConfig.tag`` (reports, a store entry's info)."""
        return self.cache_attention_config().tag()

    def updated(self, *overrides: Optional[Mapping[str, Any]]) -> "RequestSettings":
        """These settings with ``overrides`` on top (same rules as :func:`resolve_settings`)."""
        return _resolve(self, overrides)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly ``{"schedule": {...}, "attention": {...}, "lookup": {...}, "mixcache": {...}}``."""
        out = {group: asdict(getattr(self, group)) for group in _GROUPS}
        out["attention"]["cache_steps"] = list(self.attention.cache_steps)
        out["mixcache"]["granularities"] = list(self.mixcache.granularities)
        return out

    @classmethod
    def from_config(cls, config: CacheAttentionConfig) -> "RequestSettings":
        """The settings a ``CacheAttentionConfig`` names (every field; its ``threshold`` is the lookup's)."""
        return _resolve(cls(), [config.to_dict()])


def _resolve(base: RequestSettings, layers: Sequence[Optional[Mapping[str, Any]]]) -> RequestSettings:
    parts = {group: asdict(getattr(base, group)) for group in _GROUPS}
    named_steps = False
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is None:
                continue
            if key not in SETTING_FIELDS:
                raise ValueError(f"unknown CHAI setting {key!r}; the settings are {', '.join(SETTING_FIELDS)}")
            group, name = SETTING_FIELDS[key]
            if key == "cache_steps":
                value = tuple(int(s) for s in value)
                named_steps = True
            elif key == "granularities":
                value = (value,) if isinstance(value, str) else tuple(value)
            parts[group][name] = value
    if not named_steps:  # cache steps from the defaults follow a shorter fast schedule
        fast = parts["schedule"]["fast_steps"]
        if isinstance(fast, int) and not isinstance(fast, bool):
            parts["attention"]["cache_steps"] = tuple(s for s in parts["attention"]["cache_steps"] if s <= fast)
    return RequestSettings(**{group: cls(**parts[group]) for group, cls in _GROUPS.items()})


def resolve_settings(model_defaults: Optional[Mapping[str, Any]] = None,
                     *overrides: Optional[Mapping[str, Any]]) -> RequestSettings:
    """The request settings: built-in defaults, then ``model_defaults``, then each of ``overrides``.

    Args:
        model_defaults: the model's own settings (flat keys), e.g. from its ``config.json``.
        *overrides: the user's values (flat keys), lowest precedence first; ``None`` values are skipped.

    Returns:
        :class:`RequestSettings`.

    Raises:
        ValueError: an unknown key, a value out of range, or cache steps named beyond the fast schedule.
    """
    return _resolve(RequestSettings(), [model_defaults, *overrides])


def parse_setting(key: str, text: str) -> Any:
    """A setting typed as text (a mode spec's ``@key=value``, a preset file) as its field's type.

    Numbers, names and booleans as themselves; tuples ``/``-separated (``cache_steps=2/3/4``,
    ``granularities=step/cfg``); the optional lookup threshold also takes ``none``.

    Raises:
        ValueError: an unknown key or a value that does not parse (range checks come when it is applied).
    """
    if key not in SETTING_FIELDS:
        raise ValueError(f"unknown CHAI setting {key!r}; the settings are {', '.join(SETTING_FIELDS)}")
    group, name = SETTING_FIELDS[key]
    default = next(f.default for f in fields(_GROUPS[group]) if f.name == name)
    if isinstance(default, tuple):
        element = type(default[0]) if default else str
        return tuple(element(v) for v in text.split("/") if v)
    if default is None:  # optional numbers (the lookup threshold)
        return None if text.lower() == "none" else float(text)
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} takes true or false, got {text!r}")
        return text.lower() in ("true", "1")
    return type(default)(text)


def compat_key(model_fingerprint: str, latent_shape: Sequence[int], height: int, width: int, num_frames: int,
               size_dtype: torch.dtype, settings: RequestSettings, hooks: Sequence[str] = ()) -> str:
    """The cache's compatibility key of a request; only entries of the same key are ever matched.

    ``<model>|<C>x<T>x<H>x<W>|<height>x<width>f<frames>|<size dtype>|<store fingerprint>[|hooks=<a>+<b>]``:
    the denoiser (its weights, caption encoder and dtype, as the pipeline names them), the latent shape,
    the pixel size and frame count (they set the position-embedding scale and the timestep shift), the
    size-conditioning dtype, :meth:`RequestSettings.store_fingerprint` and, when the request runs model
    hooks that change the model's output (an intra-request cache: ``modes.keyed_hook_names``), their
    names in the order given. The lookup appends the embedder's and extractor's fingerprints and its mode.
    """
    c, t, h, w = (int(v) for v in latent_shape)
    size = str(size_dtype).replace("torch.", "")
    key = f"{model_fingerprint}|{c}x{t}x{h}x{w}|{height}x{width}f{num_frames}|{size}|{settings.store_fingerprint()}"
    return f"{key}|hooks={'+'.join(hooks)}" if hooks else key
