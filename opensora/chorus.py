"""Chorus for STDiT3: serve a request from a similar earlier request's latents, in three stages.

Chorus (arXiv 2604.04451; what its public pages state is summarised in ``docs/design.md``, "Chorus")
reuses a *donor*: the cached request whose whole prompt is closest to the new one. Along the RFLOW
schedule of ``N`` steps (0-based steps ``0..N-1``; ``z_k`` is the latent the model sees at step k):

* **stage 1, full reuse** (steps ``0..K1-1``): skipped. The request starts from the donor's ``z_K1``.
* **stage 2, Selective Region Denoising with Token-Guided Attention Amplification** (steps
  ``K1..K2-1``): each step runs the model on the whole latent with :class:`TokenGuidance` attached. It
  adds ``log(alpha_k)`` to the cross-attention logits of the caption tokens the donor's prompt lacks
  (the *new tokens*, conditional CFG half only; ``alpha_k = 1 + (alpha - 1) * decay^(k - K1)``) and
  records how much every latent token attends to them. :func:`region_mask` turns that map into the
  region that diverges from the donor; the step's update is kept there, and everywhere else the latent
  takes the donor's own next latent ``z_{k+1}`` (the cached features fill the rest). The region only
  grows during the stage (a union over its steps), so a part that began to follow the new prompt never
  snaps back to the donor. A prompt with no new token diverges nowhere: stage 2 computes nothing and
  the request takes the donor's ``z_K2``.
* **stage 3** (steps ``K2..N-1``): plain RFLOW steps, no reuse, which repair seams.

Our choices where the paper's pages say nothing (documented knobs of ``pipeline.settings.ChorusSettings``):

* the region rule (:func:`region_mask`): per latent frame, the tokens whose new-token attention is at
  least ``threshold`` times that frame's largest, grown by ``dilation`` tokens (a (2d+1)^2 max filter on
  the token grid), then spread over each token's patch of latent voxels. The map is the attention
  probability summed over the new tokens, averaged over heads and over every cross-attention layer
  (spatial and temporal blocks). One level of mask, not the paper's hierarchy;
* the amplification: an additive logit bias (so relative weights among the other tokens are
  unchanged), on every cross-attention layer, decaying geometrically over stage 2;
* the stored entry: the donor's ``z_k`` for every step of the window ``[K1 min, K2 max]`` the stage map
  can pick (:func:`chorus_capture_plan`), so stage 2 can blend toward the donor at every step.

Nothing here imports ``cache/``: donor latents come in as a ``name -> tensor`` dict, the new-token
columns as indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .hooks import HookRegistry, ModelHook
from .layers import MultiHeadCrossAttention, TextContext
from .rflow import RFlow, RFlowSchedule, SamplingCancelled, StepInfo, StepState

__all__ = [
    "chorus_latent_name",
    "chorus_capture_plan",
    "TokenGuidance",
    "region_mask",
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
    """The Chorus model hook: Token-Guided Attention Amplification and the new tokens' attention map.

    Attached to an STDiT3 (``HookRegistry``, name ``"chorus_guidance"``), every model call installs a
    cross-attention hook on all cross-attention layers (``STDiT3.cross_attention_hook``) that

    * adds ``log(alpha)`` to the logits of the key columns ``columns`` in the conditional rows of the CFG
      batch ``[cond; uncond]`` (nothing when ``alpha == 1``: the layer then runs its plain path);
    * records, for the conditional rows, the attention probability each query token gives to those
      columns (summed over them, averaged over heads), with the bias applied.

    After a call, :attr:`last_map` is that map averaged over the layers: [n, T'·H'·W'] fp32 (n = half the
    CFG batch; tokens in raster order), and :attr:`grid` the patch grid (T', H', W').

    Args:
        model: the STDiT3 (needs ``cross_attention_hook`` and ``patch_grid``).
        columns: indices of the new tokens among the caption's real tokens (0 = the first real token).
        alpha: amplification factor (>= 1 strengthens; 1 = off); change it between calls.

    Raises:
        ValueError: a negative column or ``alpha`` <= 0.
    """

    name = "chorus_guidance"

    def __init__(self, model: torch.nn.Module, columns: Sequence[int], alpha: float = 1.0) -> None:
        cols = sorted({int(c) for c in columns})
        if cols and cols[0] < 0:
            raise ValueError(f"token columns must be >= 0, got {cols}")
        self.model = model
        self.columns = cols
        self.alpha = float(alpha)
        self.last_map: Optional[torch.Tensor] = None
        self.grid: Optional[Tuple[int, int, int]] = None
        self.calls = 0
        self._sum: Optional[torch.Tensor] = None
        self._layers = 0
        self._rows = 0

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
        """One model call with the cross-attention hook installed; sets :attr:`last_map` and :attr:`grid`.

        ``x`` is the CFG batch [2n, C, T, H, W]. Raises ValueError on an odd batch.
        """
        if int(x.shape[0]) % 2:
            raise ValueError(f"Chorus guidance needs the CFG batch [cond; uncond] (even size), got {x.shape[0]}")
        self._rows = int(x.shape[0]) // 2
        self._sum, self._layers = None, 0
        with self.model.cross_attention_hook(self._logit_hook):
            out = call_next(x, timestep, y, **kwargs)
        self.grid = tuple(self.model.patch_grid(x.shape[2:]))  # type: ignore[assignment]
        self.last_map = None if self._sum is None else self._sum / self._layers
        self.calls += 1
        return out

    def _logit_hook(self, layer: MultiHeadCrossAttention, q: torch.Tensor, k: torch.Tensor,
                    ctx: TextContext) -> Optional[torch.Tensor]:
        n, length = self._rows, int(k.shape[2])
        cols = [c for c in self.columns if c < min(ctx.lengths[:n])]
        bias = None
        if cols and self._alpha != 1.0:
            bias = torch.zeros((q.shape[0], 1, 1, length), dtype=torch.float32, device=q.device)
            bias[:n, :, :, cols] = math.log(self._alpha)
        if not cols:
            return bias
        # The map: softmax over the cond rows' real keys, with the bias the layer will add.
        logits = torch.matmul(q[:n].float(), k[:n].float().transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if bias is not None:
            logits = logits + bias[:n]
        if ctx.key_mask is not None:
            logits = logits.masked_fill(~ctx.key_mask[:n], float("-inf"))
        probs = logits.softmax(dim=-1)[..., cols].sum(dim=-1).mean(dim=1)  # [n, N]
        self._sum = probs if self._sum is None else self._sum + probs
        self._layers += 1
        return bias


def region_mask(token_map: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int], latent_thw: Sequence[int],
                threshold: float, dilation: int) -> torch.Tensor:
    """The latent region that diverges from the donor, from the new tokens' attention map.

    Rule: per latent frame (token row t' of the grid), a token is in the region when its map value is at
    least ``threshold`` times the frame's largest value; the region grows by ``dilation`` tokens (a
    ``(2 * dilation + 1)``-square max filter over the H' x W' token grid); each token then covers its patch
    of latent voxels (``patch_size``), cropped to the latent size (STDiT3 pads at the end).

    Args:
        token_map: [n, T'·H'·W'] non-negative (``TokenGuidance.last_map``).
        grid: (T', H', W'). patch_size: (pt, ph, pw). latent_thw: (T, H, W) of the latent.
        threshold: in [0, 1]; 0 selects every token. dilation: tokens, >= 0.

    Returns:
        bool [n, 1, T, H, W] (True = denoise this voxel with the new prompt).

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
    peak = a.amax(dim=(2, 3), keepdim=True)
    keep = a >= float(threshold) * peak
    d = int(dilation)
    if d:
        keep = F.max_pool2d(keep.float().reshape(n * nt, 1, nh, nw), 2 * d + 1, stride=1, padding=d) > 0
        keep = keep.reshape(n, nt, nh, nw)
    pt, ph, pw = (int(p) for p in patch_size)
    t, h, w = (int(v) for v in latent_thw)
    keep = keep.repeat_interleave(pt, 1).repeat_interleave(ph, 2).repeat_interleave(pw, 3)
    return keep[:, None, :t, :h, :w]


@dataclass
class ChorusRun:
    """What :func:`sample_chorus` did.

    Attributes:
        latent: the clean latent [1, C, T, H, W] fp32.
        k1, k2, total: the stage bounds and the schedule's length (steps ``0..k1-1`` skipped, ``k1..k2-1``
            stage 2, ``k2..total-1`` stage 3).
        model_steps: steps the model ran (stage 2 steps that computed, plus stage 3).
        region: fraction of the latent in the stage-2 region after each stage-2 step (empty when stage
            2 computed nothing).
        guidance: the :class:`TokenGuidance` hook used (None when stage 2 computed nothing).
    """

    latent: torch.Tensor
    k1: int
    k2: int
    total: int
    model_steps: int
    region: List[float] = field(default_factory=list)
    guidance: Optional[TokenGuidance] = None


def _segment(schedule: RFlowSchedule, start: int, stop: int) -> RFlowSchedule:
    return RFlowSchedule(timesteps=schedule.timesteps[start:stop], dts=schedule.dts[start:stop],
                         num_timesteps=schedule.num_timesteps, ratio=schedule.ratio)


def _run_segment(rflow: RFlow, model: Callable[..., torch.Tensor], z: torch.Tensor, schedule: RFlowSchedule,
                 start: int, stop: int, cfg_scale: float, callback: Optional[Callable[[StepState], None]],
                 sample_kwargs: Mapping[str, Any]) -> torch.Tensor:
    """Steps ``start..stop-1`` of ``schedule`` from ``z``; the callback and a cancellation see full-schedule
    step numbers."""
    total = len(schedule)

    def shifted(state: StepState) -> None:
        info = StepInfo(index=state.info.index + start, total=total, t=state.info.t, sigma=state.info.sigma,
                        dt=state.info.dt)
        callback(StepState(info=info, z_before=state.z_before, z_after=state.z_after, velocity=state.velocity))

    try:
        return rflow.sample(model, z, schedule=_segment(schedule, start, stop), cfg_scale=cfg_scale,
                            callback=None if callback is None else shifted, **sample_kwargs)
    except SamplingCancelled as exc:
        raise SamplingCancelled(exc.step_index + start, total) from None


def sample_chorus(rflow: RFlow, model: torch.nn.Module, donor: Mapping[str, torch.Tensor], *, k1: int, k2: int,
                  full_steps: int, cfg_scale: float, columns: Sequence[int], mask_threshold: float, dilation: int,
                  tgaa: float = 1.0, tgaa_decay: float = 1.0, callback: Optional[Callable[[StepState], None]] = None,
                  **sample_kwargs: Any) -> ChorusRun:
    """A Chorus hit: stage 1 skipped (start from the donor's ``z_k1``), stage 2 over ``k1..k2-1``, stage 3 plain.

    Args:
        rflow: the sampler (its schedule of ``full_steps`` steps is the donor's).
        model: the STDiT3 (:class:`TokenGuidance` is attached for stage 2 and detached after it).
        donor: the donor entry: ``chorus_z<k>`` [C, T, H, W] (or [1, C, T, H, W]) for every k in ``k1..k2``.
        k1, k2: stage bounds, ``0 <= k1 <= k2 < full_steps`` (stage 3 keeps at least one step).
        full_steps: N. cfg_scale: CFG scale (the donor's; part of its compatibility key).
        columns: the new tokens (indices among the caption's real tokens); none: stage 2 computes nothing.
        mask_threshold, dilation: :func:`region_mask`.
        tgaa: amplification factor alpha (1 = off). tgaa_decay: alpha's excess is multiplied by it per
            stage-2 step (1 = constant, 0 = first step only).
        callback: per-step callback, with full-schedule step numbers.
        **sample_kwargs: ``RFlow.sample`` arguments (y, y_mask, y_null, height, width, num_frames,
            size_dtype, should_cancel, ...).

    Returns:
        :class:`ChorusRun`. With ``mask_threshold=0``, ``dilation=0`` and ``tgaa=1`` stage 2 is exactly
        plain RFLOW denoising from the donor's ``z_k1`` (bit for bit).

    Raises:
        ValueError: bounds out of range, a donor lacking a latent of the window or of another shape.
        SamplingCancelled: ``should_cancel`` returned True (full-schedule step number).
    """
    k1, k2, n = int(k1), int(k2), int(full_steps)
    if not 0 <= k1 <= k2 < n:
        raise ValueError(f"Chorus needs 0 <= K1 <= K2 < N, got K1={k1}, K2={k2}, N={n}")
    if not 0.0 <= float(tgaa_decay) <= 1.0:
        raise ValueError(f"tgaa_decay must be in [0, 1], got {tgaa_decay}")
    size = dict(height=sample_kwargs["height"], width=sample_kwargs["width"], num_frames=sample_kwargs["num_frames"],
                size_dtype=sample_kwargs.get("size_dtype", torch.bfloat16))
    schedule = rflow.schedule(num_steps=n, **size)
    device = next(model.parameters()).device

    def latent(step: int) -> torch.Tensor:
        name = chorus_latent_name(step)
        if name not in donor:
            raise ValueError(f"the donor entry lacks {name} (it holds {sorted(donor)}): it was stored with another "
                             "Chorus window, which its compatibility key should have kept out")
        z = donor[name]
        return (z[None] if z.ndim == 4 else z).to(device=device, dtype=torch.float32)

    z = latent(k1)
    run = ChorusRun(latent=z, k1=k1, k2=k2, total=n, model_steps=n - k2)
    if k2 > k1 and not columns:
        z = latent(k2)  # nothing diverges from the donor: stage 2 computes nothing
    elif k2 > k1:
        guidance = TokenGuidance(model, columns)
        region: Optional[torch.Tensor] = None
        patch = getattr(model, "patch_size")
        with HookRegistry.of(model).attached(guidance):
            for k in range(k1, k2):
                guidance.alpha = 1.0 + (float(tgaa) - 1.0) * float(tgaa_decay) ** (k - k1)
                stepped = _run_segment(rflow, model, z, schedule, k, k + 1, cfg_scale, callback, sample_kwargs)
                if guidance.last_map is None:  # the caption holds none of the columns: nothing diverges
                    step_region = torch.zeros((z.shape[0], 1, *z.shape[2:]), dtype=torch.bool, device=z.device)
                else:
                    step_region = region_mask(guidance.last_map, guidance.grid, patch, z.shape[2:],
                                              mask_threshold, dilation).to(z.device)
                region = step_region if region is None else region | step_region
                z = torch.where(region, stepped, latent(k + 1))
                run.region.append(float(region.float().mean()))
        run.guidance = guidance
        run.model_steps += k2 - k1
    run.latent = _run_segment(rflow, model, z, schedule, k2, n, cfg_scale, callback, sample_kwargs)
    return run
