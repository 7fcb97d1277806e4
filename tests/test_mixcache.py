"""Intra-request caching (opensora/mixcache.py, pipeline/mixcache.py): MixCache and the TeaCache baseline.

What must hold: with caching off the output is bit-identical to a plain run; warm-up, exact and final
steps always compute; the cap on consecutive reuse holds; a reused step calls no transformer block;
the CFG granularity runs the unconditional branch only on computed steps; a block step runs only the
front and back block pairs; a cached CHAI miss stores exactly the latents an uncached one stores;
hits keep their Cache Attention steps; stats, spec names and compatibility keys say what ran.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
import torch

from comfyui_chai.cache.backend import open_store
from comfyui_chai.cache.lookup import CacheLookup, LookupConfig
from comfyui_chai.opensora.hooks import HookError, HookRegistry
from comfyui_chai.opensora.mixcache import MixCache, MixCacheConfig, TeaCache, rel_l1
from comfyui_chai.opensora.rflow import current_step
from comfyui_chai.pipeline import ChaiPipeline, tiny_components
from comfyui_chai.pipeline import modes as M
from comfyui_chai.pipeline.mixcache import PRESETS, describe, preset_settings
from comfyui_chai.pipeline.settings import MixCacheSettings, resolve_settings
from test_request_path import DIM, CountingEmbedder, CountingExtractor

SIZE = dict(height=64, width=64, num_frames=17)
#: Thresholds no indicator reaches: every step the rule may approximate is approximated.
ALWAYS = dict(trigger_threshold=1e5, step_threshold=1e5, block_threshold=1e5, cfg_threshold=1e5,
              teacache_threshold=1e5)
PROMPT = "a red fox, snow"


@pytest.fixture(scope="module")
def parts():
    return tiny_components(0)


@pytest.fixture(scope="module")
def pipe(parts):
    model, _vae, captions = parts
    return ChaiPipeline(model, None, captions, None, size_dtype=torch.float32).with_settings({"full_steps": 12})


class BlockCalls:
    """Counts, per sampler step, the forward calls of every transformer block and the rows they saw."""

    def __init__(self, model):
        self.calls = defaultdict(list)  # step index -> [(kind, block index, rows)]
        self.handles = []
        for kind, blocks in (("spatial", model.spatial_blocks), ("temporal", model.temporal_blocks)):
            for i, block in enumerate(blocks):
                self.handles.append(block.register_forward_pre_hook(self._seen(kind, i)))

    def _seen(self, kind, index):
        def hook(module, args):
            step = current_step()
            self.calls[None if step is None else step.index].append((kind, index, int(args[0].shape[0])))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _run(pipe, hooks=(), seed=3, **overrides):
    return pipe.with_settings(overrides).generate(PROMPT, seed=seed, mode="full", hooks=hooks, decode=False, **SIZE)


# ------------------------------------------------------------------------------ off means off


def test_without_a_hook_the_output_is_bit_identical_to_a_plain_run(pipe):
    model = pipe.model
    # The sampler around the class's own forward, with nothing of the pack in between ("today's" path).
    y, mask = pipe.captions.encode(PROMPT)
    from comfyui_chai.opensora.rflow import make_noise

    plain = pipe.rflow.sample(lambda *a, **k: type(model).forward(model, *a, **k), make_noise((1, 4, 5, 8, 8), 3),
                              y=y, y_mask=mask, y_null=model.y_embedder.y_embedding, num_steps=12,
                              cfg_scale=pipe.settings.schedule.cfg_scale, size_dtype=torch.float32, **SIZE)
    off = _run(pipe, **ALWAYS)  # knobs set, no hook named: caching is off
    assert torch.equal(off.latent, plain[0]) and off.hook_reports == {}
    # A hook that computes every step (warm-up over the whole schedule) runs the block pairs in spans: same bits.
    for hook in ("mixcache", "teacache"):
        warm = _run(pipe, (hook,), warmup_steps=12, teacache_threshold=0.0)
        assert torch.equal(warm.latent, plain[0]), hook
        assert set(warm.hook_reports[hook]["map"]) == {"F"}
    assert model.hooks.names == [] and model._block_runner is None


# ------------------------------------------------------------------------------ what runs at each step


@pytest.mark.parametrize("granularities", [("step",), ("block",), ("cfg",)])
def test_warmup_final_and_cap_hold_and_each_granularity_runs_what_it_says(pipe, granularities):
    model = pipe.model
    depth = len(model.spatial_blocks)
    counter = BlockCalls(model)
    try:
        r = _run(pipe, ("mixcache",), warmup_steps=3, final_steps=2, max_reuse=2, granularities=granularities,
                 **ALWAYS)
    finally:
        counter.remove()
    report = r.hook_reports["mixcache"]
    records = report["records"]
    assert [rec["index"] for rec in records] == list(range(12)) and report["steps"] == 12
    kinds = [rec["kind"] for rec in records]
    # warm-up and final steps compute every pair on both CFG halves
    for i in (0, 1, 2, 10, 11):
        assert kinds[i] == "full" and records[i]["reason"] in ("warmup", "final")
        assert sorted(counter.calls[i]) == sorted([(k, b, 2) for k in ("spatial", "temporal") for b in range(depth)])
    # the cap: never more than max_reuse approximated steps in a row, and it is reached
    runs = [len(m) for m in re.findall(r"[SBC]+", report["map"])]
    assert runs and max(runs) == 2
    assert any(rec["reason"] == "cap" for rec in records)
    for i, kind in enumerate(kinds):
        calls = counter.calls[i]
        if kind == "step":  # no transformer block at all
            assert calls == []
        elif kind == "cfg":  # the conditional half only (1 row of the CFG batch of 2), every pair
            assert sorted(calls) == sorted([(k, b, 1) for k in ("spatial", "temporal") for b in range(depth)])
        elif kind == "block":  # block_front=1, block_back=0: pair 0 only, both halves
            assert sorted(calls) == [("spatial", 0, 2), ("temporal", 0, 2)]
        else:
            assert len(calls) == 2 * depth and all(rows == 2 for *_, rows in calls)
    assert set(kinds) - {"full"} == set(granularities)
    # the statistics say the same: counts per granularity, the reused block pairs, in the one-line summary
    (granularity,) = granularities
    assert report[granularity] == kinds.count(granularity) and report["full"] == kinds.count("full")
    assert report["reused_pairs"] == (f"1-{depth - 1}" if granularity == "block" else None)
    line = describe(report)
    assert line.startswith(f"mixcache: {report['full']}/12 steps computed")
    assert {"step": f"{report['step']} step-reused", "cfg": f"{report['cfg']} CFG",
            "block": f"{report['block']} block, pairs 1-{depth - 1} reused"}[granularity] in line
    # the unconditional branch runs only on steps computed in full (or probed for a block step)
    uncond_steps = {i for i, calls in counter.calls.items() if any(rows == 2 for *_, rows in calls)}
    assert uncond_steps == {i for i, k in enumerate(kinds) if k in ("full", "block")}
    assert report["work_share"] == pytest.approx(
        sum(len(counter.calls[i]) * (1 if k != "cfg" else 0.5) for i, k in enumerate(kinds)) / (12 * 2 * depth),
        abs=1e-4)


def test_the_hybrid_rule_picks_the_cheapest_granularity_whose_indicator_passes():
    from comfyui_chai.refmodel.model import default_model_dir

    ref = ChaiPipeline.reference(model_dir=default_model_dir()).with_settings({"full_steps": 10})
    model = ref.model
    assert len(model.spatial_blocks) == 3  # a block step (pair 0 of 3) costs 1/3, a CFG step 1/2

    def run(**knobs):
        counter = BlockCalls(model)
        try:
            r = ref.with_settings({**ALWAYS, "warmup_steps": 2, "final_steps": 1, "max_reuse": 2, **knobs}).generate(
                PROMPT, seed=1, mode="full", hooks=("mixcache",), decode=False, resolution=None)
        finally:
            counter.remove()
        return r.hook_reports["mixcache"], counter.calls

    report, _ = run()
    assert set(report["map"][2:9]) == {"S", "F"}  # step reuse is free: it wins whenever it passes
    report, calls = run(step_threshold=0.0)
    assert set(report["map"][2:9]) == {"B", "F"}  # then a block step, cheaper than a CFG one here
    report, calls = run(step_threshold=0.0, block_threshold=0.0)  # every probe fails: CFG from the probe on
    cfg_steps = [rec["index"] for rec in report["records"] if rec["kind"] == "cfg"]
    assert cfg_steps and set(report["map"][2:9]) == {"C", "F"}
    for i in cfg_steps:
        assert sorted(calls[i]) == sorted([("spatial", 0, 2), ("temporal", 0, 2)] +
                                          [(k, b, 1) for k in ("spatial", "temporal") for b in (1, 2)])
        assert report["records"][i]["probe"] is not None
    report, _ = run(step_threshold=0.0, block_threshold=0.0, cfg_threshold=0.0)
    assert set(report["map"]) == {"F"} and "probe" in {rec["reason"] for rec in report["records"]}


def test_the_trigger_and_the_thresholds_gate_reuse(pipe):
    never = _run(pipe, ("mixcache",), **{**ALWAYS, "trigger_threshold": 0.0})
    reasons = [rec["reason"] for rec in never.hook_reports["mixcache"]["records"]]
    assert set(never.hook_reports["mixcache"]["map"]) == {"F"} and "untriggered" in reasons
    strict = _run(pipe, ("mixcache",), trigger_threshold=1e5, step_threshold=0.0, block_threshold=0.0,
                  cfg_threshold=0.0)
    assert set(strict.hook_reports["mixcache"]["map"]) == {"F"}
    assert {rec["reason"] for rec in strict.hook_reports["mixcache"]["records"]} <= {"warmup", "final", "probe",
                                                                                      "indicator"}


def test_teacache_reuses_while_the_accumulated_change_stays_below_its_threshold(pipe):
    model = pipe.model
    counter = BlockCalls(model)
    try:
        r = _run(pipe, ("teacache",), teacache_threshold=0.05)
    finally:
        counter.remove()
    records = r.hook_reports["teacache"]["records"]
    assert records[0]["kind"] == records[-1]["kind"] == "full"  # first and last always compute
    assert records[0]["reason"] == "warmup" and records[-1]["reason"] == "final"
    for rec in records[1:-1]:
        if rec["kind"] == "step":
            assert rec["indicator"] < 0.05 and counter.calls[rec["index"]] == []
        else:
            assert rec["indicator"] >= 0.05
    always = _run(pipe, ("teacache",), teacache_threshold=1e5)
    assert always.hook_reports["teacache"]["map"] == "F" + "S" * 10 + "F"  # no cap in TeaCache's rule
    # Reuse changes the result, and only through the reused steps.
    assert not torch.equal(always.latent, _run(pipe).latent)


def test_the_step_indicator_is_the_measured_rate_times_the_input_change(pipe):
    r = _run(pipe, ("mixcache",), granularities=("step",), warmup_steps=2, max_reuse=1, **{
        k: v for k, v in ALWAYS.items() if k != "step_threshold"}, step_threshold=1e5)
    records = r.hook_reports["mixcache"]["records"]
    reused = [rec for rec in records if rec["kind"] == "step"]
    assert reused and all(rec["indicator"] > 0 for rec in reused)
    assert rel_l1(torch.ones(3), torch.ones(3)) == 0.0 and rel_l1(torch.full((2,), 3.0), torch.full((2,), 2.0)) == 0.5


# ------------------------------------------------------------------------------ with CHAI


@pytest.fixture
def chai(parts, tmp_path):
    model, _vae, captions = parts
    with open_store(tmp_path / "store", dim=DIM) as store:
        lookup = CacheLookup(store, CountingExtractor(), CountingEmbedder(), LookupConfig(threshold=0.8))
        yield ChaiPipeline(model, None, captions, lookup, size_dtype=torch.float32), store


def test_a_cached_miss_stores_exactly_what_an_uncached_miss_stores(chai):
    pipe, store = chai
    plain = pipe.generate(PROMPT, seed=5, decode=False, **SIZE)
    cached = pipe.with_settings({**ALWAYS, "warmup_steps": 1}).generate(PROMPT, seed=5, decode=False,
                                                                       hooks=("mixcache",), **SIZE)
    assert (plain.mode, cached.mode) == ("full", "full") and not cached.hit  # both misses: separate keys
    assert cached.compat_key == plain.compat_key + "|hooks=mixcache"
    a, b = store.load(plain.inserted_entry_id), store.load(cached.inserted_entry_id)
    assert set(a) == set(b) == {"step_2", "step_3", "step_4"}
    for name in a:
        assert torch.equal(a[name], b[name]), name
    report = cached.hook_reports["mixcache"]
    plan = store.entry(cached.inserted_entry_id).info["full_step_index"]
    last = max(plan.values())
    assert report["map"][:last] == "F" * last  # the steps before the last captured latent are exact
    assert {rec["reason"] for rec in report["records"][:last]} == {"exact"}
    assert set(report["map"][last:]) - {"F"}  # and after them it did cache
    assert not torch.equal(plain.latent, cached.latent)


def test_a_hit_keeps_its_cache_attention_steps_and_a_short_schedule_may_cache_after_them(chai):
    pipe, store = chai
    fast = pipe.with_settings({**ALWAYS, "warmup_steps": 1, "final_steps": 1, "fast_steps": 10})
    fast.generate(PROMPT, seed=5, decode=False, hooks=("mixcache",), **SIZE)  # miss: stored
    hit = fast.generate("red fox, river", seed=6, decode=False, hooks=("mixcache",), **SIZE)
    assert hit.hit and hit.steps == 10
    report = hit.hook_reports["mixcache"]
    assert report["map"][1:4] == "FFF" and {r["reason"] for r in report["records"][1:4]} == {"exact"}
    assert set(report["map"][4:9]) - {"F"}


# ------------------------------------------------------------------------------ names, specs, settings


def test_mode_specs_presets_and_hook_rules(pipe):
    spec = M.parse_mode_spec("mixcache")
    assert (spec.mode, spec.hooks, spec.overrides()) == ("full", ("mixcache",), {})
    assert M.parse_mode_spec("teacache20").overrides() == {"full_steps": 20}
    spec = M.parse_mode_spec("chai8+mixcache@step_threshold=0.2@granularities=step/cfg")
    assert (spec.mode, spec.hooks) == ("chai", ("mixcache",))
    assert spec.overrides() == {"fast_steps": 8, "step_threshold": 0.2, "granularities": ("step", "cfg")}
    for bad in ("mixcache@nope=1", "mixcache@step_threshold=high", "mixcache@step_threshold"):
        with pytest.raises(ValueError):
            M.parse_mode_spec(bad)
    assert M.keyed_hook_names(("mixcache", "other", "teacache")) == ("mixcache", "teacache")
    # presets are settings; balanced is the defaults
    assert preset_settings("mixcache", "balanced") == {} and set(PRESETS) == {"mixcache", "teacache"}
    for method, presets in PRESETS.items():
        for name, values in presets.items():
            resolve_settings(None, values)  # every preset is valid
    with pytest.raises(ValueError, match="preset"):
        preset_settings("mixcache", "turbo")
    # the two caches replace the same loop: never stacked
    model = pipe.model
    with HookRegistry.of(model).attached(MixCache(model)):
        with pytest.raises(HookError, match="teacache"):
            HookRegistry.of(model).attach(TeaCache(model))
    with pytest.raises(ValueError, match="unknown model hook"):
        pipe.generate(PROMPT, mode="full", hooks=("nocache",), decode=False, **SIZE)
    with pytest.raises(ValueError, match="max_reuse"):
        MixCacheConfig(max_reuse=0)
    with pytest.raises(TypeError, match="STDiT3"):
        HookRegistry.of(torch.nn.Linear(2, 2)).attach(MixCache(model))
    assert MixCacheSettings is MixCacheConfig


def test_statistics_reach_the_summary_and_one_line(pipe):
    r = _run(pipe, ("mixcache",), warmup_steps=2, max_reuse=2, **ALWAYS)
    summary = r.summary()
    assert summary["hooks"] == ["mixcache"]
    report = summary["hook_reports"]["mixcache"]
    n_full = report["map"].count("F")
    assert report["full"] == n_full and report["steps"] == 12
    assert report["computed_share"] == pytest.approx(n_full / 12, abs=1e-4)
    line = describe(report)
    assert line.startswith(f"mixcache: {n_full}/12 steps computed") and report["map"] in line
    assert describe(None) == ""
    # outside a sampler step the hook passes the call through untouched
    model = pipe.model
    x = torch.randn(2, 4, 5, 8, 8)
    y, mask = pipe.captions.encode(PROMPT)
    y2 = torch.cat([y, model.y_embedder.y_embedding[None, None]])
    with torch.no_grad():
        ref = model(x, torch.full((2,), 500.0), y2, mask=mask, fps=24, height=64, width=64)
        hook = MixCache(model, MixCacheConfig(**ALWAYS))
        with HookRegistry.of(model).attached(hook):
            out = model(x, torch.full((2,), 500.0), y2, mask=mask, fps=24, height=64, width=64)
    assert torch.equal(out, ref) and hook.records == []


# ------------------------------------------------------------------------------ interfaces


def test_command_line_flags_presets_and_report(tmp_path, monkeypatch):
    import json

    from comfyui_chai import cli
    from comfyui_chai.cache import embed as embed_mod
    from comfyui_chai.cache import entities as entities_mod

    def settings_of(*flags):
        args = cli.build_parser().parse_args(["generate", "--prompts", "p", "--out", "o", "--store", "s", *flags])
        return cli.generate_pipeline(args, None).settings.mixcache

    assert settings_of() == MixCacheSettings()
    fast = settings_of("--intra", "mixcache", "--intra-preset", "fast", "--max-reuse", "5", "--granularities", "step")
    assert fast == MixCacheSettings(**{**PRESETS["mixcache"]["fast"], "max_reuse": 5, "granularities": ("step",)})
    assert settings_of("--intra", "teacache", "--intra-preset", "quality").teacache_threshold == \
        PRESETS["teacache"]["quality"]["teacache_threshold"]

    monkeypatch.setattr(entities_mod, "EntityExtractor", CountingExtractor)
    monkeypatch.setattr(embed_mod, "Embedder", CountingEmbedder)
    (tmp_path / "p.txt").write_text("a red fox, snow\nred fox, a river\n")
    out = tmp_path / "out"
    assert cli.main(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--store",
                     str(tmp_path / "store"), "--model", "tiny", "--captions", "hashed", "--no-progress",
                     "--full-steps", "12", "--intra", "mixcache", "--warmup-steps", "2", "--trigger-threshold", "1e5",
                     "--step-threshold", "1e5"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["intra"] == "mixcache" and report["run"]["compat_key"].endswith("|hooks=mixcache")
    rows = report["prompts"]
    assert [r["hit"] for r in rows] == [False, True]
    maps = [r["hook_reports"]["mixcache"]["map"] for r in rows]
    assert len(maps[0]) == 12 and len(maps[1]) == 8 and "S" in maps[0]
    totals = report["totals"]["intra"]
    assert totals["steps"] == 20 and totals["computed_steps"] == sum(m.count("F") for m in maps)
    md = (out / "report.md").read_text()
    assert "**Intra-request caching** (mixcache)" in md and maps[0] in md and maps[1] in md


def test_comfyui_node_is_off_by_default_and_reaches_the_sampler_text_and_panel(tmp_path):
    from comfyui_chai.nodes import NODES, models, registry
    from comfyui_chai.nodes.comfy_v3 import node_info

    def node(node_id, *args, **kwargs):
        return NODES[node_id].execute(*args, **kwargs).args

    def sample(*args, **kwargs):  # the Sampler takes ComfyUI's lists whole: one prompt = one-element lists
        out = NODES["CHAI_Sampler"].execute(*[[a] for a in args], **{k: [v] for k, v in kwargs.items()})
        return {"result": tuple(values[0] for values in out.args), "ui": out.ui}

    spec = node_info(NODES["CHAI_IntraCacheSettings"])["input"]["required"]
    assert spec["method"][1]["default"] == "off" and spec["preset"][1]["default"] == "balanced"
    assert all(opts[1].get("tooltip") for opts in spec.values())
    assert node_info(NODES["CHAI_Sampler"])["input"]["optional"]["intra_cache"][0] == "CHAI_INTRA_CACHE"
    defaults = {name: opts[1]["default"] for name, opts in spec.items()}
    assert node("CHAI_IntraCacheSettings", **defaults) == ({"hook": None, "settings": {}},)
    built, = node("CHAI_IntraCacheSettings", **{**defaults, "method": "mixcache", "preset": "fast", "max_reuse": 5,
                                                 "granularities": "step+cfg"})
    assert built == {"hook": "mixcache", "settings": {**PRESETS["mixcache"]["fast"], "max_reuse": 5,
                                                      "granularities": ("step", "cfg")}}
    with pytest.raises(ValueError, match="^CHAI Intra-Request Cache: .*warmup_steps"):
        node("CHAI_IntraCacheSettings", **{**defaults, "method": "mixcache", "warmup_steps": 0})

    model, = node("CHAI_LoadSTDiT3", models.TINY)
    enc, = node("CHAI_LoadTextEncoder", models.TINY_HASHED)
    cond, = node("CHAI_TextEncode", enc, "a red fox, snow")
    small = dict(resolution="144p", aspect_ratio="9:16", num_frames=17, height=32, width=32, steps=12, fast_steps=4,
                 cfg=7.0)
    plain = sample(model, cond, 5, **small, mode="full")
    off = sample(model, cond, 5, **small, mode="full", intra_cache=node("CHAI_IntraCacheSettings", **defaults)[0])
    assert torch.equal(plain["result"][0]["samples"], off["result"][0]["samples"])
    on, = node("CHAI_IntraCacheSettings", **{**defaults, "method": "mixcache", "warmup_steps": 2,
                                              "trigger_threshold": 1e5, "step_threshold": 1e5})
    try:
        cache, = node("CHAI_Cache", str(tmp_path / "store"), 64, "lru", create_new=True)
        ents = node("CHAI_EntityExtractor", cond, "entity")[0]
        lookup = node("CHAI_CacheLookup", cache, ents, 0.72)[0]
        cached = sample(model, cond, 5, **small, mode="auto", lookup=lookup, intra_cache=on)
        report = cached["ui"]["chai_run"][0]["hook_reports"]["mixcache"]
        text = cached["result"][1]
        assert text.startswith("miss") and f"mixcache: {report['full']}/12 steps computed" in text
        assert report["map"] in cached["ui"]["text"][0]
        payload = cached["ui"]["chai_stats"][0]
        assert payload["steps"] == {"steps": 12, "computed": report["full"]} and report["full"] < 12
    finally:
        registry.close_all()


def test_short_schedules_below_min_steps_are_not_cached(pipe):
    short = _run(pipe, ("mixcache",), warmup_steps=1, min_steps=13, **ALWAYS)
    records = short.hook_reports["mixcache"]["records"]
    assert set(short.hook_reports["mixcache"]["map"]) == {"F"} and {r["reason"] for r in records} == {"short"}
    assert set(_run(pipe, ("mixcache",), warmup_steps=1, min_steps=12, **ALWAYS).hook_reports["mixcache"]["map"]) > {"F"}


def test_auto_reuse_with_mixcache_stores_what_it_stores_without_and_caches_inside_chorus_stage_three(parts, tmp_path):
    from test_chorus import CommaExtractor, WordBag

    model, _vae, captions = parts
    knobs = {"chorus_threshold": 0.6, "chorus_k1": (0.2, 0.4), "chorus_k2": (0.5, 0.7), "chorus_window": (0.2, 0.7),
             "chorus_stride": 1, **ALWAYS, "warmup_steps": 1, "final_steps": 1, "min_steps": 1}  # a long stage 3
    stored = {}
    for hooks in ((), ("mixcache",)):
        with open_store(tmp_path / f"store-{len(hooks)}", dim=WordBag.dim) as store:
            lookup = CacheLookup(store, CommaExtractor(), WordBag(), LookupConfig())
            pipe = ChaiPipeline(model, None, captions, lookup, size_dtype=torch.float32).with_settings(knobs)
            miss = pipe.generate("a red fox running in snow, pine forest", seed=1, mode="auto", hooks=hooks,
                                 decode=False, **SIZE)
            assert miss.served_by == "full" and len(miss.inserted_entry_ids) == 2
            stored[hooks] = {store.entry(i).compat_key: store.load(i) for i in miss.inserted_entry_ids}
            if not hooks:
                continue
            # The miss kept one trajectory for Chorus and CHAI: every step before its last captured latent
            # (the Chorus window ends at step 21 of 30) is exact; it caches after it.
            report = miss.hook_reports["mixcache"]
            assert report["map"][:21] == "F" * 21 and set(report["map"][21:]) - {"F"}
            near = pipe.generate("a red fox running in deep snow, pine forest", seed=2, mode="auto", hooks=hooks,
                                 decode=False, store=False, **SIZE)
            assert near.served_by == "chorus"
            report = near.hook_reports["mixcache"]
            stage3 = 30 - near.details["k2"]
            assert len(report["map"]) == near.steps > stage3  # one record per model call, stage 2 included
            assert set(report["map"][:-stage3]) == {"F"}  # stage 2: one-step segments over the region
            assert report["map"][-stage3] == "F" and "S" in report["map"][-stage3:]  # stage 3 caches after warm-up
    # the same tensors, under keys that name the hook (before the lookup's own part)
    plain = stored[()]
    cached = {key.replace("|hooks=mixcache|", "|"): tensors for key, tensors in stored[("mixcache",)].items()
              if "|hooks=mixcache|" in key}
    assert set(plain) == set(cached) and len(plain) == 2
    for key, tensors in plain.items():
        assert set(tensors) == set(cached[key]) and all(torch.equal(tensors[n], cached[key][n]) for n in tensors)
