// ComfyUI-CHAI frontend: the cache-state panel inside the "CHAI Cache State" node, and read-only
// text displays on the Entity Extractor, Cache Lookup and Sampler nodes.
//
// Data sources (all read-only):
//   * the node's own `executed` output (`chai_stats` / `text` UI keys);
//   * the websocket event "chai.stats", sent by the CHAI Sampler after every run;
//   * GET /chai/stats[?store=<id>] on the Refresh button (only stores this ComfyUI process opened).
// Everything is rendered with textContent (never innerHTML): prompts are user text.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STATE_NODE = "CHAI_CacheState";
const TEXT_NODES = new Set(["CHAI_EntityExtractor", "CHAI_CacheLookup", "CHAI_Sampler"]);
const EVENT = "chai.stats";

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

const C = {
  fg: "var(--fg-color, #ddd)",
  dim: "var(--descrip-text, #999)",
  bg: "var(--comfy-input-bg, #222)",
  border: "var(--border-color, #444)",
  hit: "#3fb97f",
  miss: "#d9822b",
};

// ---------------------------------------------------------------------------- the panel

class CachePanel {
  constructor(node) {
    this.node = node;
    this.storeId = null;
    this.root = el("div", {
      font: "12px sans-serif", color: C.fg, background: C.bg, border: `1px solid ${C.border}`,
      borderRadius: "6px", padding: "8px", boxSizing: "border-box", width: "100%", height: "100%",
      overflow: "hidden", display: "flex", flexDirection: "column", gap: "6px",
    });
    this.root.className = "chai-cache-panel";

    const head = el("div", { display: "flex", alignItems: "center", gap: "6px" });
    this.title = el("div", { fontWeight: "bold", flex: "1", whiteSpace: "nowrap", overflow: "hidden",
                             textOverflow: "ellipsis" }, "CHAI cache: no data yet");
    this.button = el("button", { font: "12px sans-serif", cursor: "pointer", padding: "2px 8px",
                                  color: C.fg, background: "transparent", border: `1px solid ${C.border}`,
                                  borderRadius: "4px" }, "Refresh");
    this.button.className = "chai-refresh";
    this.button.addEventListener("click", (ev) => { ev.stopPropagation(); this.refresh(); });
    head.append(this.title, this.button);

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
    const bar = el("div", { height: "10px", background: "rgba(128,128,128,0.25)", borderRadius: "5px",
                            overflow: "hidden" });
    this.barFill = el("div", { height: "100%", width: "0%", background: C.hit, transition: "width 0.3s" });
    this.barFill.className = "chai-budget-fill";
    bar.append(this.barFill);
    barWrap.append(this.barLabel, bar);

    this.lastRun = el("div", { fontSize: "11px", color: C.dim, whiteSpace: "nowrap", overflow: "hidden",
                               textOverflow: "ellipsis" }, "");

    const tableWrap = el("div", { flex: "1", overflow: "auto", minHeight: "40px" });
    this.table = el("table", { width: "100%", borderCollapse: "collapse", fontSize: "11px" });
    this.table.className = "chai-lookups";
    const thead = el("tr", {});
    for (const h of ["last lookups", "", "entity \u2192 matched", "sim."]) {
      thead.append(el("th", { textAlign: "left", color: C.dim, fontWeight: "normal",
                              borderBottom: `1px solid ${C.border}`, padding: "1px 3px" }, h));
    }
    this.table.append(thead);
    this.tbody = el("tbody", {});
    this.table.append(this.tbody);
    tableWrap.append(this.table);

    this.status = el("div", { fontSize: "10px", color: C.dim }, "Runs of the CHAI Sampler update this panel.");
    this.root.append(head, this.tiles, barWrap, this.lastRun, tableWrap, this.status);
  }

  update(payload) {
    if (!payload || !payload.stats) return;
    const s = payload.stats;
    this.storeId = payload.id;
    this.node.properties = this.node.properties || {};
    this.node.properties.chai_store_id = payload.id;
    this.title.textContent = `CHAI cache: ${payload.name ?? payload.id}`;
    this.title.title = payload.path ?? "";
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
    this.barFill.style.width = `${(100 * fill).toFixed(1)}%`;
    this.barFill.style.background = fill > 0.9 ? C.miss : C.hit;
    this.barLabel.textContent =
      `${fmtBytes(s.bytes)} of ${fmtBytes(s.budget_bytes)} (${(100 * fill).toFixed(1)}%), policy ${s.policy}`;
    const run = payload.last_run;
    const intra = Object.values(run?.hook_reports ?? {}).find((r) => r && r.map);
    const computed = intra ? ` (${intra.full} computed, ${intra.method})` : "";
    this.lastRun.textContent = run
      ? `last run: ${run.hit ? "HIT" : "MISS"} ${run.mode} ${run.steps} steps${computed}, ${(run.timings_ms.total_ms / 1000).toFixed(2)} s \u2014 ${clip(run.prompt, 60)}`
      : "";
    this.tbody.replaceChildren();
    for (const l of s.last_lookups ?? []) {
      const tr = el("tr", {});
      tr.append(
        el("td", { padding: "1px 3px", maxWidth: "160px", overflow: "hidden", textOverflow: "ellipsis",
                   whiteSpace: "nowrap" }, clip(l.prompt, 40)),
        el("td", { padding: "1px 3px", color: l.hit ? C.hit : C.miss, fontWeight: "bold" }, l.hit ? "hit" : "miss"),
        el("td", { padding: "1px 3px", whiteSpace: "nowrap" },
           l.entity || l.matched ? `${l.entity ?? "?"} \u2192 ${l.matched ?? "\u2013"}` : "\u2013"),
        el("td", { padding: "1px 3px" }, l.similarity == null ? "\u2013" : Number(l.similarity).toFixed(3)),
      );
      this.tbody.append(tr);
    }
    const when = payload.time ? new Date(payload.time * 1000).toLocaleTimeString() : "";
    this.status.textContent = `store ${payload.id} \u00b7 generation ${s.generation} \u00b7 updated ${when}`;
    this.node.setDirtyCanvas?.(true, true);
  }

  async refresh() {
    const id = this.storeId ?? this.node.properties?.chai_store_id ?? null;
    const url = id ? `/chai/stats?store=${encodeURIComponent(id)}` : "/chai/stats";
    this.status.textContent = "refreshing\u2026";
    try {
      const res = await api.fetchApi(url);
      const body = await res.json();
      if (!res.ok) {
        if (id && res.status === 404) {  // the server restarted: fall back to the open stores
          this.storeId = null;
          if (this.node.properties) delete this.node.properties.chai_store_id;
          return this.refresh();
        }
        this.status.textContent = body.error ?? `HTTP ${res.status}`;
        return;
      }
      if (body.stores) {
        if (!body.stores.length) {
          this.status.textContent = "No store open in this ComfyUI process yet: queue the workflow.";
          return;
        }
        this.update(body.stores[0]);
      } else {
        this.update(body);
      }
    } catch (err) {
      this.status.textContent = `refresh failed: ${err}`;
    }
  }
}

// ---------------------------------------------------------------------------- text displays

function addTextDisplay(node) {
  const box = el("div", {
    font: "11px monospace", color: C.fg, background: C.bg, border: `1px solid ${C.border}`,
    borderRadius: "4px", padding: "4px", whiteSpace: "pre-wrap", overflow: "auto", boxSizing: "border-box",
    width: "100%", height: "100%", minHeight: "28px",
  }, "");
  box.className = "chai-text-display";
  node.addDOMWidget("chai_text", "chai_text", box, { serialize: false, getMinHeight: () => 40 });
  node.__chaiText = box;
}

// ---------------------------------------------------------------------------- extension

app.registerExtension({
  name: "comfyui_chai.cache_panel",

  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      for (const node of app.graph?._nodes ?? []) {
        if (node.comfyClass !== STATE_NODE || !node.__chaiPanel) continue;
        const panel = node.__chaiPanel;
        if (!panel.storeId || panel.storeId === detail.id) panel.update(detail);
      }
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === STATE_NODE) {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        const panel = new CachePanel(this);
        this.__chaiPanel = panel;
        this.addDOMWidget("chai_panel", "chai_panel", panel.root, { serialize: false, getMinHeight: () => 250 });
        this.setSize([Math.max(this.size[0], 440), Math.max(this.size[1], 330)]);
        setTimeout(() => panel.refresh(), 0);
        return r;
      };
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        executed?.apply(this, arguments);
        const payload = output?.chai_stats?.[0];
        if (payload) this.__chaiPanel?.update(payload);
      };
    } else if (TEXT_NODES.has(nodeData.name)) {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = created?.apply(this, arguments);
        addTextDisplay(this);
        return r;
      };
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        executed?.apply(this, arguments);
        if (this.__chaiText && output?.text) this.__chaiText.textContent = output.text.join("\n");
      };
    }
  },
});
