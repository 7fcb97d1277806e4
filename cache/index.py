"""HNSW vector index over entity embeddings, partitioned by compatibility key.

hnswlib is fast but has sharp edges (see reference/ecosystem.md section 2.3), which this module
handles so the store does not have to:

* ``save_index`` is not atomic -> the store gives it a fresh temp file and renames it into place.
* ``load_index`` trusts every byte of the file (a bad entry point or neighbour id segfaults a
  later query) -> only files vetted by :mod:`~comfyui_chai.cache.index_file` (keyed checksum or
  full structural check) reach it, and it allocates for the file's element count, never for the
  capacity the file states.
* ``ef`` is not saved -> :class:`IndexParams` travels with every partition and ``set_ef`` is
  called after every load.
* adding and querying at the same time is unsafe (the bindings release the GIL) -> every
  operation goes through a :class:`ReadWriteLock`: shared for queries, exclusive for the rest.
* capacity is fixed -> we ``resize_index`` ahead of it under the exclusive lock.
* ``mark_deleted`` leaves tombstones that cost memory and recall -> :meth:`EntityIndex.compact`
  rebuilds a partition when tombstones exceed a share.
* ``knn_query`` raises when ``k`` exceeds the live count -> ``k`` is clamped.

The compatibility-key filter is implemented by partitioning: one hnswlib index per key, so a
query only ever visits vectors of its own key. That keeps recall and latency independent of how
many entries other models, shapes or configs hold (an hnswlib ``filter`` callback runs Python per
visited node and loses recall when the matching share is small).
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from .index_file import IndexFileError

__all__ = ["IndexParams", "ReadWriteLock", "EntityIndex", "IndexFileError", "partition_file_name"]


@dataclass(frozen=True)
class IndexParams:
    """hnswlib parameters of one partition (persisted by the owner; hnswlib does not save ``ef``).

    Attributes:
        dim: vector dimension (384 for all-MiniLM-L6-v2).
        M: graph degree; 16 is hnswlib's recommended default for 384-d text embeddings.
        ef_construction: build-time beam width; 200 gives recall@1 >= 0.99 at 1M vectors.
        ef_search: query-time beam width, re-applied after every load (hnswlib resets it to 10).
            96 meets recall@1 >= 0.95 with p99 <= 2 ms at 1M vectors (bench/cache_bench.py: 0.964,
            1.35 ms; 64 gave 0.944).
        compact_tombstone_share: rebuild a partition when deleted / stored exceeds this share.
        compact_min_tombstones: ... and it holds at least this many tombstones, so small
            partitions are not rebuilt (and re-saved with fsync) after nearly every eviction.
    """

    dim: int
    M: int = 16
    ef_construction: int = 200
    ef_search: int = 96
    compact_tombstone_share: float = 0.25
    compact_min_tombstones: int = 16

    def to_dict(self) -> dict:
        """The parameters as a JSON-serialisable dict."""
        return asdict(self)


class ReadWriteLock:
    """A writer-preferring reader-writer lock for one process's threads.

    Readers share the lock; a writer holds it alone. Waiting writers block new readers, so a
    stream of queries cannot starve an insert. Not re-entrant.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared (for ``knn_query``)."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock exclusively (add, delete, resize, save, rebuild)."""
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def partition_file_name(compat_key: str) -> str:
    """File name of the partition of ``compat_key``: ``index-<sha1 of the key, 16 hex>.bin``."""
    return "index-" + hashlib.sha1(compat_key.encode("utf-8")).hexdigest()[:16] + ".bin"


class _Partition:
    """One hnswlib index plus its bookkeeping (live and deleted labels)."""

    def __init__(self, params: IndexParams, capacity: int) -> None:
        import hnswlib

        self.params = params
        self.index = hnswlib.Index(space="cosine", dim=params.dim)
        self.index.init_index(max_elements=max(capacity, 16), ef_construction=params.ef_construction, M=params.M)
        self.index.set_ef(params.ef_search)
        self.index.set_num_threads(1)
        self.live: set[int] = set()
        self.deleted: set[int] = set()

    @classmethod
    def load(cls, params: IndexParams, path: str, deleted: np.ndarray, count: int) -> "_Partition":
        import hnswlib

        part = cls.__new__(cls)
        part.params = params
        part.index = hnswlib.Index(space="cosine", dim=params.dim)
        try:
            part.index.load_index(str(path), max_elements=max(int(count), 16))
        except Exception as exc:  # hnswlib raises RuntimeError with a terse message
            raise IndexFileError(f"hnswlib could not load the index file: {exc}") from exc
        part.index.set_ef(params.ef_search)
        part.index.set_num_threads(1)
        stored = set(int(x) for x in part.index.get_ids_list())
        part.deleted = set(int(x) for x in deleted)
        if not part.deleted <= stored:
            raise IndexFileError("the index file lacks labels its record lists as deleted")
        part.live = stored - part.deleted
        return part

    def ensure_capacity(self, extra: int) -> None:
        need = self.index.get_current_count() + extra
        cap = self.index.get_max_elements()
        if need > cap:
            self.index.resize_index(max(need, cap * 2))


class EntityIndex:
    """Cosine k-NN over entity embeddings, one hnswlib partition per compatibility key.

    Labels are the manifest's entity row ids (int64, never reused), so a label found here can
    always be checked against the manifest. Thread-safe within a process through a
    :class:`ReadWriteLock`; cross-process safety is the store's job (it owns the file lock).

    Args:
        params: hnswlib parameters shared by every partition; ``params.dim`` is the vector size.

    Raises:
        ValueError: ``params.dim`` < 1.
    """

    def __init__(self, params: IndexParams) -> None:
        if params.dim < 1:
            raise ValueError(f"index dimension must be >= 1, got {params.dim}")
        self.params = params
        self.lock = ReadWriteLock()
        self._parts: dict[str, _Partition] = {}

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        """Number of live (not deleted) vectors over all partitions."""
        with self.lock.read():
            return sum(len(p.live) for p in self._parts.values())

    def keys(self) -> list[str]:
        """The compatibility keys that have a partition."""
        with self.lock.read():
            return list(self._parts)

    def labels(self, compat_key: str) -> set[int]:
        """Live labels of one partition (a copy)."""
        with self.lock.read():
            part = self._parts.get(compat_key)
            return set(part.live) if part else set()

    def known_labels(self, labels, compat_key: str) -> set[int]:
        """The live labels of one partition among ``labels`` (an iterable of ints).

        Costs O(len(labels)), unlike ``labels(key) & ...`` which copies the whole partition's set
        (the store checks every new row this way on every insert).
        """
        with self.lock.read():
            part = self._parts.get(compat_key)
            return part.live.intersection(int(x) for x in labels) if part else set()

    def tombstones(self, compat_key: str) -> int:
        """Deleted-but-still-stored vectors in one partition."""
        with self.lock.read():
            part = self._parts.get(compat_key)
            return len(part.deleted) if part else 0

    def query(self, vectors: np.ndarray, k: int, compat_key: str) -> tuple[np.ndarray, np.ndarray]:
        """k nearest neighbours of each query among vectors of ``compat_key``.

        Args:
            vectors: [m, dim] float32 (L2-normalised or not; cosine space normalises).
            k: neighbours wanted per query; clamped to the live count of the partition.
            compat_key: only vectors added under this key are candidates.

        Returns:
            (labels [m, k'] int64, similarities [m, k'] float32) sorted by similarity descending,
            with k' = min(k, live count); k' = 0 when the partition is empty or absent.
            Similarity is cosine similarity in [-1, 1] (1 - hnswlib's cosine distance).

        Raises:
            ValueError: wrong shape or non-finite values.
        """
        vectors = self._check_vectors(vectors)
        with self.lock.read():
            part = self._parts.get(compat_key)
            live = len(part.live) if part else 0
            k_eff = min(int(k), live)
            if k_eff <= 0:
                m = vectors.shape[0]
                return np.zeros((m, 0), dtype=np.int64), np.zeros((m, 0), dtype=np.float32)
            # hnswlib can fail to fill k results when ef is small next to many tombstones.
            ef = max(self.params.ef_search, k_eff + min(len(part.deleted), 4 * k_eff))
            if ef != self.params.ef_search:
                part.index.set_ef(ef)
            try:
                labels, distances = part.index.knn_query(vectors, k=k_eff)
            finally:
                if ef != self.params.ef_search:
                    part.index.set_ef(self.params.ef_search)
        return labels.astype(np.int64), (1.0 - distances).astype(np.float32)

    # ------------------------------------------------------------------ mutations
    def add(self, labels: np.ndarray, vectors: np.ndarray, compat_key: str) -> None:
        """Add vectors under ``compat_key`` (creating its partition; growing it ahead of capacity).

        Args:
            labels: [n] int64, unique, never used before in this partition.
            vectors: [n, dim] float32.
            compat_key: the compatibility key the vectors belong to.

        Raises:
            ValueError: shapes disagree, a label is already present, or non-finite values.
        """
        vectors = self._check_vectors(vectors)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.shape[0] != vectors.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {vectors.shape[0]} vectors")
        if labels.size == 0:
            return
        with self.lock.write():
            part = self._parts.get(compat_key)
            if part is None:
                part = self._parts[compat_key] = _Partition(self.params, capacity=max(1024, 2 * labels.size))
            clash = part.live.intersection(labels.tolist()) | part.deleted.intersection(labels.tolist())
            if clash:
                raise ValueError(f"labels already in the index: {sorted(clash)[:5]}")
            part.ensure_capacity(labels.size)
            part.index.add_items(vectors, labels)
            part.live.update(int(x) for x in labels)

    def delete(self, labels: np.ndarray | list[int], compat_key: str) -> int:
        """Tombstone labels of one partition (hnswlib ``mark_deleted``). Unknown labels are ignored.

        Returns:
            The number of labels actually deleted.
        """
        count = 0
        with self.lock.write():
            part = self._parts.get(compat_key)
            if part is None:
                return 0
            for label in np.asarray(labels, dtype=np.int64).reshape(-1).tolist():
                if label in part.live:
                    part.index.mark_deleted(label)
                    part.live.discard(label)
                    part.deleted.add(label)
                    count += 1
        return count

    def needs_compaction(self, compat_key: str) -> bool:
        """True when the partition's tombstones exceed ``compact_tombstone_share`` of what it stores
        and number at least ``compact_min_tombstones``."""
        with self.lock.read():
            part = self._parts.get(compat_key)
            if part is None or not part.deleted:
                return False
            stored = len(part.live) + len(part.deleted)
            if len(part.deleted) < self.params.compact_min_tombstones:
                return False
            return len(part.deleted) / stored > self.params.compact_tombstone_share

    def rebuild(self, compat_key: str, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Replace a partition by a fresh one holding exactly ``labels``/``vectors`` (no tombstones).

        Used for compaction and for repair from the manifest. An empty ``labels`` drops the partition.
        """
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.size == 0:
            with self.lock.write():
                self._parts.pop(compat_key, None)
            return
        vectors = self._check_vectors(vectors)
        fresh = _Partition(self.params, capacity=max(1024, int(labels.size * 1.25)))
        fresh.index.add_items(vectors, labels)  # built outside the lock: queries keep running
        fresh.live = set(int(x) for x in labels)
        with self.lock.write():
            self._parts[compat_key] = fresh

    def drop(self, compat_key: str) -> None:
        """Forget a partition entirely (in memory)."""
        with self.lock.write():
            self._parts.pop(compat_key, None)

    # ------------------------------------------------------------------ persistence
    def write_partition(self, compat_key: str, path: str) -> tuple[list[int], list[int]] | None:
        """Write one partition with hnswlib's ``save_index`` to ``path`` (the store passes a fresh
        exclusive temp file and renames it into place: a crash never leaves a torn partition).

        Returns:
            (live labels, deleted labels) of what was written, or None when the partition does not
            exist (nothing is written).
        """
        with self.lock.write():  # hnswlib's save walks the graph: no concurrent add
            part = self._parts.get(compat_key)
            if part is None:
                return None
            part.index.save_index(str(path))
            return sorted(part.live), sorted(part.deleted)

    def load_partition(self, compat_key: str, path: str, count: int, deleted_labels: np.ndarray) -> None:
        """Load one partition from a file the caller has vetted (``index_file``: keyed checksum or
        :func:`~comfyui_chai.cache.index_file.check_hnsw_file`); hnswlib trusts every byte of it.

        Args:
            path: the file (the store passes ``/proc/self/fd/<fd>`` of the file it checked).
            count: elements the file holds; hnswlib allocates room for this many (plus growth
                later), never the capacity the file states.
            deleted_labels: labels the owner recorded as deleted.

        Raises:
            IndexFileError: hnswlib rejects the file, or it lacks a label recorded as deleted.
        """
        part = _Partition.load(self.params, path, np.asarray(deleted_labels, dtype=np.int64), int(count))
        with self.lock.write():
            self._parts[compat_key] = part

    # ------------------------------------------------------------------ helpers
    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.params.dim:
            raise ValueError(f"vectors must be [n, {self.params.dim}], got {list(vectors.shape)}")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or Inf")
        return np.ascontiguousarray(vectors)
