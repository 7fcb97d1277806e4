"""The quality harness (pipeline/quality.py, bench/quality_bench.py) drives requests through the request
path and the mode registry: a mode or hook registered elsewhere is measured by name, every evaluator
criterion is reported, and the command line takes --modes, --prompts, --seed and --out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from comfyui_chai.opensora.hooks import ModelHook
from comfyui_chai.pipeline import modes as M
from comfyui_chai.pipeline.quality import format_table, run_quality
from comfyui_chai.refmodel import evaluator
from comfyui_chai.refmodel import model as R
from comfyui_chai.refmodel.quality import heldout_prompts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ref():
    torch.set_num_threads(1)
    return R.load_reference_model(R.default_model_dir())


class HalfPlain(M.SamplingMode):
    """Plain sampling at half the fast schedule: a stand-in for a method registered after the harness."""

    name = "halfplain"

    def sample(self, request):
        steps = max(1, request.settings.schedule.fast_steps // 2)
        latent = request.rflow.sample(request.model, request.noise, num_steps=steps,
                                      cfg_scale=request.settings.schedule.cfg_scale, callback=request.callback,
                                      **request.sample_kwargs)
        return M.ModeOutput(latent=latent, steps=steps, label="halfplain")


class CountCalls(ModelHook):
    name = "countcalls"
    calls = 0

    def forward(self, call_next, *args, **kwargs):
        type(self).calls += 1
        return call_next(*args, **kwargs)


def test_registered_modes_and_hooks_plug_into_the_harness_by_name(ref, monkeypatch):
    model, enc = ref
    real = evaluator.evaluate

    class Grown:  # the result of an evaluator that grew a criterion
        def __init__(self, result):
            self.scores = {**result.scores, "sharpness": 0.25}

    def with_new_criterion(clip, prompt, reference=None):
        assert reference is not None  # the harness scores detail against the ground-truth render
        return Grown(real(clip, prompt, reference))

    monkeypatch.setattr(evaluator, "evaluate", with_new_criterion)
    M.register_mode(HalfPlain())
    M.register_model_hook("countcalls", lambda request: CountCalls())
    CountCalls.calls = 0
    try:
        items = heldout_prompts(1)
        rep = run_quality(model, enc, items, lookup=False, modes=("halfplain4", "plain2+countcalls", "chai4"))
    finally:
        M.unregister_mode("halfplain")
        M.unregister_model_hook("countcalls")
    assert list(rep.modes) == ["full30", "halfplain4", "plain2+countcalls", "chai4"]
    half, hooked, chai = rep.modes["halfplain4"], rep.modes["plain2+countcalls"], rep.modes["chai4"]
    assert (half.mode, half.steps, half.cached) == ("halfplain", 4, False)
    assert CountCalls.calls == 2  # one model call per step of plain2, the hook on for that request only
    assert hooked.steps == 2 and model.hooks.names == []
    assert (chai.steps, chai.cached, rep.lookup_hits) == (4, True, {"chai4": 1})
    # plain 2 steps through the harness is plain 2 steps through the pipeline's own mode
    assert not np.array_equal(half.clips[0], rep.modes["full30"].clips[0])
    summary = rep.summary()
    assert summary["modes"]["halfplain4"]["sharpness"] == 0.25 and "sharpness" in format_table(rep)
    assert summary["modes"]["chai4"]["lookup_hits"] == 1 and summary["modes"]["full30"]["speedup_vs_full"] == 1.0
    with pytest.raises(ValueError, match="unknown sampling mode"):
        run_quality(model, enc, items, lookup=False, modes=("halfplain4",))


def test_quality_bench_command_line(tmp_path):
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "bench" / "quality_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "q"
    assert bench.main(["--modes", "plain2,chai2", "--prompts", "2", "--seed", "123", "--out", str(out),
                       "--no-lookup"]) == 0
    data = json.loads((out / "quality_bench.json").read_text())
    assert list(data["modes"]) == ["full30", "plain2", "chai2"] and data["stream_seed"] == 123
    assert data["n_prompts"] == 2 and data["modes"]["chai2"]["lookup_hits"] == 2
    full, plain = data["modes"]["full30"], data["modes"]["plain2"]
    # fidelity: the reference is identical to itself; 2 steps differ from 30 from the same noise
    assert full["psnr_db_vs_full"] is None and full["ssim_vs_full"] == 1.0
    assert 10.0 < plain["psnr_db_vs_full"] < 80.0 and 0.0 < plain["ssim_vs_full"] < 1.0
    assert plain["frechet_vs_ground_truth"] >= 0.0 and "detail" in plain and plain["overall_se"] >= 0.0
    assert {"overall", "shape", "latency_ms", "speedup_vs_full", "delta_overall_vs_full"} <= set(data["modes"]["plain2"])
    assert (out / "quality_bench.png").read_bytes()[:4] == b"\x89PNG" and (out / "quality_samples.png").is_file()
    with pytest.raises(SystemExit):
        bench.main(["--modes", "turbo8", "--out", str(out)])
    with pytest.raises(SystemExit):
        bench.main(["--validation", "--seed", "3", "--out", str(out)])


def test_the_hermetic_pairing_lookup_finds_every_pair_among_hundreds(tmp_path):
    """Every test prompt is served its own warm prompt's entry (one-hot keys left HNSW a third of them)."""
    from comfyui_chai.cache.backend import open_store
    from comfyui_chai.cache.lookup import CacheLookup, LookupConfig
    from comfyui_chai.pipeline.quality import _PairKeys

    pairs = [(f"test prompt {i}", f"warm prompt {i}") for i in range(300)]
    keys = _PairKeys(pairs)
    with open_store(tmp_path / "store", dim=keys.dim) as store:
        lookup = CacheLookup(store, keys, keys, LookupConfig())
        ids = {}
        for i, (_test, warm) in enumerate(pairs):
            result = lookup.lookup(warm, "k", load=False)
            ids[i] = lookup.insert(result, {"step_2": torch.full((2,), float(i))}, {})
        for i, (test, _warm) in enumerate(pairs):
            result = lookup.lookup(test, "k")
            assert result.hit and result.entry_id == ids[i], i
