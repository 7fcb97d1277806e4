"""Keeping a process's HNSW index in step with the manifest: load, catch up, rebuild, save.

The index is derived data: the manifest's entities (with their embeddings) are the truth, and any
partition can be rebuilt from them. This module

* loads each partition file only when it is trusted (:mod:`.index_file`: this user's keyed
  checksum, else a full structural check, after which the file is signed for next time);
  otherwise, or when its labels disagree with the manifest, rebuilds it from the manifest;
* catches a loaded partition up with inserts and evictions made after it was saved (the
  manifest's generation log), and keeps a running process in step with other processes (:meth:`sync`);
* saves partitions atomically (a fresh exclusive temp file, renamed into place) and records their
  size, checksum, generation and tombstones in the manifest.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import threading
from typing import Callable

import numpy as np

from .index import EntityIndex, IndexParams, partition_file_name
from .index_file import HNSW_HEADER_BYTES, IndexFileError, IndexKey, check_hnsw_file
from .store_files import BlobError, StoreFiles
from .store_manifest import Manifest

__all__ = ["IndexSync"]

log = logging.getLogger("comfyui_chai.store")


class _PartitionGone(Exception):
    """The partition was dropped while it was being saved: discard the temp file."""


class IndexSync:
    """The in-memory index of one open store and its files.

    Args:
        manifest: the store's :class:`~comfyui_chai.cache.store_manifest.Manifest`.
        files: the store's :class:`~comfyui_chai.cache.store_files.StoreFiles`.
        store_id: the store's id (part of every keyed checksum).
        index_params: hnswlib parameters from ``meta`` (M, ef_construction, ef_search,
            compact_tombstone_share).
        durable: fsync saved files.
        key: the user's :class:`~comfyui_chai.cache.index_file.IndexKey`.
        event: ``event(c, kind, detail)`` records a repair inside transaction ``c``.

    Attributes:
        index: the :class:`EntityIndex` (None until the store knows its dimension).
        dim: embedding dimension (None for a store without entries yet).
        changes_since_save: changes this process made since the index files were written.
        bad_entries: entry id -> reason, for entities whose embedding blob is not ``dim`` float32
            values (only a crafted manifest has them): never indexed; the store removes them
            under its writer lock (:meth:`take_bad_entries`).
    """

    def __init__(self, manifest: Manifest, files: StoreFiles, store_id: str, index_params: dict, durable: bool,
                 key: IndexKey, event: Callable) -> None:
        self.manifest = manifest
        self.files = files
        self.store_id = store_id
        self.index_params = dict(index_params)
        self.durable = durable
        self.key = key
        self._event = event
        self.index: EntityIndex | None = None
        self.dim: int | None = None
        self.synced_generation = 0
        self.max_label = 0
        self.changes_since_save = 0
        self.bad_entries: dict[int, str] = {}  # entries with an embedding that cannot be indexed
        self._sync_lock = threading.RLock()  # threads of this process sync one at a time

    def set_dim(self, dim: int | None) -> None:
        """Create the (empty) index once the dimension is known."""
        if dim is not None and self.index is None:
            self.dim = int(dim)
            self.index = EntityIndex(IndexParams(dim=self.dim, **self.index_params))

    def reload_dim(self) -> None:
        """Take the dimension another process recorded with the store's first insert."""
        if self.index is None:
            row = self.manifest.conn().execute("SELECT value FROM meta WHERE key='dim'").fetchone()
            if row is not None:
                self.set_dim(int(row[0]))

    # ------------------------------------------------------------------ open
    def load_all(self) -> None:
        """Load every partition that is trusted and matches the manifest; rebuild the rest.
        Run under the writer lock (nothing changes underneath)."""
        if self.index is None:
            return
        conn = self.manifest.conn()
        generation = Manifest.generation(conn)
        keys = [r[0] for r in conn.execute("SELECT DISTINCT compat_key FROM entities WHERE typeof(compat_key)='text'")]
        recorded = {r[0]: r for r in conn.execute(
            "SELECT compat_key, index_mac, index_size, index_generation, index_deleted FROM partitions WHERE typeof(compat_key)='text'")}
        self.max_label = int(conn.execute("SELECT COALESCE(MAX(label), 0) FROM entities").fetchone()[0])
        self.synced_generation = generation
        for key in keys:
            rec = recorded.get(key)
            reason = "no saved index" if rec is None or rec[2] is None else self._load_partition(key, rec)
            if reason is None:
                live = self.index.labels(key)
                want = set(r[0] for r in conn.execute("SELECT label FROM entities WHERE compat_key=?", (key,)))
                if live != want:
                    reason = f"index for this key disagrees with the manifest ({len(live)} vs {len(want)} vectors)"
                elif _int(rec[3]) != generation:
                    self.changes_since_save += 1  # caught up in memory: save on close
            if reason is not None:
                self.rebuild(key, reason)
        for key in set(recorded) - set(keys):
            self.index.drop(key)
        self.synced_generation = generation

    def _load_partition(self, key: str, rec: tuple) -> str | None:
        """Load one partition file if it is trusted; returns why not (None when loaded)."""
        _key, mac, size, saved_generation, deleted_json = rec
        name = partition_file_name(key)
        conn = self.manifest.conn()
        try:
            deleted = _labels(deleted_json)
            with self.files.open_index(name) as (fd, file_size, path):
                if file_size != _int(size):
                    return f"index file is {file_size} bytes, the manifest recorded {size}"
                if self.key.verify(mac, self.store_id, name, fd):
                    count = struct.unpack_from("<Q", _read_head(fd), 16)[0]
                    signed = None
                else:
                    since = conn.execute("SELECT COUNT(*) FROM deleted_labels WHERE compat_key=? AND generation>?",
                                         (key, _int(saved_generation))).fetchone()[0]
                    live = conn.execute("SELECT COUNT(*) FROM entities WHERE compat_key=?", (key,)).fetchone()[0]
                    if file_size == 0:
                        raise IndexFileError("index file is empty")
                    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as buf:
                        info = check_hnsw_file(buf, self.dim, self.index.params.M, self.index.params.ef_construction,
                                               max_count=int(live) + int(since) + len(deleted))
                    marked = set(info.labels[info.deleted].tolist())
                    if marked != set(deleted):
                        raise IndexFileError("the index file's delete marks differ from the manifest's record")
                    count = info.count
                    signed = self.key.sign(self.store_id, name, fd)
                self.index.load_partition(key, path, count, np.asarray(deleted, dtype=np.int64))
        except (BlobError, IndexFileError, ValueError, struct.error) as exc:
            return str(exc)
        self._catch_up(key, since_generation=_int(saved_generation))
        if signed is not None:  # passed the structural check: trust it by key from now on
            with self.manifest.tx() as c:
                c.execute("UPDATE partitions SET index_mac=? WHERE compat_key=? AND index_size=?", (signed, key, size))
        return None

    def _catch_up(self, key: str, since_generation: int) -> None:
        conn = self.manifest.conn()
        known = self.index.labels(key)
        top = max(known) if known else 0
        rows = conn.execute("SELECT label, entry_id, embedding FROM entities WHERE compat_key=? AND label>?",
                            (key, top)).fetchall()
        labels, vectors = self._vectors([r for r in rows if r[0] not in known])
        if labels.size:
            self.index.add(labels, vectors, key)
        gone = [r[0] for r in conn.execute(
            "SELECT label FROM deleted_labels WHERE compat_key=? AND generation>?", (key, since_generation))]
        if gone:
            self.index.delete(gone, key)

    def _vectors(self, rows: list) -> tuple[np.ndarray, np.ndarray]:
        """(labels [n] int64, vectors [n, dim] float32) from manifest rows (label, entry id, blob).
        A row whose blob is not ``dim`` float32 values, or whose label is not positive, is left out
        and its entry recorded in :attr:`bad_entries`."""
        width = 4 * self.dim
        good = []
        for label, entry_id, blob in rows:
            if isinstance(blob, bytes) and len(blob) == width and isinstance(label, int) and 0 < label < 1 << 63:
                good.append((label, blob))
            else:
                self.bad_entries[int(entry_id)] = f"an entity embedding is not {self.dim} float32 values"
        labels = np.asarray([g[0] for g in good], dtype=np.int64)
        vectors = np.frombuffer(b"".join(g[1] for g in good), dtype=np.float32).reshape(len(good), self.dim)
        return labels, vectors

    def take_bad_entries(self) -> list[tuple[int, str]]:
        """The entries recorded in :attr:`bad_entries` so far, as (id, reason); clears the record."""
        bad, self.bad_entries = sorted(self.bad_entries.items()), {}
        return bad

    # ------------------------------------------------------------------ repair
    def rebuild(self, key: str, reason: str) -> None:
        """Rebuild one partition from the manifest's vectors, report it, and save it."""
        labels, vectors = self.manifest_vectors(key)
        self.index.rebuild(key, labels, vectors)
        with self.manifest.tx() as c:
            self._event(c, "index_rebuilt", f"{partition_file_name(key)}: {reason}; rebuilt {len(labels)} vectors")
            c.execute("UPDATE counters SET value=value+1 WHERE name='repairs'")
        self.save(key)

    def manifest_vectors(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(labels [n] int64, vectors [n, dim] float32) the manifest holds under ``key``."""
        return self._vectors(self.manifest.conn().execute(
            "SELECT label, entry_id, embedding FROM entities WHERE compat_key=? ORDER BY label", (key,)).fetchall())

    # ------------------------------------------------------------------ running
    def sync(self) -> None:
        """Bring this process's in-memory index up to the manifest (other processes' inserts and
        evictions). Cheap when nothing changed: one SQLite read."""
        if self.index is None:
            self.reload_dim()
            if self.index is None:
                return
        if Manifest.generation(self.manifest.conn()) == self.synced_generation:
            return
        with self._sync_lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        conn = self.manifest.conn()
        generation = Manifest.generation(conn)
        rows = conn.execute("SELECT label, compat_key, entry_id, embedding FROM entities WHERE label>? ORDER BY label",
                            (self.max_label,)).fetchall()
        by_key: dict[str, list] = {}
        for label, key, entry_id, emb in rows:
            if isinstance(key, str):  # a key CHAI never writes is never indexed (verify removes its entry)
                by_key.setdefault(key, []).append((label, entry_id, emb))
        for key, items in by_key.items():
            known = self.index.known_labels([it[0] for it in items if isinstance(it[0], int)], key)
            labels, vectors = self._vectors([it for it in items if it[0] not in known])
            if labels.size:
                self.index.add(labels, vectors, key)
        if rows:
            self.max_label = max(self.max_label, rows[-1][0])
        for label, key in conn.execute("SELECT label, compat_key FROM deleted_labels WHERE generation>?",
                                       (self.synced_generation,)).fetchall():
            self.index.delete([label], key)
        pruned = conn.execute("SELECT value FROM meta WHERE key='deleted_pruned_upto'").fetchone()
        if pruned is not None and _int(pruned[0]) > self.synced_generation:
            # Another process pruned deletion-log rows we never read (save_index / compact):
            # drop whatever the manifest no longer holds, so no stale vector lingers or gets saved.
            for key in self.index.keys():
                want = set(r[0] for r in conn.execute("SELECT label FROM entities WHERE compat_key=?", (key,)))
                stale = self.index.labels(key) - want
                if stale:
                    self.index.delete(sorted(stale), key)
        self.synced_generation = generation

    def save(self, key: str) -> None:
        """Write one partition file and record its size, keyed checksum, generation and
        tombstones (caller holds the writer lock)."""
        name = partition_file_name(key)
        written = None
        try:
            if key in self.index.keys():
                with self.files.new_index(name, self.durable) as (fd, path):
                    written = self.index.write_partition(key, path)
                    if written is None:
                        raise _PartitionGone
                    size = os.fstat(fd).st_size
                    mac = self.key.sign(self.store_id, name, fd)
        except _PartitionGone:
            written = None
        with self.manifest.tx() as c:
            if written is None:
                c.execute("UPDATE partitions SET index_mac=NULL, index_size=NULL WHERE compat_key=?", (key,))
            else:
                c.execute("UPDATE partitions SET index_mac=?, index_size=?, index_generation=?, index_deleted=? "
                          "WHERE compat_key=?", (mac, size, self.synced_generation, json.dumps(written[1]), key))
        if written is None:
            self.files.remove_index(name)

    def save_all(self) -> None:
        """Write every partition and prune the deletion log up to the oldest saved generation."""
        for key in self.index.keys():
            self.save(key)
        with self.manifest.tx() as c:
            oldest = c.execute("SELECT MIN(index_generation) FROM partitions").fetchone()[0]
            if oldest is not None:
                c.execute("DELETE FROM deleted_labels WHERE generation<=?", (oldest,))
                Manifest.note_pruned(c, int(oldest))
        self.changes_since_save = 0

    def maybe_compact_and_save(self, autosave_every: int) -> None:
        """Compact partitions with too many tombstones; save when enough changed.

        Saving rewrites whole partitions (O(index size)); catching up on reopen costs O(changes).
        So the interval grows with the index: at most ~5% of it is replayed on reopen, and a stream
        of inserts costs O(n) saving in total instead of O(n^2)."""
        for key in self.index.keys():
            if self.index.needs_compaction(key):
                self.compact_partition(key)
        if self.changes_since_save >= max(autosave_every, len(self.index) // 20):
            for key in self.index.keys():
                self.save(key)
            self.changes_since_save = 0

    def compact_partition(self, key: str) -> None:
        """Rebuild one partition from the manifest (no tombstones) and save it."""
        labels, vectors = self.manifest_vectors(key)
        self.index.rebuild(key, labels, vectors)
        self.save(key)

    def saved_file_problem(self, key: str) -> str | None:
        """Why the recorded file of ``key`` would not load as is on the next open (None when it
        would, or when none is recorded yet): missing, another size, or not signed by this user's key."""
        row = self.manifest.conn().execute("SELECT index_mac, index_size FROM partitions WHERE compat_key=?",
                                           (key,)).fetchone()
        if row is None or row[1] is None:
            return None
        try:
            with self.files.open_index(partition_file_name(key)) as (fd, size, _path):
                if size != _int(row[1]):
                    return f"index file is {size} bytes, the manifest recorded {row[1]}"
                if self.key.usable and not self.key.verify(row[0], self.store_id, partition_file_name(key), fd):
                    return "index file does not match its keyed checksum"
        except BlobError as exc:
            return str(exc)
        return None


def _labels(text) -> list[int]:
    """Labels from a partition's ``index_deleted`` JSON (a list of positive ints); ValueError if not."""
    try:
        value = json.loads(text or "[]")
    except (ValueError, RecursionError, TypeError):
        raise ValueError("the manifest's list of deleted index labels is not JSON") from None
    if not isinstance(value, list) or not all(type(x) is int and 0 < x < 1 << 63 for x in value):
        raise ValueError("the manifest's list of deleted index labels is not a list of labels")
    return value


def _int(value, default: int = -1) -> int:
    """A manifest number as an int64, or ``default`` when it is not one (a crafted manifest)."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return number if -(1 << 63) <= number < 1 << 63 else default


def _read_head(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, HNSW_HEADER_BYTES)
