"""What a :class:`.core.ChaiPipeline` is built from, per model family: the small CPU configuration
(seeded random weights), the bundled reference model (``refmodel/``) and the real OpenSora 1.2 files;
plus the help that weight-file errors carry (which file, where it comes from, where ComfyUI keeps it).

Each ``*_parts`` function returns the keyword arguments of the :class:`.core.ChaiPipeline` constructor
(model, VAE, captions, the model's own settings, fingerprint, sampler, geometry); the builders
``ChaiPipeline.tiny`` / ``.reference`` / ``.from_reference_model`` / ``.from_files`` add the lookup and
the user's settings. A new model family is one ``*_parts`` function and one builder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..opensora.rflow import RFlow
from ..opensora.stdit3 import STDiT3, STDiT3Config, stdit3_xl2_config
from ..opensora.vae import OpenSoraVAE
from .captions import HashedWordCaptions, MiniLMCaptions, T5Captions
from .fingerprints import files_fingerprint

__all__ = [
    "TINY_STDIT3_CONFIG",
    "TINY_VAE_SPATIAL_CONFIG",
    "TINY_VAE_TEMPORAL_CONFIG",
    "OPENSORA_WEIGHT_FILES",
    "tiny_components",
    "tiny_parts",
    "reference_parts",
    "opensora_parts",
]

# ------------------------------------------------------------------------------------ tiny config

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



def tiny_parts(seed: int = 0, captions: str = "hashed") -> Dict[str, Any]:
    """Pipeline parts of the small CPU configuration (:func:`tiny_components`; size conditioning in fp32)."""
    model, vae, enc = tiny_components(seed, captions)
    return dict(model=model, vae=vae, captions=enc, size_dtype=torch.float32)


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

# ------------------------------------------------------------------------------------ builders


def reference_parts(model: torch.nn.Module, encoder: Any) -> Dict[str, Any]:
    """Pipeline parts of the bundled CPU reference model, loaded by ``refmodel.model.load_reference_model``
    (the model with its ``reference_config`` and ``fingerprint``, and its caption encoder).

    A pixel-space pipeline: the model (a 3-block STDiT3, 1.9 M parameters, trained on ``refmodel.scenes``
    shape videos) denoises 8-frame 32 x 32 RGB clips in [-1, 1]; captions are all-MiniLM-L6-v2 token
    states. Sampler settings come from the folder's ``config.json`` ("sampler": RFLOW without
    OpenSora's timestep shift); its CHAI settings (``refmodel.model.cache_attention_defaults``: CFG,
    steps, the "cache_attention" section) are the model-defaults layer; the size conditioning is fp32;
    the cache key holds the SHA-256 of ``model.safetensors``, so entries of another checkpoint are
    never served.
    """
    from ..refmodel.model import cache_attention_defaults

    cfg = model.reference_config
    sampler = dict(cfg["sampler"])
    clip = cfg["clip"]
    return dict(model=model, vae=None, captions=encoder, model_defaults=cache_attention_defaults(cfg),
                model_fingerprint=str(model.fingerprint), size_dtype=torch.float32,
                rflow=RFlow(**{k: v for k, v in sampler.items() if k in RFlow.__dataclass_fields__}),
                pixel_space=True, native_size=(int(clip["height"]), int(clip["width"])),
                default_frames=int(clip["num_frames"]), fps=int(clip.get("fps", 24)))


def opensora_parts(stdit3: Union[str, Path], vae: Optional[Union[str, Path]], t5: Union[str, Path],
                   tokenizer: Optional[Union[str, Path]] = None, *, device: Union[str, torch.device] = "cpu",
                   dtype: torch.dtype = torch.float32, t5_dtype: torch.dtype = torch.float32,
                   vae_spatial_config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Pipeline parts of the real OpenSora 1.2 weights (safetensors only, without a second copy in memory).

    Args:
        stdit3: ``model.safetensors`` of ``hpcai-tech/OpenSora-STDiT-v3``, or its folder (its
            ``config.json`` is used when present; else the XL/2 configuration).
        vae: ``model.safetensors`` of ``hpcai-tech/OpenSora-VAE-v1.2`` or its folder (a
            ``config.json`` there is read as the official pipeline config), or None.
        t5: T5-v1.1-XXL: an HF folder or a single file such as ComfyUI's ``t5xxl_fp16.safetensors``.
        tokenizer: T5 tokenizer folder (required for a single T5 file; default the T5 folder).
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
    from ..opensora.loading import CheckpointFormatError, StateDictMismatchError, build_and_load
    from ..opensora.text import T5TextEncoder

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
    return dict(model=model, vae=vae_model, captions=captions,
                model_fingerprint=f"stdit3-{files_fingerprint(stdit_path)}")
