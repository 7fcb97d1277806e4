"""Safe, strict, memory-frugal weight loading from safetensors files.

Only safetensors files are read: pickle-based checkpoints (.pt, .pth, .bin, .ckpt, ...) can run
arbitrary code when loaded and are refused with a message that says how to get a safetensors file.

Loading does not hold two copies of a model in memory: build the model with `empty_parameters()`
(parameters on the meta device, so nothing is allocated for them), then `load_model` reads the
file tensor by tensor through `safetensors.safe_open` (memory-mapped), converts each tensor to the
requested dtype on the requested device, and assigns it into the module with
`load_state_dict(..., assign=True)`. A 4.8 GB fp32 STDiT3-XL/2 file therefore needs about 4.8 GB of
RAM (2.4 GB when loaded as bf16), not twice that.

Key checks are strict by default: the error lists every missing key, unexpected key and key whose
shape differs, with both shapes.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "CheckpointFormatError",
    "StateDictMismatchError",
    "TensorInfo",
    "PICKLE_SUFFIXES",
    "check_safetensors_file",
    "resolve_safetensors_files",
    "read_tensor_infos",
    "load_state_dict",
    "assign_state_dict",
    "load_model",
    "empty_parameters",
    "build_and_load",
]

PathLike = Union[str, os.PathLike]

#: File suffixes of pickle-based checkpoints, which are never opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".pt2", ".tar")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own header limit
_LIST_LIMIT = 20  # keys listed per category in error messages
_REOPEN_BYTES = 256 * 1024 * 1024  # bytes read per open file handle (bounds resident mapped pages)

_CONVERT_HINT = (
    "Download the .safetensors version of these weights instead (OpenSora 1.2: hpcai-tech/OpenSora-STDiT-v3 and "
    "hpcai-tech/OpenSora-VAE-v1.2 ship model.safetensors; T5: ComfyUI's t5xxl_fp16.safetensors), or convert the file "
    "once, on a machine and with a source you trust, by reading it with torch's own loader (weights_only=True) "
    "and writing the state dict with safetensors.torch.save_file. This pack never unpickles files itself."
)


class CheckpointFormatError(ValueError):
    """A weight file that is missing, not a safetensors file (e.g. a pickle checkpoint), or damaged."""


class StateDictMismatchError(ValueError):
    """Keys or shapes of a weight file do not match the model.

    Attributes:
        missing: keys the model needs that the file lacks.
        unexpected: keys in the file the model does not have.
        mismatched: (key, shape in file, shape in model) for keys present in both with different shapes.
    """

    def __init__(
        self,
        source: str,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[Tuple[str, Tuple[int, ...], Tuple[int, ...]]],
        hint: str = "",
    ):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [f"weights in {source} do not match the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {_head(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {_head(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
            lines.append(f"  mis-shaped keys ({len(self.mismatched)}): {_head(shown)}")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one tensor in a safetensors file (read from the header, no data loaded)."""

    shape: Tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "F32", "BF16", "F16", "F8_E4M3"


def _head(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


def check_safetensors_file(path: PathLike) -> Path:
    """Make sure `path` is a readable safetensors file before anything else touches it.

    Looks at the suffix and the first bytes (a safetensors file starts with an 8-byte little-endian
    header length followed by a JSON object), so a renamed pickle is refused too.

    Returns:
        the path as a `Path`.

    Raises:
        CheckpointFormatError: the file does not exist, is a pickle/zip checkpoint, a Git LFS pointer,
            truncated, or otherwise not safetensors. The message says what to do.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        hint = " (it is a folder; pass the .safetensors file inside it)" if p.is_dir() else ""
        raise CheckpointFormatError(f"weight file not found: {p}{hint}")
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointFormatError(
            f"{p.name} is a pickle checkpoint ({suffix}); this pack only reads .safetensors files, because loading a "
            f"pickle can run arbitrary code. {_CONVERT_HINT}"
        )
    size = p.stat().st_size
    with p.open("rb") as fh:
        head = fh.read(32)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointFormatError(
            f"{p} is a Git LFS pointer, not the weights; download the real file (e.g. `git lfs pull` or the "
            "'download' button on the model page)"
        )
    looks_safetensors = len(head) >= 9 and head[8:9] == b"{"
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    if not looks_safetensors or header_len > _MAX_HEADER_BYTES:
        # Only now look for pickle magic: a safetensors header length may start with any byte.
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            raise CheckpointFormatError(
                f"{p.name} holds a pickle checkpoint (torch.save format) despite its name; this pack only reads "
                f"safetensors. {_CONVERT_HINT}"
            )
        if len(head) < 9:
            raise CheckpointFormatError(f"{p} is too small ({size} bytes) to be a safetensors file; download it again")
        raise CheckpointFormatError(f"{p} is not a safetensors file (bad header); check that you picked the right file")
    if 8 + header_len > size:
        raise CheckpointFormatError(f"{p} is truncated ({size} bytes, header says more); download it again")
    return p


def resolve_safetensors_files(path: PathLike) -> List[Path]:
    """The safetensors file(s) holding a model: a file, or a folder with one file or an HF shard index.

    A folder may contain `*.safetensors.index.json` (HF sharded checkpoints; its `weight_map` names the
    shards) or exactly one `*.safetensors` file.

    Raises:
        CheckpointFormatError: nothing loadable found (e.g. the folder only holds pickle `.bin` files).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return [check_safetensors_file(p)]
    if not p.is_dir():
        raise CheckpointFormatError(f"weights not found: {p}")
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointFormatError(f"{p} holds several shard indexes ({[i.name for i in indexes]}); pass one file")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointFormatError(f"cannot read shard index {indexes[0]}: {exc}") from exc
        return [check_safetensors_file(p / name) for name in sorted(set(weight_map.values()))]
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return [check_safetensors_file(files[0])]
    if len(files) > 1:
        raise CheckpointFormatError(f"{p} holds several .safetensors files without an index; pass the one to load")
    pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointFormatError(
            f"{p} only holds pickle checkpoints ({', '.join(pickles[:4])}); this pack only reads safetensors. "
            f"{_CONVERT_HINT}"
        )
    raise CheckpointFormatError(f"no .safetensors file in {p}")


def _as_files(paths: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return resolve_safetensors_files(paths)
    files: List[Path] = []
    for item in paths:
        files.extend(resolve_safetensors_files(item))
    if not files:
        raise CheckpointFormatError("no weight files given")
    return files


@contextlib.contextmanager
def _open(path: Path, device: str = "cpu"):
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointFormatError(f"cannot read {path} as safetensors ({exc}); the file may be damaged") from exc
    with handle as f:
        yield f


def read_tensor_infos(paths: Union[PathLike, Sequence[PathLike]]) -> Dict[str, TensorInfo]:
    """Names, shapes and dtypes of every tensor in the file(s), read from the headers only.

    Raises:
        CheckpointFormatError: see `check_safetensors_file`, or a key present in two shards.
    """
    infos: Dict[str, TensorInfo] = {}
    for path in _as_files(paths):
        with _open(path) as f:
            for key in f.keys():
                if key in infos:
                    raise CheckpointFormatError(f"tensor {key!r} appears in more than one file ({path})")
                sl = f.get_slice(key)
                infos[key] = TensorInfo(shape=tuple(int(s) for s in sl.get_shape()), dtype=str(sl.get_dtype()))
    return infos


def _select(key: str, prefix: Optional[str], ignore: Sequence[str]) -> Optional[str]:
    if prefix:
        if not key.startswith(prefix):
            return None
        key = key[len(prefix):]
    if any(key.startswith(i) for i in ignore):
        return None
    return key


def _iter_tensors(
    files: Sequence[Path],
    *,
    prefix: Optional[str],
    ignore: Sequence[str],
    device: torch.device,
    dtype: Optional[torch.dtype],
) -> Iterator[Tuple[str, torch.Tensor]]:
    # safetensors can only place tensors on cpu or a cuda device directly; others go through cpu.
    direct = device.type in ("cpu", "cuda")
    open_device = str(device) if direct else "cpu"
    for path in files:
        with _open(path) as f:
            keys = [k for k in f.keys() if _select(k, prefix, ignore) is not None]
        start = 0
        while start < len(keys):
            # The file stays memory-mapped while its handle is open, so pages read for a tensor that
            # is then converted (dtype or device) would stay resident: reopen every _REOPEN_BYTES.
            read = 0
            with _open(path, open_device) as f:
                while start < len(keys) and read < _REOPEN_BYTES:
                    key = keys[start]
                    start += 1
                    t = f.get_tensor(key)
                    read += t.numel() * t.element_size()
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    if not direct:
                        t = t.to(device)
                    yield _select(key, prefix, ignore), t


def load_state_dict(
    paths: Union[PathLike, Sequence[PathLike]],
    *,
    prefix: Optional[str] = None,
    ignore: Sequence[str] = (),
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
) -> Dict[str, torch.Tensor]:
    """Read tensors from safetensors file(s) into a dict, one tensor at a time.

    Args:
        paths: a .safetensors file, a folder (see `resolve_safetensors_files`) or a list of them.
        prefix: keep only keys starting with this prefix and remove it (e.g. "model." or
            "text_encoders.t5xxl.transformer."); other keys are skipped.
        ignore: key prefixes (after `prefix` removal) to skip, e.g. ("decoder.", "lm_head.").
        dtype: cast floating tensors to this dtype (integer tensors keep theirs); None keeps the file's.
        device: where the tensors are placed (cpu and cuda are loaded there directly).

    Returns:
        {key: tensor} in file order.

    Raises:
        CheckpointFormatError: not a safetensors file (pickles are refused), damaged, or duplicate keys.
    """
    device = torch.device(device)
    out: Dict[str, torch.Tensor] = {}
    for name, t in _iter_tensors(_as_files(paths), prefix=prefix, ignore=ignore, device=device, dtype=dtype):
        if name in out:
            raise CheckpointFormatError(f"tensor {name!r} appears twice after removing prefix {prefix!r}")
        out[name] = t
    return out


def _expected_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def _mismatch(
    expected: Mapping[str, Tuple[int, ...]], found: Mapping[str, Tuple[int, ...]]
) -> Tuple[List[str], List[str], List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]]:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [(k, tuple(found[k]), tuple(expected[k])) for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    return missing, unexpected, mismatched


def _prefix_hint(missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """Suggest a prefix when every file key is a model key with something in front of it."""
    if not missing or not unexpected:
        return ""
    probe = missing[0]
    present = set(unexpected)
    for key in unexpected:
        if key.endswith("." + probe):
            prefix = key[: len(key) - len(probe)]
            if all(prefix + k in present for k in missing):
                return f"hint: the file's keys carry the prefix {prefix!r}; load with prefix={prefix!r}"
    for key in missing:
        if key.endswith("." + unexpected[0]):
            extra = key[: len(key) - len(unexpected[0])]
            return f"hint: the model's keys start with {extra!r} but the file's do not; is this the right file?"
    return ""


def _check_no_meta(model: nn.Module, source: str) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise StateDictMismatchError(
            source,
            left,
            [],
            [],
            hint="these tensors were never loaded and have no values (the model was built with empty_parameters())",
        )


def assign_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    source: str = "the state dict",
) -> nn.Module:
    """Put `state_dict`'s tensors into `model` without copying them (load_state_dict(assign=True)).

    After assignment the model is moved with `model.to(device, dtype)`, which only touches tensors
    not already there (buffers outside the state dict such as cached position tables), matching
    OpenSora's `model.to(device, dtype)` after loading.

    Args:
        model: the module; may have been built with `empty_parameters()`.
        state_dict: {key: tensor} (already on the target device and dtype to avoid copies).
        strict: True (default) refuses any missing, unexpected or mis-shaped key; False loads the
            matching keys but still refuses mis-shaped keys and parameters left on the meta device.
        dtype, device: final floating dtype and device of the whole model (None keeps them).
        source: name of where the weights came from, for error messages.

    Returns:
        the model (same object); its train/eval mode is left as it was.

    Raises:
        StateDictMismatchError: key or shape mismatches (all of them listed).
    """
    expected = _expected_shapes(model)
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing, unexpected, mismatched = _mismatch(expected, found)
    if mismatched or (strict and (missing or unexpected)):
        raise StateDictMismatchError(source, missing, unexpected, mismatched, _prefix_hint(missing, unexpected))
    usable = {k: v for k, v in state_dict.items() if k in expected}
    model.load_state_dict(usable, strict=strict, assign=True)
    _check_no_meta(model, source)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def load_model(
    model: nn.Module,
    paths: Union[PathLike, Sequence[PathLike]],
    *,
    strict: bool = True,
    prefix: Optional[str] = None,
    ignore: Sequence[str] = (),
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """Load safetensors weights into `model` with strict key and shape checks, tensor by tensor.

    The file's header is checked against the model before any tensor is read, so a wrong file fails
    fast. Tensors are read memory-mapped, cast to `dtype` on `device` one at a time and assigned
    into the model (no second copy of the model is ever held).

    Args:
        model: the module to fill; build it inside `empty_parameters()` to avoid allocating it twice.
        paths: a .safetensors file, a folder holding one (or an HF shard index), or a list of files.
        strict: refuse missing and unexpected keys (default True). Mis-shaped keys are always refused.
        prefix: only load keys with this prefix, with the prefix removed (files that wrap the model,
            e.g. "model." or "module.").
        ignore: key prefixes (after prefix removal) to skip, e.g. ("decoder.",).
        dtype: floating dtype of the loaded model (e.g. torch.bfloat16); None keeps the file's dtype
            for loaded tensors and the model's for the rest.
        device: device of the loaded model (default: cpu).

    Returns:
        the same `model`, loaded.

    Raises:
        CheckpointFormatError: not safetensors (pickles refused with a conversion hint), missing, damaged.
        StateDictMismatchError: missing / unexpected / mis-shaped keys, every one listed.
    """
    files = _as_files(paths)
    source = ", ".join(str(f) for f in files)
    infos = read_tensor_infos(files)
    found: Dict[str, Tuple[int, ...]] = {}
    for key, info in infos.items():
        name = _select(key, prefix, ignore)
        if name is not None:
            found[name] = info.shape
    expected = _expected_shapes(model)
    missing, unexpected, mismatched = _mismatch(expected, found)
    if mismatched or (strict and (missing or unexpected)):
        raise StateDictMismatchError(source, missing, unexpected, mismatched, _prefix_hint(missing, unexpected))
    target = torch.device(device) if device is not None else torch.device("cpu")
    state = {
        name: t
        for name, t in _iter_tensors(files, prefix=prefix, ignore=ignore, device=target, dtype=dtype)
        if name in expected
    }
    return assign_state_dict(model, state, strict=strict, dtype=dtype, device=target, source=source)


@contextlib.contextmanager
def empty_parameters(include: Callable[[nn.Module, str], bool] = lambda module, name: True):
    """Build modules whose parameters live on the meta device (no memory), keeping buffers real.

    Inside the block every `nn.Parameter` registered on any module is moved to the meta device right
    after registration, so constructors and their init code cost nothing; buffers (e.g. position
    tables that are not in the state dict) are created normally. Fill the model afterwards with
    `load_model` / `assign_state_dict`, which refuse to leave any parameter on meta.

    Args:
        include: ``fn(module, name) -> bool`` choosing which parameters go to meta (default: all).

    Not thread-safe: it patches `nn.Module.register_parameter` for the duration of the block.
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta and include(module, name):
            current = module._parameters[name]
            module._parameters[name] = type(current)(current.to("meta"), requires_grad=current.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_and_load(
    factory: Callable[[], nn.Module],
    paths: Union[PathLike, Sequence[PathLike]],
    **kwargs,
) -> nn.Module:
    """`factory()` under `empty_parameters()`, then `load_model(model, paths, **kwargs)`, for inference.

    The returned model is in eval mode with gradients turned off (`requires_grad_(False)`).

    Example: ``build_and_load(lambda: STDiT3(**cfg), "model.safetensors", dtype=torch.bfloat16, device="cuda")``.

    Raises:
        the errors of `load_model`.
    """
    with empty_parameters():
        model = factory()
    return load_model(model, paths, **kwargs).eval().requires_grad_(False)

