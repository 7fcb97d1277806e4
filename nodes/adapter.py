"""How ComfyUI runs the pack's V3 nodes: errors that name the node, display data sent to the page,
and batches the pack maps itself.

Every node's ``execute`` classmethod is wrapped with :func:`comfy_entry`, which adds three things
to what the node computes (a ``{"result": (...), "ui": {...}}`` dict or a tuple) and returns an
``io.NodeOutput``:

* **Errors name the node.** ComfyUI's error dialog shows the exception message under the node's
  *id* (``CHAI_Cache``); the message is prefixed with the node's display name ("CHAI Cache: ..."),
  so the dialog, ``/history`` and the log say which node failed in words the user sees on the
  canvas. The exception keeps its type and traceback. Cancel (``InterruptProcessingException``)
  and out-of-memory errors pass unchanged: ComfyUI treats them specially. On Cancel the page is
  told when the node stopped (:data:`host.PROGRESS_EVENT` with ``"cancelled": true`` and ``"time"``).
* **Display data goes to the page, not into the history.** ComfyUI stores a node's ``ui`` dict
  in ``/history`` and the Queue counts every list item of it as an output (6 videos showed as 38
  outputs). Inside ComfyUI the ``ui`` of the pack's nodes (entities, lookup and sampler reports,
  the cache panel) is sent as the websocket event :data:`UI_EVENT` ``{"node", "prompt_id", "ui"}``
  instead, which ``web/chai_panel.js`` renders; the history holds only real outputs (the videos).
  Outside ComfyUI (no executing node) the ``ui`` stays in the returned ``NodeOutput``.
* **Batches.** A node declared with ``comfy_entry(batch=True)`` takes ComfyUI's lists whole
  (``Schema(is_input_list=True)``) and is run here once per element with ComfyUI's own rule (as
  many calls as the longest list; a shorter list repeats its last element), each call inside
  :func:`host.in_batch` so its progress reads "prompt k of n" (:class:`host.ProgressReporter`).
  Its outputs are lists (``is_output_list=True``), exactly what ComfyUI's own mapping gave.

Host facts: reference/comfyui.md sections 1.3, 1.4, 1.8, 4 (list semantics), 5, 6 and 7.
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any, Callable, Dict, Iterator, List, Sequence

import torch

from . import host
from .comfy_v3 import io

__all__ = ["comfy_entry", "map_lists", "named_error", "UI_EVENT"]

#: Websocket event that carries a node's display data (``ui`` dict) to the page.
UI_EVENT = "chai.ui"


def map_lists(lists: Dict[str, Sequence[Any]]) -> Iterator[Dict[str, Any]]:
    """ComfyUI's list mapping: one keyword dict per element of the longest list; a shorter list
    repeats its last element. Yields nothing when every list is empty.

    Raises:
        TypeError: a value that is neither a list nor a tuple (ComfyUI passes lists to list
            nodes, and ``(None,)`` for a linked input ``fingerprint_inputs`` does not see).
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

    The same exception type, with its attributes, when its message lives in ``args`` (a copy with
    the new message; ``BudgetError`` keeps its byte counts), else a RuntimeError whose message also
    names the original type. An exception whose message already starts with the display name is
    returned as it is.
    """
    message = str(exc)
    if message.startswith(display_name):
        return exc
    named = f"{display_name}: {message}"
    try:
        new = type(exc).__new__(type(exc))  # not __init__: its signature may differ
        new.__dict__.update(getattr(exc, "__dict__", {}))
        new.args = (named,)
        if str(new) != named:
            raise TypeError("the exception type builds its message elsewhere")
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


def _values_and_ui(result: Any) -> tuple:
    if isinstance(result, dict):
        return tuple(result.get("result", ())), result.get("ui")
    return tuple(result), None


def _merge(results: List[Any], n_outputs: int) -> Dict[str, Any]:
    """Per-call results of a batch node -> one result whose outputs are lists."""
    outputs: List[List[Any]] = [[] for _ in range(n_outputs)]
    ui: Dict[str, List[Any]] = {}
    for result in results:
        values, items = _values_and_ui(result)
        for key, value in (items or {}).items():
            ui.setdefault(key, []).extend(value)
        for slot, value in enumerate(values):
            outputs[slot].append(value)
    merged: Dict[str, Any] = {"result": tuple(outputs)}
    if ui:
        merged["ui"] = ui
    return merged


def comfy_entry(batch: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a node's ``execute(cls, **inputs)`` (under ``@classmethod``): see the module
    docstring. The node class names itself with ``DISPLAY_NAME``; ``batch=True`` maps ComfyUI's
    lists (the schema must declare ``is_input_list=True`` and list outputs).

    Returns ``io.NodeOutput(*outputs, ui=...)`` (no ``ui`` inside ComfyUI: it went to the page).
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        names = list(inspect.signature(fn).parameters)[1:]

        @functools.wraps(fn)
        def execute(cls, *args, **inputs):
            display_name = cls.DISPLAY_NAME
            if args:  # scripts and tests may pass inputs in order; ComfyUI passes keywords
                inputs = {**dict(zip(names, args)), **inputs}

            def method(**kwargs):
                return fn(cls, **kwargs)

            if not batch:
                result = _call_named(method, inputs, display_name)
            else:
                calls = list(map_lists(inputs))
                results = []
                for index, kwargs in enumerate(calls):
                    where = display_name if len(calls) == 1 else f"{display_name}, prompt {index + 1} of {len(calls)}"
                    with host.in_batch(index, len(calls)):
                        results.append(_call_named(method, kwargs, where))
                # define_schema, not GET_SCHEMA: ComfyUI's GET_SCHEMA caches on the class, and the
                # class clone execute runs on is locked.
                result = _merge(results, len(cls.define_schema().outputs))
            values, ui = _values_and_ui(result)
            return io.NodeOutput(*values, ui=ui) if ui else io.NodeOutput(*values)

        return execute

    return wrap
