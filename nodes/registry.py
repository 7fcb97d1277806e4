"""The stores this process opened, the shared lookup components, and the stats payload.

A store is opened once per process and reused by every node and every prompt (opening one
loads its HNSW index). Only stores in this registry are ever served by the ``/chai/*`` routes:
a client names a store by its id (a hash of its resolved location), never by a path.

A store location is a folder (a name under ``models/chai_cache/`` or an absolute path) or the URL
of a registered store backend (``postgresql://user@host/db``; ``cache.backend.open_store``). A
store that does not exist yet is created only when asked (``create_new``), or for the default
store name: a mistyped name is an error, never a new empty store.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..cache.store_types import StoreError
from . import host

__all__ = [
    "StoreHandle",
    "open_store",
    "store_by_id",
    "open_stores",
    "store_id",
    "resolve_store_path",
    "resolve_location",
    "StoreNotFoundError",
    "peek_generation",
    "stats_payload",
    "entries_payload",
    "evict_entry",
    "EntryPinnedError",
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


def store_id(location: "Path | str") -> str:
    """Public id of a store: first 12 hex digits of SHA-256 of its resolved location (path or URL)."""
    return hashlib.sha256(str(location).encode("utf-8")).hexdigest()[:12]


class StoreNotFoundError(ValueError):
    """The Cache node names a store that does not exist, and creating one was not asked for."""


def _is_url(folder: str) -> bool:
    from ..cache.backend import location_scheme

    return bool(location_scheme(folder.strip()))


def resolve_location(folder: str) -> str:
    """The store location a Cache node's ``folder`` names: a resolved folder path
    (:func:`resolve_store_path`) or a store URL of a registered backend, as given.

    Raises:
        ValueError: empty, a relative name that leaves the store root, or a URL whose scheme no
            store backend handles (the message lists those that do).
    """
    from ..cache.backend import BACKENDS, location_scheme

    if isinstance(folder, str) and _is_url(folder):
        scheme = location_scheme(folder.strip())
        if scheme not in BACKENDS:
            known = ", ".join(f"{s}://" for s in sorted(BACKENDS) if s)
            raise ValueError(f"folder {folder.strip()[:80]!r}: no store backend handles {scheme}:// (use a folder, or "
                             f"one of {known})")
        return folder.strip()
    return str(resolve_store_path(folder))


def resolve_store_path(folder: str) -> Path:
    """The store directory a Cache node's ``folder`` names.

    An absolute path (``~`` expanded) is used as is, so several ComfyUI processes or the command
    line can share one store. A relative name goes under ``<ComfyUI>/models/chai_cache/`` inside
    ComfyUI, or under the current directory's ``chai_cache/`` outside it.

    Raises:
        ValueError: an empty name, or a relative name that climbs out of the store root (``..``).
    """
    if not isinstance(folder, str) or not folder.strip():
        raise ValueError("folder is empty: give a store name (e.g. 'default'), an absolute path or a postgresql:// URL")
    raw = os.path.expanduser(folder.strip())
    if os.path.isabs(raw):
        return Path(raw).resolve()
    root = host.models_root()
    base = (root / _STORE_ROOT) if root is not None else (Path.cwd() / _STORE_ROOT)
    base = base.resolve()
    path = (base / raw).resolve()
    if base != path and base not in path.parents:
        raise ValueError(f"folder {folder!r} leaves the store root {base}; use a plain name or an absolute path")
    return path


def peek_generation(location: "Path | str") -> Optional[int]:
    """The generation of the store at ``location`` without opening it (``cache.backend.generation_of``),
    or None when there is no store there yet (nothing is written in a folder that is not a store).
    Cheap: used by the Cache node's ``fingerprint_inputs`` before every prompt."""
    from ..cache.backend import generation_of

    handle = _STORES.get(str(location))
    if handle is not None and not handle.closed:
        return int(handle.store.generation)
    return generation_of(location)


@dataclass
class StoreHandle:
    """A store opened by this process (the ``CHAI_CACHE`` value passed between nodes).

    Attributes:
        id: public id (:func:`store_id`). path: the resolved location (a folder path, or the
        backend URL, which never holds a password). store: the open ``cache.backend.StoreBackend``.
        name: what the Cache node was given. opened_at: UNIX seconds.
        last_run: summary of the last CHAI Sampler run on this store in this process (or None).
        steps: sampler steps of the runs on this store in this process, ``{"steps": n, "computed": m}``:
            m of them computed in full (with intra-request caching the others were reused).
    """

    id: str
    path: str
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


def _nothing_there(location: str, url: bool) -> bool:
    """True when a location holds nothing yet: a URL without a store, a missing or empty folder."""
    if url:
        return True
    try:
        return not os.path.lexists(location) or (os.path.isdir(location) and not os.listdir(location))
    except OSError:
        return False  # unreadable: the backend says what it is


def _create_parent(folder: str, path: Path) -> None:
    """Make the folders above a new folder store (the user asked for a new store), with an error
    that names the field and the path instead of an errno."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"folder {folder.strip()!r}: cannot create the store folder {path} ({exc.strerror or exc}); "
                         "give a folder you can write to") from None


def open_store(folder: str, budget_bytes: Optional[int] = None, policy: Optional[str] = None,
               evict_to_fit: bool = False, create_new: bool = False) -> StoreHandle:
    """Open a store through ``cache.backend.open_store``, or return this process's open one, applying
    budget and policy.

    Args:
        folder: a store name, an absolute folder or a store URL (see :func:`resolve_location`).
        budget_bytes: byte budget (> 0); None keeps the persisted one. A budget smaller than what
            the store holds is refused unless ``evict_to_fit`` (then it evicts now).
        policy: ``"lru"``, ``"lfu"`` or ``"fifo"``; None keeps the persisted one.
        evict_to_fit: confirm evicting down to a smaller budget.
        create_new: create the store when ``folder`` holds none (always so for the default store
            name); otherwise a missing store is an error, so a typo never starts an empty store.

    Raises:
        ValueError: bad folder, budget or policy; :class:`StoreNotFoundError` when no store is there
        and ``create_new`` is off. ``cache.store.StoreError``: the location is not a usable store
        (a file, not writable, not empty and not a store, a folder that cannot be created, a URL
        with a password; ``BudgetError``: the budget would evict); each message says what to do.
    """
    from ..cache import backend

    if budget_bytes is not None and (isinstance(budget_bytes, bool) or int(budget_bytes) <= 0):
        raise ValueError(f"budget must be positive, got {budget_bytes} bytes")
    if policy is not None and policy not in ("lru", "lfu", "fifo"):
        raise ValueError(f"policy must be 'lru', 'lfu' or 'fifo', got {policy!r}")
    location = resolve_location(folder)
    with _LOCK:
        handle = _STORES.get(location)
        if handle is not None and not handle.closed:
            store = handle.store
            if policy is not None and store.policy != policy:
                store.set_policy(policy)
            if budget_bytes is not None and int(budget_bytes) != int(store.budget_bytes):
                store.set_budget(int(budget_bytes), evict_to_fit=evict_to_fit)
        else:
            url = _is_url(folder)
            create = bool(create_new) or folder.strip() == DEFAULT_STORE_NAME
            if not backend.store_exists(location) and _nothing_there(location, url):
                if not create:
                    raise StoreNotFoundError(
                        f"folder {folder.strip()!r}: there is no CHAI store at {location}; check the name or path "
                        "(a typo would start an empty store that never hits), or turn on create_new to start a "
                        "new store there")
                if not url:
                    _create_parent(folder, Path(location))
            # Anything else that is not a store (a file, someone's folder) is refused by the backend, untouched.
            store = backend.open_store(location, budget_bytes=None if budget_bytes is None else int(budget_bytes),
                                       policy=policy, evict_to_fit=evict_to_fit, create=create)
            old = _STORES.get(location)
            handle = StoreHandle(id=store_id(location), path=location, store=store, name=folder,
                                 opened_at=time.time(), last_run=old.last_run if old is not None else None)
            if old is not None:
                handle.steps = dict(old.steps)
            _STORES[location] = handle
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


class EntryPinnedError(ValueError):
    """An entry the panel asked to evict is pinned (pinned entries are never evicted)."""


def _entry_card(record: Any, now: float) -> Dict[str, Any]:
    """What the panel shows of one entry (``cache.store.EntryRecord``)."""
    return {"id": record.entry_id, "entity": record.entities[0] if record.entities else None,
            "entities": list(record.entities), "prompt": record.prompt, "hits": record.access_count,
            "age_s": max(0.0, now - record.created_at), "last_used_s": max(0.0, now - record.last_access),
            "bytes": record.nbytes, "pinned": bool(record.pinned), "thumbnail": bool(record.has_thumbnail)}


def entries_payload(handle: StoreHandle, last: int = 8, top: int = 8) -> Dict[str, Any]:
    """The panel's view of one store's entries: its last lookups (each with the entry a hit served,
    when that entry is still held) and its most-used entries.

    Keys: ``id``, ``name``; ``bytes``, ``budget_bytes``, ``pinned_bytes``, ``pinned_entries``,
    ``entries`` (counts and latent bytes); ``last_lookups`` (newest first: time, prompt, hit,
    entity, matched, similarity, ``entry``: a card or None); ``most_used`` (cards, most served first).
    A card: id, entity (the entry's first entity), entities, prompt, hits (times served), age_s
    and last_used_s (seconds), bytes, pinned, thumbnail (whether one is kept).
    """
    store = handle.store
    stats = store.stats(last=last)
    now = time.time()
    cards: Dict[int, Optional[Dict[str, Any]]] = {}

    def card(entry_id: Any) -> Optional[Dict[str, Any]]:
        if not isinstance(entry_id, int):
            return None
        if entry_id not in cards:
            record = store.entry(entry_id)
            cards[entry_id] = None if record is None else _entry_card(record, now)
        return cards[entry_id]

    lookups = [{**{k: row.get(k) for k in ("time", "prompt", "hit", "entity", "matched", "similarity")},
                "entry": card(row.get("entry_id")) if row.get("hit") else None} for row in stats.last_lookups]
    return {"id": handle.id, "name": handle.name, "entries": stats.entries, "bytes": stats.bytes,
            "budget_bytes": stats.budget_bytes, "pinned_entries": stats.pinned_entries,
            "pinned_bytes": stats.pinned_bytes, "last_lookups": lookups,
            "most_used": [_entry_card(r, now) for r in store.most_used(top)], "time": now}


def evict_entry(handle: StoreHandle, entry_id: int) -> bool:
    """Remove one entry of an open store at the user's request (the panel's Evict). Returns False
    for an id the store does not hold.

    Raises:
        EntryPinnedError: the entry is pinned (unpin it first); nothing is changed.
    """
    record = handle.store.entry(entry_id)
    if record is None:
        return False
    if record.pinned:
        raise EntryPinnedError(f"entry {entry_id} is pinned, and pinned entries are never evicted: unpin it first")
    return handle.store.delete([entry_id], reason="evicted from the panel") > 0


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
