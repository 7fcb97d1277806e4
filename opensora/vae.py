"""OpenSora 1.2 video VAE ("OpenSoraVAE_V1_2" / ``VideoAutoencoderPipeline``), clean-room.

Two stages, encoder side first:

1. **Spatial**: diffusers ``AutoencoderKL`` with the SDXL-VAE architecture, frame by frame,
   8x down in H and W; latents scaled by the hard-coded 0.18215 (not the config's 0.13025).
   Frames are processed in micro-batches of ``micro_batch_size`` (4) to bound memory only.
2. **Temporal**: ``VAETemporal`` (``vae_temporal.py``), 4x down in time, applied to independent
   chunks of ``micro_frame_size`` = 17 frames (-> 5 latent frames); the chunking is part of the
   model (each chunk gets its own causal front padding), not only a memory device.
3. Per-channel normalisation: ``z = (z_raw - shift) / scale``.

Module names match ``hpcai-tech/OpenSora-VAE-v1.2`` ``model.safetensors`` (``scale``, ``shift``,
``spatial_vae.module.*``, ``temporal_vae.*``; 517 tensors) so it loads with ``strict=True``.
Nothing is downloaded: the AutoencoderKL is built from a config dict held in this file.

Source: OpenSora v1.2.0 (commit 17cce908) ``opensora/models/vae/vae.py``; facts restated in
``reference/opensora.md`` sections 3 and 6.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .vae_temporal import VAE_TEMPORAL_SD_CONFIG, VAETemporal, causal_time_padding

__all__ = [
    "SDXL_VAE_CONFIG",
    "OPENSORA_VAE_SHIFT",
    "OPENSORA_VAE_SCALE",
    "SPATIAL_SCALING_FACTOR",
    "MICRO_FRAME_SIZE",
    "MICRO_BATCH_SIZE",
    "latent_frames",
    "latent_shape",
    "build_spatial_autoencoder",
    "SpatialVAE",
    "OpenSoraVAE",
]

#: diffusers ``AutoencoderKL`` config of the SDXL VAE (``PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers``,
#: subfolder ``vae``), the 2D half of OpenSora-VAE-v1.2. ``scaling_factor`` is recorded but unused:
#: OpenSora scales by ``SPATIAL_SCALING_FACTOR``.
SDXL_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": False,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.13025,
}

#: Per-channel latent normalisation of OpenSora-VAE-v1.2 (buffers ``shift`` / ``scale``, shape [1,4,1,1,1]).
OPENSORA_VAE_SHIFT: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
OPENSORA_VAE_SCALE: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)
#: Spatial latent scaling hard-coded in OpenSora's ``VideoAutoencoderKL`` (encode multiplies, decode divides).
SPATIAL_SCALING_FACTOR = 0.18215
#: Pixel frames per independent temporal chunk (-> 5 latent frames).
MICRO_FRAME_SIZE = 17
#: Frames per 2D-VAE call (memory only; results do not depend on it).
MICRO_BATCH_SIZE = 4

_PIXART_SDXL_VAE_ID = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
# Keys of a transformers-saved config.json that carry no architecture information.
_HF_BOOKKEEPING_KEYS = {"architectures", "torch_dtype", "transformers_version", "model_type", "_name_or_path"}


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def latent_frames(
    num_frames: int,
    micro_frame_size: int | None = MICRO_FRAME_SIZE,
    time_downsample_factor: int = 4,
) -> int:
    """Number of latent frames OpenSora's VAE gives for ``num_frames`` pixel frames.

    Whole chunks of ``micro_frame_size`` frames give ``ceil(micro_frame_size / f)`` latent frames
    each; the remainder r gives ``ceil(r / f)`` (f = ``time_downsample_factor``). For v1.2
    (17, 4): ``5 * (N // 17) + ceil((N % 17) / 4)``, e.g. 51 -> 15, 102 -> 30, 1 -> 1.
    ``micro_frame_size=None`` means one chunk: ``ceil(N / f)``.

    Raises:
        ValueError: if an argument is not a positive int (or None for ``micro_frame_size``).

    Source: ``VideoAutoencoderPipeline.get_latent_size`` and ``VAE_Temporal.get_latent_size``.
    """
    _positive_int(num_frames, "num_frames")
    _positive_int(time_downsample_factor, "time_downsample_factor")

    def one_chunk(n: int) -> int:
        return (n + causal_time_padding(n, time_downsample_factor)) // time_downsample_factor

    if micro_frame_size is None:
        return one_chunk(num_frames)
    _positive_int(micro_frame_size, "micro_frame_size")
    full, rest = divmod(num_frames, micro_frame_size)
    return full * one_chunk(micro_frame_size) + (one_chunk(rest) if rest else 0)


def latent_shape(
    num_frames: int,
    height: int,
    width: int,
    *,
    latent_channels: int = 4,
    micro_frame_size: int | None = MICRO_FRAME_SIZE,
    time_downsample_factor: int = 4,
    spatial_downsample_factor: int = 8,
) -> tuple[int, int, int, int]:
    """Latent shape (C, T_lat, H_lat, W_lat) for a video of ``num_frames`` x ``height`` x ``width`` pixels.

    Defaults are OpenSora-VAE-v1.2: C = 4, T_lat = ``latent_frames(num_frames)``, H_lat = height // 8,
    W_lat = width // 8 (floor: a 426-wide video has 53 latent columns and decodes 424 wide).
    Examples: (51, 240, 426) -> (4, 15, 30, 53); (102, 720, 1280) -> (4, 30, 90, 160).

    Raises:
        ValueError: if an argument is not a positive int or height/width is smaller than the
            spatial downsample factor (it would give an empty latent).

    Source: ``VideoAutoencoderPipeline.get_latent_size`` (OpenSora v1.2.0).
    """
    _positive_int(latent_channels, "latent_channels")
    _positive_int(spatial_downsample_factor, "spatial_downsample_factor")
    for name, value in (("height", height), ("width", width)):
        _positive_int(value, name)
        if value < spatial_downsample_factor:
            raise ValueError(
                f"{name}={value} is smaller than the VAE's spatial factor {spatial_downsample_factor}; "
                f"use at least {spatial_downsample_factor} pixels (OpenSora sizes are multiples of 8)"
            )
    t_lat = latent_frames(num_frames, micro_frame_size, time_downsample_factor)
    return (latent_channels, t_lat, height // spatial_downsample_factor, width // spatial_downsample_factor)


def build_spatial_autoencoder(config: Mapping[str, Any] | None = None):
    """Build a diffusers ``AutoencoderKL`` from a config dict (default: ``SDXL_VAE_CONFIG``); no download.

    Weights are diffusers' random init; load a checkpoint afterwards. Honours an enclosing
    ``torch.device(...)`` context (e.g. ``"meta"``).

    Args:
        config: AutoencoderKL config, e.g. ``vae_pipeline_tiny_config.json['spatial_autoencoderkl_config']``.

    Returns:
        ``diffusers.AutoencoderKL``.

    Raises:
        ValueError: if ``config`` names a class other than AutoencoderKL.
        ImportError: if diffusers is not installed (``pip install diffusers``).
    """
    from diffusers import AutoencoderKL  # imported lazily: diffusers takes seconds to import

    cfg = dict(SDXL_VAE_CONFIG if config is None else config)
    cls_name = cfg.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
        raise ValueError(f"spatial VAE config must describe an AutoencoderKL, got _class_name={cls_name!r}")
    return AutoencoderKL.from_config(cfg)


class SpatialVAE(nn.Module):
    """Frame-wise 2D VAE of OpenSora (``VideoAutoencoderKL``): a diffusers AutoencoderKL at ``.module``.

    Args:
        config: AutoencoderKL config dict (default ``SDXL_VAE_CONFIG``).
        micro_batch_size: frames per AutoencoderKL call (None = all at once). Memory only; it
            can be changed at any time through the attribute of the same name.
        scaling_factor: latent scale (OpenSora: 0.18215).

    Frames are flattened batch-major as (B*T) before micro-batching, as in the official code.

    Raises:
        ValueError: on a non-positive ``micro_batch_size``.

    Source: ``VideoAutoencoderKL`` in ``opensora/models/vae/vae.py`` (OpenSora v1.2.0).
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        micro_batch_size: int | None = MICRO_BATCH_SIZE,
        scaling_factor: float = SPATIAL_SCALING_FACTOR,
    ) -> None:
        super().__init__()
        self.module = build_spatial_autoencoder(config)
        self.micro_batch_size = micro_batch_size
        self.scaling_factor = float(scaling_factor)
        cfg = self.module.config
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(cfg.out_channels)
        self.latent_channels = int(cfg.latent_channels)
        # one stride-2 downsampler per level except the last
        self.spatial_downsample_factor = 2 ** (len(cfg.block_out_channels) - 1)

    @property
    def micro_batch_size(self) -> int | None:
        """Frames per AutoencoderKL call, or None for all frames in one call."""
        return self._micro_batch_size

    @micro_batch_size.setter
    def micro_batch_size(self, value: int | None) -> None:
        if value is not None:
            _positive_int(value, "micro_batch_size")
        self._micro_batch_size = value

    def _frame_batches(self, frames: torch.Tensor):
        step = self.micro_batch_size or frames.shape[0]
        for i in range(0, frames.shape[0], step):
            yield frames[i : i + step]

    @staticmethod
    def _to_frames(x: torch.Tensor) -> torch.Tensor:
        # [B, C, T, H, W] -> [(B T), C, H, W], batch-major
        b, c, t, h, w = x.shape
        return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)

    @staticmethod
    def _from_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
        bt, c, h, w = x.shape
        return x.reshape(batch, bt // batch, c, h, w).permute(0, 2, 1, 3, 4)

    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels -> scaled spatial latents.

        Args:
            x: [B, in_channels, T, H, W], values in [-1, 1], model dtype/device.
            sample: draw from the posterior (official behaviour) or take its mode (mean).
            generator: RNG for the draw (None = global RNG), used micro-batch by micro-batch.

        Returns:
            [B, latent_channels, T, H // f, W // f] * ``scaling_factor`` (f = spatial factor, 8).
        """
        batch = x.shape[0]
        out = []
        for frames in self._frame_batches(self._to_frames(x)):
            dist = self.module.encode(frames).latent_dist
            z = dist.sample(generator=generator) if sample else dist.mode()
            out.append(z * self.scaling_factor)
        return self._from_frames(torch.cat(out, dim=0), batch)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled spatial latents [B, latent_channels, T, h, w] -> pixels [B, out_channels, T, h*f, w*f]."""
        batch = z.shape[0]
        out = [self.module.decode(frames / self.scaling_factor).sample for frames in self._frame_batches(self._to_frames(z))]
        return self._from_frames(torch.cat(out, dim=0), batch)


class OpenSoraVAE(nn.Module):
    """OpenSora 1.2 video VAE: SDXL 2D VAE + causal temporal VAE + per-channel shift/scale.

    Default arguments give the full ``OpenSoraVAE_V1_2`` (393,341,015 state_dict elements, 517 tensors),
    whose ``state_dict`` keys equal those of ``hpcai-tech/OpenSora-VAE-v1.2`` ``model.safetensors``.
    Build on ``torch.device("meta")`` and load with ``load_state_dict(sd, strict=True, assign=True)``
    to avoid allocating random weights first.

    Args:
        spatial_config: AutoencoderKL config dict (default ``SDXL_VAE_CONFIG``).
        temporal_config: ``VAETemporal`` kwargs, or an official registry dict with ``"type"``
            (default ``VAE_TEMPORAL_SD_CONFIG``).
        micro_frame_size: pixel frames per independent temporal chunk (17), or None for one chunk.
            Changing it changes the result (it is part of the model).
        micro_batch_size: frames per 2D-VAE call (4); memory only, settable later as
            ``vae.spatial_vae.micro_batch_size``.
        shift, scale: per-channel latent normalisation (C floats, or one float for all channels).
        spatial_scaling_factor: 2D latent scale (0.18215).

    Inference only: wrap calls in ``torch.inference_mode()`` (or ``no_grad``) so the chunking and
    micro-batching actually bound memory.

    Children/buffers: ``spatial_vae`` (``SpatialVAE``, AutoencoderKL at ``spatial_vae.module``),
    ``temporal_vae`` (``VAETemporal``), buffers ``scale`` and ``shift`` [1, C, 1, 1, 1] (persistent).

    Raises:
        ValueError: if the 2D latent channels differ from the temporal VAE's input channels, or
            shift/scale do not have one value per latent channel, or a size is not a positive int.

    Source: ``VideoAutoencoderPipeline`` / ``OpenSoraVAE_V1_2`` in ``opensora/models/vae/vae.py``.
    """

    def __init__(
        self,
        spatial_config: Mapping[str, Any] | None = None,
        temporal_config: Mapping[str, Any] | None = None,
        micro_frame_size: int | None = MICRO_FRAME_SIZE,
        micro_batch_size: int | None = MICRO_BATCH_SIZE,
        shift: float | Sequence[float] = OPENSORA_VAE_SHIFT,
        scale: float | Sequence[float] = OPENSORA_VAE_SCALE,
        spatial_scaling_factor: float = SPATIAL_SCALING_FACTOR,
    ) -> None:
        super().__init__()
        if micro_frame_size is not None:
            _positive_int(micro_frame_size, "micro_frame_size")
        self.spatial_vae = SpatialVAE(spatial_config, micro_batch_size, spatial_scaling_factor)
        self.temporal_vae = VAETemporal.from_config(
            dict(VAE_TEMPORAL_SD_CONFIG) if temporal_config is None else temporal_config
        )
        if self.spatial_vae.latent_channels != self.temporal_vae.out_channels:
            raise ValueError(
                f"the 2D VAE has {self.spatial_vae.latent_channels} latent channels but the temporal VAE "
                f"takes in_out_channels={self.temporal_vae.out_channels}; make them equal"
            )
        self.micro_frame_size = micro_frame_size
        self.micro_z_frame_size = (
            None if micro_frame_size is None else self.temporal_vae.latent_frames(micro_frame_size)
        )
        channels = self.temporal_vae.latent_channels
        self.out_channels = channels
        self.register_buffer("scale", self._per_channel(scale, channels, "scale"))
        self.register_buffer("shift", self._per_channel(shift, channels, "shift"))
        self.config: dict[str, Any] = {
            "spatial_config": dict(self.spatial_vae.module.config),
            "temporal_config": dict(self.temporal_vae.config),
            "micro_frame_size": micro_frame_size,
            "micro_batch_size": micro_batch_size,
            "shift": list(_floats(shift, channels, "shift")),
            "scale": list(_floats(scale, channels, "scale")),
            "spatial_scaling_factor": float(spatial_scaling_factor),
        }

    @staticmethod
    def _per_channel(values: float | Sequence[float], channels: int, name: str) -> torch.Tensor:
        return torch.tensor(_floats(values, channels, name), dtype=torch.float32).reshape(1, channels, 1, 1, 1)

    @classmethod
    def from_official_config(
        cls, pipeline_config: Mapping[str, Any], spatial_config: Mapping[str, Any] | None = None
    ) -> "OpenSoraVAE":
        """Build from an official ``VideoAutoencoderPipelineConfig``-shaped dict (no download).

        Accepts the ``pipeline_kwargs`` of ``vae_pipeline_tiny_config.json``, the ``pipeline_config`` of
        ``vae_v1_2_state_dict.json`` or the hub's ``config.json``: keys ``vae_2d`` (``micro_batch_size``,
        optional ``scaling_factor``; ``from_pretrained`` only names the 2D architecture), ``vae_temporal``
        (see ``VAETemporal.from_config``), ``micro_frame_size``, ``shift``, ``scale``, and the inert
        ``freeze_vae_2d``, ``cal_loss`` (must be false), ``from_pretrained`` (must be None).

        Args:
            pipeline_config: the dict above.
            spatial_config: AutoencoderKL config; may be omitted only when ``vae_2d.from_pretrained``
                is the PixArt SDXL-VAE id (then ``SDXL_VAE_CONFIG`` is used).

        Raises:
            ValueError: on unknown keys, a training-only setting, weights requested through the config,
                or a 2D VAE whose architecture is not given.
        """
        cfg = {k: v for k, v in pipeline_config.items() if k not in _HF_BOOKKEEPING_KEYS}
        allowed = {"vae_2d", "vae_temporal", "micro_frame_size", "shift", "scale", "freeze_vae_2d", "cal_loss", "from_pretrained", "use_scale_shift"}
        unknown = set(cfg) - allowed
        if unknown:
            raise ValueError(f"unknown VAE pipeline config keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        if cfg.get("cal_loss"):
            raise ValueError("cal_loss=True is a training mode; this VAE is inference-only, set it to false")
        if cfg.get("use_scale_shift", True) is not True:
            raise ValueError("use_scale_shift=False is not an OpenSora 1.2 setting; remove it")
        if cfg.get("from_pretrained") is not None:
            raise ValueError(
                f"from_pretrained={cfg['from_pretrained']!r}: build the architecture here, then load the "
                "safetensors file with load_state_dict(strict=True)"
            )
        vae_2d = dict(cfg.get("vae_2d") or {})
        kind = vae_2d.pop("type", "VideoAutoencoderKL")
        if kind != "VideoAutoencoderKL":
            raise ValueError(f"vae_2d type {kind!r} is not supported; OpenSora 1.2 uses 'VideoAutoencoderKL'")
        pretrained_2d = vae_2d.pop("from_pretrained", None)
        for inert in ("subfolder", "local_files_only", "cache_dir"):
            vae_2d.pop(inert, None)
        micro_batch_size = vae_2d.pop("micro_batch_size", None)
        scaling_factor = vae_2d.pop("scaling_factor", SPATIAL_SCALING_FACTOR)
        if vae_2d:
            raise ValueError(f"unknown vae_2d keys {sorted(vae_2d)}")
        if spatial_config is None:
            if pretrained_2d != _PIXART_SDXL_VAE_ID:
                raise ValueError(
                    f"vae_2d.from_pretrained={pretrained_2d!r} is not the SDXL VAE this module knows; "
                    "pass its AutoencoderKL config as spatial_config"
                )
            spatial_config = SDXL_VAE_CONFIG
        temporal = cfg.get("vae_temporal")
        if temporal is None:
            raise ValueError("the pipeline config has no 'vae_temporal' entry")
        return cls(
            spatial_config=spatial_config,
            temporal_config=temporal,
            micro_frame_size=cfg.get("micro_frame_size"),
            micro_batch_size=micro_batch_size,
            shift=cfg.get("shift", 0.0),
            scale=cfg.get("scale", 1.0),
            spatial_scaling_factor=scaling_factor,
        )

    # ---------------------------------------------------------------- sizes
    @property
    def time_downsample_factor(self) -> int:
        """Time compression inside one chunk (4 for v1.2)."""
        return self.temporal_vae.time_downsample_factor

    @property
    def spatial_downsample_factor(self) -> int:
        """Height/width compression (8 for v1.2)."""
        return self.spatial_vae.spatial_downsample_factor

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters (inputs are cast to it)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """device of the parameters (inputs are moved to it)."""
        return next(self.parameters()).device

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` pixel frames under this VAE's chunking (see ``latent_frames``)."""
        return latent_frames(num_frames, self.micro_frame_size, self.time_downsample_factor)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T_lat, H_lat, W_lat) for a ``num_frames`` x ``height`` x ``width`` video (see ``latent_shape``)."""
        return latent_shape(
            num_frames,
            height,
            width,
            latent_channels=self.out_channels,
            micro_frame_size=self.micro_frame_size,
            time_downsample_factor=self.time_downsample_factor,
            spatial_downsample_factor=self.spatial_downsample_factor,
        )

    # ---------------------------------------------------------------- encode / decode
    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Video -> normalised latent.

        Steps: 2D encode per frame (posterior draw x 0.18215, micro-batches of ``micro_batch_size``),
        then each chunk of ``micro_frame_size`` frames through the temporal VAE independently
        (front-padded to a multiple of 4 frames, posterior draw), concatenate on T, ``(z - shift) / scale``.

        Args:
            x: [B, 3, T, H, W] pixels in [-1, 1]; cast to the model's dtype and device.
            sample: draw from both posteriors (official behaviour) or use their means (deterministic).
            generator: RNG for the draws (None = global RNG; the official code uses the global RNG,
                2D draws first, then one temporal draw per chunk).

        Returns:
            [B, C, T_lat, H // 8, W // 8] in the model dtype, T_lat = ``self.latent_frames(T)``.

        Raises:
            ValueError: if x is not [B, 3, T, H, W] with H and W at least the spatial factor.
        """
        self._check(x, self.spatial_vae.in_channels, "x", min_hw=self.spatial_downsample_factor)
        x = x.to(device=self.device, dtype=self.dtype)
        x_z = self.spatial_vae.encode(x, sample=sample, generator=generator)
        step = self.micro_frame_size or x_z.shape[2]
        chunks = []
        for i in range(0, x_z.shape[2], step):
            posterior = self.temporal_vae.encode(x_z[:, :, i : i + step])
            chunks.append(posterior.sample(generator) if sample else posterior.mode())
        z = torch.cat(chunks, dim=2)
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latent -> video.

        Steps: ``z * scale + shift``; chunks of ``micro_z_frame_size`` (5) latent frames decoded
        independently by the temporal VAE into ``min(17, frames left)`` frames each (causal front
        frames dropped); concatenate; 2D decode of ``/ 0.18215`` in micro-batches of frames.

        Args:
            z: [B, C, T_lat, h, w]; cast to the model's dtype and device (as the driver does).
            num_frames: pixel frames wanted; ``self.latent_frames(num_frames)`` must equal T_lat.

        Returns:
            [B, 3, num_frames, 8h, 8w] in the model dtype, roughly in [-1, 1] (not clamped).

        Raises:
            ValueError: on a wrong latent shape or a ``num_frames`` that does not match T_lat.
        """
        self._check(z, self.out_channels, "z", min_hw=1)
        _positive_int(num_frames, "num_frames")
        expected = self.latent_frames(num_frames)
        if expected != z.shape[2]:
            raise ValueError(
                f"num_frames={num_frames} corresponds to {expected} latent frames but z has {z.shape[2]}; "
                "pass the num_frames the latent was made for (see latent_frames)"
            )
        z = z.to(device=self.device, dtype=self.dtype)
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        if self.micro_frame_size is None:
            x_z = self.temporal_vae.decode(z, num_frames=num_frames)
        else:
            parts, left = [], num_frames
            for i in range(0, z.shape[2], self.micro_z_frame_size):
                parts.append(self.temporal_vae.decode(z[:, :, i : i + self.micro_z_frame_size], num_frames=min(self.micro_frame_size, left)))
                left -= self.micro_frame_size
            x_z = torch.cat(parts, dim=2)
        return self.spatial_vae.decode(x_z)

    def forward(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruct a video: ``decode(encode(x), num_frames=T)``.

        ``x`` [B, 3, T, H, W] -> [B, 3, T, 8 * (H // 8), 8 * (W // 8)]; posterior means unless ``sample``.
        """
        z = self.encode(x, sample=sample, generator=generator)
        return self.decode(z, num_frames=x.shape[2])

    @staticmethod
    def _check(t: torch.Tensor, channels: int, name: str, min_hw: int) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() != 5:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 5D tensor [B, {channels}, T, H, W], got {shape}")
        b, c, t_, h, w = t.shape
        if c != channels or b < 1 or t_ < 1 or h < min_hw or w < min_hw:
            raise ValueError(
                f"{name} must be [B, {channels}, T, H, W] with B, T >= 1 and H, W >= {min_hw}, got {tuple(t.shape)}"
            )


def _floats(values: float | Sequence[float], channels: int, name: str = "value") -> tuple[float, ...]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return (float(values),) * channels
    out = tuple(float(v) for v in values)
    if len(out) != channels:
        raise ValueError(f"{name} needs one value per latent channel ({channels}), got {len(out)}")
    return out
