"""The stores this process opened, the shared lookup components, and the stats payload.

A store is opened once per process and reused by every node and every prompt (opening one
loads its HNSW index). Only stores in this registry are ever served by the ``/chai/stats``
route: a client names a store by its id (a hash of the resolved path), never by a path.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import host

__all__ = [
    "StoreHandle",
    "open_store",
    "store_by_id",
    "open_stores",
    "store_id",
    "resolve_store_path",
    "peek_generation",
    "stats_payload",
    "shared_embedder",
    "shared_extractor",
    "STATS_EVENT",
    "DEFAULT_STORE_NAME",
]

#: Websocket event the panel listens to (sent after every CHAI Sampler run).
STATS_EVENT = "chai.stats"
#: Default store name; relative names live under ``<ComfyUI>/models/chai_cache/``.
DEFAULT_STORE_NAME = "default"
_STORE_ROOT = "chai_cache"

_LOCK = threading.RLock()
_STORES: Dict[str, "StoreHandle"] = {}
_EMBEDDERS: Dict[str, Any] = {}
_EXTRACTORS: Dict[str, Any] = {}


def store_id(path: Path) -> str:
    """Public id of a store: first 12 hex digits of SHA-256 of its resolved path."""
    return hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:12]


def resolve_store_path(folder: str) -> Path:
    """The store directory a Cache node's ``folder`` names.

    An absolute path (``~`` expanded) is used as is, so several ComfyUI processes or the command
    line can share one store. A relative name goes under ``<ComfyUI>/models/chai_cache/`` inside
    ComfyUI, or under the current directory's ``chai_cache/`` outside it.

    Raises:
        ValueError: an empty name, or a relative name that climbs out of the store root (``..``).
    """
    if not isinstance(folder, str) or not folder.strip():
        raise ValueError("the cache folder is empty: give a store name (e.g. 'default') or an absolute path")
    raw = os.path.expanduser(folder.strip())
    if os.path.isabs(raw):
        return Path(raw).resolve()
    root = host.models_root()
    base = (root / _STORE_ROOT) if root is not None else (Path.cwd() / _STORE_ROOT)
    base = base.resolve()
    path = (base / raw).resolve()
    if base != path and base not in path.parents:
        raise ValueError(f"the cache folder {folder!r} leaves {base}; use a plain name or an absolute path")
    return path


def peek_generation(path: Path) -> Optional[int]:
    """The generation of the store at ``path`` without opening it (``cache.backend.generation_of``),
    or None when there is no store there yet (nothing is written in a folder that is not a store).
    Cheap: used by ``IS_CHANGED`` before every prompt."""
    from ..cache.backend import generation_of

    handle = _STORES.get(str(path))
    if handle is not None and not handle.closed:
        return int(handle.store.generation)
    return generation_of(path)


@dataclass
class StoreHandle:
    """A store opened by this process (the ``CHAI_CACHE`` value passed between nodes).

    Attributes:
        id: public id (:func:`store_id`). path: resolved directory. store: the open
        ``cache.backend.StoreBackend``.
        name: what the Cache node was given. opened_at: UNIX seconds.
        last_run: summary of the last CHAI Sampler run on this store in this process (or None).
        steps: sampler steps of the runs on this store in this process, ``{"steps": n, "computed": m}``:
            m of them computed in full (with intra-request caching the others were reused).
    """

    id: str
    path: Path
    store: Any
    name: str
    opened_at: float
    last_run: Optional[Dict[str, Any]] = None
    steps: Dict[str, int] = field(default_factory=lambda: {"steps": 0, "computed": 0})

    def count_steps(self, summary: Dict[str, Any]) -> None:
        """Add one Sampler run (``GenerationResult.summary()``) to :attr:`steps`: an intra-request cache's
        report says how many steps it computed in full; without one every step was."""
        intra = [r for r in (summary.get("hook_reports") or {}).values() if "map" in r]
        steps = int(summary.get("steps") or 0)
        self.steps["steps"] += steps
        self.steps["computed"] += int(intra[0]["full"]) if intra else steps

    @property
    def closed(self) -> bool:
        """True when the underlying store was closed."""
        return bool(self.store.closed)


def open_store(folder: str, budget_bytes: Optional[int] = None, policy: Optional[str] = None,
               evict_to_fit: bool = False) -> StoreHandle:
    """Open (or create) a store through ``cache.backend.open_store``, or return this process's open one,
    applying budget and policy.

    Args:
        folder: see :func:`resolve_store_path`.
        budget_bytes: byte budget (> 0); None keeps the persisted one. A budget smaller than what
            the store holds is refused unless ``evict_to_fit`` (then it evicts now).
        policy: ``"lru"``, ``"lfu"`` or ``"fifo"``; None keeps the persisted one.
        evict_to_fit: confirm evicting down to a smaller budget.

    Raises:
        ValueError: bad folder, budget or policy. ``cache.store.StoreError``: the folder is not a
        usable store (a file, not writable, not empty and not a store, another format;
        ``BudgetError``: the budget would evict); the message says what to do.
    """
    from ..cache import backend

    if budget_bytes is not None and (isinstance(budget_bytes, bool) or int(budget_bytes) <= 0):
        raise ValueError(f"budget must be positive, got {budget_bytes} bytes")
    if policy is not None and policy not in ("lru", "lfu", "fifo"):
        raise ValueError(f"policy must be 'lru', 'lfu' or 'fifo', got {policy!r}")
    path = resolve_store_path(folder)
    with _LOCK:
        handle = _STORES.get(str(path))
        if handle is not None and not handle.closed:
            store = handle.store
            if policy is not None and store.policy != policy:
                store.set_policy(policy)
            if budget_bytes is not None and int(budget_bytes) != int(store.budget_bytes):
                store.set_budget(int(budget_bytes), evict_to_fit=evict_to_fit)
        else:
            if not os.path.isabs(os.path.expanduser(folder.strip())):
                path.parent.mkdir(parents=True, exist_ok=True)  # the store root; an absolute path's parent must exist
            store = backend.open_store(path, budget_bytes=None if budget_bytes is None else int(budget_bytes),
                                       policy=policy, evict_to_fit=evict_to_fit)
            old = _STORES.get(str(path))
            handle = StoreHandle(id=store_id(path), path=path, store=store, name=folder, opened_at=time.time(),
                                 last_run=old.last_run if old is not None else None)
            if old is not None:
                handle.steps = dict(old.steps)
            _STORES[str(path)] = handle
        handle.name = folder
        return handle


def store_by_id(sid: str) -> Optional[StoreHandle]:
    """The open store with public id ``sid``, or None (never opens anything)."""
    with _LOCK:
        for handle in _STORES.values():
            if handle.id == sid and not handle.closed:
                return handle
    return None


def open_stores() -> List[StoreHandle]:
    """Every store this process has open, oldest first."""
    with _LOCK:
        return [h for h in _STORES.values() if not h.closed]


def close_all() -> None:
    """Close every store of the registry (tests; process shutdown)."""
    with _LOCK:
        for handle in _STORES.values():
            if not handle.closed:
                handle.store.close()
        _STORES.clear()


def stats_payload(handle: StoreHandle, last: int = 8) -> Dict[str, Any]:
    """JSON-ready state of one store for the panel and ``/chai/stats``.

    Keys: ``id``, ``name``, ``path``, ``stats`` (``StoreBackend.stats().to_dict()``: entries,
    bytes, budget_bytes, hits, misses, lookups, hit_rate, evictions, last_lookups with entity,
    matched and similarity, top_entities, generation...), ``fill`` (bytes / budget, 0..1) and
    ``last_run`` (the last sampler run's summary in this process, or None), ``steps`` (sampler steps of
    this process's runs on the store and how many were computed in full, ``StoreHandle.steps``).
    """
    stats = handle.store.stats(last=last).to_dict()
    stats["top_entities"] = [list(t) for t in stats.get("top_entities", [])]
    budget = max(1, int(stats.get("budget_bytes") or 1))
    return {"id": handle.id, "name": handle.name, "path": str(handle.path), "stats": stats,
            "fill": min(1.0, float(stats.get("bytes", 0)) / budget), "last_run": handle.last_run,
            "steps": dict(handle.steps), "time": time.time()}


def shared_embedder(model: Optional[str] = None) -> Any:
    """One ``cache.embed.Embedder`` per model per process (default all-MiniLM-L6-v2, offline)."""
    from ..cache.embed import Embedder

    key = model or "default"
    with _LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = Embedder(model)
        return _EMBEDDERS[key]


def shared_extractor(mode: str = "entity") -> Any:
    """One ``cache.entities.EntityExtractor`` per mode per process (spaCy loads once)."""
    from ..cache.entities import EntityExtractor

    with _LOCK:
        if mode not in _EXTRACTORS:
            _EXTRACTORS[mode] = EntityExtractor(mode=mode)
        return _EXTRACTORS[mode]
