"""Fingerprints that identify weights in cache keys: of a module's state dict, or of safetensors files."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

__all__ = ["module_fingerprint", "files_fingerprint"]


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

