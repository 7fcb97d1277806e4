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
* :class:`ChorusSettings`: whole-prompt reuse after Chorus (the ``chorus`` and ``auto`` modes): the
  donor threshold, the map from similarity to stage bounds, the region mask and the amplification.

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
    "ChorusSettings",
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


@dataclass(frozen=True)
class ChorusSettings:
    """Whole-prompt reuse after Chorus (arXiv 2604.04451; ``opensora.chorus``, ``pipeline.chorus``).

    The paper states that stage bounds follow the match score monotonically but publishes neither the
    map nor the threshold, mask rule or amplification: these are our knobs, chosen on the reference
    model's validation stream (``bench/reuse_bench.py --validation``).

    Attributes:
        chorus_threshold: least cosine similarity of the whole-prompt embeddings (MiniLM) for a donor.
        chorus_k1: (at the threshold, at similarity 1): stage 1 ends at step K1 = round(N * value), N =
            ``full_steps``, linear in between (u = (similarity - threshold) / (1 - threshold), clipped to
            [0, 1]); a closer donor skips more.
        chorus_k2: the same for the end of stage 2 (K2 >= K1; stage 3 keeps at least one step).
        chorus_window: (first, last) fractions of ``full_steps``: the steps whose latents a miss stores
            (:meth:`window`); the map must stay inside it. It alone sets a Chorus entry's size and key.
        chorus_mask_threshold: a latent token joins the stage-2 region when its attention to the new tokens
            is at least this fraction of its frame's largest (``opensora.chorus.region_tokens``); 0 = all.
        chorus_dilation: tokens the region grows by (square max filter); 0 = none.
        chorus_tgaa: amplification factor alpha of the new tokens' cross-attention (logit bias log alpha);
            1 = off.
        chorus_tgaa_decay: alpha's excess over 1 is multiplied by this per stage-2 step (1 = constant).
        chorus_stage2: False runs stage 1 and then plain steps (K2 = K1): the ablation "stage 1 only".
        chorus_stride: a hit visits every ``chorus_stride``-th step of the ``full_steps`` schedule from K1 on
            (K2 rounded down onto that grid): a hit costs about (N - K1) / stride steps. 1 = every step.
            It changes how a donor is used, not what is stored.

    Raises:
        ValueError: a value out of range (the message names the field).
    """

    # Chosen on the reference model's validation prompts (bench/reuse_bench.py --validation, 24 prompts with a
    # near-duplicate among the warm prompts, every one served; overall against full30): K1 0.3-0.5 / K2 0.5-0.7
    # -0.175 at 1.60x; K1 0.05-0.3 / K2 0.8-0.9 -0.050; K1 0.05-0.2 / K2 0.7-0.85 -0.014; with mask 0.3 (not
    # 0.5) and TGAA 3 decaying 0.9 (not 2 / 0.8) -0.012 at 1.18x; dilation 0 -0.120, 2 no better than 1; K1
    # 0.1-0.3 / K2 0.75-0.9 -0.026 at 1.33x. The window is the tightest around the map. The threshold, on the
    # validation mixed stream (40 requests, --stream-modes chorus,auto): Chorus's hits 57 / 32 / 10 / 5 / 2 % at
    # 0.6 / 0.7 / 0.8 / 0.85 / 0.9, overall on its hits -0.048 / -0.017 / -0.006 / +0.005 / +0.018 against full;
    # auto's mean model steps 20.8 / 16.4 / 14.0 / 13.5 / 13.5 (a Chorus hit replaces a cheaper CHAI hit on this
    # model): 0.85 was the lowest threshold at auto's least work.
    # Re-chosen on reference_v2 with the stride (bench/reuse_bench.py --model-dir models/reference_v2 --validation):
    # near-duplicate table (24 prompts), stride 1 / 2 / 3 / 4 at threshold 0.85: 1.03x / 1.15x / 1.21x / 1.22x,
    # overall -0.001 / -0.002 / -0.000 / +0.001 (6 of 24 served); at threshold 0.6, stride 3 / 4 serve 22 of 24:
    # 2.50x -0.004, 2.96x -0.002. Mixed stream (40 requests, --prompts 0 --stream 40), stride 4 at threshold
    # 0.6 / 0.7 / 0.85: Chorus hits 57 / 32 / 5 %, on its hits -0.035 / -0.035 / -0.029 at 3.4x; auto 13.6 / 13.8
    # / 14.1 mean model steps, overall -0.009 / -0.013 / -0.005 (CHAI alone 14.1 steps, -0.005); stride 2 / 3 at
    # 0.6: Chorus hits -0.048 / -0.046 at 2.0x / 2.7x. Rule (as on v1): the lowest threshold at which auto does
    # the least work without losing more than 0.01 against CHAI alone: 0.6, with stride 4 (the best stride at
    # every threshold; a hit then costs about what a CHAI hit does, 8 steps). Held-out, that choice lost 0.056
    # on near-duplicates, so the stage map was swept again on validation (24 near-duplicates, stride 4,
    # threshold 0.6): K1 0.05-0.2 -0.002; K1 0-0.1 +0.011; K1 0 +0.008; K1 0 with K2 0.5-0.7 +0.015 (2.7x; shape
    # 0.785 against 0.730: on v2 coarse content is settled by step 2, so a later start keeps the donor's).
    # On the validation stream with K1 0, K2 0.5-0.7, threshold 0.6 / 0.7: Chorus's hits -0.023 / -0.011 (57 /
    # 32 % served; at 0.7 no unrelated request is served), auto 14.1 / 14.1 steps at -0.010 / -0.008 (CHAI
    # 14.1, -0.005). Rule: the lowest threshold at which Chorus's hits stay within 0.02 of full (the issue's
    # target) and auto within 0.01 of CHAI alone: 0.7. The window is the tightest around the map. The region and
    # amplification knobs re-checked on v2 (48 validation near-duplicates): TGAA 1 / 2 / 3 +0.012 / +0.016 /
    # +0.015, decay 0.7 +0.015, mask threshold 0.5 (TGAA 1) -0.008; validation stream hits TGAA 1 -0.014 against
    # 3 -0.011: kept (held-out, TGAA cost 0.023 on 40 near-duplicates; validation does not show it).
    chorus_threshold: float = 0.7
    chorus_k1: Tuple[float, float] = (0.0, 0.0)
    chorus_k2: Tuple[float, float] = (0.5, 0.7)
    chorus_window: Tuple[float, float] = (0.0, 0.7)
    chorus_mask_threshold: float = 0.3
    chorus_dilation: int = 1
    chorus_tgaa: float = 3.0
    chorus_tgaa_decay: float = 0.9
    chorus_stage2: bool = True
    chorus_stride: int = 4

    def __post_init__(self) -> None:
        for name in ("chorus_k1", "chorus_k2", "chorus_window"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or len(tuple(value)) != 2:
                raise ValueError(f"{name} must be two fractions of full_steps (low, high), got {value!r}")
            lo, hi = (float(v) for v in value)
            if not 0.0 <= lo <= hi < 1.0:
                raise ValueError(f"{name} must satisfy 0 <= low <= high < 1, got {value!r}")
            object.__setattr__(self, name, (lo, hi))
        if not (self.chorus_k1[0] <= self.chorus_k2[0] and self.chorus_k1[1] <= self.chorus_k2[1]):
            raise ValueError(f"chorus_k2 {self.chorus_k2} must not end before chorus_k1 {self.chorus_k1}")
        if not (self.chorus_window[0] <= self.chorus_k1[0] and self.chorus_k2[1] <= self.chorus_window[1]):
            raise ValueError(f"the stage map (chorus_k1 {self.chorus_k1}, chorus_k2 {self.chorus_k2}) must stay inside "
                             f"chorus_window {self.chorus_window}: widen the window or narrow the map")
        if not -1.0 <= float(self.chorus_threshold) < 1.0:
            raise ValueError(f"chorus_threshold must be a cosine similarity in [-1, 1), got {self.chorus_threshold}")
        if not 0.0 <= float(self.chorus_mask_threshold) <= 1.0:
            raise ValueError(f"chorus_mask_threshold must be in [0, 1], got {self.chorus_mask_threshold}")
        if isinstance(self.chorus_dilation, bool) or not isinstance(self.chorus_dilation, int) \
                or self.chorus_dilation < 0:
            raise ValueError(f"chorus_dilation must be an int >= 0, got {self.chorus_dilation!r}")
        if not float(self.chorus_tgaa) >= 1.0:
            raise ValueError(f"chorus_tgaa must be >= 1 (1 = no amplification), got {self.chorus_tgaa}")
        if not 0.0 <= float(self.chorus_tgaa_decay) <= 1.0:
            raise ValueError(f"chorus_tgaa_decay must be in [0, 1], got {self.chorus_tgaa_decay}")
        if not isinstance(self.chorus_stage2, bool):
            raise ValueError(f"chorus_stage2 must be True or False, got {self.chorus_stage2!r}")
        if isinstance(self.chorus_stride, bool) or not isinstance(self.chorus_stride, int) \
                or not 1 <= self.chorus_stride <= 10:
            raise ValueError(f"chorus_stride must be an int in 1..10, got {self.chorus_stride!r}")

    def stage_bounds(self, similarity: float, full_steps: int) -> Tuple[int, int]:
        """(K1, K2) for a donor this similar: 0-based steps where stage 2 and stage 3 begin, monotonic in
        ``similarity``; ``0 <= K1 <= K2 <= full_steps - 1``; K2 = K1 without stage 2."""
        first, last = self.window(full_steps)
        n = int(full_steps)
        span = 1.0 - float(self.chorus_threshold)
        u = min(1.0, max(0.0, (float(similarity) - float(self.chorus_threshold)) / span))
        k1 = min(last, max(first, round(n * (self.chorus_k1[0] + (self.chorus_k1[1] - self.chorus_k1[0]) * u))))
        k2 = min(last, max(k1, round(n * (self.chorus_k2[0] + (self.chorus_k2[1] - self.chorus_k2[0]) * u))))
        return k1, (k2 if self.chorus_stage2 else k1)

    def window(self, full_steps: int) -> Tuple[int, int]:
        """(first, last): the 0-based steps whose latents a miss stores (every K1..K2 the map can pick),
        ``last <= full_steps - 1``."""
        n = int(full_steps)
        return min(n - 1, round(n * self.chorus_window[0])), min(n - 1, round(n * self.chorus_window[1]))

    def fingerprint(self) -> str:
        """E.g. ``CHORUS_T0.70_K0.00-0.00_K0.50-0.70_W0.00-0.70_M0.30_D1_A3_d0.9_S2_R4`` (reports)."""
        return (f"CHORUS_T{float(self.chorus_threshold):.2f}_K{self.chorus_k1[0]:.2f}-{self.chorus_k1[1]:.2f}"
                f"_K{self.chorus_k2[0]:.2f}-{self.chorus_k2[1]:.2f}"
                f"_W{self.chorus_window[0]:.2f}-{self.chorus_window[1]:.2f}_M{float(self.chorus_mask_threshold):.2f}"
                f"_D{self.chorus_dilation}_A{float(self.chorus_tgaa):g}_d{float(self.chorus_tgaa_decay):g}"
                f"_S{2 if self.chorus_stage2 else 1}_R{self.chorus_stride}")


_GROUPS = {"schedule": ScheduleSettings, "attention": AttentionSettings, "lookup": LookupSettings,
           "chorus": ChorusSettings, "mixcache": MixCacheSettings}
#: The parts CHAI's ``CacheAttentionConfig`` is made of.
_CHAI_GROUPS = ("schedule", "attention", "lookup")
#: Flat override key -> (part, field). The keys are ``CacheAttentionConfig``'s keyword names, the Chorus
#: part's and ``MixCacheSettings``' field names.
SETTING_FIELDS: Dict[str, Tuple[str, str]] = {
    f.name: (group, f.name) for group, cls in _GROUPS.items() for f in fields(cls)}


@dataclass(frozen=True)
class RequestSettings:
    """Everything needed to serve one request: schedule, attention, lookup (CHAI), Chorus and the
    intra-request caches' knobs.

    Build it with :func:`resolve_settings` (or :meth:`updated` on top of another). The three parts
    are checked together on construction (cache steps within the fast schedule, known names, ranges).

    Raises:
        ValueError: a value out of range or an unknown name (the message names the field).
    """

    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    attention: AttentionSettings = field(default_factory=AttentionSettings)
    lookup: LookupSettings = field(default_factory=LookupSettings)
    chorus: ChorusSettings = field(default_factory=ChorusSettings)
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
        return CacheAttentionConfig(**{key: value for key, value in self.flat().items()
                                       if SETTING_FIELDS[key][0] in _CHAI_GROUPS})

    def chorus_store_fingerprint(self) -> str:
        """The store part of a Chorus entry's compatibility key: the trajectory (full steps, CFG), the
        stored dtype and the window of steps kept. The mask and
        amplification knobs only change how an entry is used, so entries stay valid across them (e.g.
        ``CHORUS_N30_G7_float16_W2-26``)."""
        first, last = self.chorus.window(self.schedule.full_steps)
        return (f"CHORUS_N{self.schedule.full_steps}_G{float(self.schedule.cfg_scale):g}_"
                f"{self.schedule.capture_dtype}_W{first}-{last}")

    def store_fingerprint(self) -> str:
        """The part of the compatibility key that names what a miss stores (which noise levels, from which
        trajectory, in which dtype), e.g. ``CHAI_F8_C2-3-4_N30_G7_float16``. Attention and lookup
        settings that only change how entries are used are not in it, so entries stay valid across them."""
        return self.cache_attention_config().fingerprint()

    def fingerprint(self) -> str:
        """Every part's fingerprint, for reports: ``SCHED_...|ATTN_...|LOOKUP_...|CHORUS_...|MIX_...``."""
        return "|".join(getattr(self, group).fingerprint() for group in _GROUPS)

    def tag(self) -> str:
        """Every knob in one line, as ``CacheAttentionConfig.tag`` (reports, a store entry's info)."""
        return self.cache_attention_config().tag()

    def updated(self, *overrides: Optional[Mapping[str, Any]]) -> "RequestSettings":
        """These settings with ``overrides`` on top (same rules as :func:`resolve_settings`)."""
        return _resolve(self, overrides)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly ``{"schedule": {...}, "attention": {...}, "lookup": {...}, "chorus": {...},
        "mixcache": {...}}``."""
        out = {group: asdict(getattr(self, group)) for group in _GROUPS}
        out["attention"]["cache_steps"] = list(self.attention.cache_steps)
        out["mixcache"]["granularities"] = list(self.mixcache.granularities)
        for name in ("chorus_k1", "chorus_k2", "chorus_window"):
            out["chorus"][name] = list(out["chorus"][name])
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
            elif key in ("chorus_k1", "chorus_k2", "chorus_window") and not isinstance(value, (str, bytes)):
                value = tuple(value)
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
               size_dtype: torch.dtype, settings: RequestSettings, hooks: Sequence[str] = (),
               store_fingerprint: Optional[str] = None) -> str:
    """The cache's compatibility key of a request; only entries of the same key are ever matched.

    ``<model>|<C>x<T>x<H>x<W>|<height>x<width>f<frames>|<size dtype>|<store fingerprint>[|hooks=<a>+<b>]``:
    the denoiser (its weights, caption encoder and dtype, as the pipeline names them), the latent shape,
    the pixel size and frame count (they set the position-embedding scale and the timestep shift), the
    size-conditioning dtype, what the entries hold (``store_fingerprint`` when given: a sampling mode's,
    e.g. :meth:`RequestSettings.chorus_store_fingerprint`; else CHAI's
    :meth:`RequestSettings.store_fingerprint`) and, when the request runs model hooks that change the
    model's output (an intra-request cache: ``modes.keyed_hook_names``), their names in the order given.
    The lookup appends the embedder's and extractor's fingerprints and its mode.
    """
    c, t, h, w = (int(v) for v in latent_shape)
    size = str(size_dtype).replace("torch.", "")
    stored = store_fingerprint or settings.store_fingerprint()
    key = f"{model_fingerprint}|{c}x{t}x{h}x{w}|{height}x{width}f{num_frames}|{size}|{stored}"
    return f"{key}|hooks={'+'.join(hooks)}" if hooks else key
