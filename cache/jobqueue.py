"""A farm job queue in the store's PostgreSQL database.

``generate --store URL --queue`` submits a batch (its settings and one job per prompt, in the
planner's order); ``worker --store URL`` on every GPU machine claims jobs one at a time with
``SELECT ... FOR UPDATE SKIP LOCKED`` (workers never block each other), runs them and completes
them. Rules:

* A job is claimable when queued, or running with an expired lease (its worker died). A follower
  (``after``) is claimable only once its leader is done or failed.
* A worker holds a lease (``lease_s``) and extends it while the job runs (:meth:`JobQueue.heartbeat`).
* Completing needs the claim's attempt number: a worker whose lease was taken over cannot complete,
  so no job runs twice to completion.
* A job that fails ``max_attempts`` times is marked failed with its error.
* Every time is the database's clock, so machines with skewed clocks agree on leases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from .planner import PlannedJob

__all__ = ["Job", "JobQueue", "JOB_STATES"]

JOB_STATES = ("queued", "running", "done", "failed")
_NOW = "extract(epoch from clock_timestamp())"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS chai_batches(
        id bigserial PRIMARY KEY, created_at double precision NOT NULL, out_dir text NOT NULL,
        settings text NOT NULL, prompts integer NOT NULL, planned boolean NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS chai_jobs(
        id bigserial PRIMARY KEY,
        batch_id bigint NOT NULL REFERENCES chai_batches(id) ON DELETE CASCADE,
        idx integer NOT NULL, prompt text NOT NULL, seed bigint NOT NULL, priority integer NOT NULL,
        after_idx integer, grp integer NOT NULL DEFAULT 0,
        state text NOT NULL DEFAULT 'queued', worker text, attempt integer NOT NULL DEFAULT 0,
        lease_until double precision, started_at double precision, finished_at double precision,
        result text, error text,
        UNIQUE (batch_id, idx))""",
    "CREATE INDEX IF NOT EXISTS chai_jobs_open ON chai_jobs(batch_id, priority) WHERE state IN ('queued', 'running')",
)


@dataclass
class Job:
    """A claimed job.

    Attributes:
        id: job row id. batch_id: its batch. index: position in the batch (output name, seed offset).
        prompt / seed: what to generate. attempt: this claim's attempt number (1 = first).
        settings: the batch's generate settings (dict). out_dir: the batch's output folder.
    """

    id: int
    batch_id: int
    index: int
    prompt: str
    seed: int
    attempt: int
    settings: dict
    out_dir: str


class JobQueue:
    """Batches and jobs in the database of a :class:`~.pgstore.PostgresStore`.

    Args:
        store: the open store (its connection handling: reconnect and retry).
        lease_s: seconds a claim lasts without a heartbeat (a killed worker's job is retaken after it).
        max_attempts: claims before a job that keeps failing is marked failed.

    Raises:
        StoreError: the tables cannot be created (rights) or the server is unreachable.
    """

    def __init__(self, store, lease_s: float = 600.0, max_attempts: int = 3) -> None:
        if lease_s <= 0 or max_attempts < 1:
            raise ValueError("lease_s must be > 0 seconds and max_attempts >= 1")
        self.store = store
        self.lease_s = float(lease_s)
        self.max_attempts = int(max_attempts)
        store.run(self._create)

    @staticmethod
    def _create(conn) -> None:
        if conn.execute("SELECT to_regclass('chai_jobs') IS NULL").fetchone()[0]:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('chai_jobs schema'))")
            for statement in _SCHEMA:
                conn.execute(statement)

    def submit(self, jobs: Sequence[PlannedJob], seeds: Sequence[int], settings: dict, out_dir: str,
               planned: bool) -> int:
        """Queue a batch in one transaction; returns its id.

        Args:
            jobs: the batch's jobs (any order; ``priority`` orders dispatch, ``after`` is a batch index).
            seeds: noise seed per batch index.
            settings: the generate settings every worker applies (JSON-serialisable; no secrets).
            out_dir: folder the workers write videos to (shared by the machines).
            planned: whether the order came from the planner (for reports).

        Raises:
            ValueError: no jobs, or a seed list of another length.
        """
        if not jobs:
            raise ValueError("a batch needs at least one prompt")
        if len(seeds) != len(jobs):
            raise ValueError(f"{len(seeds)} seeds for {len(jobs)} jobs")
        blob = json.dumps(settings, sort_keys=True, default=str)

        def insert(conn) -> int:
            batch = int(conn.execute(f"INSERT INTO chai_batches(created_at, out_dir, settings, prompts, planned) "
                                     f"VALUES({_NOW}, %s, %s, %s, %s) RETURNING id",
                                     (out_dir, blob, len(jobs), planned)).fetchone()[0])
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO chai_jobs(batch_id, idx, prompt, seed, priority, after_idx, grp) "
                                "VALUES(%s, %s, %s, %s, %s, %s, %s)",
                                [(batch, j.index, j.prompt, int(seeds[j.index]), j.priority, j.after, j.group)
                                 for j in jobs])
            return batch

        return self.store.run(insert)

    def claim(self, worker: str, batch_id: int | None = None) -> Job | None:
        """Take the ready job of lowest (batch, priority), or None when none is ready now.

        Ready: queued, or running past its lease; a follower only once its leader is done or failed.
        Locked rows are skipped, so concurrent workers each get a different job at once.
        """
        only = "AND j.batch_id = %(batch)s" if batch_id is not None else ""

        def take(conn):
            row = conn.execute(
                f"""UPDATE chai_jobs SET state = 'running', worker = %(worker)s, attempt = attempt + 1,
                        lease_until = {_NOW} + %(lease)s, started_at = {_NOW}
                    WHERE id = (
                        SELECT j.id FROM chai_jobs j
                        WHERE (j.state = 'queued' OR (j.state = 'running' AND j.lease_until < {_NOW})) {only}
                          AND (j.after_idx IS NULL OR EXISTS (
                               SELECT 1 FROM chai_jobs l WHERE l.batch_id = j.batch_id AND l.idx = j.after_idx
                               AND l.state IN ('done', 'failed')))
                        ORDER BY j.batch_id, j.priority
                        LIMIT 1 FOR UPDATE SKIP LOCKED)
                    RETURNING id, batch_id, idx, prompt, seed, attempt""",
                {"worker": worker, "lease": self.lease_s, "batch": batch_id}).fetchone()
            if row is None:
                return None
            out_dir, settings = conn.execute("SELECT out_dir, settings FROM chai_batches WHERE id = %s",
                                             (row[1],)).fetchone()
            return Job(int(row[0]), int(row[1]), int(row[2]), row[3], int(row[4]), int(row[5]),
                       json.loads(settings), out_dir)

        return self.store.run(take)

    def heartbeat(self, job: Job) -> bool:
        """Extend the lease of a job this claim still holds; False when the claim was lost."""
        return self._owned_update(job, f"lease_until = {_NOW} + %(lease)s", {"lease": self.lease_s})

    def complete(self, job: Job, result: dict) -> bool:
        """Mark a job done with its result (JSON). Returns False, changing nothing, when this claim
        no longer holds the job (its lease expired and another worker took it)."""
        return self._owned_update(job, f"state = 'done', finished_at = {_NOW}, result = %(result)s, error = NULL",
                                  {"result": json.dumps(result, default=str)})

    def fail(self, job: Job, error: str) -> bool:
        """Give a failed job back to the queue, or mark it failed after ``max_attempts`` claims."""
        state = "'failed'" if job.attempt >= self.max_attempts else "'queued'"
        return self._owned_update(job, f"state = {state}, finished_at = {_NOW}, error = %(error)s, "
                                       "lease_until = NULL", {"error": error[:2000]})

    def _owned_update(self, job: Job, assignment: str, params: dict) -> bool:
        def update(conn) -> bool:
            cur = conn.execute(f"UPDATE chai_jobs SET {assignment} WHERE id = %(id)s AND attempt = %(attempt)s "
                               "AND state = 'running'", {**params, "id": job.id, "attempt": job.attempt})
            return cur.rowcount == 1

        return self.store.run(update)

    def counts(self, batch_id: int | None = None) -> dict[str, int]:
        """Jobs per state (of one batch, or of all)."""
        where = "WHERE batch_id = %s" if batch_id is not None else ""
        rows = self.store.run(lambda c: c.execute(f"SELECT state, count(*) FROM chai_jobs {where} GROUP BY state",
                                                  (batch_id,) if batch_id is not None else ()).fetchall(),
                              transaction=False)
        return {state: 0 for state in JOB_STATES} | {s: int(n) for s, n in rows}

    def results(self, batch_id: int) -> list[dict]:
        """Every job of a batch in batch order: index, prompt, seed, state, worker, attempt,
        started_at / finished_at (database clock, s), result (dict or None), error."""
        rows = self.store.run(lambda c: c.execute(
            "SELECT idx, prompt, seed, state, worker, attempt, started_at, finished_at, result, error, grp, "
            "after_idx FROM chai_jobs WHERE batch_id = %s ORDER BY idx", (batch_id,)).fetchall(), transaction=False)
        keys = ("index", "prompt", "seed", "state", "worker", "attempt", "started_at", "finished_at", "result",
                "error", "group", "after")
        out = [dict(zip(keys, r)) for r in rows]
        for r in out:
            r["result"] = json.loads(r["result"]) if r["result"] else None
        return out
