"""CHAI cache nodes: open a store, look a prompt up, Cache Attention settings, and the Cache State panel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from . import registry
from .text_nodes import ChaiEntities

__all__ = ["CHAICache", "CHAICacheLookup", "CHAICacheAttentionSettings", "CHAICacheState", "ChaiLookup",
           "parse_cache_steps", "lookup_text"]


@dataclass
class ChaiLookup:
    """``CHAI_LOOKUP``: a prompt's lookup against one store, for the CHAI Sampler.

    The node that makes it extracts nothing itself (the Entity Extractor did) and embeds the prompt's
    entities once (``query``); the sampler reuses that query when it searches under its exact
    compatibility key (model, size, schedule) right before sampling, because the store may have
    changed in between (in a batch, an earlier prompt may just have stored a match).

    Attributes:
        cache: the ``registry.StoreHandle``. lookup: the ``cache.lookup.CacheLookup`` (store,
        extractor, embedder, threshold, mode). prompt / entities: what is looked up.
        query: the ``cache.lookup.LookupQuery`` (entities and their embeddings), made once.
        threshold: least cosine similarity for a hit. preview: JSON-ready best match per entity
        over every compatible entry of the store (any size), see ``CacheLookup.preview``.
        generation: store generation when the preview was made.
    """

    cache: Any
    lookup: Any
    prompt: str
    entities: List[str]
    threshold: float
    query: Any = None
    preview: Dict[str, Any] = field(default_factory=dict)
    generation: int = 0


def _require_cache(cache) -> registry.StoreHandle:
    if not isinstance(cache, registry.StoreHandle):
        raise TypeError(f"cache must come from a CHAI Cache node, got {type(cache).__name__}")
    if cache.closed:
        raise RuntimeError(f"the CHAI store {cache.path} was closed; queue the prompt again to reopen it")
    return cache


class CHAICache:
    """Opens (or creates) a persistent CHAI latent store."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {
                "default": registry.DEFAULT_STORE_NAME,
                "tooltip": "Store name (kept in ComfyUI/models/chai_cache/<name>) or an absolute folder. Several "
                           "ComfyUI processes and the command line can share one store."}),
            "budget_mb": ("INT", {
                "default": 1024, "min": 1, "max": 1 << 20, "step": 64,
                "tooltip": "Most megabytes (MiB) of cached latents kept on disk; older entries are evicted past it. "
                           "One 240p 2 s entry is about 1.2 MB. The paper uses 1 GB."}),
            "policy": (["lru", "lfu", "fifo"], {
                "default": "lru",
                "tooltip": "Which entry goes first when the budget is full: least recently used (the paper's), "
                           "least frequently used, or oldest."}),
        }, "optional": {
            "evict_to_fit": ("BOOLEAN", {
                "default": False,
                "tooltip": "Allow a budget smaller than what the store holds: the entries beyond it are evicted. "
                           "Off: such a budget is refused with an error that says how much would go."}),
        }}

    RETURN_TYPES = ("CHAI_CACHE",)
    RETURN_NAMES = ("cache",)
    OUTPUT_TOOLTIPS = ("The open store, for CHAI Cache Lookup and CHAI Cache State.",)
    FUNCTION = "open"
    CATEGORY = "CHAI"
    DESCRIPTION = ("Open a persistent, crash-safe latent store (SQLite manifest + safetensors + HNSW index). It "
                   "survives restarts. The node re-runs whenever the store changes, so ComfyUI never reuses a "
                   "lookup or a sample made against an older state of the store.")

    @classmethod
    def IS_CHANGED(cls, folder, budget_mb=1024, policy="lru", evict_to_fit=False):
        """The store's path and manifest generation: every node downstream re-runs after an insert,
        eviction or repair (also by another process), and only then."""
        try:
            path = registry.resolve_store_path(folder)
        except (TypeError, ValueError) as exc:
            return f"invalid:{exc}"
        return f"{path}@{registry.peek_generation(path)}"

    def open(self, folder, budget_mb=1024, policy="lru", evict_to_fit=False):
        """Returns (CHAI_CACHE,). Raises ValueError (bad name, budget, policy) or StoreError
        (the folder is not empty and not a store; BudgetError: the budget would evict entries and
        ``evict_to_fit`` is off)."""
        if isinstance(budget_mb, bool) or not isinstance(budget_mb, int) or not 1 <= budget_mb <= 1 << 20:
            raise ValueError(f"budget_mb must be a whole number of MiB from 1 to {1 << 20} (the input's range), "
                             f"got {budget_mb!r}")
        from ..cache.backend import mib_to_bytes

        return (registry.open_store(folder, budget_bytes=mib_to_bytes(budget_mb), policy=policy,
                                    evict_to_fit=bool(evict_to_fit)),)


class CHAICacheLookup:
    """Looks a prompt's entities up in the store: hit or miss, the matched entry and the similarity."""

    @classmethod
    def INPUT_TYPES(cls):
        from ..cache.lookup import DEFAULT_THRESHOLD

        return {"required": {
            "cache": ("CHAI_CACHE", {"tooltip": "From CHAI Cache."}),
            "entities": ("CHAI_ENTITIES", {"tooltip": "From CHAI Entity Extractor."}),
            "threshold": ("FLOAT", {
                "default": DEFAULT_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.01,
                "tooltip": f"Least cosine similarity between a prompt entity and a stored one for a hit (default "
                           f"{DEFAULT_THRESHOLD}, calibrated on VBench prompts). Higher: fewer, safer hits."}),
        }}

    RETURN_TYPES = ("CHAI_LOOKUP", "BOOLEAN", "STRING", "FLOAT")
    RETURN_NAMES = ("lookup", "hit", "matched", "similarity")
    OUTPUT_TOOLTIPS = (
        "The lookup (entities and their embeddings, made once), for the CHAI Sampler, which searches with it "
        "under its exact model/size key just before sampling and reports the verdict that counts.",
        "Preview: True when a stored entity is at least `threshold` similar (over all sizes and models, as the "
        "store stood when this node ran).",
        "The stored entity that matched best and the prompt of its entry ('' when the store is empty).",
        "Cosine similarity of the best match (0 when nothing is stored).")
    FUNCTION = "lookup"
    CATEGORY = "CHAI"
    DESCRIPTION = ("Embed the prompt's entities once and preview the closest stored request (HNSW index, cosine "
                   "similarity). The verdict that counts is taken at sampling time: the CHAI Sampler searches "
                   "again under its own model, size and schedule (in a batch, after the earlier prompts stored "
                   "theirs), records it in the store's statistics and shows it per prompt.")

    def lookup(self, cache, entities, threshold=0.72):
        """Returns {"ui": {"text": [...]}, "result": (CHAI_LOOKUP, hit, matched, similarity)}."""
        from ..cache.lookup import CacheLookup, LookupConfig

        handle = _require_cache(cache)
        if not isinstance(entities, ChaiEntities):
            raise TypeError(f"entities must come from a CHAI Entity Extractor node, got {type(entities).__name__}")
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [0, 1], got {threshold}")
        lk = CacheLookup(handle.store, registry.shared_extractor(entities.mode), registry.shared_embedder(),
                         LookupConfig(threshold=threshold, mode=entities.mode))
        query = lk.query(entities.prompt, entities.entities)  # the Entity Extractor's keys, embedded once
        preview = lk.preview(query)
        result = ChaiLookup(cache=handle, lookup=lk, prompt=entities.prompt, entities=list(query.entities),
                            threshold=threshold, query=query, preview=preview,
                            generation=int(handle.store.generation))
        matched = "" if preview["matched"] is None else f"{preview['matched']} | {preview['entry_prompt']}"
        similarity = float(preview["similarity"] or 0.0)
        return {"ui": {"text": [lookup_text(preview, len(handle.store))]},
                "result": (result, bool(preview["hit"]), matched, similarity)}


def lookup_text(preview: Dict[str, Any], entries: int) -> str:
    """What the Cache Lookup node shows: the closest stored entry as a preview, never a verdict (the
    Sampler takes that at sampling time, under its own key, after earlier prompts of a batch stored theirs)."""
    later = "CHAI Sampler decides hit or miss when it samples this prompt"
    if preview["matched"] is None:
        return f"preview: nothing comparable stored yet ({entries} entries); the {later}"
    where = f" [{preview['entry_size']}]" if preview["entry_size"] else ""
    close = "above" if preview["hit"] else "below"
    return (f"preview: '{preview['entity']}' ~ '{preview['matched']}' similarity {preview['similarity']:.3f}, "
            f"{close} the threshold {preview['threshold']:.2f}; entry #{preview['entry_id']}{where}: "
            f"{preview['entry_prompt']}. The {later}, under its model, size and schedule")


def parse_cache_steps(text: str) -> tuple:
    """``"2,3,4"`` -> (2, 3, 4); ``""`` or ``"none"`` -> () (Cache Attention off).

    Raises:
        ValueError: anything but comma-separated whole numbers.
    """
    text = (text or "").strip().lower()
    if text in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"cache_steps must be comma-separated step numbers such as '2,3,4', got {text!r}") from None


class CHAICacheAttentionSettings:
    """Advanced Cache Attention knobs for the CHAI Sampler (defaults are the paper's)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "cache_steps": ("STRING", {
                "default": "2,3,4",
                "tooltip": "1-based fast-mode steps at which the first spatial block attends to the cached latents "
                           "(paper: 2,3,4). Empty = Cache Attention off. Part of the cache key."}),
            "block_index": ("INT", {"default": 0, "min": 0, "max": 27,
                                    "tooltip": "Spatial block that attends to the cache (paper: 0, the first)."}),
            "attention_mode": (["replace", "concat"], {
                "default": "replace",
                "tooltip": "replace: the block's keys/values are the cached ones (paper). concat: cached K/V are "
                           "appended to the block's own (ablation; longer attention)."}),
            "branches": (["cond", "both"], {
                "default": "cond",
                "tooltip": "CFG halves that see the cache: only the conditional one (default) or both."}),
            "fusion": (["best", "per_entity"], {
                "default": "best",
                "tooltip": "best: one entry, the best match (paper). per_entity: the best entry of every matched "
                           "entity, K/V concatenated (up to max_fused)."}),
            "max_fused": ("INT", {"default": 3, "min": 1, "max": 8,
                                  "tooltip": "Most entries fused with fusion=per_entity."}),
            "capture_dtype": (["float16", "float32"], {
                "default": "float16",
                "tooltip": "dtype of the latents a miss stores (float16 halves the bytes). Part of the cache key."}),
        }}

    RETURN_TYPES = ("CHAI_CACHE_CONFIG",)
    RETURN_NAMES = ("settings",)
    OUTPUT_TOOLTIPS = ("Cache Attention settings, for the CHAI Sampler's optional 'settings' input.",)
    FUNCTION = "build"
    CATEGORY = "CHAI"
    DESCRIPTION = ("Cache Attention knobs beyond the sampler's steps. Settings that change what is stored "
                   "(cache steps, capture dtype) are part of the cache key, so entries made under other settings "
                   "are never reused; the others only change how entries are used.")

    def build(self, cache_steps="2,3,4", block_index=0, attention_mode="replace", branches="cond", fusion="best",
              max_fused=3, capture_dtype="float16"):
        """Returns ({CacheAttentionConfig keyword: value},). Raises ValueError on a bad value."""
        from ..opensora.cache_attention import CacheAttentionConfig

        settings = {"cache_steps": parse_cache_steps(cache_steps), "block_index": int(block_index),
                    "mode": attention_mode, "branches": branches, "fusion": fusion, "max_fused": int(max_fused),
                    "capture_dtype": capture_dtype}
        fast = max(8, max(settings["cache_steps"], default=1))
        CacheAttentionConfig(fast_steps=fast, **settings)  # validate now, with the node that holds the values
        return (settings,)


class CHAICacheState:
    """Shows the store's state in a panel: entries, bytes against budget, hit rate, last lookups."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"cache": ("CHAI_CACHE", {"tooltip": "From CHAI Cache."})},
                "optional": {"after": ("LATENT", {
                    "tooltip": "Optional: connect the sampler's LATENT so the panel updates after it ran."})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("summary",)
    OUTPUT_TOOLTIPS = ("One-line summary: entries, MB of budget, hit rate, hits, misses, evictions.",)
    OUTPUT_NODE = True
    INPUT_IS_LIST = True  # one panel update per prompt, also when a batch (a list) flows into `after`
    FUNCTION = "show"
    CATEGORY = "CHAI"
    DESCRIPTION = ("Cache-state panel: entries, bytes against the budget, hit rate, hits, misses, evictions and "
                   "the last lookups with their matched entity and similarity. It refreshes after every CHAI "
                   "Sampler run and on its Refresh button (read-only route /chai/stats).")

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        """Always re-run: the counters change with every lookup, not only with the store's generation."""
        return float("nan")

    def show(self, cache, after=None, unique_id=None):
        """Returns {"ui": {"chai_stats": [payload], "text": [summary]}, "result": (summary,)}.

        Inputs arrive as lists (``INPUT_IS_LIST``); a plain value is accepted too (direct calls)."""
        if isinstance(cache, list):
            if not cache:
                raise ValueError("connect a CHAI Cache node to 'cache'")
            cache = cache[-1]
        handle = _require_cache(cache)
        payload = registry.stats_payload(handle)
        s = payload["stats"]
        summary = (f"{s['entries']} entries, {s['bytes'] / 2**20:.1f} of {s['budget_bytes'] / 2**20:.0f} MiB, "
                   f"hit rate {100 * s['hit_rate']:.1f}% ({s['hits']} hits, {s['misses']} misses), "
                   f"{s['evictions']} evictions")
        return {"ui": {"chai_stats": [payload], "text": [summary]}, "result": (summary,)}
