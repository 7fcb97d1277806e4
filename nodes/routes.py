"""The pack's HTTP routes in the ComfyUI server (each also served under ``/api``).

They answer only about stores this process opened (through a CHAI Cache node): a client names a
store by the public id the list routes gave it, never by a path, so no route can make the pack
open, read or change an arbitrary folder. Registered at import time, because ComfyUI collects
routes before it starts serving (reference/comfyui.md sections 1.14 and 3).

Read routes (GET, JSON unless said):

* ``/chai/stats[?store=<id>]`` -> ``{"stores": [payload, ...]}`` or one payload
  (``registry.stats_payload``);
* ``/chai/stores`` -> ``{"stores": [{id, name, path, entries, bytes, budget_bytes, pinned_bytes}]}``;
* ``/chai/entries?store=<id>[&last=8&top=8]`` -> the panel's entries (``registry.entries_payload``);
* ``/chai/thumbnail?store=<id>&entry=<n>`` -> the entry's thumbnail, ``image/jpeg`` or
  ``image/png`` with ``X-Content-Type-Options: nosniff``; 404 when it has none.

Change routes (POST only, a JSON body ``{"store": "<id>", "entry": <n>}``; the answer is the new
``/chai/entries`` payload): ``/chai/pin``, ``/chai/unpin``, ``/chai/evict`` (refused with 409 for a
pinned entry). They accept only same-origin requests from the ComfyUI page (:func:`origin_error`).

Errors are ``{"error": "..."}`` with 400 (malformed id or body), 403 (not same-origin), 404 (a
store this process has not opened, an entry it does not hold), 409 (evicting a pinned entry),
415 (not JSON) or 409 from the store (``StoreError``: e.g. the PostgreSQL store cannot pin).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

from ..cache.store_types import StoreError
from . import host, registry

__all__ = ["stats_response", "stores_response", "entries_response", "thumbnail_response", "change_response",
           "origin_error", "parse_entry_id", "register_routes", "CHANGE_ACTIONS", "MAX_BODY_BYTES",
           "ALLOWED_HOSTS_ENV"]

#: What the change routes do: route name -> description (the routes are ``POST /chai/<name>``).
CHANGE_ACTIONS = {"pin": "pin an entry", "unpin": "unpin an entry", "evict": "evict an entry"}
#: The largest request body a change route reads (bytes): ``{"store": ..., "entry": ...}`` is ~50.
MAX_BODY_BYTES = 1024

_ID = re.compile(r"^[0-9a-f]{12}$")
_DIGITS = re.compile(r"^[0-9]{1,18}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LIST_LIMIT = 32
_registered = False

#: (HTTP status, JSON body or image bytes, extra headers)
Reply = Tuple[int, Union[Dict[str, Any], bytes], Dict[str, str]]


def _error(status: int, message: str) -> Reply:
    return status, {"error": message}, {}


def _handle(store: Optional[str]) -> Tuple[Optional[registry.StoreHandle], Optional[Reply]]:
    """The open store with public id ``store``, or the error reply (400 malformed, 404 not open)."""
    if not isinstance(store, str) or not _ID.match(store):
        return None, _error(400, "store must be the 12-hex-digit id of a store this ComfyUI process opened "
                                 "(GET /chai/stores lists them)")
    handle = registry.store_by_id(store)
    if handle is None:
        return None, _error(404, f"no open store with id {store}; run a workflow with a CHAI Cache node first")
    return handle, None


def parse_entry_id(value: Any) -> int:
    """An entry id from a query string or a JSON body: a positive integer below 10**18 (a JSON
    integer, or a string of decimal digits).

    Raises:
        ValueError: anything else (a bool, float, sign, spaces, or too many digits), saying so.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DIGITS.match(value):
        number = int(value)
    else:
        raise ValueError(f"entry must be a positive integer entry id, got {str(value)[:40]!r}")
    if not 0 < number < 10 ** 18:
        raise ValueError(f"entry must be a positive integer entry id below 10**18, got {number}")
    return number


def _count(value: Optional[str], default: int) -> int:
    """A small list length from a query value (0.._LIST_LIMIT). Raises ValueError for a non-number."""
    if value is None or value == "":
        return default
    if not _DIGITS.match(value):
        raise ValueError(f"last and top must be whole numbers, got {value[:20]!r}")
    return min(int(value), _LIST_LIMIT)


# ---------------------------------------------------------------------------------------- read routes
def stats_response(store: Optional[str]) -> Tuple[int, Dict[str, Any]]:
    """(HTTP status, JSON body) of ``/chai/stats`` for the ``store`` query value (None = all stores)."""
    if store is None or store == "":
        return 200, {"stores": [registry.stats_payload(h) for h in registry.open_stores()]}
    handle, error = _handle(store)
    if error is not None:
        return error[0], error[1]
    return 200, registry.stats_payload(handle)


def stores_response() -> Reply:
    """``GET /chai/stores``: every store this process has open (id, name, path and its fill)."""
    out = []
    for handle in registry.open_stores():
        stats = handle.store.stats(last=0)
        out.append({"id": handle.id, "name": handle.name, "path": str(handle.path), "entries": stats.entries,
                    "bytes": stats.bytes, "budget_bytes": stats.budget_bytes, "pinned_bytes": stats.pinned_bytes})
    return 200, {"stores": out}, {}


def entries_response(query: Mapping[str, str]) -> Reply:
    """``GET /chai/entries?store=<id>[&last=n&top=n]``: ``registry.entries_payload`` (n at most 32)."""
    handle, error = _handle(query.get("store"))
    if error is not None:
        return error
    try:
        last, top = _count(query.get("last"), 8), _count(query.get("top"), 8)
    except ValueError as exc:
        return _error(400, str(exc))
    return 200, registry.entries_payload(handle, last=last, top=top), {}


def thumbnail_response(query: Mapping[str, str]) -> Reply:
    """``GET /chai/thumbnail?store=<id>&entry=<n>``: the entry's thumbnail bytes with their type
    (``image/jpeg`` or ``image/png``, from the signature the store checked) and ``nosniff``, so a
    browser never reads them as anything else. Entry ids are never reused, so it may be cached."""
    handle, error = _handle(query.get("store"))
    if error is not None:
        return error
    try:
        entry_id = parse_entry_id(query.get("entry"))
    except ValueError as exc:
        return _error(400, str(exc))
    data = handle.store.thumbnail(entry_id)
    if data is None:
        return _error(404, f"entry {entry_id} of store {handle.id} has no thumbnail (or is gone)")
    kind = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return 200, data, {"Content-Type": kind, "X-Content-Type-Options": "nosniff",
                       "Cache-Control": "private, max-age=86400", "Content-Security-Policy": "default-src 'none'"}


# ---------------------------------------------------------------------------------------- change routes
def _host_port(netloc: str, scheme: str) -> Optional[Tuple[str, int]]:
    """(lower-case host name, port) of a ``host[:port]``; the scheme's port when none is given;
    None when it does not parse (user info, a bad port, no host)."""
    if not netloc or "@" in netloc:
        return None
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


#: Environment variable listing the host names (besides IP addresses and ``localhost``) under which
#: the ComfyUI page may change a store, e.g. ``comfy.example.org`` behind a TLS proxy.
ALLOWED_HOSTS_ENV = "CHAI_ALLOWED_HOSTS"


def _trusted_host(hostname: str) -> bool:
    """True for an IP address, ``localhost`` or a name listed in :data:`ALLOWED_HOSTS_ENV`.

    A page on an attacker's domain that re-resolves to this server (DNS rebinding) is same-origin
    in the browser's eyes, but its Host header carries the attacker's name; an IP literal or a name
    the user listed cannot be that.
    """
    name = hostname.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    allowed = {h.strip().rstrip(".").lower() for h in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",") if h.strip()}
    return name in allowed


def origin_error(headers: Mapping[str, str]) -> Optional[str]:
    """Why a request that changes a store is not a same-origin request from the ComfyUI page, or
    None when it is.

    ComfyUI refuses a POST to its own routes whose ``Origin`` names another host than ``Host``
    (against web pages that POST to a local server). The rule here is the same comparison, made
    stricter for routes that change a store: the ``Origin`` header is required (every browser
    sends it with a POST; a page cannot remove it), it must be ``http(s)://host[:port]`` with
    the same host name and port as ``Host`` (a missing port is the scheme's), whatever the host
    (ComfyUI checks only loopback hosts), the host must be an IP address, ``localhost`` or a name
    listed in :data:`ALLOWED_HOSTS_ENV` (against DNS rebinding, :func:`_trusted_host`), and
    ``Sec-Fetch-Site``, when the browser sends it, must be ``same-origin`` (a sibling subdomain is
    refused). Tools without a browser use the command
    line (``cache pin``) instead.
    """
    origin, host_header = headers.get("Origin"), headers.get("Host")
    if not origin or not host_header:
        return "a change to a store is accepted only from the ComfyUI page (the request has no Origin or Host header)"
    parts = urlsplit(origin.strip())
    if parts.scheme not in _DEFAULT_PORTS or parts.path or parts.query or parts.fragment:
        return f"cross-origin request refused: Origin {origin[:80]!r} is not a web page's origin"
    page, server = _host_port(parts.netloc, parts.scheme), _host_port(host_header.strip(), parts.scheme)
    if page is None or server is None or page != server:
        return (f"cross-origin request refused: Origin {origin[:80]!r} is not this ComfyUI server "
                f"({host_header[:80]!r}); change stores from the ComfyUI page itself")
    if not _trusted_host(server[0]):
        return (f"request refused: the page is served under the name {server[0][:80]!r}, which could be a DNS "
                f"rebinding attack on this server; open ComfyUI at 127.0.0.1 or localhost, or list the name in "
                f"the environment variable {ALLOWED_HOSTS_ENV} (comma-separated) before starting ComfyUI")
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() != "same-origin":
        return f"cross-origin request refused: the browser reports Sec-Fetch-Site {site[:40]!r}, not same-origin"
    return None


def change_response(action: str, method: str, headers: Mapping[str, str], body: bytes) -> Reply:
    """``POST /chai/<action>`` (pin, unpin, evict) with the JSON body ``{"store": id, "entry": n}``.

    Checked in this order, nothing changed on any failure: the method (405), the origin (403,
    :func:`origin_error`), the content type (415: ``application/json``, which a page on another
    origin cannot send without a CORS preflight ComfyUI does not grant), the body (400: at most
    :data:`MAX_BODY_BYTES`, a JSON object), the store id (400/404), the entry id (400/404). Then
    the change; an evict of a pinned entry is 409, a store that cannot pin (``StoreError``) 409.
    Returns the store's new ``registry.entries_payload``.
    """
    if action not in CHANGE_ACTIONS:
        return _error(404, f"unknown action {action[:20]!r}; one of {', '.join(CHANGE_ACTIONS)}")
    if method != "POST":
        return 405, {"error": f"/chai/{action} accepts only POST"}, {"Allow": "POST"}
    why = origin_error(headers)
    if why is not None:
        return _error(403, why)
    content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return _error(415, f"/chai/{action} takes a JSON body (Content-Type: application/json)")
    if len(body) > MAX_BODY_BYTES:
        return _error(400, f"the body is larger than {MAX_BODY_BYTES} bytes; send {{\"store\": id, \"entry\": n}}")
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        request = None
    if not isinstance(request, dict):
        return _error(400, 'the body must be a JSON object {"store": "<id>", "entry": <entry id>}')
    handle, error = _handle(request.get("store"))
    if error is not None:
        return error
    try:
        entry_id = parse_entry_id(request.get("entry"))
    except ValueError as exc:
        return _error(400, str(exc))
    try:
        if action == "evict":
            found = registry.evict_entry(handle, entry_id)
        else:
            found = handle.store.pin(entry_id, action == "pin")
    except registry.EntryPinnedError as exc:
        return _error(409, str(exc))
    except StoreError as exc:
        return _error(409, str(exc))
    if not found:
        return _error(404, f"store {handle.id} holds no entry {entry_id} (evicted meanwhile?); refresh the panel")
    return 200, registry.entries_payload(handle), {}


# ---------------------------------------------------------------------------------------- registration
def register_routes() -> bool:
    """Add the routes above to the running ComfyUI server (once). False outside ComfyUI."""
    global _registered
    server = host.prompt_server()
    if server is None or _registered:
        return _registered
    from aiohttp import web

    def respond(reply: Reply):
        status, body, headers = reply
        if isinstance(body, bytes):
            return web.Response(body=body, status=status, headers=headers)
        return web.json_response(body, status=status, headers=headers or None)

    @server.routes.get("/chai/stats")
    async def chai_stats(request):  # noqa: D401 - aiohttp handler
        status, body = stats_response(request.query.get("store"))
        return web.json_response(body, status=status)

    @server.routes.get("/chai/stores")
    async def chai_stores(request):  # noqa: D401 - aiohttp handler
        return respond(stores_response())

    @server.routes.get("/chai/entries")
    async def chai_entries(request):  # noqa: D401 - aiohttp handler
        return respond(entries_response(request.query))

    @server.routes.get("/chai/thumbnail")
    async def chai_thumbnail(request):  # noqa: D401 - aiohttp handler
        return respond(thumbnail_response(request.query))

    def change_route(action: str):
        async def chai_change(request):  # noqa: D401 - aiohttp handler
            body = await request.content.read(MAX_BODY_BYTES + 1)  # never more, whatever Content-Length says
            return respond(change_response(action, request.method, request.headers, body))
        return chai_change

    for action in CHANGE_ACTIONS:
        server.routes.post(f"/chai/{action}")(change_route(action))
    _registered = True
    return True
