"""The farm around the PostgreSQL store, against a real embedded server: the job queue (claims,
leases, followers after leaders, no job completed twice), workers and queued batches end to end,
``cache migrate`` between a folder and PostgreSQL, and ``db start/stop``."""

from __future__ import annotations

import json
import threading
import time

import pytest

from _store_util import DIM, assert_seeded_entry, put_seeded, seeded_entry
from comfyui_chai.cache.jobqueue import JobQueue
from comfyui_chai.cache.pgstore import PostgresStore
from comfyui_chai.cache.planner import PlannedJob
from comfyui_chai.cache.store import LatentStore
from comfyui_chai.cli import main


def _jobs(n: int, after: dict | None = None) -> list[PlannedJob]:
    after = after or {}
    return [PlannedJob(i, f"prompt {i}", 0, i not in after, after.get(i), i) for i in range(n)]


def test_claims_follow_priority_and_wait_for_the_leader(pg_url):
    with PostgresStore(pg_url) as store:
        queue = JobQueue(store, lease_s=30)
        batch = queue.submit(_jobs(3, after={1: 0, 2: 0}), [7, 8, 9], {"k": 1}, "/tmp/out", planned=True)
        first = queue.claim("w1")
        assert (first.index, first.seed, first.attempt, first.settings, first.out_dir) == (0, 7, 1, {"k": 1}, "/tmp/out")
        assert queue.claim("w2") is None, "followers wait while their leader runs"
        assert queue.heartbeat(first)
        assert queue.complete(first, {"hit": False})
        assert not queue.complete(first, {"hit": True}), "a job completes once"
        second, third = queue.claim("w2"), queue.claim("w3")
        assert (second.index, third.index) == (1, 2) and queue.claim("w4") is None
        assert queue.counts(batch) == {"queued": 0, "running": 2, "done": 1, "failed": 0}
        assert queue.fail(second, "ValueError: boom")  # back to the queue
        again = queue.claim("w4")
        assert again.index == 1 and again.attempt == 2
        results = queue.results(batch)
        assert results[0]["result"] == {"hit": False} and results[0]["worker"] == "w1"
        assert results[1]["state"] == "running" and results[1]["error"] == "ValueError: boom"


def test_an_expired_lease_is_taken_over_and_the_old_claim_cannot_complete(pg_url):
    with PostgresStore(pg_url) as store:
        queue = JobQueue(store, lease_s=0.5, max_attempts=2)
        batch = queue.submit(_jobs(1), [0], {}, "/tmp/out", planned=False)
        dead = queue.claim("killed worker")  # never heartbeats, never completes
        assert queue.claim("w2") is None
        time.sleep(0.7)
        taken = queue.claim("w2")
        assert taken.index == 0 and taken.attempt == 2
        assert not queue.complete(dead, {"from": "dead"}) and not queue.heartbeat(dead)
        assert queue.fail(taken, "RuntimeError: out of memory")  # second attempt of two: failed for good
        assert queue.counts(batch)["failed"] == 1 and queue.claim("w3") is None
        assert queue.results(batch)[0]["error"].startswith("RuntimeError")


def test_concurrent_claims_never_share_a_job(pg_url):
    with PostgresStore(pg_url) as store:
        queue = JobQueue(store, lease_s=60)
        queue.submit(_jobs(40), list(range(40)), {}, "/tmp/out", planned=False)
        taken: list[int] = []
        lock = threading.Lock()

        def work():
            while (job := queue.claim(threading.current_thread().name)) is not None:
                with lock:
                    taken.append(job.index)
                assert queue.complete(job, {})

        threads = [threading.Thread(target=work, name=f"w{i}") for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(taken) == list(range(40))
        assert queue.counts()["done"] == 40


def test_queued_batch_runs_on_two_workers_and_reports(pg_url, tmp_path, monkeypatch):
    """generate --queue plans the batch (leaders first, followers after them) and waits; two
    worker threads run it through the CHAI pipeline on the shared store; every follower hits."""
    import comfyui_chai.cache.embed as embed_mod
    import comfyui_chai.cache.entities as entities_mod
    from comfyui_chai.cli.farm import run_worker
    from test_pipeline import CommaExtractor, WordBagEmbedder

    class Extractor(CommaExtractor):
        def __init__(self, mode="entity"):
            self.mode = mode

    monkeypatch.setattr(entities_mod, "EntityExtractor", Extractor)
    monkeypatch.setattr(embed_mod, "Embedder", WordBagEmbedder)
    prompts = ["a red fox, snowy forest", "city street, neon lights", "red fox, a river", "neon lights, rainy night",
               "a red fox, desert"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    stop = threading.Event()
    workers = [threading.Thread(target=run_worker, args=(pg_url,),
                                kwargs={"name": f"w{i}", "poll_s": 0.2, "stop": stop}) for i in range(2)]
    for w in workers:
        w.start()
    try:
        code = main(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--store", pg_url,
                     "--model", "tiny", "--captions", "hashed", "--no-progress", "--seed", "3", "--queue"])
        (tmp_path / "p2.txt").write_text("a green boat, calm lake\n")
        intra_code = main(["generate", "--prompts", str(tmp_path / "p2.txt"), "--out", str(tmp_path / "out2"),
                           "--store", pg_url, "--model", "tiny", "--captions", "hashed", "--no-progress", "--queue",
                           "--full-steps", "12", "--intra", "mixcache", "--warmup-steps", "2",
                           "--trigger-threshold", "1e5", "--step-threshold", "1e5"])
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["prompt"]: r for r in report["prompts"]}
    assert len(rows) == 5 and report["run"]["planned"] is True
    assert [rows[p]["hit"] for p in prompts] == [False, False, True, True, True]
    assert rows[prompts[2]]["after"] == 0 and rows[prompts[3]]["after"] == 1
    assert [rows[p]["seed"] for p in prompts] == [3, 4, 5, 6, 7]
    assert report["totals"]["hits"] == 3 and set(report["run"]["workers"]) <= {"w0", "w1"}
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(r["video"] for r in rows.values())
    assert "Queued batch" in (out / "report.md").read_text()
    with PostgresStore(pg_url) as store:
        assert len(store) == 3 and store.stats().hits == 3  # the intra batch's miss is the third entry
    # a queued batch runs the intra-request cache it was submitted with
    assert intra_code == 0
    row, = json.loads((tmp_path / "out2" / "report.json").read_text())["prompts"]
    assert len(row["hook_reports"]["mixcache"]["map"]) == 12 and "S" in row["hook_reports"]["mixcache"]["map"]
    assert row["compat_key"].endswith("|hooks=mixcache")
    assert main(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--store", str(tmp_path / "f"),
                 "--queue", "--no-wait"]) == 2  # a folder store has no queue


def test_migrate_folder_to_postgres_and_back(pg_url, tmp_path, capsys):
    import io

    from PIL import Image

    seeds = list(range(12))
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 40, 40)).save(jpeg, "JPEG")
    with LatentStore(tmp_path / "src", dim=DIM, budget_bytes=10**6) as src:
        ids = {put_seeded(src, s): s for s in seeds}
        src.record_lookup("p", ["x"], next(iter(ids)), "x", "x", 1.0, 1.0)
        e = seeded_entry(100)
        src.put(e["tensors"], e["entities"], e["embeddings"], e["compat_key"], e["prompt"], e["info"],
                thumbnail=jpeg.getvalue())
        src.pin(next(iter(ids)))
    assert main(["cache", "migrate", str(tmp_path / "src"), pg_url]) == 0
    assert "copied 13 entries" in capsys.readouterr().out
    with PostgresStore(pg_url) as pg:
        assert pg.stats().budget_bytes == 10**6
        by_prompt = {r.prompt: r.entry_id for r in pg.entries()}
        for seed in seeds:
            assert_seeded_entry(pg, by_prompt[seeded_entry(seed)["prompt"]], seed)
        assert pg.thumbnail(by_prompt[e["prompt"]]) == jpeg.getvalue(), "the thumbnail travels with its entry"
        assert [r.prompt for r in pg.entries() if r.pinned] == [seeded_entry(0)["prompt"]], "and so does a pin"
        e = seeded_entry(5)
        assert pg.search(e["embeddings"][:1], e["compat_key"], k=1)[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert main(["cache", "migrate", pg_url, str(tmp_path / "back")]) == 0
    with LatentStore(tmp_path / "back") as back:
        # Least recently used first: entry 0, served once in the source, comes after the other seeds
        # (and before entry 100, stored after that lookup).
        assert [r.prompt for r in back.entries()] == [seeded_entry(s)["prompt"] for s in seeds[1:] + [0, 100]]
        e = seeded_entry(9)
        hit = back.search(e["embeddings"], e["compat_key"], k=1)[0]
        assert back.entry(hit.entry_id).prompt == e["prompt"] and back.verify().ok
    with PostgresStore(pg_url) as pg:
        pg.set_budget(pg.stats().bytes)
    assert main(["cache", "migrate", str(tmp_path / "src"), pg_url]) == 2  # would not fit: nothing evicted
    assert "raise its budget first" in capsys.readouterr().err
    assert main(["cache", "migrate", str(tmp_path / "nothing"), pg_url]) == 2
    assert "not a CHAI store" in capsys.readouterr().err


def test_db_start_prints_the_url_last_and_stop_keeps_the_data(tmp_path_factory, capsys):
    import os
    import tempfile

    import psycopg

    folder = tempfile.mkdtemp(prefix="chai-db-")
    os.chmod(folder, 0o755)
    try:
        assert main(["db", "start", folder]) == 0
        url = capsys.readouterr().out.strip().splitlines()[-1]
        assert url.startswith("postgresql://chai@/chai?host=")
        with PostgresStore(url, dim=DIM) as store:
            put_seeded(store, 1)
        assert main(["db", "start", folder]) == 0 and capsys.readouterr().out.strip().splitlines()[-1] == url
        assert main(["db", "stop", folder]) == 0 and "stopped" in capsys.readouterr().out
        assert main(["db", "status", folder]) == 1
        assert main(["db", "start", folder]) == 0
        with PostgresStore(url) as store:
            assert len(store) == 1 and store.verify().ok
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT extversion FROM pg_extension WHERE extname='vector'").fetchone()[0] >= "0.5"
    finally:
        main(["db", "stop", folder])
        __import__("shutil").rmtree(folder, ignore_errors=True)
    assert main(["db", "stop", str(tmp_path_factory.mktemp("empty"))]) == 2
    assert "holds no embedded PostgreSQL" in capsys.readouterr().err



def test_cache_commands_and_generate_on_a_url(pg_url, tmp_path, monkeypatch, capsys):
    import comfyui_chai.cache.embed as embed_mod
    import comfyui_chai.cache.entities as entities_mod
    from test_pipeline import CommaExtractor, WordBagEmbedder

    assert main(["cache", "stats", pg_url]) == 2  # nothing is created by a maintenance command
    assert "holds no CHAI store" in capsys.readouterr().err

    class Extractor(CommaExtractor):
        def __init__(self, mode="entity"):
            self.mode = mode

    monkeypatch.setattr(entities_mod, "EntityExtractor", Extractor)
    monkeypatch.setattr(embed_mod, "Embedder", WordBagEmbedder)
    (tmp_path / "p.txt").write_text("a red fox, snowy forest\nred fox, a river\n")
    assert main(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--store", pg_url,
                 "--model", "tiny", "--captions", "hashed", "--no-progress", "--budget-mb", "50"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["hit"] for r in report["prompts"]] == [False, True] and report["run"]["store"] == pg_url
    capsys.readouterr()
    assert main(["cache", "stats", "--json", pg_url]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["entries"], stats["hits"], stats["misses"], stats["budget_bytes"]) == (1, 1, 1, 50 << 20)
    assert main(["cache", "verify", pg_url]) == 0 and "OK: store is consistent" in capsys.readouterr().out
    assert main(["cache", "compact", pg_url]) == 0 and "1 partition(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_sigkilled_worker_process_has_its_job_taken_again(pg_url, tmp_path):
    """A real worker process (real extractor and embedder, tiny model) is SIGKILLed while it holds a
    job; after the lease a second worker takes that job again and the batch completes, every job
    exactly once."""
    import signal
    import subprocess
    import sys

    from comfyui_chai.cli.farm import run_worker

    prompts = ["a red fox in the snow", "a lighthouse at night", "a sailboat on a lake"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    assert main(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--store", pg_url,
                 "--model", "tiny", "--captions", "hashed", "--queue", "--no-wait", "--no-plan"]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "comfyui_chai", "worker", "--store", pg_url, "--lease-s", "3",
                             "--name", "doomed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with PostgresStore(pg_url) as store:
        queue = JobQueue(store)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and queue.counts(1)["running"] == 0:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        held = [j for j in queue.results(1) if j["state"] == "running"]
        assert len(held) == 1 and held[0]["worker"] == "doomed"
        assert run_worker(pg_url, name="rescuer", exit_when_idle=True, poll_s=0.5) == 0
        jobs = queue.results(1)
    assert [j["state"] for j in jobs] == ["done"] * 3
    taken = next(j for j in jobs if j["index"] == held[0]["index"])
    assert taken["worker"] == "rescuer" and taken["attempt"] == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mp4")) == sorted(j["result"]["video"] for j in jobs)
