"""The pack's HTTP routes (nodes/routes.py) without ComfyUI: the handler functions directly, and
their registration on a stand-in PromptServer (aiohttp is ComfyUI's, not a test dependency).

* the read routes list the open stores, a store's last lookups and most-used entries, and serve
  a thumbnail with its own content type and ``nosniff``;
* the change routes (pin, unpin, evict) take only same-origin POSTs with a JSON body, address a
  store only by the id the list gave, validate entry ids, and refuse to evict a pinned entry;
  nothing changes on any refusal.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import types

import pytest
from PIL import Image

from _store_util import DIM, seeded_entry
from comfyui_chai.nodes import registry, routes

PAGE = {"Host": "127.0.0.1:8188", "Origin": "http://127.0.0.1:8188", "Content-Type": "application/json",
        "Sec-Fetch-Site": "same-origin"}


def _jpeg(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(out, format="JPEG")
    return out.getvalue()


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(out, format="PNG")
    return out.getvalue()


def _put(store, seed, thumbnail=None):
    e = seeded_entry(seed)
    return store.put(e["tensors"], e["entities"], e["embeddings"], e["compat_key"], e["prompt"], e["info"],
                     thumbnail=thumbnail)


@pytest.fixture
def opened(tmp_path):
    """An open store with three entries (two with thumbnails) and three logged lookups."""
    registry.close_all()
    handle = registry.open_store(str(tmp_path / "store"), budget_bytes=1 << 20, create_new=True)
    store = handle.store
    ids = [_put(store, 101, _jpeg((200, 30, 30))), _put(store, 102, _png()), _put(store, 103)]
    assert store.dim == DIM
    for entry_id in (ids[1], ids[1], ids[0]):
        store.record_lookup("p", ["e"], entry_id, "e", store.entry(entry_id).entities[0], 0.9, 1.0)
    store.record_lookup("a city at night", ["city"], None, None, None, None, 1.0)
    yield handle, ids
    registry.close_all()


def _post(action, body, **headers):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return routes.change_response(action, "POST", {**PAGE, **headers}, raw)


# ---------------------------------------------------------------------------------------------- reads
def test_the_read_routes_list_stores_lookups_and_most_used_entries(opened):
    handle, ids = opened
    status, body, _ = routes.stores_response()
    assert status == 200 and [s["id"] for s in body["stores"]] == [handle.id]
    assert body["stores"][0]["entries"] == 3 and body["stores"][0]["pinned_bytes"] == 0

    status, body, _ = routes.entries_response({"store": handle.id, "last": "4", "top": "2"})
    assert status == 200 and body["id"] == handle.id and body["entries"] == 3
    assert [c["id"] for c in body["most_used"]] == [ids[1], ids[0]] and [c["hits"] for c in body["most_used"]] == [2, 1]
    card = body["most_used"][0]
    assert card["entity"] == "entity 102 #0" and card["thumbnail"] and not card["pinned"] and card["bytes"] > 0
    assert 0 <= card["age_s"] < 60
    lookups = body["last_lookups"]
    assert [lk["hit"] for lk in lookups] == [False, True, True, True]
    assert lookups[0]["entry"] is None and [lk["entry"]["id"] for lk in lookups[1:]] == [ids[0], ids[1], ids[1]]
    assert routes.entries_response({"store": handle.id, "top": "x"})[0] == 400
    assert len(routes.entries_response({"store": handle.id, "top": "999999"})[1]["most_used"]) == 3


def test_a_thumbnail_is_served_with_its_content_type_and_nosniff(opened):
    handle, ids = opened
    status, data, headers = routes.thumbnail_response({"store": handle.id, "entry": str(ids[0])})
    assert status == 200 and data == handle.store.thumbnail(ids[0]) and data[:3] == b"\xff\xd8\xff"
    assert headers["Content-Type"] == "image/jpeg" and headers["X-Content-Type-Options"] == "nosniff"
    status, data, headers = routes.thumbnail_response({"store": handle.id, "entry": str(ids[1])})
    assert status == 200 and headers["Content-Type"] == "image/png" and data.startswith(b"\x89PNG")
    status, body, _ = routes.thumbnail_response({"store": handle.id, "entry": str(ids[2])})
    assert status == 404 and "has no thumbnail" in body["error"]


@pytest.mark.parametrize("entry", ["", "-1", "0", "1.5", "1e3", " 1", "../1", "99999999999999999999", None])
def test_bad_entry_ids_are_refused(opened, entry):
    handle, ids = opened
    status, body, _ = routes.thumbnail_response({"store": handle.id, "entry": entry})
    assert status == 400 and "entry must be a positive integer" in body["error"]
    status, body, _ = _post("pin", {"store": handle.id, "entry": entry})
    assert status == 400 and "entry must be a positive integer" in body["error"]
    for value in (True, 1.0, [1], -3):
        assert _post("evict", {"store": handle.id, "entry": value})[0] == 400
    assert len(handle.store) == 3 and handle.store.stats().pinned_entries == 0


@pytest.mark.parametrize("store", ["0123456789ab", "/etc", "../store", "ABCDEF012345", "", None])
def test_a_store_is_addressed_only_by_the_id_of_an_open_one(opened, tmp_path, store):
    handle, ids = opened
    for reply in (routes.thumbnail_response({"store": store, "entry": str(ids[0])}),
                  routes.entries_response({"store": store}),
                  _post("evict", {"store": store, "entry": ids[0]})):
        assert reply[0] == (404 if store == "0123456789ab" else 400), reply
    assert routes.stats_response(str(tmp_path))[0] == 400
    assert len(handle.store) == 3 and not (tmp_path / "etc").exists()


# ---------------------------------------------------------------------------------------------- changes
@pytest.mark.parametrize("headers", [
    {"Host": "localhost:8188", "Origin": "http://localhost:8188"},
    {"Host": "[::1]:8188", "Origin": "http://[::1]:8188"},
    {"Host": "comfy.example.org", "Origin": "https://comfy.example.org"},  # behind a TLS proxy
    {"Host": "comfy.example.org:443", "Origin": "https://COMFY.example.org"},
    {"Host": "127.0.0.1:8188", "Origin": "http://127.0.0.1:8188", "Sec-Fetch-Site": None},  # an older browser
])
def test_same_origin_requests_are_accepted(opened, headers, monkeypatch):
    monkeypatch.setenv(routes.ALLOWED_HOSTS_ENV, " Comfy.Example.org , other.example")
    handle, ids = opened
    headers = {k: v for k, v in {**PAGE, **headers}.items() if v is not None}
    status, body, _ = routes.change_response("pin", "POST", headers, json.dumps({"store": handle.id,
                                                                                 "entry": ids[2]}).encode())
    assert status == 200 and handle.store.entry(ids[2]).pinned
    assert body["pinned_entries"] == 1 and body["pinned_bytes"] == handle.store.entry(ids[2]).nbytes


@pytest.mark.parametrize("headers,why", [
    ({"Origin": "http://evil.example"}, "not this ComfyUI server"),
    ({"Origin": "http://127.0.0.1:9999"}, "not this ComfyUI server"),
    ({"Origin": "http://127.0.0.1"}, "not this ComfyUI server"),
    ({"Origin": "null"}, "not a web page's origin"),
    ({"Origin": "http://user@127.0.0.1:8188"}, "not this ComfyUI server"),
    ({"Origin": "http://127.0.0.1:8188/x"}, "not a web page's origin"),
    ({"Origin": None}, "no Origin or Host header"),
    ({"Host": None}, "no Origin or Host header"),
    ({"Sec-Fetch-Site": "same-site"}, "Sec-Fetch-Site 'same-site'"),
    ({"Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site 'cross-site'"),
])
def test_cross_origin_requests_are_refused_and_change_nothing(opened, headers, why):
    handle, ids = opened
    headers = {k: v for k, v in {**PAGE, **headers}.items() if v is not None}
    for action in routes.CHANGE_ACTIONS:
        status, body, _ = routes.change_response(action, "POST", headers,
                                                 json.dumps({"store": handle.id, "entry": ids[0]}).encode())
        assert status == 403 and why in body["error"], body
    assert len(handle.store) == 3 and handle.store.stats().pinned_entries == 0



@pytest.mark.parametrize("allowed", [None, "", "other.example", "example.org"])
def test_a_page_under_an_unlisted_name_is_refused_against_dns_rebinding(opened, monkeypatch, allowed):
    # Origin and Host agree (what a rebound attacker page sends), but the name is not one the user listed.
    if allowed is None:
        monkeypatch.delenv(routes.ALLOWED_HOSTS_ENV, raising=False)
    else:
        monkeypatch.setenv(routes.ALLOWED_HOSTS_ENV, allowed)
    handle, ids = opened
    headers = {**PAGE, "Host": "comfy.example.org:8188", "Origin": "http://comfy.example.org:8188"}
    status, body, _ = routes.change_response("evict", "POST", headers,
                                             json.dumps({"store": handle.id, "entry": ids[0]}).encode())
    assert status == 403 and "DNS rebinding" in body["error"] and routes.ALLOWED_HOSTS_ENV in body["error"]
    assert len(handle.store) == 3
    # IP literals and localhost need no listing.
    for host_name in ("127.0.0.1:8188", "192.168.1.20:8188", "[::1]:8188", "localhost:8188", "app.localhost:8188"):
        assert routes.origin_error({"Host": host_name, "Origin": f"http://{host_name}"}) is None, host_name

def test_only_a_json_post_is_accepted(opened):
    handle, ids = opened
    raw = json.dumps({"store": handle.id, "entry": ids[0]}).encode()
    status, _, headers = routes.change_response("evict", "GET", PAGE, raw)
    assert status == 405 and headers == {"Allow": "POST"}
    assert _post("evict", raw, **{"Content-Type": "text/plain"})[0] == 415  # a form a page could send
    assert _post("evict", raw, **{"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert _post("evict", b"[1, 2]")[0] == 400 and _post("evict", b"\xff\xfe")[0] == 400
    assert _post("evict", b"{" * 5000)[0] == 400
    status, body, _ = _post("evict", b" " * (routes.MAX_BODY_BYTES + 1))
    assert status == 400 and "larger than" in body["error"]
    assert routes.change_response("wipe", "POST", PAGE, raw)[0] == 404
    assert len(handle.store) == 3


def test_pin_unpin_and_evict(opened):
    handle, ids = opened
    store = handle.store
    status, body, _ = _post("pin", {"store": handle.id, "entry": ids[0]})
    assert status == 200 and store.entry(ids[0]).pinned and body["pinned_entries"] == 1
    assert store.open_report == [], "a pin is no repair"
    assert [c["pinned"] for c in body["most_used"] if c["id"] == ids[0]] == [True]

    status, body, _ = _post("evict", {"store": handle.id, "entry": str(ids[0])})
    assert status == 409 and "is pinned" in body["error"] and "unpin it first" in body["error"]
    assert store.entry(ids[0]) is not None and len(store) == 3

    assert _post("unpin", {"store": handle.id, "entry": ids[0]})[0] == 200 and not store.entry(ids[0]).pinned
    status, body, _ = _post("evict", {"store": handle.id, "entry": ids[0]})
    assert status == 200 and store.entry(ids[0]) is None and body["entries"] == 2
    assert store.thumbnail(ids[0]) is None and (store.path / "latents" / f"{ids[0]}.safetensors").exists() is False
    for action in routes.CHANGE_ACTIONS:
        status, body, _ = _post(action, {"store": handle.id, "entry": ids[0]})
        assert status == 404 and f"holds no entry {ids[0]}" in body["error"]
    assert {r.entry_id for r in store.entries()} == set(ids[1:])


# ---------------------------------------------------------------------------------------------- registration
def test_the_routes_register_on_the_prompt_server(opened, monkeypatch):
    handle, ids = opened
    registered = {}

    class Routes:
        def _add(self, method, path):
            def deco(fn):
                registered[(method, path)] = fn
                return fn
            return deco

        def get(self, path):
            return self._add("GET", path)

        def post(self, path):
            return self._add("POST", path)

    class Response:
        def __init__(self, body=None, status=200, headers=None):
            self.body, self.status, self.headers = body, status, dict(headers or {})

    def json_response(body, status=200, headers=None):
        return Response(json.dumps(body).encode(), status, {"Content-Type": "application/json", **(headers or {})})

    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (), {"instance": types.SimpleNamespace(routes=Routes())})
    aiohttp = types.ModuleType("aiohttp")
    aiohttp.web = types.SimpleNamespace(Response=Response, json_response=json_response)
    monkeypatch.setitem(sys.modules, "server", server)
    monkeypatch.setitem(sys.modules, "aiohttp", aiohttp)
    monkeypatch.setattr(routes, "_registered", False)
    assert routes.register_routes() is True
    assert sorted(registered) == [("GET", "/chai/entries"), ("GET", "/chai/stats"), ("GET", "/chai/stores"),
                                  ("GET", "/chai/thumbnail"), ("POST", "/chai/evict"), ("POST", "/chai/pin"),
                                  ("POST", "/chai/unpin")]
    assert routes.register_routes() is True and len(registered) == 7  # once only

    def request(method, query=None, headers=None, body=b""):
        class Content:
            async def read(self, n):
                return body[:n]
        return types.SimpleNamespace(method=method, query=query or {}, headers=headers or {}, content=Content())

    reply = asyncio.run(registered[("GET", "/chai/thumbnail")](request("GET", {"store": handle.id,
                                                                                "entry": str(ids[0])})))
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/jpeg" and reply.body[:3] == b"\xff\xd8\xff"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    evil = {**PAGE, "Origin": "http://evil.example"}
    raw = json.dumps({"store": handle.id, "entry": ids[0]}).encode()
    assert asyncio.run(registered[("POST", "/chai/pin")](request("POST", headers=evil, body=raw))).status == 403
    reply = asyncio.run(registered[("POST", "/chai/pin")](request("POST", headers=PAGE, body=raw)))
    assert reply.status == 200 and json.loads(reply.body)["pinned_entries"] == 1
    reply = asyncio.run(registered[("GET", "/chai/stats")](request("GET", {"store": "/etc/passwd"})))
    assert reply.status == 400
