"""PostgresStore against a real embedded PostgreSQL 18 + pgvector server (never a mock).

The same guarantees as the folder store (tests/test_store*.py), now across processes that share
one database: entries round-trip byte for byte, the byte budget holds with several writers,
LRU/LFU/FIFO pick the same victims as the folder store, a killed client leaves no partial entry,
a dropped connection or a server restart is survived, and every bad setup is a clear error.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch

from _store_util import DIM, assert_seeded_entry, put_seeded, seeded_entry, unit_vectors
from comfyui_chai.cache.pgstore import PostgresStore, is_postgres_url, location_exists, open_location
from comfyui_chai.cache.store import BudgetError, LatentStore, StoreError

HERE = Path(__file__).resolve().parent
KEY = "model=t|shape=4x8|fp32"


def _one(store, seed: int = 0, entities=("a dog",), key: str = KEY, prompt: str = "p") -> int:
    rng = np.random.default_rng(seed)
    tensors = {"x": torch.from_numpy(rng.standard_normal((4, 8)).astype(np.float32))}
    return store.put(tensors, list(entities), unit_vectors(rng, len(entities)), key, prompt)


def _sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def assert_consistent(url: str, deleted: int = 0) -> dict:
    """No partial entry: every entry has entities and a blob that verifies; the byte counter is
    exact and within the budget; every insert is stored, evicted, quarantined or one of the
    ``deleted``. Returns {"entries", "inserts", "evictions"}."""
    orphans = _sql(url, "SELECT count(*) FROM chai_entries e WHERE NOT EXISTS "
                        "(SELECT 1 FROM chai_entities x WHERE x.entry_id = e.id)")[0][0]
    assert orphans == 0, f"{orphans} entries without entities (a partial insert)"
    held = _sql(url, "SELECT coalesce(sum(nbytes), 0) FROM chai_entries")[0][0]
    counters = dict(_sql(url, "SELECT name, value FROM chai_counters"))
    budget = int(_sql(url, "SELECT value FROM chai_meta WHERE key='budget_bytes'")[0][0])
    assert counters["bytes_held"] == held, "byte counter drifted from the entries"
    assert held <= budget, f"{held} bytes held, budget {budget}"
    with PostgresStore(url) as store:
        report = store.verify()
        assert report.ok, report.problems
        entries = len(store)
    gone = counters["evictions"] + counters["quarantined"] + deleted
    assert entries + gone == counters["inserts"], "an insert is neither stored nor evicted"
    return {"entries": entries, "inserts": int(counters["inserts"]), "evictions": int(counters["evictions"])}


# ---------------------------------------------------------------------------------------------- basics
def test_round_trip_search_stats_and_reopen(pg_url):
    seeds = list(range(40))
    with PostgresStore(pg_url, dim=DIM) as store:
        ids = {put_seeded(store, s): s for s in seeds}
        for entry_id, seed in ids.items():
            assert_seeded_entry(store, entry_id, seed)
        e = seeded_entry(7)
        best = store.search(e["embeddings"], e["compat_key"], k=3)
        assert best[0].similarity == pytest.approx(1.0, abs=1e-5) and best[0].text in e["entities"]
        assert all(store.entry(m.entry_id).compat_key == e["compat_key"] for m in best)
        assert store.search(e["embeddings"], "no such key") == []
        generation = store.generation
        store.record_lookup(e["prompt"], e["entities"], best[0].entry_id, e["entities"][0], best[0].text, 1.0, 2.5)
        store.record_lookup("miss", ["a cat"], None, "a cat", None, None, 1.5)
    with open_location(pg_url, create=False, options={"index_ef_search": 40}) as store:
        # reopen: dimension, budget and counters come from the database
        assert store.dim == DIM and store.generation == generation and store.config.index_ef_search == 40
        assert store.compat_keys() == sorted({seeded_entry(s)["compat_key"] for s in seeds})
        store.set_policy("FIFO")
        assert store.policy == "fifo" and store.budget_bytes == 1 << 30 and not store.closed
    with open_location(pg_url, options={"budget_bytes": 10**6, "durable": False}) as store:
        assert store.budget_bytes == 1 << 30 and store.policy == "fifo", "options never replace the stored budget"
        stats = store.stats()
        assert (stats.entries, stats.inserts, stats.hits, stats.misses, stats.lookups) == (40, 40, 1, 1, 2)
        assert stats.hit_rate == 0.5 and stats.lookup_ms_mean == pytest.approx(2.0)
        assert stats.last_lookups[0]["prompt"] == "miss" and stats.last_lookups[1]["hit"] is True
        assert [r.entry_id for r in store.entries()] == sorted(ids)
        assert store.entry(best[0].entry_id).access_count == 1
    assert_consistent(pg_url)


def test_search_matches_exact_cosine_ranking(pg_url):
    """pgvector's HNSW answers (several query vectors in one round trip) equal brute force here."""
    rng = np.random.default_rng(3)
    with PostgresStore(pg_url, dim=DIM) as store:
        vecs = unit_vectors(rng, 200)
        labels = {}
        for i in range(0, 200, 4):
            entry_id = store.put({"x": torch.zeros(2, 2)}, [f"e{j}" for j in range(i, i + 4)], vecs[i:i + 4], KEY, "p")
            labels.update({f"e{j}": entry_id for j in range(i, i + 4)})
        queries = unit_vectors(rng, 3)
        got = store.search(queries, KEY, k=5)
        for qi in range(3):
            want = np.argsort(-(vecs @ queries[qi]))[:5]
            mine = [m for m in got if m.query_index == qi]
            assert [m.text for m in mine] == [f"e{j}" for j in want]
            assert [m.similarity for m in mine] == pytest.approx((vecs[want] @ queries[qi]).tolist(), abs=1e-5)
            assert all(m.entry_id == labels[m.text] for m in mine)


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
def test_policies_evict_the_same_victims_as_the_folder_store(pg_url, tmp_path, policy):
    """One scenario on both backends: A-D inserted, B served x3 then C, A, D; insert E and F."""
    def scenario(store):
        names = {}
        for i, name in enumerate("ABCD"):
            names[_one(store, seed=i)] = name
        size = store.entry(next(iter(names))).nbytes
        store.set_budget(4 * size + size // 2)
        by_name = {v: k for k, v in names.items()}
        for name in "BBBCAD":
            store.record_lookup(name, [name], by_name[name], name, name, 1.0, 1.0)
            time.sleep(0.002)
        victims = []
        for i, name in enumerate("EF"):
            alive = {r.entry_id for r in store.entries()}
            names[_one(store, seed=10 + i)] = name
            victims += [names[v] for v in alive - {r.entry_id for r in store.entries()}]
        return victims

    with LatentStore(tmp_path / "s", dim=DIM, policy=policy) as folder:
        want = scenario(folder)
    with PostgresStore(pg_url, dim=DIM, policy=policy) as pg:
        assert scenario(pg) == want == {"lru": ["B", "C"], "lfu": ["C", "E"], "fifo": ["A", "B"]}[policy]
        assert pg.stats().evictions == 2


def test_budget_set_by_another_client_governs_the_next_insert(pg_url):
    with PostgresStore(pg_url, dim=DIM) as a, PostgresStore(pg_url) as b:
        ids = [_one(a, seed=i) for i in range(6)]
        size = a.entry(ids[0]).nbytes
        with pytest.raises(BudgetError, match="would evict 3 entries"):
            a.set_budget(3 * size)  # a smaller budget is refused unless confirmed; nothing changes
        assert len(b) == 6 and b.stats().budget_bytes != 3 * size
        assert a.set_budget(3 * size, evict_to_fit=True) == 3
        assert b.stats().budget_bytes == 3 * size
        new = _one(b, seed=10)
        assert [r.entry_id for r in b.entries()] == ids[4:] + [new]
        assert a.set_budget(size // 2, evict_to_fit=True) == 3  # smaller than one entry: everything goes
        with pytest.raises(ValueError, match="budget"):
            _one(b, seed=11)
        assert len(b) == 0 and b.stats().inserts == 7
    assert_consistent(pg_url)


def test_bad_puts_store_nothing(pg_url):
    with PostgresStore(pg_url, dim=DIM, budget_bytes=4096) as store:
        kept = _one(store, seed=0)
        rng = np.random.default_rng(1)
        with pytest.raises(ValueError, match="budget"):
            store.put({"x": torch.zeros(4, 2000)}, ["a dog"], unit_vectors(rng, 1), KEY + "big", "big")
        with pytest.raises(ValueError, match="differ"):
            store.put({"x": torch.zeros(3, 3)}, ["a dog"], unit_vectors(rng, 1), KEY, "other shape")
        with pytest.raises(ValueError, match="NaN"):
            store.put({"x": torch.full((4, 8), float("nan"))}, ["a dog"], unit_vectors(rng, 1), KEY, "nan")
        with pytest.raises(ValueError, match="16-d"):
            store.put({"x": torch.zeros(4, 8)}, ["a dog"], unit_vectors(rng, 1, dim=8), KEY, "dim")
        assert [r.entry_id for r in store.entries()] == [kept] and store.stats().inserts == 1
    assert_consistent(pg_url)


def test_corrupt_latents_are_quarantined_and_never_served(pg_url):
    with PostgresStore(pg_url, dim=DIM) as store:
        ids = [put_seeded(store, s) for s in range(5)]
        _sql(pg_url, "UPDATE chai_entries SET blob = overlay(blob placing '\\xff'::bytea from 100 for 1) "
                     "WHERE id = %s", (ids[1],))
        _sql(pg_url, "UPDATE chai_entries SET blob = substring(blob from 1 for 50) WHERE id = %s", (ids[2],))
        assert store.load(ids[1]) is None and store.entry(ids[1]) is None
        report = store.verify()
        assert not report.ok and report.files_quarantined == [str(ids[2])]
        assert store.verify().ok
        stats = store.stats()
        assert stats.quarantined == 2 and stats.entries == 3
        assert {e["kind"] for e in store.events()} == {"quarantined"}
        assert _sql(pg_url, "SELECT count(*) FROM chai_quarantine")[0][0] == 2
        assert_seeded_entry(store, ids[0], 0)
    assert_consistent(pg_url)


def test_a_database_from_elsewhere_cannot_make_a_client_trust_its_rows(pg_url):
    """The folder store's rules for a crafted manifest hold for crafted rows: a latent whose SHA-256
    matches but whose header describes other tensors is refused before a tensor is built; a row
    recording more than MAX_ENTRY_BYTES is refused before a byte is sent; text is read truncated;
    a setting CHAI never writes is an error naming it."""
    import hashlib

    from safetensors.torch import save

    from comfyui_chai.cache import pgstore

    with PostgresStore(pg_url, dim=DIM) as store:
        ids = [_one(store, seed=s) for s in range(3)]
        forged = save({"x": torch.zeros(2, 16)})  # valid safetensors of another shape
        _sql(pg_url, "UPDATE chai_entries SET blob=%s, nbytes=%s, sha256=%s WHERE id=%s",
             (forged, len(forged), hashlib.sha256(forged).hexdigest(), ids[0]))
        _sql(pg_url, "UPDATE chai_entries SET nbytes=%s WHERE id=%s", (1 << 40, ids[1]))
        assert store.load(ids[0]) is None and store.load(ids[1]) is None
        reasons = " ".join(e["detail"] for e in store.events())
        assert "has shape [2, 16], the store expects [4, 8]" in reasons and "outside 1.." in reasons
        _sql(pg_url, "UPDATE chai_entries SET prompt=repeat('p', 50000), info='[not json' WHERE id=%s", (ids[2],))
        _sql(pg_url, "UPDATE chai_entities SET text=repeat('e', 5000) WHERE entry_id=%s", (ids[2],))
        rec = store.entry(ids[2])
        assert len(rec.prompt) == pgstore._MAX_PROMPT and rec.info == {} and len(rec.entities[0]) == pgstore._MAX_TEXT
        assert store.load(ids[2]) is not None  # the latents themselves are intact
    _sql(pg_url, "UPDATE chai_meta SET value='NaN' WHERE key='budget_bytes'")
    with pytest.raises(StoreError, match="budget_bytes is 'NaN', a value CHAI never writes"):
        PostgresStore(pg_url)


def test_compact_rebuilds_the_index_and_keeps_every_entry(pg_url):
    with PostgresStore(pg_url, dim=DIM, budget_bytes=10**6) as store:
        ids = {put_seeded(store, s): s for s in range(30)}
        assert store.delete(list(ids)[:10] + [10**6]) == 10
        result = store.compact()
        assert result["vectors"] == _sql(pg_url, "SELECT count(*) FROM chai_entities")[0][0] > 0
        assert result["partitions"] == len({seeded_entry(s)["compat_key"] for s in list(ids.values())[10:]})
        for entry_id, seed in list(ids.items())[10:]:
            e = seeded_entry(seed)
            assert store.search(e["embeddings"][:1], e["compat_key"], k=1)[0].entry_id == entry_id
        # A dropped HNSW index is found and rebuilt by verify.
        _sql(pg_url, "DROP INDEX chai_entities_hnsw")
        report = store.verify()
        assert report.partitions_rebuilt == ["chai_entities_hnsw"] and store.verify().ok
    assert_consistent(pg_url, deleted=10)


# ---------------------------------------------------------------------------------------------- errors
def _jpeg(seed: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def _put_thumb(store, seed: int, thumbnail=None) -> int:
    e = seeded_entry(seed)
    return store.put(e["tensors"], e["entities"], e["embeddings"], e["compat_key"], e["prompt"], e["info"],
                     thumbnail=thumbnail)


# Seeds whose entry is 392 bytes (key "model=a|shape=4x2x4x4|bf16"), as in tests/test_store_pins.py.
SMALL = [s for s in range(100, 400) if seeded_entry(s)["compat_key"] == "model=a|shape=4x2x4x4|bf16"]


def test_pins_and_thumbnails_as_in_the_folder_store(pg_url):
    from comfyui_chai.cache.backend import StoreBackend
    from comfyui_chai.cache.store import EntryTooLargeError, PinnedError

    with PostgresStore(pg_url, dim=DIM, budget_bytes=392 * 3, policy="lru") as store:
        assert isinstance(store, StoreBackend)
        ids = [_put_thumb(store, SMALL[0], _jpeg(0)), _put_thumb(store, SMALL[1]), _put_thumb(store, SMALL[2])]
        assert store.thumbnail(ids[0]) == _jpeg(0) and store.thumbnail(ids[1]) is None
        assert store.thumbnail(10 ** 9) is None
        assert store.entry(ids[0]).has_thumbnail and not store.entry(ids[1]).has_thumbnail
        with pytest.raises(ValueError, match="JPEG or PNG"):
            _put_thumb(store, SMALL[3], b"GIF89a" + bytes(64))
        assert len(store) == 3

        assert store.pin(ids[0]) and store.pin(ids[1]) and not store.pin(10 ** 9)
        stats = store.stats()
        assert (stats.pinned_entries, stats.pinned_bytes) == (2, 784) and store.entry(ids[0]).pinned
        added = [_put_thumb(store, s) for s in SMALL[3:5]]  # LRU would take ids[0] and ids[1] first
        live = {r.entry_id for r in store.entries()}
        assert live == {ids[0], ids[1], added[1]} and store.stats().bytes <= 392 * 3
        for entry_id, seed in zip(ids[:2], SMALL):
            assert_seeded_entry(store, entry_id, seed)

        generation = store.generation
        for evict_to_fit in (False, True):
            with pytest.raises(PinnedError, match="smaller than the 784 bytes of the pinned entries"):
                store.set_budget(700, evict_to_fit=evict_to_fit)
        assert store.budget_bytes == 392 * 3 and store.generation == generation
        store.pin(added[1])
        with pytest.raises(EntryTooLargeError, match="pinned entries hold 1,176 of .* never evicted"):
            _put_thumb(store, SMALL[5])
        assert {r.entry_id for r in store.entries()} == live and store.generation == generation
        assert store.stats().inserts == 5, "the refused insert was rolled back"

        store.record_lookup("p", ["e"], ids[0], "e", "e", 0.9, 1.0)
        store.record_lookup("q", ["f"], None, None, None, None, 1.0)
        assert [(r["hit"], r["entry_id"]) for r in store.stats(last=2).last_lookups] == [(False, None), (True, ids[0])]
        assert store.most_used(1)[0].entry_id == ids[0]
        assert store.pin(ids[0], False) and not store.entry(ids[0]).pinned
        _put_thumb(store, SMALL[6])  # the unpinned ids[0] is the only possible victim
        assert ids[0] not in {r.entry_id for r in store.entries()}

    # A crafted thumbnail (too large, or not an image) never leaves the database as one.
    _sql(pg_url, "UPDATE chai_entries SET thumbnail=%s WHERE id=%s", (b"\xff\xd8\xff" + bytes(1 << 20), ids[1]))
    _sql(pg_url, "UPDATE chai_entries SET thumbnail=%s WHERE id=%s", (b"#!/bin/sh echo", added[1]))
    with PostgresStore(pg_url) as store:
        assert store.thumbnail(ids[1]) is None and store.thumbnail(added[1]) is None


def test_a_pg2_store_is_upgraded_in_place_with_every_entry(pg_url):
    with PostgresStore(pg_url, dim=DIM) as store:
        ids = {put_seeded(store, s): s for s in range(5)}
        store.record_lookup("p", ["e"], next(iter(ids)), "e", "e", 0.9, 1.0)
    columns = "id, uid, compat_key, prompt, nbytes, sha256, created_at, last_access, access_count, info"
    rows = _sql(pg_url, f"SELECT {columns} FROM chai_entries ORDER BY id")
    # The schema the pg2 release wrote: pg3 without the columns pg3 added.
    _sql(pg_url, "ALTER TABLE chai_entries DROP COLUMN pinned, DROP COLUMN thumbnail")
    _sql(pg_url, "ALTER TABLE chai_lookup_log DROP COLUMN entry_id")
    _sql(pg_url, "UPDATE chai_meta SET value='pg2' WHERE key='schema_version'")

    with PostgresStore(pg_url) as store:
        assert store.notes == ["upgraded the store from schema pg2 to pg3: every entry kept"]
        for entry_id, seed in ids.items():
            assert_seeded_entry(store, entry_id, seed)
            assert not store.entry(entry_id).pinned and store.thumbnail(entry_id) is None
        stats = store.stats()
        assert stats.entries == 5 and stats.lookups == 1 and stats.last_lookups[0]["entry_id"] is None
        assert any(e["kind"] == "upgraded" and "pg2 -> pg3" in e["detail"] for e in store.events())
        assert store.verify().ok
    assert _sql(pg_url, f"SELECT {columns} FROM chai_entries ORDER BY id") == rows
    assert _sql(pg_url, "SELECT value FROM chai_meta WHERE key='schema_version'") == [("pg3",)]
    with PostgresStore(pg_url) as store:  # the second open is an ordinary one
        assert store.notes == [] and store.pin(next(iter(ids)))


def test_bad_urls_are_clear_errors():
    assert is_postgres_url("postgresql://h/db") and is_postgres_url("postgres://h/db")
    assert not is_postgres_url("/tmp/store") and not is_postgres_url(Path("postgresql:"))
    with pytest.raises(StoreError, match="holds a password.*PGPASSWORD"):
        PostgresStore("postgresql://chai:secret@localhost/chai")
    with pytest.raises(StoreError, match="bad PostgreSQL URL.*postgresql://USER@HOST:PORT/DATABASE"):
        PostgresStore("postgresql://chai@localhost/chai?nonsense=1")


def test_open_without_create_needs_an_existing_store(pg_url):
    assert not location_exists(pg_url)
    with pytest.raises(StoreError, match="holds no CHAI store"):
        open_location(pg_url, create=False)
    with pytest.raises(ValueError, match="unknown PostgreSQL store option"):
        open_location(pg_url, options={"no_such_option": 1})
    open_location(pg_url, budget_bytes=10**6, dim=DIM).close()
    assert location_exists(pg_url)


def test_server_down_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket is closed
    with pytest.raises(StoreError, match=r"cannot reach PostgreSQL at postgresql://chai@127.0.0.1:\d+/chai.*db start"):
        PostgresStore(f"postgresql://chai@127.0.0.1:{port}/chai", connect_timeout=3)


def test_wrong_password_missing_database_and_no_pgvector_are_clear_errors(pg_server, pg_url, monkeypatch, tmp_path):
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    monkeypatch.setenv("PGPASSWORD", "wrong")
    with pytest.raises(StoreError, match="refused the login.*PGPASSWORD or ~/.pgpass") as err:
        PostgresStore(pg_server.tcp_url)
    assert "wrong" not in str(err.value)
    monkeypatch.delenv("PGPASSWORD")
    with pytest.raises(StoreError, match="refused the login"):
        PostgresStore(pg_server.tcp_url)
    password = (Path(pg_server.dir) / "password").read_text().strip()
    monkeypatch.setenv("PGPASSWORD", password)
    dbname = psycopg.conninfo.conninfo_to_dict(pg_url)["dbname"]
    with PostgresStore(f"postgresql://chai@127.0.0.1:{pg_server.port}/{dbname}", dim=DIM) as s:
        assert len(s) == 0  # the right password over TCP works
    with pytest.raises(StoreError, match="does not exist.*create it"):
        PostgresStore(pg_url.replace("/t_", "/missing_t_"))
    # A user that may not create extensions, in a database without pgvector; then in the store's
    # database, where it has no rights on the tables.
    bare = pg_url.replace(f"/{dbname}?", f"/{dbname}_bare?")
    _sql(pg_server.url, f'CREATE DATABASE "{dbname}_bare"')
    _sql(pg_url, "CREATE ROLE farmhand LOGIN")
    try:
        with pytest.raises(StoreError, match="no pgvector extension and user 'farmhand' may not create it.*"
                                             "'CREATE EXTENSION vector;'"):
            PostgresStore(bare.replace("postgresql://chai@", "postgresql://farmhand@"))
        with pytest.raises(StoreError, match="user 'farmhand' may not create or use the CHAI tables.*grant"):
            PostgresStore(pg_url.replace("postgresql://chai@", "postgresql://farmhand@"))
    finally:
        _sql(pg_server.url, f'DROP DATABASE "{dbname}_bare"')
        _sql(pg_url, "DROP ROLE farmhand")


# ---------------------------------------------------------------------------------------------- resilience
def test_dropped_connection_is_reconnected(pg_url, caplog):
    with PostgresStore(pg_url, dim=DIM) as store:
        first = put_seeded(store, 1)
        killed = _sql(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name = 'comfyui-chai' AND pid <> pg_backend_pid()")
        assert killed and all(r[0] for r in killed)
        second = put_seeded(store, 2)  # reconnects, retries, succeeds
        assert_seeded_entry(store, first, 1)
        assert_seeded_entry(store, second, 2)
        assert "lost the connection" in caplog.text and "secret" not in caplog.text
    assert_consistent(pg_url)


def test_server_restart_mid_run_loses_nothing_committed(pg_server, pg_url):
    """A client keeps inserting while the server stops and starts again: its operations wait and
    retry, nothing committed is lost; with the server gone for longer than retry_seconds the
    error names what to do."""
    from comfyui_chai.cache import pgserver

    out = Path(pg_server.dir) / "restart.log"
    out.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(HERE / "_pg_worker.py"), pg_url, "12", "1", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.is_file() or len(out.read_text().splitlines()) < 3):
            time.sleep(0.2)  # the client is up and committing
        assert pgserver.stop(pg_server.dir)
        time.sleep(1.5)
        pgserver.start(pg_server.dir)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    committed = [line.split() for line in out.read_text().splitlines()]
    assert len(committed) > 5
    with PostgresStore(pg_url) as store:
        for _, entry_id, seed in committed:
            assert_seeded_entry(store, int(entry_id), int(seed))
    assert_consistent(pg_url)
    with PostgresStore(pg_url, retry_seconds=1.0) as store:
        pgserver.stop(pg_server.dir)
        try:
            with pytest.raises(StoreError, match=r"cannot reach PostgreSQL.*start the server.*gave up after 1 s of retries"):
                put_seeded(store, 99)
        finally:
            pgserver.start(pg_server.dir)


def _run_workers(url: str, n: int, seconds: float, out_dir: Path, budget: int | None = None):
    procs = []
    for w in range(n):
        args = [sys.executable, str(HERE / "_pg_worker.py"), url, str(seconds), str(w), str(out_dir / f"w{w}.log")]
        procs.append(subprocess.Popen(args + ([str(budget)] if budget else []), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def _committed(out_dir: Path) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for f in sorted(out_dir.glob("w*.log"))
            for _, a, b in (line.split() for line in f.read_text().splitlines() if line.count(" ") == 2)]


def check_concurrent_writers(url: str, out_dir: Path, workers: int, seconds: float) -> dict:
    """``workers`` processes insert and look up for ``seconds`` under a budget of about 40 entries."""
    budget = 40 * len(__import__("safetensors.torch").torch.save(seeded_entry(0)["tensors"]))
    PostgresStore(url, dim=DIM, budget_bytes=budget).close()
    procs = _run_workers(url, workers, seconds, out_dir, budget)
    outputs = [p.communicate(timeout=seconds + 120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    committed = _committed(out_dir)
    counts = assert_consistent(url)
    assert counts["inserts"] == len(committed), "every insert a client saw committed is counted, none more"
    assert counts["evictions"] > 0, "the budget must have forced evictions for this test to mean anything"
    with PostgresStore(url) as store:
        present = {r.entry_id for r in store.entries()}
        for entry_id, seed in committed:
            if entry_id in present:
                assert_seeded_entry(store, entry_id, seed)
    return {"inserts": counts["inserts"], "evictions": counts["evictions"], "entries": counts["entries"]}


def test_four_writers_hold_the_budget_and_lose_nothing(pg_url, tmp_path):
    check_concurrent_writers(pg_url, tmp_path, workers=4, seconds=4)


@pytest.mark.slow
def test_four_writers_for_30_seconds(pg_url, tmp_path):
    print(check_concurrent_writers(pg_url, tmp_path, workers=4, seconds=30))


def check_killed_clients(url: str, out_dir: Path, clients: int, rng_seed: int = 0) -> dict:
    """``clients`` processes insert; each is SIGKILLed at a random moment; no partial entry remains
    and every entry a client saw committed is there."""
    PostgresStore(url, dim=DIM, budget_bytes=10**9).close()
    rng = np.random.default_rng(rng_seed)
    procs = _run_workers(url, clients, 60, out_dir)
    try:
        # Kill only once every client is inserting (start-up takes seconds on a busy machine).
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and any(
                not (out_dir / f"w{w}.log").is_file() or not (out_dir / f"w{w}.log").read_text() for w in range(clients)):
            time.sleep(0.1)
        for p in procs:
            time.sleep(float(rng.uniform(0.0, 0.3)))
            p.send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    committed = _committed(out_dir)
    counts = assert_consistent(url)
    with PostgresStore(url) as store:
        for entry_id, seed in committed:
            assert_seeded_entry(store, entry_id, seed)
    assert len(committed) >= clients, "every client committed before it was killed"
    assert counts["entries"] >= len(committed)  # a kill between COMMIT and the log line leaves one unlogged
    return {"clients": clients, "committed_logged": len(committed), "entries": counts["entries"]}


def test_killed_clients_leave_no_partial_entry(pg_url, tmp_path):
    check_killed_clients(pg_url, tmp_path, clients=4)


@pytest.mark.slow
def test_twenty_killed_clients(pg_url, tmp_path):
    print(check_killed_clients(pg_url, tmp_path, clients=20))


def test_replay_gives_the_same_hits_on_postgres_and_folder_stores(pg_url, tmp_path):
    """The simulate replay (in order, one worker, real extraction and MiniLM embeddings) over 60
    VBench prompts: the same prompts hit, matching the same stored prompts, on both backends."""
    from comfyui_chai.cache.embed import Embedder
    from comfyui_chai.cache.entities import EntityExtractor
    from comfyui_chai.cache.lookup import CacheLookup, LookupConfig
    from comfyui_chai.cache.planner import natural_plan, replay_farm
    from comfyui_chai.cache.simulate import entry_tensors, read_prompts
    from comfyui_chai.cli import default_prompt_file

    prompts = read_prompts(default_prompt_file())[:60]
    extractor, embedder = EntityExtractor(), Embedder()
    tensors = entry_tensors((2, 2, 2, 2), cache_steps=1)
    runs = {}
    for name, store in (("folder", LatentStore(tmp_path / "f")), ("postgres", PostgresStore(pg_url))):
        with store:
            lookup = CacheLookup(store, extractor, embedder, LookupConfig())
            matched = []
            original = lookup.lookup

            def spy(*args, **kwargs):
                result = original(*args, **kwargs)
                matched.append(result.prompt_matched)
                return result

            lookup.lookup = spy
            runs[name] = (replay_farm(natural_plan(prompts), 1, lookup, tensors, 1.0, 1.0).hit_index, matched)
    assert runs["postgres"][0] == runs["folder"][0] and sum(runs["folder"][0]) >= 15
    assert runs["postgres"][1] == runs["folder"][1]
