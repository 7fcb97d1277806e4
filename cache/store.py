"""The persistent, crash-safe, multi-process CHAI latent store.

Layout of a store directory::

    manifest.sqlite        the truth: entries, entities (+ embeddings), counters, logs (WAL mode)
    latents/<id>.safetensors   one file per entry: the cached latents of one request
    index/index-<key>.bin  hnswlib partitions (derived data; rebuilt from the manifest when needed)
    quarantine/            corrupt latent files moved aside, never served
    store.lock             cross-process writer lock (filelock)

Guarantees (DESIGN.md, "The store"; lessons of reference/ecosystem.md section 2.5):

* Write order: latent file (temp, fsync, rename, directory fsync) -> manifest rows in one
  transaction -> index. A crash at any point leaves either no entry or a whole one; stray files
  are removed when the store is next opened.
* The manifest is the truth. Every index candidate is checked against a manifest row, and every
  latent file against its recorded size and SHA-256 before it is served. A candidate without a
  valid row or file is a miss plus a repair, and a bad file is quarantined and reported.
* One writer at a time across processes (a file lock); readers never block (SQLite WAL).
* A byte budget: the manifest's byte total never exceeds it; victims are chosen by the policy
  (LRU, LFU, FIFO) and evicting deletes the file, the rows and the vectors.
* Only safetensors and SQLite are read from disk.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .index import EntityIndex, IndexFileError, IndexParams, file_sha256, fsync_path, partition_file_name
from .policy import EvictionPolicy

__all__ = [
    "StoreError",
    "StoreConfig",
    "LatentStore",
    "EntryRecord",
    "EntityMatch",
    "StoreStats",
    "VerifyReport",
    "read_stats",
    "ALLOWED_DTYPES",
]

log = logging.getLogger("comfyui_chai.store")

SCHEMA_VERSION = 1
DEFAULT_BUDGET_BYTES = 1 << 30  # the paper's 1 GB cache (CHAI section 4)
ALLOWED_DTYPES = ("float16", "bfloat16", "float32")
LOOKUP_LOG_KEEP = 1000


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message says what to do."""


@dataclass(frozen=True)
class StoreConfig:
    """Settings of a latent store (cache-dit style: one documented field each, plus a fingerprint).

    Attributes:
        budget_bytes: most bytes of latent files the store keeps (bytes); default 1 GiB, the
            paper's cache size. Must be > 0. Persisted; reopening with another value changes it.
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
        entry_id: manifest row id (int).
        compat_key: compatibility key the entry was stored under.
        prompt: the prompt that produced it.
        entities: entity strings stored with it (the texts whose embeddings are indexed).
        nbytes: size of its latent file (bytes).
        created_at / last_access: UNIX seconds.
        access_count: how many times it was served.
        info: free-form JSON metadata given at insert (seed, steps, timesteps...).
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
        last_lookups: the newest lookups (dicts: time, prompt, hit, entity, matched, similarity, ms).
        generation: manifest generation (bumped by every insert, eviction and repair).
        policy: eviction policy name.
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

    def to_dict(self) -> dict:
        """JSON-serialisable dict of every field."""
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    """What :meth:`LatentStore.verify` checked and repaired.

    ``ok`` is True when nothing needed repair. ``problems`` lists human-readable findings, each
    already repaired (quarantined, removed or rebuilt) by the time the report is returned.
    """

    entries_checked: int = 0
    files_quarantined: list[str] = field(default_factory=list)
    orphans_removed: list[str] = field(default_factory=list)
    rows_removed: int = 0
    partitions_rebuilt: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the store was consistent before the check."""
        return not self.problems


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    compat_key TEXT NOT NULL,
    prompt TEXT NOT NULL,
    file TEXT NOT NULL UNIQUE,
    nbytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_access REAL NOT NULL,
    access_count INTEGER NOT NULL DEFAULT 0,
    info TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS entries_by_key ON entries(compat_key);
CREATE TABLE IF NOT EXISTS entities(
    label INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    compat_key TEXT NOT NULL,
    text TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entities_by_entry ON entities(entry_id);
CREATE INDEX IF NOT EXISTS entities_by_key ON entities(compat_key, label);
CREATE TABLE IF NOT EXISTS deleted_labels(
    label INTEGER PRIMARY KEY, compat_key TEXT NOT NULL, generation INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS partitions(
    compat_key TEXT PRIMARY KEY,
    tensor_spec TEXT NOT NULL,
    index_sha256 TEXT,
    index_size INTEGER,
    index_generation INTEGER,
    index_deleted TEXT
);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS entity_counts(text TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS lookup_log(
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, prompt TEXT NOT NULL,
    hit INTEGER NOT NULL, entity TEXT, matched TEXT, similarity REAL, ms REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""

_COUNTERS = ("hits", "misses", "lookups", "evictions", "inserts", "repairs", "quarantined")

# Latent bytes held, kept in counters('bytes_held') by SQLite itself on every row change of
# `entries`, so an insert reads it in O(1) instead of SUM(nbytes) over the table (about 20 ms at
# 100k entries, paid on every put). Trigger bodies contain ';', so they are not in _SCHEMA.
_BYTES_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS entries_bytes_insert AFTER INSERT ON entries BEGIN "
    "UPDATE counters SET value = value + NEW.nbytes WHERE name = 'bytes_held'; END",
    "CREATE TRIGGER IF NOT EXISTS entries_bytes_delete AFTER DELETE ON entries BEGIN "
    "UPDATE counters SET value = value - OLD.nbytes WHERE name = 'bytes_held'; END",
    "CREATE TRIGGER IF NOT EXISTS entries_bytes_update AFTER UPDATE OF nbytes ON entries BEGIN "
    "UPDATE counters SET value = value - OLD.nbytes + NEW.nbytes WHERE name = 'bytes_held'; END",
)


class LatentStore:
    """A directory of cached latents, shared safely by several processes.

    Open with :meth:`open` (or the constructor), use as a context manager or call :meth:`close`.

    Args:
        path: the store directory; created if missing (its parent must exist or be creatable).
        config: :class:`StoreConfig`; ``budget_bytes`` and ``policy`` given here replace the
            persisted ones, ``None`` keeps them.
        dim: embedding dimension. Required for a new store unless the first insert sets it;
            checked against the persisted one for an existing store.

    Raises:
        StoreError: the path is a file, not writable, not a store of this version, or its
            dimension differs from ``dim``.
        ValueError: a non-positive budget or an unknown policy.
    """

    def __init__(self, path: str | os.PathLike, config: StoreConfig | None = None, dim: int | None = None,
                 budget_bytes: int | None = None, policy: str | EvictionPolicy | None = None) -> None:
        self.path = Path(path).expanduser().resolve()
        base = config or StoreConfig()
        if budget_bytes is not None:
            base = _replace(base, budget_bytes=budget_bytes)
        if policy is not None:
            base = _replace(base, policy=EvictionPolicy.parse(policy))
        _validate_budget(base.budget_bytes)
        self.config = _replace(base, policy=EvictionPolicy.parse(base.policy))
        self._explicit_budget = budget_bytes is not None or config is not None
        self._explicit_policy = policy is not None or config is not None
        self._prepare_directory()
        import filelock

        self._lock = filelock.FileLock(str(self.path / "store.lock"), timeout=120)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._sync_lock = threading.RLock()
        self._closed = False
        self._changes_since_save = 0
        self.open_report: list[str] = []
        with self._lock:
            self._init_schema(dim)
            self._load_index()
            self._collect_garbage()
            self._apply_config()

    @classmethod
    def open(cls, path: str | os.PathLike, **kwargs) -> "LatentStore":
        """Open (or create) a store; same arguments as the constructor."""
        return cls(path, **kwargs)

    # ------------------------------------------------------------------ setup
    def _prepare_directory(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store path {self.path} is a file; give a folder (it is created if missing)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for sub in ("latents", "index", "quarantine"):
                (self.path / sub).mkdir(exist_ok=True)
            probe = self.path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(
                f"store folder {self.path} is not writable ({exc.strerror or exc}); "
                "give a folder you can write to, or copy the store somewhere writable"
            ) from exc

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreError("the store is closed; open it again")
            conn = sqlite3.connect(str(self.path / "manifest.sqlite"), timeout=60.0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL" if self.config.durable else "PRAGMA synchronous=OFF")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=60000")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _tx(self):
        return _Transaction(self._conn())

    def _init_schema(self, dim: int | None) -> None:
        try:
            self._conn()  # its PRAGMAs are the first reads: a non-SQLite file fails here
            with self._tx() as c:
                c.executescript_in_tx(_SCHEMA)
                for statement in _BYTES_TRIGGERS:
                    c.execute(statement)
                # Re-derive the byte counter the triggers keep, so stores made before them (or a
                # counter that drifted by any means) start each open exact. One scan per open.
                c.execute("INSERT OR REPLACE INTO counters VALUES('bytes_held', "
                          "(SELECT COALESCE(SUM(nbytes), 0) FROM entries))")
                meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
                if not meta:
                    c.execute("INSERT INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
                    c.execute("INSERT INTO meta VALUES('generation', '0')")
                    c.execute("INSERT INTO meta VALUES('budget_bytes', ?)", (str(self.config.budget_bytes),))
                    c.execute("INSERT INTO meta VALUES('policy', ?)", (self.config.policy.value,))
                    if dim is not None:
                        c.execute("INSERT INTO meta VALUES('dim', ?)", (str(int(dim)),))
                    c.execute(
                        "INSERT INTO meta VALUES('index_params', ?)",
                        (json.dumps({"M": self.config.index_M, "ef_construction": self.config.index_ef_construction,
                                     "ef_search": self.config.index_ef_search,
                                     "compact_tombstone_share": self.config.compact_tombstone_share}),),
                    )
                    for name in _COUNTERS:
                        c.execute("INSERT OR IGNORE INTO counters VALUES(?, 0)", (name,))
                    c.execute("INSERT OR IGNORE INTO counters VALUES('lookup_ms_sum', 0)")
                    meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{self.path / 'manifest.sqlite'} is not a readable SQLite manifest ({exc}); "
                "this folder is not a CHAI store, or its manifest is damaged: open a new folder"
            ) from exc
        _check_schema(meta.get("schema_version"))
        stored_dim = int(meta["dim"]) if "dim" in meta else None
        if dim is not None and stored_dim is not None and int(dim) != stored_dim:
            raise StoreError(f"store {self.path} holds {stored_dim}-d embeddings but the embedder gives {dim}-d; "
                             "use the embedder the store was built with, or a new store folder")
        if dim is not None and stored_dim is None:
            with self._tx() as c:
                c.execute("INSERT OR REPLACE INTO meta VALUES('dim', ?)", (str(int(dim)),))
            stored_dim = int(dim)
        self.dim = stored_dim
        params = json.loads(meta["index_params"])
        self._index_params = params
        self.index = EntityIndex(IndexParams(dim=stored_dim, **params)) if stored_dim else None
        self._synced_generation = 0
        self._max_label = 0

    def _apply_config(self) -> None:
        """Persist an explicitly given budget / policy and evict down to a smaller budget."""
        with self._tx() as c:
            meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
            if self._explicit_budget:
                c.execute("UPDATE meta SET value=? WHERE key='budget_bytes'", (str(self.config.budget_bytes),))
            else:
                self.config = _replace(self.config, budget_bytes=int(meta["budget_bytes"]))
            if self._explicit_policy:
                c.execute("UPDATE meta SET value=? WHERE key='policy'", (self.config.policy.value,))
            else:
                self.config = _replace(self.config, policy=EvictionPolicy.parse(meta["policy"]))
        self._evict_to(self.config.budget_bytes)

    def _adopt_config(self, budget_bytes: int, policy: EvictionPolicy | str) -> None:
        """Take the persisted budget and policy: another process may have changed them
        (``set_budget``, ``cache`` CLI, a node with another budget), and the manifest is the truth."""
        policy = EvictionPolicy.parse(policy)
        if budget_bytes != self.config.budget_bytes or policy != self.config.policy:
            self.config = _replace(self.config, budget_bytes=int(budget_bytes), policy=policy)

    def _budget_for(self, nbytes: int, c=None) -> int:
        """The persisted budget (adopted), after checking an entry of ``nbytes`` fits in it at all.

        Raises:
            ValueError: the entry is larger than the whole budget.
        """
        rows = dict((c or self._conn()).execute(
            "SELECT key, value FROM meta WHERE key IN ('budget_bytes', 'policy')").fetchall())
        self._adopt_config(int(rows["budget_bytes"]), rows["policy"])
        budget = self.config.budget_bytes
        if nbytes > budget:
            raise ValueError(f"this entry is {nbytes} bytes, more than the store's whole budget of {budget} bytes; "
                             "raise the budget (budget_bytes / --budget-mb)")
        return budget

    # ------------------------------------------------------------------ index sync / repair
    def _generation(self) -> int:
        row = self._conn().execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0])

    def _event(self, c, kind: str, detail: str) -> None:
        c.execute("INSERT INTO events(time, kind, detail) VALUES(?,?,?)", (time.time(), kind, detail))
        self.open_report.append(f"{kind}: {detail}")
        log.warning("CHAI store %s: %s: %s", self.path, kind, detail)

    def _load_index(self) -> None:
        """Load every partition file that matches its record; rebuild the rest from the manifest."""
        if self.index is None:
            return
        conn = self._conn()
        generation = self._generation()
        keys = [r[0] for r in conn.execute("SELECT DISTINCT compat_key FROM entities")]
        recorded = {r[0]: r for r in conn.execute(
            "SELECT compat_key, index_sha256, index_size, index_generation, index_deleted FROM partitions")}
        self._max_label = int(conn.execute("SELECT COALESCE(MAX(label), 0) FROM entities").fetchone()[0])
        self._synced_generation = generation  # we hold the file lock: nothing changes under us
        for key in keys:
            rec = recorded.get(key)
            reason = None
            if rec is None or rec[1] is None:
                reason = "no saved index"
            else:
                try:
                    self.index.load_partition(key, self.path / "index", rec[1], rec[2],
                                              np.asarray(json.loads(rec[4] or "[]"), dtype=np.int64))
                except IndexFileError as exc:
                    reason = str(exc)
            if reason is None:
                self._catch_up_partition(key, since_generation=int(rec[3]))
                live = self.index.labels(key)
                want = set(r[0] for r in conn.execute("SELECT label FROM entities WHERE compat_key=?", (key,)))
                if live != want:
                    reason = f"index for this key disagrees with the manifest ({len(live)} vs {len(want)} vectors)"
                elif int(rec[3]) != generation:
                    self._changes_since_save += 1  # caught up in memory: save on close
            if reason is not None:
                self._rebuild_partition(key, reason)
        for key in set(recorded) - set(keys):
            self.index.drop(key)
        self._synced_generation = generation

    def _rebuild_partition(self, key: str, reason: str) -> None:
        labels, vectors = self._manifest_vectors(key)
        self.index.rebuild(key, labels, vectors)
        with self._tx() as c:
            self._event(c, "index_rebuilt", f"{partition_file_name(key)}: {reason}; rebuilt {len(labels)} vectors")
            c.execute("UPDATE counters SET value=value+1 WHERE name='repairs'")
        self._save_partition(key)

    def _manifest_vectors(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = self._conn().execute("SELECT label, embedding FROM entities WHERE compat_key=? ORDER BY label",
                                    (key,)).fetchall()
        labels = np.asarray([r[0] for r in rows], dtype=np.int64)
        vectors = (np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
                   if rows else np.zeros((0, self.dim), np.float32))
        return labels, vectors

    def _catch_up_partition(self, key: str, since_generation: int) -> None:
        conn = self._conn()
        known = self.index.labels(key)
        top = max(known) if known else 0
        rows = conn.execute("SELECT label, embedding FROM entities WHERE compat_key=? AND label>?",
                            (key, top)).fetchall()
        rows = [r for r in rows if r[0] not in known]
        if rows:
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
            self.index.add(np.asarray([r[0] for r in rows], np.int64), vecs, key)
        gone = [r[0] for r in conn.execute(
            "SELECT label FROM deleted_labels WHERE compat_key=? AND generation>?", (key, since_generation))]
        if gone:
            self.index.delete(gone, key)

    def sync(self) -> None:
        """Bring this process's in-memory index up to the manifest (other processes' inserts and
        evictions). Cheap when nothing changed: one SQLite read."""
        if self.index is None:
            self._reload_dim()
            if self.index is None:
                return
        generation = self._generation()
        if generation == self._synced_generation:
            return
        with self._sync_lock:
            conn = self._conn()
            generation = self._generation()
            rows = conn.execute("SELECT label, compat_key, embedding FROM entities WHERE label>? ORDER BY label",
                                (self._max_label,)).fetchall()
            by_key: dict[str, list] = {}
            for label, key, emb in rows:
                by_key.setdefault(key, []).append((label, emb))
            for key, items in by_key.items():
                known = self.index.known_labels([label for label, _ in items], key)
                items = [it for it in items if it[0] not in known]
                if items:
                    vecs = np.frombuffer(b"".join(e for _, e in items), np.float32).reshape(len(items), self.dim)
                    self.index.add(np.asarray([label for label, _ in items], np.int64), vecs, key)
            if rows:
                self._max_label = max(self._max_label, rows[-1][0])
            for label, key in conn.execute("SELECT label, compat_key FROM deleted_labels WHERE generation>?",
                                           (self._synced_generation,)).fetchall():
                self.index.delete([label], key)
            pruned = conn.execute("SELECT value FROM meta WHERE key='deleted_pruned_upto'").fetchone()
            if pruned is not None and int(pruned[0]) > self._synced_generation:
                # Another process pruned deletion-log rows we never read (save_index / compact):
                # drop whatever the manifest no longer holds, so no stale vector lingers or gets saved.
                for key in self.index.keys():
                    want = set(r[0] for r in conn.execute("SELECT label FROM entities WHERE compat_key=?", (key,)))
                    stale = self.index.labels(key) - want
                    if stale:
                        self.index.delete(sorted(stale), key)
            self._synced_generation = generation

    def _reload_dim(self) -> None:
        row = self._conn().execute("SELECT value FROM meta WHERE key='dim'").fetchone()
        if row is not None and self.index is None:
            self.dim = int(row[0])
            self.index = EntityIndex(IndexParams(dim=self.dim, **self._index_params))

    def _save_partition(self, key: str) -> None:
        """Write one partition file and record its checksum (caller holds the file lock)."""
        result = self.index.save_partition(key, self.path / "index")
        with self._tx() as c:
            if result is None:
                c.execute("UPDATE partitions SET index_sha256=NULL, index_size=NULL WHERE compat_key=?", (key,))
                return
            digest, size, _live, deleted = result
            c.execute(
                "UPDATE partitions SET index_sha256=?, index_size=?, index_generation=?, index_deleted=? "
                "WHERE compat_key=?",
                (digest, size, self._synced_generation, json.dumps(deleted), key),
            )

    def save_index(self) -> None:
        """Write every partition of the index to disk (also done on close and every
        ``autosave_every`` changes)."""
        if self.index is None:
            return
        with self._lock:
            self.sync()
            for key in self.index.keys():
                self._save_partition(key)
            with self._tx() as c:
                oldest = c.execute("SELECT MIN(index_generation) FROM partitions").fetchone()[0]
                if oldest is not None:
                    c.execute("DELETE FROM deleted_labels WHERE generation<=?", (oldest,))
                    _note_pruned(c, int(oldest))
            self._changes_since_save = 0

    def _collect_garbage(self) -> None:
        """Remove temp files and latent files no manifest row names (left by a crash mid-insert)."""
        known = set(r[0] for r in self._conn().execute("SELECT file FROM entries"))
        removed = []
        for sub in ("latents", "index"):
            folder = self.path / sub
            for name in os.listdir(folder):  # names only: a Path per file doubles this at 100k entries
                if ".tmp" in name or (sub == "latents" and name not in known):
                    (folder / name).unlink(missing_ok=True)
                    removed.append(f"{sub}/{name}")
        if removed:
            with self._tx() as c:
                self._event(c, "orphans_removed", f"{len(removed)} stray file(s) from an interrupted write: "
                            + ", ".join(removed[:5]))
        self._orphans_removed_at_open = removed

    # ------------------------------------------------------------------ writes
    def put(
        self,
        tensors: Mapping[str, "object"],
        entities: Sequence[str],
        embeddings: np.ndarray,
        compat_key: str,
        prompt: str,
        info: Mapping | None = None,
    ) -> int:
        """Insert one entry: its latents, and the entities (with embeddings) it is found by.

        Args:
            tensors: name -> torch tensor (float16, bfloat16 or float32, finite, non-empty),
                e.g. ``{"step_2": [4,15,30,53], ...}``; every entry of one ``compat_key`` must
                have the same names, shapes and dtypes.
            entities: entity strings, one per embedding row (at least one).
            embeddings: [len(entities), dim] float32 (L2-normalised by the embedder).
            compat_key: compatibility key (model fingerprint, latent shape, config fingerprint...);
                lookups only match entries of the same key.
            prompt: the prompt that produced the latents (for reports).
            info: JSON-serialisable metadata kept with the entry.

        Returns:
            The new entry id.

        Raises:
            ValueError: wrong tensor type, dtype, shape or non-finite values; mismatched
                entities/embeddings; an entry larger than the whole budget.
            StoreError: the store is closed, or its folder cannot be written (read-only, disk full).
        """
        import torch
        from safetensors.torch import save

        if not compat_key or not isinstance(compat_key, str):
            raise ValueError("compat_key must be a non-empty string")
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        spec = _tensor_spec(tensors)
        if isinstance(entities, (str, bytes)):  # would silently become one entity per character
            raise ValueError("entities must be a list of strings, e.g. ['a golden retriever'], not one string")
        entities = [str(e) for e in entities]
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if not entities:
            raise ValueError("an entry needs at least one entity to be found by")
        if embeddings.ndim != 2 or embeddings.shape[0] != len(entities):
            raise ValueError(f"embeddings must be [{len(entities)}, dim], got {list(embeddings.shape)}")
        if not np.isfinite(embeddings).all():
            raise ValueError("embeddings contain NaN or Inf")
        if self.dim is not None and embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings are {embeddings.shape[1]}-d but the store holds {self.dim}-d vectors")
        info_json = json.dumps(dict(info or {}), sort_keys=True, default=str)

        blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                    metadata={"compat_key": compat_key[:512]})
        nbytes = len(blob)
        self._budget_for(nbytes)  # fail before writing anything; checked again under the writer lock
        import hashlib

        digest = hashlib.sha256(blob).hexdigest()
        name = f"{uuid.uuid4().hex}.safetensors"
        final = self.path / "latents" / name
        tmp = final.with_name(name + f".tmp{os.getpid()}")
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed; open it again")
            if self.dim is None:
                self._init_dim(embeddings.shape[1])
            self.sync()
            try:
                with open(tmp, "wb") as handle:
                    handle.write(blob)
                    handle.flush()
                    if self.config.durable:
                        os.fsync(handle.fileno())
                os.replace(tmp, final)
                if self.config.durable:
                    fsync_path(final.parent)
            except OSError as exc:  # read-only mount, disk full, permissions
                for p in (tmp, final):
                    try:
                        p.unlink(missing_ok=True)
                    except OSError:
                        pass
                raise StoreError(
                    f"could not write a latent file in {final.parent} ({exc.strerror or exc}); the store folder "
                    "must be writable and have free space: free some space, lower the budget, or use another folder"
                ) from exc
            now = time.time()
            victims: list[tuple[int, str, int]] = []
            try:
                with self._tx() as c:
                    row = c.execute("SELECT tensor_spec FROM partitions WHERE compat_key=?", (compat_key,)).fetchone()
                    if row is None:
                        c.execute("INSERT INTO partitions(compat_key, tensor_spec) VALUES(?,?)",
                                  (compat_key, json.dumps(spec)))
                    elif json.loads(row[0]) != spec:
                        raise ValueError(
                            f"entry tensors {spec} differ from those already stored under this key "
                            f"{json.loads(row[0])}; the compatibility key must include the latent shape and dtype"
                        )
                    generation = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]) + 1
                    budget = self._budget_for(nbytes, c)  # under the writer lock: no other writer can change it now
                    held = _bytes_held(c)
                    victims = self._pick_victims(c, held + nbytes - budget)
                    self._delete_rows(c, victims, generation, reason="budget")
                    cur = c.execute(
                        "INSERT INTO entries(compat_key, prompt, file, nbytes, sha256, created_at, last_access,"
                        " access_count, info) VALUES(?,?,?,?,?,?,?,0,?)",
                        (compat_key, prompt, name, nbytes, digest, now, now, info_json),
                    )
                    entry_id = int(cur.lastrowid)
                    labels = []
                    for text, vec in zip(entities, embeddings):
                        cur = c.execute("INSERT INTO entities(entry_id, compat_key, text, embedding) VALUES(?,?,?,?)",
                                        (entry_id, compat_key, text, vec.astype(np.float32).tobytes()))
                        labels.append(int(cur.lastrowid))
                    c.execute("UPDATE meta SET value=? WHERE key='generation'", (str(generation),))
                    c.execute("UPDATE counters SET value=value+1 WHERE name='inserts'")
                    if victims:
                        c.execute("UPDATE counters SET value=value+? WHERE name='evictions'", (len(victims),))
            except sqlite3.OperationalError as exc:  # read-only, disk full, or locked past the timeout
                final.unlink(missing_ok=True)
                raise StoreError(
                    f"could not write the manifest {self.path / 'manifest.sqlite'} ({exc}); the store folder must "
                    "be writable and have free space, and no other process may hold it locked for minutes"
                ) from exc
            except BaseException:
                final.unlink(missing_ok=True)
                raise
            for _vid, vfile, _ in victims:
                (self.path / "latents" / vfile).unlink(missing_ok=True)
            # Index last: the manifest already holds the truth if we die here.
            self.sync()
            self._changes_since_save += 1 + len(victims)
            try:
                self._maybe_compact_and_save()
            except (OSError, sqlite3.Error) as exc:
                # The entry is committed and the index is derived data (the next open catches it
                # up from the manifest): report the failed save rather than fail a finished insert.
                self._report_index_save_failure(exc)
        return entry_id

    def _report_index_save_failure(self, exc: BaseException) -> None:
        log.warning("CHAI store %s: could not save the index (%s); it will be rebuilt from the manifest",
                    self.path, exc)
        try:
            with self._tx() as c:
                c.execute("INSERT INTO events(time, kind, detail) VALUES(?,?,?)",
                          (time.time(), "index_save_failed", f"{exc}; the next open rebuilds it from the manifest"))
        except sqlite3.Error:
            pass  # the manifest is not writable either: the warning above is all we can do

    def _init_dim(self, dim: int) -> None:
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key='dim'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES('dim', ?)", (str(int(dim)),))
        self._reload_dim()

    def _pick_victims(self, c, excess: int) -> list[tuple[int, str, int]]:
        if excess <= 0:
            return []
        victims, freed = [], 0
        for entry_id, file, nbytes in c.execute(
            f"SELECT id, file, nbytes FROM entries ORDER BY {self.config.policy.order_by}"
        ):
            victims.append((int(entry_id), file, int(nbytes)))
            freed += int(nbytes)
            if freed >= excess:
                break
        return victims

    def _delete_rows(self, c, victims: Iterable[tuple[int, str, int]], generation: int, reason: str) -> None:
        for entry_id, _file, _ in victims:
            for label, key in c.execute("SELECT label, compat_key FROM entities WHERE entry_id=?",
                                        (entry_id,)).fetchall():
                c.execute("INSERT OR REPLACE INTO deleted_labels VALUES(?,?,?)", (label, key, generation))
            c.execute("DELETE FROM entities WHERE entry_id=?", (entry_id,))
            c.execute("DELETE FROM entries WHERE id=?", (entry_id,))

    def _evict_to(self, budget: int) -> int:
        with self._lock:
            with self._tx() as c:
                held = _bytes_held(c)
                victims = self._pick_victims(c, held - budget)
                if not victims:
                    return 0
                generation = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]) + 1
                self._delete_rows(c, victims, generation, reason="budget")
                c.execute("UPDATE meta SET value=? WHERE key='generation'", (str(generation),))
                c.execute("UPDATE counters SET value=value+? WHERE name='evictions'", (len(victims),))
            for _vid, vfile, _ in victims:
                (self.path / "latents" / vfile).unlink(missing_ok=True)
            self.sync()
            self._changes_since_save += len(victims)
            return len(victims)

    def set_budget(self, budget_bytes: int) -> int:
        """Change the byte budget (persisted) and evict down to it.

        Returns:
            The number of entries evicted.

        Raises:
            ValueError: budget <= 0.
        """
        _validate_budget(budget_bytes)
        self.config = _replace(self.config, budget_bytes=int(budget_bytes))
        with self._tx() as c:
            c.execute("UPDATE meta SET value=? WHERE key='budget_bytes'", (str(int(budget_bytes)),))
        return self._evict_to(int(budget_bytes))

    def delete(self, entry_ids: Sequence[int], reason: str = "deleted") -> int:
        """Remove entries (file, rows and vectors). Unknown ids are ignored.

        Returns:
            The number of entries removed.
        """
        with self._lock:
            with self._tx() as c:
                victims = []
                for entry_id in entry_ids:
                    row = c.execute("SELECT id, file, nbytes FROM entries WHERE id=?", (int(entry_id),)).fetchone()
                    if row:
                        victims.append((int(row[0]), row[1], int(row[2])))
                if not victims:
                    return 0
                generation = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]) + 1
                self._delete_rows(c, victims, generation, reason=reason)
                c.execute("UPDATE meta SET value=? WHERE key='generation'", (str(generation),))
            for _vid, vfile, _ in victims:
                (self.path / "latents" / vfile).unlink(missing_ok=True)
            self.sync()
            self._changes_since_save += len(victims)
            return len(victims)

    def _maybe_compact_and_save(self) -> None:
        for key in self.index.keys():
            if self.index.needs_compaction(key):
                self._compact_partition(key)
        # Saving rewrites whole partitions (O(index size)); catching up on reopen costs O(changes).
        # So the interval grows with the index: at most ~5% of it is replayed on reopen, and a
        # stream of inserts costs O(n) saving in total instead of O(n^2).
        live = len(self.index)
        if self._changes_since_save >= max(self.config.autosave_every, live // 20):
            for key in self.index.keys():
                self._save_partition(key)
            self._changes_since_save = 0

    def _compact_partition(self, key: str) -> None:
        labels, vectors = self._manifest_vectors(key)
        self.index.rebuild(key, labels, vectors)
        self._save_partition(key)

    def compact(self) -> dict:
        """Rebuild every index partition without tombstones and save it; checkpoint the WAL.

        Returns:
            {"partitions": n, "tombstones_removed": n, "vectors": n}.
        """
        removed = vectors = 0
        with self._lock:
            self.sync()
            keys = self.index.keys() if self.index else []
            for key in keys:
                removed += self.index.tombstones(key)
                self._compact_partition(key)
                vectors += len(self.index.labels(key))
            with self._tx() as c:
                c.execute("DELETE FROM deleted_labels WHERE generation<=?", (self._synced_generation,))
                _note_pruned(c, self._synced_generation)
            self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._changes_since_save = 0
        return {"partitions": len(keys), "tombstones_removed": removed, "vectors": vectors}

    # ------------------------------------------------------------------ reads
    def search(self, vectors: np.ndarray, compat_key: str, k: int = 8) -> list[EntityMatch]:
        """k-NN of each query vector among entities of ``compat_key``, confirmed by the manifest.

        Index candidates whose row no longer exists (evicted by another process, or a stale index)
        are dropped from the in-memory index (a repair) and not returned.

        Args:
            vectors: [m, dim] float32 query embeddings.
            compat_key: only entries stored under this key are candidates.
            k: neighbours per query vector.

        Returns:
            Matches sorted by similarity descending (several per query vector possible).
        """
        self.sync()
        if self.index is None:
            return []
        labels, sims = self.index.query(vectors, k, compat_key)
        if labels.size == 0:
            return []
        flat = sorted(set(int(x) for x in labels.reshape(-1)))
        rows = {}
        conn = self._conn()
        for start in range(0, len(flat), 500):
            chunk = flat[start:start + 500]
            q = f"SELECT label, entry_id, text FROM entities WHERE compat_key=? AND label IN ({','.join('?' * len(chunk))})"
            for label, entry_id, text in conn.execute(q, (compat_key, *chunk)):
                rows[int(label)] = (int(entry_id), text)
        stale = [label for label in flat if label not in rows]
        if stale:
            self.index.delete(stale, compat_key)
        matches = []
        for qi in range(labels.shape[0]):
            for label, sim in zip(labels[qi].tolist(), sims[qi].tolist()):
                if label in rows:
                    entry_id, text = rows[label]
                    matches.append(EntityMatch(label, entry_id, text, float(sim), qi))
        matches.sort(key=lambda m: -m.similarity)
        return matches

    def load(self, entry_id: int, device: str = "cpu") -> dict | None:
        """Read an entry's latents after checking the file's size and SHA-256 against the manifest.

        A missing, truncated or corrupt file is quarantined (moved to ``quarantine/``), its rows
        removed and the event reported; ``None`` is returned so the caller treats it as a miss.

        Returns:
            name -> torch tensor (dtype as stored), or None when the entry is gone or invalid.
        """
        import hashlib

        from safetensors.torch import load as load_bytes

        row = self._conn().execute("SELECT file, nbytes, sha256 FROM entries WHERE id=?", (int(entry_id),)).fetchone()
        if row is None:
            return None
        file, nbytes, digest = row
        path = self.path / "latents" / file
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            self._quarantine(int(entry_id), file, "latent file is missing")
            return None
        if len(blob) != nbytes:
            self._quarantine(int(entry_id), file, f"latent file is {len(blob)} bytes, the manifest recorded {nbytes}")
            return None
        if hashlib.sha256(blob).hexdigest() != digest:
            self._quarantine(int(entry_id), file, "latent file does not match its recorded SHA-256")
            return None
        try:
            tensors = load_bytes(blob)
        except Exception as exc:  # safetensors raises SafetensorError on a malformed header
            self._quarantine(int(entry_id), file, f"latent file is not valid safetensors ({exc})")
            return None
        if device != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return tensors

    def _quarantine(self, entry_id: int, file: str, reason: str) -> None:
        with self._lock:
            # Rows first, then the file (the eviction order): a crash in between leaves a stray
            # file, which the next open removes, never a row whose file is missing.
            with self._tx() as c:
                row = c.execute("SELECT id, file, nbytes FROM entries WHERE id=?", (entry_id,)).fetchone()
                if row is None:
                    return
                generation = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]) + 1
                self._delete_rows(c, [(int(row[0]), row[1], int(row[2]))], generation, reason="quarantine")
                c.execute("UPDATE meta SET value=? WHERE key='generation'", (str(generation),))
                c.execute("UPDATE counters SET value=value+1 WHERE name='quarantined'")
                c.execute("UPDATE counters SET value=value+1 WHERE name='repairs'")
                self._event(c, "quarantined", f"entry {entry_id} ({file}): {reason}")
            src = self.path / "latents" / file
            if src.exists():
                os.replace(src, self.path / "quarantine" / file)
            self.sync()

    def entry(self, entry_id: int) -> EntryRecord | None:
        """The manifest record of one entry, or None."""
        conn = self._conn()
        row = conn.execute("SELECT id, compat_key, prompt, nbytes, created_at, last_access, access_count, info "
                           "FROM entries WHERE id=?", (int(entry_id),)).fetchone()
        if row is None:
            return None
        ents = [r[0] for r in conn.execute("SELECT text FROM entities WHERE entry_id=? ORDER BY label", (row[0],))]
        return EntryRecord(int(row[0]), row[1], row[2], ents, int(row[3]), float(row[4]), float(row[5]),
                           int(row[6]), json.loads(row[7]))

    def entries(self) -> list[EntryRecord]:
        """Every entry, oldest first."""
        ids = [r[0] for r in self._conn().execute("SELECT id FROM entries ORDER BY id")]
        return [rec for rec in (self.entry(i) for i in ids) if rec is not None]

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    @property
    def generation(self) -> int:
        """Manifest generation: changes whenever an entry is inserted, evicted or removed."""
        return self._generation()

    def record_lookup(self, prompt: str, query_entities: Sequence[str], hit_entry: int | None,
                      entity: str | None, matched: str | None, similarity: float | None, ms: float) -> None:
        """Count one lookup: hit/miss counters, entity frequencies, the lookup log, and the
        served entry's recency/frequency (what LRU and LFU order by). One transaction."""
        now = time.time()
        with self._tx() as c:
            c.execute("UPDATE counters SET value=value+1 WHERE name='lookups'")
            c.execute("UPDATE counters SET value=value+1 WHERE name=?", ("hits" if hit_entry is not None else "misses",))
            c.execute("UPDATE counters SET value=value+? WHERE name='lookup_ms_sum'", (float(ms),))
            for text in dict.fromkeys(query_entities):
                c.execute("INSERT INTO entity_counts VALUES(?,1) ON CONFLICT(text) DO UPDATE SET count=count+1",
                          (text,))
            cur = c.execute("INSERT INTO lookup_log(time, prompt, hit, entity, matched, similarity, ms) "
                            "VALUES(?,?,?,?,?,?,?)",
                            (now, prompt[:500], int(hit_entry is not None), entity, matched, similarity, float(ms)))
            if cur.lastrowid % 100 == 0:
                c.execute("DELETE FROM lookup_log WHERE id<=?", (cur.lastrowid - LOOKUP_LOG_KEEP,))
            if hit_entry is not None:
                c.execute("UPDATE entries SET last_access=?, access_count=access_count+1 WHERE id=?",
                          (now, int(hit_entry)))

    def stats(self, last: int = 10) -> StoreStats:
        """Counters, sizes and recent lookups (see :class:`StoreStats`)."""
        stats = _read_stats(self._conn(), last)
        self._adopt_config(stats.budget_bytes, stats.policy)
        return stats

    def events(self, limit: int = 50) -> list[dict]:
        """The newest repair / quarantine events: dicts with time, kind, detail."""
        return [dict(zip(("time", "kind", "detail"), r)) for r in self._conn().execute(
            "SELECT time, kind, detail FROM events ORDER BY id DESC LIMIT ?", (int(limit),))]

    # ------------------------------------------------------------------ verify
    def verify(self, full: bool = True) -> VerifyReport:
        """Check the whole store and repair what is wrong.

        Checks every entry's file (exists, size, SHA-256 and safetensors header when ``full``),
        removes rows without a file and files without a row, and compares each index partition's
        live labels with the manifest (rebuilding it on any difference).

        Returns:
            A :class:`VerifyReport`; ``report.ok`` is True when nothing needed repair.
        """
        import hashlib

        from safetensors import safe_open

        report = VerifyReport()
        with self._lock:
            self.sync()
            conn = self._conn()
            rows = conn.execute("SELECT id, file, nbytes, sha256 FROM entries ORDER BY id").fetchall()
            report.entries_checked = len(rows)
            for entry_id, file, nbytes, digest in rows:
                path = self.path / "latents" / file
                problem = None
                if not path.is_file():
                    problem = "latent file is missing"
                elif path.stat().st_size != nbytes:
                    problem = f"latent file is {path.stat().st_size} bytes, the manifest recorded {nbytes}"
                elif full:
                    data = path.read_bytes()
                    if hashlib.sha256(data).hexdigest() != digest:
                        problem = "latent file does not match its recorded SHA-256"
                    else:
                        try:
                            with safe_open(str(path), framework="pt") as handle:
                                list(handle.keys())
                        except Exception as exc:
                            problem = f"latent file is not valid safetensors ({exc})"
                if problem:
                    report.problems.append(f"entry {entry_id}: {problem}")
                    if path.exists():
                        report.files_quarantined.append(file)
                    else:
                        report.rows_removed += 1
                    self._quarantine(int(entry_id), file, problem)
            known = set(r[0] for r in conn.execute("SELECT file FROM entries"))
            for p in (self.path / "latents").iterdir():
                if p.name not in known:
                    report.problems.append(f"stray file latents/{p.name}")
                    report.orphans_removed.append(p.name)
                    p.unlink(missing_ok=True)
            if self.index is not None:
                keys = set(r[0] for r in conn.execute("SELECT DISTINCT compat_key FROM entities"))
                for key in keys | set(self.index.keys()):
                    want = set(r[0] for r in conn.execute("SELECT label FROM entities WHERE compat_key=?", (key,)))
                    have = self.index.labels(key)
                    if want != have:
                        report.problems.append(f"index partition {partition_file_name(key)} has {len(have)} "
                                               f"vectors, the manifest {len(want)}")
                        report.partitions_rebuilt.append(partition_file_name(key))
                        self._rebuild_partition(key, "verify found a mismatch")
                # The saved files must also load and match, or the next open would rebuild.
                recorded = {r[0]: r for r in conn.execute(
                    "SELECT compat_key, index_sha256, index_size FROM partitions")}
                for key in keys:
                    rec = recorded.get(key)
                    path = self.path / "index" / partition_file_name(key)
                    if rec is None or rec[1] is None or not path.is_file() or path.stat().st_size != rec[2] \
                            or file_sha256(path) != rec[1]:
                        self._save_partition(key)
        return report

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Save the index if it changed and close every SQLite connection. Idempotent."""
        if self._closed:
            return
        try:
            if self.index is not None and self._changes_since_save:
                self.save_index()
        finally:
            self._closed = True
            with self._conns_lock:
                for conn in self._conns:
                    try:
                        conn.close()
                    except sqlite3.Error:
                        pass
                self._conns.clear()
            self._local = threading.local()

    def __enter__(self) -> "LatentStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ StoreBackend members (cache/backend.py)
    @property
    def location(self) -> str:
        """The store folder as a resolved path string (the location it was opened from)."""
        return str(self.path)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    @property
    def budget_bytes(self) -> int:
        """The persisted byte budget (adopted: another process may have changed it)."""
        rows = dict(self._conn().execute(
            "SELECT key, value FROM meta WHERE key IN ('budget_bytes', 'policy')").fetchall())
        self._adopt_config(int(rows["budget_bytes"]), rows["policy"])
        return self.config.budget_bytes

    @property
    def policy(self) -> str:
        """The persisted eviction policy, ``"lru"``, ``"lfu"`` or ``"fifo"``."""
        return EvictionPolicy.parse(self._conn().execute(
            "SELECT value FROM meta WHERE key='policy'").fetchone()[0]).value

    def set_policy(self, policy: str | EvictionPolicy) -> None:
        """Persist a new eviction policy; every process's next eviction follows it. Raises ValueError."""
        parsed = EvictionPolicy.parse(policy)
        with self._tx() as c:
            c.execute("UPDATE meta SET value=? WHERE key='policy'", (parsed.value,))
        self.config = _replace(self.config, policy=parsed)

    def compat_keys(self) -> list[str]:
        """The distinct compatibility keys that hold entries, sorted."""
        return [r[0] for r in self._conn().execute("SELECT DISTINCT compat_key FROM entries ORDER BY compat_key")]

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """True when the folder ``path`` holds a store (its manifest); nothing is created or opened."""
        return (Path(path).expanduser() / "manifest.sqlite").is_file()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection; rolls back on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> "_Transaction":
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def execute(self, sql: str, params: Sequence = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executescript_in_tx(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self.conn.execute(statement)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (disk full, I/O error) can leave the transaction open, and every
                # later BEGIN on this connection would then fail: end it before re-raising.
                if self.conn.in_transaction:
                    try:
                        self.conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise
        else:
            self.conn.execute("ROLLBACK")


def _read_stats(conn: sqlite3.Connection, last: int = 10) -> StoreStats:
    """:class:`StoreStats` from a manifest connection (read-only queries)."""
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    entries, held = conn.execute("SELECT COUNT(*), COALESCE(SUM(nbytes),0) FROM entries").fetchone()
    n_entities = conn.execute("SELECT COUNT(*) FROM entities").fetchone()[0]
    ms = [r[0] for r in conn.execute(f"SELECT ms FROM lookup_log ORDER BY id DESC LIMIT {LOOKUP_LOG_KEEP}")]
    top = [(t, int(n)) for t, n in conn.execute(
        "SELECT text, count FROM entity_counts ORDER BY count DESC, text ASC LIMIT 10")]
    recent = [dict(zip(("time", "prompt", "hit", "entity", "matched", "similarity", "ms"), r)) for r in conn.execute(
        "SELECT time, prompt, hit, entity, matched, similarity, ms FROM lookup_log ORDER BY id DESC LIMIT ?",
        (int(last),))]
    for r in recent:
        r["hit"] = bool(r["hit"])
    lookups = int(counters.get("lookups", 0))
    return StoreStats(
        entries=int(entries), entities=int(n_entities), bytes=int(held), budget_bytes=int(meta["budget_bytes"]),
        hits=int(counters.get("hits", 0)), misses=int(counters.get("misses", 0)), lookups=lookups,
        evictions=int(counters.get("evictions", 0)), inserts=int(counters.get("inserts", 0)),
        repairs=int(counters.get("repairs", 0)), quarantined=int(counters.get("quarantined", 0)),
        hit_rate=(counters.get("hits", 0) / lookups) if lookups else 0.0,
        lookup_ms_mean=float(np.mean(ms)) if ms else 0.0,
        lookup_ms_p50=float(np.percentile(ms, 50)) if ms else 0.0,
        lookup_ms_p99=float(np.percentile(ms, 99)) if ms else 0.0,
        top_entities=top, last_lookups=recent, generation=int(meta["generation"]),
        policy=EvictionPolicy.parse(meta["policy"]).value,
    )


def read_stats(path: str | os.PathLike, last: int = 10) -> StoreStats:
    """Statistics of a store without opening it for writing: for folders on read-only mounts, or
    stores another user owns. Nothing is repaired or locked and no store file is written (SQLite
    may add its -shm side file where the folder allows); a store being written at the same moment
    may show a state one insert old.

    Args:
        path: the store folder (holding ``manifest.sqlite``).
        last: how many recent lookups to include.

    Returns:
        :class:`StoreStats`, the same fields :meth:`LatentStore.stats` gives.

    Raises:
        StoreError: no readable manifest in ``path`` or a manifest of another schema version.
    """
    manifest = Path(path).expanduser().resolve() / "manifest.sqlite"
    if not manifest.is_file():
        raise StoreError(f"{manifest.parent} is not a CHAI store (no manifest.sqlite in it)")
    last_exc: Exception | None = None
    # mode=ro needs the WAL's shared-memory file to exist or be creatable; immutable=1 reads a
    # folder nobody can write (a read-only mount) straight from the database file.
    for query in ("mode=ro", "immutable=1"):
        try:
            conn = sqlite3.connect(f"{manifest.as_uri()}?{query}", uri=True, timeout=10.0)
            try:
                version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                _check_schema(version[0] if version else None)
                return _read_stats(conn, last)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            last_exc = exc
    raise StoreError(f"cannot read {manifest} ({last_exc}); it is not a CHAI manifest or it is damaged")


def _check_schema(version: str | None) -> None:
    """Raise StoreError unless the manifest's ``schema_version`` (text, None when missing) is ours."""
    if int(version or 0) != SCHEMA_VERSION:
        raise StoreError(f"store schema version {version} is not {SCHEMA_VERSION}; "
                         "open it with the pack version that created it or start a new store")


def _note_pruned(c, upto: int) -> None:
    """Record that deletion-log rows up to generation ``upto`` are gone, so a process whose index
    is older than that knows it must reconcile with the manifest instead of replaying the log."""
    row = c.execute("SELECT value FROM meta WHERE key='deleted_pruned_upto'").fetchone()
    if row is None or int(row[0]) < upto:
        c.execute("INSERT OR REPLACE INTO meta VALUES('deleted_pruned_upto', ?)", (str(int(upto)),))


def _bytes_held(c) -> int:
    """Latent bytes the manifest holds (the trigger-kept counter; see ``_BYTES_TRIGGERS``)."""
    return int(c.execute("SELECT value FROM counters WHERE name='bytes_held'").fetchone()[0])


def _validate_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ValueError(f"budget must be a positive number of bytes, got {budget!r}")


def _replace(cfg: StoreConfig, **changes) -> StoreConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def _tensor_spec(tensors: Mapping[str, object]) -> dict:
    """Validate latent tensors and describe them: {name: [dtype, shape]}."""
    import torch

    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("tensors must be a non-empty mapping of name -> torch.Tensor")
    spec = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError("tensor names must be non-empty strings")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"tensor {name!r} is a {type(value).__name__}, expected a torch.Tensor")
        dtype = str(value.dtype).replace("torch.", "")
        if dtype not in ALLOWED_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}; latents must be one of {', '.join(ALLOWED_DTYPES)}")
        if value.numel() == 0 or value.dim() == 0:
            raise ValueError(f"tensor {name!r} has shape {list(value.shape)}; latents must be non-empty arrays")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"tensor {name!r} contains NaN or Inf; refusing to cache a diverged latent")
        spec[name] = [dtype, list(value.shape)]
    return dict(sorted(spec.items()))

