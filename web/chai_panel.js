// ComfyUI-CHAI frontend: the cache-state panel inside the "CHAI Cache State" node, the text displays
// of the Entity Extractor, Cache Lookup and Sampler nodes, the sampler's batch progress, and error
// dialogs that name CHAI nodes by their display name.
//
// Data sources (all read-only):
//   * "chai.ui" {node, prompt_id, ui}: a node's display data (nodes/adapter.py sends it instead of
//     ComfyUI's `ui` output, which the Queue would count as outputs);
//   * "chai.stats" {id, name, path, stats, ..., prompt_id}: a store's state, after every sampler run;
//   * "chai.progress" {node, index, count, step, steps, overall} or {node, index, count, cancelled}:
//     the sampler's progress;
//   * GET /chai/stats[?store=<id>]: every store this ComfyUI process opened (the selector, Refresh);
//   * GET /chai/entries?store=<id>: the shown store's last lookups and most-used entries, each with
//     its thumbnail from GET /chai/thumbnail?store=<id>&entry=<n>.
// Changes: POST /chai/pin, /chai/unpin, /chai/evict {store, entry} (the Pin and Evict buttons; the
// server accepts them only from this page, nodes/routes.py).
// The panel follows the work: the first "chai.stats" of a run this page queued selects that run's
// store; the selector shows any other open store, and every store's events update it live.
// Everything is rendered with textContent (never innerHTML): prompts are user text.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STATE_NODE = "CHAI_CacheState";
const SAMPLER_NODE = "CHAI_Sampler";
const TEXT_NODES = new Set(["CHAI_EntityExtractor", "CHAI_CacheLookup", SAMPLER_NODE]);

const STORES = new Map();   // store id -> latest payload (from events and /chai/stats)
const PANELS = new Set();   // every live CachePanel
const DISPLAY_NAMES = {};   // CHAI node id -> display name

function el(tag, style, text) {
  const e = document.createElement(tag);
  if (style) Object.assign(e.style, style);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmtBytes(n) {
  if (!Number.isFinite(n)) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n < 10 && i > 0 ? 2 : 1)} ${units[i]}`;
}

function clip(s, n) {
  s = String(s ?? "");
  return s.length > n ? s.slice(0, n - 1) + "\u2026" : s;
}

// The graph node of an execution id: "12" at the top level, "5:12" inside subgraph node 5.
function nodeFor(executionId) {
  let graph = app.graph;
  let node = null;
  for (const part of String(executionId ?? "").split(":")) {
    node = graph?.getNodeById?.(isNaN(Number(part)) ? part : Number(part)) ?? null;
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

const C = {
  fg: "var(--fg-color, #ddd)",
  dim: "var(--descrip-text, #999)",
  bg: "var(--comfy-input-bg, #222)",
  border: "var(--border-color, #444)",
  hit: "#3fb97f",
  miss: "#d9822b",
  pin: "#4a8fd9",
};

function fmtAge(s) {
  if (!Number.isFinite(s)) return "?";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

function smallButton(text, title, onClick) {
  const b = el("button", { font: "10px sans-serif", cursor: "pointer", padding: "0 4px", color: C.fg,
                           background: "transparent", border: `1px solid ${C.border}`, borderRadius: "3px" }, text);
  b.title = title;
  b.addEventListener("click", (ev) => { ev.stopPropagation(); onClick(); });
  return b;
}

// A 56 px box with an entry's thumbnail (or a word when there is none).
function thumbBox(storeId, entry, empty) {
  const box = el("div", { width: "56px", height: "56px", flex: "none", display: "flex", alignItems: "center",
                          justifyContent: "center", background: "rgba(128,128,128,0.2)", borderRadius: "3px",
                          overflow: "hidden", fontSize: "10px", color: C.dim });
  if (entry?.thumbnail) {
    const img = el("img", { width: "100%", height: "100%", objectFit: "contain", imageRendering: "pixelated" });
    img.alt = entry.entity ?? "";
    img.src = api.apiURL(`/chai/thumbnail?store=${encodeURIComponent(storeId)}&entry=${Number(entry.id)}`);
    box.append(img);
  } else {
    box.textContent = empty;
  }
  return box;
}

function strip() {
  return el("div", { display: "flex", gap: "4px", overflowX: "auto", flex: "none" });
}

function bar(height) {
  const track = el("div", { height: `${height}px`, background: "rgba(128,128,128,0.25)", borderRadius: "4px",
                            overflow: "hidden" });
  const fill = el("div", { height: "100%", width: "0%", background: C.hit, transition: "width 0.2s" });
  track.append(fill);
  return [track, fill];
}

// ---------------------------------------------------------------------------- the panel

class CachePanel {
  constructor(node) {
    this.node = node;
    this.selected = null;      // store id shown
    this.awaitingRun = null;   // prompt id of a run this page started: its first chai.stats selects its store
    this.root = el("div", {
      font: "12px sans-serif", color: C.fg, background: C.bg, border: `1px solid ${C.border}`,
      borderRadius: "6px", padding: "8px", boxSizing: "border-box", width: "100%", height: "100%",
      overflow: "hidden", display: "flex", flexDirection: "column", gap: "6px",
    });
    this.root.className = "chai-cache-panel";

    const head = el("div", { display: "flex", alignItems: "center", gap: "6px" });
    this.title = el("div", { fontWeight: "bold", whiteSpace: "nowrap" }, "CHAI cache");
    this.select = el("select", { flex: "1", minWidth: "0", font: "12px sans-serif", color: C.fg, background: C.bg,
                                 border: `1px solid ${C.border}`, borderRadius: "4px", padding: "1px 2px" });
    this.select.className = "chai-store-select";
    this.select.title = "Stores this ComfyUI process has open";
    this.select.addEventListener("change", (ev) => {
      ev.stopPropagation();
      this.show(this.select.value);
      this.refresh();
    });
    for (const type of ["pointerdown", "mousedown", "wheel"]) {  // keep the canvas from taking these
      this.select.addEventListener(type, (ev) => ev.stopPropagation());
    }
    this.button = el("button", { font: "12px sans-serif", cursor: "pointer", padding: "2px 8px",
                                  color: C.fg, background: "transparent", border: `1px solid ${C.border}`,
                                  borderRadius: "4px" }, "Refresh");
    this.button.className = "chai-refresh";
    this.button.addEventListener("click", (ev) => { ev.stopPropagation(); this.refresh(); });
    head.append(this.title, this.select, this.button);

    this.tiles = el("div", { display: "grid", gridTemplateColumns: "repeat(6, 1fr)", gap: "4px" });
    this.tile = {};
    for (const [key, label] of [["entries", "entries"], ["hit_rate", "hit rate"], ["hits", "hits"],
                                ["misses", "misses"], ["evictions", "evictions"],
                                ["computed", "steps computed"]]) {
      const box = el("div", { border: `1px solid ${C.border}`, borderRadius: "4px", padding: "3px",
                              textAlign: "center" });
      const value = el("div", { fontSize: "15px", fontWeight: "bold" }, "\u2013");
      value.className = `chai-${key.replace("_", "-")}`;
      box.append(value, el("div", { fontSize: "10px", color: C.dim }, label));
      this.tile[key] = value;
      this.tiles.append(box);
    }

    const barWrap = el("div", {});
    this.barLabel = el("div", { fontSize: "11px", color: C.dim, marginBottom: "2px" }, "bytes / budget");
    const [track, fill] = bar(10);
    track.style.display = "flex";  // pinned bytes (never evicted) first, then the rest
    this.pinFill = el("div", { height: "100%", width: "0%", background: C.pin });
    this.pinFill.className = "chai-pinned-fill";
    track.prepend(this.pinFill);
    this.barFill = fill;
    this.barFill.className = "chai-budget-fill";
    barWrap.append(this.barLabel, track);

    this.lastRun = el("div", { fontSize: "11px", color: C.dim, whiteSpace: "nowrap", overflow: "hidden",
                               textOverflow: "ellipsis" }, "");
    this.lastWhy = el("div", { fontSize: "10px", color: C.dim, whiteSpace: "nowrap", overflow: "hidden",
                               textOverflow: "ellipsis" }, "");
    this.lastWhy.className = "chai-last-why";

    // The last lookups (the entry each hit was served by) and the most-used entries, as thumbnails.
    const entries = el("div", { flex: "1", overflow: "auto", minHeight: "60px", display: "flex",
                                flexDirection: "column", gap: "2px" });
    const label = (text) => el("div", { fontSize: "10px", color: C.dim }, text);
    this.lookupStrip = strip();
    this.lookupStrip.className = "chai-lookups";
    this.usedStrip = strip();
    this.usedStrip.className = "chai-most-used";
    entries.append(label("last lookups"), this.lookupStrip, label("most used (pin: never evicted)"), this.usedStrip);
    this.entriesKey = null;

    this.status = el("div", { fontSize: "10px", color: C.dim }, "Runs of the CHAI Sampler update this panel.");
    this.root.append(head, this.tiles, barWrap, this.lastRun, this.lastWhy, entries, this.status);
  }

  // The options of the selector: every store known to this page, the shown one selected.
  fillSelector() {
    const ids = [...STORES.keys()];
    const current = [...this.select.options].map((o) => o.value);
    if (ids.length !== current.length || ids.some((id, i) => id !== current[i])) {
      this.select.replaceChildren(...ids.map((id) => {
        const p = STORES.get(id);
        const option = el("option", {}, `${clip(p.name ?? id, 28)} \u00b7 ${id.slice(0, 6)}`);
        option.value = id;
        option.title = p.path ?? "";
        return option;
      }));
    }
    if (this.selected && STORES.has(this.selected)) this.select.value = this.selected;
  }

  // Show store `id` (its latest known state).
  show(id) {
    if (!id || !STORES.has(id)) return;
    this.selected = id;
    this.node.properties = this.node.properties || {};
    this.node.properties.chai_store_id = id;
    this.fillSelector();
    this.render(STORES.get(id));
  }

  // A store's new state arrived (any store): follow the run, or update if it is the one shown.
  onStats(payload) {
    const run = this.awaitingRun;
    if (run && (run === true || !payload.prompt_id || payload.prompt_id === run)) {
      this.awaitingRun = null;
      this.show(payload.id);
    } else if (!this.selected) {
      this.show(payload.id);
    } else {
      this.fillSelector();
      if (payload.id === this.selected) this.render(payload);
    }
  }

  render(payload) {
    const s = payload.stats;
    this.select.title = payload.path ?? "";
    this.tile.entries.textContent = String(s.entries);
    this.tile.hit_rate.textContent = `${(100 * (s.hit_rate ?? 0)).toFixed(1)}%`;
    this.tile.hits.textContent = String(s.hits);
    this.tile.misses.textContent = String(s.misses);
    this.tile.evictions.textContent = String(s.evictions);
    // Share of this process's sampler steps on the store that ran in full (intra-request caching reuses the rest).
    const steps = payload.steps ?? {};
    this.tile.computed.textContent = steps.steps ? `${(100 * steps.computed / steps.steps).toFixed(0)}%` : "\u2013";
    this.tile.computed.title = steps.steps ? `${steps.computed} of ${steps.steps} steps computed in full` : "";
    const fill = Math.max(0, Math.min(1, payload.fill ?? (s.bytes / Math.max(1, s.budget_bytes))));
    const pinned = Math.max(0, Math.min(fill, (s.pinned_bytes ?? 0) / Math.max(1, s.budget_bytes)));
    this.pinFill.style.width = `${(100 * pinned).toFixed(1)}%`;
    this.barFill.style.width = `${(100 * (fill - pinned)).toFixed(1)}%`;
    this.barFill.style.background = fill > 0.9 ? C.miss : C.hit;
    this.barLabel.textContent =
      `${fmtBytes(s.bytes)} of ${fmtBytes(s.budget_bytes)} (${(100 * fill).toFixed(1)}%), ` +
      `pinned ${fmtBytes(s.pinned_bytes ?? 0)} (${s.pinned_entries ?? 0}), policy ${s.policy}`;
    const run = payload.last_run;
    const intra = Object.values(run?.hook_reports ?? {}).find((r) => r && r.map);
    const computed = intra ? ` (${intra.full} computed, ${intra.method})` : "";
    this.lastRun.textContent = run
      ? `last run: ${run.hit ? "HIT" : "MISS"}, served by ${run.served_by ?? run.mode} (${run.sampling_mode ?? run.mode} mode), ${run.steps} steps${computed}, ${(run.timings_ms.total_ms / 1000).toFixed(2)} s \u2014 ${clip(run.prompt, 60)}`
      : "";
    // Why that method served it (auto: Chorus, else CHAI, else full), e.g. "whole prompt ~ '...' 0.931 >= 0.80".
    this.lastWhy.textContent = run && run.reason ? `why: ${run.reason}` : "";
    this.lastWhy.title = run && run.reason ? run.reason : "";
    // Entries change with the generation (inserts, evictions), lookups and pins: reload them then.
    const key = `${payload.id}:${s.generation}:${s.lookups}:${s.pinned_entries}`;
    if (key !== this.entriesKey) {
      this.entriesKey = key;
      this.loadEntries(payload.id);
    }
    const when = payload.time ? new Date(payload.time * 1000).toLocaleTimeString() : "";
    this.status.textContent =
      `${STORES.size} open store${STORES.size === 1 ? "" : "s"} \u00b7 generation ${s.generation} \u00b7 updated ${when}`;
    this.node.setDirtyCanvas?.(true, true);
  }

  // GET /chai/entries for store `id`, then draw both strips (a reply for another store is dropped).
  async loadEntries(id) {
    try {
      const res = await api.fetchApi(`/chai/entries?store=${encodeURIComponent(id)}`);
      const body = await res.json();
      if (!res.ok) throw new Error(body.error ?? `HTTP ${res.status}`);
      if (id === this.selected) this.renderEntries(body);
    } catch (err) {
      this.status.textContent = `entries: ${err.message ?? err}`;
    }
  }

  renderEntries(body) {
    this.lookupStrip.replaceChildren(...(body.last_lookups ?? []).map((l) => {
      const card = el("div", { width: "56px", flex: "none", fontSize: "10px" });
      card.title = `${l.prompt ?? ""}${l.matched ? `\n${l.entity} \u2192 ${l.matched} (${Number(l.similarity).toFixed(3)})` : ""}`;
      card.append(
        thumbBox(body.id, l.entry, l.hit ? "evicted" : "miss"),
        el("div", { color: l.hit ? C.hit : C.miss, fontWeight: "bold" },
           l.hit ? `hit ${Number(l.similarity).toFixed(2)}` : "miss"),
        el("div", { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" }, l.entity ?? clip(l.prompt, 12)),
      );
      return card;
    }));
    this.usedStrip.replaceChildren(...(body.most_used ?? []).map((e) => {
      const card = el("div", { width: "56px", flex: "none", fontSize: "10px",
                               outline: e.pinned ? `2px solid ${C.pin}` : "none", borderRadius: "3px" });
      card.className = "chai-entry";
      card.title = `entry #${e.id}: ${e.prompt}\n${e.entities.join(", ")}\n${fmtBytes(e.bytes)}` +
                   `${e.pinned ? ", pinned (never evicted)" : ""}`;
      const pin = smallButton(e.pinned ? "unpin" : "pin", e.pinned ? "Let the policy evict it again"
                                                                 : "Never evict this entry (its bytes still count)",
                              () => this.change(e.pinned ? "unpin" : "pin", e.id));
      pin.className = "chai-pin";
      const evict = smallButton("evict", e.pinned ? "Pinned: unpin it first" : "Remove this entry from the store",
                                () => this.change("evict", e.id));
      evict.className = "chai-evict";
      evict.disabled = e.pinned;
      card.append(
        thumbBox(body.id, e, "no picture"),
        el("div", { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" }, e.entity ?? "?"),
        el("div", { color: C.dim }, `${e.hits} hit${e.hits === 1 ? "" : "s"} \u00b7 ${fmtAge(e.age_s)}`),
      );
      const buttons = el("div", { display: "flex", gap: "2px" });
      buttons.append(pin, evict);
      card.append(buttons);
      return card;
    }));
  }

  // POST /chai/<action> {store, entry}; the reply is the store's new entries.
  async change(action, entryId) {
    const id = this.selected;
    try {
      const res = await api.fetchApi(`/chai/${action}`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ store: id, entry: entryId }),
      });
      const body = await res.json();
      if (!res.ok) throw new Error(body.error ?? `HTTP ${res.status}`);
      if (id === this.selected) this.renderEntries(body);
      await loadStores();  // the tiles and the budget bar
      this.status.textContent = `${action} entry #${entryId}: done`;
    } catch (err) {
      this.status.textContent = `${action} entry #${entryId}: ${err.message ?? err}`;
    }
  }

  // Reload every open store from the server, then show the selected (or remembered) one.
  async refresh() {
    this.status.textContent = "refreshing\u2026";
    const error = await loadStores();
    if (error) {
      this.status.textContent = error;
    } else if (!STORES.size) {
      this.status.textContent = "No store open in this ComfyUI process yet: queue the workflow.";
    } else {
      const wanted = [this.selected, this.node.properties?.chai_store_id].find((id) => id && STORES.has(id));
      this.show(wanted ?? [...STORES.keys()][0]);
    }
  }
}

// GET /chai/stats: every store this ComfyUI process has open, into STORES and every panel.
// Returns an error text, or null.
async function loadStores() {
  try {
    const res = await api.fetchApi("/chai/stats");
    const body = await res.json();
    if (!res.ok) return body.error ?? `HTTP ${res.status}`;
    for (const p of body.stores ?? []) STORES.set(p.id, p);
  } catch (err) {
    return `refresh failed: ${err}`;
  }
  for (const panel of PANELS) {
    panel.fillSelector();
    if (panel.selected && STORES.has(panel.selected)) panel.render(STORES.get(panel.selected));
  }
  return null;
}

function storeStats(payload) {
  if (!payload?.id || !payload.stats) return;
  STORES.set(payload.id, payload);
  for (const panel of PANELS) panel.onStats(payload);
}

// ---------------------------------------------------------------------------- text displays

class TextDisplay {
  constructor(node, withProgress) {
    this.node = node;
    this.promptId = null;
    this.lines = [];
    this.root = el("div", {
      font: "11px monospace", color: C.fg, background: C.bg, border: `1px solid ${C.border}`,
      borderRadius: "4px", padding: "4px", boxSizing: "border-box", width: "100%", height: "100%",
      minHeight: "28px", display: "flex", flexDirection: "column", gap: "3px", overflow: "hidden",
    });
    this.root.className = "chai-text-display";
    if (withProgress) {
      this.progress = el("div", { display: "none", flexDirection: "column", gap: "2px" });
      this.progress.className = "chai-progress";
      this.progressLabel = el("div", { font: "11px sans-serif", color: C.dim }, "");
      this.progressLabel.className = "chai-progress-label";
      const [batchTrack, batchFill] = bar(6);
      const [stepTrack, stepFill] = bar(4);
      batchTrack.className = "chai-batch-bar";
      stepTrack.className = "chai-step-bar";
      this.batchFill = batchFill;
      this.stepFill = stepFill;
      this.batchTrack = batchTrack;
      this.progress.append(this.progressLabel, batchTrack, stepTrack);
      this.root.append(this.progress);
    }
    this.text = el("div", { whiteSpace: "pre-wrap", overflow: "auto", flex: "1" }, "");
    this.text.className = "chai-text";
    this.root.append(this.text);
  }

  // One line per call of the node in a run (a batch maps the node over its prompts).
  addText(promptId, lines) {
    if (promptId !== this.promptId) {
      this.promptId = promptId;
      this.lines = [];
    }
    this.lines.push(...lines);
    this.text.textContent = this.lines.join("\n");
    this.node.setDirtyCanvas?.(true, true);
  }

  setProgress(p) {
    if (!this.progress) return;
    const batch = p.count > 1;
    this.progress.style.display = "flex";
    if (p.cancelled) {
      this.progressLabel.textContent = `cancelled${batch ? ` in prompt ${p.index + 1} of ${p.count}` : ""}`;
      return;
    }
    this.batchTrack.style.display = batch ? "block" : "none";
    const prompt = batch ? `prompt ${p.index + 1} of ${p.count} \u00b7 ` : "";
    this.progressLabel.textContent =
      `${prompt}step ${p.step} of ${p.steps}${batch ? ` \u00b7 batch ${Math.round(100 * p.overall)}%` : ""}`;
    this.batchFill.style.width = `${(100 * p.overall).toFixed(1)}%`;
    this.stepFill.style.width = `${(100 * p.step / Math.max(1, p.steps)).toFixed(1)}%`;
    this.node.setDirtyCanvas?.(true, false);
  }
}

// ---------------------------------------------------------------------------- error dialogs

// ComfyUI's error dialog titles an error with the node's id ("CHAI_Cache"); name CHAI nodes the way
// the canvas does. Registered when this module loads, which is before the app adds its own
// execution_error listener (app.setup loads extensions first), so the dialog sees the new name.
api.addEventListener("execution_error", ({ detail }) => {
  const type = detail?.node_type;
  if (!type || !(type in DISPLAY_NAMES)) return;
  const node = nodeFor(detail.node_id);
  detail.node_type = `${node?.title || DISPLAY_NAMES[type]} (node ${detail.node_id})`;
});

// ---------------------------------------------------------------------------- extension

app.registerExtension({
  name: "comfyui_chai.cache_panel",

  async setup() {
    api.addEventListener("chai.stats", ({ detail }) => storeStats(detail));
    api.addEventListener("chai.ui", ({ detail }) => {
      const node = nodeFor(detail?.node);
      const ui = detail?.ui ?? {};
      if (!node) return;
      if (ui.chai_stats?.length) {  // Cache State: its own store
        const payload = ui.chai_stats[ui.chai_stats.length - 1];
        STORES.set(payload.id, payload);
        node.__chaiPanel?.show(payload.id);
        for (const panel of PANELS) panel.fillSelector();
      }
      if (ui.text?.length) node.__chaiText?.addText(detail.prompt_id, ui.text);
    });
    api.addEventListener("chai.progress", ({ detail }) => nodeFor(detail?.node)?.__chaiText?.setProgress(detail));
    api.addEventListener("execution_start", ({ detail }) => {
      for (const panel of PANELS) panel.awaitingRun = detail?.prompt_id ?? true;
    });
    api.addEventListener("execution_success", () => { if (PANELS.size) loadStores(); });  // stores a run opened
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name.startsWith("CHAI_")) DISPLAY_NAMES[nodeData.name] = nodeData.display_name ?? nodeData.name;
    if (nodeData.name === STATE_NODE) {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        const panel = new CachePanel(this);
        this.__chaiPanel = panel;
        PANELS.add(panel);
        this.addDOMWidget("chai_panel", "chai_panel", panel.root, { serialize: false, getMinHeight: () => 250 });
        this.setSize([Math.max(this.size[0], 460), Math.max(this.size[1], 540)]);
        setTimeout(() => panel.refresh(), 0);
        return r;
      };
      const removed = nodeType.prototype.onRemoved;
      nodeType.prototype.onRemoved = function () {
        PANELS.delete(this.__chaiPanel);
        return removed?.apply(this, arguments);
      };
    } else if (TEXT_NODES.has(nodeData.name)) {
      const created = nodeType.prototype.onNodeCreated;
      const withProgress = nodeData.name === SAMPLER_NODE;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        const display = new TextDisplay(this, withProgress);
        this.__chaiText = display;
        this.addDOMWidget("chai_text", "chai_text", display.root,
                          { serialize: false, getMinHeight: () => (withProgress ? 80 : 40) });
        return r;
      };
    }
  },
});
