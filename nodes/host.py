"""Everything the nodes need from the ComfyUI host, reached lazily so the pack imports without it.

ComfyUI imports ``comfy``, ``folder_paths`` and ``server`` before it loads custom nodes, so this
module only *looks them up* in ``sys.modules`` and never imports them itself: outside ComfyUI
(tests, the command line) every helper degrades to a plain-Python behaviour that is stated in
its docstring (CPU placement, no progress bar, no interruption, no websocket event).

Host APIs used (reference/comfyui.md sections 1.9, 1.10, 1.13-1.15, 7, 8):
``comfy.utils.ProgressBar``, ``comfy.model_management`` (``get_torch_device``,
``unet_offload_device``, ``load_models_gpu``, ``soft_empty_cache``, ``processing_interrupted``,
``throw_exception_if_processing_interrupted``, ``InterruptProcessingException``),
``comfy.model_patcher.ModelPatcher``, ``folder_paths`` and ``server.PromptServer``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = [
    "comfy_module",
    "folder_paths",
    "prompt_server",
    "in_comfyui",
    "ProgressReporter",
    "interrupted",
    "raise_interrupted",
    "Placement",
    "register_model_folders",
    "model_folder_files",
    "models_root",
    "send_event",
    "model_compute",
    "log",
]

log = logging.getLogger("comfyui_chai.nodes")

#: ComfyUI model-folder key registered for OpenSora weights (``models/opensora``).
OPENSORA_FOLDER = "opensora"
_WEIGHT_EXTENSIONS = {".safetensors", ".json"}


def comfy_module(name: str) -> Optional[Any]:
    """A ComfyUI module (e.g. ``"comfy.model_management"``) when running inside ComfyUI, else None.

    Only modules of an already-imported ``comfy`` package are imported: outside ComfyUI nothing is
    imported (importing ``comfy.model_management`` without ComfyUI's ``--cpu`` argument parsing
    raises on CPU-only torch, reference/comfyui.md section 1.10).
    """
    if "comfy" not in sys.modules:
        return None
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        import importlib

        return importlib.import_module(name)
    except Exception as exc:  # a host too old or too new for this helper: degrade, say so once
        log.warning("ComfyUI module %s unavailable (%s); continuing without it", name, exc)
        return None


def folder_paths() -> Optional[Any]:
    """ComfyUI's ``folder_paths`` module when the host loaded it, else None."""
    module = sys.modules.get("folder_paths")
    return module if module is not None and hasattr(module, "get_filename_list") else None


def prompt_server() -> Optional[Any]:
    """``server.PromptServer.instance`` when running inside a ComfyUI server, else None."""
    srv = sys.modules.get("server")
    cls = getattr(srv, "PromptServer", None) if srv is not None else None
    return getattr(cls, "instance", None) if cls is not None else None


def in_comfyui() -> bool:
    """True when the ComfyUI host modules are loaded in this process."""
    return comfy_module("comfy.model_management") is not None


# ------------------------------------------------------------------------------ tensor mode


@contextlib.contextmanager
def model_compute() -> Iterator[None]:
    """Run model building, placement and sampling outside ``torch.inference_mode``, with no_grad.

    ComfyUI executes nodes under ``torch.inference_mode()``. Tensors made there are "inference
    tensors", and modules built or moved there get inference-tensor parameters; code that reads
    a tensor's version counter (the RoPE cos/sin cache of ``opensora.layers`` keys on
    ``freqs._version``) then raises "Inference tensors do not track version counter" (seen in a
    real ComfyUI 0.3.64 server). Gradients stay off; inference tensors coming in (captions) are
    only read, never modified in place.
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


# ------------------------------------------------------------------------------ progress / interrupt


class ProgressReporter:
    """Adapts the pipeline's ``progress(done, total)`` callback to ``comfy.utils.ProgressBar``.

    The bar is created on the first report, when the number of steps is known (8 on a hit, 30 on a
    miss). Inside ComfyUI every update is also a cancellation point (the host's progress hook
    calls ``throw_exception_if_processing_interrupted``). Outside ComfyUI the reports are kept in
    :attr:`reports` (for tests) and nothing else happens.

    Args:
        node_id: the node's ``UNIQUE_ID`` (routes the bar to the right node in the UI), or None.
    """

    def __init__(self, node_id: Optional[str] = None) -> None:
        self.node_id = node_id
        self.reports: List[Tuple[int, int]] = []
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        self.reports.append((int(done), int(total)))
        utils = comfy_module("comfy.utils")
        if utils is None:
            return
        if self._bar is None or getattr(self._bar, "total", total) != total:
            try:
                self._bar = utils.ProgressBar(int(total), node_id=self.node_id)
            except TypeError:  # older hosts: no node_id keyword
                self._bar = utils.ProgressBar(int(total))
        self._bar.update_absolute(int(done), int(total))


def interrupted() -> bool:
    """True when the user pressed Cancel in ComfyUI (``processing_interrupted``); False outside it."""
    mm = comfy_module("comfy.model_management")
    return bool(mm.processing_interrupted()) if mm is not None and hasattr(mm, "processing_interrupted") else False


def raise_interrupted(cause: Optional[BaseException] = None) -> None:
    """Raise ComfyUI's ``InterruptProcessingException`` (so the host reports a cancel, not an
    error); outside ComfyUI re-raise ``cause`` (or a RuntimeError when there is none)."""
    mm = comfy_module("comfy.model_management")
    exc_type = getattr(mm, "InterruptProcessingException", None) if mm is not None else None
    if exc_type is not None:
        if hasattr(mm, "interrupt_current_processing"):
            mm.interrupt_current_processing(False)  # consumed: the next prompt must not see it
        raise exc_type() from cause
    if cause is not None:
        raise cause
    raise RuntimeError("processing was interrupted")


# ------------------------------------------------------------------------------ model placement


class _Holder(torch.nn.Module):
    """A plain container so ComfyUI's ModelPatcher can set its own attributes (``device``,
    ``model_loaded_weight_memory``...) without touching our module's properties."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner


class Placement:
    """Puts one torch module on the compute device through ComfyUI's memory manager.

    Inside ComfyUI the module is wrapped once in a ``comfy.model_patcher.ModelPatcher`` (load
    device ``get_torch_device()``, offload device ``unet_offload_device()`` or
    ``text_encoder_offload_device()``) and :meth:`load` calls ``load_models_gpu([patcher],
    force_full_load=True)``: the host evicts other models when memory is short and can later
    offload ours (``/free``, another model's load). Full loads only, because our modules do not
    use ComfyUI's weight-casting layers that partial (low-VRAM) loading relies on.

    Outside ComfyUI :meth:`load` keeps the module where it is (the caller chose the device).

    Args:
        module: the model (STDiT3, OpenSoraVAE or a T5 encoder).
        kind: ``"diffusion"``, ``"vae"`` or ``"text"`` (picks the offload device).
    """

    def __init__(self, module: torch.nn.Module, kind: str = "diffusion") -> None:
        if kind not in ("diffusion", "vae", "text"):
            raise ValueError(f"kind must be 'diffusion', 'vae' or 'text', got {kind!r}")
        self.module = module
        self.kind = kind
        self._patcher = None

    def _make_patcher(self, mm: Any) -> Any:
        mp = comfy_module("comfy.model_patcher")
        if mp is None:
            return None
        offload = {"diffusion": "unet_offload_device", "vae": "vae_offload_device",
                   "text": "text_encoder_offload_device"}[self.kind]
        offload_device = getattr(mm, offload, mm.unet_offload_device)()
        load_device = mm.get_torch_device()
        size = sum(p.numel() * p.element_size() for p in self.module.parameters())
        size += sum(b.numel() * b.element_size() for b in self.module.buffers())
        return mp.ModelPatcher(_Holder(self.module), load_device=load_device, offload_device=offload_device,
                               size=int(size))

    def load(self) -> torch.device:
        """Place the module for compute; returns the device it is on.

        Raises:
            whatever ComfyUI's memory manager raises (e.g. out of memory), unchanged.
        """
        mm = comfy_module("comfy.model_management")
        if mm is None:
            return _module_device(self.module)
        if self._patcher is None:
            self._patcher = self._make_patcher(mm)
        if self._patcher is None:
            device = mm.get_torch_device()
            self.module.to(device)
            return device
        mm.load_models_gpu([self._patcher], force_full_load=True)
        return _module_device(self.module)

    def release(self) -> None:
        """After a run: let the host trim its allocator cache (``soft_empty_cache``); the module
        stays loaded until the memory manager needs the room, as core models do."""
        mm = comfy_module("comfy.model_management")
        if mm is not None and hasattr(mm, "soft_empty_cache"):
            mm.soft_empty_cache()


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where tensors passed between nodes live: ``mm.intermediate_device()`` (CPU unless the
    host runs ``--gpu-only``); the CPU outside ComfyUI."""
    mm = comfy_module("comfy.model_management")
    if mm is not None and hasattr(mm, "intermediate_device"):
        return torch.device(mm.intermediate_device())
    return torch.device("cpu")


def default_dtype() -> torch.dtype:
    """Compute dtype of the OpenSora models when the loader says ``auto``: bf16 on a CUDA device
    that supports it (OpenSora 1.2's inference dtype), fp32 elsewhere (CPU)."""
    mm = comfy_module("comfy.model_management")
    device = mm.get_torch_device() if mm is not None else torch.device("cpu")
    if torch.device(device).type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ------------------------------------------------------------------------------ model folders


def models_root() -> Optional[Path]:
    """ComfyUI's ``models`` folder, or None outside ComfyUI."""
    fp = folder_paths()
    return Path(fp.models_dir) if fp is not None and hasattr(fp, "models_dir") else None


def register_model_folders() -> None:
    """Register ``models/opensora`` (safetensors and JSON only) with ComfyUI's folder_paths.

    Paths that ``extra_model_paths.yaml`` already added under the same key are kept. Does nothing
    outside ComfyUI. Called once at import (reference/comfyui.md section 1.13).
    """
    fp = folder_paths()
    root = models_root()
    if fp is None or root is None:
        return
    default = str(root / OPENSORA_FOLDER)
    entry = fp.folder_names_and_paths.get(OPENSORA_FOLDER)
    if entry is None:
        fp.folder_names_and_paths[OPENSORA_FOLDER] = ([default], set(_WEIGHT_EXTENSIONS))
    else:
        paths = list(entry[0])
        if default not in paths:
            paths.append(default)
        fp.folder_names_and_paths[OPENSORA_FOLDER] = (paths, set(_WEIGHT_EXTENSIONS))
    try:
        os.makedirs(default, exist_ok=True)
    except OSError:  # read-only install: listing still works for the other paths
        pass


def model_folder_files(key: str) -> List[str]:
    """``folder_paths.get_filename_list(key)`` (relative names, sorted) or [] outside ComfyUI or
    when the key is not registered."""
    fp = folder_paths()
    if fp is None or key not in getattr(fp, "folder_names_and_paths", {}):
        return []
    try:
        return sorted(fp.get_filename_list(key))
    except Exception as exc:  # a broken extra path must not break the node list
        log.warning("could not list ComfyUI model folder %r: %s", key, exc)
        return []


def model_folder_path(key: str, name: str) -> Optional[Path]:
    """Full path of ``name`` in ComfyUI model folder ``key`` (None when absent or outside ComfyUI)."""
    fp = folder_paths()
    if fp is None:
        return None
    try:
        full = fp.get_full_path(key, name)
    except Exception:
        return None
    return Path(full) if full else None


# ------------------------------------------------------------------------------ websocket


def send_event(event: str, data: Dict[str, Any]) -> bool:
    """Broadcast a websocket event to every connected ComfyUI client (thread-safe ``send_sync``).

    Returns True when sent, False outside a ComfyUI server. Errors are logged, never raised: a
    finished run must not fail because a browser tab went away.
    """
    server = prompt_server()
    if server is None:
        return False
    try:
        server.send_sync(event, data, None)
        return True
    except Exception as exc:
        log.warning("could not send websocket event %s: %s", event, exc)
        return False


ProgressFn = Callable[[int, int], None]
