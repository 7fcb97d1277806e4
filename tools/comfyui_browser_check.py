"""The browser half of tools/comfyui_check.py: the ComfyUI frontend in headless Chromium.

Driven with Playwright for Python against a running server (1600x1000 window, a fresh browser
profile each run). See comfyui_check.py for what is checked; screenshots go to ``--screenshots``
(docs/) and every loaded workflow's screenshot to ``--out``.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Dict, List, Optional

from comfyui_check import WORKFLOWS, Check, api_twins, call, wait

VIEWPORT = {"width": 1600, "height": 1000}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Console lines every page load prints here (offline machine, no user.css): not the workflow's doing.
NOISE = ("Failed to load resource", "ERR_NAME_NOT_RESOLVED", "apple-mobile-web-app-capable", "Unknown message type",
         "reading 'id'")

# Screen rectangles (left, top, right, bottom) of a node (title and badge included), the canvas and
# the overlays on it, measured in the page after the workflow loaded.
GEOMETRY_JS = """() => {
  const rect = (el) => { if (!el) return null; const b = el.getBoundingClientRect();
                         return (b.width && b.height) ? [b.left, b.top, b.right, b.bottom] : null; };
  const canvas = rect(app.canvas.canvas);
  const ds = app.canvas.ds;
  const nodes = app.graph._nodes.map((n) => {
    const [x, y, w, h] = n.getBounding();
    const badge = 24;  // the node-source badge above the title
    const a = ds.convertOffsetToCanvas([x, y - badge]), b = ds.convertOffsetToCanvas([x + w, y + h]);
    return {id: n.id, type: n.type, title: n.title, pos: [...n.pos], size: [...n.size],
            box: [canvas[0] + a[0], canvas[1] + a[1], canvas[0] + b[0], canvas[1] + b[1]]};
  });
  const overlays = [...document.querySelectorAll('[class*=minimap], .p-buttongroup')].map(rect).filter(Boolean)
    .filter((r) => r[3] > canvas[1] + 100);
  return {canvas, overlays, nodes, scale: ds.scale, offset: [...ds.offset],
          links: app.graph.links instanceof Map ? app.graph.links.size : Object.keys(app.graph.links).length};
}"""


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class Page:
    """One ComfyUI tab: console capture, readiness, dialogs, JS evaluation."""

    def __init__(self, context, url: str) -> None:
        self.page = context.pages[0] if context.pages else context.new_page()
        self.console: List[str] = []
        self.responses: Dict[str, int] = {}  # URL path -> HTTP status of what the page fetched
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("response", lambda r: self.responses.__setitem__(urllib.parse.unquote(
            urllib.parse.urlsplit(r.url).path), r.status))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.goto(url)
        self.page.wait_for_function("window.app && app.graph && window.LiteGraph && app.canvas", timeout=120_000)
        time.sleep(3)
        self.close_dialogs()

    def close_dialogs(self) -> None:
        """Press Escape until no dialog is open (the first-run template dialog, an error dialog)."""
        for _ in range(5):
            if not self.page.locator(".p-dialog").count():
                return
            self.page.keyboard.press("Escape")
            time.sleep(0.7)

    def js(self, code: str, arg: Any = None) -> Any:
        """Evaluate a JavaScript function in the page."""
        return self.page.evaluate(code, arg)

    def warnings_since(self, mark: int) -> List[str]:
        """Console warnings and errors after console line ``mark``, known page-load noise aside."""
        lines = self.console[mark:]
        return [ln for ln in lines if ln.split(":")[0] in ("warning", "error", "pageerror")
                and not any(n in ln for n in NOISE)]

    def toasts(self) -> List[str]:
        """Texts of the toast messages on screen (where the frontend shows workflow warnings)."""
        return self.js("() => [...document.querySelectorAll('.p-toast-message')].map(e => e.textContent.trim())")

    def shot(self, path: Path, clip: Optional[Dict[str, float]] = None) -> None:
        """Screenshot of the window (or of ``clip``) to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), clip=clip)
        print(f"      screenshot {path}")


def node_clip(page: Page, node_type: str, pad: int = 12) -> Optional[Dict[str, float]]:
    """Screen rectangle of the first node of ``node_type`` (title and badge included), padded."""
    geometry = page.js(GEOMETRY_JS)
    for node in geometry["nodes"]:
        if node["type"] == node_type:
            left, top, right, bottom = node["box"]
            return {"x": max(0, left - pad), "y": max(0, top - pad), "width": right - left + 2 * pad,
                    "height": bottom - top + 2 * pad}
    return None


def set_widget(page: Page, node_type: str, name: str, value: Any) -> None:
    """Set widget ``name`` of every node of ``node_type`` in the open graph."""
    page.js("""([type, name, value]) => { for (const n of app.graph._nodes) if (n.type === type)
               for (const w of n.widgets ?? []) if (w.name === name) w.value = value; }""", [node_type, name, value])


def queue_from_page(page: Page) -> str:
    """Queue the open graph the way the Run button does; returns the prompt id."""
    return page.js("""async () => { const { api } = await import('/scripts/api.js');
                      const res = await api.queuePrompt(0, await app.graphToPrompt()); return res.prompt_id; }""")


def open_templates(page: Page, check: Optional[Check], pack: str, screenshots: Optional[Path]) -> List[str]:
    """Workflow -> Browse Templates, the pack's category; returns the card names. With ``check``:
    the cards are exactly the UI workflows, titled by their file names, each showing its own
    thumbnail (``workflows/<name>.jpg`` fetched with status 200 and drawn)."""
    page.js("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.page.wait_for_selector(".p-dialog .p-listbox-option", timeout=30_000)
    page.page.locator(".p-dialog .p-listbox-option", has_text=pack).first.click()
    time.sleep(2.5)  # thumbnails load
    cards = page.js("""() => [...document.querySelectorAll('.p-dialog [data-testid^="template-workflow-"]')].map(c => ({
        name: c.dataset.testid.replace('template-workflow-', ''), text: c.innerText,
        drawn: [...c.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0).length}))""")
    if check is None:
        return [c["name"] for c in cards]
    titles = sorted(c["name"] for c in cards)
    expected = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    check.record(titles == expected, "Browse Templates lists exactly the UI workflows", "; ".join(titles))
    for card in cards:
        fetched = page.responses.get(f"/api/workflow_templates/{pack}/{card['name']}.jpg")
        check.record(fetched == 200 and card["drawn"] > 0 and card["name"] in card["text"],
                     f"card {card['name']!r}: title and thumbnail",
                     f"{card['name']}.jpg: HTTP {fetched}, {card['drawn']} image(s) drawn")
    if screenshots is not None:
        page.shot(screenshots / "comfyui_templates.png")
    return [c["name"] for c in cards]


def load_template(page: Page, check: Optional[Check], pack: str, name: str, out: Path, screenshots: Optional[Path]) -> None:
    """Open template ``name`` from the browser; with ``check``, check what loads against the file."""
    record = check.record if check is not None else (lambda *args: None)
    mark = len(page.console)
    saved = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    open_templates(page, None, pack, None)  # the listing is checked once, in browser_checks
    page.page.locator(f'.p-dialog [data-testid="template-workflow-{name}"]').click()
    page.page.wait_for_function("!document.querySelector('.p-dialog')", timeout=30_000)
    time.sleep(2)
    warnings = page.warnings_since(mark) + page.toasts()
    record(not warnings, f"{name!r} opens without a warning", "; ".join(warnings)[:600])
    geometry = page.js(GEOMETRY_JS)
    by_id = {n["id"]: n for n in geometry["nodes"]}
    same = (len(by_id) == len(saved["nodes"]) and geometry["links"] == len(saved["links"])
            and all(by_id.get(n["id"], {}).get("pos") == n["pos"] and by_id[n["id"]]["size"] == n["size"]
                    and by_id[n["id"]]["type"] == n["type"] for n in saved["nodes"])
            and geometry["scale"] == saved["extra"]["ds"]["scale"] and geometry["offset"] == saved["extra"]["ds"]["offset"])
    record(same, f"{name!r} loads node for node as saved (positions, sizes, links, zoom)",
                 f"{len(by_id)} nodes, {geometry['links']} links, zoom {geometry['scale']}")
    canvas = geometry["canvas"]
    off_screen = [n["title"] for n in geometry["nodes"]
                  if not (n["box"][0] >= canvas[0] and n["box"][1] >= canvas[1] and n["box"][2] <= canvas[2]
                          and n["box"][3] <= canvas[3]) or any(_overlap(n["box"], o) for o in geometry["overlays"])]
    record(not off_screen, f"{name!r}: every node on screen at the saved zoom (1600x1000)",
                 ", ".join(off_screen) or f"{len(geometry['nodes'])} nodes inside {canvas}, clear of {geometry['overlays']}")
    nodes = geometry["nodes"]
    overlapping = [f"{a['title']} / {b['title']}" for i, a in enumerate(nodes) for b in nodes[i + 1:]
                   if _overlap(a["box"], b["box"])]
    record(not overlapping, f"{name!r}: no node overlaps another", ", ".join(overlapping))
    page.shot(out / f"loaded - {name}.png")


def run_loaded(page: Page, check: Check, url: str, name: str, store: str, watch=None) -> Optional[dict]:
    """Queue the open workflow from the page on store ``store``; ``watch(page)`` runs while it runs."""
    set_widget(page, "CHAI_Cache", "folder", store)
    set_widget(page, "CHAI_Cache", "create_new", True)
    prompt_id = queue_from_page(page)
    if watch is not None:
        watch(page, prompt_id)
    entry = wait(url, prompt_id)
    ok = entry["status"]["status_str"] == "success"
    check.record(ok, f"{name!r} runs from the page", entry["status"]["status_str"])
    time.sleep(1.5)
    return entry if ok else None


def browser_checks(url: str, check: Check, run_tag: str, out: Path, screenshots: Optional[Path],
                   chromium: str) -> None:
    """Every browser check (see comfyui_check.py), in one fresh headless Chromium profile."""
    from playwright.sync_api import sync_playwright

    status, templates = call(url, "/workflow_templates")
    pack = next((p for p, names in (templates or {}).items() if any(n.startswith("CHAI") for n in names)), None)
    if not check.record(pack is not None, "the pack's template folder is served", str(pack)):
        return
    twins = {Path(ui).stem: api for ui, api in api_twins().items()}
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="chai-check-"), headless=True,
                                                       executable_path=chromium, args=CHROMIUM_FLAGS,
                                                       viewport=VIEWPORT)
        try:
            page = Page(context, url)
            open_templates(page, check, pack, screenshots)
            page.close_dialogs()
            for name in sorted(twins):
                load_template(page, check, pack, name, out, screenshots)
            _panel_and_progress(page, check, url, run_tag, pack, twins, screenshots, out)
            _panel_entries(page, check, url, f"{run_tag}-reference", screenshots)
            _error_dialog(page, check, pack, twins, out, screenshots)
        finally:
            context.close()


def panel_checks(url: str, check: Check, run_tag: str, out: Path, screenshots: Optional[Path], chromium: str) -> None:
    """The panel alone: the reference batch run from the page on a fresh store, then
    :func:`_panel_entries` (thumbnails, Pin and Evict)."""
    from playwright.sync_api import sync_playwright

    status, templates = call(url, "/workflow_templates")
    pack = next((p for p, names in (templates or {}).items() if any(n.startswith("CHAI") for n in names)), None)
    if not check.record(pack is not None, "the pack's template folder is served", str(pack)):
        return
    twins = {Path(ui).stem: api for ui, api in api_twins().items()}
    reference = next(n for n, api in twins.items() if api.stem == "chai_batch_reference")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="chai-check-"), headless=True,
                                                       executable_path=chromium, args=CHROMIUM_FLAGS,
                                                       viewport=VIEWPORT)
        try:
            page = Page(context, url)
            load_template(page, check, pack, reference, out, None)
            store = f"{run_tag}-panel-page"
            if run_loaded(page, check, url, reference, store) is not None:
                _panel_entries(page, check, url, store, screenshots)
        finally:
            context.close()


def _panel_entries(page: Page, check: Check, url: str, store: str, screenshots: Optional[Path]) -> None:
    """The panel showing store ``store`` (just run from the page): its most-used entries and last
    lookups drawn as thumbnails, Pin pins (a POST from the page, so same-origin) and disables
    Evict, Unpin undoes it, Evict removes the entry; ``--screenshots`` shoots the panel pinned."""
    page.js("""(path) => { const s = document.querySelector('.chai-store-select');
                           const o = [...s.options].find(o => o.title.endsWith(path)); s.value = o.value;
                           s.dispatchEvent(new Event('change')); }""", store)
    time.sleep(2)
    drawn = page.js("""() => ['.chai-most-used', '.chai-lookups'].map((sel) => [...document.querySelectorAll(
                         `${sel} img`)].filter((i) => i.complete && i.naturalWidth > 0).length)""")
    status, body = call(url, "/chai/stores")
    sid = next(s["id"] for s in body["stores"] if s["path"].endswith(store))
    status, entries = call(url, f"/chai/entries?store={sid}")
    used = entries["most_used"]
    check.record(drawn[0] == len(used) > 0 and drawn[1] > 0, "panel draws the entries' thumbnails",
                 f"{drawn[0]} of {len(used)} most-used, {drawn[1]} in the last lookups")
    first = used[0]["id"]

    def entry_state(entry_id: int):
        _, now = call(url, f"/chai/entries?store={sid}")
        return next((e for e in now["most_used"] if e["id"] == entry_id), None), now

    page.page.locator(".chai-most-used .chai-entry").first.locator(".chai-pin").click()
    time.sleep(1.5)
    state, now = entry_state(first)
    evict_disabled = page.js("() => document.querySelector('.chai-most-used .chai-entry .chai-evict').disabled")
    label = page.js("() => document.querySelector('.chai-budget-fill')?.parentElement?.previousSibling?.textContent")
    check.record(bool(state and state["pinned"]) and evict_disabled and "pinned" in (label or ""),
                 "Pin in the panel pins the entry (a same-origin POST from the page) and disables its Evict",
                 f"entry #{first} pinned={state and state['pinned']}; {label}")
    clip = node_clip(page, "CHAI_CacheState")
    if screenshots is not None and clip:
        page.shot(screenshots / "comfyui_cache_panel.png", clip)
    page.page.locator(".chai-most-used .chai-entry").first.locator(".chai-pin").click()
    time.sleep(1.5)
    state, now = entry_state(first)
    check.record(bool(state) and not state["pinned"], "Unpin in the panel unpins it", f"entry #{first}")
    last = page.page.locator(".chai-most-used .chai-entry").last
    victim = now["most_used"][-1]["id"]
    last.locator(".chai-evict").click()
    time.sleep(1.5)
    _, after = entry_state(victim)
    check.record(after["entries"] == now["entries"] - 1 and all(e["id"] != victim for e in after["most_used"]),
                 "Evict in the panel removes the entry", f"entry #{victim}; {after['entries']} entries left")


def _panel_and_progress(page: Page, check: Check, url: str, run_tag: str, pack: str, twins: Dict[str, Path],
                        screenshots: Optional[Path], out: Path) -> None:
    """The tiny batch on store A, then the reference batch on store B: the panel follows the run
    as soon as its sampler reports (long before Cache State runs at the end), its selector lists
    every open store, the sampler shows "prompt k of n" while the batch runs, and choosing store
    A in the selector shows A."""
    batch = next(n for n, api in twins.items() if api.stem == "chai_batch")
    reference = next(n for n, api in twins.items() if api.stem == "chai_batch_reference")
    first, second = f"{run_tag}-batch", f"{run_tag}-reference"
    selected = "() => document.querySelector('.chai-store-select')?.selectedOptions[0]?.title ?? ''"
    load_template(page, None, pack, batch, out, None)
    run_loaded(page, check, url, batch, first)
    check.record(page.js(selected).endswith(first), "panel shows the store of the batch just run", page.js(selected))

    load_template(page, None, pack, reference, out, None)
    seen: Dict[str, Any] = {}

    def watch(pg: Page, prompt_id: str) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            store = pg.js(selected)
            progress = pg.js("() => document.querySelector('.chai-progress-label')?.textContent ?? ''")
            status, history = call(url, f"/history/{prompt_id}")
            finished = bool(history and prompt_id in history)
            if store.endswith(second) and "switched" not in seen:
                seen["switched"] = not finished
            if "prompt 2 of 6" in progress and "progress" not in seen:
                seen["progress"] = progress
                clip = node_clip(pg, "CHAI_Sampler")
                if screenshots is not None and clip:
                    pg.shot(screenshots / "comfyui_batch_progress.png", clip)
            if finished:
                return
            time.sleep(0.1)

    entry = run_loaded(page, check, url, reference, second, watch)
    check.record(bool(seen.get("switched")), "panel switches to the running batch's store during the run",
                 "on the sampler's first chai.stats, before the run ended" if seen.get("switched") else str(seen))
    check.record("progress" in seen, "sampler shows 'prompt k of n' during the batch", seen.get("progress", ""))
    options = page.js("() => [...document.querySelector('.chai-store-select')?.options ?? []].map(o => o.title)")
    status, stats = call(url, "/chai/stats")
    open_paths = sorted(s["path"] for s in stats["stores"])
    check.record(sorted(options) == open_paths and any(o.endswith(first) for o in options),
                 "panel selector lists every open store", f"{len(options)} of {len(open_paths)}")
    if entry is not None:
        from comfyui_check import outputs_listed

        check.record(outputs_listed(entry) == 6, "Queue lists the batch's 6 videos as its outputs",
                     f"{outputs_listed(entry)} outputs")
    clip = node_clip(page, "CHAI_CacheState")
    if screenshots is not None and clip:
        page.shot(screenshots / "comfyui_cache_panel.png", clip)
        page.shot(screenshots / "comfyui_batch_reference.png")
        # The selector's options drawn as a list (a headless screenshot cannot show an open dropdown).
        page.js("() => { const s = document.querySelector('.chai-store-select'); s.size = Math.min(6, s.options.length); }")
        time.sleep(0.5)
        page.shot(screenshots / "comfyui_store_selector.png", clip)
        page.js("() => { document.querySelector('.chai-store-select').size = 0; }")
    page.js("""(path) => { const s = document.querySelector('.chai-store-select');
                           const o = [...s.options].find(o => o.title.endsWith(path)); s.value = o.value;
                           s.dispatchEvent(new Event('change')); }""", first)
    time.sleep(1.5)
    entries = page.js("() => document.querySelector('.chai-entries')?.textContent")
    check.record(page.js(selected).endswith(first) and entries == "3", "choosing another store in the selector shows it",
                 f"{first}: {entries} entries")


def _error_dialog(page: Page, check: Check, pack: str, twins: Dict[str, Path], out: Path,
                  screenshots: Optional[Path]) -> None:
    """A run-time error in a CHAI node: the dialog names the node as the canvas does."""
    single = next(n for n, api in twins.items() if api.stem == "chai_single")
    load_template(page, None, pack, single, out, None)
    set_widget(page, "CHAI_Cache", "folder", "../outside-the-store-root")
    queue_from_page(page)
    page.page.wait_for_selector(".p-dialog", timeout=120_000)
    time.sleep(1)
    text = page.js("() => document.querySelector('.p-dialog')?.innerText ?? ''")
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    check.record(first_line.startswith("CHAI Cache (node") and "CHAI Cache: folder '../outside-the-store-root' leaves" in text,
                 "error dialog names the node", " | ".join(text.strip().splitlines()[:2]))
    if screenshots is not None:
        page.shot(screenshots / "comfyui_error_dialog.png")
    page.close_dialogs()
