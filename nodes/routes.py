"""The read-only HTTP route ``GET /chai/stats`` (also served as ``/api/chai/stats``).

It answers only about stores this process opened (through a CHAI Cache node): a client names a
store by its public id, never by a path, so the route cannot be used to open or read an
arbitrary folder. Registered at import time, because ComfyUI collects routes before it starts
serving (reference/comfyui.md sections 1.14 and 3).

Responses (JSON):

* ``GET /chai/stats`` -> ``{"stores": [payload, ...]}`` (see ``registry.stats_payload``);
* ``GET /chai/stats?store=<id>`` -> one payload, or 404 ``{"error": ...}`` for an id this process
  has not opened; 400 for a malformed id.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple

from . import host, registry

__all__ = ["stats_response", "register_routes"]

_ID = re.compile(r"^[0-9a-f]{12}$")
_registered = False


def stats_response(store: Optional[str]) -> Tuple[int, Dict[str, Any]]:
    """(HTTP status, JSON body) of ``/chai/stats`` for the ``store`` query value (None = all stores)."""
    if store is None or store == "":
        return 200, {"stores": [registry.stats_payload(h) for h in registry.open_stores()]}
    if not _ID.match(store):
        return 400, {"error": "store must be the 12-hex-digit id of a store this ComfyUI process opened"}
    handle = registry.store_by_id(store)
    if handle is None:
        return 404, {"error": f"no open store with id {store}; run a workflow with a CHAI Cache node first"}
    return 200, registry.stats_payload(handle)


def register_routes() -> bool:
    """Add ``GET /chai/stats`` to the running ComfyUI server (once). False outside ComfyUI."""
    global _registered
    server = host.prompt_server()
    if server is None or _registered:
        return _registered
    from aiohttp import web

    @server.routes.get("/chai/stats")
    async def chai_stats(request):  # noqa: D401 - aiohttp handler
        status, body = stats_response(request.query.get("store"))
        return web.json_response(body, status=status)

    _registered = True
    return True
