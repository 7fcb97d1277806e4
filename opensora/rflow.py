"""RFLOW: OpenSora 1.2's rectified-flow sampler (Euler steps with classifier-free guidance).

Follows `opensora/schedulers/rf/__init__.py` (`RFLOW.sample`) and `rectified_flow.py`
(`timestep_transform`) of OpenSora v1.2.0 (commit 17cce908); the formulas are restated in the
reference sheet opensora.md section 5.

Conventions (section 5.1): x_t = (1 - sigma) x_0 + sigma * eps with sigma = t / 1000, so t = 1000 is
pure noise; the model predicts the velocity v = x_0 - eps and each Euler step adds v * dt, walking
sigma from 1 toward 0.

Timesteps (section 5.2): a uniform grid t_i = (1 - i/S) * 1000, i = 0..S-1, shifted toward more noise
for larger videos by sigma' = r sigma / (1 + (r - 1) sigma) with
r = sqrt(H W / 512^2) * sqrt(5 * floor(F / 17)) (sqrt(1) for an image). OpenSora's default config
computes r from *bf16* tensors of height, width and frame count (so 854 becomes 856 and the ratio is
rounded to bf16); `size_dtype=torch.bfloat16` reproduces that bit for bit, `torch.float32` gives the
fp32 config.

The sampler takes the denoiser as a plain callable ``model(x, timestep, y, mask=, fps=, height=,
width=, **extra)`` so callers can wrap it (cache attention, tracing, offloading). Every step reports
its index, timestep, sigma, step size and the latent before and after the update to an optional
callback; a per-step hook can add model keyword arguments for chosen steps, and a cancellation
check stops the loop with `SamplingCancelled`. While the model runs, `current_step()` returns the
step's `StepInfo` (so a model hook such as an intra-request cache knows where it is in the schedule,
and which steps must be computed exactly) without any change to the model's arguments.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from .buckets import get_fps, get_num_frames

__all__ = [
    "SamplingCancelled",
    "RFlowSchedule",
    "StepInfo",
    "StepState",
    "RFlow",
    "size_conditioning",
    "shift_ratio",
    "timestep_transform",
    "rflow_schedule",
    "make_noise",
    "current_step",
]

NUM_TIMESTEPS = 1000
BASE_RESOLUTION = 512 * 512
BASE_NUM_FRAMES = 1
DEFAULT_CFG_SCALE = 7.0
DEFAULT_NUM_STEPS = 30
# Reserved model keyword arguments that the sampler fills itself.
_CORE_KWARGS = ("mask", "fps", "height", "width")


class SamplingCancelled(RuntimeError):
    """Raised by `RFlow.sample` when its `should_cancel` callable returns True.

    Attributes:
        step_index: 0-based index of the step that was about to run.
        total: number of steps in the schedule.
    """

    def __init__(self, step_index: int, total: int):
        self.step_index = step_index
        self.total = total
        super().__init__(f"sampling cancelled before step {step_index + 1} of {total}; no latent was returned")


def size_conditioning(
    height: int,
    width: int,
    num_frames: int,
    *,
    batch_size: int = 1,
    fps: Optional[float] = None,
    dtype: torch.dtype = torch.bfloat16,
    device: Optional[torch.device] = None,
) -> Dict[str, torch.Tensor]:
    """The size conditioning tensors OpenSora passes to STDiT3 and to the timestep shift.

    Same as OpenSora's `prepare_multi_resolution_info("STDiT2", ...)`: each value is a tensor of
    shape [batch_size] in `dtype`. With the default bf16 config the values are bf16-rounded
    (width 854 becomes 856), which is what the official model and shift see.

    Args:
        height, width: pixel size of the video (e.g. 240, 426), not the latent size.
        num_frames: pixel frame count (1 = image).
        batch_size: n, the number of prompts (not the CFG-doubled 2n).
        fps: fps conditioning; default 24 for videos and 120 for images.
        dtype: torch.bfloat16 (OpenSora default) or torch.float32.
        device: device of the returned tensors.

    Returns:
        dict with "height", "width", "num_frames", "ar" (height/width) and "fps", each [batch_size].

    Raises:
        ValueError: non-positive sizes or batch size.
    """
    height, width, num_frames = int(height), int(width), get_num_frames(num_frames)
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive pixel sizes, got {height}x{width}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if fps is None:
        fps = get_fps(num_frames)

    def full(value: float) -> torch.Tensor:
        return torch.tensor([value], dtype=dtype, device=device).repeat(batch_size)

    return {
        "height": full(height),
        "width": full(width),
        "num_frames": full(num_frames),
        "ar": full(height / width),
        "fps": full(fps),
    }


def shift_ratio(
    height: torch.Tensor,
    width: torch.Tensor,
    num_frames: torch.Tensor,
    *,
    base_resolution: int = BASE_RESOLUTION,
    base_num_frames: int = BASE_NUM_FRAMES,
    scale: float = 1.0,
) -> torch.Tensor:
    """Resolution/length shift ratio r of the RFLOW timestep transform (opensora.md section 5.2).

    r = sqrt(H W / base_resolution) * sqrt(n_lat / base_num_frames) * scale, with n_lat = 1 for an
    image and floor(F / 17) * 5 otherwise (the remainder chunk is deliberately ignored). Computed in
    the dtype of the inputs, so bf16 inputs give OpenSora's bf16-rounded ratio.

    Args:
        height, width, num_frames: tensors [n] of pixel height, width and frame count
            (e.g. from `size_conditioning`).

    Returns:
        r as a tensor [n] in the inputs' dtype (240p 9:16 51 frames: 2.421875 in bf16, 2.418723 in fp32).

    Raises:
        ValueError: a video shorter than 17 frames, whose ratio would be 0 (OpenSora divides by it).
    """
    ratio_space = (height * width / base_resolution).sqrt()
    if bool((num_frames[0] == 1).item()):
        latent_chunks = torch.ones_like(num_frames)
    else:
        latent_chunks = num_frames // 17 * 5
        if bool((latent_chunks <= 0).any().item()):
            raise ValueError(
                "videos need at least 17 frames for OpenSora's timestep shift (2..16 frames give a zero ratio); "
                "use 1 frame for an image or 17 or more"
            )
    ratio_time = (latent_chunks / base_num_frames).sqrt()
    return ratio_space * ratio_time * scale


def timestep_transform(
    t: torch.Tensor,
    height: torch.Tensor,
    width: torch.Tensor,
    num_frames: torch.Tensor,
    *,
    num_timesteps: int = NUM_TIMESTEPS,
    base_resolution: int = BASE_RESOLUTION,
    base_num_frames: int = BASE_NUM_FRAMES,
    scale: float = 1.0,
) -> torch.Tensor:
    """Shift timesteps toward more noise for larger videos (OpenSora `timestep_transform`).

    sigma = t / num_timesteps; sigma' = r sigma / (1 + (r - 1) sigma); returns sigma' * num_timesteps.
    t = num_timesteps maps to itself. The ratio r (see `shift_ratio`) keeps the dtype of the size
    tensors (bf16 in OpenSora's default config) while the rest runs in the dtype of `t` (fp32),
    exactly as the reference does.

    Args:
        t: timesteps [n], fp32, in [0, num_timesteps].
        height, width, num_frames: size tensors [n] (pixels, frames).

    Returns:
        shifted timesteps [n], fp32.
    """
    sigma = t / num_timesteps
    r = shift_ratio(
        height, width, num_frames, base_resolution=base_resolution, base_num_frames=base_num_frames, scale=scale
    )
    return r * sigma / (1 + (r - 1) * sigma) * num_timesteps


@dataclass(frozen=True)
class StepInfo:
    """Where one Euler step sits in the schedule.

    Attributes:
        index: 0-based step index.
        total: number of steps in the schedule.
        t: timestep fed to the model at this step (fp32 value in (0, 1000]; the model may round it
            further, e.g. to bf16).
        sigma: noise level t / 1000 of the latent fed to the model at this step.
        dt: Euler step size in sigma units; the update is z <- z + v * dt, so the next latent sits
            at sigma - dt (0 after the last step).
        exact: the model call of this step must be computed exactly: a model hook that approximates
            the model (an intra-request cache) computes it in full. Set from `RFlow.sample`'s
            ``exact_steps`` (a CHAI miss marks the steps before its last captured latent, so the stored
            latents do not depend on any approximation; a CHAI hit marks its Cache Attention steps).
    """

    index: int
    total: int
    t: float
    sigma: float
    dt: float
    exact: bool = False

    @property
    def is_last(self) -> bool:
        """True on the final step, after which the latent is clean (sigma 0)."""
        return self.index == self.total - 1


@dataclass(frozen=True)
class StepState:
    """What the step callback receives after each Euler step.

    Attributes:
        info: the step's `StepInfo` (index, total, t, sigma, dt).
        z_before: latent [n, C, T, H, W] fp32 at noise level `info.sigma`, the one fed to the model.
        z_after: latent [n, C, T, H, W] fp32 after the update (noise level sigma - dt).
        velocity: guided velocity v [n, C, T, H, W] used for the update (v_uncond + s (v_cond - v_uncond)).
    The tensors are the sampler's own: clone them if you keep them past the callback and modify them.
    """

    info: StepInfo
    z_before: torch.Tensor
    z_after: torch.Tensor
    velocity: torch.Tensor


@dataclass(frozen=True)
class RFlowSchedule:
    """A concrete RFLOW schedule: the timesteps fed to the model and the Euler step sizes.

    Attributes:
        timesteps: [S] fp32, the t of each step (decreasing, starting at 1000).
        dts: [S] fp32, the sigma step of each Euler update: (t_i - t_{i+1}) / 1000, and t_{S-1} / 1000
            on the last step, so the schedule ends exactly at sigma 0.
        num_timesteps: 1000 (t units per unit sigma).
        ratio: the shift ratio r used (None when the transform was off).
    """

    timesteps: torch.Tensor
    dts: torch.Tensor
    num_timesteps: int = NUM_TIMESTEPS
    ratio: Optional[float] = None

    def __post_init__(self):
        if self.timesteps.ndim != 1 or self.timesteps.shape != self.dts.shape or len(self.timesteps) == 0:
            raise ValueError(
                f"timesteps and dts must be equal-length 1-D tensors with at least one step, "
                f"got {tuple(self.timesteps.shape)} and {tuple(self.dts.shape)}"
            )

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def sigmas(self) -> torch.Tensor:
        """[S] fp32 noise level of the latent fed to the model at each step (t / 1000)."""
        return self.timesteps / self.num_timesteps

    def step(self, index: int) -> StepInfo:
        """`StepInfo` of step `index` (0-based; negative counts from the end). Raises IndexError."""
        total = len(self)
        if not -total <= index < total:
            raise IndexError(f"step {index} is outside a schedule of {total} steps")
        index %= total
        return StepInfo(
            index=index,
            total=total,
            t=float(self.timesteps[index]),
            sigma=float(self.timesteps[index]) / self.num_timesteps,
            dt=float(self.dts[index]),
        )

    def steps(self) -> List[StepInfo]:
        """All steps in order."""
        return [self.step(i) for i in range(len(self))]

    def nearest_index(self, t: float) -> int:
        """Index of the step whose timestep is closest to `t` (ties go to the earlier, noisier step).

        Used to pair a step of a short schedule with the step of a long one at (about) the same noise
        level, e.g. to decide which latents of a 30-step run to keep for an 8-step run.
        """
        distances = (self.timesteps.double() - float(t)).abs()
        return int(torch.argmin(distances).item())


def rflow_schedule(
    num_steps: int,
    *,
    height: int,
    width: int,
    num_frames: int,
    size_dtype: torch.dtype = torch.bfloat16,
    num_timesteps: int = NUM_TIMESTEPS,
    use_timestep_transform: bool = True,
    use_discrete_timesteps: bool = False,
    transform_scale: float = 1.0,
    fixed_shift_ratio: Optional[float] = None,
) -> RFlowSchedule:
    """Build the timesteps and step sizes OpenSora's `RFLOW.sample` uses (opensora.md section 5.2).

    Args:
        num_steps: number of Euler steps S (30 by default in OpenSora; 8 for a short schedule).
        height, width: pixel size of the video (e.g. 240, 426).
        num_frames: pixel frame count (1 = image) or a duration name such as "4s".
        size_dtype: dtype of the size tensors behind the shift ratio: torch.bfloat16 reproduces
            OpenSora's default (bf16) config exactly, torch.float32 its fp32 config.
        num_timesteps: t units for sigma = 1 (1000).
        use_timestep_transform: apply the resolution/length shift (True in OpenSora 1.2).
        use_discrete_timesteps: round the base grid to integers first (False in OpenSora 1.2).
        transform_scale: extra factor on the shift ratio (1.0).
        fixed_shift_ratio: shift with this ratio r instead of the one the size gives (an ablation knob for
            clips OpenSora's formula does not cover, e.g. the 8-frame reference model; 2.42 is what
            240p 9:16 51 frames gets); requires ``use_timestep_transform``. None (default): from the size.

    Returns:
        `RFlowSchedule` with fp32 timesteps [S] and dts [S]. 240p 9:16 51 frames 30 steps (bf16):
        1000, 985.9619, 971.3519, ..., 77.0761.

    Raises:
        ValueError: num_steps < 1, sizes the shift cannot handle, or a fixed_shift_ratio that is not a
            finite number >= 1 or comes without use_timestep_transform.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if fixed_shift_ratio is not None:
        if not use_timestep_transform:
            raise ValueError("fixed_shift_ratio needs use_timestep_transform=True")
        if not math.isfinite(float(fixed_shift_ratio)) or float(fixed_shift_ratio) < 1.0:
            raise ValueError(f"fixed_shift_ratio must be a finite number >= 1, got {fixed_shift_ratio!r}")
    base = [(1.0 - i / num_steps) * num_timesteps for i in range(num_steps)]
    if use_discrete_timesteps:
        base = [float(int(round(t))) for t in base]
    # One-element tensors: the reference computes on [n] tensors whose entries are all equal.
    ts = [torch.tensor([t], dtype=torch.float32) for t in base]
    ratio = None
    if fixed_shift_ratio is not None:
        ratio = float(fixed_shift_ratio)
        ts = [ratio * (t / num_timesteps) / (1 + (ratio - 1) * (t / num_timesteps)) * num_timesteps for t in ts]
    elif use_timestep_transform:
        cond = size_conditioning(height, width, num_frames, dtype=size_dtype)
        ratio_t = shift_ratio(cond["height"], cond["width"], cond["num_frames"], scale=transform_scale)
        ratio = float(ratio_t[0])
        ts = [
            timestep_transform(
                t, cond["height"], cond["width"], cond["num_frames"], num_timesteps=num_timesteps, scale=transform_scale
            )
            for t in ts
        ]
    dts = [(ts[i] - ts[i + 1] if i < num_steps - 1 else ts[i]) / num_timesteps for i in range(num_steps)]
    return RFlowSchedule(
        timesteps=torch.cat(ts).to(torch.float32),
        dts=torch.cat(dts).to(torch.float32),
        num_timesteps=num_timesteps,
        ratio=ratio,
    )


def make_noise(
    shape: Sequence[int],
    seed: int,
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial latent noise N(0, 1) of `shape` [n, 4, T, H, W] from `seed`.

    Drawn on the CPU with its own `torch.Generator` (the global RNG is untouched), then moved to
    `device` and cast to `dtype`, so the same seed gives the same latent on any device.
    (OpenSora itself draws bf16 noise on the GPU; its exact noise cannot be reproduced off-GPU.)

    Raises:
        ValueError: a shape with a non-positive entry.
    """
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"noise shape must have positive entries, got {shape}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


StepKwargsFn = Callable[[StepInfo, torch.Tensor], Optional[Mapping[str, Any]]]

_CURRENT_STEP: ContextVar[Optional[StepInfo]] = ContextVar("comfyui_chai_rflow_step", default=None)


def current_step() -> Optional[StepInfo]:
    """The `StepInfo` of the step whose model call `RFlow.sample` is running in this context, else None.

    Set around each model call only (a context variable: per thread and per asyncio task), so a model
    hook reads the step index, the schedule length and whether the step must be exact without the
    sampler passing anything to the model. Outside a sampler's model call it is None.
    """
    return _CURRENT_STEP.get()


@dataclass
class RFlow:
    """OpenSora 1.2's RFLOW sampler (registry name "rflow"), with OpenSora 1.2's inference defaults.

    Attributes:
        num_sampling_steps: default number of Euler steps (30).
        cfg_scale: default classifier-free guidance scale (7.0).
        num_timesteps: t units for sigma = 1 (1000).
        use_timestep_transform: shift timesteps by resolution and length (True).
        use_discrete_timesteps: round the base grid to integers (False).
        transform_scale: extra factor on the shift ratio (1.0).
    """

    num_sampling_steps: int = DEFAULT_NUM_STEPS
    cfg_scale: float = DEFAULT_CFG_SCALE
    num_timesteps: int = NUM_TIMESTEPS
    use_timestep_transform: bool = True
    use_discrete_timesteps: bool = False
    transform_scale: float = 1.0

    def schedule(
        self,
        height: int,
        width: int,
        num_frames: int,
        *,
        num_steps: Optional[int] = None,
        size_dtype: torch.dtype = torch.bfloat16,
    ) -> RFlowSchedule:
        """The schedule `sample` would use for this size; see `rflow_schedule` (num_steps defaults to
        `num_sampling_steps`)."""
        return rflow_schedule(
            self.num_sampling_steps if num_steps is None else num_steps,
            height=height,
            width=width,
            num_frames=num_frames,
            size_dtype=size_dtype,
            num_timesteps=self.num_timesteps,
            use_timestep_transform=self.use_timestep_transform,
            use_discrete_timesteps=self.use_discrete_timesteps,
            transform_scale=self.transform_scale,
        )

    def sample(
        self,
        model: Callable[..., torch.Tensor],
        z: torch.Tensor,
        *,
        y: torch.Tensor,
        y_mask: torch.Tensor,
        y_null: torch.Tensor,
        height: int,
        width: int,
        num_frames: int,
        fps: Optional[float] = None,
        size_dtype: torch.dtype = torch.bfloat16,
        num_steps: Optional[int] = None,
        cfg_scale: Optional[float] = None,
        schedule: Optional[RFlowSchedule] = None,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        step_model_kwargs: Optional[StepKwargsFn] = None,
        callback: Optional[Callable[[StepState], None]] = None,
        should_cancel: Optional[Callable[[], bool]] = None,
        exact_steps: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Denoise `z` from pure noise to a clean latent (OpenSora `RFLOW.sample` for text-to-video).

        Per step i with timestep t (fp32, one value per sample):
          1. z_in = [z; z], t_in = [t; t] ([2n]), y_in = [y; y_null];
          2. out = model(z_in, t_in, y_in, mask=y_mask, fps=, height=, width=, **model_kwargs,
             **step_model_kwargs(info, z)); the velocity is out[:, :C] (STDiT3's channels 0-3);
          3. v = v_uncond + cfg_scale * (v_cond - v_uncond) (rows 0..n-1 are the conditional branch);
          4. z <- z + v * dt.

        Args:
            model: callable ``model(x [2n,C,T,H,W], timestep [2n] fp32, y [2n,1,L,D], mask=[n,L],
                fps=[n], height=[n], width=[n], **extra) -> [2n, C or 2C, T, H, W]``, e.g. an STDiT3.
            z: initial noise [n, C, T, H, W] (any float dtype; the loop runs in fp32 as OpenSora does).
            y: conditional caption embedding [n, 1, L, D] (T5 output).
            y_mask: caption attention mask [n, L] (1 = real token); also used for the null rows.
            y_null: null caption embedding, [n, 1, L, D] or [L, D] (STDiT3's `y_embedder.y_embedding`).
            height, width: pixel size of the video (e.g. 240, 426), for the size conditioning and shift.
            num_frames: pixel frame count (1 = image) or a name such as "2s".
            fps: fps conditioning (default 24, or 120 for an image).
            size_dtype: dtype of the height/width/fps tensors given to the model and of the shift ratio:
                torch.bfloat16 as OpenSora's default config (use it with a bf16 model),
                torch.float32 for its fp32 config.
            num_steps: number of steps (default `num_sampling_steps`); ignored when `schedule` is given.
            cfg_scale: guidance scale (default `self.cfg_scale`, 7.0).
            schedule: an explicit `RFlowSchedule` to run instead of the computed one.
            model_kwargs: extra keyword arguments passed to the model at every step.
            step_model_kwargs: ``fn(info, z) -> dict or None`` called before each model call with the
                step's `StepInfo` and the latent [n, ...] about to be denoised; its dict is passed to
                the model for that step only (e.g. cached keys/values at chosen steps).
            callback: ``fn(StepState)`` called after every step with the step info, the latent before
                and after the update and the guided velocity (progress bars, latent capture).
            should_cancel: ``fn() -> bool`` checked before every step; True stops sampling.
            exact_steps: 0-based steps whose `StepInfo.exact` is True (their model call must not be
                approximated by a model hook; see `current_step`). Default: none. The sampler itself
                computes every step the same way either way.

        Returns:
            the denoised latent [n, C, T, H, W], fp32, on z's device. Runs under torch.no_grad().

        Raises:
            SamplingCancelled: `should_cancel` returned True.
            ValueError: inconsistent shapes, or extra kwargs that try to replace mask/fps/height/width.
        """
        if z.ndim != 5:
            raise ValueError(f"z must be a latent [n, C, T, H, W], got shape {tuple(z.shape)}")
        n = int(z.shape[0])
        y_null = _expand_null(y_null, y, n)
        _check_text(y, y_mask, n)
        scale = self.cfg_scale if cfg_scale is None else float(cfg_scale)
        if schedule is None:
            schedule = self.schedule(height, width, num_frames, num_steps=num_steps, size_dtype=size_dtype)
        static_kwargs = _checked_extra(model_kwargs, "model_kwargs")

        device = z.device
        cond = size_conditioning(height, width, num_frames, batch_size=n, fps=fps, dtype=size_dtype, device=device)
        y_in = torch.cat([y, y_null.to(device=y.device, dtype=y.dtype)], 0).to(device)
        y_mask = y_mask.to(device)
        timesteps = schedule.timesteps.to(device)
        dts = schedule.dts.to(device)

        # OpenSora's loop runs in fp32 (its bf16 noise is promoted before the first model call).
        z = z.to(torch.float32)
        exact = frozenset(int(i) for i in exact_steps) if exact_steps else frozenset()
        with torch.no_grad():
            return self._loop(model, z, y_in, y_mask, cond, timesteps, dts, schedule, scale, static_kwargs,
                              step_model_kwargs, callback, should_cancel, exact)

    def _loop(self, model, z, y_in, y_mask, cond, timesteps, dts, schedule, scale, static_kwargs,
              step_model_kwargs, callback, should_cancel, exact) -> torch.Tensor:
        n, channels = int(z.shape[0]), int(z.shape[1])
        total = len(schedule)
        for i in range(total):
            if should_cancel is not None and should_cancel():
                raise SamplingCancelled(i, total)
            info = schedule.step(i)
            if i in exact:
                info = replace(info, exact=True)
            t = timesteps[i].reshape(1).repeat(n)
            kwargs: Dict[str, Any] = {
                "mask": y_mask,
                "fps": cond["fps"],
                "height": cond["height"],
                "width": cond["width"],
            }
            kwargs.update(static_kwargs)
            if step_model_kwargs is not None:
                kwargs.update(_checked_extra(step_model_kwargs(info, z), "step_model_kwargs"))

            token = _CURRENT_STEP.set(info)
            try:
                out = model(torch.cat([z, z], 0), torch.cat([t, t], 0), y_in, **kwargs)
            finally:
                _CURRENT_STEP.reset(token)
            if (
                not isinstance(out, torch.Tensor)
                or out.ndim != 5
                or out.shape[0] != 2 * n
                or out.shape[1] not in (channels, 2 * channels)
                or out.shape[2:] != z.shape[2:]
            ):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"model returned {got}; expected [{2 * n}, {channels} or {2 * channels}, {', '.join(map(str, z.shape[2:]))}]"
                )
            velocity = out[:, :channels]
            v_cond, v_uncond = velocity.chunk(2, dim=0)
            v = v_uncond + scale * (v_cond - v_uncond)
            dt = dts[i].reshape(1).repeat(n)[:, None, None, None, None]
            z_next = z + v * dt
            if callback is not None:
                callback(StepState(info=info, z_before=z, z_after=z_next, velocity=v))
            z = z_next
        return z


def _expand_null(y_null: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    if y.ndim != 4 or y.shape[0] != n or y.shape[1] != 1:
        raise ValueError(f"y must be the caption embedding [n={n}, 1, L, D], got shape {tuple(y.shape)}")
    if y_null.ndim == 2:
        y_null = y_null[None, None].expand(n, 1, *y_null.shape)
    if tuple(y_null.shape) != tuple(y.shape):
        raise ValueError(
            f"y_null must be [L, D] or match y {tuple(y.shape)}, got {tuple(y_null.shape)}; the null embedding "
            "is STDiT3's y_embedder.y_embedding and its length must equal the text length (model_max_length)"
        )
    return y_null


def _check_text(y: torch.Tensor, y_mask: torch.Tensor, n: int) -> None:
    if y_mask.ndim != 2 or y_mask.shape[0] != n or y_mask.shape[1] != y.shape[2]:
        raise ValueError(f"y_mask must be [n={n}, L={y.shape[2]}], got shape {tuple(y_mask.shape)}")
    if bool((y_mask.sum(dim=1) == 0).any()):
        raise ValueError("every prompt needs at least one real token in y_mask (the T5 end-of-text token counts)")


def _checked_extra(extra: Optional[Mapping[str, Any]], where: str) -> Dict[str, Any]:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"{where} must be a mapping of keyword arguments, got {type(extra).__name__}")
    clash = [k for k in extra if k in _CORE_KWARGS]
    if clash:
        raise ValueError(f"{where} may not replace {', '.join(clash)}: the sampler sets {', '.join(_CORE_KWARGS)} itself")
    return dict(extra)

