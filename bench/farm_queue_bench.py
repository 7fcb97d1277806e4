#!/usr/bin/env python
"""The job queue on the reference model: natural order against the batch planner, N worker
processes, measured side by side in one run.

    python bench/farm_queue_bench.py                       # 24 held-out reference prompts, 2 workers
    python bench/farm_queue_bench.py --prompts 40 --workers 2

For each order a fresh database on an embedded PostgreSQL (``<out>/pg``) gets the batch through
``generate --queue --no-wait`` (``--no-plan`` for the natural order); then ``--workers`` processes
``worker --exit-when-idle`` run it. Reported: hit rate, wall time from the workers' start to the
last one's exit (model loading included, the same for both orders) and the batch's own span (first
job started to last job finished, database clock). Prompts: ``refmodel.quality.heldout_prompts``
(captions in the reference model's domain, never trained on). Nothing is asserted: it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cache_bench  # noqa: E402

cache_bench.import_pack()

from comfyui_chai.cache import pgserver  # noqa: E402
from comfyui_chai.cache.jobqueue import JobQueue  # noqa: E402
from comfyui_chai.cache.pgstore import PostgresStore  # noqa: E402
from comfyui_chai.refmodel.quality import heldout_prompts  # noqa: E402


def _fresh_database(server, name: str) -> str:
    import psycopg

    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.url.replace(f"/{server.database}?", f"/{name}?")


def run_order(server, order: str, prompts_file: Path, out: Path, workers: int) -> dict:
    url = _fresh_database(server, f"farm_queue_{order}")
    cli = [sys.executable, "-m", "comfyui_chai"]
    queue_cmd = cli + ["generate", "--prompts", str(prompts_file), "--out", str(out / order), "--store", url,
                       "--model", "reference", "--queue", "--no-wait", "--no-progress"]
    if order == "natural":
        queue_cmd.append("--no-plan")
    subprocess.run(queue_cmd, check=True, capture_output=True, text=True)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cli + ["worker", "--store", url, "--exit-when-idle", "--threads", "1",
                                     "--poll-s", "0.2", "--name", f"w{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(workers)]
    logs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed:\n" + "\n".join(logs))
    with PostgresStore(url) as store:
        jobs = JobQueue(store).results(1)
    hits = sum(1 for j in jobs if j["result"] and j["result"]["hit"])
    span = max(j["finished_at"] for j in jobs) - min(j["started_at"] for j in jobs)
    return {"order": order, "prompts": len(jobs), "hits": hits, "hit_rate": hits / len(jobs), "wall_s": wall,
            "batch_span_s": span, "failed": sum(1 for j in jobs if j["state"] != "done")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "out" / "farm_queue"))
    parser.add_argument("--prompts", type=int, default=24, help="held-out reference prompts in the batch")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("\n".join(text for _, text in heldout_prompts(args.prompts)) + "\n", encoding="utf-8")
    server = pgserver.start(out.parent / "pg")
    rows = [run_order(server, order, prompts_file, out, args.workers) for order in ("natural", "planned")]
    print(f"{args.prompts} held-out reference prompts, {args.workers} worker processes (1 torch thread each), "
          f"{os.cpu_count()} CPUs\n")
    print("| order | hit rate | wall s (workers start to exit) | batch span s | failed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['order']} | {100 * r['hit_rate']:.1f}% ({r['hits']}/{r['prompts']}) | {r['wall_s']:.1f} | "
              f"{r['batch_span_s']:.1f} | {r['failed']} |")
    print(f"\nplanned / natural wall: {rows[1]['wall_s'] / rows[0]['wall_s']:.2f}x")
    (out / "farm_queue_bench.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
