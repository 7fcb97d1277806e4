"""How ComfyUI calls the pack's nodes: errors that name the node, display data sent to the page,
and batches the pack maps itself.

:func:`for_comfyui` makes the class that ComfyUI registers under a node id: a subclass of the
plain node class (which tests and scripts call directly) whose entry point adds three things.

* **Errors name the node.** ComfyUI's error dialog shows the exception message under the node's
  *id* (``CHAI_Cache``); the message is prefixed with the display name ("CHAI Cache: ..."), so
  the dialog, ``/history`` and the log say which node failed in words the user sees on the
  canvas. The exception keeps its type and traceback. Cancel (``InterruptProcessingException``)
  and out-of-memory errors pass unchanged: ComfyUI treats them specially. On Cancel the page is
  told when the node stopped (:data:`host.PROGRESS_EVENT` with ``"cancelled": true`` and ``"time"``).
* **Display data goes to the page, not into the history.** ComfyUI stores a node's ``ui`` dict
  in ``/history`` and the Queue counts every list item of it as an output (6 videos showed as 38
  outputs). The ``ui`` of the pack's nodes (entities, lookup and sampler reports, the cache
  panel) is sent as the websocket event :data:`UI_EVENT` ``{"node", "prompt_id", "ui"}`` instead,
  which ``web/chai_panel.js`` renders; the history holds only real outputs (the videos).
* **Batches.** A class with ``PROMPT_BATCH = True`` receives ComfyUI's lists whole
  (``INPUT_IS_LIST``) and is called here once per element with ComfyUI's own rule (as many calls
  as the longest list; a shorter list repeats its last element), each call inside
  :func:`host.in_batch` so its progress reads "prompt k of n" (:class:`host.ProgressReporter`).
  Outputs come back as lists (``OUTPUT_IS_LIST``), exactly what ComfyUI's own mapping gave.

Outside ComfyUI (no executing node) the ``ui`` stays in the returned dict, as the plain class
returns it. Host facts: reference/comfyui.md sections 1.8, 4 (list semantics), 6 and 7.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterator, List, Sequence

import torch

from . import host

__all__ = ["for_comfyui", "map_lists", "named_error", "UI_EVENT"]

#: Websocket event that carries a node's display data (``ui`` dict) to the page.
UI_EVENT = "chai.ui"
_ENTRY = "run_in_comfyui"


def map_lists(lists: Dict[str, Sequence[Any]]) -> Iterator[Dict[str, Any]]:
    """ComfyUI's list mapping: one keyword dict per element of the longest list; a shorter list
    repeats its last element. Yields nothing when every list is empty.

    Raises:
        TypeError: a value that is neither a list nor a tuple (ComfyUI passes lists to
            INPUT_IS_LIST nodes, and ``(None,)`` for a linked input ``IS_CHANGED`` does not see).
    """
    for name, values in lists.items():
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"input {name!r} must arrive as a list, got {type(values).__name__}")
    count = max((len(v) for v in lists.values()), default=0)
    for i in range(count):
        yield {name: values[min(i, len(values) - 1)] for name, values in lists.items() if values}


def _is_interrupt(exc: BaseException) -> bool:
    mm = host.comfy_module("comfy.model_management")
    interrupt = getattr(mm, "InterruptProcessingException", None) if mm is not None else None
    return interrupt is not None and isinstance(exc, interrupt)


def _report_cancel() -> None:
    """Tell the page that the node stopped on Cancel, and when (``time``, UNIX seconds). Both this
    event and ComfyUI's ``execution_interrupted`` can reach the page up to a second later than
    the stop: ComfyUI runs ``gc.collect()`` after a prompt, holding the GIL (about 1 s for a
    process with 700k Python objects on a busy 2-core CPU)."""
    running = host.executing_node()
    if running is None:
        return
    index, count = host.batch_position()
    host.send_event(host.PROGRESS_EVENT, {"node": running[1], "prompt_id": running[0], "index": index,
                                          "count": count, "cancelled": True, "time": time.time()})


def named_error(exc: Exception, display_name: str) -> Exception:
    """``exc`` with its message prefixed by ``display_name`` ("CHAI Cache: the folder ...").

    The same exception type when it can be rebuilt from one message, else a RuntimeError whose
    message also names the original type. An exception whose message already starts with the
    display name is returned as it is.
    """
    message = str(exc)
    if message.startswith(display_name):
        return exc
    named = f"{display_name}: {message}"
    try:
        new = type(exc)(named)
        if str(new) != named:
            raise TypeError("the exception type rewrites its message")
    except Exception:
        new = RuntimeError(f"{display_name}: {type(exc).__name__}: {message}")
    return new


def _send_ui(result: Any) -> Any:
    """Send a node result's ``ui`` to the page and return the result without it (inside ComfyUI)."""
    if not isinstance(result, dict) or "ui" not in result:
        return result
    running = host.executing_node()
    if running is None or host.prompt_server() is None:
        return result
    prompt_id, node_id = running
    host.send_event(UI_EVENT, {"node": node_id, "prompt_id": prompt_id, "ui": result["ui"]})
    return {key: value for key, value in result.items() if key != "ui"}


def _call_named(method: Callable[..., Any], kwargs: Dict[str, Any], where: str) -> Any:
    """``method(**kwargs)`` with its ``ui`` sent to the page and its errors named after ``where``."""
    try:
        return _send_ui(method(**kwargs))
    except Exception as exc:
        if _is_interrupt(exc):
            _report_cancel()
            raise
        if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):  # ComfyUI frees memory on these
            raise
        new = named_error(exc, where)
        if new is exc:
            raise
        raise new.with_traceback(exc.__traceback__) from None


def _merge(results: List[Any], n_outputs: int) -> Dict[str, Any]:
    """Per-call results of a PROMPT_BATCH node -> one result whose outputs are lists."""
    outputs: List[List[Any]] = [[] for _ in range(n_outputs)]
    ui: Dict[str, List[Any]] = {}
    for result in results:
        values = result
        if isinstance(result, dict):
            values = result.get("result", ())
            for key, items in result.get("ui", {}).items():
                ui.setdefault(key, []).extend(items)
        for slot, value in enumerate(values):
            outputs[slot].append(value)
    merged: Dict[str, Any] = {"result": tuple(outputs)}
    if ui:
        merged["ui"] = ui
    return merged


def for_comfyui(cls: type, display_name: str) -> type:
    """The class ComfyUI registers for node class ``cls`` (see the module docstring).

    The subclass keeps the name, inputs, outputs and every method of ``cls``; only ``FUNCTION``
    points at the entry point that names errors, sends the ``ui`` to the page and, for
    ``PROMPT_BATCH`` classes, maps the lists.
    """
    function = cls.FUNCTION
    batch = bool(getattr(cls, "PROMPT_BATCH", False))
    n_outputs = len(getattr(cls, "RETURN_TYPES", ()))

    def call(self, **inputs):
        method: Callable[..., Any] = getattr(self, function)
        if not batch:
            return _call_named(method, inputs, display_name)
        calls = list(map_lists(inputs))
        results = []
        for index, kwargs in enumerate(calls):
            where = display_name if len(calls) == 1 else f"{display_name}, prompt {index + 1} of {len(calls)}"
            with host.in_batch(index, len(calls)):
                results.append(_call_named(method, kwargs, where))
        return _merge(results, n_outputs)

    call.__doc__ = f"ComfyUI's entry point of {display_name} (see nodes/adapter.py)."
    attrs: Dict[str, Any] = {"FUNCTION": _ENTRY, _ENTRY: call, "__module__": cls.__module__,
                             "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    if batch:
        attrs["INPUT_IS_LIST"] = True
        attrs["OUTPUT_IS_LIST"] = (True,) * n_outputs
        if hasattr(cls, "IS_CHANGED"):
            base_changed = cls.IS_CHANGED

            def is_changed(_cls, **lists):
                return tuple(base_changed(**kwargs) for kwargs in map_lists(lists))

            attrs["IS_CHANGED"] = classmethod(is_changed)
    return type(cls.__name__, (cls,), attrs)
