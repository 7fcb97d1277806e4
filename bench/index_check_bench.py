"""What vetting an hnswlib index file costs at open, next to loading it and rebuilding it.

A store opens an index partition only after it is vetted (docs/store_security.md): a keyed checksum
(HMAC-SHA256 with this user's secret) or, for a store from elsewhere, a full structural check of
every field hnswlib trusts (cache/index_file.py). This script builds one partition of N random
unit vectors exactly as the store configures it (cosine, M 16, ef_construction 200), saves it, and
times side by side in one run:

* ``check``: ``check_hnsw_file`` over an mmap of the file (the fallback path);
* ``hmac``: signing / verifying the file with a key (the fast path);
* ``load``: hnswlib ``load_index`` itself (paid on every open either way);
* ``rebuild``: building the partition again from its vectors (what a failed check costs).

The built index is cached in ``bench/out/index_check/`` (``--rebuild`` makes it again).

    python bench/index_check_bench.py            # 100,000 vectors of 384-d (a few minutes to build once)
    python bench/index_check_bench.py --n 20000  # quicker
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "bench" / "out" / "index_check"


def _import_pack():
    try:
        import comfyui_chai  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT.parent))


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the partition (default 100,000)")
    parser.add_argument("--dim", type=int, default=384, help="vector dimension (all-MiniLM-L6-v2: 384)")
    parser.add_argument("--threads", type=int, default=2, help="hnswlib threads for the build")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--rebuild", action="store_true", help="build the cached index again")
    args = parser.parse_args(argv)
    _import_pack()
    import hnswlib

    from comfyui_chai.cache.index_file import IndexKey, check_hnsw_file

    M, efc = 16, 200
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"partition-{args.n}x{args.dim}.bin"
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = np.arange(1, args.n + 1, dtype=np.int64)

    def build() -> hnswlib.Index:
        index = hnswlib.Index(space="cosine", dim=args.dim)
        index.init_index(max_elements=args.n, ef_construction=efc, M=M)
        index.set_num_threads(args.threads)
        index.add_items(vectors, labels)
        return index

    build_s = None
    if args.rebuild or not path.is_file():
        t = time.perf_counter()
        build().save_index(str(path))
        build_s = time.perf_counter() - t
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as buf:
            check_s = _median_s(lambda: check_hnsw_file(buf, args.dim, M, efc, max_count=args.n), args.repeats)
        key = IndexKey(os.urandom(32))
        mac = key.sign("0" * 32, path.name, fd)
        hmac_s = _median_s(lambda: key.verify(mac, "0" * 32, path.name, fd), args.repeats)
    finally:
        os.close(fd)

    def load():
        index = hnswlib.Index(space="cosine", dim=args.dim)
        index.load_index(str(path), max_elements=args.n)

    load_s = _median_s(load, args.repeats)
    if build_s is None:  # time one rebuild, as a failed check would cost
        t = time.perf_counter()
        build()
        build_s = time.perf_counter() - t
    result = {"n": args.n, "dim": args.dim, "file_mb": round(size / 1e6, 1), "check_s": round(check_s, 3),
              "hmac_s": round(hmac_s, 3), "load_s": round(load_s, 3), "rebuild_s": round(build_s, 1),
              "check_over_load": round(check_s / load_s, 2), "rebuild_over_check": round(build_s / check_s, 1)}
    print(f"partition of {args.n:,} x {args.dim}-d ({result['file_mb']} MB), M {M}, ef_construction {efc}; "
          f"medians of {args.repeats}:")
    print(f"  structural check {check_s:.3f} s | keyed checksum {hmac_s:.3f} s | hnswlib load {load_s:.3f} s | "
          f"rebuild {build_s:.1f} s ({args.threads} threads)")
    print(f"  check / load = {result['check_over_load']}x; rebuild / check = {result['rebuild_over_check']}x")
    (OUT / f"result-{args.n}x{args.dim}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
