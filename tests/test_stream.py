"""The mixed scene-caption stream (refmodel/stream.py) and the intra-request bench's CPU paths
(bench/intra_bench.py: the selection rule, the timing path at small size, a short stream)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from comfyui_chai.refmodel import scenes
from comfyui_chai.refmodel.stream import KINDS, mixed_stream

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("intra_bench", REPO / "bench" / "intra_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_stream_mixes_the_three_kinds_as_it_says():
    items = mixed_stream(300, seed=11)
    assert items == mixed_stream(300, seed=11) and items != mixed_stream(300, seed=12)
    assert mixed_stream(40, seed=11) == items[:40]  # item i depends on the seed and the items before it
    counts = {k: sum(it.kind == k for it in items) for k in KINDS}
    assert items[0].kind == "unrelated" and items[0].source is None
    for share, kind in zip((0.3, 0.4, 0.3), KINDS):
        assert abs(counts[kind] / 300 - share) < 0.08, counts
    for i, it in enumerate(items):
        assert it.caption == it.caption.strip() and it.caption
        if it.kind == "unrelated":
            assert it.source is None
            continue
        assert max(0, i - 50) <= it.source < i
        src = items[it.source].scene
        if it.kind == "near_duplicate":
            assert it.scene == src
        else:
            assert it.scene.objects[0].shape == src.objects[0].shape
            assert it.scene.objects[0].color == src.objects[0].color
            assert it.scene.background != src.background and it.scene.motion != src.motion
            assert it.scene.objects[0].color in scenes.ALLOWED_COLORS[it.scene.background]
    # near-duplicates are re-worded most of the time
    near = [it for it in items if it.kind == "near_duplicate"]
    assert sum(it.caption != items[it.source].caption for it in near) > len(near) / 2
    only_new = mixed_stream(20, seed=3, shares=(0, 0, 1))
    assert all(it.kind == "unrelated" for it in only_new)
    with pytest.raises(ValueError):
        mixed_stream(5, shares=(0, 0, 0))


def test_bench_selection_rule():
    bench = _bench()

    def row(overall, steps):
        return {"overall": overall, "equivalent_steps": steps, "delta_overall_vs_full": overall - 0.8}

    summary = {"modes": {
        "full30": row(0.8, 30),
        "mixcache@step_threshold=0.1": row(0.795, 14),
        "mixcache@step_threshold=0.2": row(0.785, 10),  # too far below full for margin 0.01
        "mixcache@step_threshold=0.05": row(0.799, 20),
        "teacache@teacache_threshold=0.1": row(0.79, 18),
        "teacache@teacache_threshold=0.2": row(0.78, 13),
        "plain10": row(0.7, 10),
    }}
    picked = bench.choose(summary, 0.01)
    assert picked["mixcache"] == {"step_threshold": 0.1} and picked["plain_steps"] == 14
    assert picked["teacache_threshold"] == 0.2  # closest in equivalent steps
    assert bench.choose(summary, 0.02)["mixcache"] == {"step_threshold": 0.2}


def test_bench_timing_path_at_small_size_on_cpu(tmp_path):
    bench = _bench()
    assert bench.main(["timing", "--steps", "8", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "timing_small_cpu.json").read_text())
    runs = out["runs"]
    assert set(runs) >= {"plain", "mixcache (defaults)", "teacache (defaults)", "mixcache, every step computed",
                         "forced step reuse", "forced block reuse", "forced CFG reuse"}
    assert runs["plain"]["map"] == "F" * 8 and runs["mixcache, every step computed"]["map"] == "F" * 8
    assert runs["forced step reuse"]["map"] == "FF" + "S" * 5 + "F"
    assert runs["forced block reuse"]["map"] == "FF" + "B" * 5 + "F"
    assert runs["forced CFG reuse"]["map"] == "FF" + "C" * 5 + "F"
    assert runs["forced step reuse"]["work_share"] == pytest.approx(3 / 8, abs=1e-3)
    assert all(r["ms"] > 0 for r in runs.values())


def test_bench_short_stream_on_cpu():
    """Six prompts of the mixed stream through the real lookup (spaCy, MiniLM, a fresh store each):
    every configuration sees every prompt; all-full never looks up; CHAI's first request misses and stores,
    the budget follows from that entry; MixCache computes fewer steps than CHAI runs, never more."""
    import torch

    from comfyui_chai.refmodel.model import load_reference_model

    bench = _bench()
    torch.set_num_threads(1)
    model, encoder = load_reference_model()
    items = mixed_stream(6, seed=5, shares=(0.5, 0.5, 0))
    prompts = [it.caption for it in items]
    configs = [c for c in bench.stream_configs() if c["mode"] in ("full", "chai")]
    results = bench.run_stream(model, encoder, prompts, budget_share=0.5, seed=0, score=True, configs=configs,
                               settings={"full_steps": 12, "fast_steps": 6, "min_steps": 10, "warmup_steps": 2,
                                         "trigger_threshold": 1e5, "step_threshold": 1e5})  # reuse when allowed
    assert set(results) == {"all full", "CHAI", "CHAI + MixCache"}
    full, chai, mixed = results["all full"], results["CHAI"], results["CHAI + MixCache"]
    assert full["hits"] == [False] * 6 and full["steps"] == [12] * 6 and full["computed"] == [12] * 6
    assert full["budget_bytes"] is None  # nothing stored without a lookup
    for rows in (chai, mixed):
        assert len(rows["latency_ms"]) == len(rows["scores"]) == 6 and not rows["hits"][0]
        assert any(rows["hits"]), rows["hits"]  # near-duplicates and shared entities of earlier prompts
        assert rows["steps"] == [6 if hit else 12 for hit in rows["hits"]]
        assert rows["budget_bytes"] >= 1 and rows["evictions"] >= 0
    assert chai["computed"] == chai["steps"]
    assert all(c <= s for c, s in zip(mixed["computed"], mixed["steps"]))
    assert mixed["computed"][0] < 12  # a 12-step miss (>= min_steps) caches after its captured steps
    assert [c for c, h in zip(mixed["computed"], mixed["hits"]) if h] == [6] * sum(mixed["hits"])  # < min_steps
    table = bench._stream_table(results, 6, [it.kind for it in items])
    assert table.count("\n| all full |") == 2 and "| CHAI + MixCache | " in table
