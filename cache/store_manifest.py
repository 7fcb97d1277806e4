"""The manifest: the store's SQLite database (schema, connections, transactions, upgrade, checks).

The manifest is the truth of a store: entries, entities with their embeddings, partitions and
their index checksums, counters, the lookup log and repair events. This module owns everything
about the database itself:

* connections: one per thread, WAL, ``trusted_schema`` off (a crafted schema cannot run functions
  with side effects), ``cell_size_check`` on, text that is not UTF-8 read with replacement;
* recognising a manifest without altering it (:func:`probe_manifest`: SQLite ``immutable``, which
  opens no side file), so another application's ``manifest.sqlite`` is never touched;
* creating the schema (format 3) and upgrading a format-1 or format-2 manifest in place, every
  entry kept;
* checking the schema, the ``meta`` values and every row before the store trusts them
  (:meth:`Manifest.validate`, :meth:`Manifest.invalid_entries`, :meth:`Manifest.invalid_entities`);
* turning SQLite errors into :class:`StoreError` messages that say what happened (disk full with
  the bytes free, read-only, locked, damaged).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .policy import EvictionPolicy
from .store_files import MANIFEST_NAME
from .store_types import (
    ALLOWED_DTYPES,
    MAX_BUDGET_BYTES,
    MAX_ENTRY_BYTES,
    ContainmentError,
    DiskFullError,
    StoreError,
    StoreStats,
)

__all__ = [
    "SCHEMA_VERSION",
    "Manifest",
    "ManifestInfo",
    "probe_manifest",
    "schema_version",
    "MANIFEST_SIDE_FILES",
    "connect_read_only",
    "read_stats_from",
    "sqlite_store_error",
    "parse_tensor_spec",
    "count_value",
    "LOOKUP_LOG_KEEP",
    "COUNTERS",
    "MAX_THUMBNAIL_BYTES",
    "check_thumbnail",
    "has_pins",
    "pinned_bytes",
]

SCHEMA_VERSION = 3
#: Cap on one entry's thumbnail (bytes): a JPEG or PNG of one frame is a few KB; anything larger is
#: never read (the length is checked in SQL before the blob leaves SQLite).
MAX_THUMBNAIL_BYTES = 32 * 1024
# What a thumbnail may start with: JPEG (SOI + marker) or PNG signature.
_THUMB_MAGIC_SQL = "(substr(thumbnail, 1, 3) = X'FFD8FF' OR substr(thumbnail, 1, 8) = X'89504E470D0A1A0A')"
LOOKUP_LOG_KEEP = 1000
COUNTERS = ("hits", "misses", "lookups", "evictions", "inserts", "repairs", "quarantined")
MANIFEST_SIDE_FILES = tuple(MANIFEST_NAME + s for s in ("", "-wal", "-shm", "-journal"))
_HEX32 = re.compile(r"^[0-9a-f]{32}$")

_TABLES = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    compat_key TEXT NOT NULL,
    prompt TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_access REAL NOT NULL,
    access_count INTEGER NOT NULL DEFAULT 0,
    info TEXT NOT NULL DEFAULT '{}',
    pinned INTEGER NOT NULL DEFAULT 0,
    thumbnail BLOB
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
    index_mac TEXT,
    index_size INTEGER,
    index_generation INTEGER,
    index_deleted TEXT
);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS entity_counts(text TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS lookup_log(
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, prompt TEXT NOT NULL,
    hit INTEGER NOT NULL, entity TEXT, matched TEXT, similarity REAL, ms REAL NOT NULL, entry_id INTEGER);
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""

# Latent bytes held, kept in counters('bytes_held') by SQLite itself on every row change of
# `entries`, so an insert reads it in O(1) instead of SUM(nbytes) over the table (about 20 ms at
# 100k entries, paid on every put). Trigger bodies contain ';', so they are not in _TABLES.
_BYTES_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS entries_bytes_insert AFTER INSERT ON entries BEGIN "
    "UPDATE counters SET value = value + NEW.nbytes WHERE name = 'bytes_held'; END",
    "CREATE TRIGGER IF NOT EXISTS entries_bytes_delete AFTER DELETE ON entries BEGIN "
    "UPDATE counters SET value = value - OLD.nbytes WHERE name = 'bytes_held'; END",
    "CREATE TRIGGER IF NOT EXISTS entries_bytes_update AFTER UPDATE OF nbytes ON entries BEGIN "
    "UPDATE counters SET value = value - OLD.nbytes + NEW.nbytes WHERE name = 'bytes_held'; END",
)

# Columns of every table, per format: a manifest is recognised as ours only when they match.
_COLUMNS_COMMON = {
    "meta": ["key", "value"],
    "entities": ["label", "entry_id", "compat_key", "text", "embedding"],
    "deleted_labels": ["label", "compat_key", "generation"],
    "counters": ["name", "value"],
    "entity_counts": ["text", "count"],
    "lookup_log": ["id", "time", "prompt", "hit", "entity", "matched", "similarity", "ms"],
    "events": ["id", "time", "kind", "detail"],
}
_COLUMNS = {
    1: {**_COLUMNS_COMMON,
        "entries": ["id", "compat_key", "prompt", "file", "nbytes", "sha256", "created_at", "last_access",
                    "access_count", "info"],
        "partitions": ["compat_key", "tensor_spec", "index_sha256", "index_size", "index_generation",
                       "index_deleted"]},
    2: {**_COLUMNS_COMMON,
        "entries": ["id", "compat_key", "prompt", "nbytes", "sha256", "created_at", "last_access", "access_count",
                    "info"],
        "partitions": ["compat_key", "tensor_spec", "index_mac", "index_size", "index_generation",
                       "index_deleted"]},
}
# Format 3 (issue 15): every entry may be pinned (never evicted) and may keep a small thumbnail; the
# lookup log names the entry a hit served (the panel shows its thumbnail).
_COLUMNS[3] = {**_COLUMNS[2], "entries": _COLUMNS[2]["entries"] + ["pinned", "thumbnail"],
               "lookup_log": _COLUMNS[2]["lookup_log"] + ["entry_id"]}
_INDEXES = {"entries_by_key", "entities_by_entry", "entities_by_key"}
_TRIGGERS = {"entries_bytes_insert", "entries_bytes_delete", "entries_bytes_update"}
_AUTOINDEX = re.compile(r"^sqlite_autoindex_(meta|entries|deleted_labels|partitions|counters|entity_counts)_[0-9]+$")


#: ``nbytes`` as the byte counters sum it: a row outside 1..MAX_ENTRY_BYTES (only a crafted manifest has
#: one; the open's repair removes it) counts 0, so the sums never overflow SQLite's 64-bit integers.
COUNTED_NBYTES = (f"CASE WHEN typeof(nbytes)='integer' AND nbytes BETWEEN 1 AND {MAX_ENTRY_BYTES} "
                  "THEN nbytes ELSE 0 END")


@dataclass
class ManifestInfo:
    """What :func:`probe_manifest` recognised: the format (1, 2 or 3) and, from format 2 on, the store id."""

    version: int
    store_id: str | None


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _harden(conn: sqlite3.Connection) -> None:
    """Settings for a database that may come from someone else (SQLite's "defensive" advice)."""
    conn.text_factory = _lenient_text
    conn.execute("PRAGMA trusted_schema=OFF")  # schema code cannot call functions with side effects
    conn.execute("PRAGMA cell_size_check=ON")  # detect corrupt b-tree pages before using them
    defensive = getattr(sqlite3, "SQLITE_DBCONFIG_DEFENSIVE", None)
    if defensive is not None and hasattr(conn, "setconfig"):
        conn.setconfig(defensive, True)  # Python 3.12+: no writes to the schema through PRAGMAs


def connect_read_only(manifest: Path, immutable: bool) -> sqlite3.Connection:
    """A hardened read-only connection. ``immutable`` reads the file alone (ignores a WAL, creates
    no side file: for folders that may not be ours or are on a read-only mount)."""
    query = "immutable=1" if immutable else "mode=ro"
    conn = sqlite3.connect(f"{Path(manifest).as_uri()}?{query}", uri=True, timeout=10.0, check_same_thread=False)
    try:
        _harden(conn)
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def schema_version(conn: sqlite3.Connection) -> int | None:
    """The format of a manifest (1, 2 or 3) when its tables, columns and objects are exactly ours, else None."""
    try:
        objects = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.Error:
        return None
    try:
        version = int(row[0]) if row else None
    except (TypeError, ValueError):
        return None
    if version not in _COLUMNS:
        return None
    tables = {n for t, n in objects if t == "table"}
    if tables - {"sqlite_sequence"} != set(_COLUMNS[version]):
        return None
    for kind, name in objects:
        if kind == "table":
            continue
        if kind == "index" and (name in _INDEXES or _AUTOINDEX.match(name)):
            continue
        if kind == "trigger" and name in _TRIGGERS:
            continue
        return None  # a view, or an index or trigger CHAI never creates
    for table, columns in _COLUMNS[version].items():
        got = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        if got != columns:
            return None
    return version


def probe_manifest(manifest: Path) -> ManifestInfo | None:
    """Recognise a CHAI manifest without writing anything (SQLite ``immutable``: the database file
    alone is read, no ``-wal``/``-shm`` is opened or created); None when it is not one.

    Args:
        manifest: path of a ``manifest.sqlite`` (already checked to be a regular file).
    """
    try:
        conn = connect_read_only(manifest, immutable=True)
    except sqlite3.Error:
        return None
    try:
        version = schema_version(conn)
        if version is None:
            return None
        row = conn.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
        return ManifestInfo(version, row[0] if row and isinstance(row[0], str) else None)
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def sqlite_store_error(exc: sqlite3.Error, folder: Path, doing: str) -> StoreError:
    """A :class:`StoreError` that says what a SQLite error means for the user (``doing``: e.g.
    "write the manifest"): disk full (with the bytes free), read-only, locked, or damaged."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc).lower()
    manifest = Path(folder) / MANIFEST_NAME
    free = _free_bytes(folder)
    if (primary == 13 or "disk is full" in text) and free > (256 << 20):
        # SQLITE_FULL with room to spare: the manifest's row ids are used up or it hit a page limit.
        return StoreError(f"could not {doing}: {manifest} reports it is full although the disk has {free:,} bytes "
                          "free (its row ids are used up: it was altered outside CHAI); move the store away and "
                          "start a new store folder")
    if primary == 13 or "disk is full" in text or (primary == 10 and 0 <= free < (1 << 20)):
        return DiskFullError(
            f"could not {doing}: the disk holding {folder} is full ({free:,} bytes free); free some space "
            "(or lower the store's budget) and run again: nothing already stored was lost", str(folder), free)
    if primary == 8 or "readonly" in text or "read-only" in text:
        return StoreError(f"could not {doing}: {manifest} is read-only; give a folder you can write to, or read its "
                          "statistics with `cache stats --read-only`")
    if primary in (5, 6) or "locked" in text:
        return StoreError(f"could not {doing}: {manifest} stayed locked by another process for over a minute; "
                          "close the other CHAI process (ComfyUI, the command line) and run again")
    if primary in (11, 26) or "not a database" in text or "malformed" in text:
        return StoreError(f"{manifest} is damaged ({exc}); the store cannot be used: move it away and start a "
                          "new store folder")
    return StoreError(f"could not {doing}: {manifest}: {exc}")


def _free_bytes(folder: Path) -> int:
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return -1


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection; rolls back on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> "_Transaction":
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def execute(self, sql: str, params: Sequence = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (disk full, I/O error) can leave the transaction open, and every
                # later BEGIN on this connection would then fail: end it before re-raising.
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass


class Manifest:
    """The manifest of one store folder: per-thread connections, transactions, schema, checks.

    Args:
        folder: the store folder (holds ``manifest.sqlite``).
        durable: ``synchronous=NORMAL`` (WAL: durable at checkpoints, never torn) or ``OFF``.

    Raises (of every method): :class:`StoreError` from :func:`sqlite_store_error` for SQLite errors
    the caller cannot handle, and ``sqlite3.Error`` where documented.
    """

    def __init__(self, folder: Path, durable: bool = True) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        self.durable = durable
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self.closed = False

    # ------------------------------------------------------------------ connections
    def conn(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.closed:
                raise StoreError("the store is closed; open it again")
            conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False)
            try:
                _harden(conn)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL" if self.durable else "PRAGMA synchronous=OFF")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA busy_timeout=60000")
            except sqlite3.Error:
                conn.close()
                raise
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def tx(self) -> _Transaction:
        """A write transaction (``BEGIN IMMEDIATE``) on this thread's connection."""
        return _Transaction(self.conn())

    def close(self) -> None:
        """Close every connection of every thread. Idempotent."""
        self.closed = True
        with self._conns_lock:
            for conn in self._conns:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._conns.clear()
        self._local = threading.local()

    # ------------------------------------------------------------------ schema
    def create(self, store_id: str, budget_bytes: int, policy: EvictionPolicy, dim: int | None,
               index_params: dict) -> None:
        """Create the format-3 schema and its ``meta`` rows in an empty database."""
        with self.tx() as c:
            for statement in _TABLES.split(";"):
                if statement.strip():
                    c.execute(statement)
            for statement in _BYTES_TRIGGERS:
                c.execute(statement)
            rows = {"schema_version": str(SCHEMA_VERSION), "store_id": store_id, "generation": "0",
                    "budget_bytes": str(int(budget_bytes)), "policy": EvictionPolicy.parse(policy).value,
                    "index_params": json.dumps(index_params)}
            if dim is not None:
                rows["dim"] = str(int(dim))
            c.execute("DELETE FROM meta")
            for key, value in rows.items():
                c.execute("INSERT INTO meta VALUES(?, ?)", (key, value))
            for name in COUNTERS + ("lookup_ms_sum", "bytes_held"):
                c.execute("INSERT OR IGNORE INTO counters VALUES(?, 0)", (name,))

    def is_empty(self) -> bool:
        """True when the database holds no table yet (a store whose creation was interrupted)."""
        return self.conn().execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0

    def upgrade_from_v1(self, store_id: str, kept: int, dropped: Sequence[tuple[int, str]]) -> None:
        """Turn a format-1 manifest into format 3 in one transaction (SQLite's table-rebuild
        procedure): ``entries`` loses its ``file`` column (latent files are named by entry id now;
        the caller renamed the ``kept`` entries' files first), ``partitions.index_sha256`` becomes
        ``index_mac`` (empty: old index files get the structural check once), ``lookup_log`` gains
        ``entry_id`` (NULL for the old lookups), and ``meta`` gets
        the store id. Entries in ``dropped`` ((id, reason): their file name was not one format 1
        writes, or their file is gone) are removed with an event."""
        conn = self.conn()
        conn.execute("PRAGMA foreign_keys=OFF")  # the rebuild must not cascade into entities
        try:
            with self.tx() as c:
                generation = int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
                if dropped:
                    generation += 1
                    for entry_id, reason in dropped:
                        for (label, key) in c.execute("SELECT label, compat_key FROM entities WHERE entry_id=?",
                                                      (entry_id,)).fetchall():
                            c.execute("INSERT OR REPLACE INTO deleted_labels VALUES(?,?,?)", (label, key, generation))
                        c.execute("DELETE FROM entities WHERE entry_id=?", (entry_id,))
                        c.execute("DELETE FROM entries WHERE id=?", (entry_id,))
                        c.execute("INSERT INTO events(time, kind, detail) VALUES(?,?,?)",
                                  (time.time(), "upgrade_dropped", f"entry {entry_id}: {reason}"))
                row = c.execute("SELECT seq FROM sqlite_sequence WHERE name='entries'").fetchone()
                last_id = _int_or(row[0] if row else 0, 0)  # ids are never reused, evicted ones included
                for trigger in _TRIGGERS:
                    c.execute(f"DROP TRIGGER IF EXISTS {trigger}")
                c.execute("CREATE TABLE entries_v2(id INTEGER PRIMARY KEY AUTOINCREMENT, compat_key TEXT NOT NULL, "
                          "prompt TEXT NOT NULL, nbytes INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at REAL NOT NULL, "
                          "last_access REAL NOT NULL, access_count INTEGER NOT NULL DEFAULT 0, "
                          "info TEXT NOT NULL DEFAULT '{}', pinned INTEGER NOT NULL DEFAULT 0, thumbnail BLOB)")
                c.execute("INSERT INTO entries_v2(id, compat_key, prompt, nbytes, sha256, created_at, last_access, "
                          "access_count, info) SELECT id, compat_key, prompt, nbytes, sha256, created_at, last_access, "
                          "access_count, info FROM entries")
                c.execute("DROP TABLE entries")
                c.execute("ALTER TABLE entries_v2 RENAME TO entries")
                c.execute("CREATE INDEX IF NOT EXISTS entries_by_key ON entries(compat_key)")
                c.execute("ALTER TABLE partitions RENAME COLUMN index_sha256 TO index_mac")
                c.execute("ALTER TABLE lookup_log ADD COLUMN entry_id INTEGER")
                c.execute("UPDATE partitions SET index_mac=NULL")
                c.execute("DELETE FROM sqlite_sequence WHERE name='entries'")
                c.execute("INSERT INTO sqlite_sequence(name, seq) VALUES('entries', "
                          "MAX(?, (SELECT COALESCE(MAX(id), 0) FROM entries)))", (last_id,))
                for statement in _BYTES_TRIGGERS:
                    c.execute(statement)
                c.execute("INSERT OR REPLACE INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
                c.execute("INSERT OR REPLACE INTO meta VALUES('store_id', ?)", (store_id,))
                c.execute("INSERT OR REPLACE INTO meta VALUES('generation', ?)", (str(generation + 1),))
                c.execute("INSERT OR REPLACE INTO meta VALUES('upgraded_from', '1')")
                for name in COUNTERS + ("lookup_ms_sum", "bytes_held"):
                    c.execute("INSERT OR IGNORE INTO counters VALUES(?, 0)", (name,))
                c.execute("INSERT INTO events(time, kind, detail) VALUES(?,?,?)",
                          (time.time(), "upgraded", f"format 1 -> {SCHEMA_VERSION}: {kept} entries kept, "
                                                    f"{len(dropped)} dropped"))
                bad = c.execute("PRAGMA foreign_key_check").fetchall()
                if bad:
                    raise StoreError(f"upgrade of {self.path} left {len(bad)} entity rows without their entry; "
                                     "nothing was changed")
        finally:
            conn.execute("PRAGMA foreign_keys=ON")

    def upgrade_from_v2(self) -> None:
        """Turn a format-2 manifest into format 3 in place, in one transaction: ``entries`` gains
        ``pinned`` (0: nothing is pinned) and ``thumbnail`` (NULL: none kept), ``lookup_log`` gains
        ``entry_id`` (NULL for the lookups logged before: format 2 did not say). Every row, counter
        and index checksum stays as it was; an event records the upgrade. A manifest already at
        format 3 is left alone (another process upgraded it first)."""
        with self.tx() as c:
            if schema_version(c.conn) == SCHEMA_VERSION:
                return
            c.execute("ALTER TABLE entries ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0")
            c.execute("ALTER TABLE entries ADD COLUMN thumbnail BLOB")
            c.execute("ALTER TABLE lookup_log ADD COLUMN entry_id INTEGER")
            c.execute("INSERT OR REPLACE INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
            count = c.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            c.execute("INSERT INTO events(time, kind, detail) VALUES(?,?,?)",
                      (time.time(), "upgraded", f"format 2 -> {SCHEMA_VERSION}: {count} entries kept"))

    def clear_invalid_thumbnails(self) -> int:
        """Drop thumbnails CHAI could not have written (not a blob, empty, over
        :data:`MAX_THUMBNAIL_BYTES`, or not starting like a JPEG or PNG) and pinned flags other
        than 0/1 (set to 0). The entry itself is kept: a thumbnail is only a picture of it. One
        scan of ``entries``; SQLite's ``length`` reads a blob's size from the row header, so no
        oversized blob is loaded. Returns how many rows were repaired."""
        with self.tx() as c:
            fixed = c.execute(
                "UPDATE entries SET thumbnail=NULL WHERE thumbnail IS NOT NULL AND (typeof(thumbnail)!='blob' "
                f"OR length(thumbnail)<8 OR length(thumbnail)>? OR NOT {_THUMB_MAGIC_SQL})",
                (MAX_THUMBNAIL_BYTES,)).rowcount
            fixed += c.execute("UPDATE entries SET pinned=0 WHERE typeof(pinned)!='integer' OR pinned NOT IN (0, 1)"
                               ).rowcount
        return fixed

    def validate(self, store_id: str | None) -> dict:
        """Check that this is a format-3 CHAI manifest of store ``store_id`` and parse ``meta``.

        Returns:
            meta as typed values: schema_version, store_id, generation, budget_bytes, policy
            (EvictionPolicy), dim (int or None), index_params (dict), upgraded_from (int or None).

        Raises:
            ContainmentError: not our schema, or another store's id.
            StoreError: a ``meta`` value CHAI never writes (the message names it).
        """
        conn = self.conn()
        version = schema_version(conn)
        if version != SCHEMA_VERSION:
            raise ContainmentError(
                f"{self.path} is not a CHAI manifest of format {SCHEMA_VERSION} (tables, columns or objects differ); "
                "it was not made by this release or was altered: open a new store folder")
        meta = parse_meta(dict(conn.execute("SELECT key, value FROM meta").fetchall()), self.path)
        if store_id is not None and meta["store_id"] != store_id:
            raise ContainmentError(f"{self.path} belongs to store {meta['store_id']}, but the folder's marker names "
                                   f"store {store_id}; a manifest was copied between stores: open a new store folder")
        return meta

    def invalid_entries(self) -> list[tuple[int, str]]:
        """Entries whose rows CHAI could not have written, as (entry id, reason): an id below 1, a
        size outside 1..MAX_ENTRY_BYTES (a negative one would also bypass the budget), a malformed
        checksum, a value of the wrong type, or a key without a valid tensor spec. One scan of
        ``entries`` (embeddings are checked where they are read: :meth:`invalid_entities`)."""
        conn = self.conn()
        valid_keys = []
        for key, spec in conn.execute("SELECT compat_key, tensor_spec FROM partitions WHERE typeof(compat_key)='text'"):
            try:
                parse_tensor_spec(spec)
                valid_keys.append(key)
            except ValueError:
                pass
        marks = ",".join("?" * len(valid_keys))
        rows = conn.execute(
            "SELECT id FROM entries WHERE id<1 OR typeof(nbytes)!='integer' OR nbytes<1 OR nbytes>? "
            "OR typeof(sha256)!='text' OR length(sha256)!=64 OR typeof(compat_key)!='text' "
            "OR typeof(prompt)!='text' OR typeof(info)!='text' OR typeof(access_count)!='integer' "
            "OR typeof(created_at) NOT IN ('real','integer') OR typeof(last_access) NOT IN ('real','integer') "
            f"OR compat_key NOT IN ({marks})", (MAX_ENTRY_BYTES, *valid_keys)).fetchall()
        return [(int(r[0]), "its manifest row holds a value CHAI never writes (id, size, checksum, type or key)")
                for r in rows]

    def invalid_entities(self, dim: int | None) -> list[tuple[int, str]]:
        """Entries with an entity CHAI could not have written, as (entry id, reason): an embedding
        that is not ``dim`` float32 values, a label below 1, or another key than its entry's.
        Reads every embedding (about a second per 300,000 entities): run by :meth:`LatentStore.verify`."""
        width = -1 if dim is None else 4 * int(dim)
        return [(int(r[0]), f"an entity embedding is not {dim} float32 values, or names another key")
                for r in self.conn().execute(
                    "SELECT DISTINCT e.entry_id FROM entities e JOIN entries n ON n.id=e.entry_id "
                    "WHERE typeof(e.embedding)!='blob' OR length(e.embedding)!=? OR typeof(e.text)!='text' "
                    "OR e.compat_key IS NOT n.compat_key OR e.label<1", (width,))]

    def drop_invalid_partitions(self) -> int:
        """Delete partition rows whose key is not text or whose tensor spec is not valid, once no
        entry uses them (:meth:`invalid_entries` flags those entries first). Returns how many."""
        conn = self.conn()
        bad = []
        for rowid, key, spec in conn.execute("SELECT rowid, compat_key, tensor_spec FROM partitions"):
            try:
                if not isinstance(key, str):
                    raise ValueError("key is not text")
                parse_tensor_spec(spec)
            except ValueError:
                bad.append(rowid)
        if not bad:
            return 0
        with self.tx() as c:
            for rowid in bad:
                c.execute("DELETE FROM partitions WHERE rowid=? AND (typeof(compat_key)!='text' OR compat_key NOT IN "
                          "(SELECT compat_key FROM entries))", (rowid,))
        return len(bad)

    def orphan_entities(self) -> int:
        """Delete entity rows whose entry is gone (only a crafted manifest has them); returns how many."""
        with self.tx() as c:
            return c.execute("DELETE FROM entities WHERE entry_id NOT IN (SELECT id FROM entries)").rowcount

    # ------------------------------------------------------------------ rows
    @staticmethod
    def generation(c) -> int:
        """The manifest generation (bumped by every insert, eviction and repair)."""
        return int(c.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    @staticmethod
    def bump_generation(c) -> int:
        """Increment the generation inside transaction ``c``; returns the new value."""
        generation = Manifest.generation(c) + 1
        c.execute("UPDATE meta SET value=? WHERE key='generation'", (str(generation),))
        return generation

    @staticmethod
    def delete_entries(c, entry_ids: Iterable[int], generation: int) -> None:
        """Delete entries and their entities inside ``c``, logging their labels as deleted at
        ``generation`` (other processes replay the log to drop the vectors)."""
        for entry_id in entry_ids:
            for label, key in c.execute("SELECT label, compat_key FROM entities WHERE entry_id=?",
                                        (int(entry_id),)).fetchall():
                c.execute("INSERT OR REPLACE INTO deleted_labels VALUES(?,?,?)", (label, key, generation))
            c.execute("DELETE FROM entities WHERE entry_id=?", (int(entry_id),))
            c.execute("DELETE FROM entries WHERE id=?", (int(entry_id),))

    @staticmethod
    def bytes_held(c) -> int:
        """Latent bytes the manifest holds (the trigger-kept counter)."""
        return int(c.execute("SELECT value FROM counters WHERE name='bytes_held'").fetchone()[0])

    @staticmethod
    def counted_bytes_drifted(c) -> bool:
        """True when the trigger-kept byte counter differs from the sum over ``entries`` (one scan)."""
        counted = c.execute("SELECT value FROM counters WHERE name='bytes_held'").fetchone()
        summed = c.execute(f"SELECT COALESCE(SUM({COUNTED_NBYTES}), 0) FROM entries").fetchone()[0]
        return counted is None or counted[0] != summed

    @staticmethod
    def recount_bytes(c) -> None:
        """Re-derive the byte counter the triggers keep (one scan; done on every open)."""
        c.execute("INSERT OR REPLACE INTO counters VALUES('bytes_held', "
                  f"(SELECT COALESCE(SUM({COUNTED_NBYTES}), 0) FROM entries))")

    @staticmethod
    def note_pruned(c, upto: int) -> None:
        """Record that deletion-log rows up to generation ``upto`` are gone, so a process whose index
        is older than that knows it must reconcile with the manifest instead of replaying the log."""
        row = c.execute("SELECT value FROM meta WHERE key='deleted_pruned_upto'").fetchone()
        if row is None or _int_or(row[0], -1) < upto:
            c.execute("INSERT OR REPLACE INTO meta VALUES('deleted_pruned_upto', ?)", (str(int(upto)),))


def check_thumbnail(data) -> bytes:
    """A thumbnail as CHAI stores it: bytes of a JPEG or PNG image, 8..MAX_THUMBNAIL_BYTES long.

    Only the size and the format's signature are checked: the bytes are never decoded by the
    store (the panel hands them to a browser as an image).

    Raises:
        ValueError: not bytes, too large, or not starting like a JPEG or PNG (says the size cap).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"a thumbnail must be the bytes of a JPEG or PNG image, got {type(data).__name__}")
    data = bytes(data)
    if not 8 <= len(data) <= MAX_THUMBNAIL_BYTES:
        raise ValueError(f"a thumbnail is {len(data):,} bytes; it must be 8..{MAX_THUMBNAIL_BYTES:,} bytes "
                         "(encode one small frame, e.g. 160 px wide, as JPEG)")
    if not (data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"):
        raise ValueError("a thumbnail must be a JPEG or PNG image (its first bytes are neither signature)")
    return data


def parse_tensor_spec(text) -> dict:
    """The tensor spec of a partition ({name: [dtype, shape]}) from its JSON, checked.

    Raises:
        ValueError: not JSON, an unknown dtype, a shape that is not positive integers, or a total
            size above ``MAX_ENTRY_BYTES``.
    """
    try:
        spec = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        spec = None
    if not isinstance(spec, dict) or not spec:
        raise ValueError("tensor spec is not a JSON object")
    total = 0
    for name, desc in spec.items():
        if not (isinstance(desc, list) and len(desc) == 2 and desc[0] in ALLOWED_DTYPES and isinstance(desc[1], list)
                and 0 < len(desc[1]) <= 8 and all(type(x) is int and 0 < x for x in desc[1])):
            raise ValueError(f"tensor spec of {name!r} is not [dtype, shape]")
        numel = int(np.prod(desc[1], dtype=object))
        total += numel * (4 if desc[0] == "float32" else 2)
    if total > MAX_ENTRY_BYTES:
        raise ValueError(f"tensor spec describes {total} bytes, more than {MAX_ENTRY_BYTES}")
    return spec


def _int_or(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def count_value(value) -> int:
    """A counter as a whole number >= 0 (a crafted NaN, infinity or negative value reads as 0)."""
    return int(value) if isinstance(value, float) and math.isfinite(value) and value > 0 else 0


def parse_meta(meta: dict, manifest: Path) -> dict:
    """Typed ``meta`` values, each checked to be one CHAI writes (see :meth:`Manifest.validate`).

    Raises:
        StoreError: naming the field and value.
    """
    def bad(key: str) -> StoreError:
        return StoreError(f"{manifest}: meta field {key} = {str(meta.get(key))[:40]!r} is not a value CHAI writes; "
                          "the store was altered outside CHAI: move it away and start a new store folder")

    def integer(key: str, lo: int, hi: int, required: bool = True) -> int | None:
        if key not in meta and not required:
            return None
        value = meta.get(key)
        if not isinstance(value, str) or not re.fullmatch(r"-?[0-9]{1,19}", value) or not lo <= int(value) <= hi:
            raise bad(key)
        return int(value)

    out = {"schema_version": integer("schema_version", 1, SCHEMA_VERSION),
           "generation": integer("generation", 0, 1 << 62),
           "budget_bytes": integer("budget_bytes", 1, MAX_BUDGET_BYTES),
           "dim": integer("dim", 1, 1 << 16, required=False),
           "upgraded_from": integer("upgraded_from", 1, SCHEMA_VERSION, required=False)}
    try:
        out["policy"] = EvictionPolicy.parse(meta.get("policy"))
    except (ValueError, TypeError):
        raise bad("policy") from None
    store_id = meta.get("store_id")
    if out["schema_version"] >= 2 and not (isinstance(store_id, str) and _HEX32.match(store_id)):
        raise bad("store_id")
    out["store_id"] = store_id
    try:
        params = json.loads(meta.get("index_params") or "")
    except (ValueError, RecursionError):
        raise bad("index_params") from None
    limits = {"M": (2, 512), "ef_construction": (1, 100_000), "ef_search": (1, 100_000)}
    if not isinstance(params, dict) or not all(type(params.get(k)) is int and lo <= params[k] <= hi
                                               for k, (lo, hi) in limits.items()):
        raise bad("index_params")
    share = params.get("compact_tombstone_share", 0.25)
    if not isinstance(share, (int, float)) or not 0 < float(share) <= 1:
        raise bad("index_params")
    out["index_params"] = {**{k: params[k] for k in limits}, "compact_tombstone_share": float(share)}
    return out


def read_stats_from(conn: sqlite3.Connection, manifest: Path, last: int = 10) -> StoreStats:
    """:class:`StoreStats` from a manifest connection (read-only queries; values checked or cast,
    so a crafted manifest gives an error naming the field, never a traceback)."""
    meta = parse_meta(dict(conn.execute("SELECT key, value FROM meta").fetchall()), manifest)
    counters = {name: count_value(value) for name, value in conn.execute(
        "SELECT CAST(name AS TEXT), CAST(value AS REAL) FROM counters")}
    entries, held = conn.execute(f"SELECT COUNT(*), COALESCE(SUM({COUNTED_NBYTES}), 0) FROM entries").fetchone()
    n_entities = conn.execute("SELECT COUNT(*) FROM entities").fetchone()[0]
    pinned_entries, pinned_bytes = 0, 0
    format3 = has_pins(conn)  # a format-2 store read without upgrading has no pins, no served entry ids
    if format3:
        pinned_entries, pinned_bytes = conn.execute(
            f"SELECT COUNT(*), COALESCE(SUM({COUNTED_NBYTES}), 0) FROM entries WHERE pinned=1").fetchone()
    ms = [float(r[0] or 0.0) for r in conn.execute(
        f"SELECT CAST(ms AS REAL) FROM lookup_log ORDER BY id DESC LIMIT {LOOKUP_LOG_KEEP}")]
    top = [(str(t), int(n or 0)) for t, n in conn.execute(
        "SELECT CAST(text AS TEXT), CAST(count AS INTEGER) FROM entity_counts ORDER BY count DESC, text ASC LIMIT 10")]
    recent = []
    served = "CAST(entry_id AS INTEGER)" if format3 else "NULL"
    for r in conn.execute(
            "SELECT CAST(time AS REAL), CAST(prompt AS TEXT), CAST(hit AS INTEGER), CAST(entity AS TEXT), "
            f"CAST(matched AS TEXT), CAST(similarity AS REAL), CAST(ms AS REAL), {served} FROM lookup_log "
            "ORDER BY id DESC LIMIT ?", (int(last),)):
        row = dict(zip(("time", "prompt", "hit", "entity", "matched", "similarity", "ms", "entry_id"), r))
        row["hit"] = bool(row["hit"])
        recent.append(row)
    lookups = counters.get("lookups", 0)
    return StoreStats(
        entries=int(entries), entities=int(n_entities), bytes=int(held), budget_bytes=meta["budget_bytes"],
        hits=counters.get("hits", 0), misses=counters.get("misses", 0), lookups=lookups,
        evictions=counters.get("evictions", 0), inserts=counters.get("inserts", 0),
        repairs=counters.get("repairs", 0), quarantined=counters.get("quarantined", 0),
        hit_rate=(counters.get("hits", 0) / lookups) if lookups > 0 else 0.0,
        lookup_ms_mean=float(np.mean(ms)) if ms else 0.0,
        lookup_ms_p50=float(np.percentile(ms, 50)) if ms else 0.0,
        lookup_ms_p99=float(np.percentile(ms, 99)) if ms else 0.0,
        top_entities=top, last_lookups=recent, generation=meta["generation"], policy=meta["policy"].value,
        pinned_entries=int(pinned_entries), pinned_bytes=int(pinned_bytes),
    )


def has_pins(conn: sqlite3.Connection) -> bool:
    """True when the manifest's ``entries`` has the format-3 ``pinned`` column."""
    return any(r[1] == "pinned" for r in conn.execute("PRAGMA table_info(entries)"))


def pinned_bytes(c) -> int:
    """Latent bytes of pinned entries (one scan of ``entries``)."""
    return int(c.execute(f"SELECT COALESCE(SUM({COUNTED_NBYTES}), 0) FROM entries WHERE pinned=1").fetchone()[0])
