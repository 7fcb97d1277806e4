"""The latent store's public types: its settings, errors and the records it returns.

Kept apart from the modules that do the work (``store_manifest``, ``store_files``, ``store_index``,
``store_budget``) so each of them can raise and return these without importing the others;
:mod:`comfyui_chai.cache.store` re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .policy import EvictionPolicy

__all__ = [
    "StoreError",
    "ContainmentError",
    "DiskFullError",
    "BudgetError",
    "PinnedError",
    "EntryTooLargeError",
    "StoreConfig",
    "EntryRecord",
    "EntityMatch",
    "StoreStats",
    "VerifyReport",
    "DEFAULT_BUDGET_BYTES",
    "MAX_BUDGET_BYTES",
    "MAX_ENTRY_BYTES",
    "ALLOWED_DTYPES",
]

DEFAULT_BUDGET_BYTES = 1 << 30  # the paper's 1 GB cache (CHAI section 4)
# Larger than any real budget (1 PiB), small enough that byte sums never leave SQLite's int64.
MAX_BUDGET_BYTES = 1 << 50
# Hard cap on one latent file (256 MiB). The largest OpenSora 1.2 entry (720p, 16 s: 3 latents of
# 4x120x90x160 in float32) is about 83 MB; a manifest asking for more is not ours to trust.
MAX_ENTRY_BYTES = 1 << 28
ALLOWED_DTYPES = ("float16", "bfloat16", "float32")


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message says what to do."""


class ContainmentError(StoreError):
    """The folder is not a CHAI store, or part of it is a link or a special file; nothing was touched."""


class DiskFullError(StoreError):
    """The store's file system is full (ENOSPC / SQLITE_FULL); nothing committed was lost.

    Attributes:
        folder: the store folder. free_bytes: bytes free when the error was raised (-1 if unknown).
    """

    def __init__(self, message: str, folder: str = "", free_bytes: int = -1) -> None:
        super().__init__(message)
        self.folder = folder
        self.free_bytes = free_bytes


class PinnedError(StoreError):
    """A budget or an insert that pinned entries make impossible: they are never evicted, so the
    store cannot hold less than their bytes. The message says how many bytes are pinned and what
    to do (unpin entries, or keep a larger budget). Nothing was changed."""


class BudgetError(StoreError):
    """Lowering the budget would evict entries and the caller did not confirm it (``evict_to_fit``).

    Attributes:
        budget_bytes: the budget asked for. held_bytes: latent bytes the store holds now.
        evict_entries / evict_bytes: what fitting the new budget would evict.
    """

    def __init__(self, message: str, budget_bytes: int, held_bytes: int, evict_entries: int,
                 evict_bytes: int) -> None:
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.held_bytes = held_bytes
        self.evict_entries = evict_entries
        self.evict_bytes = evict_bytes


class EntryTooLargeError(ValueError):
    """One entry is larger than the store's whole budget (or than ``MAX_ENTRY_BYTES``); it is not stored.

    Attributes:
        nbytes: size of the entry's latent file (bytes). budget_bytes: the budget it exceeds.
    """

    def __init__(self, message: str, nbytes: int, budget_bytes: int) -> None:
        super().__init__(message)
        self.nbytes = nbytes
        self.budget_bytes = budget_bytes


@dataclass(frozen=True)
class StoreConfig:
    """Settings of a latent store (cache-dit style: one documented field each, plus a fingerprint).

    Attributes:
        budget_bytes: most bytes of latent files the store keeps (bytes); default 1 GiB, the
            paper's cache size. Must be > 0. Persisted; reopening with another value changes it
            (a smaller one only with ``evict_to_fit=True`` when entries would be evicted).
        policy: eviction policy, ``lru`` (paper, default), ``lfu`` or ``fifo``.
        durable: fsync files and directories on every write. Turn off only for throw-away stores
            (simulations): a crash may then lose the last entries, but never serves a torn one.
        autosave_every: write the index files after this many changes made by this process, or
            after 5% of the index's vectors if that is more (they are always written on close and
            after compaction); between saves, reopening catches the index up from the manifest.
        index: hnswlib parameters; ``dim`` is taken from the embedder on first insert.
    """

    budget_bytes: int = DEFAULT_BUDGET_BYTES
    policy: EvictionPolicy = EvictionPolicy.LRU
    durable: bool = True
    autosave_every: int = 256
    index_M: int = 16
    index_ef_construction: int = 200
    index_ef_search: int = 96
    compact_tombstone_share: float = 0.25

    def fingerprint(self) -> str:
        """Short string naming the settings, e.g. ``STORE_B1073741824_LRU_M16E200S96``."""
        return (
            f"STORE_B{self.budget_bytes}_{EvictionPolicy.parse(self.policy).name}"
            f"_M{self.index_M}E{self.index_ef_construction}S{self.index_ef_search}"
        )


@dataclass
class EntryRecord:
    """One stored entry as the manifest records it.

    Attributes:
        entry_id: manifest row id (int); its latent file is ``latents/<entry_id>.safetensors``.
        compat_key: compatibility key the entry was stored under.
        prompt: the prompt that produced it.
        entities: entity strings stored with it (the texts whose embeddings are indexed).
        nbytes: size of its latent file (bytes).
        created_at / last_access: UNIX seconds.
        access_count: how many times it was served.
        info: free-form JSON metadata given at insert (seed, steps, timesteps...).
        pinned: never evicted (its bytes still count against the budget).
        has_thumbnail: a thumbnail is kept with it (read it with ``thumbnail(entry_id)``).
    """

    entry_id: int
    compat_key: str
    prompt: str
    entities: list[str]
    nbytes: int
    created_at: float
    last_access: float
    access_count: int
    info: dict = field(default_factory=dict)
    pinned: bool = False
    has_thumbnail: bool = False


@dataclass
class EntityMatch:
    """An index candidate confirmed by the manifest.

    Attributes:
        label: entity row id (the hnswlib label).
        entry_id: the entry the entity belongs to.
        text: the stored entity text.
        similarity: cosine similarity to the query vector, in [-1, 1].
        query_index: which query vector (row of the query matrix) it answers.
    """

    label: int
    entry_id: int
    text: str
    similarity: float
    query_index: int


@dataclass
class StoreStats:
    """Counters and sizes of a store (persisted counters survive restarts).

    Attributes:
        entries, entities: live rows. bytes / budget_bytes: latent bytes held and allowed.
        hits, misses, lookups, evictions, inserts, repairs, quarantined: lifetime counters.
        hit_rate: hits / lookups (0.0 before any lookup).
        lookup_ms_mean / lookup_ms_p50 / lookup_ms_p99: over the last 1,000 lookups (ms).
        top_entities: most frequent query entities, [(text, count)], at most 10.
        last_lookups: the newest lookups (dicts: time, prompt, hit, entity, matched, similarity, ms,
            entry_id: the entry a hit served; None for a miss, and for lookups a format-2 store logged).
        generation: manifest generation (bumped by every insert, eviction and repair).
        policy: eviction policy name.
        pinned_entries / pinned_bytes: entries that are never evicted, and their latent bytes
            (counted in ``bytes``; the budget can never be lowered below them).
    """

    entries: int
    entities: int
    bytes: int
    budget_bytes: int
    hits: int
    misses: int
    lookups: int
    evictions: int
    inserts: int
    repairs: int
    quarantined: int
    hit_rate: float
    lookup_ms_mean: float
    lookup_ms_p50: float
    lookup_ms_p99: float
    top_entities: list[tuple[str, int]]
    last_lookups: list[dict]
    generation: int
    policy: str
    pinned_entries: int = 0
    pinned_bytes: int = 0

    def to_dict(self) -> dict:
        """JSON-serialisable dict of every field."""
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    """What :meth:`LatentStore.verify` checked and repaired.

    ``ok`` is True when nothing needed repair. ``problems`` lists human-readable findings, each
    already repaired (quarantined, removed or rebuilt) by the time the report is returned.
    ``left_alone`` lists files in the store's folders that the store did not make (names outside
    its patterns, links, special files): reported, never touched, and not a problem of the store.
    """

    entries_checked: int = 0
    files_quarantined: list[str] = field(default_factory=list)
    orphans_removed: list[str] = field(default_factory=list)
    rows_removed: int = 0
    partitions_rebuilt: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    left_alone: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the store was consistent before the check."""
        return not self.problems
