"""bench/gpu_session.py on the CPU (``--smoke``: the small configuration): every part runs and is written, the hits
are real hits of the pack's modes fed by the round's miss, the time guard and a failing request leave what was
measured on disk. The same code runs STDiT3-XL/2 on a GPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_session", REPO / "bench" / "gpu_session.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_replay_lookup_serves_only_another_prompts_entry_of_the_same_key(bench):
    lookup = bench.ReplayLookup()
    miss = lookup.lookup("a red fox in snow", "K")
    assert not miss.hit and miss.matched is None
    z = torch.arange(6.0).reshape(1, 2, 3)
    entry = lookup.insert(miss, {"step_2": z})
    hit = lookup.lookup("a red fox by a river", "K")
    assert hit.hit and hit.entry_id == entry and hit.prompt_matched == "a red fox in snow"
    assert torch.equal(hit.latents["step_2"], z) and torch.equal(lookup.store.load(entry)["step_2"], z)
    assert not lookup.lookup("a red fox in snow", "K").hit  # its own entry never serves a prompt
    assert not lookup.lookup("a red fox by a river", "other key").hit
    whole = lookup.with_config(mode="prompt", threshold=0.85)
    assert not whole.lookup("a red fox by a river", "K").hit  # entries are kept per lookup mode
    whole.insert(whole.lookup("a red fox in snow", "K"), {"chorus_z2": z})
    whole.similarity["prompt"] = 0.8
    below = whole.lookup("a red fox by a river", "K")
    assert not below.hit and below.matched == "a red fox in snow" and below.similarity == pytest.approx(0.8)
    lookup.similarity["prompt"] = 0.9  # views share the similarities
    assert whole.lookup("a red fox by a river", "K").hit and lookup.load(999) is None


def test_the_replay_lookup_takes_every_argument_the_pipeline_gives_a_cache_lookup(bench):
    import inspect

    from comfyui_chai.cache.lookup import CacheLookup

    for name in ("lookup", "insert", "record", "with_config"):
        want = list(inspect.signature(getattr(CacheLookup, name)).parameters)
        have = list(inspect.signature(getattr(bench.ReplayLookup, name)).parameters)
        assert want == have, (name, want, have)


def test_the_smoke_session_measures_every_part_through_the_pack(bench, tmp_path):
    assert bench.main(["--smoke", "--out", str(tmp_path), "--repeats", "1", "--budget-s", "1000"]) == 0  # a loaded CPU
    out = json.loads((tmp_path / "gpu_session.json").read_text())
    assert out["errors"] == [] and set(out["parts"]) == {"requests", "step", "loop"}
    assert out["info"]["latent"] == [4, 5, 16, 16] and out["info"]["replay_lookup"].startswith("timing-only")
    req = out["parts"]["requests"]
    med = req["medians_ms"]
    assert req["rounds"] == 1 and not req["from_warmup_round"] and req["failed"] == {}
    from comfyui_chai.pipeline.settings import ChorusSettings

    at_threshold = f"chorus_hit@{ChorusSettings().chorus_threshold:.2f}"  # the default map's two ends
    assert list(med) == ["miss", "full", "chai_hit", "plain8", at_threshold, "chorus_hit@1.00", "mixcache"]
    assert med["miss"]["steps"] == med["full"]["steps"] == 30 and not med["miss"]["hit"]
    assert med["miss"]["store_ms"] > 0 and med["full"]["store_ms"] == 0.0
    assert med["chai_hit"]["hit"] and med["chai_hit"]["steps"] == 8 and med["chai_hit"]["cache_kv_ms"] > 0
    assert med["plain8"]["steps"] == 8 and med["plain8"]["cache_kv_ms"] == 0.0
    low, high = med[at_threshold], med["chorus_hit@1.00"]
    assert low["served_by"] == high["served_by"] == "chorus" and low["details"]["new_words"] == ["birch"]
    assert low["details"]["k2"] < high["details"]["k2"]  # a closer donor follows its latents longer
    for hit in (low, high):  # every stride-th step of the 30 from K1 is a model call
        d = hit["details"]
        assert hit["steps"] == len(range(d["k1"], 30, d["stride"])) and d["stride"] > 1
    mix = med["mixcache"]["mixcache"]
    assert len(mix["map"]) == 30 and mix["full"] < 30 and mix["decision_ms"] > 0
    summary = req["summary"]
    committed = json.loads((REPO / "bench" / "results" / "cache_bench_lookup.json").read_text())
    lookup_p50 = committed["results"]["lookup"]["split_ms"]["total"]["p50"]
    assert summary["chai_hit"]["cpu_lookup_p50_ms"] == pytest.approx(lookup_p50, abs=1e-3)
    assert summary["chai_hit"]["hit_with_lookup_ms"] == pytest.approx(med["chai_hit"]["total_ms"] + lookup_p50, abs=1e-2)
    assert summary["ratios"]["full_over_chai_hit"] == pytest.approx(med["full"]["total_ms"] / med["chai_hit"]["total_ms"])
    assert summary["mixcache"]["computed_steps"] == mix["full"]
    assert out["parts"]["step"]["latency_ms"] > 0 and out["parts"]["step"]["tflop_per_step"] > 0
    loop = out["parts"]["loop"]["runs"]
    assert list(loop) == ["plain", "mixcache (defaults)", "mixcache, every step computed", "teacache (defaults)",
                          "forced step reuse", "forced block reuse", "forced CFG reuse"]
    assert loop["plain"]["map"] == loop["mixcache, every step computed"]["map"] == "F" * 30
    assert loop["forced step reuse"]["map"] == "FF" + "S" * 27 + "F"
    assert loop["forced block reuse"]["map"] == "FF" + "B" * 27 + "F"
    assert loop["forced CFG reuse"]["map"] == "FF" + "C" * 27 + "F"
    assert loop["forced step reuse"]["work_share"] == pytest.approx(3 / 30, abs=1e-3)
    md = (tmp_path / "gpu_session.md").read_text()
    assert "## Requests" in md and "## STDiT3 step" in md and "## Denoising loop alone" in md
    assert "cache_bench_lookup.json" in md and "chorus_hit@1.00: K1" in md


def test_a_spent_budget_and_a_failing_request_still_leave_what_was_measured(bench, tmp_path):
    missing = tmp_path / "no-such-lookup.json"
    rc = bench.main(["--smoke", "--out", str(tmp_path), "--budget-s", "1", "--chorus-similarity", "0.5",
                     "--skip-loop", "--lookup-json", str(missing)])
    assert rc == 1
    out = json.loads((tmp_path / "gpu_session.json").read_text())
    req = out["parts"]["requests"]
    assert req["rounds"] == 0 and req["from_warmup_round"]  # the warm-up round's figures, said so
    assert req["failed"]["chorus_hit@0.50"].startswith("expected a hit")  # below the threshold: a miss
    assert "chorus_hit@0.50" not in req["medians_ms"] and req["medians_ms"]["chai_hit"]["hit"]
    assert req["summary"]["chai_hit"]["cpu_lookup_p50_ms"] is None
    assert "step" in out["parts"] and "loop" not in out["parts"]
    assert any("no CPU lookup figure" in n for n in out["notes"])
    assert any(n.startswith("budget: 0 measured round(s)") for n in out["notes"])
    assert "FAILED" in (tmp_path / "gpu_session.md").read_text()
