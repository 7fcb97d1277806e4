"""Everything the nodes need from the ComfyUI host, reached lazily so the pack imports without it.

ComfyUI imports ``comfy``, ``folder_paths`` and ``server`` before it loads custom nodes, so this
module only *looks them up* in ``sys.modules`` and never imports them itself: outside ComfyUI
(tests, the command line) every helper degrades to a plain-Python behaviour that is stated in
its docstring (CPU placement, no progress bar, no interruption, no websocket event).

Host APIs used (reference/comfyui.md sections 1.9, 1.10, 1.13-1.15, 7, 8):
``comfy.utils.ProgressBar``, ``comfy.model_management`` (``get_torch_device``,
``unet_offload_device``, ``load_models_gpu``, ``soft_empty_cache``, ``processing_interrupted``,
``throw_exception_if_processing_interrupted``, ``InterruptProcessingException``),
``comfy.model_patcher.ModelPatcher``, ``comfy_execution.utils.get_executing_context``,
``folder_paths`` and ``server.PromptServer``.
"""

from __future__ import annotations

import contextlib
import contextvars
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
    "interruptible",
    "raise_interrupted",
    "Placement",
    "register_model_folders",
    "model_folder_files",
    "models_root",
    "send_event",
    "executing_node",
    "batch_position",
    "in_batch",
    "PROGRESS_EVENT",
    "model_compute",
    "log",
]

log = logging.getLogger("comfyui_chai.nodes")

#: Websocket event with a sampler's progress through a batch (see :class:`ProgressReporter`).
PROGRESS_EVENT = "chai.progress"
#: Resolution of ComfyUI's own progress bar while it shows a whole batch (value / max).
_BATCH_BAR_MAX = 1000

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


_BATCH: contextvars.ContextVar[Tuple[int, int]] = contextvars.ContextVar("chai_batch_position", default=(0, 1))


def batch_position() -> Tuple[int, int]:
    """(index, count) of the prompt being processed in the current batch: (0, 1) outside a batch."""
    return _BATCH.get()


@contextlib.contextmanager
def in_batch(index: int, count: int) -> Iterator[None]:
    """Mark the code inside as prompt ``index`` (0-based) of ``count`` (see :class:`ProgressReporter`).

    Raises:
        ValueError: ``count < 1`` or ``index`` outside ``0..count-1``.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"batch position {index} of {count} is impossible")
    token = _BATCH.set((int(index), int(count)))
    try:
        yield
    finally:
        _BATCH.reset(token)


def executing_node() -> Optional[Tuple[Optional[str], str]]:
    """(prompt_id, node id) of the node ComfyUI is executing in this thread, or None outside one.

    Reads ``comfy_execution.utils.get_executing_context()`` (ComfyUI 0.3.4x and later), else the
    server's ``last_prompt_id`` / ``last_node_id``; never imports anything.
    """
    utils = sys.modules.get("comfy_execution.utils")
    getter = getattr(utils, "get_executing_context", None) if utils is not None else None
    context = getter() if getter is not None else None
    if context is not None and getattr(context, "node_id", None) is not None:
        return getattr(context, "prompt_id", None), str(context.node_id)
    server = prompt_server()
    node = getattr(server, "last_node_id", None) if server is not None else None
    return (getattr(server, "last_prompt_id", None), str(node)) if node is not None else None


class ProgressReporter:
    """Adapts the pipeline's ``progress(done, total)`` callback to ComfyUI's progress display.

    The position in a batch comes from :func:`batch_position` when the reporter is made (prompt
    ``index`` of ``count``). Every report:

    * moves ``comfy.utils.ProgressBar`` of the node: the steps of the prompt (8 on a hit, 30 on a
      miss) for a single prompt, or, in a batch, the whole batch (``(index + done / total) / count``
      in 1/1000ths), so that bar moves with every step of every prompt and never restarts;
    * sends the websocket event :data:`PROGRESS_EVENT` ``{"node", "prompt_id", "index", "count",
      "step", "steps", "overall"}`` (``overall`` in 0..1) from which the page draws "prompt k of n",
      the batch bar and the prompt's step bar.

    Inside ComfyUI every bar update is also a cancellation point (the host's progress hook calls
    ``throw_exception_if_processing_interrupted``). Outside ComfyUI the reports are only kept in
    :attr:`reports` (for tests).

    Args:
        node_id: the node's ``UNIQUE_ID`` (routes the bar to the right node in the UI), or None.
    """

    def __init__(self, node_id: Optional[str] = None) -> None:
        self.node_id = node_id
        self.index, self.count = batch_position()
        self.reports: List[Tuple[int, int]] = []
        self._bar = None

    def overall(self, done: int, total: int) -> float:
        """Fraction of the whole batch done after ``done`` of ``total`` steps of this prompt (0..1)."""
        return (self.index + min(done, total) / max(1, total)) / self.count

    def __call__(self, done: int, total: int) -> None:
        done, total = int(done), int(total)
        self.reports.append((done, total))
        utils = comfy_module("comfy.utils")
        if utils is None:
            return
        value, maximum = (done, total) if self.count == 1 else (round(_BATCH_BAR_MAX * self.overall(done, total)),
                                                                  _BATCH_BAR_MAX)
        if self._bar is None or getattr(self._bar, "total", maximum) != maximum:
            try:
                self._bar = utils.ProgressBar(maximum, node_id=self.node_id)
            except TypeError:  # older hosts: no node_id keyword
                self._bar = utils.ProgressBar(maximum)
        send_event(PROGRESS_EVENT, {"node": self.node_id, "index": self.index, "count": self.count, "step": done,
                                    "steps": total, "overall": round(self.overall(done, total), 4)})
        self._bar.update_absolute(value, maximum)


@contextlib.contextmanager
def interruptible(module: torch.nn.Module) -> Iterator[None]:
    """Let Cancel stop ``module`` between two of its blocks, not only between denoising steps.

    Before every block of each ``nn.ModuleList`` child of ``module`` (STDiT3's spatial and
    temporal blocks) ComfyUI's ``throw_exception_if_processing_interrupted`` runs, so a Cancel
    waits for one block instead of a whole step (a step of OpenSora 1.2 at 720p, or of any model
    on a busy CPU, takes seconds). The hooks are removed on exit. Nothing happens outside ComfyUI.

    Raises:
        ComfyUI's ``InterruptProcessingException`` from inside the model's forward on Cancel.
    """
    mm = comfy_module("comfy.model_management")
    check = getattr(mm, "throw_exception_if_processing_interrupted", None) if mm is not None else None
    if check is None:
        yield
        return
    handles = [block.register_forward_pre_hook(lambda _block, _args: check())
               for blocks in module.children() if isinstance(blocks, torch.nn.ModuleList) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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

    Inside a node the data gains ``prompt_id`` (the run it belongs to, :func:`executing_node`)
    unless it has one. Returns True when sent, False outside a ComfyUI server. Errors are logged,
    never raised: a finished run must not fail because a browser tab went away.
    """
    server = prompt_server()
    if server is None:
        return False
    if "prompt_id" not in data:
        running = executing_node()
        data = {**data, "prompt_id": running[0] if running is not None else None}
    try:
        server.send_sync(event, data, None)
        return True
    except Exception as exc:
        log.warning("could not send websocket event %s: %s", event, exc)
        return False


ProgressFn = Callable[[int, int], None]
