"""A store never harms what is not its own (issue 14): each attack the issue lists, reproduced.

1. A store knows itself: only empty folders and CHAI stores open; someone's folder and another
   application's ``manifest.sqlite`` are refused untouched; a store of the previous release is
   upgraded in place with every entry kept (tests/fixtures/stores/v1_store, made by that release).
2. Containment: links in place of the store's folders or files are refused or left alone, never
   followed; a crafted row of the previous format never names a file the upgrade touches.
3. Untrusted content cannot crash or exhaust the process: hnswlib only sees signed or structurally
   checked files; sizes are checked with fstat before reading; SQLite runs with trusted_schema off.
4. Budgets that do not destroy: see also tests/test_store.py (refusal, --evict-to-fit).
5. Errors that say what happened: disk full, best-effort statistics, verify's exit code, inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _store_util import (
    DIM,
    KEYS,
    assert_seeded_entry,
    latent_path,
    manifest_rows,
    put_seeded,
    seeded_entry,
    unit_vectors,
)
from comfyui_chai.cache import store_index
from comfyui_chai.cache.index import partition_file_name
from comfyui_chai.cache.index_file import IndexKey
from comfyui_chai.cache.store import (
    BudgetError,
    ContainmentError,
    DiskFullError,
    LatentStore,
    StoreError,
    read_stats,
)
from comfyui_chai.cache.store_manifest import sqlite_store_error
from comfyui_chai.cli import main as cli_main

FIXTURE_V1 = Path(__file__).resolve().parent / "fixtures" / "stores" / "v1_store"


def tree(folder: Path) -> dict:
    """Everything a folder holds: relative path -> ("dir",) | ("link", target) | ("file", bytes, mode)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", p.read_bytes(), p.stat().st_mode)
    return out


def _store(path: Path, seeds=range(10, 16)) -> dict[int, int]:
    with LatentStore(path, dim=DIM) as store:
        return {put_seeded(store, s): s for s in seeds}


def _cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = cli_main(list(args))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _someones_folder(root: Path) -> Path:
    """A folder of someone's files that happens to use the names a store uses."""
    folder = root / "output"
    (folder / "latents").mkdir(parents=True)
    (folder / "latents" / "ComfyUI_00001_.latent").write_bytes(b"saved latent")
    (folder / "latents" / "1.safetensors").write_bytes(b"not a CHAI file")
    (folder / "index").mkdir()
    (folder / "index" / "draft.tmp1").write_text("draft")
    (folder / "quarantine").mkdir()
    (folder / "photo.jpg").write_bytes(bytes(range(256)))
    (folder / "store.lock").write_text("someone's lock")
    return folder


def _other_app_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users(name) VALUES('ada')")
    conn.commit()
    conn.close()


# ---------------------------------------------------------------------------------------------- 1. knows itself
def test_a_new_store_carries_its_marker(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        put_seeded(store, 1)
        marker = json.loads((tmp_path / "s" / "chai-store.json").read_text())
        assert marker["format"] == "comfyui-chai-store" and marker["version"] == 3
        assert marker["store_id"] == store.store_id and len(store.store_id) == 32
        assert manifest_rows(tmp_path / "s", "SELECT value FROM meta WHERE key='store_id'")[0][0] == store.store_id
    with pytest.raises(StoreError, match="parent folder .* does not exist"):
        LatentStore(tmp_path / "missing" / "deeper" / "s")
    assert not (tmp_path / "missing").exists()


def test_someones_folder_is_refused_and_left_byte_identical(tmp_path):
    folder = _someones_folder(tmp_path)
    before = tree(folder)
    for kwargs in ({}, {"dim": DIM}, {"create": False}, {"budget_bytes": 1, "evict_to_fit": True}):
        with pytest.raises(ContainmentError, match=f"{folder} is not empty and is not a CHAI store"):
            LatentStore(folder, **kwargs)
    with pytest.raises(ContainmentError):
        read_stats(folder)
    assert tree(folder) == before


@pytest.mark.parametrize("wal", [False, True], ids=["rollback journal", "WAL with side files"])
def test_another_applications_manifest_is_never_altered(tmp_path, capsys, wal):
    folder = tmp_path / "app"
    folder.mkdir()
    db = folder / "manifest.sqlite"
    _other_app_db(db)
    if wal:  # leave -wal and -shm behind, as a running or crashed application does
        keep = sqlite3.connect(db)
        keep.execute("PRAGMA journal_mode=WAL")
        keep.execute("INSERT INTO users(name) VALUES('bob')")
        keep.commit()
        for suffix in ("", "-wal", "-shm"):
            shutil.copy(str(db) + suffix, tmp_path / f"copy{suffix}")
        keep.close()
        for suffix in ("", "-wal", "-shm"):
            shutil.copy(tmp_path / f"copy{suffix}", str(db) + suffix)
    before = tree(folder)
    with pytest.raises(ContainmentError, match="is not a CHAI manifest .*CHAI never alters it"):
        LatentStore(folder)
    for args in (("cache", "stats", str(folder)), ("cache", "stats", "--read-only", str(folder)),
                 ("cache", "verify", str(folder)), ("cache", "compact", str(folder))):
        code, out, err = _cli(capsys, *args)
        assert code == 2 and "not a CHAI" in err and "Traceback" not in err, (args, err)
    assert tree(folder) == before, "another application's database was altered"


def test_a_manifest_with_objects_chai_never_makes_is_refused(tmp_path):
    path = tmp_path / "s"
    ids = _store(path)
    conn = sqlite3.connect(path / "manifest.sqlite")
    conn.execute("CREATE TRIGGER wipe AFTER INSERT ON entries BEGIN DELETE FROM entities; END")
    conn.commit()
    conn.close()
    with pytest.raises(ContainmentError, match="not a CHAI manifest of format 3"):
        LatentStore(path)
    conn = sqlite3.connect(path / "manifest.sqlite")
    conn.execute("DROP TRIGGER wipe")
    conn.commit()
    conn.close()
    with LatentStore(path) as store:
        assert {r.entry_id for r in store.entries()} == set(ids)


@pytest.mark.parametrize("marker,match", [
    ({"format": "something-else", "version": 2, "store_id": "0" * 32}, "not a CHAI store marker"),
    ({"format": "comfyui-chai-store", "version": 99, "store_id": "0" * 32}, "newer CHAI release"),
    ({"format": "comfyui-chai-store", "version": 2, "store_id": "../x"}, "no valid store id"),
    ([1, 2], "not a CHAI store marker"),
])
def test_a_marker_chai_did_not_write_is_refused(tmp_path, marker, match):
    path = tmp_path / "s"
    _store(path)
    (path / "chai-store.json").write_text(json.dumps(marker))
    before = tree(path)
    with pytest.raises(StoreError, match=match):
        LatentStore(path)
    assert tree(path) == before


def test_a_store_of_the_previous_release_is_upgraded_with_every_entry(tmp_path, capsys):
    path = tmp_path / "v1"
    shutil.copytree(FIXTURE_V1, path)
    # Read-only statistics work on it as it is, and change nothing.
    before = {k: v for k, v in tree(path).items() if not k.endswith(("-wal", "-shm"))}
    stats = read_stats(path)
    assert (stats.entries, stats.evictions, stats.lookups, stats.hits, stats.inserts) == (7, 3, 5, 4, 10)
    assert {k: v for k, v in tree(path).items() if not k.endswith(("-wal", "-shm"))} == before
    old_names = {r[0] for r in manifest_rows(path, "SELECT file FROM entries")}

    with LatentStore(path) as store:
        assert store.notes == ["upgraded the store from format 1 to 3: 7 entries kept, 0 dropped"]
        assert store.open_report == [], "an upgrade of a healthy store repairs nothing"
        records = store.entries()
        assert [r.entry_id for r in records] == [4, 5, 6, 7, 8, 9, 10]
        for rec in records:
            assert_seeded_entry(store, rec.entry_id, rec.info["seed"])
            e = seeded_entry(rec.info["seed"])
            best = store.search(e["embeddings"][:1], e["compat_key"], k=1)[0]
            assert best.entry_id == rec.entry_id and best.similarity > 0.999
        stats = store.stats()
        assert (stats.entries, stats.evictions, stats.lookups, stats.hits, stats.budget_bytes) == (7, 3, 5, 4, 8000)
        assert [r["prompt"] for r in stats.last_lookups][0] == "a miss"
        assert store.verify().ok
        new = put_seeded(store, 5000)
        assert new == 11, "entry ids are never reused, the evicted ones included"
        live = {r.entry_id for r in store.entries()}
    names = set(os.listdir(path / "latents"))
    assert names == {f"{i}.safetensors" for i in live} and new in live and not names & old_names
    assert json.loads((path / "chai-store.json").read_text())["version"] == 3
    with LatentStore(path) as store:  # the second open is an ordinary one
        assert store.notes == [] and store.open_report == []
        assert {r.entry_id for r in store.entries()} == live
    code, out, _ = _cli(capsys, "cache", "verify", str(path))
    assert code == 0 and "OK: store is consistent" in out


def test_an_interrupted_upgrade_finishes_on_the_next_open(tmp_path):
    path = tmp_path / "v1"
    shutil.copytree(FIXTURE_V1, path)
    rows = manifest_rows(path, "SELECT id, file FROM entries ORDER BY id")
    for entry_id, name in rows[:3]:  # the upgrade died after renaming three files
        os.rename(path / "latents" / name, path / "latents" / f"{entry_id}.safetensors")
    with LatentStore(path) as store:
        assert len(store) == 7 and store.notes
        for rec in store.entries():
            assert_seeded_entry(store, rec.entry_id, rec.info["seed"])
        store_id = store.store_id
    (path / "chai-store.json").unlink()  # ... or died after the manifest, before the marker
    with LatentStore(path) as store:
        assert store.store_id == store_id and len(store) == 7 and store.verify().ok
    assert json.loads((path / "chai-store.json").read_text())["store_id"] == store_id


def test_crafted_rows_of_the_previous_format_never_name_a_file_the_store_touches(tmp_path):
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / ".bashrc").write_text("export PATH")
    (victim / "precious.txt").write_text("keep me")
    path = tmp_path / "v1"
    shutil.copytree(FIXTURE_V1, path)
    conn = sqlite3.connect(path / "manifest.sqlite")
    ids = [r[0] for r in conn.execute("SELECT id FROM entries ORDER BY id")]
    crafted = {ids[0]: str(victim / "precious.txt"), ids[1]: "../../home/precious.txt", ids[2]: ".bashrc"}
    for entry_id, name in crafted.items():
        conn.execute("UPDATE entries SET file=?, nbytes=? WHERE id=?", (name, 1 << 40, entry_id))
    conn.commit()
    conn.close()
    (path / "latents" / ".bashrc").symlink_to(victim / ".bashrc")
    before = tree(victim)
    with LatentStore(path) as store:
        assert store.notes == ["upgraded the store from format 1 to 3: 4 entries kept, 3 dropped"]
        assert {r.entry_id for r in store.entries()} == set(ids[3:])
        for rec in store.entries():
            assert_seeded_entry(store, rec.entry_id, rec.info["seed"])
        dropped = [e["detail"] for e in store.events(20) if e["kind"] == "upgrade_dropped"]
        assert len(dropped) == 3 and all("never touched" in d for d in dropped)
        assert "latents/.bashrc" in store.left_alone
        assert store.verify().ok
    assert tree(victim) == before
    assert (path / "latents" / ".bashrc").is_symlink()


# ---------------------------------------------------------------------------------------------- 2. containment
@pytest.mark.parametrize("sub", ["latents", "index", "quarantine"])
def test_a_link_in_place_of_a_store_folder_is_refused(tmp_path, capsys, sub):
    path = tmp_path / "s"
    _store(path)
    victim = tmp_path / "victim"
    shutil.copytree(path / sub, victim)
    (victim / "photo.jpg").write_bytes(b"precious")
    (victim / ".bashrc").write_text("export PATH")
    shutil.rmtree(path / sub)
    (path / sub).symlink_to(victim, target_is_directory=True)
    before = tree(victim)
    with pytest.raises(ContainmentError, match=f"{sub} is a link or not a folder"):
        LatentStore(path)
    for cmd in ("stats", "verify", "compact"):
        code, _, err = _cli(capsys, "cache", cmd, str(path))
        assert code == 2 and "is a link or not a folder" in err
    assert tree(victim) == before, f"a command followed {sub}/ out of the store"


@pytest.mark.parametrize("name", ["manifest.sqlite", "manifest.sqlite-wal", "store.lock", "chai-store.json"])
def test_a_link_in_place_of_a_store_file_is_refused(tmp_path, capsys, name):
    path = tmp_path / "s"
    _store(path)
    victim = tmp_path / "notes.txt"
    victim.write_text("someone's notes")
    if (path / name).exists():
        shutil.copy(path / name, tmp_path / "original")
        (path / name).unlink()
    (path / name).symlink_to(victim)
    with pytest.raises(ContainmentError, match="(symbolic link|not a regular file|cannot be read safely)"):
        LatentStore(path)
    code, _, err = _cli(capsys, "cache", "stats", str(path))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    if name.startswith("manifest"):
        code, _, err = _cli(capsys, "cache", "stats", "--read-only", str(path))
        assert code == 2 and "symbolic link" in err
    assert victim.read_text() == "someone's notes"


@pytest.mark.parametrize("kind", ["link to a copy", "link to /dev/zero", "fifo", "folder"])
def test_a_latent_that_is_not_a_regular_file_is_never_read(tmp_path, kind):
    path = tmp_path / "s"
    ids = _store(path)
    victim_id = list(ids)[1]
    f = latent_path(path, victim_id)
    outside = tmp_path / "outside.safetensors"
    original = f.read_bytes()
    outside.write_bytes(original)  # same bytes: the SHA-256 alone would accept it
    f.unlink()
    if kind == "link to a copy":
        f.symlink_to(outside)
    elif kind == "link to /dev/zero":
        f.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(f)
    else:
        f.mkdir()
    with LatentStore(path) as store:
        t0 = time.monotonic()
        assert store.load(victim_id) is None
        assert time.monotonic() - t0 < 5, "the open blocked"
        assert store.entry(victim_id) is None and store.stats().quarantined == 1
        for entry_id, seed in ids.items():
            if entry_id != victim_id:
                assert_seeded_entry(store, entry_id, seed)
    assert os.path.lexists(f), "something the store did not make was moved or deleted"
    assert outside.read_bytes() == original
    with LatentStore(path) as store:
        assert f"latents/{victim_id}.safetensors" in store.left_alone and store.verify().ok


def test_sizes_are_checked_with_fstat_before_reading(tmp_path):
    import tracemalloc

    path = tmp_path / "s"
    ids = _store(path)
    victim_id = list(ids)[0]
    with open(latent_path(path, victim_id), "r+b") as f:
        f.truncate(200 << 20)  # a sparse 200 MB file; the manifest still says ~1 KB
    with LatentStore(path) as store:
        tracemalloc.start()
        assert store.load(victim_id) is None
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20, f"{peak} bytes allocated: the file was read before its size was checked"
        assert f"is {200 << 20} bytes, the manifest recorded" in store.events(1)[0]["detail"]


# ---------------------------------------------------------------------------------------------- 3. untrusted content
def _open_and_search(store_dir: str, out: str) -> None:
    """Child: open a store and search every key (a segfault kills this process, not the test)."""
    from comfyui_chai.cache.store import LatentStore as Store

    with Store(store_dir) as store:
        for key in KEYS:
            store.search(unit_vectors(np.random.default_rng(0), 3), key, k=5)
        Path(out).write_text(json.dumps(store.open_report))
    os._exit(0)


def _index_field_attack(blob: bytearray, field: str) -> None:
    count, size_data = struct.unpack_from("<Q", blob, 16)[0], struct.unpack_from("<Q", blob, 24)[0]
    if field == "enterpoint_node_":  # the reproduction: bytes 52-55
        struct.pack_into("<I", blob, 52, 10**6)
    elif field == "maxlevel_":
        struct.pack_into("<i", blob, 48, 40)
    elif field == "level-0 neighbour id":
        base = 96 + (count // 2) * size_data
        struct.pack_into("<H", blob, base, 1)
        struct.pack_into("<I", blob, base + 4, count + 5000)


def _attack_index(path: Path, edit) -> str:
    """Edit the first key's partition file and record it in the manifest as an attacker would
    (size, and a checksum made without this user's key). Returns the file name."""
    name = partition_file_name(KEYS[0])
    blob = bytearray((path / "index" / name).read_bytes())
    edit(blob)
    (path / "index" / name).write_bytes(bytes(blob))
    conn = sqlite3.connect(path / "manifest.sqlite")
    conn.execute("UPDATE partitions SET index_mac=?, index_size=? WHERE compat_key=?",
                 ("hmac-sha256:" + hashlib.sha256(bytes(blob)).hexdigest(), len(blob), KEYS[0]))
    conn.commit()
    conn.close()
    return name


@pytest.mark.parametrize("field", ["enterpoint_node_", "maxlevel_", "level-0 neighbour id"])
def test_a_crafted_index_with_a_matching_checksum_is_rebuilt_not_loaded(tmp_path, field):
    path = tmp_path / "s"
    ids = _store(path, range(100, 140))
    name = _attack_index(path, lambda blob: _index_field_attack(blob, field))
    out = tmp_path / "report.json"
    child = mp.get_context("fork").Process(target=_open_and_search, args=(str(path), str(out)))
    child.start()
    child.join(60)
    assert child.exitcode == 0, f"opening a store with a crafted {field} killed the process ({child.exitcode})"
    report = json.loads(out.read_text())
    assert any(line.startswith(f"index_rebuilt: {name}") for line in report), report
    with LatentStore(path) as store:
        for entry_id, seed in ids.items():
            e = seeded_entry(seed)
            best = store.search(e["embeddings"][:1], e["compat_key"], k=1)[0]
            assert best.entry_id == entry_id


def test_a_huge_capacity_in_an_index_file_is_never_allocated(tmp_path):
    """max_elements_ is the one header field hnswlib uses to size its arrays; the store tells
    hnswlib the element count instead, so a valid graph with a crafted capacity loads small."""
    path = tmp_path / "s"
    _store(path, range(100, 140))
    _attack_index(path, lambda blob: struct.pack_into("<Q", blob, 8, 1 << 40))
    with LatentStore(path) as store:
        assert store.open_report == []
        part = store.index._parts[KEYS[0]].index
        assert part.get_max_elements() == part.get_current_count() < 100


def test_a_signed_index_skips_the_structural_check_and_another_users_is_checked(tmp_path, monkeypatch):
    calls = []
    real = store_index.check_hnsw_file
    monkeypatch.setattr(store_index, "check_hnsw_file", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = tmp_path / "s"
    ids = _store(path)
    with LatentStore(path) as store:
        assert calls == [] and store.open_report == [], "files signed by this user's key load as they are"
    monkeypatch.setenv("CHAI_CONFIG_DIR", str(tmp_path / "other-user"))  # another key: a store from elsewhere
    keys = {r[0] for r in manifest_rows(path, "SELECT DISTINCT compat_key FROM entities")}
    with LatentStore(path) as store:
        assert len(calls) == len(keys) >= 2 and store.open_report == [], "valid files from elsewhere are checked, kept"
        for entry_id, seed in ids.items():
            assert_seeded_entry(store, entry_id, seed)
    calls.clear()
    with LatentStore(path) as store:
        assert calls == [], "a checked file is signed with this user's key for next time"
    assert oct((tmp_path / "other-user" / "index-key").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("flaw", ["readable by others", "a link", "short"])
def test_a_key_file_that_is_not_a_private_secret_is_not_trusted(tmp_path, caplog, monkeypatch, flaw):
    key = tmp_path / "cfg" / "index-key"
    key.parent.mkdir()
    secret = tmp_path / "elsewhere"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    if flaw == "a link":
        key.symlink_to(secret)
    else:
        key.write_bytes(os.urandom(32 if flaw != "short" else 8))
        key.chmod(0o644 if flaw == "readable by others" else 0o600)
    monkeypatch.setenv("CHAI_CONFIG_DIR", str(key.parent))
    with caplog.at_level(logging.WARNING):
        assert not IndexKey.for_user().usable
    assert "index key" in caplog.text
    ids = _store(tmp_path / "s")  # the store still works: every open checks the index structurally
    with LatentStore(tmp_path / "s") as store:
        for entry_id, seed in ids.items():
            assert_seeded_entry(store, entry_id, seed)


def test_rows_chai_never_writes_are_repaired_not_trusted(tmp_path, capsys):
    path = tmp_path / "s"
    ids = _store(path, range(20, 30))
    order = list(ids)
    conn = sqlite3.connect(path / "manifest.sqlite")
    conn.execute("UPDATE entries SET nbytes=-5 WHERE id=?", (order[0],))  # would bypass the budget
    conn.execute("UPDATE entries SET nbytes=? WHERE id=?", (1 << 40, order[1]))
    conn.execute("UPDATE entities SET embedding=x'00' WHERE entry_id=?", (order[2],))  # short blob
    conn.execute("UPDATE entries SET id=-7 WHERE id=?", (order[3],))
    conn.commit()
    conn.close()
    with LatentStore(path) as store:
        kept = set(order[4:])
        # Sizes and ids are checked on open; the short blob wherever embeddings are read (here the
        # rebuild the other repairs cause), else by verify.
        assert sum(1 for line in store.open_report if line.startswith("rows_removed: entry")) >= 3
        messages = store.open_report + store.verify().problems
        assert any(f"entry {order[2]}: an entity embedding is not {DIM} float32 values" in m for m in messages)
        assert {r.entry_id for r in store.entries()} == kept
        stats = store.stats()
        assert stats.bytes == sum(r.nbytes for r in store.entries()) > 0
        for entry_id in kept:
            assert_seeded_entry(store, entry_id, ids[entry_id])
        assert store.verify().ok
    code, out, _ = _cli(capsys, "cache", "stats", str(path))
    assert code == 0 and f"entries      {len(kept)} (" in out


@pytest.mark.parametrize("when", ["rebuild on open", "sync of another process", "verify"])
def test_an_embedding_of_the_wrong_length_is_never_indexed(tmp_path, when):
    """A short embedding blob is caught wherever vectors are read from the manifest (a rebuild, a
    catch-up, another process's insert) and by verify: never reshaped, never indexed, removed."""
    path = tmp_path / "s"
    ids = _store(path, range(20, 30))
    victim = list(ids)[2]
    key = seeded_entry(ids[victim])["compat_key"]

    def corrupt():
        conn = sqlite3.connect(path / "manifest.sqlite")
        conn.execute("UPDATE entities SET embedding=x'00' WHERE entry_id=?", (victim,))
        conn.commit()
        conn.close()

    if when == "rebuild on open":
        corrupt()
        (path / "index" / partition_file_name(key)).unlink()
        store = LatentStore(path)
        assert any(f"entry {victim}: an entity embedding" in line for line in store.open_report)
    elif when == "sync of another process":
        store = LatentStore(path)
        other = LatentStore(path)
        labels = store.index.labels(key)
        new = put_seeded(other, 99)  # a later row, then a crafted one the reader has not seen yet
        corrupt_label = manifest_rows(path, "SELECT MAX(label) FROM entities")[0][0]
        conn = sqlite3.connect(path / "manifest.sqlite")
        conn.execute("UPDATE entities SET embedding=x'00' WHERE label=?", (corrupt_label,))
        conn.commit()
        conn.close()
        other.close()
        store.search(unit_vectors(np.random.default_rng(0), 2), key)  # sync: must not raise
        assert corrupt_label not in store.index.labels(seeded_entry(99)["compat_key"]) | labels
        victim = new
        put_seeded(store, 100)  # the next locked write removes it
    else:
        corrupt()
        store = LatentStore(path)
        report = store.verify()
        assert f"entry {victim}: an entity embedding is not {DIM} float32 values, or names another key" in \
            report.problems
    assert store.entry(victim) is None
    assert store.verify().ok
    store.close()


@pytest.mark.parametrize("key,value", [("budget_bytes", "abc"), ("budget_bytes", "-5"), ("generation", "x"),
                                       ("policy", "mru"), ("index_params", "[]"), ("dim", "0")])
def test_meta_values_chai_never_writes_are_a_clear_error(tmp_path, capsys, key, value):
    path = tmp_path / "s"
    _store(path)
    conn = sqlite3.connect(path / "manifest.sqlite")
    conn.execute("UPDATE meta SET value=? WHERE key=?", (value, key))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=re.escape(f"meta field {key} = '{value}' is not a value CHAI writes")):
        LatentStore(path)
    for args in (("stats",), ("stats", "--read-only")):
        code, _, err = _cli(capsys, "cache", *args, str(path))
        assert code == 2 and f"meta field {key}" in err and err.count("\n") == 1


def test_sqlite_runs_with_trusted_schema_off(tmp_path):
    path = tmp_path / "s"
    _store(path)
    with LatentStore(path) as store:
        assert store._conn().execute("PRAGMA trusted_schema").fetchone()[0] == 0
    from comfyui_chai.cache.store_manifest import connect_read_only

    conn = connect_read_only(path / "manifest.sqlite", immutable=True)
    assert conn.execute("PRAGMA trusted_schema").fetchone()[0] == 0
    conn.close()


# ---------------------------------------------------------------------------------------------- 4. budgets
def test_budget_change_and_eviction_are_one_transaction(tmp_path, monkeypatch):
    from comfyui_chai.cache import store_budget

    path = tmp_path / "s"
    ids = _store(path)
    size = manifest_rows(path, "SELECT nbytes FROM entries LIMIT 1")[0][0]

    def failing_evict(c, victims, generation):
        c.execute("DELETE FROM entries WHERE id=?", (victims[0][0],))
        raise OSError("the disk failed in the middle of the eviction")

    monkeypatch.setattr(store_budget, "evict", failing_evict)
    with LatentStore(path) as store:
        budget = store.config.budget_bytes
        with pytest.raises(OSError, match="middle of the eviction"):
            store.set_budget(2 * size, evict_to_fit=True)
        assert {r.entry_id for r in store.entries()} == set(ids)
        assert store.stats().budget_bytes == budget, "the budget was saved without its eviction"


def test_the_cache_node_refuses_a_budget_that_would_evict(tmp_path):
    from comfyui_chai.nodes import registry
    from comfyui_chai.nodes.cache_nodes import CHAICache

    folder = tmp_path / "node-store"
    with LatentStore(folder, dim=DIM) as store:
        big = {"x": torch.randn(4, 64 * 1024)}  # 1 MiB of float32 per entry
        for i in range(3):
            store.put(big, [f"e{i}"], unit_vectors(np.random.default_rng(i), 1), "k", f"p{i}")
    try:
        with pytest.raises(BudgetError, match="would evict 2 entries"):
            CHAICache.execute(str(folder), budget_mb=2, policy="lru")
        assert len(manifest_rows(folder, "SELECT id FROM entries")) == 3
        (handle,) = CHAICache.execute(str(folder), budget_mb=2, policy="lru", evict_to_fit=True).args
        assert len(handle.store) == 1 and handle.store.config.budget_bytes == 2 << 20
        with pytest.raises(BudgetError):  # an open store: set_budget refuses the same way
            CHAICache.execute(str(folder), budget_mb=1, policy="lru")
        assert len(handle.store) == 1
    finally:
        registry.close_all()


def test_a_request_larger_than_the_budget_keeps_its_video(tmp_path, monkeypatch, capsys):
    import comfyui_chai.cache.embed as embed_mod
    import comfyui_chai.cache.entities as entities_mod
    from test_pipeline import CommaExtractor, WordBagEmbedder

    class Extractor(CommaExtractor):
        def __init__(self, mode="entity"):
            self.mode = mode

    monkeypatch.setattr(entities_mod, "EntityExtractor", Extractor)
    monkeypatch.setattr(embed_mod, "Embedder", WordBagEmbedder)
    (tmp_path / "p.txt").write_text("a red fox, snowy forest\nred fox, a river\n")
    out, store_dir = tmp_path / "out", tmp_path / "store"
    code, _, err = _cli(capsys, "generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--store",
                        str(store_dir), "--model", "tiny", "--captions", "hashed", "--no-progress", "--budget-mb",
                        "0.001")
    assert code == 0, err
    rows = json.loads((out / "report.json").read_text())["prompts"]
    assert [r["hit"] for r in rows] == [False, False] and all("not cached" in r["not_stored"] for r in rows)
    assert all((out / r["video"]).stat().st_size > 0 for r in rows)
    assert "more than the store's whole budget of 1,049 bytes" in err  # 0.001 MiB
    assert read_stats(store_dir).entries == 0


def test_generate_refuses_a_budget_that_would_evict(tmp_path, capsys):
    store_dir = tmp_path / "store"
    ids = _store(store_dir)
    (tmp_path / "p.txt").write_text("a fox\n")
    code, _, err = _cli(capsys, "generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
                        "--store", str(store_dir), "--budget-mb", "0.001")
    assert code == 2 and re.search(r"would evict [0-9]+ entries", err) and "--evict-to-fit" in err
    with LatentStore(store_dir) as store:
        assert {r.entry_id for r in store.entries()} == set(ids) and store.config.budget_bytes == 1 << 30


# ---------------------------------------------------------------------------------------------- 5. errors
def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def _fill(filler: Path) -> None:
    """Write zeros until the file system is full (unbuffered: the last write fails, not the close)."""
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                continue


def test_a_full_disk_is_reported_as_a_full_disk(tmp_path):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "4m"):
        pytest.skip("needs root and a tmpfs mount to fill a disk safely")
    try:
        path = mnt / "store"
        ids = _store(path, range(10, 20))
        filler = mnt / "filler"
        _fill(filler)
        with pytest.raises(DiskFullError, match=r"the disk holding .* is full \([0-9,]+ bytes free\)") as err:
            with LatentStore(path, budget_bytes=1 << 20):  # a budget change must write the manifest
                pass
        assert "not a CHAI store" not in str(err.value) and err.value.free_bytes >= 0
        filler.unlink()
        # Fill it again while a store is open: a put fails clearly, a lookup's statistics are skipped.
        store = LatentStore(path)
        _fill(filler)
        with pytest.raises(DiskFullError, match="is full"):
            for s in range(500, 600):
                put_seeded(store, s)
        for _ in range(200):  # statistics are best effort: they never raise, disk full or not
            store.record_lookup("a fox" * 50, ["fox"], None, None, None, None, 1.0)
        filler.unlink()
        store.close()
        with LatentStore(path) as store:
            for entry_id, seed in ids.items():
                assert_seeded_entry(store, entry_id, seed)
            assert store.verify().ok
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_sqlite_errors_are_named_for_what_they_mean(tmp_path, monkeypatch):
    from comfyui_chai.cache import store_manifest

    monkeypatch.setattr(store_manifest, "_free_bytes", lambda folder: 4096)
    full = sqlite_store_error(sqlite3.OperationalError("database or disk is full"), tmp_path, "write the manifest")
    assert isinstance(full, DiskFullError) and "is full (4,096 bytes free)" in str(full)
    monkeypatch.setattr(store_manifest, "_free_bytes", lambda folder: 50 << 30)  # SQLITE_FULL with room to spare:
    ids = sqlite_store_error(sqlite3.OperationalError("database or disk is full"), tmp_path, "write the manifest")
    assert not isinstance(ids, DiskFullError) and "row ids are used up" in str(ids)  # not a disk-full story
    ro = sqlite_store_error(sqlite3.OperationalError("attempt to write a readonly database"), tmp_path, "x")
    assert "read-only" in str(ro)
    locked = sqlite_store_error(sqlite3.OperationalError("database is locked"), tmp_path, "x")
    assert "locked by another process" in str(locked)
    bad = sqlite_store_error(sqlite3.DatabaseError("file is not a database"), tmp_path, "x")
    assert "damaged" in str(bad) and "not a CHAI store" not in str(bad)


def test_statistics_never_fail_a_request(tmp_path, caplog):
    from comfyui_chai.cache.lookup import CacheLookup, LookupConfig
    from test_lookup import CommaExtractor, TableEmbedder, latents

    store = LatentStore(tmp_path / "s", dim=8)
    lookup = CacheLookup(store, CommaExtractor(), TableEmbedder(), LookupConfig(threshold=0.8))
    lookup.insert(lookup.lookup("fox, river", "K", record=False), latents(1.0))

    def broken_tx():
        raise sqlite3.OperationalError("database or disk is full")

    store._manifest.tx = broken_tx
    with caplog.at_level(logging.WARNING):
        result = lookup.lookup("fox", "K")
        assert result.hit and result.latents is not None
        lookup.lookup("fox", "K")
    assert caplog.text.count("lookup statistics not recorded") == 1 and "is full" in caplog.text
    del store._manifest.tx
    store.close()


def test_verify_exits_1_whenever_it_repaired_something(tmp_path, capsys):
    path = tmp_path / "s"
    _store(path)
    (path / "index" / partition_file_name(KEYS[0])).write_bytes(b"junk")  # repaired while opening
    code, out, _ = _cli(capsys, "cache", "verify", str(path))
    assert code == 1 and "repaired on open: index_rebuilt" in out and "problem(s) found and repaired" in out
    code, out, _ = _cli(capsys, "cache", "verify", str(path))
    assert code == 0 and "OK: store is consistent" in out
    with open(path / "index" / partition_file_name(KEYS[0]), "ab") as f:
        f.write(b"\0")  # the saved file no longer matches its size and keyed checksum
    code, out, _ = _cli(capsys, "cache", "verify", str(path))
    assert code == 1 and "index_rebuilt" in out


@pytest.mark.parametrize("args,message", [
    (["simulate", "--prompts", "{bin}"], "is not UTF-8 text (byte 0xff at offset 0)"),
    (["simulate", "--prompts", "{nul}"], "holds NUL bytes"),
    (["simulate", "--prompts", "{ints}"], "item 0 is 1, not a prompt string"),
    (["simulate", "--prompts", "{obj}"], "holds a JSON dict, not a list"),
    (["simulate", "--prompts", "{broken}"], "is not valid JSON"),
    (["simulate", "--limit", "0"], "argument --limit: must be a whole number >= 1, got '0'"),
    (["simulate", "--budget-mb", "inf"], "argument --budget-mb: must be a number of MiB above 0"),
    (["generate", "--prompts", "{txt}", "--out", "{o}", "--store", "{s}", "--limit", "-1"], "argument --limit"),
    (["generate", "--prompts", "{txt}", "--out", "{o}", "--store", "{s}", "--budget-mb", "nan"],
     "argument --budget-mb"),
    (["generate", "--prompts", "{txt}", "--out", "{o}", "--store", "{s}", "--budget-mb", "-1"],
     "argument --budget-mb"),
    (["generate", "--prompts", "{txt}", "--out", "{o}", "--store", "{s}", "--seed", str(1 << 64)],
     "argument --seed: must be a whole number from 0 to 18446744073709551615"),
    (["generate", "--prompts", "{txt}", "--out", "{o}", "--store", "{s}", "--seed", str((1 << 64) - 1)],
     "give a smaller --seed"),
    (["generate", "--prompts", "{txt}", "--out", "{o}", "--store", "{someone}"], "is not empty and is not a CHAI"),
    (["demo", "--limit", "0"], "argument --limit"),
])
def test_bad_inputs_get_a_one_line_error(tmp_path, capsys, args, message):
    files = {"bin": b"\xff\xfe\x00abc", "nul": b"a fox\x00\n", "ints": b"[1, 2]", "obj": b'{"prompt": "a fox"}',
             "broken": b"[1,", "txt": b"a fox\na river\n"}
    names = {"bin": "p.txt", "nul": "n.txt", "ints": "i.json", "obj": "o.json", "broken": "b.json", "txt": "t.txt"}
    paths = {}
    for key, data in files.items():
        paths[key] = tmp_path / names[key]
        paths[key].write_bytes(data)
    paths.update(o=tmp_path / "out", s=tmp_path / "store", someone=_someones_folder(tmp_path))
    argv = [a.format(**paths) for a in args]
    code, out, err = _cli(capsys, *argv)
    assert code == 2, (code, out, err)
    last = err.strip().splitlines()[-1]
    assert message in last and "Traceback" not in err, err
    if "--prompts" in args and "{" in args[2] and args[0] == "simulate":
        assert str(paths[args[2].strip("{}")]) in last, "the error must name the file"
    assert not (tmp_path / "store").exists()


def test_a_prompt_of_stop_words_is_a_miss_that_stores_nothing(tmp_path, caplog):
    from comfyui_chai.cache.entities import EntityExtractor
    from comfyui_chai.cache.lookup import CacheLookup, LookupConfig
    from test_lookup import TableEmbedder, latents

    store = LatentStore(tmp_path / "s", dim=8)
    lookup = CacheLookup(store, EntityExtractor(), TableEmbedder(), LookupConfig())
    for prompt in ("a the of", "so very", "of of of"):
        result = lookup.lookup(prompt, "K")
        assert result.entities == [] and not result.hit
        with caplog.at_level(logging.WARNING):
            assert lookup.insert(result, latents(1.0)) is None
        assert "has no entity to be found by" in result.not_stored
    assert len(store) == 0 and store.stats().misses == 3
    store.close()


# ---------------------------------------------------------------------------------------------- 6. someone's folder
def test_someones_folder_is_byte_identical_after_every_command_and_node(tmp_path, capsys):
    """Point every command and node that takes a store at a folder of someone's files (including
    names a store uses and another application's manifest.sqlite): each refuses, none changes a byte."""
    from comfyui_chai.nodes import registry
    from comfyui_chai.nodes.cache_nodes import CHAICache

    folder = _someones_folder(tmp_path)
    _other_app_db(folder / "manifest.sqlite")
    (folder / "link-out").symlink_to(tmp_path)
    before = tree(folder)
    (tmp_path / "p.txt").write_text("a fox\n")
    commands = [
        ["cache", "stats", str(folder)], ["cache", "stats", "--json", str(folder)],
        ["cache", "stats", "--read-only", str(folder)], ["cache", "verify", str(folder)],
        ["cache", "verify", "--quick", str(folder)], ["cache", "compact", str(folder)],
        ["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--store", str(folder)],
        ["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--store", str(folder),
         "--budget-mb", "1", "--evict-to-fit", "--policy", "fifo"],
        ["demo", "--store", str(folder), "--limit", "1", "--out", str(tmp_path / "d"), "--no-progress"],
    ]
    for argv in commands:
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and "not a CHAI" in err and "Traceback" not in err, (argv, err)
        assert tree(folder) == before, f"`{' '.join(argv)}` changed the folder"
    for name in (str(folder), str(folder) + "/"):
        assert CHAICache.fingerprint_inputs(name).endswith("@None")
        for create_new in (False, True):
            with pytest.raises(StoreError, match="not a CHAI"):
                CHAICache.execute(name, budget_mb=1, policy="lfu", evict_to_fit=True, create_new=create_new)
        assert registry.peek_generation(folder) is None
        assert tree(folder) == before, "a node changed the folder"
    for call in (lambda: LatentStore(folder), lambda: read_stats(folder)):
        with pytest.raises(StoreError):
            call()
    assert tree(folder) == before
    registry.close_all()



def test_without_directory_descriptors_the_same_rules_hold(tmp_path, monkeypatch):
    """Where the OS has no ``dir_fd`` (Windows) the files module works on checked paths: the store
    works, a link in place of a store folder is refused and a linked latent is never followed."""
    from comfyui_chai.cache import store_files

    monkeypatch.setattr(store_files, "USE_DIR_FD", False)
    path = tmp_path / "s"
    ids = _store(path, range(40, 48))
    with LatentStore(path) as store:
        for entry_id, seed in ids.items():
            assert_seeded_entry(store, entry_id, seed)
        first, second = list(ids)[:2]
        assert store.delete([first]) == 1 and not latent_path(path, first).exists()
        outside = tmp_path / "outside.bin"
        outside.write_bytes(latent_path(path, second).read_bytes())
        latent_path(path, second).unlink()
        latent_path(path, second).symlink_to(outside)
        assert store.load(second) is None and outside.exists() and latent_path(path, second).is_symlink()
        assert store.verify().ok
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "photo.jpg").write_bytes(b"precious")
    shutil.rmtree(path / "quarantine")
    (path / "quarantine").symlink_to(victim, target_is_directory=True)
    with pytest.raises(ContainmentError, match="quarantine is a link or not a folder"):
        LatentStore(path)
    assert tree(victim) == {"photo.jpg": ("file", b"precious", (victim / "photo.jpg").stat().st_mode)}
