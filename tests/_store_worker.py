"""Worker processes for tests/test_store_faults.py (not a test module itself).

Two entry points:

* :func:`crash_child` runs in a child forked by the crash test. It opens the store and inserts
  seeded entries forever, writing ``"<entry id> <seed>\\n"`` to a pipe only AFTER ``put`` has
  returned, until the parent kills it with SIGKILL.
* :func:`two_process_child` (forked by the two-process test; also runnable as
  ``python tests/_store_worker.py STORE SECONDS WORKER_ID OUT``) is one of two processes that, for SECONDS it inserts, deletes its own entries, searches, loads and records
  lookups against a shared store, checks everything it can see, and logs what it committed to
  OUT (one line per committed operation, flushed after the store call returned).
"""

from __future__ import annotations

import os
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _store_util import assert_tensors_equal, put_seeded, seeded_entry, unit_vectors  # noqa: E402


def crash_child(store_dir: str, fd: int, seed_base: int, budget: int) -> None:
    """Insert seeded entries until killed; report each committed (id, seed) on ``fd``."""
    try:
        import torch

        torch.set_num_threads(1)
        from comfyui_chai.cache.store import LatentStore, StoreConfig

        # A small autosave interval puts index saves (and compactions) inside the kill window too.
        cfg = StoreConfig(budget_bytes=budget, autosave_every=7)
        store = LatentStore(store_dir, config=cfg, dim=16)
        i = 0
        while True:
            seed = seed_base + i
            entry_id = put_seeded(store, seed)
            os.write(fd, f"{entry_id} {seed}\n".encode())
            i += 1
            if i % 11 == 0:
                store.save_index()
    except BaseException:  # noqa: BLE001 - any error is a test failure the parent must see
        os.write(fd, ("ERR " + traceback.format_exc().replace("\n", " | ") + "\n").encode())
        os._exit(3)


def _two_process_worker(store_dir: str, seconds: float, worker: int, out_path: str) -> int:
    import torch

    torch.set_num_threads(1)
    from comfyui_chai.cache.store import LatentStore

    rng = random.Random(worker)
    nrng = np.random.default_rng(worker)
    live: dict[int, int] = {}  # own entry id -> seed
    ops = {"put": 0, "del": 0, "lookup": 0, "foreign_loads": 0}
    with open(out_path, "w", encoding="utf-8") as out, LatentStore(store_dir, dim=16) as store:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            op = rng.random()
            if op < 0.40 or not live:
                seed = worker * 10_000_000 + i
                i += 1
                entry_id = put_seeded(store, seed)
                live[entry_id] = seed
                out.write(f"put {entry_id} {seed}\n")
                ops["put"] += 1
            elif op < 0.47:
                victim = rng.choice(list(live))
                assert store.delete([victim]) == 1, f"worker {worker}: delete of own entry {victim} removed nothing"
                del live[victim]
                out.write(f"del {victim}\n")
                ops["del"] += 1
            else:
                # Search one of our own live entries (must be found at similarity ~1 and load exactly)
                # plus random vectors (whatever comes back must be a live, loadable entry of that key).
                own = rng.choice(list(live))
                e = seeded_entry(live[own])
                queries = np.concatenate([e["embeddings"][:1], unit_vectors(nrng, 2)])
                matches = store.search(queries, e["compat_key"], k=6)
                top = [m for m in matches if m.query_index == 0]
                assert top and top[0].entry_id == own and top[0].similarity > 0.999, \
                    f"worker {worker}: own live entry {own} was not found by its own embedding"
                assert_tensors_equal(store.load(own), e["tensors"], f"worker {worker} entry {own}")
                for m in matches:
                    if m.entry_id in live:
                        continue
                    got = store.load(m.entry_id)
                    if got is None:  # only legitimate if the other worker deleted it meanwhile
                        assert store.entry(m.entry_id) is None, \
                            f"worker {worker}: entry {m.entry_id} has a row but its latents did not load"
                    else:
                        ops["foreign_loads"] += 1
                        # Read the row once: the other worker may delete it between two reads.
                        row = store.entry(m.entry_id)
                        assert row is None or row.compat_key == e["compat_key"], \
                            f"worker {worker}: entry {m.entry_id} was served under another compat key"
                hit = top[0].entry_id
                store.record_lookup(f"w{worker} lookup {i}", [top[0].text], hit, top[0].text, top[0].text,
                                    top[0].similarity, 1.0)
                out.write("lookup\n")
                ops["lookup"] += 1
            out.flush()
        stats = store.stats()
        assert stats.quarantined == 0, f"worker {worker}: the store quarantined something: {store.events()}"
        out.write(f"done {ops['put']} {ops['del']} {ops['lookup']} {ops['foreign_loads']}\n")
    return 0


def two_process_child(store_dir: str, seconds: float, worker: int, out_path: str) -> None:
    """Entry point for a child forked by the two-process test: runs the worker, writes any
    traceback to ``OUT.err`` and exits with 0 (success) or 1."""
    code = 1
    try:
        code = _two_process_worker(store_dir, seconds, worker, out_path)
    except BaseException:  # noqa: BLE001 - the parent reads the traceback from OUT.err
        Path(out_path + ".err").write_text(traceback.format_exc(), encoding="utf-8")
    finally:
        os._exit(code)


if __name__ == "__main__":
    try:
        code = _two_process_worker(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    except Exception:  # noqa: BLE001 - the parent reads the traceback from our output
        traceback.print_exc()
        code = 1
    sys.exit(code)


def quarantine_child(store_dir: str, entry_id: int, kill_after_move: bool) -> None:
    """Load a corrupt entry and die with SIGKILL at the moment its file is moved to quarantine/
    (just before or just after the move), to test the quarantine's crash ordering."""
    import signal

    from comfyui_chai.cache import store as store_module
    from comfyui_chai.cache import store_files

    real_rename = store_files._Dir.rename

    def dying_rename(self, name, dest, dest_name):
        if dest.path.name == "quarantine":
            if kill_after_move:
                real_rename(self, name, dest, dest_name)
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(self, name, dest, dest_name)

    store_files._Dir.rename = dying_rename  # this forked child only
    store = store_module.LatentStore(store_dir)
    store.load(entry_id)
    os._exit(5)  # not reached when the load finds the corruption
