"""The 2D KL autoencoder of Stable Diffusion / SDXL (the spatial half of OpenSora-VAE-v1.2), clean-room.

OpenSora 1.2 builds it as diffusers' ``AutoencoderKL`` with the SDXL-VAE configuration
(``PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers``, subfolder ``vae``). This module restates that
architecture so the pack needs no diffusers: the same configuration keys, the same parameter names and
shapes (a diffusers-format checkpoint loads with ``strict=True``), the same computation.

Architecture (facts restated from the public configuration and checkpoint layout):

* **ResnetBlock2D**: GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, plus the input (a 1x1
  ``conv_shortcut`` when the widths differ); GroupNorm eps 1e-6.
* **Mid block**: resnet, single-head self-attention over the H*W positions (GroupNorm, ``to_q``/``to_k``/
  ``to_v``/``to_out.0`` linear layers with bias, residual), resnet.
* **Encoder**: ``conv_in`` -> per width of ``block_out_channels`` ``layers_per_block`` resnets, then (all
  but the last level) a stride-2 conv3x3 after zero-padding right and bottom by one -> mid block ->
  GroupNorm, SiLU, ``conv_out`` to 2 x ``latent_channels`` (mean and log-variance) -> ``quant_conv`` (1x1).
* **Decoder**: ``post_quant_conv`` (1x1) -> ``conv_in`` -> mid block -> per width, widest first,
  ``layers_per_block + 1`` resnets, then (all but the last level) nearest 2x upsampling and a conv3x3 ->
  GroupNorm, SiLU, ``conv_out``.
* **Posterior**: diagonal Gaussian, log-variance clamped to [-30, 20]; ``sample`` draws N(0, 1) on the
  generator's device (the global RNG without one) in the moments' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "DiagonalGaussian", "EncoderOutput", "DecoderOutput"]

_EPS = 1e-6
#: Configuration keys and their defaults (diffusers' names; keys that change nothing here are kept as given).
_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [64],
    "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"], "layers_per_block": 1,
    "act_fn": "silu", "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}


class AutoencoderKLConfig(dict):
    """The configuration as a dict whose keys also read as attributes (``config.latent_channels``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _config(config: Optional[Mapping[str, Any]]) -> AutoencoderKLConfig:
    cfg = AutoencoderKLConfig({**_DEFAULTS, **{k: v for k, v in dict(config or {}).items() if not k.startswith("_")}})
    widths = list(cfg.block_out_channels)
    if not widths or any(int(w) < 1 for w in widths):
        raise ValueError(f"block_out_channels must be positive widths, got {cfg.block_out_channels!r}")
    if cfg.act_fn != "silu":
        raise ValueError(f"only act_fn 'silu' (the SD/SDXL VAE's) is supported, got {cfg.act_fn!r}")
    if list(cfg.down_block_types) != ["DownEncoderBlock2D"] * len(widths) or \
            list(cfg.up_block_types) != ["UpDecoderBlock2D"] * len(widths):
        raise ValueError("down_block_types / up_block_types must be DownEncoderBlock2D / UpDecoderBlock2D, one per "
                         f"width of block_out_channels {widths}")
    groups = int(cfg.norm_num_groups)
    if any(int(w) % groups for w in widths):
        raise ValueError(f"every width of block_out_channels {widths} must be a multiple of norm_num_groups {groups}")
    if int(cfg.layers_per_block) < 1:
        raise ValueError(f"layers_per_block must be >= 1, got {cfg.layers_per_block}")
    cfg["block_out_channels"] = [int(w) for w in widths]
    return cfg


class ResnetBlock2D(nn.Module):
    """GroupNorm/SiLU/conv3x3 twice plus the (1x1-projected when widths differ) input. [B, in, H, W] -> [B, out, H, W]."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention2D(nn.Module):
    """Single-head self-attention over the H*W positions, with a GroupNorm in front and the input added back."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]
        out = self.to_out[1](self.to_out[0](out))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock2D(nn.Module):
    """resnet -> self-attention -> resnet at the widest level (``mid_block_add_attention`` False: no attention)."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        # Built resnet, attention, resnet (the reference's order of initialisation), registered attentions
        # first (the checkpoint's key order).
        first = ResnetBlock2D(channels, channels, groups)
        attentions = [SelfAttention2D(channels, groups)] if attention else []
        self.attentions = nn.ModuleList(attentions)
        self.resnets = nn.ModuleList([first, ResnetBlock2D(channels, channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 conv3x3: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest 2x upsampling, then a conv3x3: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One width of the encoder (``resnets``, ``downsamplers``) or decoder (``resnets``, ``upsamplers``)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, resample: Optional[str]) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
                                     for i in range(layers))
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resample in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
            x = resample(x)
        return x


class Encoder(nn.Module):
    """Pixels [B, in_channels, H, W] -> moments [B, 2 * latent_channels, H/f, W/f] (f = 2^(levels - 1))."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        widths, groups = cfg.block_out_channels, int(cfg.norm_num_groups)
        self.conv_in = nn.Conv2d(int(cfg.in_channels), widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _Level(widths[max(i - 1, 0)], w, int(cfg.layers_per_block), groups, "down" if i < len(widths) - 1 else None)
            for i, w in enumerate(widths))
        self.mid_block = MidBlock2D(widths[-1], groups, bool(cfg.mid_block_add_attention))
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * int(cfg.latent_channels), 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latents [B, latent_channels, h, w] -> pixels [B, out_channels, h*f, w*f]."""

    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        widths, groups = cfg.block_out_channels, int(cfg.norm_num_groups)
        self.conv_in = nn.Conv2d(int(cfg.latent_channels), widths[-1], 3, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before the mid block (the checkpoint's key order) ...
        self.mid_block = MidBlock2D(widths[-1], groups, bool(cfg.mid_block_add_attention))
        reversed_widths = widths[::-1]
        self.up_blocks.extend(  # ... and built after it (the reference's order of initialisation)
            _Level(reversed_widths[max(i - 1, 0)], w, int(cfg.layers_per_block) + 1, groups,
                   "up" if i < len(widths) - 1 else None)
            for i, w in enumerate(reversed_widths))
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[0], int(cfg.out_channels), 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) of moments [B, 2C, h, w] (log-variance clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * N(0, 1), drawn on the generator's device (else the mean's) in the mean's dtype."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The mean [B, C, h, w]."""
        return self.mean


@dataclass
class EncoderOutput:
    """``AutoencoderKL.encode``'s result: the posterior."""

    latent_dist: DiagonalGaussian


@dataclass
class DecoderOutput:
    """``AutoencoderKL.decode``'s result: pixels [B, out_channels, H, W]."""

    sample: torch.Tensor


class AutoencoderKL(nn.Module):
    """The SD/SDXL 2D VAE (see the module docstring), built from a diffusers-style configuration.

    Args:
        config: configuration keys (``block_out_channels``, ``layers_per_block``, ``latent_channels``,
            ``norm_num_groups``, ...; diffusers' names, missing keys take diffusers' defaults, keys starting
            with ``_`` are ignored). Weights are PyTorch's default initialisation; load a checkpoint after.

    Attributes:
        config: :class:`AutoencoderKLConfig` (every key, defaults filled in).

    Raises:
        ValueError: an activation other than SiLU, block types other than the SD VAE's, or widths that are not
            multiples of ``norm_num_groups`` (the message names the key).
    """

    def __init__(self, config: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        self.config = _config(config)
        latent = int(self.config.latent_channels)
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if self.config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if self.config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        """Pixels [B, in_channels, H, W] (in [-1, 1]) -> the posterior over [B, latent_channels, H/f, W/f]."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return EncoderOutput(latent_dist=DiagonalGaussian(moments))

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        """Latents [B, latent_channels, h, w] -> pixels [B, out_channels, h*f, w*f] (about [-1, 1])."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return DecoderOutput(sample=self.decoder(z))
