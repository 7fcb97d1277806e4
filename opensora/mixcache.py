"""Intra-request caching for STDiT3: hybrid MixCache (step, CFG and block granularity) and a TeaCache baseline.

Both are model hooks (:mod:`.hooks`) around one request's sampler run. They read the step being run
from :func:`.rflow.current_step` and replace STDiT3's loop over its block pairs for that call
(:meth:`.stdit3.STDiT3.block_runner`), so a step can be computed in full, or approximated by reusing
what an earlier step computed. Steps the sampler marks exact (:attr:`.rflow.StepInfo.exact`: the steps
before a CHAI miss's last captured latent, a CHAI hit's Cache Attention steps) are always computed.

**MixCache** (arXiv 2508.12691). Public are: three granularities (step, CFG, block), a context-aware
trigger that decides when caching starts, an adaptive rule that picks the granularity per step. The
formulas are not public; ours, each a knob of :class:`MixCacheConfig`:

* granularities, cheapest first:
  - *step*: no block runs; the hidden state gets the whole-stack residual (output minus input of all
    block pairs) of the last fully computed step, and the final layer runs on it (TeaCache's reuse);
  - *block*: the first ``block_front`` and last ``block_back`` block pairs run, the span between them
    takes its residual from the last fully computed step (cache-dit's DBCache layout; FBCache is
    ``block_front=1, block_back=0``);
  - *CFG*: only the conditional half of the CFG batch runs the blocks; the unconditional output is
    the conditional one minus the guidance difference ``out_cond - out_uncond`` of the last fully
    computed step, so the sampler's ``v_u + s (v_c - v_u)`` becomes ``v_c + (s - 1) g``;
* **warm-up**: the first ``warmup_steps`` steps and the last ``final_steps`` are always computed, and a
  schedule shorter than ``min_steps`` (a CHAI hit's 8 steps, say) is computed in full where caching
  inside it does not pay;
* **change indicator, measured at run time** (no offline calibration, so any step count and any
  model): every step computes block 0's timestep-modulated input ``m`` (TeaCache's input; no block
  runs) and its relative L1 change ``d_i`` from the previous step. Between two full computes the
  pack measures how much the reused residual actually changed per unit of accumulated ``d``: the
  *rate* ``k = relL1(R_j, R_j') / sum d`` (EasyCache's transformation rate, in TeaCache's input space).
  Reusing at step i is predicted to be off by ``E_step = k * sum_{s > j} d_s`` (j: the last full step);
* **context-aware trigger**: caching starts at the first step after warm-up where the whole-stack
  residual's measured change per step between the last two full computes is at most
  ``trigger_threshold``; it then stays on for the request;
* **adaptive granularity** per step (after warm-up, triggered, fewer than ``max_reuse`` approximated
  steps in a row, not exact, not final): *step* when ``E_step <= step_threshold``; else the cheaper of
  *block* and *CFG* (by the share of block work each runs) whose own indicator passes:
  *CFG* when the predicted guidance error ``|s - 1| * rate_g * (i - j) * |g| / |v|`` (``rate_g``: the
  guidance difference's measured relative change per step, ``|g| / |v|`` its share of the guided
  velocity) is at most ``cfg_threshold``; *block* when, after running the front block pairs, their
  residual differs from the last full step's by at most ``block_threshold`` (relative L1; FBCache's
  probe). A failed probe falls through to CFG (the front pairs already ran on both halves) or a full
  compute that continues from it. Every approximated step, whatever its granularity, counts towards
  the ``max_reuse`` cap; only full computes refresh the caches.

**TeaCache** (arXiv 2411.19108; the baseline users already run, single granularity): accumulate the
relative L1 change of block 0's modulated input over steps; while the sum stays below
``teacache_threshold`` reuse the whole-stack residual, else compute and reset the sum. The first and
last steps always compute. TeaCache's per-model rescaling polynomial is an offline calibration of
OpenSora 1.2's own weights; there is none for other models, so the raw distance is used (its
"without rescaling" variant).

Statistics: every call leaves a :class:`StepRecord` (granularity, why, indicator values, block work);
:meth:`IntraCache.report` summarises a run (steps computed in full, reused per granularity, a step map
such as ``FFFFSSCFBS...``, the share of block work run, the decision overhead in ms).
"""

from __future__ import annotations

import abc
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .hooks import ModelHook
from .rflow import StepInfo, current_step

__all__ = ["GRANULARITIES", "MixCacheConfig", "StepRecord", "IntraCache", "MixCache", "TeaCache", "rel_l1"]

#: The granularities MixCache can reuse at, cheapest first.
GRANULARITIES: Tuple[str, ...] = ("step", "block", "cfg")
#: One letter per step in a run's step map: full compute, step / block / CFG reuse.
STEP_LETTERS: Dict[str, str] = {"full": "F", "step": "S", "block": "B", "cfg": "C"}


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L1 distance ``mean|a - b| / mean|b|`` (float32 accumulation; 0 when both are 0).

    One host read (a device sync on a GPU). a, b: tensors of one shape, any float dtype.
    """
    num = (a - b).abs().mean(dtype=torch.float32)
    den = b.abs().mean(dtype=torch.float32)
    return float((num / den.clamp_min(1e-12)).item())


@dataclass(frozen=True)
class MixCacheConfig:
    """Knobs of the intra-request caches (:class:`MixCache`; :class:`TeaCache` reads ``teacache_threshold``).

    Defaults were chosen on the reference model's validation prompt stream (``bench/intra_bench.py
    validate``, README "Intra-request caching"): the fastest knob set of the grid (thresholds x 0.5..4,
    cap 2 or 4) within 0.01 of full 30 steps; on reference model v1 that is the grid's fastest corner
    (9.7 equivalent steps of 30, overall +0.016). MixCache inside an 8-step CHAI hit cost 0.015 there, so
    ``min_steps`` keeps short schedules uncached. None is calibrated per step count.

    Attributes:
        warmup_steps: first steps always computed in full (>= 1).
        final_steps: last steps always computed in full (>= 0).
        min_steps: schedules with fewer steps are computed in full (>= 1; 1: cache in every schedule).
        max_reuse: most approximated steps in a row, any granularity (>= 1); the next one computes.
        trigger_threshold: caching starts once the whole-stack residual's measured relative change per
            step (between the last two full computes) is at most this.
        step_threshold: largest predicted relative change ``E_step`` of the whole-stack residual at which
            a step reuses it (no block runs).
        block_threshold: largest relative change of the front block pairs' residual at which the span
            between ``block_front`` and ``block_back`` reuses its residual.
        cfg_threshold: largest predicted relative error of the guided velocity at which a step runs the
            conditional half only and reuses the guidance difference.
        block_front: block pairs always run at a block step, from the first (>= 1: the probe).
        block_back: block pairs always run at a block step, from the last (>= 0).
        granularities: the granularities MixCache may use, a subset of ``("step", "block", "cfg")``
            (ablations: ``("step",)`` is TeaCache's granularity with MixCache's rule).
        teacache_threshold: the TeaCache baseline's threshold on its accumulated relative L1 distance.

    Raises:
        ValueError: a value out of range or an unknown granularity (the message names the field).
    """

    warmup_steps: int = 3
    final_steps: int = 1
    min_steps: int = 9
    max_reuse: int = 4
    trigger_threshold: float = 0.8
    step_threshold: float = 0.4
    block_threshold: float = 0.4
    cfg_threshold: float = 0.2
    block_front: int = 1
    block_back: int = 0
    granularities: Tuple[str, ...] = GRANULARITIES
    teacache_threshold: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "granularities", tuple(str(g) for g in self.granularities))
        for name, least in (("warmup_steps", 1), ("final_steps", 0), ("min_steps", 1), ("max_reuse", 1),
                            ("block_front", 1), ("block_back", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        for name in ("trigger_threshold", "step_threshold", "block_threshold", "cfg_threshold",
                     "teacache_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1e6:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        unknown = [g for g in self.granularities if g not in GRANULARITIES]
        if unknown or len(set(self.granularities)) != len(self.granularities):
            raise ValueError(f"granularities must be distinct names among {GRANULARITIES}, got {self.granularities}")

    def fingerprint(self) -> str:
        """Every knob, for reports, e.g. ``MIX_W3_F1_M9_R4_T0.8_S0.4_B0.4_C0.2_P1-0_step-block-cfg_TEA0.2``."""
        grans = "-".join(self.granularities) or "none"
        return (f"MIX_W{self.warmup_steps}_F{self.final_steps}_M{self.min_steps}_R{self.max_reuse}"
                f"_T{self.trigger_threshold:g}"
                f"_S{self.step_threshold:g}_B{self.block_threshold:g}_C{self.cfg_threshold:g}"
                f"_P{self.block_front}-{self.block_back}_{grans}_TEA{self.teacache_threshold:g}")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-friendly view of every field."""
        d = asdict(self)
        d["granularities"] = list(self.granularities)
        return d


@dataclass
class StepRecord:
    """What an intra-request cache did at one step.

    Attributes:
        index: 0-based step. t: its timestep (0..1000).
        kind: ``"full"`` (every block pair on every row), ``"step"`` (no block), ``"block"`` (the front and
            back pairs only) or ``"cfg"`` (the conditional rows only).
        reason: why: ``"exact"`` (marked by the sampler), ``"warmup"``, ``"final"``, ``"short"`` (a
            schedule under ``min_steps``), ``"cap"`` (``max_reuse`` reached), ``"untriggered"``, ``"cold"``
            (nothing cached yet), ``"indicator"`` (the indicators chose), ``"probe"`` (a block probe
            failed), ``"outside"`` (the model call never reached the blocks).
        work: block-pair evaluations run, as a share of a full step's (rows x pairs); 0 for step reuse.
        indicator: the predicted step-reuse error ``E_step`` (MixCache) or the accumulated distance
            (TeaCache) at the decision, or None before it is defined.
        probe: the block probe's relative change, when one ran.
        guidance_error: the predicted CFG error at the decision, when defined.
    """

    index: int
    t: float
    kind: str
    reason: str
    work: float
    indicator: Optional[float] = None
    probe: Optional[float] = None
    guidance_error: Optional[float] = None


class IntraCache(ModelHook, abc.ABC):
    """Base of the intra-request caches: per-step bookkeeping, the block runner, statistics.

    Subclasses implement :meth:`_decide` (``(h, blocks, info) -> h``) using :meth:`_full`, :meth:`_reuse_step`
    and :meth:`_pairs`. One instance serves one sampler run (the pipeline makes one per request).

    Args:
        model: the STDiT3 the hook is attached to (needs ``block_runner``).
        config: :class:`MixCacheConfig`.
        cfg_scale: the sampler's guidance scale (MixCache weighs the guidance error by ``|s - 1|``;
            None: weighed as 1).
        measure: synchronise CUDA around the decision sections so ``decision_ms`` is their real cost.
    """

    name = ""

    def __init__(self, model: torch.nn.Module, config: Optional[MixCacheConfig] = None, *,
                 cfg_scale: Optional[float] = None, measure: bool = False) -> None:
        self.model = model
        self.config = config or MixCacheConfig()
        self.cfg_scale = cfg_scale
        self.measure = measure
        self.records: List[StepRecord] = []
        self.decision_ms = 0.0
        self._reset()

    # ---------------------------------------------------------------- state
    def _reset(self) -> None:
        self._m_prev: Optional[torch.Tensor] = None  # block 0's modulated input, previous step
        self._residual: Optional[torch.Tensor] = None  # whole-stack residual of the last full step
        self._last_full: Optional[int] = None
        self._run_length = 0  # approximated steps in a row
        # the call being run: its step, record, block work, batch rows and depth, CFG half reused
        self._info: Optional[StepInfo] = None
        self._record: Optional[StepRecord] = None
        self._work = 0.0
        self._full_rows = 1
        self._depth: Optional[int] = None
        self._cfg_reused = False

    def on_attach(self, model: torch.nn.Module) -> None:
        """A fresh run: forget everything cached by an earlier one.

        Raises:
            TypeError: ``model`` has no ``block_runner`` (intra-request caching needs an STDiT3).
        """
        if not hasattr(model, "block_runner"):
            raise TypeError(f"{type(self).__name__} needs an STDiT3 (a model with block_runner), got {type(model).__name__}")
        self._reset()
        self.records = []
        self.decision_ms = 0.0

    # ---------------------------------------------------------------- the hooked call
    def forward(self, call_next: Callable[..., torch.Tensor], x: torch.Tensor, timestep: torch.Tensor,
                y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """One model call: the blocks run through :meth:`_decide`; outside a sampler step it passes through."""
        info = current_step()
        if info is None:
            return call_next(x, timestep, y, **kwargs)
        self._info = info
        self._record = None
        self._work = 0.0
        self._cfg_reused = False
        with self.model.block_runner(self._runner):
            out = call_next(x, timestep, y, **kwargs)
        record = self._record or StepRecord(info.index, info.t, "full", "outside", 1.0)
        record.work = self._work
        self.records.append(record)
        return self._after(out, record)

    def _runner(self, h: torch.Tensor, blocks) -> torch.Tensor:
        self._full_rows = int(h.shape[0])
        self._depth = blocks.depth
        return self._decide(h, blocks, self._info)

    def _after(self, out: torch.Tensor, record: StepRecord) -> torch.Tensor:
        return out

    @abc.abstractmethod
    def _decide(self, h: torch.Tensor, blocks, info: StepInfo) -> torch.Tensor:
        """Run this step's blocks on ``h`` [B, T, S, C] (or reuse), record why in ``self._record``; return h."""

    # ---------------------------------------------------------------- building blocks
    def _pairs(self, blocks, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run block pairs start..stop-1 and count their work."""
        if stop > start:
            self._work += (stop - start) * int(h.shape[0]) / (self._depth * self._full_rows)
        return blocks.run(h, start, stop)

    def _tic(self) -> float:
        if self.measure and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _toc(self, t0: float) -> None:
        if self.measure and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.decision_ms += (time.perf_counter() - t0) * 1000.0

    def _input_change(self, h: torch.Tensor, blocks) -> Optional[float]:
        """Relative L1 change of block 0's modulated input since the previous step (None at the first).

        Measured on the first half of a CFG batch: both halves hold the same latent and timestep, and the
        modulated input depends on nothing else."""
        rows = int(h.shape[0])
        m = blocks.modulated_input(h[: rows // 2] if rows % 2 == 0 else h)
        prev, self._m_prev = self._m_prev, m
        if prev is None or prev.shape != m.shape:
            return None
        return rel_l1(m, prev)

    def _reuse_step(self, h: torch.Tensor) -> torch.Tensor:
        self._run_length += 1
        return h + self._residual

    def _usable(self, h: torch.Tensor) -> bool:
        return self._residual is not None and self._residual.shape == h.shape

    # ---------------------------------------------------------------- statistics
    def report(self) -> Dict[str, Any]:
        """JSON-ready statistics of the last run.

        Keys: ``method``, ``steps``, ``full`` (steps computed in full), ``step`` / ``block`` / ``cfg`` (steps
        reused at each granularity), ``computed_share`` (full / steps), ``work_share`` (block-pair
        evaluations run / a full run's), ``map`` (one letter per step: F, S, B, C), ``reused_pairs``
        (the block pairs a block step reuses, e.g. ``"1-2"``), ``decision_ms`` (time of the indicators
        and decisions), ``config`` (fingerprint) and ``records`` (one :class:`StepRecord` dict per step).
        """
        counts = {kind: 0 for kind in STEP_LETTERS}
        for r in self.records:
            counts[r.kind] = counts.get(r.kind, 0) + 1
        n = len(self.records)
        depth = self._depth
        front, back = self.config.block_front, self.config.block_back
        reused = (f"{front}-{depth - back - 1}" if depth is not None and depth - back - 1 >= front else "none")
        return {
            "method": self.name, "steps": n, **counts,
            "computed_share": round(counts["full"] / n, 4) if n else None,
            "work_share": round(sum(r.work for r in self.records) / n, 4) if n else None,
            "map": "".join(STEP_LETTERS[r.kind] for r in self.records),
            "reused_pairs": reused if counts["block"] else None,
            "decision_ms": round(self.decision_ms, 3),
            "config": self.config.fingerprint(),
            "records": [asdict(r) for r in self.records],
        }


class TeaCache(IntraCache):
    """TeaCache-style step reuse (single granularity; see the module doc). Hook name ``"teacache"``."""

    name = "teacache"
    incompatible = ("mixcache",)

    def _reset(self) -> None:
        super()._reset()
        self._accumulated = 0.0

    def _decide(self, h: torch.Tensor, blocks, info: StepInfo) -> torch.Tensor:
        t0 = self._tic()
        change = self._input_change(h, blocks)
        self._toc(t0)
        reason = ("exact" if info.exact else "warmup" if info.index == 0 else "final" if info.is_last
                  else "cold" if change is None or not self._usable(h) else None)
        if reason is None:
            self._accumulated += change
            if self._accumulated < float(self.config.teacache_threshold):
                self._record = StepRecord(info.index, info.t, "step", "indicator", 0.0, indicator=self._accumulated)
                return self._reuse_step(h)
            reason = "indicator"
        self._record = StepRecord(info.index, info.t, "full", reason, 1.0,
                                  indicator=self._accumulated if reason == "indicator" else None)
        out = self._pairs(blocks, h, 0, blocks.depth)
        self._residual = out - h
        self._accumulated = 0.0
        self._run_length = 0
        self._last_full = info.index
        return out


class MixCache(IntraCache):
    """Hybrid intra-request caching after MixCache (see the module doc). Hook name ``"mixcache"``.

    ``incompatible``: ``teacache`` (both replace the block loop).
    """

    name = "mixcache"
    incompatible = ("teacache",)

    def _reset(self) -> None:
        super()._reset()
        self._input_sum = 0.0  # sum of block 0's input changes since the last full step
        self._rate: Optional[float] = None  # residual change per unit of input change (measured)
        self._triggered = False
        self._residual_change: Optional[float] = None  # measured per step between the last two full steps
        self._front: Optional[torch.Tensor] = None  # front pairs' residual, last full step
        self._span: Optional[torch.Tensor] = None  # reused span's residual, last full step
        self._guidance: Optional[torch.Tensor] = None  # out_cond - out_uncond, last full step
        self._guidance_rate: Optional[float] = None  # its relative change per step
        self._guidance_share: Optional[float] = None  # |g| / |guided velocity| at the last full step
        self._guidance_step: Optional[int] = None

    # ---------------------------------------------------------------- decision
    def _span_bounds(self, depth: int) -> Tuple[int, int]:
        front = min(self.config.block_front, depth)
        return front, max(front, depth - self.config.block_back)

    def _decide(self, h: torch.Tensor, blocks, info: StepInfo) -> torch.Tensor:
        cfg = self.config
        t0 = self._tic()
        change = self._input_change(h, blocks)
        if change is not None:
            self._input_sum += change
        self._toc(t0)
        rows = int(h.shape[0])
        if not self._triggered and self._residual_change is not None and info.index >= cfg.warmup_steps:
            self._triggered = self._residual_change <= cfg.trigger_threshold  # once on, on for the request
        reason = ("exact" if info.exact else "short" if info.total < cfg.min_steps
                  else "warmup" if info.index < cfg.warmup_steps
                  else "final" if info.index >= info.total - cfg.final_steps
                  else "cold" if change is None or not self._usable(h) or self._rate is None
                  else "untriggered" if not self._triggered
                  else "cap" if self._run_length >= cfg.max_reuse else None)
        if reason is not None:
            self._record = StepRecord(info.index, info.t, "full", reason, 1.0)
            return self._full(h, blocks, info)
        predicted = self._rate * self._input_sum
        guidance_error = self._guidance_error(info.index, rows)
        record = StepRecord(info.index, info.t, "full", "indicator", 1.0, indicator=predicted,
                            guidance_error=guidance_error)
        self._record = record
        if "step" in cfg.granularities and predicted <= cfg.step_threshold:
            record.kind = "step"
            return self._reuse_step(h)
        front, back = self._span_bounds(blocks.depth)
        cfg_ok = "cfg" in cfg.granularities and guidance_error is not None and guidance_error <= cfg.cfg_threshold
        block_ok = "block" in cfg.granularities and back > front and self._front is not None
        block_cost = (front + blocks.depth - back) / blocks.depth
        if cfg_ok and (not block_ok or 0.5 <= block_cost):
            record.kind = "cfg"
            return self._conditional_only(h, blocks, h, 0)
        if block_ok:
            h_front = self._pairs(blocks, h, 0, front)
            t0 = self._tic()
            record.probe = rel_l1(h_front - h, self._front)
            self._toc(t0)
            if record.probe <= cfg.block_threshold:
                record.kind = "block"
                self._run_length += 1
                return self._pairs(blocks, h_front + self._span, back, blocks.depth)
            if cfg_ok:
                record.kind = "cfg"
                return self._conditional_only(h, blocks, h_front, front)
            record.reason = "probe"
            return self._full(h, blocks, info, h_front=h_front)
        return self._full(h, blocks, info)

    def _guidance_error(self, index: int, rows: int) -> Optional[float]:
        """Predicted relative error of the guided velocity if the guidance difference is reused now."""
        if rows % 2 or self._guidance_rate is None or self._guidance_step is None:
            return None
        weight = 1.0 if self.cfg_scale is None else abs(float(self.cfg_scale) - 1.0)
        return weight * self._guidance_rate * (index - self._guidance_step) * self._guidance_share

    # ---------------------------------------------------------------- the three ways to run a step
    def _full(self, h: torch.Tensor, blocks, info: StepInfo, h_front: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every block pair on every row; refresh the caches and the measured rates."""
        front, back = self._span_bounds(blocks.depth)
        if h_front is None:
            h_front = self._pairs(blocks, h, 0, front)
        h_span = self._pairs(blocks, h_front, front, back)
        out = self._pairs(blocks, h_span, back, blocks.depth)
        t0 = self._tic()
        residual = out - h
        if self._residual is not None and self._residual.shape == residual.shape and self._last_full is not None:
            change = rel_l1(residual, self._residual)
            if self._input_sum > 0:
                self._rate = change / self._input_sum
            self._residual_change = change / max(1, info.index - self._last_full)
        self._residual = residual
        if "block" in self.config.granularities and back > front:
            self._front = h_front - h
            self._span = h_span - h_front
        self._toc(t0)
        self._input_sum = 0.0
        self._run_length = 0
        self._last_full = info.index
        return out

    def _conditional_only(self, h: torch.Tensor, blocks, h_start: torch.Tensor, start: int) -> torch.Tensor:
        """The conditional half runs the pairs from ``start``; the unconditional half's output is replaced
        after the call (:meth:`_after`: the conditional output minus the cached guidance), so its rows here
        pass the block-span input through unchanged and are overwritten."""
        half = int(h.shape[0]) // 2
        cond = self._pairs(blocks, h_start[:half], start, blocks.depth)
        self._run_length += 1
        self._cfg_reused = True
        return torch.cat([cond, h_start[half:]], 0)

    def _after(self, out: torch.Tensor, record: StepRecord) -> torch.Tensor:
        if self._cfg_reused:
            half = int(out.shape[0]) // 2
            return torch.cat([out[:half], out[:half] - self._guidance], 0)
        if record.kind == "full" and out.shape[0] % 2 == 0 and "cfg" in self.config.granularities:
            t0 = self._tic()
            half = int(out.shape[0]) // 2
            channels = self._channels(out)
            guidance = out[:half] - out[half:]
            if self._guidance is not None and self._guidance.shape == guidance.shape:
                steps = max(1, record.index - self._guidance_step)
                self._guidance_rate = rel_l1(guidance[:, :channels], self._guidance[:, :channels]) / steps
            scale = 1.0 if self.cfg_scale is None else float(self.cfg_scale)
            velocity = out[half:, :channels] + scale * guidance[:, :channels]
            self._guidance_share = float((guidance[:, :channels].abs().mean(dtype=torch.float32)
                                          / velocity.abs().mean(dtype=torch.float32).clamp_min(1e-12)).item())
            self._guidance = guidance
            self._guidance_step = record.index
            self._toc(t0)
        return out

    def _channels(self, out: torch.Tensor) -> int:
        """Velocity channels of the output: the model's input channels (STDiT3 with pred_sigma doubles them)."""
        return int(getattr(self.model, "in_channels", out.shape[1]))
