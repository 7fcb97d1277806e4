"""Store format 3 (issue 15, item 7): pinned entries and per-entry thumbnails in the folder store.

* a format-2 store (tests/fixtures/stores/v2_store, made by that release) is upgraded in place with
  every entry, counter and lookup kept; an interrupted upgrade finishes on the next open;
* a pinned entry is never evicted, its bytes count against the budget and appear in the stats, and
  a budget below the pinned bytes is a clear error that changes nothing;
* a thumbnail is kept with its entry, checked (size cap, JPEG/PNG signature) on the way in and on
  the way out, and a crafted one in a manifest from elsewhere is never served and is dropped by
  the open's repair and by verify, with the entry kept.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _store_util import DIM, assert_seeded_entry, manifest_rows, put_seeded, seeded_entry
from comfyui_chai.cache.store import (
    MAX_THUMBNAIL_BYTES,
    EntryTooLargeError,
    LatentStore,
    PinnedError,
    read_stats,
)

FIXTURE_V2 = Path(__file__).resolve().parent / "fixtures" / "stores" / "v2_store"
# Latent file sizes of the seeded entries (bytes), by compatibility key index: see _store_util.KEY_SPECS.
SEEDS_SMALL = [s for s in range(100, 400) if seeded_entry(s)["compat_key"] == "model=a|shape=4x2x4x4|bf16"]


def _jpeg(seed: int, size: int = 48) -> bytes:
    """A real JPEG of a small random frame (what a caller makes from one decoded video frame)."""
    frame = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=70)
    return out.getvalue()


def _put(store, seed: int, thumbnail: bytes | None = None) -> int:
    e = seeded_entry(seed)
    return store.put(e["tensors"], e["entities"], e["embeddings"], e["compat_key"], e["prompt"], e["info"],
                     thumbnail=thumbnail)


# ---------------------------------------------------------------------------------------------- upgrade
def test_a_format_2_store_is_upgraded_in_place_with_everything_kept(tmp_path):
    path = tmp_path / "v2"
    shutil.copytree(FIXTURE_V2, path)
    before = read_stats(path)  # read-only statistics of the old format work and change nothing
    assert (before.entries, before.evictions, before.lookups, before.hits, before.inserts) == (6, 2, 4, 3, 8)
    assert (before.pinned_entries, before.pinned_bytes) == (0, 0)
    assert json.loads((path / "chai-store.json").read_text())["version"] == 2
    rows_before = manifest_rows(path, "SELECT id, compat_key, prompt, nbytes, sha256, created_at, last_access, "
                                      "access_count, info FROM entries ORDER BY id")
    store_id = json.loads((path / "chai-store.json").read_text())["store_id"]

    with LatentStore(path) as store:
        assert store.notes == ["upgraded the store from format 2 to 3: every entry kept (entries can now be pinned "
                               "and keep a thumbnail)"]
        assert store.open_report == [] and store.store_id == store_id
        records = store.entries()
        assert [r.entry_id for r in records] == [3, 4, 5, 6, 7, 8]
        for rec in records:
            assert_seeded_entry(store, rec.entry_id, rec.info["seed"])
            assert not rec.pinned and not rec.has_thumbnail and store.thumbnail(rec.entry_id) is None
        stats = store.stats()
        assert (stats.entries, stats.evictions, stats.lookups, stats.hits, stats.bytes, stats.budget_bytes) == \
            (6, 2, 4, 3, before.bytes, 8000)
        assert [r["prompt"] for r in stats.last_lookups] == [r["prompt"] for r in before.last_lookups]
        assert all(r["entry_id"] is None for r in stats.last_lookups), "format 2 did not log the served entry"
        assert any(e["kind"] == "upgraded" and "format 2 -> 3" in e["detail"] for e in store.events())
        assert store.verify().ok
        assert store.pin(3) and store.entry(3).pinned
    assert manifest_rows(path, "SELECT id, compat_key, prompt, nbytes, sha256, created_at, last_access, "
                               "access_count, info FROM entries ORDER BY id") == rows_before
    assert json.loads((path / "chai-store.json").read_text())["version"] == 3
    with LatentStore(path) as store:  # the second open is an ordinary one
        assert store.notes == [] and store.open_report == [] and store.entry(3).pinned
        store.record_lookup("a red fox", ["red fox"], 4, "red fox", "a red fox", 0.93, 1.5)
        store.record_lookup("a city", ["city"], None, None, None, None, 1.0)
        assert [(r["hit"], r["entry_id"]) for r in store.stats(last=2).last_lookups] == [(False, None), (True, 4)]


def test_an_interrupted_format_2_upgrade_finishes_on_the_next_open(tmp_path):
    path = tmp_path / "v2"
    shutil.copytree(FIXTURE_V2, path)
    marker = (path / "chai-store.json").read_bytes()
    with LatentStore(path):
        pass
    (path / "chai-store.json").write_bytes(marker)  # the manifest was upgraded, the marker not yet
    with LatentStore(path) as store:
        assert len(store) == 6 and store.open_report == [] and store.verify().ok
    assert json.loads((path / "chai-store.json").read_text())["version"] == 3


# ---------------------------------------------------------------------------------------------- pins
def test_a_pinned_entry_is_never_evicted_and_counts_against_the_budget(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM, budget_bytes=392 * 4, policy="lru") as store:
        ids = [_put(store, s) for s in SEEDS_SMALL[:4]]
        assert store.stats().bytes == 392 * 4
        assert store.pin(ids[0]) and store.pin(ids[1])
        assert not store.pin(10_000), "an unknown id is reported, not pinned"
        stats = store.stats()
        assert (stats.pinned_entries, stats.pinned_bytes) == (2, 392 * 2)
        for seed in SEEDS_SMALL[4:10]:  # LRU would evict ids[0] and ids[1] first
            _put(store, seed)
        live = {r.entry_id for r in store.entries()}
        assert {ids[0], ids[1]} <= live and len(live) == 4 and store.stats().bytes <= 392 * 4
        for entry_id, seed in zip(ids[:2], SEEDS_SMALL[:2]):
            assert_seeded_entry(store, entry_id, seed)
        assert store.pin(ids[0], False) and not store.entry(ids[0]).pinned
        _put(store, SEEDS_SMALL[10])  # now the oldest unpinned entry, ids[0], is the LRU victim
        assert ids[0] not in {r.entry_id for r in store.entries()} and store.entry(ids[1]).pinned


def test_a_budget_below_the_pinned_bytes_is_refused_and_changes_nothing(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM, budget_bytes=392 * 3) as store:
        ids = [_put(store, s) for s in SEEDS_SMALL[:3]]
        store.pin(ids[0])
        store.pin(ids[1])
        generation = store.generation
        for evict_to_fit in (False, True):
            with pytest.raises(PinnedError, match=r"smaller than the 784 bytes of the pinned entries.*unpin"):
                store.set_budget(700, evict_to_fit=evict_to_fit)
        assert store.budget_bytes == 392 * 3 and len(store) == 3 and store.generation == generation
        assert store.set_budget(784, evict_to_fit=True) == 1  # the unpinned entry goes, the pinned stay
        assert {r.entry_id for r in store.entries()} == set(ids[:2])
    with pytest.raises(PinnedError):
        LatentStore(tmp_path / "s", budget_bytes=500, evict_to_fit=True)
    with LatentStore(tmp_path / "s") as store:
        assert store.budget_bytes == 784 and len(store) == 2


def test_an_entry_that_fits_only_by_evicting_pinned_ones_is_not_stored(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM, budget_bytes=392 * 2) as store:
        ids = [_put(store, s) for s in SEEDS_SMALL[:2]]
        for i in ids:
            store.pin(i)
        generation = store.generation
        with pytest.raises(EntryTooLargeError, match="pinned entries hold 784 of .* never evicted"):
            _put(store, SEEDS_SMALL[2])
        assert {r.entry_id for r in store.entries()} == set(ids) and store.generation == generation
        assert store.stats().evictions == 0


# ---------------------------------------------------------------------------------------------- thumbnails
def test_a_thumbnail_is_kept_with_its_entry(tmp_path):
    jpeg = _jpeg(1)
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(png, format="PNG")
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        a = _put(store, SEEDS_SMALL[0], thumbnail=jpeg)
        b = _put(store, SEEDS_SMALL[1], thumbnail=png.getvalue())
        c = _put(store, SEEDS_SMALL[2])
        assert store.thumbnail(a) == jpeg and store.thumbnail(b) == png.getvalue() and store.thumbnail(c) is None
        assert store.entry(a).has_thumbnail and not store.entry(c).has_thumbnail
        assert Image.open(io.BytesIO(store.thumbnail(a))).size == (48, 48)
        store.delete([a])
        assert store.thumbnail(a) is None
    assert sorted(p.name for p in (tmp_path / "s" / "latents").iterdir()) == [f"{b}.safetensors", f"{c}.safetensors"]


@pytest.mark.parametrize("bad,match", [
    (b"\xff\xd8\xff" + bytes(MAX_THUMBNAIL_BYTES), "bytes; it must be 8"),
    (b"GIF89a" + bytes(100), "JPEG or PNG"),
    (b"\xff\xd8\xff", "bytes; it must be 8"),
    ("not bytes", "must be the bytes"),
])
def test_a_bad_thumbnail_is_refused_and_nothing_is_stored(tmp_path, bad, match):
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        with pytest.raises(ValueError, match=match):
            _put(store, SEEDS_SMALL[0], thumbnail=bad)
        assert len(store) == 0 and store.stats().inserts == 0
    assert list((tmp_path / "s" / "latents").iterdir()) == []


def test_crafted_thumbnails_and_flags_are_never_served_and_are_repaired(tmp_path):
    path = tmp_path / "s"
    with LatentStore(path, dim=DIM) as store:
        ids = [_put(store, s, thumbnail=_jpeg(s)) for s in SEEDS_SMALL[:5]]
        good = store.thumbnail(ids[4])
    conn = sqlite3.connect(path / "manifest.sqlite")
    huge = b"\xff\xd8\xff" + bytes(50 << 20)  # 50 MB: never read into the process
    conn.execute("UPDATE entries SET thumbnail=? WHERE id=?", (huge, ids[0]))
    conn.execute("UPDATE entries SET thumbnail=? WHERE id=?", (b"#!/bin/sh rm -rf ~", ids[1]))
    conn.execute("UPDATE entries SET thumbnail=? WHERE id=?", ("/etc/passwd", ids[2]))
    conn.execute("UPDATE entries SET pinned=7 WHERE id=?", (ids[3],))
    conn.commit()
    conn.close()
    with LatentStore(path) as store:
        assert len(store.open_report) == 1 and "4 entry row(s) with a thumbnail or pinned flag" in store.open_report[0]
        assert [store.thumbnail(i) for i in ids[:3]] == [None] * 3
        assert store.thumbnail(ids[3]) == _jpeg(SEEDS_SMALL[3]) and store.thumbnail(ids[4]) == good
        assert not store.entry(ids[3]).pinned and len(store) == 5
        for entry_id, seed in zip(ids, SEEDS_SMALL):
            assert_seeded_entry(store, entry_id, seed)
        assert store.verify().ok
    # A store opened before the row was crafted: thumbnail() checks again, and verify repairs it.
    with LatentStore(path) as store:
        conn = sqlite3.connect(path / "manifest.sqlite")
        conn.execute("UPDATE entries SET thumbnail=? WHERE id=?", (huge, ids[4]))
        conn.execute("UPDATE entries SET thumbnail=? WHERE id=?", (b"\x00" * 64, ids[3]))
        conn.commit()
        conn.close()
        assert store.thumbnail(ids[4]) is None and store.thumbnail(ids[3]) is None
        report = store.verify()
        assert not report.ok and any("2 entry row(s) with a thumbnail" in p for p in report.problems)
        assert len(store) == 5 and store.verify().ok


def test_crafted_sizes_that_would_overflow_the_byte_sums_are_removed_not_fatal(tmp_path):
    # Rows claiming 2^62 bytes: summing two of them overflows SQLite's 64-bit integers, which once stopped
    # the open with "integer overflow". They are rows CHAI never writes: removed by the open's repair.
    path = tmp_path / "s"
    with LatentStore(path, dim=DIM) as store:
        ids = [_put(store, s) for s in SEEDS_SMALL[:4]]
        store.pin(ids[0])
        store.pin(ids[1])
        kept_bytes = store.entry(ids[3]).nbytes
    conn = sqlite3.connect(path / "manifest.sqlite")
    conn.execute("UPDATE entries SET nbytes=? WHERE id IN (?,?,?)", (1 << 62, *ids[:3]))
    conn.commit()
    conn.close()
    stats = read_stats(path)  # read-only: the crafted rows count 0 bytes
    assert (stats.entries, stats.bytes, stats.pinned_entries, stats.pinned_bytes) == (4, kept_bytes, 2, 0)
    with LatentStore(path) as store:
        assert len(store) == 1 and sum("rows_removed" in r for r in store.open_report) == 3
        assert_seeded_entry(store, ids[3], SEEDS_SMALL[3])
        assert store.stats().bytes == kept_bytes and store.stats().pinned_bytes == 0
        assert store.verify().ok
        assert len(list((path / "quarantine").iterdir())) == 3  # their latent files: moved aside, not deleted
        new_id = _put(store, SEEDS_SMALL[4])  # the counter is exact again: the budget check and inserts work
        assert store.stats().bytes == kept_bytes + store.entry(new_id).nbytes


# ---------------------------------------------------------------------------------------------- command line
def _cli(capsys, *args) -> tuple[int, str, str]:
    from comfyui_chai.cli import main as cli_main

    code = cli_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cache_pin_and_unpin_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "s"
    with LatentStore(path, dim=DIM, budget_bytes=392 * 2) as store:
        ids = [_put(store, s) for s in SEEDS_SMALL[:2]]
    code, out, _ = _cli(capsys, "cache", "pin", str(path), str(ids[0]))
    assert code == 0 and f"pinned entry {ids[0]}; pinned: 1 entries, 392 of 784 budget bytes" in out
    code, out, _ = _cli(capsys, "cache", "stats", str(path))
    assert code == 0 and "pinned       1 entries, 392 bytes" in out
    with LatentStore(path) as store:
        _put(store, SEEDS_SMALL[2])
        _put(store, SEEDS_SMALL[3])  # both evict the unpinned ones only
        assert ids[0] in {r.entry_id for r in store.entries()} and ids[1] not in {r.entry_id for r in store.entries()}
    code, _, err = _cli(capsys, "cache", "unpin", str(path), "999")
    assert code == 2 and "has no entry 999" in err
    code, out, _ = _cli(capsys, "cache", "unpin", str(path), str(ids[0]))
    assert code == 0 and "unpinned entry" in out and "pinned: 0 entries, 0 of 784" in out
    with LatentStore(path) as store:
        assert not store.entry(ids[0]).pinned
