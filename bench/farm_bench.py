#!/usr/bin/env python
"""Benchmark of the farm store: the folder store against PostgreSQL + pgvector, side by side in one run.

    python bench/farm_bench.py                     # lookup at 10k/100k entries, ANN at 100k/1M, inserts
    python bench/farm_bench.py --quick             # 2k entries, ANN at 20k, a minute or two
    python bench/farm_bench.py --phases ann --ann-sizes 100k

An embedded PostgreSQL (``cache/pgserver.py``) is started in ``<out>/pg`` and reached through its
Unix socket, the way one machine runs it; large stores and indexes are built once and cached
(``<out>/farm_*`` folders and databases), so later runs only measure.

Phases:

``lookup``
    The store's share of one lookup, as ``CacheLookup`` calls it: ``search`` of 2 query vectors
    (k=8), ``entry`` and ``load`` of the best entry, ``record_lookup``. Stores of N entries x 3
    entity vectors (the ANN data below) with 8-element fp16 latents: the folder store built through
    ``put``, the PostgreSQL store through ``COPY`` of the rows ``put`` writes (HNSW index built
    after, M=16, ef_construction=200), which is hours faster at 100k; queries are stored vectors (hits). p50/p99 per backend. Also the load (with SHA-256 check) of
    one 1.14 MB entry (3 x [4,15,30,53] fp16 of OpenSora 240p... in fp32: 1,144,800 bytes).
``ann``
    k=8 cosine search of held-out queries, recall@1 against exact search, p50/p99 per query, for a
    sweep of ef_search on hnswlib (the folder store's index: M=16, ef_construction=200) and on
    pgvector HNSW (same M and ef_construction, SQL through the socket); the smallest ef_search
    with recall@1 >= 0.95 is reported for each. Data: bench/cache_bench.py's generator fitted to
    MiniLM embeddings of VBench phrases (cached under ``<out>/ann``).
``insert``
    ``put`` of 1.14 MB entries: the folder store (1 process, durable) and PostgreSQL with 1 and 4
    client processes (bytea, synchronous commit); entries/s in total.

Nothing is asserted: the script reports.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cache_bench  # noqa: E402  (its ANN data generator and pack import)

cache_bench.import_pack()

from comfyui_chai.cache import pgserver  # noqa: E402
from comfyui_chai.cache.backend import open_store  # noqa: E402
from comfyui_chai.cache.pgstore import PostgresStore  # noqa: E402

KEY = "bench|farm"
EF_SWEEP = (16, 24, 32, 48, 64, 96, 128, 200, 400)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pct(values, q):
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _size(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * (1000 if text.endswith("k") else 1_000_000)) if text[-1] in "km" else int(text)


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _database(server, name: str) -> str:
    import psycopg

    with psycopg.connect(server.url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    return server.url.replace(f"/{server.database}?", f"/{name}?")


def _data(out: Path, n: int, n_query: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    real_base, real_queries, _ = cache_bench.real_set(out, 10_000, 1_000, rebuild=False)
    model, _ = cache_bench.synth_model(out, real_base, real_queries, rebuild=False)
    return model.draw(n, n_query, seed=seed)


# ---------------------------------------------------------------------------------------------- lookup
def _fill(store, vectors: np.ndarray, n: int) -> float:
    """Put entries until the store holds n (3 vectors each); returns seconds spent. A PostgreSQL
    store gets the rows ``put`` would write in bulk (COPY), the HNSW index rebuilt after."""
    import torch

    have = len(store)
    t0 = time.perf_counter()
    tensors = {"step_2": torch.zeros(8, dtype=torch.float16)}
    if isinstance(store, PostgresStore) and n - have > 1000:
        if have == 0:  # one real put: the template row of the bulk load
            store.put(tensors, ["e0a", "e0b", "e0c"], vectors[:3], KEY, "prompt 0")
        _bulk_fill(store, vectors, n)
        return time.perf_counter() - t0
    for i in range(have, n):
        store.put(tensors, [f"e{i}a", f"e{i}b", f"e{i}c"], vectors[3 * i:3 * i + 3], KEY, f"prompt {i}")
        if i % 10_000 == 0 and i > have:
            _log(f"    {type(store).__name__}: {i:,} entries")
    return time.perf_counter() - t0


def _bulk_fill(store, vectors: np.ndarray, n: int) -> None:
    """COPY the rows of entries 1..n-1 as put would write them (entry 0 was put for real: its row
    is the template), then rebuild the HNSW index and fix the counters."""
    def load(conn):
        tpl = conn.execute("SELECT nbytes, sha256, blob, created_at FROM chai_entries ORDER BY id LIMIT 1",
                           binary=True).fetchone()
        have = conn.execute("SELECT count(*) FROM chai_entries").fetchone()[0]
        conn.execute("DROP INDEX IF EXISTS chai_entities_hnsw")
        with conn.cursor().copy("COPY chai_entries (id, uid, compat_key, prompt, nbytes, sha256, created_at, "
                                "last_access, info, blob) FROM STDIN") as copy:
            for i in range(have, n):
                copy.write_row((i + 1, f"bulk-{i}", KEY, f"prompt {i}", tpl[0], tpl[1], tpl[3] + i, tpl[3] + i, "{}",
                                tpl[2]))
        with conn.cursor().copy("COPY chai_entities (entry_id, compat_key, text, embedding) FROM STDIN "
                                "WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "text", "text", "vector"])
            for i in range(have, n):
                for j, suffix in enumerate("abc"):
                    copy.write_row((i + 1, KEY, f"e{i}{suffix}", vectors[3 * i + j]))
        conn.execute("SELECT setval('chai_entries_id_seq', %s)", (n,))
        conn.execute("UPDATE chai_counters SET value = (SELECT sum(nbytes) FROM chai_entries) WHERE name='bytes_held'")
        conn.execute("UPDATE chai_counters SET value = %s WHERE name IN ('inserts', 'generation')", (n,))
        conn.execute("SET maintenance_work_mem = '2GB'")
        conn.execute("CREATE INDEX chai_entities_hnsw ON chai_entities USING hnsw (embedding vector_cosine_ops) "
                     "WITH (m = 16, ef_construction = 200)")

    store.run(load)
    store.run(lambda c: c.execute("VACUUM ANALYZE chai_entities"), transaction=False)


def _time_lookups(store, vectors: np.ndarray, n: int, queries: int, rng) -> list[float]:
    out = []
    for i in rng.integers(0, n, size=queries):
        q = vectors[3 * i:3 * i + 2]
        t0 = time.perf_counter()
        matches = store.search(q, KEY, k=8)
        best = matches[0].entry_id
        store.entry(best)
        store.load(best)
        store.record_lookup("bench", ["a", "b"], best, "a", matches[0].text, matches[0].similarity, 1.0)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def phase_lookup(args, server, out: Path) -> dict:
    import torch

    results = {}
    rng = np.random.default_rng(0)
    for n in args.lookup_sizes:
        vectors, _ = _data(out, 3 * n, 1, seed=1000 + n)
        fast = {"budget_bytes": 1 << 40, "dim": vectors.shape[1], "options": {"durable": False}}
        folder = open_store(str(out / f"farm_lookup_{_label(n)}"), **fast)
        pg = open_store(_database(server, f"farm_lookup_{_label(n)}"), **fast)
        row = {}
        for name, store in (("folder", folder), ("postgres", pg)):
            built = _fill(store, vectors, n)
            if built > 1:
                _log(f"  built {name} store of {n:,} entries in {built:.0f} s")
            _time_lookups(store, vectors, n, 20, rng)  # warm caches and connections
            ms = _time_lookups(store, vectors, n, args.lookups, rng)
            row[name] = {"p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99), "entries": len(store)}
            _log(f"  lookup {name} {_label(n)}: p50 {row[name]['p50_ms']:.2f} ms, p99 {row[name]['p99_ms']:.2f} ms")
        folder.close()
        pg.close()
        results[_label(n)] = row
    # One real-size entry: load + SHA-256 check.
    big = {f"step_{i}": torch.randn(4, 15, 30, 53) for i in (2, 3, 4)}
    vec = np.eye(1, vectors.shape[1], dtype=np.float32)
    load = {}
    for name, store in (("folder", open_store(str(out / "farm_big"), dim=vec.shape[1])),
                        ("postgres", open_store(_database(server, "farm_big"), dim=vec.shape[1]))):
        with store:
            entry = store.put(big, ["big"], vec, KEY + "|big", "big")
            times = []
            for _ in range(args.loads):
                t0 = time.perf_counter()
                store.load(entry)
                times.append((time.perf_counter() - t0) * 1000)
            store.delete([entry])
            load[name] = {"p50_ms": _pct(times, 50), "p99_ms": _pct(times, 99)}
    results["load_1.14MB"] = load
    return results


# ---------------------------------------------------------------------------------------------- ANN
def _recall_and_times(search, queries: np.ndarray, truth: np.ndarray) -> tuple[float, list[float]]:
    hits, times = 0, []
    for q, t in zip(queries, truth):
        t0 = time.perf_counter()
        top = search(q)
        times.append((time.perf_counter() - t0) * 1000)
        hits += int(len(top) > 0 and top[0] == t)
    return hits / len(queries), times


def _pick(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["recall_at_1"] >= 0.95]
    return min(ok, key=lambda r: r["ef_search"]) if ok else None


def _exact_top1(base: np.ndarray, queries: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Index of the most similar base row of each query (exact, unit vectors): [n_query] int."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    arg = np.zeros(len(queries), dtype=np.int64)
    for start in range(0, len(base), chunk):
        sims = base[start:start + chunk] @ queries.T  # [chunk, n_query]
        top = np.argmax(sims, axis=0)
        value = sims[top, np.arange(len(queries))]
        better = value > best
        best[better], arg[better] = value[better], top[better] + start
    return arg


def phase_ann(args, server, out: Path, save=lambda partial: None) -> dict:
    import hnswlib
    import psycopg
    from pgvector.psycopg import register_vector

    results = {}
    for n in args.ann_sizes:
        base, queries = _data(out, n, args.ann_queries, seed=2000 + n)
        truth = _exact_top1(base, queries)
        dim = base.shape[1]
        # hnswlib, exactly as the folder store builds a partition (cached).
        path = out / "ann" / f"farm_hnsw_{_label(n)}_M{args.m}_E{args.efc}.bin"
        index = hnswlib.Index(space="cosine", dim=dim)
        t0 = time.perf_counter()
        if path.is_file():
            index.load_index(str(path), max_elements=n)
        else:
            index.init_index(max_elements=n, M=args.m, ef_construction=args.efc, random_seed=100)
            step = max(10_000, n // 20)
            for start in range(0, n, step):
                index.add_items(base[start:start + step], np.arange(start, min(n, start + step)),
                                num_threads=os.cpu_count() or 1)
                _log(f"    hnswlib {_label(n)}: {min(n, start + step):,} vectors in {time.perf_counter() - t0:.0f} s")
            index.save_index(str(path))
        hnsw_build = time.perf_counter() - t0
        hnsw_rows = []
        index.set_num_threads(1)
        for ef in EF_SWEEP:
            index.set_ef(ef)
            recall, times = _recall_and_times(lambda q: index.knn_query(q, k=8)[0][0], queries, truth)
            hnsw_rows.append({"ef_search": ef, "recall_at_1": recall, "p50_ms": _pct(times, 50), "p99_ms": _pct(times, 99)})
            _log(f"    hnswlib {_label(n)} ef {ef}: recall@1 {recall:.3f}, p99 {hnsw_rows[-1]['p99_ms']:.2f} ms")
        # pgvector HNSW with the same M and ef_construction (cached database).
        url = _database(server, f"farm_ann_{_label(n)}_m{args.m}_e{args.efc}")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            register_vector(conn)
            conn.execute(f"CREATE TABLE IF NOT EXISTS items(id integer PRIMARY KEY, v vector({dim}) NOT NULL)")
            built = conn.execute("SELECT count(*) FROM items").fetchone()[0] == n and conn.execute(
                "SELECT to_regclass('items_hnsw') IS NOT NULL").fetchone()[0]
            t0 = time.perf_counter()
            if not built:
                _log(f"    pgvector {_label(n)}: loading and indexing (progress: pg_stat_progress_create_index)")
                conn.execute("DROP INDEX IF EXISTS items_hnsw")
                conn.execute("TRUNCATE items")
                with conn.cursor().copy("COPY items (id, v) FROM STDIN WITH (FORMAT BINARY)") as copy:
                    copy.set_types(["int4", "vector"])
                    for i in range(n):
                        copy.write_row((i, base[i]))
                conn.execute("SET maintenance_work_mem = '6GB'")
                conn.execute(f"SET max_parallel_maintenance_workers = {max(0, (os.cpu_count() or 1) - 1)}")
                conn.execute(f"CREATE INDEX items_hnsw ON items USING hnsw (v vector_cosine_ops) "
                             f"WITH (m = {args.m}, ef_construction = {args.efc})")
                conn.execute("VACUUM ANALYZE items")
            pg_build = time.perf_counter() - t0
            pg_rows = []
            for ef in EF_SWEEP:
                conn.execute(f"SET hnsw.ef_search = {ef}")
                cur = conn.cursor()
                recall, times = _recall_and_times(
                    lambda q: [r[0] for r in cur.execute("SELECT id FROM items ORDER BY v <=> %s LIMIT 8",
                                                         (q,)).fetchall()], queries, truth)
                pg_rows.append({"ef_search": ef, "recall_at_1": recall, "p50_ms": _pct(times, 50), "p99_ms": _pct(times, 99)})
                _log(f"    pgvector {_label(n)} ef {ef}: recall@1 {recall:.3f}, p99 {pg_rows[-1]['p99_ms']:.2f} ms")
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN SELECT id FROM items ORDER BY v <=> %s LIMIT 8",
                                                        (queries[0],)).fetchall())
        results[_label(n)] = {"hnswlib": {"build_s": hnsw_build, "sweep": hnsw_rows, "chosen": _pick(hnsw_rows)},
                              "pgvector": {"build_s": pg_build, "sweep": pg_rows, "chosen": _pick(pg_rows),
                                           "uses_index": "items_hnsw" in plan}}
        save(results)  # a larger size may take hours: keep what is measured
        for name in ("hnswlib", "pgvector"):
            c = results[_label(n)][name]["chosen"]
            _log(f"  ANN {name} {_label(n)}: " + (f"ef {c['ef_search']} recall@1 {c['recall_at_1']:.3f} "
                                                  f"p99 {c['p99_ms']:.2f} ms" if c else "recall@1 < 0.95 at every ef"))
    return results


# ---------------------------------------------------------------------------------------------- insert
def _insert_client(url: str, count: int, seed: int, queue) -> None:
    import torch

    torch.set_num_threads(1)
    store = open_store(url)
    tensors = {f"step_{i}": torch.randn(4, 15, 30, 53) for i in (2, 3, 4)}
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((count, 3, 384)).astype(np.float32)
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    t0 = time.perf_counter()
    for i in range(count):
        store.put(tensors, ["a", "b", "c"], v[i], KEY, f"client {seed} entry {i}")
    queue.put((count, time.perf_counter() - t0))
    store.close()


def phase_insert(args, server, out: Path) -> dict:
    import shutil

    import torch

    results = {}
    tensors = {f"step_{i}": torch.randn(4, 15, 30, 53) for i in (2, 3, 4)}
    v = np.random.default_rng(0).standard_normal((args.inserts, 3, 384)).astype(np.float32)
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    folder = out / "farm_insert_folder"
    shutil.rmtree(folder, ignore_errors=True)
    with open_store(str(folder), dim=384, budget_bytes=1 << 40) as store:
        t0 = time.perf_counter()
        for i in range(args.inserts):
            store.put(tensors, ["a", "b", "c"], v[i], KEY, f"entry {i}")
        results["folder_1"] = args.inserts / (time.perf_counter() - t0)
    ctx = mp.get_context("spawn")
    for clients in (1, 4):
        url = _database(server, f"farm_insert_{clients}")
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS chai_entities, chai_entries, chai_meta, chai_counters, chai_partitions, "
                         "chai_entity_counts, chai_lookup_log, chai_events, chai_quarantine CASCADE")
        open_store(url, dim=384, budget_bytes=1 << 40).close()
        queue = ctx.Queue()
        per = max(1, args.inserts // clients)
        procs = [ctx.Process(target=_insert_client, args=(url, per, c, queue)) for c in range(clients)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        done = [queue.get() for _ in procs]
        wall = time.perf_counter() - t0
        for p in procs:
            p.join()
        # Throughput over the clients' own put loops (start-up and imports excluded).
        results[f"postgres_{clients}"] = sum(c for c, _ in done) / max(s for _, s in done)
        _log(f"  insert postgres x{clients}: {results[f'postgres_{clients}']:.1f} entries/s (wall {wall:.1f} s)")
    _log(f"  insert folder x1: {results['folder_1']:.1f} entries/s")
    return results


# ---------------------------------------------------------------------------------------------- report
def _report(results: dict) -> list[str]:
    lines = []
    if "lookup" in results:
        lines += ["", "Store share of one lookup (search 2 vectors k=8, entry, load, record), ms:", "",
                  "| entries | folder p50 | folder p99 | PostgreSQL p50 | PostgreSQL p99 | p50 ratio PG/folder |",
                  "|---|---|---|---|---|---|"]
        for size, row in results["lookup"].items():
            if size.startswith("load"):
                continue
            f, p = row["folder"], row["postgres"]
            lines.append(f"| {size} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | "
                         f"{p['p50_ms'] / f['p50_ms']:.2f}x |")
        ld = results["lookup"]["load_1.14MB"]
        lines.append(f"\nLoad of one 1.14 MB entry with SHA-256 check: folder p50 {ld['folder']['p50_ms']:.2f} ms, "
                     f"PostgreSQL p50 {ld['postgres']['p50_ms']:.2f} ms.")
    if "ann" in results:
        lines += ["", "ANN, k=8 cosine, smallest ef_search with recall@1 >= 0.95:", "",
                  "| vectors | hnswlib ef | recall@1 | p50 ms | p99 ms | pgvector ef | recall@1 | p50 ms | p99 ms | build s (hnswlib / pgvector) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for size, row in results["ann"].items():
            cells = [size]
            for name in ("hnswlib", "pgvector"):
                c = row[name]["chosen"]
                cells += ([str(c["ef_search"]), f"{c['recall_at_1']:.3f}", f"{c['p50_ms']:.2f}", f"{c['p99_ms']:.2f}"]
                          if c else ["-", "< 0.95", "-", "-"])
            cells.append(f"{row['hnswlib']['build_s']:.0f} / {row['pgvector']['build_s']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    if "insert" in results:
        r = results["insert"]
        lines += ["", "Inserts of 1.14 MB entries (entries/s, all clients together):", "",
                  "| folder, 1 process | PostgreSQL, 1 client | PostgreSQL, 4 clients | 4 vs 1 client |", "|---|---|---|---|",
                  f"| {r['folder_1']:.1f} | {r['postgres_1']:.1f} | {r['postgres_4']:.1f} | "
                  f"{r['postgres_4'] / r['postgres_1']:.2f}x |"]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "out"), help="cache folder (stores, indexes, the server)")
    parser.add_argument("--phases", default="lookup,ann,insert")
    parser.add_argument("--quick", action="store_true", help="small sizes: a minute or two")
    parser.add_argument("--lookup-sizes", default=None, help="entries, e.g. 10k,100k")
    parser.add_argument("--ann-sizes", default=None, help="vectors, e.g. 100k,1M")
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--loads", type=int, default=50)
    parser.add_argument("--ann-queries", type=int, default=1000)
    parser.add_argument("--inserts", type=int, default=200, help="entries per insert run")
    parser.add_argument("--m", type=int, default=16, help="HNSW M (the folder store's)")
    parser.add_argument("--efc", type=int, default=200, help="HNSW ef_construction (the folder store's)")
    parser.add_argument("--json", default="farm_bench.json",
                        help="results file in --out, written after every phase and ANN size")
    args = parser.parse_args(argv)
    args.lookup_sizes = [_size(s) for s in (args.lookup_sizes or ("2k" if args.quick else "10k,100k")).split(",")]
    args.ann_sizes = [_size(s) for s in (args.ann_sizes or ("20k" if args.quick else "100k,1M")).split(",")]
    if args.quick:
        args.lookups, args.ann_queries, args.inserts = 200, 300, 40
    out = Path(args.out).resolve()
    (out / "ann").mkdir(parents=True, exist_ok=True)
    server = pgserver.start(out / "pg")
    _log(f"PostgreSQL: {server.url}")
    results = {"machine": {"cpus": os.cpu_count()}}
    t0 = time.perf_counter()
    report = out / args.json

    def save(partial: dict | None = None, phase: str | None = None) -> None:
        if phase is not None:
            results[phase] = partial
        results["seconds"] = time.perf_counter() - t0
        report.write_text(json.dumps(results, indent=2), encoding="utf-8")

    for phase in args.phases.split(","):
        _log(f"phase {phase} ...")
        if phase == "ann":
            save(phase_ann(args, server, out, lambda partial: save(partial, "ann")), "ann")
        else:
            save({"lookup": phase_lookup, "insert": phase_insert}[phase](args, server, out), phase)
    lines = _report(results)
    print("\n".join(lines))
    _log(f"wrote {report}; the server keeps running: python -m comfyui_chai db stop {out / 'pg'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
