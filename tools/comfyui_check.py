"""Check the pack in a running ComfyUI server, through its HTTP API and in a real browser.

Run it against a server that has this repository in ``custom_nodes/`` (docs/comfyui.md says how
one was set up here; this script installs nothing and starts nothing):

    python tools/comfyui_check.py --url http://127.0.0.1:8188 --out out/comfyui_check
    python tools/comfyui_check.py --url ... --checks api,interrupt,browser --screenshots docs/
    python tools/comfyui_check.py --url ... --checks api --write-thumbnails   # workflows/*.jpg

What it checks (each failure is printed and makes the exit status 1):

* every node of the pack is registered (``/object_info``: id, display name, category CHAI), the
  panel's script is served, ``/chai/stats`` answers;
* every API workflow in ``workflows/api/`` runs through ``POST /prompt`` to ``success`` on a
  fresh store, and its history lists exactly its videos as outputs (one per prompt), each a
  readable mp4; queued again, a workflow re-runs after its store changed and, with the store
  unchanged, re-runs only CHAI Cache State; a store name that holds no store (create_new off)
  fails at CHAI Cache with an error naming the node, the field, the path and the fix;
* ``--checks panel``: the reference batch's API twin on a fresh store, then the panel's routes:
  ``/chai/stores`` lists it, ``/chai/entries`` shows its entries with thumbnails,
  ``/chai/thumbnail`` serves a JPEG of at most 96 px with ``nosniff``; pin, unpin and evict work
  from the server's own origin, evicting a pinned entry is refused (409), and a POST from another
  origin or without one (403), a malformed id (400), an unknown store (404) and a path given as
  the store (400) change nothing; with ``browser`` too, the panel draws the thumbnails and its
  Pin and Evict buttons work from the page (and ``--screenshots`` shoots the panel);
* ``POST /interrupt`` at step 3 of prompt 2 of a batch stops the sampler within a second (the
  time stamped in its "cancelled" ``chai.progress`` event, so run this on the server's machine;
  the events themselves can arrive later, since ComfyUI runs ``gc.collect()`` after a prompt)
  and leaves the store as prompt 1 left it (entries and generation from ``/chai/stats``);
* with ``--checks ...,browser`` (Playwright for Python driving Chromium, ``--chromium`` names it):
  Workflow -> Browse Templates lists exactly the UI workflows of ``workflows/``, titled by their
  file names, each with its thumbnail loaded; each opens without a warning, node for node as
  saved, every node on screen at the saved zoom in a 1600x1000 window and none overlapping; each
  runs from the page; the cache panel follows the store of the run and lists every open store in
  its selector; the sampler shows "prompt k of n" during a batch; an error dialog names the node.

``--write-thumbnails`` writes each UI workflow's thumbnail from the videos its API twin just
produced (the middle frame of each video; a batch shows one frame per prompt side by side).
Needs: PyAV and Pillow (installed with the pack), ``websocket-client`` for the interrupt check,
and for the browser checks the ``playwright``
package with a Chromium it can start (never ``playwright install``: point ``--chromium`` at one).
A Cancel is honoured before every transformer block; the interrupt check prints the time one
denoising step took in the same run, since on a busy CPU one block can itself take a while.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
API_WORKFLOWS = WORKFLOWS / "api"
THUMBNAIL_WIDTH = 384
CLIENT_ID = f"chai-check-{uuid.uuid4().hex[:8]}"


class Check:
    """Collects results: ``ok(name, detail)`` / ``fail(name, detail)``; ``failed`` counts failures."""

    def __init__(self) -> None:
        self.failed = 0
        self.results: List[Dict[str, Any]] = []

    def record(self, passed: bool, name: str, detail: str = "") -> bool:
        self.results.append({"check": name, "passed": bool(passed), "detail": detail})
        print(f"{'PASS' if passed else 'FAIL'}  {name}{': ' + detail if detail else ''}", flush=True)
        self.failed += 0 if passed else 1
        return passed


# ------------------------------------------------------------------------------ HTTP


def call(url: str, path: str, body: Optional[dict] = None, timeout: float = 30.0) -> Tuple[int, Any]:
    """(status, JSON body) of GET ``path`` (or POST ``body``) on the server at ``url``."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url.rstrip("/") + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw.decode("utf-8")) if raw else None
    except ValueError:
        return status, raw


def fetch_bytes(url: str, path: str) -> bytes:
    """The raw body of GET ``path`` (a saved video through /view)."""
    with urllib.request.urlopen(url.rstrip("/") + path, timeout=60) as response:
        return response.read()


def queue(url: str, prompt: dict) -> str:
    """POST /prompt; returns the prompt id. Raises RuntimeError with the server's node errors."""
    status, body = call(url, "/prompt", {"prompt": prompt, "client_id": CLIENT_ID})
    if status != 200:
        raise RuntimeError(f"POST /prompt answered {status}: {json.dumps(body)[:800]}")
    return body["prompt_id"]


def wait(url: str, prompt_id: str, timeout: float = 600.0) -> dict:
    """The history entry of ``prompt_id`` once it finished (polls /history every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = call(url, f"/history/{prompt_id}")
        if status == 200 and body and prompt_id in body and body[prompt_id].get("status", {}).get("completed") \
                is not None and body[prompt_id]["status"].get("status_str") in ("success", "error"):
            return body[prompt_id]
        time.sleep(0.05)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s")


def with_store(prompt: dict, folder: str) -> dict:
    """A copy of an API prompt whose CHAI Cache nodes open (and create) store ``folder``."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        if node["class_type"] == "CHAI_Cache":
            node["inputs"].update(folder=folder, create_new=True)
    return prompt


def outputs_listed(entry: dict) -> int:
    """How many outputs ComfyUI's Queue lists for a history entry (every item of every key of
    every node's outputs, ``animated`` aside: frontend 1.27.10's TaskItemImpl.calculateFlatOutputs)."""
    return sum(len(items) for node in entry.get("outputs", {}).values() for key, items in node.items()
               if key != "animated" and isinstance(items, list))


def saved_videos(url: str, entry: dict) -> List[bytes]:
    """The mp4 files a run saved, in output order, read back through /view."""
    files = []
    for node in entry.get("outputs", {}).values():
        for item in node.get("images", []):
            if isinstance(item, dict) and str(item.get("filename", "")).endswith(".mp4"):
                query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
                files.append(fetch_bytes(url, f"/view?{query}"))
    return files


def video_frames(data: bytes):
    """(frames as RGB uint8 arrays, fps) of an mp4, decoded with PyAV."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, float(stream.average_rate or 0)


def thumbnail(videos: List[bytes]):
    """A JPEG-ready PIL image: the middle frame of each video side by side (3 to a row), upscaled
    without smoothing to :data:`THUMBNAIL_WIDTH` pixels wide."""
    from PIL import Image

    tiles = []
    for data in videos:
        frames, _fps = video_frames(data)
        tiles.append(Image.fromarray(frames[len(frames) // 2]))
    columns = min(3, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    tile_w = THUMBNAIL_WIDTH // columns
    tile_h = round(tile_w * tiles[0].height / tiles[0].width)
    sheet = Image.new("RGB", (tile_w * columns, tile_h * rows), (0, 0, 0))
    for i, tile in enumerate(tiles):
        sheet.paste(tile.resize((tile_w, tile_h), Image.NEAREST), ((i % columns) * tile_w, (i // columns) * tile_h))
    return sheet


def store_state(url: str, folder_suffix: str) -> Optional[dict]:
    """``stats`` of the open store whose path ends with ``folder_suffix`` (from /chai/stats)."""
    status, body = call(url, "/chai/stats")
    for payload in (body or {}).get("stores", []) if status == 200 else []:
        if str(payload.get("path", "")).endswith(folder_suffix):
            return payload["stats"]
    return None


# ------------------------------------------------------------------------------ API checks


def check_registration(url: str, check: Check) -> None:
    """Every node of the pack in /object_info (id, display name, category), the panel script
    served, /chai/stats answering, /workflow_templates listing exactly the UI workflows."""
    from comfyui_chai.nodes import DISPLAY_NAMES as nodes

    status, info = call(url, "/object_info", timeout=120)
    check.record(status == 200, "GET /object_info", f"{len(info or {})} node types")
    for node_id, display in nodes.items():
        entry = (info or {}).get(node_id)
        check.record(entry is not None and entry.get("display_name") == display and entry.get("category") == "CHAI",
                     f"node {node_id} registered", f"display name {entry.get('display_name')!r}" if entry else "missing")
    status, scripts = call(url, "/extensions")
    check.record(status == 200 and any(s.endswith("/chai_panel.js") for s in scripts or []), "panel script served",
                 next((s for s in scripts or [] if s.endswith("chai_panel.js")), "not listed"))
    status, body = call(url, "/chai/stats")
    check.record(status == 200 and isinstance(body, dict) and "stores" in body, "GET /chai/stats", f"status {status}")
    status, templates = call(url, "/workflow_templates")
    listed = sorted(name for names in (templates or {}).values() for name in names if name.startswith("CHAI"))
    expected = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    check.record(listed == expected, "GET /workflow_templates lists exactly the UI workflows", ", ".join(listed))


def api_twins() -> Dict[str, Path]:
    """UI workflow name -> its API twin (the twin named in tests/test_workflows.py's TWINS)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_workflows import TWINS  # one table of twins for the tests and this check

    return {ui: API_WORKFLOWS / api for ui, api in TWINS.items()}


def check_api_runs(url: str, check: Check, run_tag: str, out: Path, write_thumbnails: bool) -> None:
    """POST every API twin on a fresh store: success, one readable mp4 per prompt and nothing else
    in its outputs, every prompt looked up; writes each UI workflow's thumbnail from its videos
    (into ``workflows/`` with ``write_thumbnails``, else into ``out``)."""
    for ui_name, path in api_twins().items():
        prompt = with_store(json.loads(path.read_text(encoding="utf-8")), f"{run_tag}-{path.stem}")
        lists = [n for n in prompt.values() if n["class_type"] == "CHAI_PromptList"]
        n_prompts = len([ln for ln in lists[0]["inputs"]["prompts"].splitlines() if ln.strip()]) if lists else 1
        t0 = time.monotonic()
        try:
            entry = wait(url, queue(url, prompt))
        except (RuntimeError, TimeoutError) as exc:
            check.record(False, f"POST /prompt {path.name}", str(exc))
            continue
        status = entry["status"]["status_str"]
        check.record(status == "success", f"POST /prompt {path.name}",
                     f"{status} in {time.monotonic() - t0:.1f} s" + ("" if status == "success" else
                                                                    f": {json.dumps(entry['status'])[:600]}"))
        videos = saved_videos(url, entry)
        listed = outputs_listed(entry)
        check.record(len(videos) == n_prompts == listed, f"{path.name}: outputs",
                     f"{len(videos)} mp4 for {n_prompts} prompt(s); the Queue lists {listed} output(s)")
        shapes = []
        for data in videos:
            frames, fps = video_frames(data)
            shapes.append(f"{len(frames)}x{frames[0].shape[0]}x{frames[0].shape[1]}@{fps:g}")
        check.record(bool(videos), f"{path.name}: videos decode", ", ".join(sorted(set(shapes))))
        stats = store_state(url, f"{run_tag}-{path.stem}")
        if stats is not None:
            check.record(stats["lookups"] == n_prompts, f"{path.name}: store",
                         f"{stats['hits']} hits, {stats['misses']} misses, {stats['entries']} entries")
        if videos:
            image = thumbnail(videos)
            target = (WORKFLOWS if write_thumbnails else out) / f"{Path(ui_name).stem}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, "JPEG", quality=90)
            print(f"      thumbnail {target} {image.size}")


def post_change(url: str, action: str, body: Any, origin: Optional[str], host: Optional[str] = None
                ) -> Tuple[int, Any]:
    """(status, JSON body) of ``POST /chai/<action>`` with ``body`` as JSON, sent with the header
    ``Origin: origin`` (None: no Origin header, as a script sends) and ``Host: host`` if given."""
    headers = {"Content-Type": "application/json", **({"Origin": origin} if origin is not None else {}),
               **({"Host": host} if host is not None else {})}
    request = urllib.request.Request(url.rstrip("/") + f"/chai/{action}", data=json.dumps(body).encode("utf-8"),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw, status = response.read(), response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw.decode("utf-8")) if raw else None
    except ValueError:
        return status, raw


def check_panel_routes(url: str, check: Check, run_tag: str) -> Optional[str]:
    """The reference batch on a fresh store, then the panel's routes (see the module docstring).
    Returns the store's id (None when the run failed)."""
    from PIL import Image

    path = API_WORKFLOWS / "chai_batch_reference.json"
    folder = f"{run_tag}-panel"
    try:
        entry = wait(url, queue(url, with_store(json.loads(path.read_text(encoding="utf-8")), folder)))
    except (RuntimeError, TimeoutError) as exc:
        check.record(False, f"POST /prompt {path.name} (panel store)", str(exc))
        return None
    if not check.record(entry["status"]["status_str"] == "success", f"POST /prompt {path.name} (panel store)",
                        entry["status"]["status_str"]):
        return None
    status, body = call(url, "/chai/stores")
    store = next((s for s in (body or {}).get("stores", []) if str(s.get("path", "")).endswith(folder)), None)
    if not check.record(status == 200 and store is not None, "GET /chai/stores lists the store", f"status {status}"):
        return None
    sid = store["id"]
    status, body = call(url, f"/chai/entries?store={sid}")
    used = (body or {}).get("most_used", [])
    check.record(status == 200 and len(used) == store["entries"] > 0 and all(e["thumbnail"] for e in used),
                 "GET /chai/entries: most-used entries, each with a thumbnail",
                 ", ".join(f"#{e['id']} {e['entity']} {e['hits']} hits" for e in used))
    served = [lk["entry"]["id"] for lk in (body or {}).get("last_lookups", []) if lk.get("entry")]
    check.record(bool(served), "GET /chai/entries: last lookups name the entries hits were served by", str(served))
    if not used:
        return sid
    first = used[0]["id"]
    with urllib.request.urlopen(f"{url.rstrip('/')}/chai/thumbnail?store={sid}&entry={first}", timeout=30) as response:
        data, kind, sniff = response.read(), response.headers.get("Content-Type"), \
            response.headers.get("X-Content-Type-Options")
    size = Image.open(io.BytesIO(data)).size
    check.record(kind == "image/jpeg" and sniff == "nosniff" and max(size) <= 96,
                 "GET /chai/thumbnail: a small JPEG with nosniff", f"{kind}, {sniff}, {size}, {len(data)} bytes")
    origin = url.rstrip("/")
    # ComfyUI's own guard answers the first (a loopback Host); the pack's answers the other two (ComfyUI
    # checks only loopback hosts, as behind a proxy, and lets a request without Origin through).
    refused = [post_change(url, "pin", {"store": sid, "entry": first}, "http://evil.example"),
               post_change(url, "pin", {"store": sid, "entry": first}, "http://evil.example", "comfy.example.org"),
               post_change(url, "evict", {"store": sid, "entry": first}, None)]
    check.record([s for s, _ in refused] == [403, 403, 403], "a cross-origin POST, and one without Origin, are refused",
                 " | ".join(f"{s} {str((b or {}).get('error', b))[:90] if isinstance(b, dict) else ''}"
                            for s, b in refused))
    bad = [post_change(url, "pin", {"store": sid, "entry": "../1"}, origin)[0],
           post_change(url, "pin", {"store": "0" * 12, "entry": first}, origin)[0],
           post_change(url, "pin", {"store": f"/tmp/{folder}", "entry": first}, origin)[0]]
    check.record(bad == [400, 404, 400], "a bad id, an unknown store and a path as the store are refused", str(bad))
    status, body = post_change(url, "pin", {"store": sid, "entry": first}, origin)
    check.record(status == 200 and body["pinned_entries"] == 1, "same-origin POST /chai/pin", f"status {status}")
    status, body = post_change(url, "evict", {"store": sid, "entry": first}, origin)
    check.record(status == 409 and "pinned" in body.get("error", ""), "evicting a pinned entry is refused",
                 f"{status} {body.get('error', '') if isinstance(body, dict) else ''}")
    status, body = post_change(url, "unpin", {"store": sid, "entry": first}, origin)
    check.record(status == 200 and body["pinned_entries"] == 0, "same-origin POST /chai/unpin", f"status {status}")
    status, body = call(url, "/chai/stores")
    entries = next(s["entries"] for s in body["stores"] if s["id"] == sid)
    check.record(entries == store["entries"], "nothing else changed", f"{entries} entries")
    return sid


def check_requeue(url: str, check: Check, run_tag: str) -> None:
    """Queue the single workflow three times on a fresh store: the second run follows the store's
    new generation (the sampler now hits), the third, with the store unchanged, re-runs only
    CHAI Cache State and takes everything else from ComfyUI's cache."""
    prompt = with_store(json.loads((API_WORKFLOWS / "chai_single.json").read_text(encoding="utf-8")),
                        f"{run_tag}-requeue")
    state_nodes = {k for k, v in prompt.items() if v["class_type"] == "CHAI_CacheState"}
    samplers = {k for k, v in prompt.items() if v["class_type"] == "CHAI_Sampler"}
    runs = []
    for _ in range(3):
        entry = wait(url, queue(url, prompt))
        cached = {n for m in entry["status"].get("messages", []) if m[0] == "execution_cached" for n in m[1]["nodes"]}
        hits = (store_state(url, f"{run_tag}-requeue") or {}).get("hits")
        runs.append((entry["status"]["status_str"], cached, hits))
    check.record(runs[1][0] == "success" and runs[1][2] == 1 and not runs[1][1] & samplers,
                 "re-queue after the store changed re-runs the sampler (a hit now)",
                 f"hits after each run: {[r[2] for r in runs]}")
    check.record(runs[2][0] == "success" and runs[2][1] == set(prompt) - state_nodes and runs[2][2] == 1,
                 "re-queue with the store unchanged: all but Cache State from ComfyUI's cache",
                 f"cached {sorted(runs[2][1], key=int)}")


def check_missing_store(url: str, check: Check, run_tag: str) -> None:
    """A store name that holds no store, with create_new off: the run fails at CHAI Cache with an
    error that names the node, the field, the path and create_new, and no store is started there
    (``/chai/stats`` lists none)."""
    folder = f"{run_tag}-mistyped"
    prompt = with_store(json.loads((API_WORKFLOWS / "chai_single.json").read_text(encoding="utf-8")), folder)
    for node in prompt.values():
        if node["class_type"] == "CHAI_Cache":
            node["inputs"]["create_new"] = False
    entry = wait(url, queue(url, prompt))
    errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
    message = errors[0].get("exception_message", "") if errors else ""
    check.record(bool(errors) and errors[0].get("node_type") == "CHAI_Cache"
                 and message.startswith(f"CHAI Cache: folder '{folder}': there is no CHAI store at ")
                 and "create_new" in message and "Errno" not in message,
                 "a mistyped store name is an error naming node, field, path and fix", message[:200])
    status, body = call(url, "/chai/stats")
    opened = [s for s in (body or {}).get("stores", []) if str(s.get("path", "")).endswith(folder)]
    check.record(status == 200 and not opened, "no store was started for the mistyped name",
                 f"{len(opened)} open store(s) at it")


def check_interrupt(url: str, check: Check, run_tag: str) -> None:
    """Interrupt a batch of 3 at step 3 of prompt 2, timed to ComfyUI's ``execution_interrupted``
    event on the websocket (what the page shows); the store must be as prompt 1 left it."""
    import websocket  # websocket-client, as ComfyUI's own execution tests use

    folder = f"{run_tag}-interrupt"
    prompt = with_store(json.loads((API_WORKFLOWS / "chai_batch.json").read_text(encoding="utf-8")), folder)
    for node in prompt.values():
        if node["class_type"] == "CHAI_Sampler":
            node["inputs"].update(steps=40, seed=7)
        if node["class_type"] == "CHAI_PromptList":
            node["inputs"]["prompts"] = "a blue kite over a hill\na copper kettle on a stove\na blue kite at dusk"
    ws = websocket.WebSocket()
    ws.connect(url.replace("http", "ws", 1).rstrip("/") + f"/ws?clientId={CLIENT_ID}", timeout=600)
    try:
        prompt_id = queue(url, prompt)
        before, t0, posted, steps, stopped, event, sampler_stopped = None, None, 0.0, [], None, None, None
        while stopped is None:
            message = ws.recv()
            if not isinstance(message, str):
                continue
            message = json.loads(message)
            data = message.get("data") or {}
            if message["type"] == "chai.progress" and data.get("cancelled") and t0 is not None:
                sampler_stopped = data["time"] - posted  # the node's own clock: same machine as this script
            elif message["type"] == "chai.progress" and data.get("prompt_id") == prompt_id:
                steps.append((data["index"], data["step"], time.monotonic()))
                if t0 is None and data["index"] == 1 and data["step"] == 3:
                    before = store_state(url, folder)
                    t0, posted = time.monotonic(), time.time()
                    call(url, "/interrupt", {})
            elif message["type"] in ("execution_interrupted", "execution_success", "execution_error") \
                    and data.get("prompt_id") == prompt_id:
                stopped, event = time.monotonic() - (t0 or time.monotonic()), message["type"]
    finally:
        ws.close()
    wait(url, prompt_id, timeout=60)
    after = store_state(url, folder)
    later = [(i, s) for i, s, t in steps if t0 is not None and t > t0]
    gaps = sorted(b[2] - a[2] for a, b in zip(steps, steps[1:]) if a[0] == b[0])
    step_s = gaps[len(gaps) // 2] if gaps else float("nan")
    check.record(event == "execution_interrupted" and sampler_stopped is not None and sampler_stopped < 1.0,
                 "POST /interrupt at step 3 of prompt 2 of 3",
                 f"the sampler stopped {sampler_stopped if sampler_stopped is None else round(sampler_stopped, 2)} s "
                 f"later, after {len(later)} more step(s) (a step takes {step_s:.2f} s here); ComfyUI's {event} "
                 f"reached this client {stopped:.2f} s after the POST")
    same = before is not None and after is not None and (after["entries"], after["generation"]) == (
        before["entries"], before["generation"])
    check.record(same, "store unchanged by the interrupted prompt",
                 f"entries/generation {before and (before['entries'], before['generation'])} -> "
                 f"{after and (after['entries'], after['generation'])}")


# ------------------------------------------------------------------------------ command line


def main(argv: Optional[List[str]] = None) -> int:
    """Run the checks named by ``--checks``; exit status 1 when any failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="the ComfyUI server")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "comfyui_check", help="report and screenshots")
    parser.add_argument("--write-thumbnails", action="store_true", help="write workflows/<name>.jpg from the runs")
    parser.add_argument("--checks", default="api,interrupt",
                        help="comma-separated: api (every API twin runs), interrupt, panel (the panel's routes), "
                             "browser (the frontend in headless Chromium); the registration is always checked")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary for --browser")
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for the docs screenshots")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check()
    run_tag = f"check-{int(time.time())}"
    checks = {c.strip() for c in args.checks.split(",") if c.strip()}
    unknown = checks - {"api", "interrupt", "panel", "browser"}
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}: use api, interrupt, panel, browser")
    check_registration(args.url, check)
    if "api" in checks:
        check_api_runs(args.url, check, run_tag, args.out, args.write_thumbnails)
        check_requeue(args.url, check, run_tag)
        check_missing_store(args.url, check, run_tag)
    if "interrupt" in checks:
        check_interrupt(args.url, check, run_tag)
    if "panel" in checks:
        check_panel_routes(args.url, check, run_tag)
    if "browser" in checks:
        from comfyui_browser_check import browser_checks, panel_checks

        if checks == {"panel", "browser"}:  # the panel alone, in the page
            panel_checks(args.url, check, run_tag, args.out, args.screenshots, args.chromium)
        else:
            browser_checks(args.url, check, run_tag, args.out, args.screenshots, args.chromium)
    (args.out / "report.json").write_text(json.dumps(check.results, indent=2), encoding="utf-8")
    print(f"{len(check.results) - check.failed} passed, {check.failed} failed; report {args.out / 'report.json'}")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
