"""The store interface: what the request path, the nodes and the command line may ask of a latent store,
and the one factory that opens a store from a location string.

Every caller outside ``cache/store.py`` (nodes, command line, demo, ``simulate``, the quality harness,
``cache.lookup``) holds a :class:`StoreBackend` opened by :func:`open_store`; none constructs a store
class, runs SQL on a manifest or reads a private attribute. A new backend (a PostgreSQL store for a
render farm, say) implements :class:`StoreBackend` in its own module and is dispatched here by the
scheme of its location (:data:`BACKENDS`, :func:`register_backend`); nothing else changes.

Locations::

    my-store, /data/chai, ~/chai     a folder: ``cache.store.LatentStore`` (SQLite manifest + hnswlib
                                     index + safetensors latents), created when missing (create=True)
    postgresql://user@host/db?...    dispatched by scheme to the backend registered for "postgresql"

Budgets are bytes in the interface; every flag and node input gives MiB (2**20 bytes), converted
by :func:`mib_to_bytes` (one unit, one conversion).

How to add a backend (the contract a PostgreSQL store must meet):

1. Implement every member of :class:`StoreBackend` with the semantics written on it, in a module of
   its own (e.g. ``cache/pg_store.py``); the folder store's tests (``tests/test_store.py``,
   ``tests/test_lookup.py``, ``tests/test_backend.py``) state them executable: run the ones that do
   not reach into files against the new class.
2. Write ``open(location, *, budget_bytes, policy, dim, create, options) -> StoreBackend``,
   ``read_stats(location, last) -> StoreStats`` (without opening for writing) and
   ``exists(location) -> bool``, and add ``"postgresql": (open, read_stats, exists)`` to
   :data:`BACKENDS` (importing the module lazily inside the three functions keeps its driver optional),
   or call :func:`register_backend` from the module. Raise :class:`~cache.store.StoreError` with a
   one-line message that says what to do.
3. Nothing else changes: the nodes, the command line, the demo, ``simulate`` and the quality harness
   already take any location string and only call :class:`StoreBackend` members.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from .store import EntryRecord, LatentStore, StoreConfig, StoreError, StoreStats, VerifyReport
from .store import read_stats as _read_folder_stats

__all__ = [
    "StoreBackend",
    "open_store",
    "read_stats",
    "generation_of",
    "store_exists",
    "register_backend",
    "BACKENDS",
    "location_scheme",
    "mib_to_bytes",
    "bytes_to_mib",
    "MIB",
]

#: Bytes in one MiB: the unit of every budget flag and node input.
MIB = 1 << 20

_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)


@runtime_checkable
class StoreBackend(Protocol):
    """A persistent latent store shared by processes: entries of latents found by entity embeddings.

    An *entry* is one request's cached latents (``name -> tensor``), stored under a compatibility key
    with the entities (strings plus unit-length float32 embeddings) it is found by. Semantics every
    backend keeps (the folder store's tests check them):

    * **atomic inserts**: a crash or error during :meth:`put` leaves no entry or a whole one;
    * **the manifest is the truth**: :meth:`search` returns only entries that exist; :meth:`load`
      returns the exact tensors stored (checked, e.g. SHA-256) or None, never a torn entry;
    * **byte budget**: the stored latent bytes never exceed :attr:`budget_bytes`; victims follow
      :attr:`policy` (``"lru"``, ``"lfu"``, ``"fifo"``), and both live in the store, so a change by one
      process governs every other process's next insert;
    * **generation**: a number that changes with every insert, eviction, deletion and repair (the
      node pack's cache invalidation reads it);
    * **shared**: several processes may open one location at once; readers never see a partial write.

    Attributes:
        location: the location string the store was opened from (a resolved folder path for a folder).
        open_report: repairs made while opening (one line each; empty when the store was consistent).
        notes: what opening did that is not a repair, e.g. an upgrade of an older store format (one line each).
        dim: embedding width of the stored vectors, None until the first insert.
    """

    location: str
    open_report: list
    notes: list
    dim: Optional[int]

    # --------------------------------------------------------------- writes
    def put(self, tensors: Mapping[str, Any], entities: Sequence[str], embeddings: np.ndarray, compat_key: str,
            prompt: str, info: Optional[Mapping] = None, thumbnail: Optional[bytes] = None) -> int:
        """Insert one entry; returns its id (int > 0). Evicts by policy to stay within the budget.

        ``tensors``: name -> torch tensor (float16/bfloat16/float32, finite); ``embeddings``:
        [len(entities), dim] float32; ``thumbnail``: a JPEG or PNG of one frame, at most
        ``cache.store.MAX_THUMBNAIL_BYTES``, kept where the backend keeps thumbnails. Raises ValueError
        (bad tensors or thumbnail, an entry larger than the whole budget) or StoreError (closed, not
        writable)."""

    def delete(self, entry_ids: Sequence[int], reason: str = "deleted") -> int:
        """Remove entries (latents, entities, vectors); unknown ids are ignored. Returns how many went."""

    def pin(self, entry_id: int, pinned: bool = True) -> bool:
        """Pin an entry (never evicted; its bytes still count against the budget, and a budget below
        the pinned bytes is refused with ``cache.store.PinnedError``) or unpin it (``pinned=False``).
        Returns False for an unknown id. A backend that cannot keep pins raises StoreError saying so."""

    def thumbnail(self, entry_id: int) -> Optional[bytes]:
        """The entry's thumbnail (JPEG or PNG bytes of one frame, at most
        ``cache.store.MAX_THUMBNAIL_BYTES``), or None when it has none, is gone, or the backend keeps
        no thumbnails."""

    def record_lookup(self, prompt: str, query_entities: Sequence[str], hit_entry: Optional[int],
                      entity: Optional[str], matched: Optional[str], similarity: Optional[float],
                      ms: float) -> None:
        """Count one lookup (hit/miss counters, entity frequencies, the recent-lookup log) and refresh
        the served entry's recency and frequency (what LRU and LFU order by)."""

    # --------------------------------------------------------------- reads
    def search(self, vectors: np.ndarray, compat_key: str, k: int = 8) -> list:
        """k nearest stored entities (cosine) of each query row among entries of ``compat_key``:
        a list of :class:`~cache.store.EntityMatch`, sorted by similarity, highest first."""

    def load(self, entry_id: int, device: str = "cpu") -> Optional[dict]:
        """An entry's latents (name -> tensor, as stored), or None when it is gone or failed its check
        (a failing entry is removed and reported, so the caller treats it as a miss)."""

    def entry(self, entry_id: int) -> Optional[EntryRecord]:
        """One entry's record (prompt, entities, bytes, times, info), or None."""

    def entries(self) -> list:
        """Every entry's :class:`~cache.store.EntryRecord`, oldest first."""

    def most_used(self, limit: int = 8) -> list:
        """The ``limit`` entries served most often (:class:`~cache.store.EntryRecord`, by ``access_count``;
        ties: the most recently used first)."""

    def compat_keys(self) -> list:
        """The distinct compatibility keys that hold entries, sorted."""

    def entity_vectors(self, entry_ids: Sequence[int]) -> Dict[int, np.ndarray]:
        """entry id -> [n, dim] float32 embeddings of its entities, in the order of :meth:`entry`'s
        ``entities``: what copying an entry to another store needs (``cache migrate``). Unknown ids
        are left out."""

    def __len__(self) -> int:
        """Number of entries."""

    @property
    def generation(self) -> int:
        """Changes with every insert, eviction, deletion and repair (by any process)."""

    def stats(self, last: int = 10) -> StoreStats:
        """Counters, bytes against budget, hit rate, top entities and the ``last`` newest lookups."""

    def events(self, limit: int = 50) -> list:
        """Newest repair and quarantine events: dicts with time, kind, detail."""

    # --------------------------------------------------------------- maintenance
    def verify(self, full: bool = True) -> VerifyReport:
        """Check every entry (and, ``full``, its bytes) and the search index; repair; report."""

    def compact(self) -> dict:
        """Rebuild the search structures without deleted vectors: ``{"partitions", "tombstones_removed",
        "vectors"}``."""

    # --------------------------------------------------------------- budget and policy
    @property
    def budget_bytes(self) -> int:
        """The byte budget in force (the persisted one)."""

    @property
    def policy(self) -> str:
        """The eviction policy in force: ``"lru"``, ``"lfu"`` or ``"fifo"``."""

    def set_budget(self, budget_bytes: int, evict_to_fit: bool = False) -> int:
        """Persist a new budget (bytes > 0); returns the number evicted. A budget below what the store
        holds is refused (``cache.store.BudgetError``: how many entries and bytes would go) unless
        ``evict_to_fit``, which evicts down to it in the same transaction."""

    def set_policy(self, policy: str) -> None:
        """Persist a new eviction policy (``"lru"``, ``"lfu"``, ``"fifo"``)."""

    # --------------------------------------------------------------- lifetime
    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""

    def close(self) -> None:
        """Flush what is pending and release every handle. Idempotent."""

    def __enter__(self) -> "StoreBackend":
        """Context manager: closes on exit."""

    def __exit__(self, *exc: Any) -> None:
        """Close the store."""


Opener = Callable[..., StoreBackend]


def location_scheme(location: "str | os.PathLike[str]") -> str:
    """The URL scheme of a location in lower case (``"postgresql"``), or ``""`` for a folder path."""
    match = _SCHEME.match(str(location))
    return match.group(1).lower() if match else ""


def _folder(location: "str | os.PathLike[str]") -> Path:
    return Path(location).expanduser().resolve()


def _open_folder(location: "str | os.PathLike[str]", *, budget_bytes: Optional[int] = None,
                 policy: Optional[str] = None, dim: Optional[int] = None, create: bool = True,
                 options: Optional[Mapping[str, Any]] = None, evict_to_fit: bool = False) -> StoreBackend:
    path = _folder(location)  # create=False: LatentStore refuses, saying what the folder is instead
    config = StoreConfig(**dict(options)) if options else None
    return LatentStore(path, config=config, dim=dim, budget_bytes=budget_bytes, policy=policy, create=create,
                       evict_to_fit=evict_to_fit)


def _folder_stats(location: "str | os.PathLike[str]", last: int = 10) -> StoreStats:
    return _read_folder_stats(_folder(location), last)


def _folder_exists(location: "str | os.PathLike[str]") -> bool:
    return LatentStore.exists(_folder(location))


def _open_postgres(location: str, **kwargs) -> StoreBackend:
    from .pgstore import open_location  # lazily: psycopg and pgvector stay optional

    return open_location(str(location), **kwargs)


def _postgres_stats(location: str, last: int = 10) -> StoreStats:
    from .pgstore import read_location_stats

    return read_location_stats(str(location), last)


def _postgres_exists(location: str) -> bool:
    from .pgstore import location_exists

    return location_exists(str(location))


_POSTGRES = (_open_postgres, _postgres_stats, _postgres_exists)

#: scheme -> (open, read_stats, exists). ``""`` is a folder; ``postgresql://`` (and ``postgres://``)
#: a store shared by a farm (cache/pgstore.py). Register a new scheme with :func:`register_backend`;
#: :func:`open_store` is the one place that dispatches on it.
BACKENDS: Dict[str, tuple] = {"": (_open_folder, _folder_stats, _folder_exists), "postgresql": _POSTGRES,
                              "postgres": _POSTGRES}


def register_backend(scheme: str, opener: Opener, read_stats: Callable[..., StoreStats],
                     exists: Callable[[str], bool]) -> None:
    """Make :func:`open_store` (and :func:`read_stats`, :func:`store_exists`) handle ``scheme://`` locations.

    Args:
        scheme: lower-case URL scheme, e.g. ``"postgresql"``.
        opener: ``opener(location, *, budget_bytes, policy, dim, create, options, evict_to_fit) -> StoreBackend``.
        read_stats: ``read_stats(location, last) -> StoreStats`` without opening for writing.
        exists: ``exists(location) -> bool``: a store is there already.

    Raises:
        ValueError: a malformed scheme, or the folder scheme ``""``.
    """
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme or ""):
        raise ValueError(f"a backend scheme is a lower-case URL scheme such as 'postgresql', got {scheme!r}")
    BACKENDS[scheme] = (opener, read_stats, exists)


def _backend(location: "str | os.PathLike[str]") -> tuple:
    if not str(location).strip():
        raise ValueError("the store location is empty: give a folder (e.g. 'my-store') or a URL")
    scheme = location_scheme(location)
    if scheme not in BACKENDS:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS) if s) or "none"
        raise StoreError(f"no store backend handles {scheme}:// locations (registered URL schemes: {known}); "
                         "give a store folder instead")
    return BACKENDS[scheme]


def open_store(location: "str | os.PathLike[str]", *, budget_bytes: Optional[int] = None,
               policy: Optional[str] = None, dim: Optional[int] = None, create: bool = True,
               options: Optional[Mapping[str, Any]] = None, evict_to_fit: bool = False) -> StoreBackend:
    """Open the store at ``location`` (a folder, or ``scheme://...`` of a registered backend).

    Args:
        location: folder path (``~`` expanded; relative to the working directory) or URL.
        budget_bytes: byte budget to persist; None keeps the stored one (1 GiB for a new store).
            Convert MiB with :func:`mib_to_bytes`. One below what the store holds is refused
            (``BudgetError``) unless ``evict_to_fit``, which evicts down to it now.
        policy: ``"lru"``, ``"lfu"`` or ``"fifo"`` to persist; None keeps the stored one (lru when new).
        dim: embedding width; checked against the store's, or set for a new store.
        create: create the store when the location holds none; False raises StoreError instead.
        options: backend tuning (a folder: ``cache.store.StoreConfig`` fields such as ``durable``,
            ``autosave_every``, ``index_ef_search``); budget_bytes and policy above win over it.
        evict_to_fit: confirm a budget smaller than what the store holds (see ``budget_bytes``).

    Returns:
        an open :class:`StoreBackend` (a ``LatentStore`` for a folder). Close it, or use ``with``.

    Raises:
        StoreError: no backend for the scheme; no store there with ``create=False``; a location that
            is not a usable store (the message says what to do).
        ValueError: an empty location, a non-positive budget, an unknown policy or option.
    """
    opener, _, _ = _backend(location)
    return opener(location, budget_bytes=budget_bytes, policy=policy, dim=dim, create=create, options=options,
                  evict_to_fit=evict_to_fit)


def read_stats(location: "str | os.PathLike[str]", last: int = 10) -> StoreStats:
    """Statistics of the store at ``location`` read without opening it for writing (no lock, no repair):
    for read-only mounts and stores of another user. Raises StoreError when no readable store is there."""
    _, stats, _ = _backend(location)
    return stats(location, last)


def store_exists(location: "str | os.PathLike[str]") -> bool:
    """True when ``location`` already holds a store (nothing is created or opened)."""
    _, _, exists = _backend(location)
    return bool(exists(location))


def generation_of(location: "str | os.PathLike[str]") -> Optional[int]:
    """The generation of the store at ``location`` without opening it, or None when there is no
    readable store there yet (cheap enough to call before every queued ComfyUI prompt)."""
    try:
        if not store_exists(location):
            return None
        return int(read_stats(location, last=0).generation)
    except (StoreError, ValueError):
        return None


def mib_to_bytes(mib: float) -> int:
    """A budget in MiB (2**20 bytes; fractions allowed) as whole bytes.

    Raises:
        ValueError: not a finite number > 0, or under one byte.
    """
    if isinstance(mib, bool) or not isinstance(mib, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(mib)) or float(mib) <= 0:
        raise ValueError(f"a budget is a positive number of MiB, got {mib!r}")
    nbytes = int(round(float(mib) * MIB))
    if nbytes < 1:
        raise ValueError(f"a budget of {mib} MiB is under one byte; give at least 1e-6 MiB")
    return nbytes


def bytes_to_mib(nbytes: int) -> float:
    """Bytes as MiB (for display)."""
    return float(nbytes) / MIB
