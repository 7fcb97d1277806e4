"""Causal 3D temporal VAE of OpenSora 1.2 (the `VAE_Temporal` / `VAE_Temporal_SD` equivalent), clean-room.

It compresses the *time* axis of a sequence of 2D-VAE latents by ``2 ** sum(temporal_downsample)``
(4 for OpenSora 1.2) and leaves height and width alone. Convolutions are causal in time: each one
zero-pads only the front of the time axis, so output frame t depends on input frames <= t.

Source: OpenSora v1.2.0 (commit 17cce908), ``opensora/models/vae/vae_temporal.py`` and
``opensora/models/vae/utils.py``; facts restated in ``reference/opensora.md`` section 3.3.
Module and parameter names follow the official checkpoint (prefix ``temporal_vae.`` inside
``hpcai-tech/OpenSora-VAE-v1.2``), so its tensors load with ``strict=True``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VAE_TEMPORAL_SD_CONFIG",
    "CausalConv3d",
    "TemporalResBlock",
    "TemporalEncoder",
    "TemporalDecoder",
    "DiagonalGaussian",
    "VAETemporal",
    "causal_time_padding",
]

#: Constructor kwargs of the official ``VAE_Temporal_SD`` (the temporal half of OpenSora-VAE-v1.2).
VAE_TEMPORAL_SD_CONFIG: dict[str, Any] = {
    "in_out_channels": 4,
    "latent_embed_dim": 4,
    "embed_dim": 4,
    "filters": 128,
    "num_res_blocks": 4,
    "channel_multipliers": (1, 2, 2, 4),
    "temporal_downsample": (False, True, True),
    "num_groups": 32,
    "activation_fn": "swish",
}

_ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU}


def causal_time_padding(num_frames: int, time_downsample_factor: int) -> int:
    """Frames of zeros put in front of a clip so its length divides ``time_downsample_factor``.

    Args:
        num_frames: frames in the clip (int >= 1).
        time_downsample_factor: the VAE's time compression (int >= 1, 4 for OpenSora 1.2).

    Returns:
        ``(f - num_frames % f) % f``: 3 for 17 frames at factor 4, 0 for 16.

    Raises:
        ValueError: if either argument is not a positive int.

    Source: ``VAE_Temporal.encode`` / ``decode`` (OpenSora v1.2.0).
    """
    for name, value in (("num_frames", num_frames), ("time_downsample_factor", time_downsample_factor)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return (-num_frames) % time_downsample_factor


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"{name} must be an int or 3 ints (t, h, w), got {value!r}")
    return out  # type: ignore[return-value]


class CausalConv3d(nn.Module):
    """3D convolution that is causal in time: zero padding at the front of T only, 'same' in H and W.

    The inner ``nn.Conv3d`` lives at ``.conv`` so checkpoint keys end in ``.conv.weight`` /
    ``.conv.bias``. Padding before the convolution: time ``k_t - stride_t`` frames at the front
    (dilation 1), height ``k_h // 2`` and width ``k_w // 2`` on both sides; the conv itself pads nothing.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: int or (k_t, k_h, k_w); k_h and k_w must be odd.
        time_stride: stride along T (1, or 2 for the encoder's time downsampling). H/W stride is 1.
        bias: whether the conv has a bias.

    Shapes: ``[B, C_in, T, H, W] -> [B, C_out, T // time_stride, H, W]``.

    Raises:
        ValueError: on an even spatial kernel or a time stride < 1.

    Source: ``CausalConv3d`` in ``opensora/models/vae/vae_temporal.py`` (OpenSora v1.2.0).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        time_stride: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        k_t, k_h, k_w = _triple(kernel_size, "kernel_size")
        if k_h % 2 == 0 or k_w % 2 == 0:
            raise ValueError(f"spatial kernel sizes must be odd, got {(k_t, k_h, k_w)}")
        if time_stride < 1:
            raise ValueError(f"time_stride must be >= 1, got {time_stride}")
        self.time_pad = k_t - time_stride
        if self.time_pad < 0:
            raise ValueError(f"time kernel {k_t} shorter than time stride {time_stride}")
        # F.pad order: (w_left, w_right, h_top, h_bottom, t_front, t_back)
        self._pad = (k_w // 2, k_w // 2, k_h // 2, k_h // 2, self.time_pad, 0)
        self.conv = nn.Conv3d(
            in_channels, out_channels, (k_t, k_h, k_w), stride=(time_stride, 1, 1), bias=bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C_in, T, H, W] -> [B, C_out, T', H, W] (see the class docstring for T')."""
        return self.conv(F.pad(x, self._pad, mode="constant"))


class TemporalResBlock(nn.Module):
    """Pre-activation residual block: GN -> act -> conv1 -> GN -> act -> conv2, plus a skip.

    Both 3x3x3 causal convs have no bias. When ``in_channels != out_channels`` the skip goes
    through ``conv3``, a bias-free 1x1x1 causal conv. GroupNorm eps is PyTorch's default 1e-5.

    Shapes: ``[B, in_channels, T, H, W] -> [B, out_channels, T, H, W]``.

    Source: ``ResBlock`` in ``opensora/models/vae/vae_temporal.py`` (OpenSora v1.2.0).
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        if in_channels != out_channels:
            self.conv3 = CausalConv3d(in_channels, out_channels, 1, bias=False)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C_in, T, H, W] -> [B, C_out, T, H, W]."""
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        skip = self.conv3(x) if self.in_channels != self.out_channels else x
        return h + skip


class TemporalEncoder(nn.Module):
    """Encoder of the temporal VAE: [B, C_in, T, H, W] -> [B, 2*latent_embed_dim, T / 2**sum(td), H, W].

    Layout (key names): ``conv_in`` (bias-free 3x3x3), then for each level i a list
    ``block_res_blocks[i]`` of ``num_res_blocks`` ResBlocks (the first one changes the channel count
    to ``filters * channel_multipliers[i]``), then between levels ``conv_blocks[i]``: a 3x3x3 causal
    conv with time stride 2 where ``temporal_downsample[i]`` is true, else an ``nn.Identity`` that
    keeps its list slot (no keys). Then ``res_blocks`` (``num_res_blocks`` more), ``norm1``, act,
    ``conv2`` (1x1x1, with bias) to ``out_channels`` (the mean and log-variance channels).

    T must already be a multiple of the time downsample factor (``VAETemporal.encode`` pads it).

    Source: ``Encoder`` in ``opensora/models/vae/vae_temporal.py`` (OpenSora v1.2.0).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        filters: int,
        num_res_blocks: int,
        channel_multipliers: Sequence[int],
        temporal_downsample: Sequence[bool],
        num_groups: int,
        activation: type[nn.Module],
    ) -> None:
        super().__init__()
        num_levels = len(channel_multipliers)
        self.conv_in = CausalConv3d(in_channels, filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = filters
        for i, mult in enumerate(channel_multipliers):
            width = filters * mult
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(TemporalResBlock(prev, width, num_groups, activation))
                prev = width
            self.block_res_blocks.append(level)
            if i < num_levels - 1:
                if temporal_downsample[i]:
                    self.conv_blocks.append(CausalConv3d(prev, width, 3, time_stride=2, bias=True))
                else:
                    self.conv_blocks.append(nn.Identity())
        self.res_blocks = nn.ModuleList(
            TemporalResBlock(prev, prev, num_groups, activation) for _ in range(num_res_blocks)
        )
        self.norm1 = nn.GroupNorm(num_groups, prev)
        self.act = activation()
        self.conv2 = CausalConv3d(prev, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C_in, T, H, W] (T a multiple of the factor) -> [B, out_channels, T_lat, H, W]."""
        h = self.conv_in(x)
        last = len(self.block_res_blocks) - 1
        for i, level in enumerate(self.block_res_blocks):
            for block in level:
                h = block(h)
            if i < last:
                h = self.conv_blocks[i](h)
        for block in self.res_blocks:
            h = block(h)
        return self.conv2(self.act(self.norm1(h)))


class TemporalDecoder(nn.Module):
    """Decoder of the temporal VAE: [B, latent_embed_dim, T_lat, H, W] -> [B, C_out, T_lat * 2**sum(td), H, W].

    Layout (key names): ``conv1`` (3x3x3, with bias) to ``filters * channel_multipliers[-1]``,
    ``res_blocks`` (``num_res_blocks``), then for levels i = L-1 .. 0 the ResBlocks
    ``block_res_blocks[i]`` (first one changes the width to ``filters * channel_multipliers[i]``),
    and for i > 0 ``conv_blocks[i-1]``: where ``temporal_downsample[i-1]`` is true a 3x3x3 causal
    conv to twice the channels followed by depth-to-time (channel ``c*2 + s`` becomes frame
    ``2t + s`` of channel c), else an ``nn.Identity`` slot. Then ``norm1``, act, ``conv_out`` (3x3x3).

    The output keeps the causal front frames; ``VAETemporal.decode`` drops them.

    Source: ``Decoder`` in ``opensora/models/vae/vae_temporal.py`` (OpenSora v1.2.0).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        filters: int,
        num_res_blocks: int,
        channel_multipliers: Sequence[int],
        temporal_downsample: Sequence[bool],
        num_groups: int,
        activation: type[nn.Module],
    ) -> None:
        super().__init__()
        num_levels = len(channel_multipliers)
        prev = filters * channel_multipliers[-1]
        self.conv1 = CausalConv3d(in_channels, prev, 3, bias=True)
        self.res_blocks = nn.ModuleList(
            TemporalResBlock(prev, prev, num_groups, activation) for _ in range(num_res_blocks)
        )
        levels: list[nn.ModuleList] = [nn.ModuleList()] * num_levels
        ups: list[nn.Module] = [nn.Identity()] * (num_levels - 1)
        self._time_up: list[bool] = [bool(t) for t in temporal_downsample[: num_levels - 1]]
        for i in reversed(range(num_levels)):
            width = filters * channel_multipliers[i]
            level = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.append(TemporalResBlock(prev, width, num_groups, activation))
                prev = width
            levels[i] = level
            if i > 0 and self._time_up[i - 1]:
                ups[i - 1] = CausalConv3d(prev, prev * 2, 3, bias=True)
        self.block_res_blocks = nn.ModuleList(levels)
        self.conv_blocks = nn.ModuleList(ups)
        self.norm1 = nn.GroupNorm(num_groups, prev)
        self.act = activation()
        self.conv_out = CausalConv3d(prev, out_channels, 3, bias=True)

    @staticmethod
    def _depth_to_time(x: torch.Tensor) -> torch.Tensor:
        # [B, C*2, T, H, W] -> [B, C, 2T, H, W]; the factor-2 index is the fastest in the channel axis.
        b, c2, t, h, w = x.shape
        x = x.reshape(b, c2 // 2, 2, t, h, w).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, c2 // 2, t * 2, h, w)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` [B, latent_embed_dim, T_lat, H, W] -> [B, out_channels, T_lat * factor, H, W]."""
        h = self.conv1(z)
        for block in self.res_blocks:
            h = block(h)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                h = block(h)
            if i > 0:
                h = self.conv_blocks[i - 1](h)
                if self._time_up[i - 1]:
                    h = self._depth_to_time(h)
        return self.conv_out(self.act(self.norm1(h)))


class DiagonalGaussian:
    """Diagonal Gaussian posterior built from the quant_conv output (OpenSora's own version).

    Args:
        parameters: [B, 2*C, T, H, W]; channels [:C] are the mean, [C:] the log-variance.

    Attributes:
        parameters, mean [B, C, T, H, W], logvar (clamped to [-30, 20]), std = exp(logvar / 2),
        var = exp(logvar); same dtype and device as ``parameters``.

    Raises:
        ValueError: if the channel axis (dim 1) has an odd size.

    Source: ``DiagonalGaussianDistribution`` in ``opensora/models/vae/utils.py`` (OpenSora v1.2.0).
    """

    def __init__(self, parameters: torch.Tensor) -> None:
        if parameters.dim() < 2 or parameters.shape[1] % 2:
            raise ValueError(f"posterior parameters need an even channel axis (dim 1), got shape {tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps``, eps ~ N(0, 1) of shape ``mean.shape``.

        Like the official code, eps is drawn in fp32 on the CPU (or on ``generator``'s device when
        a generator is given) and then moved to the mean's device and dtype, so with
        ``generator=None`` and a given ``torch.manual_seed`` the draw matches OpenSora on any device.
        """
        rng_device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device=rng_device)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The mean [B, C, T, H, W] (the deterministic latent)."""
        return self.mean


class VAETemporal(nn.Module):
    """OpenSora 1.2 temporal VAE (``VAE_Temporal``): causal 3D conv VAE that compresses time only.

    Args (names and defaults as ``VAE_Temporal_SD``; see ``VAE_TEMPORAL_SD_CONFIG``):
        in_out_channels: channels of the input and of the reconstruction (4 = 2D-VAE latent channels).
        latent_embed_dim: channels of the mean (the encoder emits twice this: mean and log-variance).
        embed_dim: channels after ``quant_conv`` / before ``post_quant_conv``.
        filters: base width; level i has ``filters * channel_multipliers[i]`` channels.
        num_res_blocks: ResBlocks per level and in the middle stack.
        channel_multipliers: one per level (len L >= 1).
        temporal_downsample: L - 1 booleans; each true one halves T in the encoder (doubles in the decoder).
        num_groups: GroupNorm groups; must divide every level width.
        activation_fn: ``"swish"`` (SiLU) or ``"relu"``.

    Keys: ``encoder.*``, ``quant_conv.conv.*`` (2*latent -> 2*embed, 1x1x1), ``post_quant_conv.conv.*``
    (embed -> latent, 1x1x1), ``decoder.*``; 267 tensors at the default config.

    Raises:
        ValueError: on inconsistent sizes (wrong number of temporal_downsample flags, widths not
            divisible by num_groups, unknown activation, non-positive ints).

    Source: ``VAE_Temporal`` in ``opensora/models/vae/vae_temporal.py`` (OpenSora v1.2.0).
    """

    def __init__(
        self,
        in_out_channels: int = 4,
        latent_embed_dim: int = 4,
        embed_dim: int = 4,
        filters: int = 128,
        num_res_blocks: int = 4,
        channel_multipliers: Sequence[int] = (1, 2, 2, 4),
        temporal_downsample: Sequence[bool] = (False, True, True),
        num_groups: int = 32,
        activation_fn: str = "swish",
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_out_channels", in_out_channels),
            ("latent_embed_dim", latent_embed_dim),
            ("embed_dim", embed_dim),
            ("filters", filters),
            ("num_res_blocks", num_res_blocks),
            ("num_groups", num_groups),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VAETemporal: {name} must be a positive int, got {value!r}")
        channel_multipliers = tuple(int(m) for m in channel_multipliers)
        temporal_downsample = tuple(bool(t) for t in temporal_downsample)
        if not channel_multipliers or min(channel_multipliers) < 1:
            raise ValueError(f"VAETemporal: channel_multipliers must be positive ints, got {channel_multipliers}")
        if len(temporal_downsample) != len(channel_multipliers) - 1:
            raise ValueError(
                f"VAETemporal: temporal_downsample needs len(channel_multipliers) - 1 = "
                f"{len(channel_multipliers) - 1} flags, got {len(temporal_downsample)}"
            )
        for mult in channel_multipliers:
            if (filters * mult) % num_groups:
                raise ValueError(
                    f"VAETemporal: level width {filters * mult} is not divisible by num_groups={num_groups}"
                )
        if activation_fn not in _ACTIVATIONS:
            raise ValueError(f"VAETemporal: activation_fn must be one of {sorted(_ACTIVATIONS)}, got {activation_fn!r}")
        activation = _ACTIVATIONS[activation_fn]

        self.config: dict[str, Any] = {
            "in_out_channels": in_out_channels,
            "latent_embed_dim": latent_embed_dim,
            "embed_dim": embed_dim,
            "filters": filters,
            "num_res_blocks": num_res_blocks,
            "channel_multipliers": channel_multipliers,
            "temporal_downsample": temporal_downsample,
            "num_groups": num_groups,
            "activation_fn": activation_fn,
        }
        self.time_downsample_factor = 2 ** sum(temporal_downsample)
        self.out_channels = in_out_channels
        self.latent_channels = embed_dim
        common = dict(
            filters=filters,
            num_res_blocks=num_res_blocks,
            channel_multipliers=channel_multipliers,
            temporal_downsample=temporal_downsample,
            num_groups=num_groups,
            activation=activation,
        )
        self.encoder = TemporalEncoder(in_out_channels, 2 * latent_embed_dim, **common)
        self.quant_conv = CausalConv3d(2 * latent_embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, latent_embed_dim, 1)
        self.decoder = TemporalDecoder(latent_embed_dim, in_out_channels, **common)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "VAETemporal":
        """Build from a kwargs mapping such as ``vae_temporal_tiny_config.json['constructor_kwargs']``.

        An official registry entry is also accepted: a ``"type"`` of ``"VAE_Temporal"`` (kwargs as
        given) or ``"VAE_Temporal_SD"`` (``VAE_TEMPORAL_SD_CONFIG`` updated with the given kwargs);
        ``from_pretrained`` must be absent or None (load weights separately).

        Raises:
            ValueError: on an unknown type, unknown keys, or a non-None ``from_pretrained``.
        """
        cfg = dict(config)
        kind = cfg.pop("type", "VAE_Temporal")
        pretrained = cfg.pop("from_pretrained", None)
        if pretrained is not None:
            raise ValueError(
                f"VAETemporal.from_config builds the architecture only; got from_pretrained={pretrained!r}. "
                "Build it, then load the safetensors weights with load_state_dict."
            )
        if kind == "VAE_Temporal_SD":
            cfg = {**VAE_TEMPORAL_SD_CONFIG, **cfg}
        elif kind != "VAE_Temporal":
            raise ValueError(f"unknown temporal VAE type {kind!r}; expected 'VAE_Temporal' or 'VAE_Temporal_SD'")
        unknown = set(cfg) - set(VAE_TEMPORAL_SD_CONFIG)
        if unknown:
            raise ValueError(f"unknown VAETemporal config keys {sorted(unknown)}; allowed: {sorted(VAE_TEMPORAL_SD_CONFIG)}")
        return cls(**cfg)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for a clip of ``num_frames`` encoded in one piece: ``ceil(num_frames / factor)``.

        Raises:
            ValueError: if ``num_frames`` is not a positive int.
        """
        pad = causal_time_padding(num_frames, self.time_downsample_factor)
        return (num_frames + pad) // self.time_downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Encode a clip into its posterior.

        Args:
            x: [B, in_out_channels, T, H, W] (any T >= 1); zero-padded in front to a multiple of
               the time factor, as the official code does.

        Returns:
            ``DiagonalGaussian`` whose ``parameters`` (the quant_conv output, cast to x's dtype) are
            [B, 2*embed_dim, ceil(T / factor), H, W].

        Raises:
            ValueError: if x is not 5D with ``in_out_channels`` channels.
        """
        self._check_input(x, self.out_channels, "x")
        pad = causal_time_padding(x.shape[2], self.time_downsample_factor)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, pad, 0))
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Decode latents into ``num_frames`` frames.

        Args:
            z: [B, embed_dim, T_lat, H, W].
            num_frames: frames wanted; must satisfy ``latent_frames(num_frames) == T_lat``.

        Returns:
            [B, in_out_channels, num_frames, H, W]: the decoder's ``T_lat * factor`` frames minus the
            ``causal_time_padding(num_frames)`` leading ones.

        Raises:
            ValueError: on a wrong shape or a ``num_frames`` that does not match ``T_lat``.
        """
        self._check_input(z, self.latent_channels, "z")
        expected = self.latent_frames(num_frames)
        if expected != z.shape[2]:
            raise ValueError(
                f"num_frames={num_frames} needs {expected} latent frames but z has {z.shape[2]}; "
                f"pass a num_frames in [{(z.shape[2] - 1) * self.time_downsample_factor + 1}, "
                f"{z.shape[2] * self.time_downsample_factor}]"
            )
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, causal_time_padding(num_frames, self.time_downsample_factor) :]

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruct ``x`` [B, C, T, H, W] -> [B, C, T, H, W] through the posterior (mode by default)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, num_frames=x.shape[2])

    @staticmethod
    def _check_input(t: torch.Tensor, channels: int, name: str) -> None:
        if not isinstance(t, torch.Tensor) or t.dim() != 5 or t.shape[1] != channels or min(t.shape) < 1:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a non-empty tensor [B, {channels}, T, H, W], got {shape}")
