"""STDiT3 (OpenSora 1.2 video diffusion transformer), clean-room, with a Cache Attention hook.

Follows `opensora/models/stdit/stdit3.py` of OpenSora v1.2.0 (commit 17cce908), read for facts
(names, shapes, equations) only. Module and parameter names equal the official ones, so the
`hpcai-tech/OpenSora-STDiT-v3` safetensors (973 tensors) load with ``strict=True``.

Quick use::

    model = STDiT3(**config_kwargs)                      # or STDiT3(stdit3_xl2_config())
    out = model(x, timestep, y, mask=mask, fps=fps, height=height, width=width)  # fp32 [B,8,T,H,W]

    model = build_stdit3(stdit3_xl2_config(), device="meta")   # no memory; then
    model.load_state_dict(sd, strict=True, assign=True)
    model.init_non_persistent_buffers()                  # meta leaves pos_embed.inv_freq empty

Cache Attention hook (spatial self-attention of one block; see :meth:`STDiT3.kv_hook`)::

    with model.kv_hook(fn, block_index=0):               # fn(q, k, v, block_index) -> (k, v)
        out = model(...)
    k, v = model.spatial_self_attention_kv(z_cached, timestep, fps=fps, height=height, width=width)

Block runner (intra-request caching; see :meth:`STDiT3.block_runner`): a callable that replaces the
loop over the block pairs for the calls inside the block, running any span of them
(:meth:`BlockStack.run`) and reusing residuals for the rest::

    with model.block_runner(fn):                         # fn(h [B, T, S, C], blocks: BlockStack) -> h
        out = model(...)

Cross-attention hook (every cross-attention layer; see :meth:`STDiT3.cross_attention_hook`)::

    with model.cross_attention_hook(fn):                 # fn(layer, q, k, ctx) -> logit bias or None
        out = model(...)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .hooks import HookRegistry
from .layers import (
    Attention,
    CaptionEmbedder,
    CrossAttentionHook,
    KVHook,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    PositionEmbedding2D,
    RotaryEmbedding,
    SizeEmbedder,
    T2IFinalLayer,
    TextContext,
    TimestepEmbedder,
)

__all__ = [
    "STDiT3Config",
    "stdit3_xl2_config",
    "STDiT3Block",
    "BlockStack",
    "BlockRunner",
    "STDiT3",
    "build_stdit3",
]

# Keys of a Hugging Face config.json that describe the file, not the model.
_HF_METADATA_KEYS = frozenset(
    {"model_type", "architectures", "torch_dtype", "transformers_version", "_name_or_path", "auto_map"}
)


@dataclass(frozen=True)
class STDiT3Config:
    """Constructor arguments of STDiT3, named as the official ``STDiT3Config`` fields.

    Fields used by the math: ``input_sq_size`` (512, pos-emb scale = sqrt(height·width)/512),
    ``in_channels`` (4), ``patch_size`` ((1,2,2)), ``hidden_size``, ``depth``, ``num_heads``,
    ``mlp_ratio``, ``pred_sigma`` (True: out channels = 2·in), ``caption_channels`` (4096),
    ``model_max_length`` (300, rows of ``y_embedding``), ``qk_norm``.

    Accepted and ignored (training-only or kernel choices; they change no weight and no output):
    ``input_size``, ``class_dropout_prob``, ``drop_path`` (identity at inference),
    ``enable_flash_attn``, ``enable_layernorm_kernel`` (SDPA / nn.LayerNorm are used),
    ``only_train_temporal``, ``freeze_y_embedder``.

    Rejected (ValueError from :meth:`validate`): ``enable_sequence_parallelism=True`` (multi-GPU
    only) and ``skip_y_embedder=True`` (no released v1.2 checkpoint uses it).
    Defaults are the official class defaults (STDiT3-XL/2 sizes).
    """

    input_size: Tuple[Optional[int], Optional[int], Optional[int]] = (None, None, None)
    input_sq_size: int = 512
    in_channels: int = 4
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    drop_path: float = 0.0
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    enable_flash_attn: bool = False
    enable_layernorm_kernel: bool = False
    enable_sequence_parallelism: bool = False
    only_train_temporal: bool = False
    freeze_y_embedder: bool = False
    skip_y_embedder: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "STDiT3Config":
        """Config from a mapping such as a fixture's ``config_kwargs`` or an HF ``config.json``.

        HF file metadata (``model_type``, ``architectures``, ``torch_dtype``,
        ``transformers_version``, ``_name_or_path``, ``auto_map``) is skipped.

        Raises:
            TypeError: on any other unknown key (naming it), so typos are not silently ignored.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in _HF_METADATA_KEYS)
        if unknown:
            raise TypeError(f"unknown STDiT3 config field(s) {unknown}; known fields: {sorted(names)}")
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("patch_size", "input_size"):
            if k in kw and kw[k] is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    @property
    def out_channels(self) -> int:
        """Output channels: 2·in_channels with pred_sigma (channels 0..in-1 are the velocity)."""
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    def validate(self) -> None:
        """Check the sizes and the unsupported switches.

        Raises:
            ValueError: with the offending field and what to use instead.
        """
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim must be even (RoPE rotates pairs)")
        for name in ("depth", "in_channels", "caption_channels", "model_max_length", "input_sq_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.enable_sequence_parallelism:
            raise ValueError("enable_sequence_parallelism=True is not supported (single-device inference); set it False")
        if self.skip_y_embedder:
            raise ValueError("skip_y_embedder=True is not supported; the released OpenSora 1.2 checkpoint uses False")


def stdit3_xl2_config(**overrides: Any) -> STDiT3Config:
    """The STDiT3-XL/2 configuration of OpenSora 1.2 as ``scripts/inference.py`` builds it.

    depth 28, hidden 1152, 16 heads (head_dim 72), patch (1,2,2), in 4 / out 8, caption 4096
    (T5-XXL), model_max_length 300, qk_norm True, input_sq_size 512: 1,207,643,972 parameters
    plus the [300, 4096] ``y_embedding`` buffer. ``overrides`` replace single fields.
    Source: ``STDiT3_XL_2`` registry entry in `stdit3.py`; `reference/opensora.md` §2.1.
    """
    base = dict(depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2), in_channels=4,
                caption_channels=4096, model_max_length=300, qk_norm=True)
    base.update(overrides)
    return STDiT3Config.from_dict(base)


@dataclass
class _Modulation:
    """Per-block adaLN parameters broadcastable over x [B, T, S, C]: each [B, T or 1, 1, C]."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor


@dataclass
class _Prepared:
    """Everything forward needs before the blocks, computed once per call."""

    x: torch.Tensor  # [B, T, S, C] patch tokens + position embedding, model dtype
    t: torch.Tensor  # [B, C] timestep + fps embedding
    t_mlp: torch.Tensor  # [B, 6C]
    t0: Optional[torch.Tensor]  # [B, C] with timestep 0, only with x_mask
    t0_mlp: Optional[torch.Tensor]
    x_mask: Optional[torch.Tensor]  # [B, T] bool
    grid: Tuple[int, int, int]  # patch grid (T, H', W')
    input_thw: Tuple[int, int, int]  # latent (T, H, W) before padding
    text: Optional[TextContext] = field(default=None)


class STDiT3Block(nn.Module):
    """One STDiT3 block; spatial (attends over the S tokens of a frame) or temporal (over the T
    frames of a position, with RoPE).

    With ``(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) =
    scale_shift_table + t_mlp.view(B, 6, C)``:
    ``x += gate_msa · Attn(LN1(x)·(1+scale_msa)+shift_msa)``; ``x += CrossAttn(x, text)`` (raw x,
    ungated); ``x += gate_mlp · MLP(LN2(x)·(1+scale_mlp)+shift_mlp)``. LayerNorms are affine-free,
    eps 1e-6. With a frame mask, frames whose mask is False use the parameters of ``t0_mlp``
    (timestep 0); this is a per-frame choice of parameters, giving the same values as the
    official compute-both-then-``where``.

    Keys: ``scale_shift_table`` [6, C], ``attn.{qkv, q_norm, k_norm, proj}``,
    ``cross_attn.{q_linear, kv_linear, proj}``, ``mlp.{fc1, fc2}``.
    Shapes: x [B, T, S, C] -> [B, T, S, C].
    Source: ``STDiT3Block`` in `stdit3.py`; `reference/opensora.md` §2.4.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 temporal: bool = False, rope=None) -> None:
        super().__init__()
        self.temporal = temporal
        self.hidden_size = hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, rope=rope)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def modulation(self, t_mlp: torch.Tensor, t0_mlp: Optional[torch.Tensor] = None,
                   x_mask: Optional[torch.Tensor] = None) -> _Modulation:
        """adaLN parameters for this block: six tensors [B, T or 1, 1, C]."""
        b = t_mlp.shape[0]
        params = (self.scale_shift_table[None] + t_mlp.reshape(b, 6, -1)).chunk(6, dim=1)  # [B, 1, C]
        if x_mask is not None:
            params0 = (self.scale_shift_table[None] + t0_mlp.reshape(b, 6, -1)).chunk(6, dim=1)
            sel = x_mask[:, :, None]  # [B, T, 1]
            params = tuple(torch.where(sel, p, p0) for p, p0 in zip(params, params0))  # [B, T, C]
        return _Modulation(*(p.unsqueeze(2) for p in params))

    def attn_input(self, x: torch.Tensor, mod: _Modulation) -> torch.Tensor:
        """Modulated, reshaped self-attention input: [B·T, S, C] (spatial) or [B·S, T, C] (temporal)."""
        b, t, s, c = x.shape
        h = self.norm1(x) * (1 + mod.scale_msa) + mod.shift_msa
        if self.temporal:
            return h.transpose(1, 2).reshape(b * s, t, c)
        return h.reshape(b * t, s, c)

    def forward(self, x: torch.Tensor, text: TextContext, t_mlp: torch.Tensor,
                t0_mlp: Optional[torch.Tensor] = None, x_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, s, c = x.shape
        mod = self.modulation(t_mlp, t0_mlp, x_mask)
        a = self.attn(self.attn_input(x, mod))
        a = a.view(b, s, t, c).transpose(1, 2) if self.temporal else a.view(b, t, s, c)
        x = x + mod.gate_msa * a
        x = x + self.cross_attn(x.reshape(b, t * s, c), text).view(b, t, s, c)
        h = self.norm2(x) * (1 + mod.scale_mlp) + mod.shift_mlp
        return x + mod.gate_mlp * self.mlp(h)


class BlockStack:
    """The transformer blocks of one STDiT3 forward call, as a block runner sees them.

    Block pair ``i`` is spatial block ``i`` followed by temporal block ``i`` (the order of
    :meth:`STDiT3.forward`); ``run(h, 0, depth)`` is exactly the forward's own loop (the same calls,
    bit for bit). Everything the blocks need besides the hidden state (caption, timestep modulation,
    frame mask) is bound here, so a runner only passes ``h``.

    Attributes:
        model: the STDiT3. depth: number of block pairs. text: the caption context.
        t_mlp: timestep modulation [B, 6·C] (t0_mlp, x_mask: as in forward, or None).
    """

    __slots__ = ("model", "depth", "text", "t_mlp", "t0_mlp", "x_mask")

    def __init__(self, model: "STDiT3", text: TextContext, t_mlp: torch.Tensor, t0_mlp: Optional[torch.Tensor],
                 x_mask: Optional[torch.Tensor]) -> None:
        self.model, self.text, self.t_mlp, self.t0_mlp, self.x_mask = model, text, t_mlp, t0_mlp, x_mask
        self.depth = len(model.spatial_blocks)

    def run(self, h: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Run block pairs ``start .. stop-1`` on ``h`` [B, T, S, C] (model dtype); returns the new h.

        ``h`` may hold the first rows of the call's batch only (e.g. the conditional half of a CFG
        batch): the caption and modulation rows are sliced to match.

        Raises:
            ValueError: a span outside [0, depth], or more rows than the call's batch.
        """
        stop = self.depth if stop is None else int(stop)
        if not 0 <= int(start) <= stop <= self.depth:
            raise ValueError(f"block span [{start}, {stop}) is outside the model's {self.depth} block pairs")
        text, t_mlp, t0_mlp, x_mask = self._rows(int(h.shape[0]))
        m = self.model
        for i in range(int(start), stop):
            h = m.spatial_blocks[i](h, text, t_mlp, t0_mlp, x_mask)
            h = m.temporal_blocks[i](h, text, t_mlp, t0_mlp, x_mask)
        return h

    def modulated_input(self, h: torch.Tensor) -> torch.Tensor:
        """Spatial block 0's modulated self-attention input for ``h`` [B, T, S, C]: LayerNorm1, then
        ``(1 + scale_msa)`` and ``shift_msa`` of this call's timestep; [B·T, S, C] in the model dtype.

        TeaCache's change indicator (arXiv 2411.19108: the timestep-modulated input of the first block);
        it calls no block's forward.
        """
        text, t_mlp, t0_mlp, x_mask = self._rows(int(h.shape[0]))
        blk = self.model.spatial_blocks[0]
        return blk.attn_input(h, blk.modulation(t_mlp, t0_mlp, x_mask))

    def _rows(self, rows: int):
        batch = int(self.t_mlp.shape[0])
        if rows == batch:
            return self.text, self.t_mlp, self.t0_mlp, self.x_mask
        if not 0 < rows < batch:
            raise ValueError(f"h has {rows} rows but this call's batch is {batch}")
        text = self.text
        key_mask = None if text.key_mask is None else text.key_mask[:rows]
        text = TextContext(text.tokens[:rows], key_mask, text.lengths[:rows])
        return (text, self.t_mlp[:rows], None if self.t0_mlp is None else self.t0_mlp[:rows],
                None if self.x_mask is None else self.x_mask[:rows])


#: ``fn(h [B, T, S, C], blocks) -> h``: replaces the loop over the block pairs of one forward call.
BlockRunner = Callable[[torch.Tensor, BlockStack], torch.Tensor]


def _first_value(v: Any, name: str) -> float:
    """First element of a tensor / sequence / number as a Python float."""
    if v is None:
        raise ValueError(f"{name} is required (pixel size of the video, e.g. 8 x latent size; a tensor [n] or a number)")
    if isinstance(v, torch.Tensor):
        if v.numel() == 0:
            raise ValueError(f"{name} is empty")
        return float(v.reshape(-1)[0].item())  # one host read per forward; pass CPU tensors to avoid a GPU sync
    if isinstance(v, (list, tuple)):
        return float(v[0])
    return float(v)


def _pixel_scale(height: Any, width: Any, input_sq_size: int) -> float:
    """Position-embedding scale sqrt(height[0]·width[0]) / input_sq_size in Python double precision.

    Two tensors on the same accelerator are read back together (one device sync per forward).
    """
    if (isinstance(height, torch.Tensor) and isinstance(width, torch.Tensor) and height.device == width.device
            and height.device.type != "cpu" and height.numel() and width.numel()):
        h, w = torch.stack([height.reshape(-1)[0], width.reshape(-1)[0].to(height.dtype)]).tolist()
    else:
        h, w = _first_value(height, "height"), _first_value(width, "width")
    return (h * w) ** 0.5 / input_sq_size


class STDiT3(nn.Module):
    """Spatial-temporal DiT of OpenSora 1.2 (STDiT3), for inference.

    Construct with keyword arguments named as the official config (``STDiT3(**config_kwargs)``),
    or with an :class:`STDiT3Config` (``STDiT3(cfg)``). Unknown keywords raise TypeError.

    Forward (see :meth:`forward`): ``model(x, timestep, y, mask=, fps=, height=, width=,
    x_mask=None, **ignored)`` -> fp32 [B, out_channels, T, H, W].

    dtype: the compute dtype is that of ``x_embedder.proj.weight``; cast the model with
    ``.to(torch.bfloat16)`` (or fp16 / fp32). x, timestep and y are cast to it (so a bf16 model
    sees bf16-rounded timesteps, as the official one does); the output is fp32.

    State dict: exactly the official keys in the official order (973 tensors for XL/2, see
    `fixtures/opensora_v1_2/stdit3_xl2_state_dict.json`), including the persistent buffer
    ``y_embedder.y_embedding`` and the frozen parameter ``rope.freqs``. LayerNorms have no
    affine parameters; ``pos_embed.inv_freq`` is a non-persistent buffer.

    Cache Attention: :meth:`kv_hook` / :meth:`set_kv_hook` install a K/V hook on one spatial
    block's self-attention; :meth:`spatial_self_attention_kv` computes the K/V that block would
    see for any latent. Chorus: :meth:`cross_attention_hook` adds a logit bias to (and reads the
    queries and keys of) every cross-attention layer; :meth:`token_subset` computes only some positions.

    Raises:
        TypeError / ValueError: unknown config fields, unsupported switches (see STDiT3Config).
    Source: ``STDiT3`` in OpenSora v1.2.0 `opensora/models/stdit/stdit3.py`.
    """

    def __init__(self, config: Optional[Union[STDiT3Config, Mapping[str, Any]]] = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = STDiT3Config.from_dict(kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        elif isinstance(config, Mapping):
            config = STDiT3Config.from_dict(config)
        elif not isinstance(config, STDiT3Config):
            raise TypeError(f"config must be an STDiT3Config or a mapping, got {type(config).__name__}")
        config.validate()
        self.config = config
        c = config.hidden_size
        self.hidden_size = c
        self.num_heads = config.num_heads
        self.patch_size = tuple(int(p) for p in config.patch_size)
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.input_sq_size = config.input_sq_size

        # Registration order = official state_dict order (pos_embed has no persistent state).
        self.pos_embed = PositionEmbedding2D(c)
        self.rope = RotaryEmbedding(c // config.num_heads)
        self.x_embedder = PatchEmbed3D(self.patch_size, config.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.fps_embedder = SizeEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c, bias=True))
        self.y_embedder = CaptionEmbedder(config.caption_channels, c, config.model_max_length)
        self.spatial_blocks = nn.ModuleList(
            STDiT3Block(c, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)
        )
        # Temporal blocks share the single `rope` module through a bound method (no duplicate keys).
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(c, config.num_heads, config.mlp_ratio, config.qk_norm, temporal=True,
                        rope=self.rope.rotate_queries_or_keys)
            for _ in range(config.depth)
        )
        self.final_layer = T2IFinalLayer(c, math.prod(self.patch_size), self.out_channels)
        for i, (sb, tb) in enumerate(zip(self.spatial_blocks, self.temporal_blocks)):
            sb.attn.block_index = i
            tb.attn.block_index = i
            sb.cross_attn.block_index = i
            tb.cross_attn.block_index = i
            tb.cross_attn.temporal = True
        self._block_runner: Optional[BlockRunner] = None
        self._token_subset: Optional[torch.Tensor] = None
        self._init_weights()

    # ------------------------------------------------------------------ construction helpers

    def _init_weights(self) -> None:
        # The official initialisation (xavier Linear, zero biases, zero-init temporal outputs and
        # fps MLP output) so that a freshly built model is sane; checkpoints overwrite all of it.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        for blk in self.temporal_blocks:
            nn.init.zeros_(blk.attn.proj.weight)
            nn.init.zeros_(blk.cross_attn.proj.weight)
            nn.init.zeros_(blk.mlp.fc2.weight)

    def init_non_persistent_buffers(self) -> None:
        """Recompute ``pos_embed.inv_freq`` on the device and in the dtype of ``x_embedder.proj.weight``
        and clear the position / RoPE caches.

        Call it after materialising a meta-built model (``load_state_dict(..., assign=True)`` or
        ``to_empty``): non-persistent buffers are not in checkpoints, so they stay empty there.
        The value is fp32 rounded to the model dtype, as ``model.to(dtype)`` would give.
        """
        w = self.x_embedder.proj.weight
        self.pos_embed.reset_inv_freq(device=w.device, dtype=w.dtype)
        self.rope._cache.clear()

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (that of ``x_embedder.proj.weight``)."""
        return self.x_embedder.proj.weight.dtype

    def patch_grid(self, latent_thw: Sequence[int]) -> Tuple[int, int, int]:
        """Patch grid (T', H', W') for a latent of (T, H, W): each rounded up to the patch, divided.

        S = H'·W' tokens per frame. E.g. (15, 30, 53) -> (15, 15, 27).
        """
        return tuple(-(-int(n) // p) for n, p in zip(latent_thw, self.patch_size))  # type: ignore[return-value]

    # ------------------------------------------------------------------ model hooks

    @property
    def hooks(self) -> HookRegistry:
        """Named, removable hooks around this model's forward (:mod:`.hooks`; Cache Attention is one)."""
        return HookRegistry.of(self)

    # ------------------------------------------------------------------ Cache Attention hook

    def set_kv_hook(self, fn: Optional[KVHook], block_index: int = 0) -> None:
        """Install (or with ``fn=None`` remove) a K/V hook on spatial block ``block_index``.

        The hook is called inside that block's self-attention as ``fn(q, k, v, block_index)``
        after q/k-norm, with q, k, v [B·T, heads, S, head_dim] in the model dtype (row = b·T + t;
        with CFG the first n samples are the conditional ones). It returns ``(k, v)`` (any key
        length, e.g. replaced by or concatenated with cached K/V) or ``(k, v, attn_mask)`` with a
        bool mask broadcastable to [B·T, heads, S, N_k] (True = attend). Without a hook the model
        runs the plain path.

        Raises:
            IndexError: if block_index is not in [0, depth).
            TypeError: if fn is neither None nor callable.
        """
        if not 0 <= block_index < len(self.spatial_blocks):
            raise IndexError(f"block_index {block_index} out of range [0, {len(self.spatial_blocks)})")
        if fn is not None and not callable(fn):
            raise TypeError("kv hook must be callable as fn(q, k, v, block_index) -> (k, v)")
        self.spatial_blocks[block_index].attn.kv_hook = fn

    @contextlib.contextmanager
    def kv_hook(self, fn: KVHook, block_index: int = 0) -> Iterator[None]:
        """Context manager: ``with model.kv_hook(fn, block_index=0): out = model(...)``.

        Installs ``fn`` (see :meth:`set_kv_hook`) for the calls inside the block, then restores
        whatever hook was there before, also on error. Use it around the sampler steps that
        should see cached K/V (e.g. fast-mode steps 2-4) and leave the other steps untouched.
        """
        if fn is None or not callable(fn):
            raise TypeError("kv_hook needs a callable fn(q, k, v, block_index) -> (k, v)")
        if not 0 <= block_index < len(self.spatial_blocks):
            raise IndexError(f"block_index {block_index} out of range [0, {len(self.spatial_blocks)})")
        attn = self.spatial_blocks[block_index].attn
        previous = attn.kv_hook
        attn.kv_hook = fn
        try:
            yield
        finally:
            attn.kv_hook = previous

    # ------------------------------------------------------------------ block runner

    @contextlib.contextmanager
    def block_runner(self, fn: BlockRunner) -> Iterator[None]:
        """Context manager: the forward calls inside the block run their block pairs through ``fn``.

        ``fn(h, blocks)`` gets the hidden state after patch and position embedding, h [B, T', S, C] in
        the model dtype, and a :class:`BlockStack` bound to the call (caption, modulation, frame mask);
        it returns the hidden state the final layer gets (same shape). It may run any span of the
        blocks (``blocks.run(h, start, stop)``, also on the first rows of the batch only) and reuse
        earlier residuals for the rest; that is how an intra-request cache skips a step, a CFG half or
        a span of blocks. Without a runner the forward runs its own loop: nothing is added to it.
        The previous runner is restored after the block, also on error.

        Raises:
            TypeError: ``fn`` is not callable.
        """
        if not callable(fn):
            raise TypeError("block_runner needs a callable fn(h, blocks) -> h")
        previous = self._block_runner
        self._block_runner = fn
        try:
            yield
        finally:
            self._block_runner = previous

    # ------------------------------------------------------------------ token subset (Chorus)

    @contextlib.contextmanager
    def token_subset(self, positions: torch.Tensor) -> Iterator[None]:
        """Context manager: model calls inside the block compute only the patch positions ``positions``
        of every frame (Chorus's Selective Region Denoising), then the full model comes back, also on error.

        ``positions``: int64 [S'] distinct indices into a frame's S = H'·W' tokens (raster order,
        :meth:`patch_grid`). Those tokens go through every block with their own position embedding;
        spatial self-attention sees only them (the other positions are neither computed nor attended to),
        temporal attention, cross-attention and the MLPs are per position as usual. The output holds the
        computed positions' predictions and zeros elsewhere. Cost scales with S'/S.

        Raises:
            ValueError: ``positions`` is not a non-empty 1-D integer tensor of distinct indices >= 0.
        """
        if not isinstance(positions, torch.Tensor) or positions.ndim != 1 or positions.numel() == 0 \
                or positions.dtype not in (torch.int64, torch.int32) or int(positions.min()) < 0 \
                or positions.unique().numel() != positions.numel():
            raise ValueError("token_subset needs a non-empty 1-D integer tensor of distinct patch positions >= 0")
        previous = self._token_subset
        self._token_subset = positions.to(torch.int64)
        try:
            yield
        finally:
            self._token_subset = previous

    # ------------------------------------------------------------------ cross-attention hook (Chorus)

    @contextlib.contextmanager
    def cross_attention_hook(self, fn: CrossAttentionHook) -> Iterator[None]:
        """Context manager: every cross-attention layer (spatial and temporal blocks) calls ``fn`` for
        the model calls inside the block, then the hooks that were there before come back, also on error.

        ``fn(layer, q, k, ctx)`` returns None or an additive bias on that layer's attention logits (see
        ``layers.MultiHeadCrossAttention``); ``layer.block_index`` and ``layer.temporal`` say which layer
        called. Queries are the block's tokens in (frame, row, column) raster order, N = T'·H'·W'
        (:meth:`patch_grid`); keys are the caption's real tokens, compacted to the front of each row.
        Chorus's Token-Guided Attention Amplification and its region maps use it. Without it the model
        runs the plain path.

        Raises:
            TypeError: ``fn`` is not callable.
        """
        if fn is None or not callable(fn):
            raise TypeError("cross_attention_hook needs a callable fn(layer, q, k, ctx) -> bias or None")
        layers = [blk.cross_attn for pair in zip(self.spatial_blocks, self.temporal_blocks) for blk in pair]
        previous = [layer.logit_hook for layer in layers]
        for layer in layers:
            layer.logit_hook = fn
        try:
            yield
        finally:
            for layer, hook in zip(layers, previous):
                layer.logit_hook = hook

    @torch.no_grad()
    def spatial_self_attention_kv(
        self,
        z: torch.Tensor,
        timestep: torch.Tensor,
        *,
        fps: Any,
        height: Any,
        width: Any,
        block_index: int = 0,
        y: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        x_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """K and V that spatial block ``block_index``'s self-attention would compute for latent ``z``.

        Runs exactly the forward's path on ``z``: the same casting, patch embedding, position
        embedding (same height/width scale), timestep + fps embedding of ``timestep`` (so its
        ``t_mlp``), then for block 0 directly LayerNorm1 + t2i modulation, ``qkv`` and ``k_norm``.
        For ``block_index > 0`` it first runs blocks (S0, T0, ..., S_{i-1}, T_{i-1}) on z, which
        needs the caption (``y``, ``mask``). No hook is called here.

        Cache Attention turns a cached latent into K/V with it: the result has the layout the
        hook receives, so ``fn`` can return it (or concatenate it) directly.

        Args:
            z: latent [B, C, T, H, W] (any float dtype; cast to the model dtype).
            timestep: [B] (or a scalar) in the model's 0..1000 scale.
            fps, height, width: as in :meth:`forward` (n or B values).
            block_index: spatial block, default 0.
            y, mask: caption and its mask as in :meth:`forward`; required for block_index > 0.
            x_mask: optional [B, T] bool frame mask as in :meth:`forward`.

        Returns:
            (k, v), each [B·T', heads, S, head_dim] in the model dtype, rows b-major.

        Raises:
            IndexError: block_index out of range. ValueError: bad shapes, or y missing for i > 0.
        """
        if not 0 <= block_index < len(self.spatial_blocks):
            raise IndexError(f"block_index {block_index} out of range [0, {len(self.spatial_blocks)})")
        if block_index > 0 and y is None:
            raise ValueError("block_index > 0 needs y (and mask): the earlier blocks use cross-attention")
        p = self._prepare(z, timestep, fps, height, width, x_mask)
        x = p.x
        if block_index > 0:
            text = self._encode_text(y, mask, x.shape[0], x.device)
            for i in range(block_index):
                x = self.spatial_blocks[i](x, text, p.t_mlp, p.t0_mlp, p.x_mask)
                x = self.temporal_blocks[i](x, text, p.t_mlp, p.t0_mlp, p.x_mask)
        blk = self.spatial_blocks[block_index]
        h = blk.attn_input(x, blk.modulation(p.t_mlp, p.t0_mlp, p.x_mask))
        _, k, v = blk.attn.project_qkv(h)
        return k, v

    # ------------------------------------------------------------------ forward

    def _prepare(self, x, timestep, fps, height, width, x_mask) -> _Prepared:
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            raise ValueError(f"x must be a latent [B, C, T, H, W]; got {getattr(x, 'shape', type(x))}")
        b, c_in, tx, hx, wx = x.shape
        if c_in != self.in_channels:
            raise ValueError(f"x has {c_in} channels, the model expects in_channels={self.in_channels}")
        if fps is None:
            raise ValueError("fps is required (24 for video, 120 for a single image; tensor [n] or a number)")
        dtype = self.dtype
        device = self.x_embedder.proj.weight.device
        x = x.to(device=device, dtype=dtype)
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, dtype=torch.float32)
        timestep = timestep.to(device=device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        if timestep.shape != (b,):
            raise ValueError(f"timestep must have shape [{b}] (one per sample), got {tuple(timestep.shape)}")
        timestep = timestep.to(dtype)  # official: a bf16 model rounds t before the sinusoid

        t_grid, h_grid, w_grid = self.patch_grid((tx, hx, wx))
        s = h_grid * w_grid
        base_size = round(s**0.5)
        scale = _pixel_scale(height, width, self.input_sq_size)
        pos = self.pos_embed(h_grid, w_grid, scale, base_size, device, dtype)  # [1, S, C], cached

        if not isinstance(fps, torch.Tensor):
            fps = torch.tensor([fps] if isinstance(fps, (int, float)) else list(fps), dtype=torch.float32)
        fps_emb = self.fps_embedder(fps.to(device).reshape(-1), b)
        t = self.t_embedder(timestep) + fps_emb
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            x_mask = x_mask.to(device)
            if x_mask.shape != (b, t_grid):
                raise ValueError(f"x_mask must be [B, T] = [{b}, {t_grid}] (True = generated frame), got {tuple(x_mask.shape)}")
            x_mask = x_mask.bool()
            t0 = self.t_embedder(torch.zeros_like(timestep)) + fps_emb
            t0_mlp = self.t_block(t0)

        tokens = self.x_embedder(x).unflatten(1, (t_grid, s)) + pos  # [B, T', S, C]
        return _Prepared(tokens, t, t_mlp, t0, t0_mlp, x_mask, (t_grid, h_grid, w_grid), (tx, hx, wx))

    def _encode_text(self, y: torch.Tensor, mask: Optional[torch.Tensor], b: int, device: torch.device) -> TextContext:
        """Caption -> :class:`TextContext` (tokens compacted per sample, trimmed to the longest)."""
        if not isinstance(y, torch.Tensor) or y.ndim not in (3, 4):
            raise ValueError(f"y must be [B, 1, L, {self.config.caption_channels}]; got {getattr(y, 'shape', type(y))}")
        if y.ndim == 4:
            if y.shape[1] != 1:
                raise ValueError(f"y must be [B, 1, L, C]; got {tuple(y.shape)}")
            y = y[:, 0]
        if y.shape[0] != b or y.shape[-1] != self.config.caption_channels:
            raise ValueError(f"y must be [{b}, 1, L, {self.config.caption_channels}]; got {tuple(y.shape)}")
        y = y.to(device=device, dtype=self.dtype)
        length = y.shape[1]
        if mask is None:
            lengths = (length,) * b
            return TextContext(self.y_embedder(y), None, lengths)
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.ndim != 2 or mask.shape[1] != length:
            raise ValueError(f"mask must be [n, {length}] (1 = real token); got {tuple(mask.shape)}")
        if mask.shape[0] != b:
            n = mask.shape[0]
            if n == 0 or b % n:
                raise ValueError(f"mask has {n} rows; the batch {b} must be a multiple of it (CFG tiles cond masks)")
            mask = mask.repeat(b // n, 1)
        keep = mask != 0
        lengths = tuple(int(v) for v in keep.sum(1).tolist())  # one host read per forward (official does the same)
        if min(lengths) == 0:
            raise ValueError(f"every caption needs at least one real token; mask lengths are {list(lengths)}")
        l_max = max(lengths)
        # Move each row's real tokens to the front, keeping their order (a stable sort): attention
        # is a set operation over keys, so only membership matters; holes in the mask are fine.
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :l_max].to(device)
        y = torch.gather(y, 1, order[:, :, None].expand(b, l_max, y.shape[-1]))
        key_mask = None
        if min(lengths) < l_max:
            lens = torch.tensor(lengths, device=device)
            key_mask = (torch.arange(l_max, device=device)[None, :] < lens[:, None])[:, None, None, :]
        return TextContext(self.y_embedder(y), key_mask, lengths)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        x_mask: Optional[torch.Tensor] = None,
        fps: Any = None,
        height: Any = None,
        width: Any = None,
        **ignored: Any,
    ) -> torch.Tensor:
        """Predict the flow velocity (channels 0..in-1) for a noisy video latent.

        Args:
            x: latent [B, in_channels, T, H, W], any float dtype (cast to the model dtype). Odd
                H/W are padded inside and cropped from the output.
            timestep: [B] in 0..1000 (1000 = pure noise), cast to the model dtype first.
            y: T5 states [B, 1, L, caption_channels] (CFG: cond rows then ``y_embedding`` rows).
            mask: T5 attention mask [n, L] or [B, L] (int or bool, 1 = real token; n rows are tiled
                to B, so uncond rows reuse the cond lengths). None = all L tokens are real.
            x_mask: optional [B, T] bool; False frames use timestep-0 modulation (conditioning frames).
            fps: [n] or [B] tensor or a number (24 video, 120 image).
            height, width: pixel size (8 x latent); only the first element is used
                (position-embedding scale sqrt(height·width)/input_sq_size). A CUDA tensor costs
                one host read per call; CPU tensors or numbers avoid it.
            **ignored: accepted and ignored (``num_frames``, ``ar``, ... as the sampler passes them).

        Returns:
            fp32 [B, out_channels, T, H, W]. With pred_sigma the velocity is channels 0..3.

        Raises:
            ValueError: malformed shapes, missing fps/height/width, a caption with no real token.
        Source: ``STDiT3.forward`` (OpenSora v1.2.0); `reference/opensora.md` §2.3.
        """
        p = self._prepare(x, timestep, fps, height, width, x_mask)
        b = p.x.shape[0]
        text = self._encode_text(y, mask, b, p.x.device)
        h = p.x
        subset = self._token_subset
        if subset is not None:  # Chorus's region: only these positions of every frame are computed
            subset = subset.to(h.device)
            h = h.index_select(2, subset)
        runner = self._block_runner
        if runner is None:
            for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
                h = spatial(h, text, p.t_mlp, p.t0_mlp, p.x_mask)
                h = temporal(h, text, p.t_mlp, p.t0_mlp, p.x_mask)
        else:
            h = runner(h, BlockStack(self, text, p.t_mlp, p.t0_mlp, p.x_mask))
        h = self.final_layer(h, p.t, p.t0, p.x_mask)  # [B, T', S, prod(patch)·out]
        if subset is not None:
            h = h.new_zeros((h.shape[0], h.shape[1], p.x.shape[2], h.shape[3])).index_copy_(2, subset, h)
        return self._unpatchify(h, p.grid, p.input_thw).to(torch.float32)

    def _unpatchify(self, h: torch.Tensor, grid: Tuple[int, int, int], thw: Tuple[int, int, int]) -> torch.Tensor:
        # Token features are ordered (pt, ph, pw, c) with c fastest -> [B, c, T'pt, H'ph, W'pw], crop.
        b = h.shape[0]
        nt, nh, nw = grid
        pt, ph, pw = self.patch_size
        co = self.out_channels
        h = h.reshape(b, nt, nh, nw, pt, ph, pw, co).permute(0, 7, 1, 4, 2, 5, 3, 6)
        h = h.reshape(b, co, nt * pt, nh * ph, nw * pw)
        tx, hx, wx = thw
        return h[:, :, :tx, :hx, :wx]


def build_stdit3(config: Optional[Union[STDiT3Config, Mapping[str, Any]]] = None,
                 device: Union[str, torch.device] = "meta", dtype: Optional[torch.dtype] = None) -> STDiT3:
    """Build an STDiT3 directly on ``device`` (default "meta": no memory, no init cost).

    A meta model has the exact parameter names and shapes, for inspection or for
    ``load_state_dict(sd, strict=True, assign=True)``; after loading call
    :meth:`STDiT3.init_non_persistent_buffers`. ``config`` defaults to :func:`stdit3_xl2_config`.
    ``dtype`` (optional) casts parameters and buffers after construction.
    """
    config = stdit3_xl2_config() if config is None else config
    with torch.device(device):
        model = STDiT3(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
