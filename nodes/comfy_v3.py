"""The one door to ComfyUI's V3 node API: ``io`` and ``ComfyExtension``.

Inside ComfyUI (its ``comfy`` package is loaded before custom nodes are) they come from
``comfy_api.v0_0_2``: the API version pinned, not ``latest``, whose maintainers say it changes
without warning (reference/methods_2026.md section 6). Outside ComfyUI they come from the pack's
stand-in :mod:`.v3_standin`, so the nodes import and run in tests and scripts. Nothing else in the
pack imports ``comfy_api``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict, Tuple

__all__ = ["io", "ComfyExtension", "IN_COMFYUI", "API_VERSION", "node_info"]

log = logging.getLogger("comfyui_chai.nodes")

#: The comfy_api version the pack is written against.
API_VERSION = "v0_0_2"


def _load() -> Tuple[Any, type, bool]:
    if "comfy" in sys.modules:
        try:
            from comfy_api.v0_0_2 import ComfyExtension as extension, io as real_io

            return real_io, extension, True
        except ImportError as exc:  # a ComfyUI without the pinned API version: say so, keep the pack importable
            log.warning("ComfyUI has no comfy_api.%s (%s); the CHAI nodes need ComfyUI 0.3.64 or newer", API_VERSION,
                        exc)
    from . import v3_standin

    return v3_standin, v3_standin.ComfyExtension, False


io, ComfyExtension, IN_COMFYUI = _load()


def node_info(cls: type) -> Dict[str, Any]:
    """A node class as ``GET /object_info`` describes it (input sections with ``[type, options]``,
    ``output``, ``output_is_list``, ``output_name``, ``display_name``, ``category``...), from the
    real API or the stand-in alike, with lists in place of tuples (as JSON gives them)."""

    def lists(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [lists(v) for v in value]
        if isinstance(value, dict):
            return {k: lists(v) for k, v in value.items()}
        return value

    return lists(cls.GET_NODE_INFO_V1())
