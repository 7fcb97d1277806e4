"""Batch planning for a farm: order a batch so that related prompts hit each other's entries.

CHAI serves a prompt from the cache when an entry sharing one of its entities has been stored, and
an entry is stored only when a miss finishes. Spread in natural order over N workers, two related
prompts often start together and both miss. The planner groups a batch by shared entities (the
same keys, embedder and threshold the lookup uses, so "shares" means "would hit") and orders it:

1. Greedy cover: the prompt that shares an entity with the most remaining prompts leads a group of
   those prompts; repeat on what is left. Prompts sharing nothing are groups of one.
2. Leaders run first, larger groups first; every other prompt of a group waits for its leader's
   entry (``after``), so it runs as a hit; groups run in parallel across workers.

:func:`replay_farm` replays a plan (or the natural order) on N simulated workers with modelled
latencies through the real lookup and a real store, event by event: a job looks up when it
starts and inserts when it finishes. It gives the hit rate and the makespan of each order.
"""

from __future__ import annotations

import heapq
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["PlannedJob", "BatchPlan", "plan_batch", "natural_plan", "FarmReplay", "replay_farm"]


@dataclass
class PlannedJob:
    """One prompt of a planned batch.

    Attributes:
        index: position in the batch as given (0-based); its seed offset and output name.
        prompt: the prompt. group: its group number (0 = the largest).
        leader: True for the prompt that runs first in its group (expected to miss and store).
        after: index of the leader this prompt waits for, or None (leaders, natural order).
        priority: dispatch rank, lower first, among jobs that are ready.
    """

    index: int
    prompt: str
    group: int
    leader: bool
    after: int | None
    priority: int


@dataclass
class BatchPlan:
    """A batch in dispatch order (``jobs`` sorted by ``priority``) and its groups (lists of indices,
    leader first)."""

    jobs: list[PlannedJob]
    groups: list[list[int]] = field(default_factory=list)
    planned: bool = True

    def to_json(self) -> dict:
        """JSON-serialisable dict."""
        return {"planned": self.planned, "groups": self.groups, "jobs": [asdict(j) for j in self.jobs]}


def natural_plan(prompts: Sequence[str]) -> BatchPlan:
    """The batch as given: every prompt its own group, no waiting, dispatched in order."""
    return BatchPlan([PlannedJob(i, p, i, True, None, i) for i, p in enumerate(prompts)],
                     [[i] for i in range(len(prompts))], planned=False)


def sharing_matrix(prompts: Sequence[str], lookup) -> np.ndarray:
    """[n, n] bool: prompt i shares an entity with prompt j (cosine >= the lookup's threshold between
    one of i's keys and one of j's, the keys the lookup would search and store). Diagonal False.

    Args:
        prompts: the batch. lookup: a :class:`CacheLookup` (its ``keys_for``, ``embedder`` and
            ``config.threshold``).

    Raises:
        ValueError: an empty or over-long prompt (from the extractor).
    """
    keys = [lookup.keys_for(p) for p in prompts]
    texts = sorted({k for ks in keys for k in ks})
    col = {t: i for i, t in enumerate(texts)}
    vectors = np.asarray(lookup.embedder.encode(texts), dtype=np.float32)
    close = (vectors @ vectors.T) >= float(lookup.config.threshold)  # [E, E] entity pairs that would hit
    incidence = np.zeros((len(prompts), len(texts)), dtype=np.float32)
    for i, ks in enumerate(keys):
        incidence[i, [col[k] for k in ks]] = 1.0
    shares = (incidence @ close.astype(np.float32) @ incidence.T) > 0
    np.fill_diagonal(shares, False)
    return shares


def plan_batch(prompts: Sequence[str], lookup) -> BatchPlan:
    """Group a batch by shared entities and order it (see the module docstring).

    Args:
        prompts: the batch, in the artist's order.
        lookup: the :class:`CacheLookup` the batch will run with (keys, embedder, threshold).

    Returns:
        A :class:`BatchPlan`: leaders (larger groups first, ties by batch order) then followers,
        each follower ``after`` its leader.

    Raises:
        ValueError: no prompts, or a prompt the extractor rejects.
    """
    if not prompts:
        raise ValueError("no prompts to plan")
    shares = sharing_matrix(prompts, lookup)
    remaining = np.ones(len(prompts), dtype=bool)
    groups: list[list[int]] = []
    while remaining.any():
        cover = (shares & remaining[None, :]).sum(axis=1)
        cover[~remaining] = -1
        leader = int(np.argmax(cover))  # first of the best: ties keep batch order
        members = np.flatnonzero(shares[leader] & remaining).tolist()
        groups.append([leader] + members)
        remaining[leader] = False
        remaining[members] = False
    groups.sort(key=lambda g: (-len(g), g[0]))
    jobs: list[PlannedJob] = []
    for gi, group in enumerate(groups):
        jobs.append(PlannedJob(group[0], prompts[group[0]], gi, True, None, 0))
    for gi, group in enumerate(groups):
        jobs += [PlannedJob(i, prompts[i], gi, False, group[0], 0) for i in group[1:]]
    for rank, job in enumerate(jobs):
        job.priority = rank
    return BatchPlan(jobs, groups, planned=True)


@dataclass
class FarmReplay:
    """Result of :func:`replay_farm`.

    Attributes:
        order: "natural" or "planned". workers: simulated workers. prompts, hits, hit_rate.
        makespan_s: modelled wall time of the whole batch (seconds). busy_s: summed job time.
        idle_s: worker time spent waiting for a leader (workers x makespan - busy).
        hit_index: per batch index, True when it ran as a hit.
    """

    order: str
    workers: int
    prompts: int
    hits: int
    hit_rate: float
    makespan_s: float
    busy_s: float
    idle_s: float
    hit_index: list[bool] = field(repr=False, default_factory=list)


def replay_farm(plan: BatchPlan, workers: int, lookup, tensors: dict, full_s: float, fast_s: float,
                compat_key: str = "farm-replay") -> FarmReplay:
    """Run a plan on ``workers`` simulated machines, modelled latencies, real lookup and store.

    A worker takes the ready job of lowest priority (a follower is ready once its leader finished);
    at start the job looks up (recorded in the store's statistics) and runs ``fast_s`` on a hit or
    ``full_s`` on a miss; a miss inserts ``tensors`` when it finishes. Events at the same time:
    completions first, so an entry finished at t serves a job starting at t.

    Args:
        plan: from :func:`plan_batch` or :func:`natural_plan`.
        workers: number of machines (>= 1).
        lookup: a :class:`CacheLookup` on an empty (or warm) store of any backend.
        tensors: the latents a miss stores (see ``simulate.entry_tensors``).
        full_s / fast_s: modelled seconds of a miss (full steps) and of a hit (fast steps).

    Returns:
        :class:`FarmReplay`.

    Raises:
        ValueError: workers < 1 or non-positive latencies.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if full_s <= 0 or fast_s <= 0:
        raise ValueError("full_s and fast_s must be > 0 seconds")
    by_index = {job.index: job for job in plan.jobs}
    followers: dict[int, list[PlannedJob]] = {}
    ready: list[tuple[int, int]] = []
    for job in plan.jobs:
        if job.after is None:
            ready.append((job.priority, job.index))
        else:
            followers.setdefault(job.after, []).append(job)
    heapq.heapify(ready)
    running: list[tuple[float, int, int]] = []  # (finish time, start sequence, index)
    to_insert: dict[int, object] = {}
    hit_index = [False] * len(plan.jobs)
    free, now, busy, seq = workers, 0.0, 0.0, 0
    while ready or running:
        while free and ready:
            _, index = heapq.heappop(ready)
            result = lookup.lookup(by_index[index].prompt, compat_key, load=True)
            hit_index[index] = result.hit
            duration = fast_s if result.hit else full_s
            if not result.hit:
                to_insert[index] = result
            heapq.heappush(running, (now + duration, seq, index))
            seq += 1
            busy += duration
            free -= 1
        now = running[0][0]
        finished = []
        while running and running[0][0] == now:  # every job finishing now, before any start
            finished.append(heapq.heappop(running)[2])
            free += 1
        for index in finished:
            if index in to_insert:
                lookup.insert(to_insert.pop(index), tensors, {"simulated": True})
            for follower in followers.pop(index, []):
                heapq.heappush(ready, (follower.priority, follower.index))
    hits = sum(hit_index)
    return FarmReplay(order="planned" if plan.planned else "natural", workers=workers, prompts=len(plan.jobs),
                      hits=hits, hit_rate=hits / len(plan.jobs), makespan_s=now, busy_s=busy,
                      idle_s=workers * now - busy, hit_index=hit_index)


# Modelled request latencies (seconds): the median miss (30 steps) and hit (8 steps with Cache
# Attention) of the 946 VBench prompts on the reference model (README, "Real prompts").
MODEL_FULL_S = 2.42
MODEL_FAST_S = 0.74


def compare_orders(prompts: Sequence[str], workers: Sequence[int] = (1, 2, 4, 8), full_s: float = MODEL_FULL_S,
                   fast_s: float = MODEL_FAST_S, threshold: float | None = None, budget_bytes: int = 1 << 30,
                   store_opener=None, extractor=None, embedder=None, workdir: str | Path | None = None,
                   progress: bool = False) -> list[FarmReplay]:
    """Natural order against the planned order for each worker count, each on a fresh store.

    Args:
        prompts: the batch. workers: worker counts to replay.
        full_s / fast_s: modelled seconds of a miss and a hit.
        threshold: lookup threshold (default the lookup's).
        budget_bytes: store budget (default 1 GiB: no eviction at VBench's size).
        store_opener: ``opener(name) -> store`` for a fresh empty store per replay (any backend);
            default a folder store in a temporary folder.
        extractor / embedder: default ones if None (memoised: each text is parsed and embedded once).

    Returns:
        One :class:`FarmReplay` per (order, workers), natural first.
    """
    from tqdm import tqdm

    from .embed import Embedder
    from .entities import EntityExtractor
    from .lookup import CacheLookup, LookupConfig
    from .simulate import _MemoEmbedder, _MemoExtractor, entry_tensors
    from .backend import open_store

    embedder = _MemoEmbedder(embedder or Embedder())
    memo_extractor = _MemoExtractor(extractor or EntityExtractor(), prompts)
    config = LookupConfig() if threshold is None else LookupConfig(threshold=threshold)
    tensors = entry_tensors()
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir, prefix="chai-farm-") as tmp:
        def folder_store(name: str):
            return open_store(str(Path(tmp) / name), budget_bytes=budget_bytes,
                              options={"durable": False, "autosave_every": 10**9})

        opener = store_opener or folder_store
        planner_lookup = CacheLookup(None, memo_extractor, embedder, config)
        plans = {"natural": natural_plan(prompts), "planned": plan_batch(prompts, planner_lookup)}
        runs = [(order, n) for order in plans for n in workers]
        for order, n in tqdm(runs, desc="replay", disable=not progress):
            store = opener(f"{order}-{n}")
            try:
                lookup = CacheLookup(store, memo_extractor, embedder, config)
                rows.append(replay_farm(plans[order], n, lookup, tensors, full_s, fast_s))
            finally:
                store.close()
    return rows
