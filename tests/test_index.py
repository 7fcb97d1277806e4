"""EntityIndex (hnswlib partitions per compatibility key) and its reader-writer lock.

The traps these tests pin down are listed in reference/ecosystem.md section 2.3: k larger than the
live count, tombstones, capacity, ef not persisted, non-atomic saves, and hnswlib's unsafe
concurrent add + query (the bindings release the GIL, so Python threads really race).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from _store_util import DIM, unit_vectors
from comfyui_chai.cache.index import (
    EntityIndex,
    IndexFileError,
    IndexParams,
    ReadWriteLock,
    partition_file_name,
)
from comfyui_chai.cache.index_file import check_hnsw_file


def _index(**kw) -> EntityIndex:
    return EntityIndex(IndexParams(dim=DIM, **kw))


def _brute_top(data: np.ndarray, labels: np.ndarray, q: np.ndarray, k: int) -> list[list[int]]:
    sims = q @ data.T
    order = np.argsort(-sims, axis=1)[:, :k]
    return [[int(labels[j]) for j in row] for row in order]


def test_add_query_returns_self_and_true_cosine():
    rng = np.random.default_rng(0)
    data = unit_vectors(rng, 300)
    labels = np.arange(1000, 1300, dtype=np.int64)
    idx = _index()
    idx.add(labels, data, "k")
    assert len(idx) == 300 and idx.labels("k") == set(labels.tolist())
    got, sims = idx.query(data, 1, "k")
    assert got.shape == (300, 1) and got.dtype == np.int64
    assert np.array_equal(got[:, 0], labels), "a stored vector must be its own nearest neighbour"
    assert np.allclose(sims[:, 0], 1.0, atol=1e-5)
    # Similarities are cosine similarities (1 - hnswlib's cosine distance), sorted descending.
    q = unit_vectors(rng, 40)
    got, sims = idx.query(q, 5, "k")
    lookup = dict(zip(labels.tolist(), data))
    for i in range(40):
        assert np.all(np.diff(sims[i]) <= 1e-6)
        want = np.array([float(lookup[int(label)] @ q[i]) for label in got[i]])
        assert np.allclose(sims[i], want, atol=1e-5)
    # Recall against brute force (300 vectors, ef 64: hnswlib is essentially exact here).
    exact = _brute_top(data, labels, q, 5)
    recall = np.mean([len(set(got[i].tolist()) & set(exact[i])) / 5 for i in range(40)])
    assert recall >= 0.95
    # Non-normalised queries give the same neighbours (cosine space normalises).
    got2, sims2 = idx.query(q * 7.5, 5, "k")
    assert np.array_equal(got2, got) and np.allclose(sims2, sims, atol=1e-5)


def test_query_is_clamped_to_the_live_count():
    rng = np.random.default_rng(1)
    idx = _index()
    q = unit_vectors(rng, 2)
    labels, sims = idx.query(q, 5, "absent")
    assert labels.shape == (2, 0) and sims.shape == (2, 0)
    data = unit_vectors(rng, 3)
    idx.add([1, 2, 3], data, "k")
    labels, sims = idx.query(q, 10, "k")
    assert labels.shape == (2, 3) and sorted(labels[0].tolist()) == [1, 2, 3]
    idx.delete([1], "k")
    labels, _ = idx.query(q, 10, "k")
    assert labels.shape == (2, 2) and 1 not in labels
    idx.delete([2, 3], "k")
    labels, _ = idx.query(q, 10, "k")
    assert labels.shape == (2, 0)
    assert idx.query(q, 0, "k")[0].shape == (2, 0)


def test_delete_tombstones_and_never_returns_deleted():
    rng = np.random.default_rng(2)
    data = unit_vectors(rng, 200)
    labels = np.arange(200, dtype=np.int64) + 1
    idx = _index()
    idx.add(labels, data, "k")
    gone = labels[::3]
    assert idx.delete(gone, "k") == len(gone)
    assert idx.delete(gone, "k") == 0, "deleting twice must be a no-op (hnswlib throws on a second mark)"
    assert idx.delete([99999], "k") == 0 and idx.delete([1], "other") == 0
    assert idx.tombstones("k") == len(gone)
    assert idx.labels("k") == set(labels.tolist()) - set(gone.tolist())
    got, _ = idx.query(data, 20, "k")
    assert not (set(got.reshape(-1).tolist()) & set(gone.tolist()))
    # A deleted vector's nearest neighbour is now someone else; live ones still find themselves.
    live = np.setdiff1d(labels, gone)
    got, _ = idx.query(data[live - 1], 1, "k")
    assert np.array_equal(got[:, 0], live)
    # Labels are never reused: adding a live or a deleted label again is refused.
    with pytest.raises(ValueError, match="already in the index"):
        idx.add([live[0]], data[:1], "k")
    with pytest.raises(ValueError, match="already in the index"):
        idx.add([gone[0]], data[:1], "k")


def test_growth_past_initial_capacity():
    rng = np.random.default_rng(3)
    idx = _index()
    data = unit_vectors(rng, 3000)
    for start in range(0, 3000, 250):  # the first partition is sized for 1,024
        idx.add(np.arange(start, start + 250), data[start:start + 250], "k")
    part = idx._parts["k"].index
    assert part.get_max_elements() >= 3000 and part.get_current_count() == 3000
    got, sims = idx.query(data[::10], 1, "k")
    assert np.array_equal(got[:, 0], np.arange(0, 3000, 10))
    assert np.allclose(sims, 1.0, atol=1e-5)
    # One big batch larger than the capacity.
    idx2 = _index()
    idx2.add(np.arange(5000), unit_vectors(rng, 5000), "k")
    assert len(idx2) == 5000


def test_partitions_never_return_another_keys_vectors():
    rng = np.random.default_rng(4)
    data = unit_vectors(rng, 50)
    idx = _index()
    idx.add(np.arange(0, 50), data, "model=a")
    idx.add(np.arange(100, 150), data, "model=b")  # the very same vectors under another key
    idx.add(np.arange(200, 203), data[:3], "model=c")
    got, sims = idx.query(data, 10, "model=a")
    assert set(got.reshape(-1).tolist()) <= set(range(0, 50))
    assert np.array_equal(got[:, 0], np.arange(50))
    got, _ = idx.query(data, 10, "model=b")
    assert set(got.reshape(-1).tolist()) <= set(range(100, 150))
    got, _ = idx.query(data, 10, "model=c")
    assert got.shape == (50, 3) and set(got.reshape(-1).tolist()) == {200, 201, 202}
    assert idx.query(data, 10, "model=d")[0].shape == (50, 0)
    # Deleting in one key leaves the other untouched.
    idx.delete(np.arange(0, 50), "model=a")
    assert idx.labels("model=b") == set(range(100, 150))
    assert idx.query(data, 10, "model=a")[0].shape == (50, 0)
    assert sorted(idx.keys()) == ["model=a", "model=b", "model=c"]


def test_tombstone_share_triggers_compaction():
    rng = np.random.default_rng(5)
    data = unit_vectors(rng, 100)
    idx = _index(compact_tombstone_share=0.25)
    idx.add(np.arange(100), data, "k")
    assert not idx.needs_compaction("k")
    idx.delete(np.arange(25), "k")  # 25 % exactly: not more than the share
    assert not idx.needs_compaction("k")
    idx.delete([25], "k")
    assert idx.needs_compaction("k")
    assert not idx.needs_compaction("absent")
    live = np.arange(26, 100)
    idx.rebuild("k", live, data[26:])
    assert idx.tombstones("k") == 0 and not idx.needs_compaction("k")
    assert idx.labels("k") == set(live.tolist())
    got, _ = idx.query(data[26:], 1, "k")
    assert np.array_equal(got[:, 0], live)
    idx.rebuild("k", np.zeros(0, np.int64), np.zeros((0, DIM), np.float32))
    assert "k" not in idx.keys()


def test_store_compacts_a_partition_when_tombstones_pile_up(tmp_path):
    """The store rebuilds a partition on the next write once tombstones exceed the share."""
    import torch

    from comfyui_chai.cache.store import LatentStore

    rng = np.random.default_rng(6)
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        ids = [store.put({"x": torch.randn(2, 2)}, ["e"], unit_vectors(rng, 1), "k", "p") for _ in range(40)]
        store.delete(ids[:3])  # 3 of 40: under both the share and the minimum count
        store.put({"x": torch.randn(2, 2)}, ["e"], unit_vectors(rng, 1), "k", "p")
        assert store.index.tombstones("k") == 3, "a few tombstones must not trigger a rebuild"
        store.delete(ids[3:17])  # 17 of 41 stored vectors are tombstones: 41 % > 25 % and >= 16
        assert store.index.tombstones("k") == 17
        new = store.put({"x": torch.randn(2, 2)}, ["e"], unit_vectors(rng, 1), "k", "p")
        assert store.index.tombstones("k") == 0, "the put after the deletes must have compacted the partition"
        live = {int(r[0]) for r in store._conn().execute("SELECT label FROM entities WHERE compat_key='k'")}
        assert store.index.labels("k") == live and len(live) == 25
        found = {m.entry_id for m in store.search(unit_vectors(rng, 4), "k", k=40)}
        assert found <= set(ids[17:]) | {new, ids[-1] + 1} and not found & set(ids[:17])

def test_write_check_and_load_round_trip(tmp_path):
    """A partition written by hnswlib passes the structural check (labels, delete marks) and loads
    back with its tombstones and ef; a file that is not a whole partition is refused before hnswlib."""
    rng = np.random.default_rng(7)
    data = unit_vectors(rng, 120)
    idx = _index(ef_search=50)
    idx.add(np.arange(1, 121), data, "k")
    idx.delete([3, 4, 5], "k")
    path = tmp_path / partition_file_name("k")
    live, deleted = idx.write_partition("k", str(path))
    assert deleted == [3, 4, 5] and len(live) == 117
    info = check_hnsw_file(path.read_bytes(), DIM, 16, 200, max_count=120)
    assert info.count == 120 and sorted(info.labels.tolist()) == list(range(1, 121))
    assert sorted(info.labels[info.deleted].tolist()) == [3, 4, 5]

    fresh = _index(ef_search=50)
    fresh.load_partition("k", str(path), info.count, np.asarray(deleted))
    assert fresh.labels("k") == set(live) and fresh.tombstones("k") == 3
    assert fresh._parts["k"].index.ef == 50, "ef is not persisted by hnswlib and must be re-applied"
    assert fresh._parts["k"].index.get_max_elements() == 120, "capacity comes from the element count, not the file"
    got, _ = fresh.query(data, 5, "k")
    assert not ({3, 4, 5} & set(got.reshape(-1).tolist()))
    assert np.array_equal(fresh.query(data[10:20], 1, "k")[0][:, 0], np.arange(11, 21))
    with pytest.raises(IndexFileError, match="lacks labels"):
        _index().load_partition("k", str(path), info.count, np.asarray([7777]))

    blob = path.read_bytes()
    for bad, why in ((blob[: len(blob) // 2], "too short|ends inside|bytes after"), (blob + b"\0", "after the last"),
                     (blob[:40], "shorter than")):
        with pytest.raises(IndexFileError, match=why):
            check_hnsw_file(bad, DIM, 16, 200, max_count=120)
    with pytest.raises(IndexFileError, match="maxM"):
        check_hnsw_file(blob, DIM, 8, 200, max_count=120)  # another M than the store's
    with pytest.raises(IndexFileError, match="size_data_per_element|label_offset"):
        check_hnsw_file(blob, DIM + 1, 16, 200, max_count=120)  # another dimension
    with pytest.raises(IndexFileError, match="more than"):
        check_hnsw_file(blob, DIM, 16, 200, max_count=119)
    idx.drop("k")
    assert idx.write_partition("k", str(tmp_path / "other.bin")) is None and not (tmp_path / "other.bin").exists()


def test_validation_errors():
    with pytest.raises(ValueError, match="dimension"):
        EntityIndex(IndexParams(dim=0))
    idx = _index()
    with pytest.raises(ValueError, match=rf"\[n, {DIM}\]"):
        idx.add([1], np.zeros((1, DIM + 1), np.float32), "k")
    bad = unit_vectors(np.random.default_rng(0), 1)
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        idx.add([1], bad, "k")
    with pytest.raises(ValueError, match="2 labels for 1 vectors"):
        idx.add([1, 2], unit_vectors(np.random.default_rng(0), 1), "k")
    with pytest.raises(ValueError, match="NaN or Inf"):
        idx.query(bad, 1, "k")
    assert len(idx) == 0


# ---------------------------------------------------------------------------------------------- locking
def test_read_write_lock_semantics():
    lock = ReadWriteLock()
    inside = []
    both_in = threading.Barrier(2, timeout=5)

    def reader(tag):
        with lock.read():
            inside.append(tag)
            both_in.wait()  # two readers hold the lock at the same time, or this times out

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert sorted(inside) == [0, 1]

    # A writer waits for the reader, and a reader arriving while the writer waits queues behind it.
    events = []
    reader_in = threading.Event()
    release_reader = threading.Event()

    def long_reader():
        with lock.read():
            reader_in.set()
            release_reader.wait(5)
            events.append("reader1 out")

    def writer():
        with lock.write():
            events.append("writer in")
            time.sleep(0.05)
            events.append("writer out")

    def late_reader():
        with lock.read():
            events.append("reader2 in")

    t1 = threading.Thread(target=long_reader)
    t1.start()
    reader_in.wait(5)
    t2 = threading.Thread(target=writer)
    t2.start()
    while lock._writers_waiting == 0:
        time.sleep(0.001)
    t3 = threading.Thread(target=late_reader)
    t3.start()
    time.sleep(0.05)
    assert events == [], "neither the writer nor the late reader may enter while the first reader holds"
    release_reader.set()
    for t in (t1, t2, t3):
        t.join(5)
    assert events == ["reader1 out", "writer in", "writer out", "reader2 in"]


def test_concurrent_queries_while_inserting_deleting_and_growing():
    """Readers query stable vectors while a writer adds (forcing resizes), deletes and rebuilds.

    hnswlib's add_items + knn_query at the same time is unsafe (it can crash the process); with
    the lock, every query of a stable vector returns itself first, and no label deleted before a
    query started is ever returned by it.
    """
    rng = np.random.default_rng(8)
    stable = unit_vectors(rng, 400)
    stable_labels = np.arange(400)
    idx = _index(ef_search=16)
    idx.add(stable_labels, stable, "k")
    fresh = unit_vectors(rng, 2500)
    deleted_done: list[int] = []  # appended only after delete() returned
    errors: list[BaseException] = []
    stop = threading.Event()
    counts = {"queries": 0}

    def writer():
        try:
            for start in range(0, 2500, 100):
                labels = np.arange(10_000 + start, 10_000 + start + 100)
                idx.add(labels, fresh[start:start + 100], "k")  # grows past 1,024, then 2,048
                idx.delete(labels[:40], "k")
                deleted_done.extend(labels[:40].tolist())
                if start % 800 == 700:
                    live = sorted(idx.labels("k"))
                    vecs = np.concatenate([stable, fresh[np.asarray([x - 10_000 for x in live if x >= 10_000],
                                                                     dtype=np.int64)]])
                    idx.rebuild("k", np.asarray(live), vecs)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            stop.set()

    def reader(seed):
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                before = set(deleted_done)
                pick = r.integers(0, 400, size=8)
                got, sims = idx.query(stable[pick], 30, "k")
                assert np.array_equal(got[:, 0], stable_labels[pick]), "a stable vector did not find itself"
                assert np.allclose(sims[:, 0], 1.0, atol=1e-4)
                assert not (before & set(got.reshape(-1).tolist())), "a deleted label was returned"
                counts["queries"] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    readers = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    w = threading.Thread(target=writer)
    for t in readers + [w]:
        t.start()
    for t in readers + [w]:
        t.join(60)
    assert not errors, f"{type(errors[0]).__name__}: {errors[0]}"
    assert counts["queries"] > 20, "the readers hardly ran; the test proved nothing"
    assert idx.labels("k") == set(stable_labels.tolist()) | (
        {10_000 + i for i in range(2500)} - set(deleted_done))
