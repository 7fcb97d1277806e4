"""Render-farm commands: the embedded database, the job queue's worker, queued batches, migration.

    db start DIR | db stop DIR | db status DIR    an embedded PostgreSQL 18 + pgvector in DIR
    worker --store URL                             take jobs from the queue, run them, report them
    generate --store URL --queue                   plan a batch and queue it (waits for it by default)
    cache migrate SRC DST                          copy a store (folder <-> PostgreSQL), entry by entry

``cli/__init__.py`` only registers these (:func:`add_parsers`) and hands them over (:func:`run`); the
generate helpers both share are public there (:func:`~cli.generate_pipeline`, :func:`~cli.generate_report`,
:func:`~cli.cache_behaviour`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

__all__ = ["add_parsers", "handles", "run", "run_worker", "migrate"]


# ---------------------------------------------------------------------------------------------- parsers
def add_parsers(sub) -> None:
    """Add ``db``, ``worker``, ``cache migrate`` and ``generate --queue`` to the CLI's subparsers."""
    db = sub.add_parser("db", help="an embedded PostgreSQL with pgvector for one machine or for tests")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    start = db_sub.add_parser("start", help="initialise (first time) and start the server in DIR; prints its URL last")
    start.add_argument("dir", help="the server's folder (created if missing)")
    start.add_argument("--port", type=int, default=None, help="TCP port (default: last time's, else a free one)")
    start.add_argument("--listen", default="127.0.0.1",
                       help="TCP addresses to listen on (default 127.0.0.1; '*' for a farm, password required)")
    start.add_argument("--run-as", default=None, help="when started as root: the unprivileged user to run as (nobody)")
    for name, text in (("stop", "stop the server in DIR (committed data is kept)"),
                       ("status", "say whether the server in DIR runs, and its URL")):
        db_sub.add_parser(name, help=text).add_argument("dir", help="the server's folder")

    worker = sub.add_parser("worker", help="take jobs from a PostgreSQL store's queue and run them (one per GPU)")
    worker.add_argument("--store", required=True, help="postgresql:// URL of the store (password in PGPASSWORD or ~/.pgpass)")
    worker.add_argument("--name", default=None, help="worker name in reports (default host:pid)")
    worker.add_argument("--batch", type=int, default=None, help="only jobs of this batch")
    worker.add_argument("--exit-when-idle", action="store_true", help="exit once no job is queued or running")
    worker.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    worker.add_argument("--poll-s", type=float, default=1.0, help="seconds between looks at an empty queue")
    worker.add_argument("--lease-s", type=float, default=600.0,
                        help="seconds a claimed job stays this worker's without a heartbeat (a killed worker's "
                             "job is taken again after it)")
    worker.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    worker.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    cache = sub.choices["cache"]
    cache_sub = next(a for a in cache._actions if isinstance(a, argparse._SubParsersAction))
    mig = cache_sub.add_parser("migrate", help="copy every entry from SRC to DST (a folder or a postgresql:// URL), "
                                               "verified entry by entry")
    mig.add_argument("src", help="source store: folder or postgresql:// URL")
    mig.add_argument("dst", help="destination store: folder or postgresql:// URL (created if missing)")
    mig.add_argument("--blobs", default=None, help="s3://bucket/prefix for a new PostgreSQL destination's latents")

    gen = sub.choices["generate"]
    farm = gen.add_argument_group("farm (a postgresql:// --store only)")
    farm.add_argument("--queue", action="store_true",
                      help="put the batch in the store's job queue for 'worker' processes instead of running it here")
    farm.add_argument("--no-plan", action="store_true",
                      help="queue in the given order (default: the batch planner groups prompts by shared entities, "
                           "leaders first)")
    farm.add_argument("--no-wait", action="store_true",
                      help="return once queued (default: wait for the workers, then write the report)")


def handles(args) -> bool:
    """True when ``args`` is one of this module's commands."""
    return (args.command in ("db", "worker")
            or (args.command == "cache" and args.cache_command == "migrate")
            or (args.command == "generate" and getattr(args, "queue", False)))


def run(args) -> int:
    """Run one of this module's commands; returns the exit code (errors print one line, exit 2)."""
    from ..cache.pgserver import EmbeddedServerError
    from ..cache.store import StoreError

    try:
        if args.command == "db":
            return _cmd_db(args)
        if args.command == "worker":
            return run_worker(args.store, name=args.name, batch_id=args.batch, exit_when_idle=args.exit_when_idle,
                              max_jobs=args.max_jobs, poll_s=args.poll_s, lease_s=args.lease_s, device=args.device,
                              threads=args.threads)
        if args.command == "cache":
            report = migrate(args.src, args.dst, blobs=args.blobs, progress=True)
            print(f"copied {report['copied']} entries ({report['bytes']:,} bytes) from {args.src} to {args.dst}; "
                  f"each read back and compared")
            return 0
        return _cmd_queue(args)
    except (StoreError, EmbeddedServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------- db
def _cmd_db(args) -> int:
    from ..cache import pgserver

    if args.db_command == "start":
        server = pgserver.start(args.dir, port=args.port, listen=args.listen, run_as=args.run_as)
        print(f"PostgreSQL with pgvector runs in {server.dir} as {server.user}, port {server.port}")
        print(f"log {Path(server.dir) / 'server.log'}; stop it with: python -m comfyui_chai db stop {server.dir}")
        if server.listen:
            print(f"over TCP: {server.tcp_url} (password in {Path(server.dir) / 'password'}: put it in PGPASSWORD "
                  "or ~/.pgpass)")
        print(server.url)
        return 0
    if args.db_command == "stop":
        print("stopped" if pgserver.stop(args.dir) else "not running")
        return 0
    server, running = pgserver.status(args.dir)
    if server is None:
        print(f"no embedded PostgreSQL in {args.dir}")
        return 1
    print(f"{'running' if running else 'stopped'}: {server.url}")
    return 0 if running else 1


# ---------------------------------------------------------------------------------------------- stores
def migrate(src: str, dst: str, blobs: str | None = None, progress: bool = False) -> dict:
    """Copy every entry of ``src`` into ``dst`` (least recently used first, so the LRU order carries
    over) and read each one back from ``dst`` to compare tensors, entities, prompt and info. Counters
    and the lookup log are not copied; the destination keeps its own budget, or takes the source's
    (and its policy) when new.

    Args:
        src / dst: store locations (folders or ``postgresql://`` URLs); ``dst`` is created if missing.
        blobs: ``s3://bucket/prefix`` for a new PostgreSQL destination's latents.

    Returns:
        {"copied": entries, "bytes": latent bytes copied}.

    Raises:
        StoreError: either store cannot be opened, or a copied entry does not read back equal
            (the message names the entry; entries copied before it stay in ``dst``).
        ValueError: ``src`` is empty, or ``dst``'s budget would make it evict.
    """
    import torch
    from tqdm import tqdm

    from ..cache.backend import location_scheme, open_store, store_exists
    from ..cache.store import StoreError

    with open_store(src, create=False) as source:
        records = sorted(source.entries(), key=lambda r: (r.last_access, r.entry_id))
        if not records:
            raise ValueError(f"{src} holds no entry to copy")
        stats = source.stats(last=0)
        new = not store_exists(dst)  # a new destination takes the source's budget and policy
        options = {"blobs": blobs} if blobs and location_scheme(dst) else None
        with open_store(dst, dim=source.dim, options=options, budget_bytes=stats.budget_bytes if new else None,
                        policy=stats.policy if new else None) as target:
            room = target.stats(last=0)
            if room.bytes + stats.bytes > room.budget_bytes:
                raise ValueError(f"{dst} has a budget of {room.budget_bytes:,} bytes and holds {room.bytes:,}; "
                                 f"the {stats.bytes:,} bytes of {src} would evict entries: raise its budget first")
            copied = nbytes = 0
            for rec in tqdm(records, desc="migrate", unit="entry", disable=not progress):
                tensors = source.load(rec.entry_id)
                vectors = source.entity_vectors([rec.entry_id]).get(rec.entry_id)
                if tensors is None or vectors is None:
                    continue  # failed its check in the source (quarantined there) or deleted meanwhile: not copied
                new_id = target.put(tensors, rec.entities, vectors, rec.compat_key, rec.prompt, rec.info,
                                    thumbnail=source.thumbnail(rec.entry_id))
                if rec.pinned:
                    target.pin(new_id)
                back, back_rec = target.load(new_id), target.entry(new_id)
                same = (back is not None and back_rec is not None and sorted(back) == sorted(tensors)
                        and all(back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k]) for k in tensors)
                        and (back_rec.prompt, back_rec.entities, back_rec.compat_key, back_rec.info)
                        == (rec.prompt, rec.entities, rec.compat_key, rec.info))
                if not same:
                    raise StoreError(f"entry {rec.entry_id} of {src} did not read back equal from {dst} "
                                     f"(new id {new_id}); the destination may be out of space or damaged: "
                                     f"run 'cache verify {dst}'")
                copied += 1
                nbytes += rec.nbytes
    return {"copied": copied, "bytes": nbytes}


# ---------------------------------------------------------------------------------------------- queue
def _cmd_queue(args) -> int:
    from ..cache.embed import Embedder
    from ..cache.entities import EntityExtractor
    from ..cache.jobqueue import JobQueue
    from ..cache.lookup import CacheLookup, LookupConfig
    from ..cache.backend import mib_to_bytes, open_store
    from ..cache.pgstore import is_postgres_url
    from ..cache.planner import natural_plan, plan_batch
    from ..cache.simulate import read_prompts
    from .reuse import request_mode
    from ..pipeline.modes import DEFAULT_MODE

    if not is_postgres_url(args.store):
        raise ValueError("--queue needs a postgresql:// --store (the queue lives in the store's database)")
    prompts = read_prompts(args.prompts)
    if args.limit:
        prompts = prompts[: args.limit]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("queue", "no_plan", "no_wait", "command")}
    settings["mode"] = request_mode(args, DEFAULT_MODE)  # --reuse or --mode, checked before anything is queued
    budget = mib_to_bytes(args.budget_mb) if args.budget_mb else None
    with open_store(args.store, budget_bytes=budget, policy=args.policy) as store:
        if args.no_plan:
            plan = natural_plan(prompts)
        else:
            extractor = EntityExtractor(mode=args.lookup_mode)
            lookup = CacheLookup(store, extractor, Embedder(), LookupConfig(mode=args.lookup_mode))
            plan = plan_batch(prompts, lookup)
        queue = JobQueue(store)
        batch = queue.submit(plan.jobs, [args.seed + i for i in range(len(prompts))], settings, str(out),
                             planned=plan.planned)
        print(f"queued batch {batch}: {len(prompts)} prompts in {len(plan.groups)} groups "
              f"({'planned' if plan.planned else 'natural order'}); start workers with: "
              f"python -m comfyui_chai worker --store '{args.store}'")
        if args.no_wait:
            return 0
        before = store.stats(last=0)
        while True:
            counts = queue.counts(batch)
            if counts["queued"] + counts["running"] == 0:
                break
            time.sleep(1.0)
        jobs = queue.results(batch)
        _write_batch_report(out, batch, jobs, store, before, plan.planned)
        failed = [j for j in jobs if j["state"] == "failed"]
        for j in failed:
            print(f"failed: prompt {j['index']}: {j['error']}", file=sys.stderr)
        return 1 if failed else 0


def _write_batch_report(out: Path, batch: int, jobs: list[dict], store, before, planned: bool) -> None:
    """report.{json,md} of a queued batch: the generate report plus worker, group and wall time."""
    from . import cache_behaviour, generate_report

    rows = []
    for j in jobs:
        if j["result"] is None:
            continue
        row = dict(j["result"])
        row.update(worker=j["worker"], group=j["group"], after=j["after"], attempt=j["attempt"])
        rows.append(row)
    started = min((j["started_at"] for j in jobs if j["started_at"]), default=0.0)
    finished = max((j["finished_at"] for j in jobs if j["finished_at"]), default=0.0)
    header = dict(jobs[0]["result"].get("run", {})) if jobs and jobs[0]["result"] else {}
    header.update(batch=batch, planned=planned, store=store.location, workers=sorted({j["worker"] for j in jobs if j["worker"]}),
                  wall_s=round(finished - started, 3))
    header.setdefault("model", "queued")
    for key in ("height", "width", "num_frames", "device", "config"):
        header.setdefault(key, "")
    totals, table = generate_report(rows, header, cache_behaviour(before, store.stats()))
    totals["wall_s"] = header["wall_s"]
    table += (f"\nQueued batch {batch} ({'planned' if planned else 'natural order'}), "
              f"{len(header['workers'])} worker(s), wall time {header['wall_s']:.2f} s.\n")
    (out / "report.json").write_text(json.dumps({"run": header, "totals": totals, "prompts": rows}, indent=2),
                                     encoding="utf-8")
    (out / "report.md").write_text(table, encoding="utf-8")
    print(table)


# ---------------------------------------------------------------------------------------------- worker
class _Heartbeat:
    """Extends a claimed job's lease every lease/3 seconds while the job runs."""

    def __init__(self, queue, job) -> None:
        self.queue, self.job = queue, job
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.queue.lease_s / 3):
            try:
                if not self.queue.heartbeat(self.job):
                    self.lost = True
                    return
            except Exception:  # a dropped connection: the next beat retries; the lease covers the gap
                pass

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _generate_args(settings: dict) -> argparse.Namespace:
    """The generate Namespace of a queued batch: this version's defaults, then the batch's settings."""
    from . import build_parser

    args = build_parser().parse_args(["generate", "--prompts", "-", "--out", "-", "--store", "-"])
    for key, value in settings.items():
        setattr(args, key, value)
    return args


class _Runner:
    """One pipeline per batch settings, built on first use (models load once per worker)."""

    def __init__(self, store, device: str | None, threads: int | None) -> None:
        self.store, self.device, self.threads = store, device, threads
        self._built: dict[str, tuple] = {}

    def pipeline(self, settings: dict):
        key = json.dumps(settings, sort_keys=True, default=str)
        if key not in self._built:
            import torch

            from ..cache.embed import Embedder
            from ..cache.entities import EntityExtractor
            from ..cache.lookup import CacheLookup, LookupConfig
            from . import generate_pipeline
            from .reuse import request_mode
            from ..pipeline.modes import DEFAULT_MODE

            args = _generate_args(settings)
            args.device = self.device or args.device
            args.mode = request_mode(args, DEFAULT_MODE)
            tiny = args.model == ["tiny"]
            small = tiny or args.model[0] == "reference"
            if self.threads is not None or (small and (args.device or "cpu") == "cpu"):
                torch.set_num_threads(max(1, self.threads or 1))
            lookup = CacheLookup(self.store, EntityExtractor(mode=args.lookup_mode), Embedder(),
                                 LookupConfig(mode=args.lookup_mode))
            pipe = generate_pipeline(args, lookup)
            hooks = () if args.intra == "off" else (args.intra,)  # --intra: an intra-request cache in every run
            height, width, resolution = args.height, args.width, args.resolution
            if tiny and resolution is None and (height is None or width is None):
                height, width = 64, 64
            num_frames = args.num_frames or (17 if tiny else None)
            size = pipe.resolve_size(resolution or "240p", args.aspect_ratio, height, width, num_frames)
            run = {"model": "tiny" if tiny else " ".join(args.model), "height": size[0], "width": size[1],
                   "num_frames": size[2], "device": str(pipe.device), "mode": args.mode,
                   "config": pipe.settings.tag(),
                   "compat_key": pipe.compat_key(*size, args.mode, hooks)}
            self._built[key] = (pipe, size, args.fps or pipe.fps, args.mode, hooks, run)
        return self._built[key]


def run_worker(url: str, name: str | None = None, batch_id: int | None = None, exit_when_idle: bool = False,
               max_jobs: int | None = None, poll_s: float = 1.0, lease_s: float = 600.0, device: str | None = None,
               threads: int | None = None, stop: threading.Event | None = None) -> int:
    """Take jobs from the queue of the store at ``url`` and run them until told to stop.

    Each job: claim (SKIP LOCKED), generate through the CHAI pipeline on the shared store (lookup,
    fast or full mode, insert after a miss), write the mp4 to the batch's folder (temporary name,
    renamed when finished), complete with the report row. A lost claim (lease taken over) is not
    completed; a failure gives the job back (failed after the queue's max attempts).

    Args:
        url: the store's ``postgresql://`` URL. name: worker name (default host:pid).
        batch_id: only that batch's jobs. exit_when_idle: return once nothing is queued or running.
        max_jobs: return after this many jobs. poll_s: wait between looks at an empty queue.
        lease_s: claim lifetime without heartbeat. device / threads: where and how to run.
        stop: an event that ends the loop between jobs.

    Returns:
        0, or 1 when a job failed in this worker.

    Raises:
        StoreError: the store cannot be reached past its retry time.
    """
    from ..cache.backend import open_store
    from ..cache.jobqueue import JobQueue
    from ..cache.pgstore import is_postgres_url
    from ..pipeline import write_video

    name = name or f"{socket.gethostname()}:{os.getpid()}"
    status, done = 0, 0
    if not is_postgres_url(url):
        raise ValueError("worker needs a postgresql:// --store (the queue lives in the store's database)")
    with open_store(url) as store:  # a worker may start before the first batch creates the store
        queue = JobQueue(store, lease_s=lease_s)
        runner = _Runner(store, device, threads)
        while not (stop is not None and stop.is_set()) and (max_jobs is None or done < max_jobs):
            job = queue.claim(name, batch_id)
            if job is None:
                counts = queue.counts(batch_id)
                if exit_when_idle and counts["queued"] + counts["running"] == 0:
                    break
                time.sleep(poll_s)
                continue
            done += 1
            try:
                with _Heartbeat(queue, job) as beat:
                    pipe, (height, width, frames), fps, mode, hooks, run = runner.pipeline(job.settings)
                    result = pipe.generate(job.prompt, seed=job.seed, height=height, width=width, num_frames=frames,
                                           mode=mode, hooks=hooks)
                    slug = re.sub(r"[^a-z0-9]+", "-", job.prompt.lower()).strip("-")[:40] or "prompt"
                    final = Path(job.out_dir) / f"{job.index:03d}_{slug}.mp4"
                    tmp = final.with_name(f".{final.stem}.{name.replace(':', '-')}.{job.attempt}.mp4")
                    write_video(result.frames, tmp, fps=fps)
                    os.replace(tmp, final)
                row = result.summary()
                row.update(video=final.name, run=run)
                if beat.lost or not queue.complete(job, row):
                    print(f"worker {name}: job {job.index} of batch {job.batch_id} was taken over "
                          "(lease expired); not completed here", file=sys.stderr)
                else:
                    print(f"worker {name}: batch {job.batch_id} prompt {job.index}: "
                          f"{'hit' if result.hit else 'miss'} {result.timings.total_ms / 1000:.2f} s", flush=True)
            except KeyboardInterrupt:  # hand the job back now rather than after the lease
                queue.fail(job, "the worker was interrupted")
                raise
            except Exception as exc:  # the job goes back to the queue; the worker carries on
                status = 1
                queue.fail(job, f"{type(exc).__name__}: {exc}")
                print(f"worker {name}: job {job.index} of batch {job.batch_id} failed: {exc}", file=sys.stderr)
    return status
