"""LatentStore: persistence across restarts, the byte budget, eviction policies, bad input.

All tests use small random tensors and random 16-d unit embeddings (no spaCy, no MiniLM). The
store's guarantees come from DESIGN.md "The store" and reference/ecosystem.md section 2.5:
the manifest is the truth, LRU order lives in the manifest (so it survives restarts, unlike
GPTCache's in-memory LRU), the byte budget is never exceeded, and evicting deletes the file,
the rows and the vectors.
"""

from __future__ import annotations

import math
import random
import sqlite3
import time

import numpy as np
import pytest
import torch

from _store_util import (
    DIM,
    KEYS,
    assert_seeded_entry,
    assert_tensors_equal,
    latent_files,
    manifest_files,
    manifest_labels,
    manifest_rows,
    manifest_total,
    put_seeded,
    seeded_entry,
    unit_vectors,
)
from comfyui_chai.cache.policy import EvictionPolicy
from comfyui_chai.cache.store import BudgetError, EntryTooLargeError, LatentStore, StoreConfig, StoreError

KEY = "model=t|shape=4x8|fp32"


def _one(store, n_cols: int = 8, key: str = KEY, entities=("a dog",), seed: int = 0, prompt: str = "p") -> int:
    rng = np.random.default_rng(seed)
    tensors = {"x": torch.from_numpy(rng.standard_normal((4, n_cols)).astype(np.float32))}
    return store.put(tensors, list(entities), unit_vectors(rng, len(entities)), key, prompt)


def _snapshot(store) -> dict:
    """id -> (record fields, tensor bytes): everything a restart or a failed call must keep."""
    out = {}
    for rec in store.entries():
        tensors = store.load(rec.entry_id)
        assert tensors is not None
        out[rec.entry_id] = (rec.compat_key, rec.prompt, tuple(rec.entities), rec.nbytes, rec.info,
                             {k: (v.dtype, tuple(v.shape), v.contiguous().view(torch.uint8).numpy().tobytes())
                              for k, v in tensors.items()})
    return out


# ---------------------------------------------------------------------------------------------- restarts
def test_reopen_keeps_every_entry_byte_equal(tmp_path):
    seeds = list(range(100, 124))
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        ids = {put_seeded(store, s): s for s in seeds}
        # Prompt text is not validated by the store (lookup does that): empty and odd ones round-trip.
        odd = {}
        for prompt in ("", "   ", "ünïcødé 🐕 prompt\nwith a newline"):
            odd[_one(store, prompt=prompt, seed=len(odd))] = prompt
        labels_before = {k: store.index.labels(k) for k in KEYS}
    assert len(set(ids)) == len(seeds)

    with LatentStore(tmp_path / "s") as store:
        assert store.dim == DIM
        assert len(store) == len(seeds) + len(odd)
        for entry_id, seed in ids.items():
            assert_seeded_entry(store, entry_id, seed)
        for entry_id, prompt in odd.items():
            assert store.entry(entry_id).prompt == prompt
        # The index came back with exactly the manifest's labels and finds every entity again.
        for key in KEYS:
            assert store.index.labels(key) == labels_before[key] == manifest_labels(store.path, key)
        for entry_id, seed in ids.items():
            e = seeded_entry(seed)
            matches = store.search(e["embeddings"], e["compat_key"], k=1)
            assert {(m.query_index, m.entry_id) for m in matches} == {(i, entry_id) for i in range(len(e["entities"]))}
            assert all(m.similarity > 0.999 for m in matches)
            assert sorted(m.text for m in matches) == sorted(e["entities"])
        assert store.open_report == [], f"a clean reopen repaired something: {store.open_report}"


def test_counters_and_lookup_log_persist_across_restarts(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        a = put_seeded(store, 1)
        put_seeded(store, 2)
        store.record_lookup("a red car", ["red car", "road"], a, "red car", "entity 1 #0", 0.93, 2.5)
        store.record_lookup("a red car again", ["red car"], a, "red car", "entity 1 #0", 0.95, 1.5)
        store.record_lookup("a cat", ["cat"], None, "cat", None, None, 4.0)
        before = store.stats()
    assert (before.hits, before.misses, before.lookups, before.inserts) == (2, 1, 3, 2)
    assert before.hit_rate == pytest.approx(2 / 3)
    assert before.top_entities[0] == ("red car", 2)
    assert before.lookup_ms_mean == pytest.approx((2.5 + 1.5 + 4.0) / 3)

    with LatentStore(tmp_path / "s") as store:
        after = store.stats()
        assert after.to_dict() == before.to_dict()
        rec = store.entry(a)
        assert rec.access_count == 2 and rec.last_access > rec.created_at
        # Counting continues from the persisted values.
        store.record_lookup("a dog", ["dog"], None, "dog", None, None, 1.0)
        put_seeded(store, 3)
    with LatentStore(tmp_path / "s") as store:
        s = store.stats()
        assert (s.hits, s.misses, s.lookups, s.inserts, s.entries) == (2, 2, 4, 3, 3)
        assert s.last_lookups[0]["prompt"] == "a dog" and s.last_lookups[0]["hit"] is False


def test_lru_order_persists_across_restart(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        ids = [_one(store, seed=i) for i in range(3)]
        size = store.entry(ids[0]).nbytes
        store.set_budget(3 * size + size // 2)  # room for exactly three entries
        # Touch the oldest entry: it becomes the most recently used one.
        store.record_lookup("old", ["a dog"], ids[0], "a dog", "a dog", 1.0, 1.0)
    with LatentStore(tmp_path / "s") as store:  # budget and policy come from the manifest
        assert store.config.budget_bytes == 3 * size + size // 2
        assert store.config.policy is EvictionPolicy.LRU
        new = _one(store, seed=10)
        assert store.entry(ids[1]) is None, "the least recently used entry (the untouched second one) must go"
        assert {r.entry_id for r in store.entries()} == {ids[0], ids[2], new}
        new2 = _one(store, seed=11)
        assert {r.entry_id for r in store.entries()} == {ids[0], new, new2}
    with LatentStore(tmp_path / "s") as store:
        assert store.stats().evictions == 2


# ---------------------------------------------------------------------------------------------- policies
def _policy_scenario(tmp_path, policy: str) -> list[str]:
    """Insert A, B, C, D; serve B x3, then C, A, D once each; insert E, then F. Returns victims in order.

    Counts: A1 B3 C1 D1. Last access: B < C < A < D. Created: A < B < C < D.
    Hand-checked victims: LRU -> B then C; FIFO -> A then B; LFU (count, then recency) -> C, then
    E itself: the newcomer has count 0, the least of all (pure LFU's known bias against new entries).
    """
    names = {}
    with LatentStore(tmp_path / policy, dim=DIM, policy=policy) as store:
        for i, name in enumerate("ABCD"):
            names[_one(store, seed=i)] = name
        size = store.entry(next(iter(names))).nbytes
        store.set_budget(4 * size + size // 2)
        by_name = {v: k for k, v in names.items()}

        def serve(name):
            store.record_lookup(name, [name], by_name[name], name, name, 1.0, 1.0)
            time.sleep(0.002)  # distinct last_access stamps even on a coarse clock

        for name in "BBBCAD":
            serve(name)
        victims = []
        for i, name in enumerate("EF"):
            alive = {r.entry_id for r in store.entries()}
            names[_one(store, seed=10 + i)] = name
            gone = alive - {r.entry_id for r in store.entries()}
            assert len(gone) == 1, f"{policy}: inserting {name} evicted {len(gone)} entries, expected exactly one"
            victims.append(names[gone.pop()])
        assert store.stats().evictions == 2
    return victims


@pytest.mark.parametrize("policy, expected", [("lru", ["B", "C"]), ("lfu", ["C", "E"]), ("fifo", ["A", "B"])])
def test_policy_evicts_the_right_victims(tmp_path, policy, expected):
    assert _policy_scenario(tmp_path, policy) == expected


def test_policy_parse_and_order():
    assert EvictionPolicy.parse("LRU") is EvictionPolicy.LRU
    assert EvictionPolicy.parse(" fifo ") is EvictionPolicy.FIFO
    assert EvictionPolicy.parse(EvictionPolicy.LFU) is EvictionPolicy.LFU
    with pytest.raises(ValueError, match="lru, lfu, fifo"):
        EvictionPolicy.parse("random")


def test_eviction_deletes_file_rows_and_vectors(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        first = _one(store, seed=0, entities=("a dog", "a beach"))
        size = store.entry(first).nbytes
        file = f"{first}.safetensors"
        labels = manifest_labels(store.path, KEY)
        vecs = unit_vectors(np.random.default_rng(0), 2)  # the exact embeddings _one(seed=0) stored
        assert [m.entry_id for m in store.search(vecs, KEY, k=1)] == [first, first]
        store.set_budget(2 * size + size // 2)
        others = [_one(store, seed=i) for i in (1, 2)]  # the second of these pushes `first` out
        assert store.entry(first) is None
        assert store.load(first) is None
        assert file not in latent_files(store.path), "the evicted entry's latent file is still on disk"
        assert not manifest_rows(store.path, "SELECT 1 FROM entities WHERE entry_id=?", (first,))
        assert not (labels & store.index.labels(KEY)), "the evicted entry's vectors are still live in the index"
        assert all(m.entry_id != first for m in store.search(vecs, KEY, k=10))
        assert {m.entry_id for m in store.search(vecs, KEY, k=10)} <= set(others)
        assert store.stats().evictions == 1
    with LatentStore(tmp_path / "s") as store:  # and not resurrected by the saved index
        assert all(m.entry_id != first for m in store.search(vecs, KEY, k=10))


def test_5000_random_inserts_never_exceed_the_budget(tmp_path):
    """Random sizes (one key per shape) under a 1 MB budget (~600 entries held, ~4,400 evictions):
    after EVERY insert the manifest's byte total is within budget and the new entry is there; at
    the end the bytes on disk equal the manifest total and the index equals the manifest."""
    budget = 1_000_000
    rng = random.Random(7)
    widths = [1, 7, 24, 96, 180, 300]  # float32 [4, w]: 16 B .. 4.8 KB of data plus a ~100 B header
    cfg = StoreConfig(budget_bytes=budget, durable=False, autosave_every=1000)
    total_inserted = 0
    with LatentStore(tmp_path / "s", config=cfg, dim=DIM) as store:
        # An independent read-only connection: it sees only what the store has committed.
        reader = sqlite3.connect(f"file:{store.path / 'manifest.sqlite'}?mode=ro", uri=True)
        for i in range(5000):
            w = rng.choice(widths)
            dtype = torch.float32
            key = f"w{w}"
            n_ent = rng.randint(1, 3)
            tensors = {"x": torch.full((4, w), float(i), dtype=dtype)}
            emb = unit_vectors(np.random.default_rng(i), n_ent)
            entry_id = store.put(tensors, [f"e{i}.{j}" for j in range(n_ent)], emb, key, f"p{i}")
            total_inserted += 1
            held = reader.execute("SELECT COALESCE(SUM(nbytes), 0) FROM entries").fetchone()[0]
            assert held <= budget, f"insert {i}: manifest holds {held} bytes, budget {budget}"
            assert store.entry(entry_id) is not None, f"insert {i}: the entry just inserted is missing"
        reader.close()
        stats = store.stats()
        assert stats.bytes == manifest_total(store.path) <= budget
        assert stats.inserts == total_inserted
        assert stats.evictions == total_inserted - stats.entries
        files = latent_files(store.path)
        assert sum(files.values()) == manifest_total(store.path), "bytes on disk differ from the manifest total"
        assert set(files) == manifest_files(store.path)
        for key in {r[0] for r in manifest_rows(store.path, "SELECT DISTINCT compat_key FROM entities")}:
            assert store.index.labels(key) == manifest_labels(store.path, key)
        # The newest entry survives and loads with its exact values.
        newest = max(r.entry_id for r in store.entries())
        loaded = store.load(newest)
        assert loaded is not None and float(loaded["x"].float().mean()) == 4999.0
        assert store.verify().ok


def test_set_budget_smaller_evicts_only_when_confirmed_and_persists(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        ids = [_one(store, seed=i) for i in range(10)]
        size = store.entry(ids[0]).nbytes
        before, budget = _snapshot(store), store.config.budget_bytes
        with pytest.raises(BudgetError, match=f"would evict 6 entries \\({6 * size:,} bytes.*--evict-to-fit") as err:
            store.set_budget(4 * size)
        assert (err.value.evict_entries, err.value.evict_bytes, err.value.held_bytes) == (6, 6 * size, 10 * size)
        assert _snapshot(store) == before and store.stats().budget_bytes == budget == store.config.budget_bytes
        evicted = store.set_budget(4 * size, evict_to_fit=True)
        assert evicted == 6
        assert [r.entry_id for r in store.entries()] == ids[6:]  # LRU with no access: oldest go first
        assert manifest_total(store.path) == 4 * size == sum(latent_files(store.path).values())
        with pytest.raises(ValueError, match="positive"):
            store.set_budget(0)
        assert store.config.budget_bytes == 4 * size
    with LatentStore(tmp_path / "s") as store:
        assert store.config.budget_bytes == 4 * size
        assert len(store) == 4
    # Reopening with an explicit smaller budget is refused (nothing saved or evicted) unless confirmed.
    with pytest.raises(BudgetError, match="would evict 2 entries"):
        LatentStore(tmp_path / "s", budget_bytes=2 * size)
    with LatentStore(tmp_path / "s") as store:
        assert len(store) == 4 and store.config.budget_bytes == 4 * size
    with LatentStore(tmp_path / "s", budget_bytes=2 * size, evict_to_fit=True) as store:
        assert [r.entry_id for r in store.entries()] == ids[8:]
        assert store.stats().evictions == 8


def test_budget_and_policy_changed_by_another_handle_apply_without_reopen(tmp_path):
    """Two open handles on one folder stand for two ComfyUI processes: a budget (and policy) change made
    through one is obeyed by the other's next insert and shown by its stats, with no reopen."""
    with LatentStore(tmp_path / "s", dim=DIM) as a, LatentStore(tmp_path / "s") as b:
        ids = [_one(a, seed=i) for i in range(6)]
        size = a.entry(ids[0]).nbytes
        assert b.stats().budget_bytes == a.config.budget_bytes > 6 * size
        assert a.set_budget(3 * size, evict_to_fit=True) == 3
        assert b.stats().budget_bytes == 3 * size
        new = _one(b, seed=10)  # b's insert evicts down to a's budget
        assert manifest_total(b.path) <= 3 * size and len(b) == 3
        assert [r.entry_id for r in b.entries()] == ids[4:] + [new]
        # A budget lowered elsewhere below an entry's size refuses that entry and stores nothing.
        a.set_budget(size // 2, evict_to_fit=True)
        before = _snapshot(b)
        with pytest.raises(ValueError, match="budget"):
            _one(b, seed=11)
        assert _snapshot(b) == before
    with LatentStore(tmp_path / "s") as c:
        assert c.config.budget_bytes == size // 2


def test_entry_larger_than_budget_is_refused_and_stores_nothing(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM, budget_bytes=4096) as store:
        kept = _one(store, seed=0)
        before = _snapshot(store)
        big = {"x": torch.zeros(4, 2000)}
        with pytest.raises(ValueError, match="budget"):
            store.put(big, ["a dog"], unit_vectors(np.random.default_rng(1), 1), "model=t|big", "big")
        assert _snapshot(store) == before
        assert set(latent_files(store.path)) == manifest_files(store.path)
        assert store.stats().inserts == 1 and store.stats().evictions == 0
    with LatentStore(tmp_path / "s") as store:
        assert _snapshot(store) == before and kept in before


def test_entry_of_exactly_the_budget_fits_and_evicts_everything_else(tmp_path):
    big = {"x": torch.randn(4, 256)}
    emb = unit_vectors(np.random.default_rng(3), 1)
    with LatentStore(tmp_path / "probe", dim=DIM) as probe:  # learn the entry's exact file size
        size = probe.entry(probe.put(big, ["a dog"], emb, "model=t|big", "big")).nbytes
    with LatentStore(tmp_path / "s", dim=DIM, budget_bytes=size) as store:
        small = [_one(store, n_cols=2, seed=i) for i in range(5)]
        assert len(store) == 5
        entry_id = store.put(big, ["a dog"], emb, "model=t|big", "big")
        assert [r.entry_id for r in store.entries()] == [entry_id]
        assert manifest_total(store.path) == size and store.stats().evictions == 5
        assert all(store.load(i) is None for i in small)
        store.set_budget(size - 1, evict_to_fit=True)  # now it no longer fits: evicted, and a new copy is refused
        assert len(store) == 0 and latent_files(store.path) == {}
        with pytest.raises(EntryTooLargeError, match=f"{size:,} bytes, more than the store's whole budget of {size - 1:,}"):
            store.put(big, ["a dog"], emb, "model=t|big", "big")


# ---------------------------------------------------------------------------------------------- bad input
def _bad_puts():
    rng = np.random.default_rng(5)
    good_t = {"x": torch.randn(4, 8)}
    e1 = unit_vectors(rng, 1)
    nan = torch.randn(4, 8)
    nan[1, 2] = math.nan
    inf = torch.randn(4, 8)
    inf[0, 0] = math.inf
    bad_emb = e1.copy()
    bad_emb[0, 3] = np.nan
    return [
        ("prompt None", (good_t, ["a dog"], e1, KEY, None), "prompt"),
        ("prompt int", (good_t, ["a dog"], e1, KEY, 5), "prompt"),
        ("prompt bytes", (good_t, ["a dog"], e1, KEY, b"a dog"), "prompt"),
        ("NaN latent", ({"x": nan}, ["a dog"], e1, KEY, "p"), "NaN or Inf"),
        ("Inf latent", ({"x": inf}, ["a dog"], e1, KEY, "p"), "NaN or Inf"),
        ("int64 latent", ({"x": torch.ones(4, 8, dtype=torch.int64)}, ["a dog"], e1, KEY, "p"), "int64"),
        ("float64 latent", ({"x": torch.randn(4, 8, dtype=torch.float64)}, ["a dog"], e1, KEY, "p"), "float64"),
        ("numpy latent", ({"x": np.zeros((4, 8), np.float32)}, ["a dog"], e1, KEY, "p"), "torch.Tensor"),
        ("shape vs key", ({"x": torch.randn(4, 9)}, ["a dog"], e1, KEY, "p"), "differ from those already stored"),
        ("dtype vs key", ({"x": torch.randn(4, 8).half()}, ["a dog"], e1, KEY, "p"), "differ from those already stored"),
        ("names vs key", ({"y": torch.randn(4, 8)}, ["a dog"], e1, KEY, "p"), "differ from those already stored"),
        ("empty tensor", ({"x": torch.zeros(0, 8)}, ["a dog"], e1, "other", "p"), "non-empty"),
        ("0-d tensor", ({"x": torch.tensor(1.0)}, ["a dog"], e1, "other", "p"), "non-empty"),
        ("no tensors", ({}, ["a dog"], e1, KEY, "p"), "non-empty mapping"),
        ("2 entities 1 row", (good_t, ["a dog", "a cat"], e1, KEY, "p"), r"embeddings must be \[2, dim\]"),
        ("1 entity 3 rows", (good_t, ["a dog"], unit_vectors(rng, 3), KEY, "p"), r"embeddings must be \[1, dim\]"),
        ("entities as one string", (good_t, "dog", unit_vectors(rng, 3), KEY, "p"), "list of strings"),
        ("no entities", (good_t, [], np.zeros((0, DIM), np.float32), KEY, "p"), "at least one entity"),
        ("1-d embeddings", (good_t, ["a dog"], e1[0], KEY, "p"), "embeddings must be"),
        ("wrong dim", (good_t, ["a dog"], unit_vectors(rng, 1, DIM + 1), KEY, "p"), f"store holds {DIM}-d"),
        ("NaN embedding", (good_t, ["a dog"], bad_emb, KEY, "p"), "NaN or Inf"),
        ("empty key", (good_t, ["a dog"], e1, "", "p"), "compat_key"),
        ("non-str key", (good_t, ["a dog"], e1, 7, "p"), "compat_key"),
    ]


@pytest.mark.parametrize("case", _bad_puts(), ids=lambda c: c[0])
def test_bad_put_is_a_clear_error_and_loses_nothing(tmp_path, case):
    _name, args, message = case
    path = tmp_path / "s"
    with LatentStore(path, dim=DIM) as store:
        kept = [_one(store, seed=i) for i in range(3)]
        before = _snapshot(store)
        gen = store.generation
        with pytest.raises(ValueError, match=message):
            store.put(*args)
        assert _snapshot(store) == before
        assert store.generation == gen
        assert set(latent_files(path)) == manifest_files(path), \
            "a refused put left a latent file behind"
        # The store still works after the error.
        _one(store, seed=99)
    with LatentStore(path) as store:
        after = _snapshot(store)
        assert {k: after[k] for k in kept} == before
        assert store.verify().ok


def test_empty_and_whitespace_prompts_are_stored(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        a = _one(store, prompt="")
        b = _one(store, prompt=" \t ", seed=1)
        assert store.entry(a).prompt == "" and store.entry(b).prompt == " \t "


@pytest.mark.parametrize("budget", [0, -1, -(1 << 40), 1 << 60, 1.5, True, "100"])
def test_bad_budget_is_a_clear_error_and_loses_nothing(tmp_path, budget):
    path = tmp_path / "s"
    with LatentStore(path, dim=DIM) as store:
        [_one(store, seed=i) for i in range(3)]
        before = _snapshot(store)
        with pytest.raises(ValueError, match="budget must be a positive number of bytes"):
            store.set_budget(budget)
        assert store.config.budget_bytes == StoreConfig().budget_bytes
    with pytest.raises(ValueError, match="budget must be a positive number of bytes"):
        LatentStore(path, budget_bytes=budget)
    with pytest.raises(ValueError, match="budget must be a positive number of bytes"):
        LatentStore(path, config=StoreConfig(budget_bytes=budget))
    with LatentStore(path) as store:
        assert _snapshot(store) == before
        assert store.config.budget_bytes == StoreConfig().budget_bytes


def test_bad_open_arguments(tmp_path):
    path = tmp_path / "s"
    with LatentStore(path, dim=DIM) as store:
        [_one(store, seed=i) for i in range(2)]
        before = _snapshot(store)
    with pytest.raises(StoreError, match="holds 16-d embeddings but the embedder gives 384-d"):
        LatentStore(path, dim=384)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        LatentStore(path, policy="mru")
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    with pytest.raises(StoreError, match="is not a CHAI store but a file; give a folder"):
        LatentStore(a_file)
    assert a_file.read_text() == "not a folder"
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "manifest.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="is not a CHAI manifest .*CHAI never alters it"):
        LatentStore(garbage)
    assert sorted(p.name for p in garbage.iterdir()) == ["manifest.sqlite"]
    with LatentStore(path) as store:
        assert _snapshot(store) == before


def test_closed_store_refuses_writes(tmp_path):
    store = LatentStore(tmp_path / "s", dim=DIM)
    _one(store)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        _one(store, seed=1)
    with LatentStore(tmp_path / "s") as again:
        assert len(again) == 1


def test_tensor_dtypes_round_trip(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        want = {}
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            t = {"a": torch.randn(2, 3, 4).to(dt), "b": torch.randn(5).to(dt)}
            want[store.put(t, ["x"], unit_vectors(np.random.default_rng(0), 1), f"k-{dt}", "p")] = t
        # Non-contiguous input is stored as its values.
        nc = {"a": torch.randn(4, 6).t()}
        want[store.put(nc, ["x"], unit_vectors(np.random.default_rng(1), 1), "k-nc", "p")] = nc
    with LatentStore(tmp_path / "s") as store:
        for entry_id, t in want.items():
            assert_tensors_equal(store.load(entry_id), {k: v.contiguous() for k, v in t.items()})
