"""Client processes for the PostgreSQL store tests (not a test module itself).

``python tests/_pg_worker.py URL SECONDS WORKER_ID OUT [BUDGET]`` inserts seeded entries, looks
them up (search, load, record_lookup) and checks what it reads for SECONDS, writing one line per
committed insert to OUT (``put <entry id> <seed>``), flushed only after ``put`` returned, so a
line is a promise that the entry was committed. It exits 0 when every check held; any exception
is printed and exits 1. A SIGKILL at any moment must leave the store consistent.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _store_util import DIM, assert_tensors_equal, put_seeded, seeded_entry  # noqa: E402


def run(url: str, seconds: float, worker: int, out: str, budget: int | None = None) -> int:
    """Insert and look up against ``url`` for ``seconds``; returns the process exit code."""
    import torch

    torch.set_num_threads(1)
    from comfyui_chai.cache.pgstore import PostgresStore

    store = PostgresStore(url, dim=DIM, budget_bytes=budget)
    rng = np.random.default_rng(worker)
    deadline = time.monotonic() + seconds
    seed = worker * 1_000_000
    mine: dict[int, int] = {}
    with open(out, "a", buffering=1) as log:
        while time.monotonic() < deadline:
            entry_id = put_seeded(store, seed)
            log.write(f"put {entry_id} {seed}\n")
            log.flush()
            os.fsync(log.fileno())
            mine[entry_id] = seed
            seed += 1
            # Look up one of our entries by its own vector: found unless another client evicted it.
            probe_id = list(mine)[int(rng.integers(len(mine)))]
            want = seeded_entry(mine[probe_id])
            matches = store.search(want["embeddings"][:1], want["compat_key"], k=4)
            for m in matches:
                rec = store.entry(m.entry_id)
                if rec is not None:  # None: evicted between the search and now, by design
                    assert rec.compat_key == want["compat_key"] and m.text in rec.entities
            latents = store.load(probe_id)
            if latents is not None:
                assert_tensors_equal(latents, want["tensors"], f"worker {worker} entry {probe_id}")
            store.record_lookup(want["prompt"], want["entities"], probe_id if latents is not None else None,
                                want["entities"][0], want["entities"][0], 1.0, 1.0)
            if store.stats(last=0).bytes > store.config.budget_bytes:
                raise AssertionError("the store holds more bytes than its budget")
    store.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(run(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                     int(sys.argv[5]) if len(sys.argv) > 5 else None))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
