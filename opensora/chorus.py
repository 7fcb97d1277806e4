"""Chorus for STDiT3: serve a request from a similar earlier request's latents, in three stages.

Chorus (arXiv 2604.04451; what its public pages state is summarised in ``docs/design.md``, "Chorus")
reuses a *donor*: the cached request whose whole prompt is closest to the new one. Along the RFLOW
schedule of ``N`` steps (0-based steps ``0..N-1``; ``z_k`` is the latent the model sees at step k):

* **stage 1, full reuse** (steps ``0..K1-1``): skipped. The request starts from the donor's ``z_K1``.
* **stage 2, Selective Region Denoising with Token-Guided Attention Amplification** (steps
  ``K1..K2-1``): :class:`TokenGuidance` adds ``log(alpha_k)`` to the cross-attention logits of the
  caption tokens the donor's prompt lacks (the *new tokens*; conditional CFG half only;
  ``alpha_k = 1 + (alpha - 1) * decay^(k - K1)``). The first stage-2 step runs the whole latent and records
  how much every latent token attends to the new tokens; :func:`region_tokens` turns that map into the
  region that diverges from the donor. Every later stage-2 step computes only the region's patch
  positions (``STDiT3.token_subset``), so it costs about the region's share of a step. Inside the region
  each step's update is kept; everywhere else the latent takes the donor's own next latent ``z_{k+1}``
  (the cached latents fill the rest). A prompt with no new token diverges nowhere: stage 2 computes
  nothing and the request takes the donor's ``z_K2``.
* **stage 3** (steps ``K2..N-1``): plain RFLOW steps on the whole latent, no reuse, which repair seams.

Our choices where the paper's pages say nothing (documented knobs of ``pipeline.settings.ChorusSettings``):

* the region rule (:func:`region_tokens`): per latent frame, the tokens whose new-token attention is at
  least ``threshold`` times that frame's largest, grown by ``dilation`` tokens (a (2d+1)^2 max filter on
  the token grid); the positions in the region of any frame are computed in every frame (temporal
  attention needs whole columns). The map is the attention probability summed over the new tokens,
  averaged over heads and over every cross-attention layer (spatial and temporal blocks). The region is
  decided once, at the first stage-2 step (one level, not the paper's hierarchy);
* in the region, spatial self-attention sees only the region's tokens (the donor's features of the other
  positions are not stored: an entry would grow by every block's keys and values);
* the amplification: an additive logit bias (relative weights among the other tokens are unchanged), on
  every cross-attention layer, decaying geometrically over stage 2;
* the stored entry: the donor's ``z_k`` for every step of the window ``[K1 min, K2 max]`` the stage map
  can pick (:func:`chorus_capture_plan`), so stage 2 can fill the rest at every step.

Nothing here imports ``cache/``: donor latents come in as a ``name -> tensor`` dict, the new-token
columns as indices.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .hooks import HookRegistry, ModelHook
from .layers import MultiHeadCrossAttention, TextContext
from .rflow import RFlow, RFlowSchedule, SamplingCancelled, StepInfo, StepState

__all__ = [
    "chorus_latent_name",
    "chorus_capture_plan",
    "TokenGuidance",
    "region_tokens",
    "region_positions",
    "positions_mask",
    "ChorusRun",
    "sample_chorus",
]


def chorus_latent_name(step: int) -> str:
    """Name of the donor latent fed to the model at 0-based full-schedule step ``step``: ``chorus_z<step>``."""
    return f"chorus_z{int(step)}"


def chorus_capture_plan(first: int, last: int) -> Dict[str, int]:
    """What a miss keeps for later Chorus hits: ``{chorus_z<k>: k}`` for every step k in ``first..last``
    (0-based, inclusive), the window the stage map can choose K1 and K2 in.

    Raises:
        ValueError: ``first`` < 0 or ``last`` < ``first``.
    """
    if first < 0 or last < first:
        raise ValueError(f"the Chorus window must satisfy 0 <= first <= last, got {first}..{last}")
    return {chorus_latent_name(k): k for k in range(int(first), int(last) + 1)}


class TokenGuidance(ModelHook):
    """The Chorus model hook: Token-Guided Attention Amplification and the differing tokens' attention maps.

    Attached to an STDiT3 (``HookRegistry``, name ``"chorus_guidance"``), every model call installs a
    cross-attention hook on all cross-attention layers (``STDiT3.cross_attention_hook``) that

    * adds ``log(alpha)`` to the logits of the key columns ``columns`` (the request's new tokens) in the
      conditional rows of the CFG batch ``[cond; uncond]`` (nothing when ``alpha == 1``: the layer then
      runs its plain path);
    * while :attr:`record_map` is set, records the attention probability each query token gives to those
      columns (summed over them, averaged over heads, with the bias applied). With a ``donor_caption``
      it also appends, for that call only, one row per sample that sees the same latent under the
      donor's caption and records its attention to ``donor_columns`` (the donor's words the request
      lacks): where the donor's own differing content sits. The extra rows are dropped from the output.

    After a recording call, :attr:`last_map` (request) and :attr:`last_donor_map` (donor; None without a
    donor caption) are those maps averaged over the layers: [n, T'·H'·W'] fp32 (n = half the CFG batch;
    tokens in raster order), and :attr:`grid` is the patch grid (T', H', W').

    Args:
        model: the STDiT3 (needs ``cross_attention_hook`` and ``patch_grid``).
        columns: indices of the request's new tokens among its caption's real tokens (0 = the first).
        alpha: amplification factor (>= 1 strengthens; 1 = off); change it between calls.
        donor_caption: the donor prompt's caption ``(y [1, 1, L, D], mask [1, L])``, or None.
        donor_columns: indices of the donor's tokens the request lacks, among its caption's real tokens.

    Raises:
        ValueError: a negative column or ``alpha`` <= 0.
    """

    name = "chorus_guidance"

    def __init__(self, model: torch.nn.Module, columns: Sequence[int], alpha: float = 1.0, *,
                 donor_caption: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 donor_columns: Sequence[int] = ()) -> None:
        cols = sorted({int(c) for c in columns})
        donor_cols = sorted({int(c) for c in donor_columns})
        if (cols and cols[0] < 0) or (donor_cols and donor_cols[0] < 0):
            raise ValueError(f"token columns must be >= 0, got {cols} and {donor_cols}")
        self.model = model
        self.columns = cols
        self.donor_columns = donor_cols
        self.donor_caption = donor_caption
        self.alpha = float(alpha)
        self.record_map = True
        self.last_map: Optional[torch.Tensor] = None
        self.last_donor_map: Optional[torch.Tensor] = None
        self.grid: Optional[Tuple[int, int, int]] = None
        self._maps: Dict[str, torch.Tensor] = {}
        self._layers = 0
        self._rows = 0
        self._probe = False

    @property
    def alpha(self) -> float:
        """The amplification factor of the next call (> 0)."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not float(value) > 0.0:
            raise ValueError(f"the amplification factor must be > 0, got {value}")
        self._alpha = float(value)

    def forward(self, call_next: Callable[..., torch.Tensor], x: torch.Tensor, timestep: torch.Tensor,
                y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """One model call with the cross-attention hook installed; a recording call sets :attr:`last_map`,
        :attr:`last_donor_map` and :attr:`grid`.

        ``x`` is the CFG batch [2n, C, T, H, W]. Raises ValueError on an odd batch.
        """
        if int(x.shape[0]) % 2:
            raise ValueError(f"Chorus guidance needs the CFG batch [cond; uncond] (even size), got {x.shape[0]}")
        n = int(x.shape[0]) // 2
        self._rows = n
        self._maps, self._layers = {}, 0
        self._probe = bool(self.record_map and self.donor_caption is not None and self.donor_columns)
        if self._probe:  # one more row per sample: the same latent under the donor's caption
            dy, dmask = self.donor_caption
            mask = kwargs.get("mask")
            rows = torch.ones(2 * n, y.shape[2], dtype=torch.int64, device=y.device) if mask is None \
                else mask.to(y.device).repeat(2 * n // mask.shape[0], 1)
            x = torch.cat([x, x[:n]])
            timestep = torch.cat([timestep, timestep[:n]])
            y = torch.cat([y, dy.to(device=y.device, dtype=y.dtype).expand(n, *dy.shape[1:])])
            kwargs["mask"] = torch.cat([rows, dmask.to(rows.device).expand(n, -1).to(rows.dtype)])
        with self.model.cross_attention_hook(self._logit_hook):
            out = call_next(x, timestep, y, **kwargs)
        self.grid = tuple(self.model.patch_grid(x.shape[2:]))  # type: ignore[assignment]
        if self.record_map:
            self.last_map = self._maps["request"] / self._layers if "request" in self._maps else None
            self.last_donor_map = self._maps["donor"] / self._layers if "donor" in self._maps else None
        return out[: 2 * n]

    def _logit_hook(self, layer: MultiHeadCrossAttention, q: torch.Tensor, k: torch.Tensor,
                    ctx: TextContext) -> Optional[torch.Tensor]:
        n, length = self._rows, int(k.shape[2])
        cols = [c for c in self.columns if c < min(ctx.lengths[:n])]
        bias = None
        if cols and self._alpha != 1.0:
            bias = torch.zeros((q.shape[0], 1, 1, length), dtype=torch.float32, device=q.device)
            bias[:n, :, :, cols] = math.log(self._alpha)
        if self.record_map:
            self._record("request", q[:n], k[:n], ctx, slice(0, n), cols, None if bias is None else bias[:n])
            if self._probe:
                donor_cols = [c for c in self.donor_columns if c < min(ctx.lengths[2 * n:])]
                self._record("donor", q[2 * n:], k[2 * n:], ctx, slice(2 * n, 3 * n), donor_cols, None)
            self._layers += 1
        return bias

    def _record(self, key: str, q: torch.Tensor, k: torch.Tensor, ctx: TextContext, rows: slice,
                cols: Sequence[int], bias: Optional[torch.Tensor]) -> None:
        """Add one layer's attention to ``cols`` (softmax over the rows' real keys, bias included)."""
        if not cols:
            return
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if bias is not None:
            logits = logits + bias
        if ctx.key_mask is not None:
            logits = logits.masked_fill(~ctx.key_mask[rows], float("-inf"))
        probs = logits.softmax(dim=-1)[..., list(cols)].sum(dim=-1).mean(dim=1)  # [n, N]
        self._maps[key] = probs if key not in self._maps else self._maps[key] + probs


def region_tokens(token_map: torch.Tensor, grid: Sequence[int], threshold: float, dilation: int) -> torch.Tensor:
    """The tokens that diverge from the donor, from the new tokens' attention map.

    Rule: per latent frame (token row t' of the grid), a token is in the region when its map value is at
    least ``threshold`` times the frame's largest value; the region then grows by ``dilation`` tokens (a
    ``(2 * dilation + 1)``-square max filter over the H' x W' token grid).

    Args:
        token_map: [n, T'·H'·W'] non-negative (``TokenGuidance.last_map``).
        grid: (T', H', W'). threshold: in [0, 1]; 0 selects every token. dilation: tokens, >= 0.

    Returns:
        bool [n, T', H', W'] (True = denoise this token with the new prompt).

    Raises:
        ValueError: a map whose size is not the grid's, a threshold outside [0, 1] or a negative dilation.
    """
    nt, nh, nw = (int(g) for g in grid)
    if token_map.ndim != 2 or token_map.shape[1] != nt * nh * nw:
        raise ValueError(f"the token map must be [n, {nt * nh * nw}] for grid {tuple(grid)}, got {tuple(token_map.shape)}")
    if not 0.0 <= float(threshold) <= 1.0 or int(dilation) < 0:
        raise ValueError(f"threshold must be in [0, 1] and dilation >= 0, got {threshold}, {dilation}")
    n = int(token_map.shape[0])
    a = token_map.float().reshape(n, nt, nh, nw)
    keep = a >= float(threshold) * a.amax(dim=(2, 3), keepdim=True)
    d = int(dilation)
    if d:
        keep = F.max_pool2d(keep.float().reshape(n * nt, 1, nh, nw), 2 * d + 1, stride=1, padding=d) > 0
        keep = keep.reshape(n, nt, nh, nw)
    return keep


def region_positions(tokens: torch.Tensor) -> torch.Tensor:
    """The patch positions (indices into a frame's H'·W' tokens, raster order) in the region of any frame
    or sample: the positions ``STDiT3.token_subset`` computes in every frame. ``tokens``: bool [n, T', H', W'].
    Returns int64 [S'] (sorted; empty when the region is)."""
    return tokens.any(dim=0).any(dim=0).flatten().nonzero().flatten()


def positions_mask(positions: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int],
                   latent_thw: Sequence[int]) -> torch.Tensor:
    """The latent voxels the computed ``positions`` cover: every frame's patch at each position, cropped to
    the latent (STDiT3 pads at the end). Returns bool [1, 1, T, H, W]."""
    nt, nh, nw = (int(g) for g in grid)
    pt, ph, pw = (int(p) for p in patch_size)
    t, h, w = (int(v) for v in latent_thw)
    keep = torch.zeros(nh * nw, dtype=torch.bool, device=positions.device)
    keep[positions] = True
    keep = keep.reshape(1, 1, nh, nw).expand(1, nt, nh, nw)
    keep = keep.repeat_interleave(pt, 1).repeat_interleave(ph, 2).repeat_interleave(pw, 3)
    return keep[:, None, :t, :h, :w]


@dataclass
class ChorusRun:
    """What :func:`sample_chorus` did.

    Attributes:
        latent: the clean latent [1, C, T, H, W] fp32.
        k1, k2, total: the stage bounds and the schedule's length (steps ``0..k1-1`` skipped, ``k1..k2-1``
            stage 2, ``k2..total-1`` stage 3; K2 as rounded onto the stride's grid).
        stride: the hit visited every ``stride``-th step from K1 on.
        model_steps: model calls (stage 2 steps that computed, plus stage 3).
        region: fraction of the patch positions in the stage-2 region (0 when stage 2 computed nothing).
        step_equivalents: model work in full-step units: stage 3, stage 2's first step, and the region's
            share of each later stage-2 step.
    """

    latent: torch.Tensor
    k1: int
    k2: int
    total: int
    model_steps: int
    stride: int = 1
    region: float = 0.0
    step_equivalents: float = 0.0


class _ContextKV:
    """The keys and values of the positions stage 2 does not compute, for every spatial block.

    :meth:`capture` (a full model call) keeps each spatial block's self-attention K/V; :meth:`filling`
    (model calls under ``STDiT3.token_subset``) appends the kept K/V of the other positions to the
    computed positions' own, so the region's queries still see the whole frame (as it was at the capture).
    K/V rows are [B·T', heads, S, head_dim] (spatial attention, no RoPE: key order does not matter).
    It holds every spatial block's K/V of one call: STDiT3-XL/2 at 240p, 51 frames, bf16, with the probe
    row about 2.4 GB of device memory for the length of stage 2.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def _hooks(self, fn: Callable) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for i in range(len(self.model.spatial_blocks)):
            stack.enter_context(self.model.kv_hook(fn, block_index=i))
        return stack

    def capture(self) -> contextlib.ExitStack:
        def keep(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: int):
            self.kv[block_index] = (k, v)
            return k, v

        return self._hooks(keep)

    def filling(self, computed: torch.Tensor, frame_tokens: int) -> contextlib.ExitStack:
        rest = torch.ones(frame_tokens, dtype=torch.bool, device=computed.device)
        rest[computed] = False
        other = rest.nonzero().flatten()
        cached = {i: (k.index_select(2, other.to(k.device)), v.index_select(2, other.to(v.device)))
                  for i, (k, v) in self.kv.items()}

        def fill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: int):
            ck, cv = cached[block_index]  # the capture may hold extra rows after the CFG batch's
            rows = k.shape[0]
            return torch.cat([k, ck[:rows].to(k.dtype)], dim=2), torch.cat([v, cv[:rows].to(v.dtype)], dim=2)

        return self._hooks(fill)


def _alpha(tgaa: float, decay: float, offset: int) -> float:
    """Amplification factor ``offset`` steps into stage 2: 1 + (alpha - 1) * decay^offset."""
    return 1.0 + (float(tgaa) - 1.0) * float(decay) ** int(offset)


def _visiting(schedule: RFlowSchedule, points: Sequence[int]) -> RFlowSchedule:
    """The schedule that visits only the 0-based steps ``points`` (increasing) of ``schedule``: step i runs
    the model at ``t[points[i]]`` and moves the latent to ``t[points[i+1]]`` (to sigma 0 after the last).
    Consecutive points give a slice of ``schedule`` (bit for bit)."""
    points = [int(p) for p in points]
    if all(b - a == 1 for a, b in zip(points, points[1:])) and points[-1] == len(schedule) - 1:
        return RFlowSchedule(timesteps=schedule.timesteps[points[0]:], dts=schedule.dts[points[0]:],
                             num_timesteps=schedule.num_timesteps, ratio=schedule.ratio)
    t = schedule.timesteps[torch.tensor(points, dtype=torch.long)]
    dts = torch.cat([t[:-1] - t[1:], t[-1:]]) / schedule.num_timesteps
    return RFlowSchedule(timesteps=t, dts=dts.to(schedule.dts.dtype), num_timesteps=schedule.num_timesteps,
                         ratio=schedule.ratio)


def _run_segment(rflow: RFlow, model: Callable[..., torch.Tensor], z: torch.Tensor, schedule: RFlowSchedule,
                 start: int, stop: int, cfg_scale: float, callback: Optional[Callable[[StepState], None]],
                 sample_kwargs: Mapping[str, Any], points: Sequence[int], total: int) -> torch.Tensor:
    """Steps ``start..stop-1`` of ``schedule`` (a :func:`_visiting` schedule) from ``z``; the callback and a
    cancellation see full-schedule step numbers (``points[i]`` of ``total``)."""

    def numbered(state: StepState) -> None:
        info = StepInfo(index=int(points[state.info.index + start]), total=total, t=state.info.t,
                        sigma=state.info.sigma, dt=state.info.dt)
        callback(StepState(info=info, z_before=state.z_before, z_after=state.z_after, velocity=state.velocity))

    segment = RFlowSchedule(timesteps=schedule.timesteps[start:stop], dts=schedule.dts[start:stop],
                            num_timesteps=schedule.num_timesteps, ratio=schedule.ratio)
    try:
        return rflow.sample(model, z, schedule=segment, cfg_scale=cfg_scale,
                            callback=None if callback is None else numbered, **sample_kwargs)
    except SamplingCancelled as exc:
        raise SamplingCancelled(int(points[exc.step_index + start]), total) from None


def sample_chorus(rflow: RFlow, model: torch.nn.Module, donor: Mapping[str, torch.Tensor], *, k1: int, k2: int,
                  full_steps: int, cfg_scale: float, columns: Sequence[int], mask_threshold: float, dilation: int,
                  tgaa: float = 1.0, tgaa_decay: float = 1.0, stride: int = 1,
                  donor_caption: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, donor_columns: Sequence[int] = (),
                  callback: Optional[Callable[[StepState], None]] = None, **sample_kwargs: Any) -> ChorusRun:
    """A Chorus hit: stage 1 skipped (start from the donor's ``z_k1``), stage 2 over ``k1..k2-1``, stage 3 plain.

    Args:
        rflow: the sampler (its schedule of ``full_steps`` steps is the donor's).
        model: the STDiT3 (:class:`TokenGuidance` is attached for stage 2 and detached after it).
        donor: the donor entry: ``chorus_z<k>`` [C, T, H, W] (or [1, C, T, H, W]) for every k in ``k1..k2``.
        k1, k2: stage bounds, ``0 <= k1 <= k2 < full_steps`` (stage 3 keeps at least one step).
        full_steps: N. cfg_scale: CFG scale (the donor's; part of its compatibility key).
        columns: the request's new tokens (indices among its caption's real tokens).
        mask_threshold, dilation: :func:`region_tokens`, applied to each map; the region is their union.
        tgaa: amplification factor alpha (1 = off). tgaa_decay: alpha's excess is multiplied by it per
            stage-2 step (1 = constant, 0 = first step only).
        stride: the hit visits every ``stride``-th step of the donor's schedule from K1 on (K1, K1+s, ...;
            the last one steps to sigma 0), so it costs about ``(N - K1) / stride`` steps; K2 is rounded down
            onto that grid, so stage 2 fills from donor latents the entry holds. 1 = every step (our choice:
            the paper's pages do not say how its stages are timed; Chorus's own speed-up on 50-step models
            needs skipping more than stage 1).
        donor_caption, donor_columns: the donor prompt's caption ``(y, mask)`` and its tokens the request
            lacks: the first stage-2 step also maps where they draw attention (:class:`TokenGuidance`).
            With neither new nor missing tokens stage 2 computes nothing.
        callback: per-step callback, with full-schedule step numbers.
        **sample_kwargs: ``RFlow.sample`` arguments (y, y_mask, y_null, height, width, num_frames,
            size_dtype, should_cancel, ...).

    Returns:
        :class:`ChorusRun`. With ``mask_threshold=0``, ``dilation=0`` and ``tgaa=1`` stage 2 is exactly
        plain RFLOW denoising from the donor's ``z_k1`` on the same grid (bit for bit).

    Raises:
        ValueError: bounds or stride out of range, a donor lacking a latent of the window or of another shape.
        SamplingCancelled: ``should_cancel`` returned True (full-schedule step number).
    """
    k1, k2, n = int(k1), int(k2), int(full_steps)
    if not 0 <= k1 <= k2 < n:
        raise ValueError(f"Chorus needs 0 <= K1 <= K2 < N, got K1={k1}, K2={k2}, N={n}")
    if not 0.0 <= float(tgaa_decay) <= 1.0:
        raise ValueError(f"tgaa_decay must be in [0, 1], got {tgaa_decay}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    size = dict(height=sample_kwargs["height"], width=sample_kwargs["width"], num_frames=sample_kwargs["num_frames"],
                size_dtype=sample_kwargs.get("size_dtype", torch.bfloat16))
    points = list(range(k1, n, stride))  # the full-schedule steps the hit visits
    k2 = k1 + stride * ((k2 - k1) // stride)
    j2 = (k2 - k1) // stride  # stage 2 is points[0..j2-1], stage 3 points[j2..]
    schedule = _visiting(rflow.schedule(num_steps=n, **size), points)
    device = next(model.parameters()).device

    def latent(step: int) -> torch.Tensor:
        name = chorus_latent_name(step)
        if name not in donor:
            raise ValueError(f"the donor entry lacks {name} (it holds {sorted(donor)}): it was stored with another "
                             "Chorus window, which its compatibility key should have kept out")
        z = donor[name]
        return (z[None] if z.ndim == 4 else z).to(device=device, dtype=torch.float32)

    def segment(z: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return _run_segment(rflow, model, z, schedule, start, stop, cfg_scale, callback, sample_kwargs, points, n)

    z = latent(k1)
    stage3 = len(points) - j2
    run = ChorusRun(latent=z, k1=k1, k2=k2, total=n, model_steps=stage3, stride=stride, step_equivalents=float(stage3))
    if j2 > 0 and not columns and not donor_columns:
        z = latent(k2)  # nothing differs from the donor: stage 2 computes nothing
    elif j2 > 0:
        guidance = TokenGuidance(model, columns, donor_caption=donor_caption, donor_columns=donor_columns)
        with HookRegistry.of(model).attached(guidance):
            # The first stage-2 step sees the whole latent: where do the new tokens draw attention?
            guidance.alpha = _alpha(tgaa, tgaa_decay, 0)
            context = _ContextKV(model)
            with context.capture():
                stepped = segment(z, 0, 1)
            grid = guidance.grid
            maps = [m for m in (guidance.last_map, guidance.last_donor_map) if m is not None]
            tokens = [region_tokens(m, grid, mask_threshold, dilation) for m in maps]
            positions = region_positions(torch.cat(tokens)) if tokens else torch.zeros(0, dtype=torch.int64)
            region = positions_mask(positions.to(z.device), grid, model.patch_size, z.shape[2:])
            z = torch.where(region, stepped, latent(points[1]))
            run.region = positions.numel() / (grid[1] * grid[2])
            guidance.record_map = False
            if positions.numel():
                # Later stage-2 steps compute the region's positions only (all of them: the plain model).
                subset = contextlib.ExitStack()
                if positions.numel() < grid[1] * grid[2]:
                    subset.enter_context(model.token_subset(positions))
                    subset.enter_context(context.filling(positions, grid[1] * grid[2]))
                with subset:
                    for j in range(1, j2):
                        guidance.alpha = _alpha(tgaa, tgaa_decay, j)
                        stepped = segment(z, j, j + 1)
                        z = torch.where(region, stepped, latent(points[j + 1]))
            else:
                z = latent(k2)
        computed = (j2 - 1) if positions.numel() else 0
        run.model_steps += 1 + computed
        run.step_equivalents += 1.0 + computed * run.region
    run.latent = segment(z, j2, len(points))
    return run
