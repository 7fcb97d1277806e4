"""LatentStore under faults: SIGKILL mid-write, corrupt or stale files, two processes, read-only disks.

What is promised (DESIGN.md "The store", reference/ecosystem.md section 2.5 "test what they
don't"): after any crash the store opens, repairs what the crash left, and holds every entry
whose ``put`` returned; a truncated or corrupt latent file is detected, quarantined, reported and
never served; a bad, stale or missing index file is detected on open and rebuilt from the
manifest; several processes can share one store; and refused operations lose nothing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import _store_worker
from _store_util import (
    DIM,
    KEYS,
    assert_search_sound,
    assert_tensors_equal,
    assert_seeded_entry,
    entity_vectors,
    latent_files,
    latent_path,
    manifest_files,
    manifest_labels,
    manifest_rows,
    manifest_total,
    put_seeded,
    quarantined,
    seeded_entry,
    unit_vectors,
)
from comfyui_chai.cache.index import partition_file_name
from comfyui_chai.cache.store import LatentStore, StoreConfig, StoreError, read_stats
from comfyui_chai.cli import main as cli_main


def _file_of(store, entry_id: int) -> Path:
    return latent_path(store.path, entry_id)


def _assert_finds_all(store, seeds_by_id: dict[int, int]) -> None:
    """Every entity of every live entry finds its own entry first (similarity ~1)."""
    for entry_id, seed in seeds_by_id.items():
        e = seeded_entry(seed)
        matches = store.search(e["embeddings"], e["compat_key"], k=3)
        for qi in range(len(e["entities"])):
            best = [m for m in matches if m.query_index == qi][0]
            assert best.entry_id == entry_id and best.similarity > 0.999, \
                f"entity {qi} of entry {entry_id} finds entry {best.entry_id} ({best.similarity:.3f})"


# ---------------------------------------------------------------------------------------------- SIGKILL
def test_sigkill_during_inserts_never_loses_a_committed_entry(tmp_path):
    """60 children, each killed with SIGKILL at a random moment (while opening, writing a latent
    file, committing, evicting, compacting or saving the index): every fifth right after it
    starts, the others after 1-4 committed inserts plus a random part of one insert's duration. After every kill: the store opens,
    verify() finds nothing left to repair, every entry the child reported after put() returned is
    there with its exact tensors (or was evicted, oldest first, by the budget), the byte budget
    holds, disk == manifest, and no search result names a missing row or file."""
    path = tmp_path / "store"
    budget = 60_000  # ~60 entries of ~1 KB: evictions start about halfway through
    with LatentStore(path, dim=DIM, budget_bytes=budget):
        pass
    ctx = mp.get_context("fork")  # the parent has torch/hnswlib imported already: children start fast
    rng = random.Random(20240607)
    committed: dict[int, int] = {}  # entry id -> seed, everything any child reported
    repaired_rounds = 0
    rounds = 60
    t0 = time.monotonic()
    for rnd in range(rounds):
        r, w = os.pipe()
        child = ctx.Process(target=_store_worker.crash_child, args=(str(path), w, (rnd + 1) * 1_000_000, budget))
        child.start()
        os.close(w)
        buf = bytearray()
        if rnd % 5 == 0:  # kill while it opens (and repairs what the previous kill left)
            time.sleep(rng.uniform(0.0, 0.03))
        else:  # kill at a random phase of a put, whatever this machine's speed
            want, stamps, deadline = rng.randint(1, 4), [time.monotonic()], time.monotonic() + 20
            while buf.count(b"\n") < want and time.monotonic() < deadline and b"ERR" not in buf:
                if select.select([r], [], [], 0.5)[0]:
                    block = os.read(r, 65536)
                    if not block:
                        break
                    buf += block
                    stamps.append(time.monotonic())
            time.sleep(rng.uniform(0.0, 1.2 * (stamps[-1] - stamps[-2]) if len(stamps) > 2 else 0.02))
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        while True:
            block = os.read(r, 65536)
            if not block:
                break
            buf += block
        os.close(r)
        lines = buf.decode().splitlines()
        errors = [ln for ln in lines if ln.startswith("ERR")]
        assert not errors, f"round {rnd}: the child failed before it was killed: {errors[0]}"
        assert child.exitcode == -signal.SIGKILL, f"round {rnd}: child exit code {child.exitcode}"
        this_round = {int(a): int(b) for a, b in (ln.split() for ln in lines)}
        assert not (set(this_round) & set(committed)), "an entry id was handed out twice"
        committed.update(this_round)

        with LatentStore(path) as store:
            if store.open_report:
                repaired_rounds += 1
            report = store.verify()
            assert report.ok, f"round {rnd}: verify found problems after open: {report.problems}"
            live = {int(x[0]) for x in manifest_rows(path, "SELECT id FROM entries")}
            lost = set(committed) - live
            kept = set(committed) & live
            if lost and kept:
                assert max(lost) < min(kept), (
                    f"round {rnd}: committed entries {sorted(lost - set(range(min(kept))))[:5]} are gone while "
                    "older ones survive; LRU without accesses may only evict the oldest")
            assert store.stats().evictions >= len(lost), f"round {rnd}: {len(lost)} committed entries lost"
            for entry_id in this_round:
                if entry_id in live:
                    assert_seeded_entry(store, entry_id, committed[entry_id])
            for entry_id in rng.sample(sorted(kept), min(5, len(kept))):
                assert_seeded_entry(store, entry_id, committed[entry_id])
            assert manifest_total(path) <= budget
            files = latent_files(path)
            assert set(files) == manifest_files(path)
            assert sum(files.values()) == manifest_total(path)
            assert not list((path / "index").glob("*.tmp*")), "a temp index file survived the open"
            for key in KEYS:
                assert store.index.labels(key) == manifest_labels(path, key)
            queries = np.concatenate([unit_vectors(np.random.default_rng(rnd), 4)]
                                     + [seeded_entry(s)["embeddings"] for s in list(this_round.values())[-3:]])
            assert_search_sound(store, queries)
    elapsed = time.monotonic() - t0
    assert len(committed) >= rounds, f"only {len(committed)} inserts committed in {rounds} rounds"
    with LatentStore(path) as store:
        evictions = store.stats().evictions
    assert evictions > 0, "the budget never forced an eviction: the eviction path was not under fire"
    assert repaired_rounds >= 1, "no kill landed inside a write: the test exercised nothing"
    assert elapsed < 60, f"the crash test took {elapsed:.0f} s"
    print(f"\n{rounds} SIGKILLs, {len(committed)} committed inserts, {evictions} evictions, "
          f"{repaired_rounds} opens repaired something, {elapsed:.1f} s")


# ---------------------------------------------------------------------------------------------- latents
def _store_with(path, seeds):
    store = LatentStore(path, dim=DIM)
    ids = {put_seeded(store, s): s for s in seeds}
    return store, ids


def _assert_quarantined(store, entry_id, file: Path, n: int, reason: str) -> None:
    assert store.entry(entry_id) is None, "a corrupt entry must lose its rows"
    assert not file.exists() and len(quarantined(store.path, entry_id)) == 1, "not moved to quarantine/"
    assert not manifest_rows(store.path, "SELECT 1 FROM entities WHERE entry_id=?", (entry_id,))
    stats = store.stats()
    assert stats.quarantined == n and stats.repairs >= n
    assert stats.entries == stats.inserts - n
    event = store.events(1)[0]
    assert event["kind"] == "quarantined" and f"entry {entry_id}" in event["detail"] and reason in event["detail"]
    assert any(f"entry {entry_id}" in line for line in store.open_report)


def test_truncated_latent_is_quarantined_reported_and_never_served(tmp_path):
    store, ids = _store_with(tmp_path / "s", range(10, 16))
    with store:
        victim = list(ids)[2]
        file = _file_of(store, victim)
        blob = file.read_bytes()
        file.write_bytes(blob[: len(blob) // 2])
        vecs = entity_vectors(store.path, victim)
        assert store.load(victim) is None
        _assert_quarantined(store, victim, file, 1, "bytes, the manifest recorded")
        assert all(m.entry_id != victim for m in store.search(vecs, seeded_entry(ids[victim])["compat_key"], k=10))
        assert store.load(victim) is None  # and stays a miss
        assert store.verify().ok, "load() already repaired it; verify must find nothing more"
        # The same damage found by verify() instead of load(): reported and repaired, then clean.
        other = list(ids)[4]
        f2 = _file_of(store, other)
        f2.write_bytes(f2.read_bytes()[:40])
        report = store.verify()
        assert not report.ok and f2.name in report.files_quarantined
        assert any(f"entry {other}" in p for p in report.problems)
        assert store.entry(other) is None and store.stats().quarantined == 2
        assert store.verify().ok
    with LatentStore(tmp_path / "s") as store:
        survivors = {i: s for i, s in ids.items() if i not in (victim, other)}
        assert {r.entry_id for r in store.entries()} == set(survivors)
        for entry_id, seed in survivors.items():
            assert_seeded_entry(store, entry_id, seed)
        _assert_finds_all(store, survivors)
        assert store.stats().quarantined == 2


@pytest.mark.parametrize("where", ["data", "header", "last byte"])
def test_flipped_bytes_in_a_latent_are_quarantined(tmp_path, where):
    store, ids = _store_with(tmp_path / "s", range(20, 24))
    with store:
        victim = list(ids)[1]
        file = _file_of(store, victim)
        blob = bytearray(file.read_bytes())
        pos = {"data": len(blob) - 20, "header": 12, "last byte": len(blob) - 1}[where]
        blob[pos] ^= 0x5A
        file.write_bytes(bytes(blob))  # same size: only the checksum can tell
        assert store.load(victim) is None
        _assert_quarantined(store, victim, file, 1, "SHA-256")
        survivors = {i: s for i, s in ids.items() if i != victim}
        for entry_id, seed in survivors.items():
            assert_seeded_entry(store, entry_id, seed)
        _assert_finds_all(store, survivors)


def test_missing_latent_file_is_a_miss_and_a_repair(tmp_path):
    store, ids = _store_with(tmp_path / "s", range(30, 33))
    with store:
        victim = list(ids)[0]
        file = _file_of(store, victim)
        file.unlink()
        report = store.verify()
        assert not report.ok and report.rows_removed == 1
        assert store.entry(victim) is None and store.load(victim) is None
        assert store.stats().repairs >= 1
        assert store.verify().ok
        _assert_finds_all(store, {i: s for i, s in ids.items() if i != victim})


def test_stray_files_from_an_interrupted_write_are_removed_on_open(tmp_path):
    """Only regular files of the store's own naming that no row names are removed (a crash between
    the rename and the commit, a temp file); anything else in latents/ or index/ is left alone."""
    store, ids = _store_with(tmp_path / "s", range(40, 43))
    store.close()
    latents, index = tmp_path / "s" / "latents", tmp_path / "s" / "index"
    strays = [latents / "99.safetensors", latents / f"put-{'a' * 32}.tmp",
              index / f"index-{'0' * 16}.bin.tmp-{'b' * 32}", index / f"index-{'1' * 16}.bin"]
    for p in strays:
        p.write_bytes(b"left by a crash")
    foreign = {latents / "0123abcd.safetensors": b"someone's", latents / "notes.txt": b"mine",
               latents / "7.safetensors.tmp999": b"x", index / "index-0000.bin.tmp999": b"half"}
    for p, data in foreign.items():
        p.write_bytes(data)
    (latents / "98.safetensors").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "elsewhere.txt").write_bytes(b"not the store's")
    with LatentStore(tmp_path / "s") as store:
        assert any(line.startswith("orphans_removed: 4 stray") for line in store.open_report), store.open_report
        assert store.events(1)[0]["kind"] == "orphans_removed"
        assert not any(p.exists() for p in strays)
        assert all(p.read_bytes() == data for p, data in foreign.items()), "a file the store did not make was touched"
        assert (latents / "98.safetensors").is_symlink() and (tmp_path / "elsewhere.txt").read_bytes() == b"not the store's"
        assert set(store.left_alone) == {f"{p.parent.name}/{p.name}" for p in foreign} | {"latents/98.safetensors"}
        report = store.verify()
        assert report.ok and set(report.left_alone) == set(store.left_alone)
        for entry_id, seed in ids.items():
            assert_seeded_entry(store, entry_id, seed)


@pytest.mark.parametrize("kill_after_move", [False, True], ids=["killed before the move", "killed after the move"])
def test_crash_while_quarantining_leaves_a_consistent_store(tmp_path, kill_after_move):
    """SIGKILL at the moment a corrupt file is moved to quarantine/: the next open must leave
    nothing for verify() to find (no row whose file is missing), and lose nothing else."""
    store, ids = _store_with(tmp_path / "s", range(50, 55))
    victim = list(ids)[2]
    f = _file_of(store, victim)
    f.write_bytes(f.read_bytes()[:-9])
    store.close()
    child = mp.get_context("fork").Process(target=_store_worker.quarantine_child,
                                           args=(str(tmp_path / "s"), victim, kill_after_move))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, f"the child did not die in the quarantine (exit {child.exitcode})"
    with LatentStore(tmp_path / "s") as store:
        report = store.verify()
        assert report.ok, f"after a crash mid-quarantine verify still finds: {report.problems}"
        assert store.entry(victim) is None and store.load(victim) is None
        survivors = {i: s for i, s in ids.items() if i != victim}
        assert {r.entry_id for r in store.entries()} == set(survivors)
        for entry_id, seed in survivors.items():
            assert_seeded_entry(store, entry_id, seed)
        _assert_finds_all(store, survivors)


# ---------------------------------------------------------------------------------------------- index files
def _index_file(store, key) -> Path:
    return store.path / "index" / partition_file_name(key)


def _populated(path, n=18):
    store = LatentStore(path, dim=DIM)
    ids = {put_seeded(store, s): s for s in range(100, 100 + n)}
    store.close()
    return ids


def _reopen_and_check_repaired(path, ids, key, repairs_before=0):
    with LatentStore(path) as store:
        assert any(line.startswith("index_rebuilt") and partition_file_name(key) in line for line in store.open_report), \
            f"open did not report rebuilding {partition_file_name(key)}: {store.open_report}"
        assert store.events(5)[0]["kind"] == "index_rebuilt"
        assert store.stats().repairs == repairs_before + 1
        assert store.index.labels(key) == manifest_labels(path, key)
        _assert_finds_all(store, ids)
        assert store.verify().ok
    with LatentStore(path) as store:  # the rebuilt file was saved: the next open is clean
        assert store.open_report == []


@pytest.mark.parametrize("damage", ["garbage same size", "garbage other size", "truncated", "deleted", "empty"])
def test_bad_index_file_is_detected_rebuilt_and_reported(tmp_path, damage):
    path = tmp_path / "s"
    ids = _populated(path)
    key = seeded_entry(next(iter(ids.values())))["compat_key"]
    with LatentStore(path) as store:
        f = _index_file(store, key)
    size = f.stat().st_size
    if damage == "garbage same size":
        f.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    elif damage == "garbage other size":
        f.write_bytes(b"\x00\xff" * 999)
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[: size // 3])
    elif damage == "deleted":
        f.unlink()
    else:
        f.write_bytes(b"")
    _reopen_and_check_repaired(path, ids, key)


def test_index_older_than_the_manifest_is_detected_and_rebuilt(tmp_path):
    """Copy back an old index file and its partitions row after later inserts and evictions."""
    path = tmp_path / "s"
    ids = _populated(path, n=12)
    key = KEYS[0]
    old_file = (path / "index" / partition_file_name(key)).read_bytes()
    old_row = manifest_rows(path, "SELECT index_mac, index_size, index_generation, index_deleted "
                                  "FROM partitions WHERE compat_key=?", (key,))[0]
    with LatentStore(path) as store:
        old_of_key = [i for i, s in ids.items() if seeded_entry(s)["compat_key"] == key]
        assert len(old_of_key) >= 2
        store.delete(old_of_key[:2])  # these must never come back from the stale index
        for s in range(500, 510):
            ids[put_seeded(store, s)] = s
        for i in old_of_key[:2]:
            del ids[i]
    (path / "index" / partition_file_name(key)).write_bytes(old_file)
    conn = sqlite3.connect(path / "manifest.sqlite")
    with conn:
        conn.execute("UPDATE partitions SET index_mac=?, index_size=?, index_generation=?, index_deleted=? "
                     "WHERE compat_key=?", (*old_row, key))
    conn.close()
    with LatentStore(path) as store:
        assert any(partition_file_name(key) in line for line in store.open_report), \
            f"a stale index must be reported on open: {store.open_report}"
        assert store.index.labels(key) == manifest_labels(path, key)
        _assert_finds_all(store, ids)
        deleted_vecs = np.concatenate([seeded_entry(s)["embeddings"] for s in range(100, 112)])
        found = {m.entry_id for m in store.search(deleted_vecs, key, k=10)}
        assert not (found & set(old_of_key[:2])), "a deleted entry came back from the stale index"
        assert store.verify().ok


def test_index_behind_the_manifest_after_a_crash_catches_up(tmp_path):
    """A process that dies without saving the index leaves it behind the manifest (autosave is
    periodic); the next open must bring it up to date from the manifest, including deletions."""
    path = tmp_path / "s"
    ids = _populated(path, n=10)
    store = LatentStore(path)
    first = list(ids)[:3]
    store.delete(first)
    new = {put_seeded(store, s): s for s in range(700, 705)}
    # Simulate the crash: drop the object without close() (no index save, connections abandoned).
    store._closed = True
    store._manifest.close()
    live = {i: s for i, s in ids.items() if i not in first} | new
    with LatentStore(path) as again:
        for key in KEYS:
            assert again.index.labels(key) == manifest_labels(path, key)
        _assert_finds_all(again, live)
        vecs = np.concatenate([seeded_entry(ids[i])["embeddings"] for i in first])
        for key in KEYS:
            assert not ({m.entry_id for m in again.search(vecs, key, k=20)} & set(first))
        assert again.verify().ok


def test_other_process_deletions_reach_a_long_lived_reader(tmp_path):
    """Process A stays open while process B evicts entries and closes (B's close saves the index
    and prunes the deletion log). A's in-memory index must still drop B's deletions: A's verify()
    stays clean and A never keeps stale vectors that it would write into the next index save."""
    path = tmp_path / "s"
    a = LatentStore(path, dim=DIM)
    ids = {put_seeded(a, s): s for s in range(200, 212)}
    b = LatentStore(path)
    gone = list(ids)[:5]
    assert b.delete(gone) == 5
    b.close()
    for key in KEYS:
        a.sync()
        assert a.index.labels(key) == manifest_labels(path, key), "A kept vectors that B deleted"
    report = a.verify()
    assert report.ok, report.problems
    a.close()
    with LatentStore(path) as c:
        assert c.open_report == [], f"A's index save was stale: {c.open_report}"


# ---------------------------------------------------------------------------------------------- two processes
def test_two_processes_insert_delete_and_look_up_concurrently(tmp_path):
    """Two processes share one store for 20 s (insert, delete own, search, load, count lookups)."""
    path = tmp_path / "s"
    with LatentStore(path, dim=DIM):
        pass
    seconds = 20.0
    outs = [tmp_path / f"w{i}.log" for i in (1, 2)]
    # Forked from this already-imported process, the workers start at once (no torch import), so
    # the 20 s are 20 s of both writing and reading; each has its own connections and file lock.
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_store_worker.two_process_child, args=(str(path), seconds, i, str(out)))
             for i, out in zip((1, 2), outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(seconds + 60)
    for i, (p, out) in enumerate(zip(procs, outs), 1):
        err = Path(str(out) + ".err")
        assert p.exitcode == 0, f"worker {i} exited with {p.exitcode}:\n" + (err.read_text() if err.exists() else "")
    puts, deleted, lookups, foreign = {}, set(), 0, 0
    for out in outs:
        lines = out.read_text().splitlines()
        assert lines and lines[-1].startswith("done"), "a worker did not finish"
        n_put, n_del, n_lookup, n_foreign = map(int, lines[-1].split()[1:])
        assert n_put > 50 and n_lookup > 50, f"too little work to prove anything: {lines[-1]}"
        foreign += n_foreign
        for ln in lines[:-1]:
            parts = ln.split()
            if parts[0] == "put":
                puts[int(parts[1])] = int(parts[2])
            elif parts[0] == "del":
                deleted.add(int(parts[1]))
            else:
                lookups += 1
    with LatentStore(path) as store:
        assert store.open_report == []
        report = store.verify()
        assert report.ok, report.problems
        live_ids = {r.entry_id for r in store.entries()}
        assert live_ids == set(puts) - deleted, "committed entries were lost or deleted ones came back"
        for entry_id in live_ids:
            assert_seeded_entry(store, entry_id, puts[entry_id])
        stats = store.stats()
        assert stats.inserts == len(puts) and stats.lookups == lookups == stats.hits
        assert stats.quarantined == 0 and stats.evictions == 0
        _assert_finds_all(store, {i: puts[i] for i in sorted(live_ids)[::25]})
    assert foreign > 0, "neither process ever loaded an entry the other one wrote"
    print(f"\ntwo processes, {seconds:.0f} s: {len(puts)} inserts, {len(deleted)} deletes, {lookups} lookups, "
          f"{foreign} loads of the other process's entries")


# ---------------------------------------------------------------------------------------------- read-only / full
def _mount_tmpfs(where: Path, options: str = "size=16m") -> bool:
    """Mount a tmpfs at ``where`` (root only); False when that is not possible here."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"mount {' '.join(args)} failed: {proc.stderr}"


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def test_read_only_store_is_a_clear_error_and_loses_nothing(tmp_path, capsys):
    """As root chmod cannot stop writes, so the store lives on a tmpfs remounted read-only (and a
    read-only tmpfs is mounted over latents/ of an open store); otherwise chmod 0555 is used."""
    mnt = tmp_path / "mnt"
    mounted = _mount_tmpfs(mnt)
    if not mounted and os.geteuid() == 0:
        pytest.skip("running as root without permission to mount a tmpfs: chmod cannot stop root's writes")
    mnt.mkdir(exist_ok=True)
    path = mnt / "store"
    latents_ro = False
    try:
        with LatentStore(path, dim=DIM) as store:
            ids = {put_seeded(store, s): s for s in range(300, 306)}

        # 1. Opening a store on a read-only file system.
        if mounted:
            _mount("-o", "remount,ro", str(mnt))
        else:
            path.chmod(0o555)
        try:
            with pytest.raises(StoreError, match="is not writable"):
                LatentStore(path)
            # ...but its statistics can still be read, without repair and without writing.
            stats = read_stats(path)
            assert (stats.entries, stats.inserts) == (len(ids), len(ids)) and stats.bytes > 0
            code = cli_main(["cache", "stats", str(path)])
            out = capsys.readouterr().out
            assert code == 0 and "read-only: manifest read as is" in out and f"entries      {len(ids)} (" in out
        finally:
            if mounted:
                _mount("-o", "remount,rw", str(mnt))
            else:
                path.chmod(0o755)

        # 2. The latent folder turns read-only under an open store.
        store = LatentStore(path)
        gen = store.generation
        if mounted:
            _mount("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path / "latents"))
            latents_ro = True
        else:
            (path / "latents").chmod(0o555)
        try:
            with pytest.raises(StoreError, match="could not write a latent file .*(Read-only|Permission)"):
                put_seeded(store, 999)
            assert store.generation == gen and len(store) == len(ids)
        finally:
            if mounted:
                _umount(path / "latents")
                latents_ro = False
            else:
                (path / "latents").chmod(0o755)
        new = put_seeded(store, 1000)  # and it works again once the disk does
        ids[new] = 1000
        store.close()

        with LatentStore(path) as store:
            assert {r.entry_id for r in store.entries()} == set(ids)
            for entry_id, seed in ids.items():
                assert_seeded_entry(store, entry_id, seed)
            assert store.verify().ok and store.open_report == []
    finally:
        if latents_ro:
            _umount(path / "latents")
        if mounted:
            _umount(mnt)


def test_disk_full_is_a_clear_error_and_keeps_every_committed_entry(tmp_path):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "size=400k"):
        pytest.skip("needs root and a tmpfs mount to fill a disk safely")
    path = mnt / "store"
    try:
        store = LatentStore(path, dim=DIM, config=None)
        ids = {}
        with pytest.raises(StoreError, match="(?i)space|full"):
            for s in range(2000, 4000):
                ids[put_seeded(store, s)] = s
        assert len(ids) >= 3, "the disk filled before the test could store anything"
        # Free space again (a bigger tmpfs), then everything committed must be there, intact.
        _mount("-o", "remount,size=16m", str(mnt))
        ids[put_seeded(store, 5000)] = 5000
        store.close()
        with LatentStore(path) as store:
            assert {r.entry_id for r in store.entries()} == set(ids)
            for entry_id, seed in ids.items():
                assert_seeded_entry(store, entry_id, seed)
            assert store.verify().ok
            _assert_finds_all(store, ids)
    finally:
        _umount(mnt)


def test_index_save_failure_after_commit_does_not_fail_the_insert(tmp_path):
    """The index is derived data: once the manifest has committed an entry, a failed index save
    (here: index/ turns read-only) is reported, not raised, so a finished generation is not lost
    to an error; the in-memory index keeps serving and the next open catches up from the manifest."""
    path = tmp_path / "s"
    store = LatentStore(path, dim=DIM, config=StoreConfig(autosave_every=1))
    ids = {put_seeded(store, s): s for s in range(600, 604)}
    if not _mount_tmpfs(path / "index", "ro,size=1m"):
        store.close()
        pytest.skip("needs root and a tmpfs mount to make index/ read-only under an open store")
    try:
        new = put_seeded(store, 650)
        ids[new] = 650
        assert_seeded_entry(store, new, 650)
        assert store.events(1)[0]["kind"] == "index_save_failed"
        _assert_finds_all(store, ids)
    finally:
        _umount(path / "index")
    store.close()
    with LatentStore(path) as store:
        assert {r.entry_id for r in store.entries()} == set(ids)
        _assert_finds_all(store, ids)
        assert store.verify().ok


def test_threads_of_one_process_share_a_store(tmp_path):
    """ComfyUI runs prompts on a worker thread while HTTP routes (the cache-state panel) read the
    store on the server thread: one writer thread inserts, deletes, saves and compacts while three
    reader threads search, load and read stats through the same LatentStore object."""
    import threading

    store = LatentStore(tmp_path / "s", dim=DIM, config=StoreConfig(autosave_every=5))
    committed: dict[int, int] = {}  # filled after put() returns
    doomed: set[int] = set()  # filled BEFORE delete() is called
    errors: list[BaseException] = []
    done = threading.Event()
    reads = {"n": 0}

    def writer():
        try:
            for i, seed in enumerate(range(800, 1200)):  # at least 90 inserts and 60 checked reads
                if i >= 90 and reads["n"] >= 60:
                    break
                committed[put_seeded(store, seed)] = seed
                if i % 7 == 6:
                    victim = sorted(set(committed) - doomed)[0]
                    doomed.add(victim)
                    assert store.delete([victim]) == 1
                if i % 30 == 29:
                    store.compact()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            done.set()

    def reader(seed):
        rng = random.Random(seed)
        try:
            while not done.is_set():
                alive = sorted(set(committed) - doomed)
                if not alive:
                    continue
                entry_id = rng.choice(alive)
                e = seeded_entry(committed[entry_id])
                matches = [m for m in store.search(e["embeddings"], e["compat_key"], k=4) if m.query_index == 0]
                got = store.load(entry_id)
                rec = store.entry(entry_id)
                stats = store.stats()
                if entry_id in doomed:  # it was being deleted while we looked: any answer is fine
                    continue
                assert matches and matches[0].entry_id == entry_id and matches[0].similarity > 0.999, \
                    f"live entry {entry_id} not found by its own embedding"
                assert rec is not None and rec.prompt == e["prompt"]
                assert_tensors_equal(got, e["tensors"], f"entry {entry_id}")
                assert stats.entries >= 1
                reads["n"] += 1
                time.sleep(0.002)  # a status panel polls; it does not spin
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, f"{type(errors[0]).__name__}: {errors[0]}"
    assert reads["n"] >= 60, "the readers hardly ran"
    assert store.verify().ok
    store.close()
    with LatentStore(tmp_path / "s") as again:
        assert {r.entry_id for r in again.entries()} == set(committed) - doomed
        assert again.open_report == []
