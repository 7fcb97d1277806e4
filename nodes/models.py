"""The values that flow between the CHAI nodes (``CHAI_*`` socket types) and how models are found.

Model sources, in the order the loaders list them:

* ``tiny (random weights, CPU test)``: the small CPU configuration of ``pipeline.tiny_components``
  (seeded random weights: noise-like frames; exercises the whole graph in seconds);
* models bundled with the pack: every folder ``<pack>/models/<name>/`` that holds a
  ``config.json`` and safetensors weights (the CPU reference model of issue 6 lives there);
* ComfyUI's model folders: ``models/opensora/`` (registered by this pack) for the STDiT3 and VAE
  weights, ``models/text_encoders/`` (and ``models/opensora/``) for T5-v1.1-XXL, e.g. ComfyUI's
  usual ``t5xxl_fp16.safetensors``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import host

__all__ = [
    "ChaiModel",
    "ChaiVAE",
    "ChaiTextEncoder",
    "ChaiConditioning",
    "TINY",
    "NO_VAE",
    "PACK_MODELS_DIR",
    "bundled_models",
    "stdit3_choices",
    "vae_choices",
    "text_encoder_choices",
    "load_stdit3",
    "load_vae",
    "load_text_encoder",
    "DTYPES",
]

TINY = "tiny (random weights, CPU test)"
NO_VAE = "none (pixel-space model, e.g. the bundled reference model)"
TINY_MINILM = "tiny: MiniLM captions (for the tiny model)"
TINY_HASHED = "tiny: hashed-word captions (for the tiny model, no model files)"
_BUNDLED_PREFIX = "pack: "
PACK_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


@dataclass
class ChaiModel:
    """``CHAI_MODEL``: an STDiT3 and what the cache key needs to know about it.

    Attributes:
        module: the ``opensora.stdit3.STDiT3`` (eval mode; on the offload device between runs).
        name: the loader choice it came from. fingerprint: identifies the weights (part of every
        cache key). size_dtype: dtype of the size conditioning (bf16 for OpenSora 1.2's files,
        fp32 for the tiny and bundled models). placement: ComfyUI memory-manager handle.
        fps: frame rate the model was trained for (OpenSora 1.2: 24).
        rflow: the ``opensora.rflow.RFlow`` sampler settings of the model (None = OpenSora 1.2's).
        pixel_space: the model denoises RGB pixels in [-1, 1] directly (no VAE; the bundled
        reference model). native_size: (height, width) in pixels used when the sampler's height
        and width are 0 (pixel-space models). default_frames: frames when the sampler says 0.
        defaults: the model's own CHAI settings (flat keys of ``pipeline.settings``; the bundled
        reference model: ``{"cfg_scale": 1.5, "full_steps": 30, "mode": "concat"}`` from its
        config.json), the layer the sampler's inputs and a settings node override
        (``pipeline.settings.resolve_settings``).
    """

    module: Any
    name: str
    fingerprint: str
    size_dtype: torch.dtype = torch.bfloat16
    fps: int = 24
    placement: Any = None
    rflow: Any = None
    pixel_space: bool = False
    native_size: Optional[Tuple[int, int]] = None
    default_frames: int = 51
    defaults: Dict[str, Any] = field(default_factory=dict)

    @property
    def cache_attention(self) -> Dict[str, Any]:
        """The model's own Cache Attention and lookup settings (its defaults without the schedule)."""
        from ..pipeline.settings import SETTING_FIELDS

        return {k: v for k, v in self.defaults.items() if SETTING_FIELDS[k][0] != "schedule"}

    @property
    def caption_channels(self) -> int:
        """Width D of the captions the model takes (4096 for OpenSora 1.2's T5-XXL)."""
        return int(self.module.config.caption_channels)

    @property
    def max_length(self) -> int:
        """Caption tokens L the model takes (300 for OpenSora 1.2)."""
        return int(self.module.config.model_max_length)


@dataclass
class ChaiVAE:
    """``CHAI_VAE``: an ``opensora.vae.OpenSoraVAE`` (or the tiny one) with its placement handle;
    ``module`` is None for the ``none`` choice (pixel-space models need no VAE)."""

    module: Any
    name: str
    placement: Any = None


@dataclass
class ChaiTextEncoder:
    """``CHAI_TEXT_ENCODER``: a caption encoder of ``pipeline`` (``T5Captions``, ``MiniLMCaptions``
    or ``HashedWordCaptions``: ``encode(prompt) -> (y [1,1,L,D], mask [1,L])`` and ``fingerprint``)
    with the placement handle of its torch model (T5 only)."""

    captions: Any
    name: str
    placement: Any = None

    @property
    def fingerprint(self) -> str:
        """Identifies the caption weights (part of every cache key)."""
        return str(self.captions.fingerprint)


@dataclass
class ChaiConditioning:
    """``CHAI_CONDITIONING``: one encoded prompt.

    Attributes:
        prompt: the text. y: caption embedding [1, 1, L, D] float32 on the intermediate device
        (CPU). mask: [1, L] int64, 1 for real tokens. fingerprint: the encoder's fingerprint.
        encoder: the loader choice of the encoder. text_encoder: the ``ChaiTextEncoder`` that made it
        (Chorus encodes a donor's prompt and maps caption tokens to words with it), or None.
    """

    prompt: str
    y: torch.Tensor
    mask: torch.Tensor
    fingerprint: str
    encoder: str = ""
    text_encoder: Any = None

    @property
    def length(self) -> int:
        """Caption tokens L."""
        return int(self.y.shape[-2])

    @property
    def channels(self) -> int:
        """Caption width D."""
        return int(self.y.shape[-1])


# ------------------------------------------------------------------------------ discovery


def bundled_models() -> Dict[str, Path]:
    """``{choice label: folder}`` for every ``<pack>/models/<name>/`` holding a ``config.json``
    and at least one ``.safetensors`` file (labels ``"pack: <name>"``)."""
    found: Dict[str, Path] = {}
    if not PACK_MODELS_DIR.is_dir():
        return found
    for folder in sorted(p for p in PACK_MODELS_DIR.iterdir() if p.is_dir()):
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            found[_BUNDLED_PREFIX + folder.name] = folder
    return found


def _collapse_shards(names: List[str]) -> List[str]:
    """Sharded HF checkpoints (``model-00001-of-00002.safetensors``) are listed once, as their folder."""
    out: List[str] = []
    for name in names:
        if _SHARD.search(name):
            folder = name.rsplit("/", 1)[0] + "/" if "/" in name else name
            if folder not in out:
                out.append(folder)
        elif name.endswith(".safetensors"):
            out.append(name)
    return out


def _opensora_files(kind: str) -> List[str]:
    names = _collapse_shards(host.model_folder_files(host.OPENSORA_FOLDER))
    low = [n.lower() for n in names]
    if kind == "vae":
        return [n for n, lo in zip(names, low) if "vae" in lo]
    if kind == "t5":
        return [n for n, lo in zip(names, low) if "t5" in lo]
    return [n for n, lo in zip(names, low) if "vae" not in lo and "t5" not in lo]


def stdit3_choices() -> List[str]:
    """STDiT3 loader choices: tiny, bundled models, then ``models/opensora`` files."""
    return [TINY] + list(bundled_models()) + _opensora_files("stdit3")


def vae_choices() -> List[str]:
    """VAE loader choices: tiny, bundled models (those with VAE weights), ``models/opensora`` VAE files."""
    bundled = [k for k, p in bundled_models().items() if _bundled_vae_files(p)]
    return [TINY] + bundled + _opensora_files("vae") + [NO_VAE]


def text_encoder_choices() -> List[str]:
    """Text-encoder choices: the tiny encoders, bundled models' caption encoders, then T5 files
    from ``models/text_encoders`` (names containing "t5") and ``models/opensora``."""
    bundled = [k for k, p in bundled_models().items() if _caption_spec(p) is not None]
    t5 = [n for n in _collapse_shards(host.model_folder_files("text_encoders")) if "t5" in n.lower()]
    return [TINY_MINILM, TINY_HASHED] + bundled + t5 + [n for n in _opensora_files("t5") if n not in t5]


# ------------------------------------------------------------------------------ loading


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return host.default_dtype() if name == "auto" else getattr(torch, name)


def _read_config(folder: Path) -> Dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{folder / 'config.json'} must hold a JSON object")
    return data


def _is_reference_layout(cfg: Dict[str, Any]) -> bool:
    """A ``refmodel`` checkpoint folder: config.json with ``stdit3``, ``clip`` and ``sampler`` sections."""
    return all(isinstance(cfg.get(k), dict) for k in ("stdit3", "clip", "sampler"))


def _caption_spec(folder: Path) -> Optional[Dict[str, Any]]:
    """How a bundled model's captions are made: ``{"kind": "minilm-states"|"minilm"|"hashed", ...}`` or None."""
    try:
        cfg = _read_config(folder)
    except ValueError:
        return None
    te = cfg.get("text_encoder")
    if isinstance(te, dict) and "minilm" in str(te.get("name", "")).lower():
        return {"kind": "minilm-states", "max_length": int(te.get("max_length", cfg.get("stdit3", cfg).get("model_max_length", 32)))}
    spec = cfg.get("captions")
    return dict(spec) if isinstance(spec, dict) else None


def _bundled_vae_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if "vae" in p.name.lower())


def _resolve_folder_file(key: str, choice: str, what: str) -> Path:
    """Full path of a model-folder choice; a clear error when it vanished or ComfyUI is absent."""
    if choice.endswith("/"):
        for folder_name in (key, host.OPENSORA_FOLDER):
            fp = host.folder_paths()
            for base in (fp.get_folder_paths(folder_name) if fp is not None else []):
                cand = Path(base) / choice
                if cand.is_dir():
                    return cand
    path = host.model_folder_path(key, choice)
    if path is None or not path.exists():
        where = f"ComfyUI/models/{key}/"
        raise FileNotFoundError(
            f"{what} {choice!r} was not found in {where}. Put the safetensors file (or its folder) there and "
            f"press 'r' in ComfyUI to refresh the list, or pick '{TINY}' to try the graph without weights")
    return path


def load_stdit3(choice: str, dtype: str = "auto") -> ChaiModel:
    """Build the ``CHAI_MODEL`` for a loader choice (weights on the CPU until a sampler runs).

    Raises:
        FileNotFoundError: the file is gone (the message says where it belongs).
        opensora.loading.CheckpointFormatError / StateDictMismatchError: not OpenSora 1.2 STDiT3
        weights (every bad key listed).
        ValueError: a bad dtype or config.
    """
    from ..opensora.loading import build_and_load
    from ..opensora.stdit3 import STDiT3, STDiT3Config, stdit3_xl2_config
    from ..pipeline import files_fingerprint, module_fingerprint, tiny_components

    if choice == TINY:
        model, _vae, _enc = tiny_components(0)
        if dtype not in ("auto", "float32"):
            model = model.to(_dtype(dtype))
        return ChaiModel(model, TINY, module_fingerprint(model, "stdit3-tiny"), torch.float32,
                         placement=host.Placement(model, "diffusion"), default_frames=17)
    bundled = bundled_models()
    if choice in bundled and _is_reference_layout(_read_config(bundled[choice])):
        from ..opensora.rflow import RFlow
        from ..refmodel.model import cache_attention_defaults, load_reference_model

        folder = bundled[choice]
        cfg = _read_config(folder)
        model, _enc = load_reference_model(folder, device="cpu")
        if dtype not in ("auto", "float32"):
            model = model.to(_dtype(dtype))
        clip = cfg["clip"]
        sampler = {k: v for k, v in cfg["sampler"].items() if k in RFlow.__dataclass_fields__}
        pixel = not _bundled_vae_files(folder)
        return ChaiModel(model, choice, str(model.fingerprint), torch.float32, fps=int(clip.get("fps", 24)),
                         placement=host.Placement(model, "diffusion"), rflow=RFlow(**sampler), pixel_space=pixel,
                         native_size=(int(clip["height"]), int(clip["width"])),
                         default_frames=int(clip.get("num_frames", 8)),
                         defaults=cache_attention_defaults(cfg))
    if choice in bundled:
        folder = bundled[choice]
        cfg = _read_config(folder)
        section = cfg.get("stdit3", cfg)
        known = {f for f in STDiT3Config.__dataclass_fields__}
        scfg = STDiT3Config.from_dict({k: v for k, v in section.items() if k in known})
        weights = [p for p in sorted(folder.glob("*.safetensors")) if "vae" not in p.name.lower()]
        if not weights:
            raise FileNotFoundError(f"{folder} holds no STDiT3 safetensors file (names without 'vae')")
        torch_dtype = torch.float32 if dtype == "auto" else _dtype(dtype)
        model = build_and_load(lambda: STDiT3(scfg), weights, dtype=torch_dtype, device="cpu")
        model.init_non_persistent_buffers()
        fps = int(cfg.get("fps", 24))
        return ChaiModel(model, choice, f"stdit3-{files_fingerprint(weights)}", torch.float32, fps=fps,
                         placement=host.Placement(model, "diffusion"))
    path = _resolve_folder_file(host.OPENSORA_FOLDER, choice, "STDiT3 weights")
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    scfg = STDiT3Config.from_dict(json.loads(cfg_file.read_text(encoding="utf-8"))) if cfg_file.is_file() \
        else stdit3_xl2_config()
    model = build_and_load(lambda: STDiT3(scfg), path, dtype=_dtype(dtype), device="cpu")
    model.init_non_persistent_buffers()
    return ChaiModel(model, choice, f"stdit3-{files_fingerprint(path)}", torch.bfloat16,
                     placement=host.Placement(model, "diffusion"))


def load_vae(choice: str, dtype: str = "auto") -> ChaiVAE:
    """Build the ``CHAI_VAE`` for a loader choice (OpenSora VAE v1.2 or the tiny one).

    Raises:
        FileNotFoundError, CheckpointFormatError, StateDictMismatchError, ValueError: as
        :func:`load_stdit3`.
    """
    from ..opensora.loading import build_and_load
    from ..opensora.vae import OpenSoraVAE
    from ..pipeline import tiny_components

    if choice == NO_VAE:
        return ChaiVAE(None, NO_VAE, None)
    if choice == TINY:
        _model, vae, _enc = tiny_components(0)
        if dtype not in ("auto", "float32"):
            vae = vae.to(_dtype(dtype))
        return ChaiVAE(vae, TINY, host.Placement(vae, "vae"))
    bundled = bundled_models()
    if choice in bundled:
        folder = bundled[choice]
        files = _bundled_vae_files(folder)
        if not files:
            raise FileNotFoundError(f"{folder} holds no VAE weights (a .safetensors file with 'vae' in its name)")
        vcfg = _read_config(folder).get("vae", {})
        factory = (lambda: OpenSoraVAE(spatial_config=vcfg.get("spatial"), temporal_config=vcfg.get("temporal")))
        torch_dtype = torch.float32 if dtype == "auto" else _dtype(dtype)
        vae = build_and_load(factory, files, dtype=torch_dtype, device="cpu")
        return ChaiVAE(vae, choice, host.Placement(vae, "vae"))
    path = _resolve_folder_file(host.OPENSORA_FOLDER, choice, "OpenSora VAE weights")
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        pipe_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        factory = lambda: OpenSoraVAE.from_official_config(pipe_cfg)  # noqa: E731
    else:
        factory = lambda: OpenSoraVAE()  # noqa: E731
    vae = build_and_load(factory, path, dtype=_dtype(dtype), device="cpu")
    return ChaiVAE(vae, choice, host.Placement(vae, "vae"))


def _t5_tokenizer_for(path: Path) -> Path:
    """Tokenizer folder of a T5 weight file: the file's folder when it holds one, a ``tokenizer``
    folder beside it, else ComfyUI's bundled ``comfy/text_encoders/t5_tokenizer``."""
    folder = path if path.is_dir() else path.parent
    for cand in (folder, folder / "tokenizer", folder / "t5_tokenizer"):
        if (cand / "tokenizer.json").is_file() or (cand / "spiece.model").is_file():
            return cand
    comfy = host.comfy_module("comfy")
    if comfy is not None and getattr(comfy, "__file__", None):
        cand = Path(comfy.__file__).parent / "text_encoders" / "t5_tokenizer"
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"no T5 tokenizer found for {path}: put tokenizer.json (or spiece.model) in a 'tokenizer' folder beside it")


def load_text_encoder(choice: str, dtype: str = "float32") -> ChaiTextEncoder:
    """Build the ``CHAI_TEXT_ENCODER`` for a loader choice.

    T5-v1.1-XXL (OpenSora 1.2's encoder) runs in fp32 by default, as OpenSora does (fp16
    overflows in T5 v1.1). The tiny encoders give 64-wide, 24-token captions for the tiny model.

    Raises:
        FileNotFoundError: weights or tokenizer missing (the message says where they belong).
        CheckpointFormatError / StateDictMismatchError: not a T5 encoder.
        ValueError: a bundled model whose config has no usable ``captions`` section.
    """
    from ..pipeline import (TINY_STDIT3_CONFIG, HashedWordCaptions, MiniLMCaptions, T5Captions,
                            files_fingerprint)

    if choice == TINY_MINILM:
        enc = MiniLMCaptions(TINY_STDIT3_CONFIG["caption_channels"], TINY_STDIT3_CONFIG["model_max_length"], seed=0)
        return ChaiTextEncoder(enc, choice)
    if choice == TINY_HASHED:
        enc = HashedWordCaptions(TINY_STDIT3_CONFIG["caption_channels"], TINY_STDIT3_CONFIG["model_max_length"], 0)
        return ChaiTextEncoder(enc, choice)
    bundled = bundled_models()
    if choice in bundled and (_caption_spec(bundled[choice]) or {}).get("kind") == "minilm-states":
        from ..refmodel.model import MiniLMTokenStates

        enc = MiniLMTokenStates(max_length=_caption_spec(bundled[choice])["max_length"])
        return ChaiTextEncoder(enc, choice)
    if choice in bundled:
        cfg = _read_config(bundled[choice])
        spec = cfg.get("captions") or {}
        section = cfg.get("stdit3", cfg)
        channels = int(spec.get("channels", section.get("caption_channels", 0)))
        length = int(spec.get("max_length", section.get("model_max_length", 0)))
        kind = spec.get("kind", "minilm")
        if kind == "minilm":
            enc = MiniLMCaptions(channels, length, seed=int(spec.get("seed", 0)))
        elif kind == "hashed":
            enc = HashedWordCaptions(channels, length, seed=int(spec.get("seed", 0)))
        else:
            raise ValueError(f"{bundled[choice] / 'config.json'}: captions kind {kind!r} is not 'minilm' or 'hashed'")
        return ChaiTextEncoder(enc, choice)
    from ..opensora.text import T5TextEncoder

    path = None
    for key in ("text_encoders", host.OPENSORA_FOLDER):
        try:
            path = _resolve_folder_file(key, choice, "T5 weights")
            break
        except FileNotFoundError as exc:
            error = exc
    if path is None:
        raise error
    tokenizer = _t5_tokenizer_for(path)
    torch_dtype = torch.float32 if dtype == "auto" else _dtype(dtype)
    encoder = T5TextEncoder.from_files(path, tokenizer, dtype=torch_dtype, device="cpu")
    captions = T5Captions(encoder, files_fingerprint(path))
    return ChaiTextEncoder(captions, choice, host.Placement(encoder.model, "text"))
