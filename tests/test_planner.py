"""The batch planner: grouping by shared entities, leader-first order, and the farm replay.

The first tests use a word extractor and exact-match embeddings (one-hot per distinct word), so
every expected group, order, hit and makespan is worked out by hand in the test; the last one runs
the real extractor and MiniLM embedder on related prompts.
"""

from __future__ import annotations

import numpy as np
import pytest

from comfyui_chai.cache.lookup import CacheLookup, LookupConfig
from comfyui_chai.cache.planner import natural_plan, plan_batch, replay_farm, sharing_matrix
from comfyui_chai.cache.simulate import entry_tensors
from comfyui_chai.cache.store import LatentStore, StoreConfig

STOP = {"a", "and", "in", "the", "on", "of"}


class WordExtractor:
    """Entities = the words of the prompt minus a few stop words (exact, deterministic)."""

    fingerprint = "words"

    def extract(self, prompt: str) -> list[str]:
        return list(dict.fromkeys(w for w in prompt.lower().split() if w not in STOP))

    def normalize_prompt(self, prompt: str) -> str:
        return " ".join(prompt.lower().split())


class OneHotEmbedder:
    """Each distinct text gets its own axis: cosine 1 for equal texts, 0 otherwise."""

    fingerprint = "onehot"

    def __init__(self) -> None:
        self.axes: dict[str, int] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i, self.axes.setdefault(t, len(self.axes))] = 1.0
        return out


# Sharing: 0~2 (cat); 1~2, 1~3 (dog); 2~3 (dog); 3~4 (park); 5 shares nothing.
PROMPTS = ["a cat", "a dog", "a cat and a dog", "a dog in the park", "a park", "a boat"]


def _lookup(store=None) -> CacheLookup:
    return CacheLookup(store, WordExtractor(), OneHotEmbedder(), LookupConfig(threshold=0.9))


def _store(tmp_path, name: str) -> LatentStore:
    return LatentStore(tmp_path / name, config=StoreConfig(durable=False))


def test_sharing_matrix_and_greedy_groups():
    shares = sharing_matrix(PROMPTS, _lookup())
    want = {(0, 2), (1, 2), (1, 3), (2, 3), (3, 4)}
    assert {(i, j) for i, j in zip(*np.nonzero(shares)) if i < j} == want
    assert (shares == shares.T).all() and not shares.diagonal().any()
    plan = plan_batch(PROMPTS, _lookup())
    # Prompts 2 and 3 both share with three others; the first (2) leads 0, 1, 3. Then 4 and 5 are
    # left with nothing to share (3 is taken): groups of one, in batch order.
    assert plan.groups == [[2, 0, 1, 3], [4], [5]]
    assert [(j.index, j.leader, j.after) for j in plan.jobs] == [
        (2, True, None), (4, True, None), (5, True, None), (0, False, 2), (1, False, 2), (3, False, 2)]
    assert [j.priority for j in plan.jobs] == list(range(6))
    assert natural_plan(PROMPTS).jobs[3].after is None


def test_replay_hits_and_makespan_worked_by_hand(tmp_path):
    tensors = entry_tensors((2, 2, 2, 2), cache_steps=1)
    # Natural order, 2 workers, miss 10 s, hit 1 s: t=0 cat and dog both miss (they start together);
    # t=10 both stored, "cat and dog" and "dog in the park" hit (t=11); "a park" misses (only a hit
    # holds "park") and "a boat" misses: t=21.
    natural = replay_farm(natural_plan(PROMPTS), 2, _lookup(_store(tmp_path, "n")), tensors, 10.0, 1.0)
    assert natural.hit_index == [False, False, True, True, False, False]
    assert natural.makespan_s == 21.0 and natural.busy_s == 42.0 and natural.idle_s == 0.0
    # Planned, 2 workers: leaders "cat and dog" and "a park" run first (t=10), then "a boat" and the
    # followers: cat (t=11), dog (t=12), park (t=13) as hits while the boat runs to t=20.
    plan = plan_batch(PROMPTS, _lookup())
    planned = replay_farm(plan, 2, _lookup(_store(tmp_path, "p")), tensors, 10.0, 1.0)
    assert planned.hit_index == [True, True, False, True, False, False]
    assert planned.makespan_s == 20.0 and planned.hits == 3 > natural.hits
    # One worker: followers still wait for the leader, the same hits; nothing runs in parallel.
    single = replay_farm(plan, 1, _lookup(_store(tmp_path, "s")), tensors, 10.0, 1.0)
    assert single.hits == 3 and single.makespan_s == 33.0 and single.idle_s == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="no prompts"):
        plan_batch([], _lookup())
    with pytest.raises(ValueError, match="workers"):
        replay_farm(natural_plan(PROMPTS), 0, _lookup(), {}, 1.0, 1.0)
    with pytest.raises(ValueError, match="> 0"):
        replay_farm(natural_plan(PROMPTS), 1, _lookup(), {}, 0.0, 1.0)


RELATED = [
    "a red fox running through snow", "a lighthouse on a rocky coast at night", "a sailboat on a calm lake",
    "a red fox sleeping under a tree", "a lighthouse beam sweeping over waves", "a child building a sandcastle",
    "a fox cub playing in tall grass", "a sailboat racing in strong wind", "a child flying a kite",
    "an old lighthouse in fog", "a kite over the beach", "a sandcastle washed by the tide",
]


def test_planned_order_on_four_workers_keeps_the_single_machine_hit_rate(tmp_path):
    from comfyui_chai.cache.embed import Embedder
    from comfyui_chai.cache.entities import EntityExtractor

    extractor, embedder = EntityExtractor(), Embedder()
    tensors = entry_tensors((2, 2, 2, 2), cache_steps=1)

    def run(plan, workers, name):
        lookup = CacheLookup(_store(tmp_path, name), extractor, embedder, LookupConfig())
        return replay_farm(plan, workers, lookup, tensors, 2.42, 0.74)

    plan = plan_batch(RELATED, CacheLookup(None, extractor, embedder, LookupConfig()))
    single = run(natural_plan(RELATED), 1, "n1")
    natural4 = run(natural_plan(RELATED), 4, "n4")
    planned4 = run(plan, 4, "p4")
    assert planned4.hits >= single.hits > natural4.hits
    assert all(planned4.hit_index[j.index] for j in plan.jobs if not j.leader), "the grouping must agree with the lookup"
    assert planned4.makespan_s < single.makespan_s
