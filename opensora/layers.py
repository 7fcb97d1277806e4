"""Building blocks of STDiT3 (OpenSora 1.2), clean-room.

Every module here follows a layer of the official `opensora/models/layers/blocks.py` (v1.2.0,
commit 17cce908) and of `rotary_embedding_torch` 0.5.3, read for facts (names, shapes, equations)
only. Attribute names equal the official ones so that the
checkpoint `hpcai-tech/OpenSora-STDiT-v3` loads with ``strict=True``.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA), which
picks a fused kernel (FlashAttention / memory-efficient / cuDNN on CUDA, the flash CPU kernel on
CPU). Neither xformers nor flash-attn is needed.

Numerics that matter for matching the official outputs are kept on purpose (and commented):
cos-before-sin in the timestep sinusoid, sin-before-cos in the position embedding, RMSNorm in
fp32, RoPE angles in the dtype of ``rope.freqs``, the position embedding's ``inv_freq`` following
the model's dtype on ``.to()``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "KVHook",
    "CrossAttentionHook",
    "RMSNorm",
    "Mlp",
    "PatchEmbed3D",
    "timestep_embedding",
    "TimestepEmbedder",
    "SizeEmbedder",
    "CaptionEmbedder",
    "PositionEmbedding2D",
    "RotaryEmbedding",
    "Attention",
    "TextContext",
    "MultiHeadCrossAttention",
    "T2IFinalLayer",
]

# A Cache Attention hook: fn(q, k, v, block_index) -> (k, v) or (k, v, attn_mask); see Attention.
KVHook = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, int],
    Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
]

# A cross-attention hook: fn(layer, q, k, ctx) -> additive logit bias or None; see MultiHeadCrossAttention.
CrossAttentionHook = Callable[["MultiHeadCrossAttention", torch.Tensor, torch.Tensor, "TextContext"],
                              Optional[torch.Tensor]]

_CACHE_SIZE = 64  # distinct (shape, device, dtype) entries kept per cache; a run uses one or two


def _cache_put(cache: "OrderedDict", key, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension (LLaMA / T5 style), used as q/k norm.

    ``y = weight * (x_fp32 * rsqrt(mean(x_fp32**2) + eps)).to(x.dtype)``. The statistic is taken
    in fp32 whatever the input dtype, then cast back before the (learned) scale, as the official
    ``LlamaRMSNorm`` in `blocks.py` does.

    Args:
        dim: size of the normalised (last) dimension, e.g. head_dim 72.
        eps: added to the mean square (1e-6).

    Shapes: x [..., dim] any float dtype -> same shape and dtype (promoted with ``weight``).
    Parameters: ``weight`` [dim], initialised to ones.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Mlp(nn.Module):
    """Two-layer perceptron ``fc2(GELU_tanh(fc1(x)))`` (timm ``Mlp`` names, no dropout at inference).

    Args:
        in_features: input width.
        hidden_features: width of ``fc1``'s output.
        out_features: output width (defaults to ``in_features``).

    Shapes: [..., in_features] -> [..., out_features].
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = _gelu_tanh()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed3D(nn.Module):
    """Video latent -> patch tokens with a strided Conv3d (``proj``, kernel = stride = patch).

    T, H, W that are not multiples of the patch are zero-padded at the end (W, then H, then T),
    as the official ``PatchEmbed3D`` does.

    Args:
        patch_size: (pt, ph, pw), (1, 2, 2) for STDiT3.
        in_chans: latent channels (4).
        embed_dim: hidden size (1152).

    Shapes: x [B, in_chans, T, H, W] -> tokens [B, T'·H'·W', embed_dim] in (t, h, w) raster
    order, where T' = ceil(T/pt), H' = ceil(H/ph), W' = ceil(W/pw).
    """

    def __init__(self, patch_size: Tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        pad_t, pad_h, pad_w = (-t) % pt, (-h) % ph, (-w) % pw
        if pad_t or pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h, 0, pad_t))
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       freqs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sinusoidal embedding of scalar timesteps, **cos first, then sin** (GLIDE / DiT convention).

    ``freqs_j = exp(-ln(max_period) * j / (dim/2))``, j = 0..dim/2-1, computed in fp32;
    ``emb = [cos(t * freqs), sin(t * freqs)]`` with t upcast to fp32.

    Args:
        t: [N] timesteps (any float dtype; fractional values allowed). A bf16 model rounds them
            before this call (official behaviour), e.g. 985.96 -> 984.
        dim: embedding width (256). An odd width gets one trailing zero column.
        max_period: 10000.
        freqs: optional precomputed [dim//2] fp32 frequencies on ``t.device`` (a cache).

    Returns: [N, dim] fp32.
    Source: ``TimestepEmbedder.timestep_embedding`` in `blocks.py`.
    """
    half = dim // 2
    if freqs is None:
        freqs = _sinusoid_freqs(half, max_period, t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sinusoid_freqs(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    # Computed on the CPU and then moved, exactly as the official code does, so CUDA runs get
    # the same fp32 frequencies bit for bit.
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    return freqs.to(device)


class TimestepEmbedder(nn.Module):
    """Timestep -> hidden vector: 256-d sinusoid (cos, sin) -> Linear -> SiLU -> Linear.

    Args:
        hidden_size: output width (1152).
        frequency_embedding_size: sinusoid width (256).

    Shapes: t [N] -> [N, hidden_size] in the dtype of ``mlp.0.weight`` (the sinusoid is computed
    in fp32 and cast to it before the MLP).
    Keys: ``mlp.0.{weight,bias}`` [hidden, 256], ``mlp.2.{weight,bias}`` [hidden, hidden].
    Source: ``TimestepEmbedder`` in `blocks.py`.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self._freqs: "OrderedDict" = OrderedDict()

    def _freqs_on(self, device: torch.device) -> torch.Tensor:
        freqs = self._freqs.get(device)
        if freqs is None:
            freqs = _sinusoid_freqs(self.frequency_embedding_size // 2, 10000.0, device)
            _cache_put(self._freqs, device, freqs)
        return freqs

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size, freqs=self._freqs_on(t.device))
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """Embeds a per-sample scalar (STDiT3 uses it for fps) like a timestep.

    Shapes: s [n] or [n, 1] (any dtype; 24 for video, 120 for single images) -> [bs, hidden],
    where the n values are tiled ``bs // n`` times along the batch (the CFG batch is cond rows
    then uncond rows).

    Raises:
        ValueError: if ``bs`` is not a multiple of n or s has more than one value per sample.
    Source: ``SizeEmbedder`` in `blocks.py` (only its scalar use by STDiT3).
    """

    def forward(self, s: torch.Tensor, bs: int) -> torch.Tensor:  # type: ignore[override]
        if s.ndim == 2 and s.shape[1] == 1:
            s = s[:, 0]
        if s.ndim != 1:
            raise ValueError(f"expected one scalar per sample, shape [n] or [n, 1]; got {tuple(s.shape)}")
        n = s.shape[0]
        if n != bs:
            if n == 0 or bs % n:
                raise ValueError(f"batch {bs} is not a multiple of the {n} values given (pass one value per prompt)")
            s = s.repeat(bs // n)
        return super().forward(s)


class CaptionEmbedder(nn.Module):
    """Projects T5 hidden states into the model width and holds the learned null caption.

    Args:
        in_channels: caption width (4096 for T5-XXL).
        hidden_size: model width.
        token_num: caption length of ``y_embedding`` (model_max_length, 300).

    Keys: ``y_proj.fc1`` [hidden, in_channels], ``y_proj.fc2`` [hidden, hidden] (GELU-tanh between),
    and the **persistent buffer** ``y_embedding`` [token_num, in_channels]: the learned null
    caption that the sampler uses as the unconditional ``y`` for CFG.
    Shapes: forward [..., in_channels] -> [..., hidden_size].
    Source: ``CaptionEmbedder`` in `blocks.py` (caption dropout is training-only and omitted).
    """

    def __init__(self, in_channels: int, hidden_size: int, token_num: int) -> None:
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class PositionEmbedding2D(nn.Module):
    """Resolution-aware 2-D sin-cos position embedding of the patch grid (one frame).

    For a patch grid of h rows and w columns, pixel-scale ``scale`` and ``base_size``:
    row coord r -> ``r / scale * (base_size / h)``, column coord c -> ``c / scale * (base_size / w)``;
    ``emb1d(p) = [sin(p * inv_freq), cos(p * inv_freq)]`` (**sin first**), ``inv_freq`` =
    1 / 10000^(k/(dim/2)), k = 0, 2, ..; token (r, c) = ``[emb1d(column), emb1d(row)]`` (the column
    first, MAE convention), tokens in raster order (row-major).

    ``inv_freq`` is a non-persistent fp32 buffer, so ``model.to(torch.bfloat16)`` rounds it to bf16
    exactly as the official model does (the bf16 golden depends on that). The embedding is
    computed in fp32 and then cast to the requested dtype, and cached by (h, w, scale,
    base_size, device, dtype).

    Args:
        dim: hidden size, divisible by 4.

    Shapes: forward(h, w, scale, base_size, device, dtype) -> [1, h*w, dim].
    Raises: ValueError if dim is not divisible by 4.
    Source: ``PositionEmbedding2D`` in `blocks.py`.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"PositionEmbedding2D needs dim divisible by 4, got {dim}")
        self.dim = dim
        self.register_buffer("inv_freq", self._make_inv_freq(dim), persistent=False)
        self._cache: "OrderedDict" = OrderedDict()

    @staticmethod
    def _make_inv_freq(dim: int) -> torch.Tensor:
        half = dim // 2
        return 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))

    def reset_inv_freq(self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        """Recompute ``inv_freq`` (fp32, then cast to ``dtype``) on ``device``; clears the cache.

        Needed after building on the meta device, where non-persistent buffers hold no data.
        """
        inv = self._make_inv_freq(self.dim).to(device=device)
        self.inv_freq = inv.to(dtype) if dtype is not None else inv
        self._cache.clear()

    def _sin_cos(self, p: torch.Tensor) -> torch.Tensor:
        # Outer product p[i] * inv_freq[d]; a bf16 inv_freq promotes to fp32 here, like the
        # official einsum.
        out = p[:, None] * self.inv_freq[None, :]
        return torch.cat((torch.sin(out), torch.cos(out)), dim=-1)

    def forward(self, h: int, w: int, scale: float, base_size: Optional[int],
                device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (h, w, scale, base_size, device, dtype, self.inv_freq.dtype, self.inv_freq.device,
               torch.is_inference_mode_enabled())
        emb = self._cache.get(key)
        if emb is not None:
            self._cache.move_to_end(key)
            return emb
        grid_h = torch.arange(h, device=device) / scale
        grid_w = torch.arange(w, device=device) / scale
        if base_size is not None:
            grid_h *= base_size / h
            grid_w *= base_size / w
        rows = grid_h[:, None].expand(h, w).reshape(-1)  # raster order: r = i // w
        cols = grid_w[None, :].expand(h, w).reshape(-1)  # c = i % w
        emb = torch.cat([self._sin_cos(cols), self._sin_cos(rows)], dim=-1).unsqueeze(0).to(dtype)
        _cache_put(self._cache, key, emb)
        return emb


def _rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    # Pairs (x0, x1), (x2, x3), ... -> (-x1, x0), (-x3, x2), ... (GPT-J style, not NeoX halves).
    pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = pairs.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding along the sequence axis (dim -2), interleaved pairs.

    Equals ``rotary_embedding_torch.RotaryEmbedding(dim)`` 0.5.3 with its defaults (theta 10000,
    ``freqs_for="lang"``, no xpos, interpolate factor 1) as used through
    ``rotate_queries_or_keys``: positions 0..N-1 are generated in the dtype of the input, angles
    ``pos * freqs`` are computed in the dtype of ``freqs`` (bf16 after ``model.to(bf16)``),
    each angle is repeated twice, and ``out = x*cos + rotate_half(x)*sin``.

    Args:
        dim: rotated width (head_dim, 72).
        theta: base (10000).

    Keys: ``freqs`` [dim/2], a ``requires_grad=False`` Parameter = theta^(-2i/dim) (it is in every
    official checkpoint). cos/sin tables are cached per (N, device, dtype) and invalidated when
    ``freqs`` changes.
    Shapes: ``rotate_queries_or_keys(x)`` x [..., N, dim] -> same shape.
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)
        self._cache: "OrderedDict" = OrderedDict()

    def _cos_sin(self, n: int, device: torch.device, pos_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.freqs
        # Inference tensors (weights loaded under torch.inference_mode, as ComfyUI does) have no
        # version counter; they cannot be modified in place either, so their data pointer suffices.
        version = -1 if f.is_inference() else f._version
        key = (n, device, pos_dtype, f.dtype, f.device, f.data_ptr(), version, torch.is_inference_mode_enabled())
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        pos = torch.arange(n, device=device, dtype=pos_dtype).to(f.dtype)
        angles = (pos[:, None] * f.detach()[None, :]).repeat_interleave(2, dim=-1)
        hit = (angles.cos(), angles.sin())
        _cache_put(self._cache, key, hit)
        return hit

    def rotate_queries_or_keys(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(x.shape[-2], x.device, x.dtype)
        return x * cos + _rotate_half_interleaved(x) * sin


class Attention(nn.Module):
    """Multi-head self-attention with q/k RMSNorm, optional RoPE and a Cache Attention K/V hook.

    ``qkv`` (bias) -> view [B, N, 3, heads, head_dim] (features ordered q | k | v, head-major) ->
    q_norm / k_norm (RMSNorm over head_dim) -> RoPE (temporal blocks only, after the norm) ->
    SDPA (scale head_dim^-0.5, no mask) -> ``proj``.

    **K/V hook (Cache Attention).** Set ``self.kv_hook`` to a callable
    ``fn(q, k, v, block_index) -> (k, v)`` or ``-> (k, v, attn_mask)``. It is called after q/k-norm
    (and RoPE) with q, k, v shaped [B_eff, heads, N, head_dim] (for a spatial block B_eff = B·T
    with rows ordered b-major, row = b·T + t, and N = S tokens of one frame). It may return K/V
    of another length N_k (replace or concatenate) and optionally a boolean ``attn_mask``
    broadcastable to [B_eff, heads, N, N_k] (True = attend), e.g. to extend only some rows.
    With ``kv_hook`` None the forward is the plain one (one ``is None`` test).
    ``block_index`` is set by the owning model (the block's index in its list).

    Args:
        dim: model width; heads: number of heads (dim % heads == 0);
        qkv_bias: bias on ``qkv``; qk_norm: RMSNorm on q and k (else identity, no keys);
        rope: optional callable applied to q and k (a bound ``RotaryEmbedding.rotate_queries_or_keys``;
            kept as a plain attribute so the shared ``rope`` module is not duplicated in the
            state_dict).

    Shapes: x [B, N, dim] -> [B, N, dim].
    Raises: ValueError if dim % heads != 0 or a hook returns malformed K/V.
    Source: ``Attention`` in `blocks.py` (non-legacy qk-norm path).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = True,
                 rope: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.kv_hook: Optional[KVHook] = None
        self.block_index: int = 0

    def project_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v for tokens x [B, N, dim]: each [B, heads, N, head_dim], after q/k-norm and RoPE."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.project_qkv(x)
        attn_mask = None
        if self.kv_hook is not None:
            k, v, attn_mask = self._run_hook(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def _run_hook(self, q, k, v):
        res = self.kv_hook(q, k, v, self.block_index)
        if not isinstance(res, (tuple, list)) or len(res) not in (2, 3):
            raise ValueError("a kv_hook must return (k, v) or (k, v, attn_mask)")
        k2, v2 = res[0], res[1]
        mask = res[2] if len(res) == 3 else None
        if k2.ndim != 4 or v2.shape != k2.shape or k2.shape[:2] != q.shape[:2] or k2.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"kv_hook returned k {tuple(k2.shape)}, v {tuple(v2.shape)}; both must be "
                f"[{q.shape[0]}, {q.shape[1]}, N_k, {q.shape[-1]}] to match q {tuple(q.shape)}"
            )
        if mask is not None and mask.ndim < 4:  # SDPA wants the leading dims spelled out
            mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        return k2.to(q.dtype), v2.to(q.dtype), mask


@dataclass
class TextContext:
    """Caption tokens prepared once per forward for every cross-attention layer.

    Attributes:
        tokens: [B, L_max, hidden] embedded caption tokens; row b holds its L_b real tokens first
            (in their original order), then padding.
        key_mask: None when every row has L_max real tokens (then SDPA can use a mask-free fused
            kernel); else bool [B, 1, 1, L_max], True for real tokens.
        lengths: the L_b as Python ints.
    """

    tokens: torch.Tensor
    key_mask: Optional[torch.Tensor]
    lengths: Tuple[int, ...]


class MultiHeadCrossAttention(nn.Module):
    """Video tokens (queries) attend to the caption tokens of their own sample (keys/values).

    ``q_linear`` (x) -> [B, heads, N, head_dim]; ``kv_linear`` (text) -> features ordered k | v ->
    SDPA -> ``proj``. No norm, no RoPE, scale head_dim^-0.5.

    The official code packs all captions into one sequence and uses xformers' block-diagonal
    mask (sample b's N queries see only sample b's L_b text tokens). Here the captions arrive
    padded per sample (:class:`TextContext`): a batched SDPA, with a boolean key-padding mask only
    when the lengths differ. It is the same softmax over the same key set (masked keys get
    weight exactly 0). The usual CFG batch needs no mask at all, because the null caption reuses
    the conditional prompt's mask, so both rows have the same length. Then SDPA can pick
    FlashAttention, and xformers is not needed.

    Hook point (Chorus's Token-Guided Attention Amplification and its region maps): with
    :attr:`logit_hook` set, ``logit_hook(self, q, k, ctx)`` is called with q [B, heads, N, head_dim] and
    k [B, heads, L, head_dim] (model dtype; scale head_dim^-0.5 not yet applied) and returns None or an
    additive bias on the attention logits, broadcastable to [B, heads, N, L] (0 = unchanged); masked
    keys stay masked. The hook may read q and k (e.g. to record attention maps). Without a hook the
    layer runs exactly the plain path (one attribute test). :attr:`block_index` and :attr:`temporal`
    name the layer for hooks (set by STDiT3).

    Shapes: x [B, N, dim], ctx.tokens [B, L, dim] -> [B, N, dim].
    Source: ``MultiHeadCrossAttention`` in `blocks.py`.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"hidden size {d_model} is not divisible by num_heads {num_heads}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)
        self.logit_hook: Optional[CrossAttentionHook] = None
        self.block_index: int = 0
        self.temporal: bool = False

    def forward(self, x: torch.Tensor, ctx: TextContext) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        length = ctx.tokens.shape[1]
        kv = self.kv_linear(ctx.tokens).view(b, length, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        attn_mask = ctx.key_mask
        if self.logit_hook is not None:
            attn_mask = self._hooked_mask(q, k, ctx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def _hooked_mask(self, q: torch.Tensor, k: torch.Tensor, ctx: TextContext) -> Optional[torch.Tensor]:
        """The attention mask with the hook's logit bias added (the key-padding mask kept as -inf)."""
        bias = self.logit_hook(self, q, k, ctx)
        if bias is None:
            return ctx.key_mask
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if not isinstance(bias, torch.Tensor) or bias.ndim != 4 or any(
                d not in (1, f) for d, f in zip(bias.shape, full)):
            raise ValueError(f"a cross-attention logit hook must return None or a bias broadcastable to {list(full)}, "
                             f"got {getattr(bias, 'shape', type(bias).__name__)}")
        bias = bias.to(device=q.device, dtype=q.dtype)
        if ctx.key_mask is not None:
            bias = torch.where(ctx.key_mask, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))
        return bias


class T2IFinalLayer(nn.Module):
    """PixArt-style output head: affine-free LayerNorm, shift/scale from ``t``, Linear.

    ``shift, scale = scale_shift_table + t`` (rows 0 and 1); ``out = linear(LN(x)*(1+scale)+shift)``.
    Uses the 1152-d embedding ``t`` (timestep + fps), not the 6·1152 ``t_mlp``. With a frame mask,
    frames whose mask is False use the timestep-0 embedding ``t0``, applied as the official code
    does: to the LayerNorm of the already modulated tokens (``LN(h)·(1+scale0)+shift0`` with
    ``h = LN(x)·(1+scale)+shift``). The golden ``extra_xmask_cfg`` fixture confirms this.

    Args:
        hidden_size: width; num_patch: prod(patch_size); out_channels: 8 (pred_sigma) or 4.

    Keys: ``scale_shift_table`` [2, hidden], ``linear`` [num_patch·out_channels, hidden].
    Shapes: x [B, T, S, hidden], t [B, hidden], t0 [B, hidden] or None, x_mask [B, T] bool or None
    -> [B, T, S, num_patch·out_channels].
    Source: ``T2IFinalLayer`` in `blocks.py`.
    """

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, t0: Optional[torch.Tensor] = None,
                x_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # [B, 1, C] each
        h = self.norm_final(x) * (1 + scale[:, :, None]) + shift[:, :, None]
        if x_mask is not None:
            # Official quirk, kept for fidelity: the t0 branch normalises the ALREADY modulated
            # tokens (LN(LN(x)*(1+scale)+shift)*(1+scale0)+shift0), not LN(x).
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            h0 = self.norm_final(h) * (1 + scale0[:, :, None]) + shift0[:, :, None]
            h = torch.where(x_mask[:, :, None, None], h, h0)
        return self.linear(h)
