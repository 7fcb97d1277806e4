"""CHAI Cache Attention for STDiT3, and the two sampling modes around it (fast and full).

CHAI (arXiv 2602.16132, section 3; restated in ``reference/papers.md`` sections 1.3, 1.4, 1.6, 1.12):
a request whose entities match an earlier request runs a short RFLOW schedule (``fast_steps``,
default 8). At the cache steps (1-based, default 2, 3 and 4) spatial block 0's self-attention
takes its keys and values from the *cached latent for that step*: the cached latent goes
through the same patch embedding, position embedding, LayerNorm and adaLN modulation (with the
live timestep) as the request's own tokens, then through block 0's ``qkv`` and ``k_norm``
(``STDiT3.spatial_self_attention_kv``). Frame f of the query attends to frame f of the cache.
Queries stay the request's own. Every other block and every other step is untouched.

A request that misses runs the full schedule (``full_steps``, default 30, CFG 7.0, OpenSora's
timestep transform) and keeps, for every cache step k of the *fast* schedule, the latent of the
full run at the nearest noise level (:func:`capture_plan`); those tensors, named ``step_<k>``,
are what a later hit attends to.

Choices the paper leaves open, each a knob of :class:`CacheAttentionConfig`:

* ``mode``: ``"replace"`` (default; the block's own K/V are replaced) or ``"concat"`` (cached K/V
  are appended to the block's own, so the key length grows by S per fused entry);
* ``branches``: ``"cond"`` (default; only the conditional half of the CFG batch ``[cond; uncond]``
  sees the cache, the unconditional half runs exactly as without cache) or ``"both"``;
* ``fusion``: ``"best"`` (default; the paper: one entry, the best match) or ``"per_entity"``
  (an extension the paper lists as future work): the best entry of each matched entity, at most
  ``max_fused`` of them, are fused by **concatenating their K/V along the key axis**, so the
  softmax of each query token decides how much it draws from each cached video. We do not average
  latents: the mean of two unrelated videos' latents is a blurred latent no request produced.

When a row of the batch gets a longer key sequence than another (``concat`` mode, or several
fused entries with ``branches="cond"``), the shorter rows are padded and masked out with a boolean
attention mask; that is mathematically the plain attention but not always bit-identical to it.
With the defaults (replace, cond, best) no mask is used and the unconditional half is
bit-identical to a run without cache.

Cache Attention is a model hook (:mod:`.hooks`, name ``"cache_attention"``): :func:`sample_fast`
attaches it to the STDiT3 for the run and takes it off after, so another technique that wraps the
model (an intra-request cache, say) attaches the same way and the registry refuses incompatible pairs.

Nothing here imports ``cache/``: the cached latents come in as a plain ``name -> tensor`` dict and
the compatibility information leaves as the fingerprint string of the config.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .hooks import HookRegistry, ModelHook
from .rflow import RFlow, RFlowSchedule, StepInfo, StepState

__all__ = [
    "CacheAttentionConfig",
    "CacheAttention",
    "CacheAttentionCall",
    "FullRun",
    "LatentCapture",
    "cache_latent_name",
    "capture_plan",
    "sample_fast",
    "sample_full",
    "sample_capturing",
    "STEP_KWARG",
]

#: Model keyword argument that carries the 0-based step index from the sampler to :class:`CacheAttention`.
STEP_KWARG = "chai_step_index"

_MODES = ("replace", "concat")
_BRANCHES = ("cond", "both")
_FUSIONS = ("best", "per_entity")
_CAPTURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def cache_latent_name(step: int) -> str:
    """Name of the cached latent used at fast-mode step ``step`` (1-based), e.g. 2 -> ``"step_2"``."""
    return f"step_{int(step)}"


@dataclass(frozen=True)
class CacheAttentionConfig:
    """Every knob of CHAI's Cache Attention and of the two sampling modes (one default each).

    Attributes:
        fast_steps: RFLOW steps on a hit (fast mode). Default 8 (CHAI section 1.4: "as few as 8").
        cache_steps: 1-based fast-mode steps at which block ``block_index`` attends to the cache.
            Default (2, 3, 4) (CHAI: step 1 is pure noise, later steps add nothing). An empty tuple
            disables Cache Attention (the fast path is then a plain ``fast_steps`` RFLOW run).
        block_index: spatial block whose self-attention takes the cached K/V. Default 0 (CHAI: the
            first block only; later blocks add noise).
        mode: ``"replace"`` the block's own K/V (default, the paper) or ``"concat"`` cached K/V
            after its own (ablation; doubles the key length with one entry).
        branches: ``"cond"`` (default): only the conditional half of the CFG batch uses the cache;
            ``"both"``: the unconditional half too.
        threshold: least cosine similarity for a hit; ``None`` (default) keeps the lookup's own
            calibrated threshold (``cache.lookup.DEFAULT_THRESHOLD``, 0.72).
        fusion: ``"best"`` (default): the single best-matching entry; ``"per_entity"``: the best
            entry of each matched entity, K/V concatenated along the key axis (see module doc).
        max_fused: most entries fused with ``fusion="per_entity"``. Default 3.
        capture_dtype: dtype the full run's latents are stored in: ``"float16"`` (default, half the
            bytes; about 1.2 MB per 240p entry) or ``"float32"``.
        full_steps: RFLOW steps on a miss (full mode). Default 30 (OpenSora 1.2).
        cfg_scale: classifier-free guidance scale of both modes. Default 7.0 (OpenSora 1.2).

    :meth:`fingerprint` names the fields that change the *stored* tensors (which steps, at which
    noise levels, in which dtype, from which trajectory); it is part of the cache's compatibility
    key, so entries made under another setting are never used. ``mode``, ``branches``,
    ``block_index``, ``fusion`` and ``threshold`` only change how stored tensors are *used*, so
    entries stay valid across them; :meth:`tag` names every knob for reports.

    Raises:
        ValueError: a field out of range (the message names it and the valid values).
    """

    fast_steps: int = 8
    cache_steps: Tuple[int, ...] = (2, 3, 4)
    block_index: int = 0
    mode: str = "replace"
    branches: str = "cond"
    threshold: Optional[float] = None
    fusion: str = "best"
    max_fused: int = 3
    capture_dtype: str = "float16"
    full_steps: int = 30
    cfg_scale: float = 7.0

    def __post_init__(self) -> None:
        steps = tuple(int(s) for s in self.cache_steps)
        object.__setattr__(self, "cache_steps", steps)
        for name in ("fast_steps", "full_steps", "max_fused"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if list(steps) != sorted(set(steps)) or any(s < 1 or s > self.fast_steps for s in steps):
            raise ValueError(
                f"cache_steps must be increasing, distinct 1-based steps in 1..fast_steps={self.fast_steps}, "
                f"got {steps}"
            )
        if isinstance(self.block_index, bool) or not isinstance(self.block_index, int) or self.block_index < 0:
            raise ValueError(f"block_index must be an int >= 0, got {self.block_index!r}")
        for name, allowed in (("mode", _MODES), ("branches", _BRANCHES), ("fusion", _FUSIONS),
                              ("capture_dtype", tuple(_CAPTURE_DTYPES))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.threshold is not None and not -1.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1] or None, got {self.threshold}")
        if not float(self.cfg_scale) >= 0.0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")

    @property
    def enabled(self) -> bool:
        """True when at least one cache step is set."""
        return bool(self.cache_steps)

    @property
    def latent_names(self) -> List[str]:
        """Names of the tensors an entry holds, one per cache step (e.g. step_2, step_3, step_4)."""
        return [cache_latent_name(s) for s in self.cache_steps]

    @property
    def torch_capture_dtype(self) -> torch.dtype:
        """``capture_dtype`` as a torch dtype."""
        return _CAPTURE_DTYPES[self.capture_dtype]

    def fingerprint(self) -> str:
        """Compatibility part of the key, e.g. ``CHAI_F8_C2-3-4_N30_G7_float16``.

        Covers fast_steps and cache_steps (which noise levels are stored), full_steps and cfg_scale
        (the trajectory they come from) and capture_dtype.
        """
        steps = "-".join(str(s) for s in self.cache_steps) or "none"
        return f"CHAI_F{self.fast_steps}_C{steps}_N{self.full_steps}_G{float(self.cfg_scale):g}_{self.capture_dtype}"

    def tag(self) -> str:
        """Every knob, for reports, e.g. ``CHAI_F8_C2-3-4_N30_G7_float16_B0_replace_cond_best``."""
        threshold = "lookup" if self.threshold is None else f"{float(self.threshold):.2f}"
        fusion = self.fusion if self.fusion == "best" else f"{self.fusion}{self.max_fused}"
        return f"{self.fingerprint()}_B{self.block_index}_{self.mode}_{self.branches}_{fusion}_T{threshold}"

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly view of every field."""
        d = asdict(self)
        d["cache_steps"] = list(self.cache_steps)
        return d


# --------------------------------------------------------------------------------- capture


def capture_plan(config: CacheAttentionConfig, full: RFlowSchedule, fast: RFlowSchedule) -> Dict[str, int]:
    """Which full-schedule step to keep for each cache step of the fast schedule.

    For cache step k (1-based) the fast run feeds the model a latent at timestep
    ``fast.timesteps[k-1]``; the full run's latent at the nearest timestep
    (``full.nearest_index``; ties go to the noisier step) is kept, *before* that step's update
    (the latent the model sees at that noise level).

    Returns:
        ``{"step_<k>": full_step_index (0-based)}`` in cache-step order. 240p 9:16 51 frames,
        8 vs 30 steps (bf16 sizes): step_2 -> 4, step_3 -> 7, step_4 -> 11 (fast t 944.3, 879.0,
        801.4 kept from full t 940.3, 888.4, 807.1).

    Raises:
        ValueError: a cache step beyond the fast schedule.
    """
    plan: Dict[str, int] = {}
    for step in config.cache_steps:
        if step > len(fast):
            raise ValueError(f"cache step {step} is beyond the fast schedule's {len(fast)} steps")
        plan[cache_latent_name(step)] = full.nearest_index(float(fast.timesteps[step - 1]))
    return plan


class LatentCapture:
    """RFLOW step callback that keeps the latents a :func:`capture_plan` names.

    Args:
        plan: ``name -> full step index`` from :func:`capture_plan`.
        dtype: storage dtype (torch.float16 or torch.float32).
        then: optional callback run after capturing (chained).

    After sampling, :attr:`tensors` holds ``name -> [C, T, H, W]`` tensors on the CPU in ``dtype``
    (sample 0 of the batch; the pipeline runs one prompt per request), :attr:`timesteps` the
    full-schedule timestep of each. :meth:`complete` says whether every planned step was seen.
    """

    def __init__(self, plan: Mapping[str, int], dtype: torch.dtype = torch.float16,
                 then: Optional[Callable[[StepState], None]] = None) -> None:
        self.plan = dict(plan)
        self.dtype = dtype
        self.then = then
        self.tensors: Dict[str, torch.Tensor] = {}
        self.timesteps: Dict[str, float] = {}
        self._by_index: Dict[int, List[str]] = {}
        for name, index in self.plan.items():
            self._by_index.setdefault(int(index), []).append(name)

    def __call__(self, state: StepState) -> None:
        for name in self._by_index.get(state.info.index, ()):
            self.tensors[name] = state.z_before[0].detach().to(device="cpu", dtype=self.dtype).clone()
            self.timesteps[name] = state.info.t
        if self.then is not None:
            self.then(state)

    def complete(self) -> bool:
        """True when every planned latent was captured."""
        return set(self.tensors) == set(self.plan)


# --------------------------------------------------------------------------------- the hook


@dataclass
class CacheAttentionCall:
    """One model call that used cached K/V (for tests, reports and the benchmark).

    Attributes:
        step: 1-based fast-mode step. timestep: the live timestep (0..1000) the cached K/V were
        modulated with. rows: rows of block ``block_index``'s attention batch (B·T) that got cached
        K/V. key_length: keys per query of those rows. entries: cached entries fused.
        kv_ms: wall time of turning the cached latents into K/V (ms; synchronised on CUDA when
        ``measure=True``).
    """

    step: int
    timestep: float
    rows: int
    key_length: int
    entries: int
    kv_ms: float


class CacheAttention(ModelHook):
    """The Cache Attention model hook: at the sampler's cache steps, one spatial block of an STDiT3
    attends to cached K/V.

    Attach it to the model (``opensora.hooks.HookRegistry``, name ``"cache_attention"``) and pass
    :meth:`step_kwargs` to the sampler, as :func:`sample_fast` does::

        ca = CacheAttention(model, config, cached)            # cached: {"step_2": [C,T,H,W], ...}
        with HookRegistry.of(model).attached(ca):
            rflow.sample(model, z, ..., step_model_kwargs=ca.step_kwargs)

    or call it directly in the model's place (``ca(x, t, y, **kwargs)``). :meth:`step_kwargs` tells
    each call its step index (keyword :data:`STEP_KWARG`); at a cache step the hook computes the
    cached latent's K/V with ``model.spatial_self_attention_kv`` (same patch/pos embedding, LayerNorm,
    modulation with the live timestep, ``qkv`` and ``k_norm``), installs a K/V hook on spatial block
    ``config.block_index`` for that one call (``model.kv_hook``) and removes it afterwards, also on
    error. Other calls go straight through. Every cache-step call is recorded in :attr:`calls`.

    Args:
        model: an STDiT3 (needs ``kv_hook``, ``spatial_self_attention_kv`` and ``forward``).
        config: :class:`CacheAttentionConfig`.
        cached: one entry (``name -> [C, T, H, W]`` tensor, or [1, C, T, H, W]) or a sequence of
            entries to fuse (``config.fusion="per_entity"``; at most ``config.max_fused`` used).
            Each must hold ``config.latent_names``, all of one shape.
        measure: synchronise CUDA around the K/V computation so ``kv_ms`` is the real cost.

    Raises:
        ValueError: no entry, a missing name, or tensors of different shapes.
    """

    name = "cache_attention"

    def __init__(self, model: torch.nn.Module, config: CacheAttentionConfig,
                 cached: Union[Mapping[str, torch.Tensor], Sequence[Mapping[str, torch.Tensor]]],
                 *, measure: bool = False) -> None:
        entries = [cached] if isinstance(cached, Mapping) else list(cached)
        if not entries:
            raise ValueError("Cache Attention needs at least one cached entry (a dict of latents)")
        entries = entries[: config.max_fused] if config.fusion == "per_entity" else entries[:1]
        shape: Optional[Tuple[int, ...]] = None
        self.entries: List[Dict[str, torch.Tensor]] = []
        for i, entry in enumerate(entries):
            missing = [n for n in config.latent_names if n not in entry]
            if missing:
                raise ValueError(f"cached entry {i} lacks {missing}; it holds {sorted(entry)}. It was made under "
                                 "another cache-step setting: its compatibility key should have kept it out")
            picked = {}
            for name in config.latent_names:
                t = entry[name]
                if t.ndim == 5 and t.shape[0] == 1:
                    t = t[0]
                if t.ndim != 4:
                    raise ValueError(f"cached latent {name!r} must be [C, T, H, W], got {tuple(t.shape)}")
                if shape is None:
                    shape = tuple(t.shape)
                elif tuple(t.shape) != shape:
                    raise ValueError(f"cached latent {name!r} of entry {i} is {tuple(t.shape)}, expected {shape}")
                picked[name] = t
            self.entries.append(picked)
        self.model = model
        self.config = config
        self.latent_shape: Tuple[int, ...] = shape  # type: ignore[assignment]
        self.measure = measure
        self.calls: List[CacheAttentionCall] = []

    # The sampler's per-step hook: pass the step index to the model call.
    def step_kwargs(self, info: StepInfo, z: torch.Tensor) -> Dict[str, int]:
        """``step_model_kwargs`` for ``RFlow.sample``: ``{STEP_KWARG: info.index}``."""
        return {STEP_KWARG: info.index}

    @property
    def kv_ms(self) -> float:
        """Total ms spent turning cached latents into K/V so far."""
        return float(sum(c.kv_ms for c in self.calls))

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The model call with this hook in front: ``model(x, timestep, y, **kwargs)``, with cached K/V
        at cache steps (see :meth:`forward`)."""
        return self.forward(self.model, x, timestep, y, **kwargs)

    def forward(self, call_next: Callable[..., torch.Tensor], x: torch.Tensor, timestep: torch.Tensor,
                y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """One model call: ``call_next(x, timestep, y, **kwargs)``, with cached K/V at cache steps.

        ``x`` is the CFG batch [2n, C, T, H, W] (rows 0..n-1 conditional). Raises ValueError when
        ``x`` does not have the cached latents' shape, or with ``branches="cond"`` an odd batch.
        """
        index = kwargs.pop(STEP_KWARG, None)
        if index is None or (int(index) + 1) not in self.config.cache_steps:
            return call_next(x, timestep, y, **kwargs)
        step = int(index) + 1
        if tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"the live latent is {tuple(x.shape[1:])} but the cached latents are {self.latent_shape}; "
                             "entries of another shape must not be used (check the compatibility key)")
        batch = int(x.shape[0])
        if self.config.branches == "cond":
            if batch % 2:
                raise ValueError(f"branches='cond' needs the CFG batch [cond; uncond] (even size), got {batch}")
            samples = batch // 2
        else:
            samples = batch
        ks, vs, ms = self._cached_kv(step, timestep, y, kwargs)
        frames = ks[0].shape[0]
        hook = self._make_hook(ks, vs, samples * frames)
        with self.model.kv_hook(hook, block_index=self.config.block_index):
            out = call_next(x, timestep, y, **kwargs)
        key_length = sum(k.shape[2] for k in ks) + (hook.own_length if self.config.mode == "concat" else 0)
        self.calls.append(CacheAttentionCall(step=step, timestep=float(timestep.reshape(-1)[0]),
                                             rows=samples * frames, key_length=key_length,
                                             entries=len(ks), kv_ms=ms))
        return out

    def _cached_kv(self, step: int, timestep: torch.Tensor, y: torch.Tensor, kwargs: Mapping[str, Any]):
        """K/V [T', heads, S, head_dim] of each entry's latent for ``step`` at the live timestep."""
        model = self.model
        device = timestep.device
        sync = self.measure and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        name = cache_latent_name(step)
        t = timestep.reshape(-1)[:1]
        extra: Dict[str, Any] = {}
        if self.config.block_index > 0:  # earlier blocks cross-attend: use the conditional caption
            extra["y"] = y[:1]
            mask = kwargs.get("mask")
            extra["mask"] = None if mask is None else mask[:1]
        x_mask = kwargs.get("x_mask")
        if x_mask is not None:
            extra["x_mask"] = x_mask[:1]
        ks, vs = [], []
        for entry in self.entries:
            z = entry[name].to(device=device)[None]
            k, v = model.spatial_self_attention_kv(
                z, t, fps=_first(kwargs.get("fps")), height=_first(kwargs.get("height")),
                width=_first(kwargs.get("width")), block_index=self.config.block_index, **extra)
            ks.append(k)
            vs.append(v)
        if sync:
            torch.cuda.synchronize(device)
        return ks, vs, (time.perf_counter() - t0) * 1000.0

    def _make_hook(self, ks: List[torch.Tensor], vs: List[torch.Tensor], rows: int) -> "_KVHook":
        return _KVHook(ks, vs, rows, self.config.mode)


def _first(value: Any) -> Any:
    """First value of a per-sample tensor/sequence (the cached latent is one sample)."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.numel() > 1:
        return value.reshape(-1)[:1]
    if isinstance(value, (list, tuple)) and len(value) > 1:
        return value[:1]
    return value


class _KVHook:
    """The K/V hook for one call: rows [0, rows) get the cached K/V, frame-aligned.

    ks / vs: per entry [T', heads, S, head_dim]; the hook's q, k, v are [B·T', heads, S, head_dim]
    with row b·T' + t, so repeating the cache over samples pairs frame t with frame t.
    """

    def __init__(self, ks: List[torch.Tensor], vs: List[torch.Tensor], rows: int, mode: str) -> None:
        self.ks, self.vs, self.rows, self.mode = ks, vs, rows, mode
        self.own_length = 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: int):
        frames = self.ks[0].shape[0]
        if self.rows % frames or self.rows > k.shape[0]:
            raise ValueError(f"the attention batch has {k.shape[0]} rows; {self.rows} cached rows of {frames} frames "
                             "do not fit (is the cached latent's frame count the live one?)")
        reps = self.rows // frames
        ck = torch.cat([c.to(k.dtype) for c in self.ks], dim=2).repeat(reps, 1, 1, 1)  # [rows, H, m·S, D]
        cv = torch.cat([c.to(v.dtype) for c in self.vs], dim=2).repeat(reps, 1, 1, 1)
        self.own_length = int(k.shape[2])
        if self.mode == "concat":
            ck = torch.cat([k[: self.rows], ck], dim=2)
            cv = torch.cat([v[: self.rows], cv], dim=2)
        rest = k.shape[0] - self.rows
        if rest == 0:
            return ck, cv
        n_cached, n_own = ck.shape[2], k.shape[2]
        if n_cached == n_own:  # replace, one entry: same key length, no mask, other rows untouched
            return torch.cat([ck, k[self.rows:]], 0), torch.cat([cv, v[self.rows:]], 0)
        # Rows without cache keep their own keys; pad them to the longer length and mask the padding.
        width = max(n_cached, n_own)
        k_out = k.new_zeros((k.shape[0], k.shape[1], width, k.shape[3]))
        v_out = v.new_zeros((v.shape[0], v.shape[1], width, v.shape[3]))
        k_out[: self.rows, :, :n_cached] = ck
        v_out[: self.rows, :, :n_cached] = cv
        k_out[self.rows:, :, :n_own] = k[self.rows:]
        v_out[self.rows:, :, :n_own] = v[self.rows:]
        mask = torch.zeros((k.shape[0], 1, 1, width), dtype=torch.bool, device=k.device)
        mask[: self.rows, :, :, :n_cached] = True
        mask[self.rows:, :, :, :n_own] = True
        return k_out, v_out, mask


# --------------------------------------------------------------------------------- sampling modes


@dataclass
class FullRun:
    """Result of :func:`sample_full`: the clean latent [n, C, T, H, W] fp32 and the captured latents."""

    latent: torch.Tensor
    captured: Dict[str, torch.Tensor] = field(default_factory=dict)
    plan: Dict[str, int] = field(default_factory=dict)
    timesteps: Dict[str, float] = field(default_factory=dict)


def sample_full(rflow: RFlow, model: Callable[..., torch.Tensor], z: torch.Tensor, config: CacheAttentionConfig, *,
                callback: Optional[Callable[[StepState], None]] = None, capture: bool = True,
                **sample_kwargs: Any) -> FullRun:
    """Full mode (a miss): ``config.full_steps`` RFLOW steps at ``config.cfg_scale``, capturing the
    latents that a later fast run's cache steps use (see :func:`capture_plan`).

    The steps before the last captured latent are marked exact (``RFlow.sample(exact_steps=...)``), so a
    model hook that approximates the model (an intra-request cache) computes them in full and the
    captured latents are exactly those of a run without it.

    Args:
        rflow: the sampler (its timestep-transform settings are used for both schedules).
        model: the STDiT3 (or any model callable).
        z: initial noise [1, C, T, H, W].
        config: :class:`CacheAttentionConfig`.
        callback: extra per-step callback (progress); called after the capture.
        capture: keep the planned latents (False: a plain full run; nothing captured, no step exact).
        **sample_kwargs: ``RFlow.sample`` arguments: y, y_mask, y_null, height, width, num_frames,
            fps, size_dtype, should_cancel, model_kwargs.

    Returns:
        :class:`FullRun`; ``captured`` holds ``config.latent_names`` as [C, T, H, W] tensors in
        ``config.capture_dtype`` on the CPU (empty with ``capture=False``).

    Raises:
        the errors of ``RFlow.sample`` (``SamplingCancelled`` included); RuntimeError if a planned
        latent was not captured.
    """
    size = dict(height=sample_kwargs["height"], width=sample_kwargs["width"], num_frames=sample_kwargs["num_frames"],
                size_dtype=sample_kwargs.get("size_dtype", torch.bfloat16))
    full = rflow.schedule(num_steps=config.full_steps, **size)
    if not capture:
        latent = rflow.sample(model, z, schedule=full, cfg_scale=config.cfg_scale, callback=callback, **sample_kwargs)
        return FullRun(latent=latent)
    fast = rflow.schedule(num_steps=config.fast_steps, **size)
    return sample_capturing(rflow, model, z, capture_plan(config, full, fast), schedule=full,
                            cfg_scale=config.cfg_scale, dtype=config.torch_capture_dtype, callback=callback,
                            **sample_kwargs)


def sample_capturing(rflow: RFlow, model: Callable[..., torch.Tensor], z: torch.Tensor, plan: Mapping[str, int], *,
                     schedule: RFlowSchedule, cfg_scale: float, dtype: torch.dtype = torch.float16,
                     callback: Optional[Callable[[StepState], None]] = None, **sample_kwargs: Any) -> FullRun:
    """Run ``schedule`` from ``z`` and keep the latents ``plan`` names (``name -> 0-based step index``: the
    latent fed to the model at that step), as [C, T, H, W] ``dtype`` tensors on the CPU. :func:`sample_full`
    uses it with CHAI's :func:`capture_plan`; a miss that serves several reuse methods merges their plans.
    The steps before the last planned latent are marked exact (``RFlow.sample(exact_steps=...)``), so an
    intra-request cache leaves every captured latent as an uncached run's.

    Raises:
        the errors of ``RFlow.sample`` (``SamplingCancelled`` included); RuntimeError if a planned latent
        was not captured (a step index beyond the schedule).
    """
    capture = LatentCapture(plan, dtype, then=callback)
    latent = rflow.sample(model, z, schedule=schedule, cfg_scale=cfg_scale, callback=capture,
                          exact_steps=range(max(plan.values(), default=0)), **sample_kwargs)
    if not capture.complete():
        raise RuntimeError(f"captured {sorted(capture.tensors)} of the planned {sorted(plan)}")
    return FullRun(latent=latent, captured=capture.tensors, plan=dict(plan), timesteps=capture.timesteps)


def sample_fast(rflow: RFlow, model: torch.nn.Module, z: torch.Tensor, config: CacheAttentionConfig, *,
                cached: Optional[Union[Mapping[str, torch.Tensor], Sequence[Mapping[str, torch.Tensor]]]] = None,
                callback: Optional[Callable[[StepState], None]] = None, measure: bool = False,
                **sample_kwargs: Any) -> Tuple[torch.Tensor, Optional[CacheAttention]]:
    """Fast mode (a hit): ``config.fast_steps`` RFLOW steps, Cache Attention at ``config.cache_steps``
    (the :class:`CacheAttention` hook is attached to ``model`` for the run and detached after it).
    The cache steps are marked exact (``RFlow.sample(exact_steps=...)``): an intra-request cache
    computes them in full, so the cached K/V always reach the model.

    With ``cached=None`` or no cache steps this is exactly ``rflow.sample(model, z,
    num_steps=config.fast_steps, cfg_scale=config.cfg_scale, ...)`` (the same calls, bit for bit).

    Args:
        rflow, model, z, callback, **sample_kwargs: as :func:`sample_full`.
        cached: one entry or several (fusion); see :class:`CacheAttention`.
        measure: synchronise CUDA around the K/V computation (for timing).

    Returns:
        (clean latent [n, C, T, H, W] fp32, the :class:`CacheAttention` used or None).
    """
    size = dict(height=sample_kwargs["height"], width=sample_kwargs["width"], num_frames=sample_kwargs["num_frames"],
                size_dtype=sample_kwargs.get("size_dtype", torch.bfloat16))
    schedule = rflow.schedule(num_steps=config.fast_steps, **size)
    if cached is None or not config.enabled:
        return rflow.sample(model, z, schedule=schedule, cfg_scale=config.cfg_scale, callback=callback,
                            **sample_kwargs), None
    ca = CacheAttention(model, config, cached, measure=measure)
    with HookRegistry.of(model).attached(ca):
        latent = rflow.sample(model, z, schedule=schedule, cfg_scale=config.cfg_scale, callback=callback,
                              step_model_kwargs=ca.step_kwargs, exact_steps=[s - 1 for s in config.cache_steps],
                              **sample_kwargs)
    return latent, ca
