"""`python -m comfyui_chai cache stats|verify|compact STORE` on real stores.

The commands run in-process through ``cli.main`` (fast, output captured), and once through a real
``python -m comfyui_chai`` subprocess so the module entry point itself is covered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _store_util import DIM, KEYS, entity_vectors, latent_path, manifest_rows, put_seeded, quarantined, seeded_entry
from comfyui_chai.cache.index import partition_file_name
from comfyui_chai.cache.store import LatentStore
from comfyui_chai.cli import main


@pytest.fixture
def store_dir(tmp_path):
    """A closed store: 12 entries, 4 lookups (3 hits), budget 5 MB."""
    path = tmp_path / "store"
    with LatentStore(path, dim=DIM, budget_bytes=5_000_000) as store:
        ids = [put_seeded(store, s) for s in range(12)]
        e0 = seeded_entry(0)
        store.record_lookup("golden retriever on a beach", ["golden retriever", "beach"], ids[0],
                            "golden retriever", e0["entities"][0], 0.91, 3.0)
        store.record_lookup("golden retriever in snow", ["golden retriever", "snow"], ids[0],
                            "golden retriever", e0["entities"][0], 0.88, 5.0)
        store.record_lookup("beach at dusk", ["beach"], ids[1], "beach", "x", 0.85, 1.0)
        store.record_lookup("a red car", ["red car"], None, "red car", None, None, 7.0)
    return path


def _run(capsys, *argv):
    code = main(["cache", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_stats_prints_the_counters(store_dir, capsys):
    code, out, _ = _run(capsys, "stats", str(store_dir))
    assert code == 0
    assert "entries      12 (" in out
    assert "lookups      4  hits 3  misses 1  hit rate 75.0%" in out
    assert "evictions    0  inserts 12  repairs 0  quarantined 0" in out
    assert "of 5,000,000" in out and "policy       lru" in out
    assert "top entities beach (2), golden retriever (2), red car (1), snow (1)" in out  # ties: by text
    assert "lookup ms    mean 4.00" in out

    code, out, _ = _run(capsys, "stats", "--json", str(store_dir))
    assert code == 0
    data = json.loads(out)
    assert (data["entries"], data["hits"], data["misses"], data["lookups"], data["inserts"]) == (12, 3, 1, 4, 12)
    assert data["hit_rate"] == pytest.approx(0.75)
    with LatentStore(store_dir) as store:
        assert data["bytes"] == store.stats().bytes > 0
        assert data["generation"] == store.generation


def test_stats_through_python_dash_m(store_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "comfyui_chai", "cache", "stats", "--json", str(store_dir)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["entries"] == 12 and data["lookups"] == 4


def test_verify_is_clean_on_a_healthy_store_and_fails_after_truncation(store_dir, capsys):
    code, out, _ = _run(capsys, "verify", str(store_dir))
    assert code == 0, out
    assert "checked 12 entries" in out and "OK: store is consistent" in out

    entry_id = manifest_rows(store_dir, "SELECT id FROM entries ORDER BY id LIMIT 1 OFFSET 5")[0][0]
    f = latent_path(store_dir, entry_id)
    f.write_bytes(f.read_bytes()[:-7])
    code, out, _ = _run(capsys, "verify", str(store_dir))
    assert code == 1, out
    assert f"repaired: entry {entry_id}: latent file is" in out and "1 problem(s) found and repaired" in out
    assert len(quarantined(store_dir, entry_id)) == 1 and not f.exists()

    # Repaired: the next run is clean, and the stats count the quarantine.
    code, out, _ = _run(capsys, "verify", str(store_dir))
    assert code == 0 and "checked 11 entries" in out
    code, out, _ = _run(capsys, "stats", "--json", str(store_dir))
    data = json.loads(out)
    assert data["entries"] == 11 and data["quarantined"] == 1 and data["repairs"] >= 1


def test_verify_quick_checks_sizes_only(store_dir, capsys):
    f = latent_path(store_dir, manifest_rows(store_dir, "SELECT MIN(id) FROM entries")[0][0])
    blob = bytearray(f.read_bytes())
    blob[-3] ^= 0xFF  # same size, other content
    f.write_bytes(bytes(blob))
    code, out, _ = _run(capsys, "verify", "--quick", str(store_dir))
    assert code == 0, "a --quick verify reads sizes only and cannot see a flipped byte"
    code, out, _ = _run(capsys, "verify", str(store_dir))
    assert code == 1 and "SHA-256" in out


def test_compact_removes_tombstones(store_dir, capsys):
    with LatentStore(store_dir) as store:
        gone = [r.entry_id for r in store.entries()][:6]
        vecs = {i: entity_vectors(store_dir, i) for i in gone}
        store.delete(gone)
    tombstones = {k: len(json.loads(r or "[]")) for k, r in
                  manifest_rows(store_dir, "SELECT compat_key, index_deleted FROM partitions")}
    assert sum(tombstones.values()) > 0, "the deletes must have left tombstones in the saved index"
    code, out, _ = _run(capsys, "compact", str(store_dir))
    assert code == 0, out
    assert f"{sum(tombstones.values())} tombstones removed" in out
    after = {k: json.loads(r or "[]") for k, r in
             manifest_rows(store_dir, "SELECT compat_key, index_deleted FROM partitions")}
    assert all(v == [] for v in after.values())
    with LatentStore(store_dir) as store:
        assert store.open_report == []
        for key in KEYS:
            assert store.index.tombstones(key) == 0
            live = {r[0] for r in manifest_rows(store_dir, "SELECT label FROM entities WHERE compat_key=?", (key,))}
            assert store.index.labels(key) == live
            for entry_id, v in vecs.items():
                assert all(m.entry_id != entry_id for m in store.search(v, key, k=10))
        assert f"{store.stats().entities} vectors kept" in out
        assert store.verify().ok


def test_non_store_paths_are_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for path in (empty, a_file, tmp_path / "missing"):
        for cmd in ("stats", "verify", "compact"):
            code, out, err = _run(capsys, cmd, str(path))
            assert code == 2, f"{cmd} {path}: exit {code}"
            assert "is not a CHAI store" in err
    assert list(empty.iterdir()) == [], "a failed command must not create store files in a foreign folder"
    assert not (tmp_path / "missing").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.sqlite").write_bytes(b"garbage" * 50)
    for cmd in ("stats", "verify", "compact"):
        code, _, err = _run(capsys, cmd, str(bad))
        assert code == 2 and "is not a CHAI manifest" in err
    assert (bad / "manifest.sqlite").read_bytes() == b"garbage" * 50 and len(list(bad.iterdir())) == 1


def test_repairs_made_on_open_are_printed(store_dir, capsys):
    (store_dir / "index" / partition_file_name(KEYS[0])).write_bytes(b"junk")
    code, out, _ = _run(capsys, "stats", str(store_dir))
    assert code == 0
    assert f"repaired on open: index_rebuilt: {partition_file_name(KEYS[0])}" in out


def test_stats_read_only_matches_and_writes_nothing(store_dir, capsys):
    """``--read-only`` reads the manifest as is: same numbers as a normal open, and no file of the store
    changes (no lock file, no repair, no index save; SQLite's own -wal/-shm side files aside)."""
    def snapshot():
        return {p.relative_to(store_dir): p.read_bytes() for p in sorted(store_dir.rglob("*"))
                if p.is_file() and not p.name.endswith(("-wal", "-shm"))}

    code, out, _ = _run(capsys, "stats", "--json", str(store_dir))
    normal = json.loads(out)
    before = snapshot()
    code, out, _ = _run(capsys, "stats", "--json", "--read-only", str(store_dir))
    assert code == 0 and json.loads(out) == normal
    code, out, _ = _run(capsys, "stats", "--read-only", str(store_dir))
    assert code == 0 and out.startswith("read-only: manifest read as is") and "hit rate 75.0%" in out
    assert snapshot() == before
    (store_dir / "manifest.sqlite").write_bytes(b"not a database" * 100)
    code, _, err = _run(capsys, "stats", "--read-only", str(store_dir))
    assert code == 2 and "not a CHAI manifest" in err
