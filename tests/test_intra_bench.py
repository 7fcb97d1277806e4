"""The intra-request bench's CPU paths (bench/intra_bench.py: the selection rule, stream budgets; its timing
runs are tested through bench/gpu_session.py in test_gpu_session.py) and intra-request caching on a stream
(pipeline/stream.py with mode specs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("intra_bench", REPO / "bench" / "intra_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_a_stream_runs_mode_specs_with_hooks_and_counts_computed_steps():
    """Six prompts of the mixed stream through the real lookup (spaCy, MiniLM, a fresh store per mode):
    ``chai+mixcache`` runs the hook in every request, its first request misses and caches after the
    captured steps, hits below min_steps compute every step; the budgets follow each mode's entry size."""
    import torch

    from comfyui_chai.pipeline import ChaiPipeline
    from comfyui_chai.pipeline.quality import HARNESS_SETTINGS
    from comfyui_chai.pipeline.stream import format_kind_table, format_stream_table, miss_entry_bytes, run_stream
    from comfyui_chai.refmodel.model import load_reference_model
    from comfyui_chai.refmodel.streams import mixed_stream

    bench = _bench()
    torch.set_num_threads(1)
    model, encoder = load_reference_model()
    items = mixed_stream(6, seed=5)
    settings = {"full_steps": 12, "fast_steps": 6, "min_steps": 10, "warmup_steps": 2,
                "trigger_threshold": 1e5, "step_threshold": 1e5}  # reuse whenever the rule allows
    report = run_stream(model, encoder, items, modes=("chai", "chai+mixcache"), settings=settings)
    full, chai, mixed = (report.runs[name] for name in ("full", "chai", "chai+mixcache"))
    assert full.hit == [False] * 6 and full.computed == full.steps == [12] * 6
    assert chai.hit == mixed.hit and not mixed.hit[0] and any(mixed.hit), mixed.hit
    assert chai.computed == chai.steps == [6 if hit else 12 for hit in chai.hit]
    assert mixed.steps == chai.steps and mixed.computed[0] < 12  # a 12-step miss caches after its capture
    assert all(c == s if hit else c < s for c, s, hit in zip(mixed.computed, mixed.steps, mixed.hit))
    summary = report.summary()["modes"]
    assert summary["chai+mixcache"]["mean_computed_steps"] < summary["chai"]["mean_computed_steps"]
    assert "| chai+mixcache |" in format_stream_table(report)
    assert "| chai+mixcache |" in bench.kinds_table(report)
    by_kind = summary["chai"]["by_kind"]  # per kind of request: counts add up, Δ is that kind's mean
    assert sum(k["n"] for k in by_kind.values()) == 6 and sum(k["hits"] for k in by_kind.values()) == sum(chai.hit)
    kind = report.kinds[0]
    idx = [i for i, k in enumerate(report.kinds) if k == kind]
    assert by_kind[kind]["delta_overall"] == pytest.approx(
        np.mean([chai.scores[i]["overall"] - full.scores[i]["overall"] for i in idx]), abs=1e-4)
    table = format_kind_table(report)
    assert table.splitlines()[0] == "| mode | " + " | ".join(dict.fromkeys(report.kinds)) + " |"
    assert "| chai |" in table and "| full |" not in table
    with pytest.raises(ValueError, match="does not look up"):
        run_stream(model, encoder, items[:1], modes=("full+mixcache",))
    # budgets: share x requests x one miss's bytes of each mode (auto keeps both entries)
    pipe = ChaiPipeline.from_reference_model(model, encoder).with_settings(HARNESS_SETTINGS)
    budgets = bench.stream_budgets(model, encoder, ["chai", "chai+mixcache", "auto+mixcache"], 200, 0.1)
    chai_bytes, chorus_bytes = miss_entry_bytes(pipe, "chai"), miss_entry_bytes(pipe, "chorus")
    assert budgets == {"chai": int(20 * chai_bytes), "chai+mixcache": int(20 * chai_bytes),
                       "auto+mixcache": int(20 * (chai_bytes + chorus_bytes))}
    with pytest.raises(ValueError, match="stores no entry"):
        miss_entry_bytes(pipe, "full")
