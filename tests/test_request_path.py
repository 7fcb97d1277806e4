"""The request path a newcomer extends: settings resolved once, sampling modes as plug-ins, model hooks
per request, one extraction and one embedding per request, one truth per prompt in a ComfyUI batch."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch

from comfyui_chai.cache.backend import open_store
from comfyui_chai.cache.lookup import CacheLookup, LookupConfig
from comfyui_chai.opensora.cache_attention import CacheAttentionConfig
from comfyui_chai.opensora.hooks import ModelHook
from comfyui_chai.pipeline import ChaiPipeline, tiny_components
from comfyui_chai.pipeline import modes as M
from comfyui_chai.pipeline.settings import (
    SETTING_FIELDS,
    AttentionSettings,
    ChorusSettings,
    LookupSettings,
    MixCacheSettings,
    RequestSettings,
    ScheduleSettings,
    compat_key,
    resolve_settings,
)

SIZE = dict(height=64, width=64, num_frames=17)
DIM = 32


class CountingExtractor:
    """Entities are the comma-separated parts; counts every extraction."""

    fingerprint = "comma-v1"
    calls = 0

    def __init__(self, mode="entity"):
        self.mode = mode

    def extract(self, prompt):
        type(self).calls += 1
        return [p.strip().lower() for p in prompt.split(",") if p.strip()]

    def normalize_prompt(self, prompt):
        return " ".join(prompt.lower().split())


class CountingEmbedder:
    """Bag of hashed words, L2-normalised; counts every encode call."""

    fingerprint = "wordbag-v1"
    dim = DIM
    calls = 0

    def encode(self, texts):
        type(self).calls += 1
        out = []
        for text in texts:
            v = np.zeros(DIM)
            for w in re.findall(r"\w+", text.lower()):
                rng = np.random.default_rng(int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little"))
                v += rng.standard_normal(DIM)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)


@pytest.fixture(scope="module")
def parts():
    return tiny_components(0)


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "store", dim=DIM) as s:
        yield s


# ------------------------------------------------------------------------------ settings


def test_settings_resolve_in_one_documented_order():
    plain = resolve_settings()
    assert plain == RequestSettings() and plain.schedule == ScheduleSettings()
    assert (plain.schedule.full_steps, plain.schedule.fast_steps, plain.schedule.cfg_scale) == (30, 8, 7.0)
    assert plain.attention == AttentionSettings() and plain.lookup == LookupSettings()
    # one name per knob, everywhere: CHAI's flat config, Chorus's own and the intra-request caches' (none shared)
    chai, chorus = set(CacheAttentionConfig().to_dict()), set(asdict(ChorusSettings()))
    mix = set(MixCacheSettings().to_dict())
    assert set(SETTING_FIELDS) == chai | chorus | mix
    assert not (chai & chorus or chai & mix or chorus & mix)
    model = {"cfg_scale": 1.5, "full_steps": 30, "mode": "concat"}
    # model defaults over built-ins; user layers over the model, later over earlier; None is "not given"
    s = resolve_settings(model, {"cfg_scale": 4.0, "fast_steps": None}, {"cfg_scale": 2.0, "branches": "both"})
    assert (s.schedule.cfg_scale, s.attention.mode, s.attention.branches, s.schedule.fast_steps) == \
        (2.0, "concat", "both", 8)
    assert resolve_settings(model).schedule.cfg_scale == 1.5
    # Cache steps nobody named follow a shorter fast schedule; named ones beyond it are an error.
    assert resolve_settings(model, {"fast_steps": 3}).attention.cache_steps == (2, 3)
    with pytest.raises(ValueError, match="cache_steps"):
        resolve_settings(model, {"fast_steps": 3, "cache_steps": (2, 3, 4)})
    with pytest.raises(ValueError, match="unknown CHAI setting 'cfg'"):
        resolve_settings(None, {"cfg": 3})
    with pytest.raises(ValueError, match="mode"):
        resolve_settings(None, {"mode": "add"})
    # Each part has its own fingerprint; only what changes stored tensors is in the store fingerprint.
    other = s.updated({"threshold": 0.9, "fusion": "per_entity"})
    assert other.lookup.fingerprint() != s.lookup.fingerprint() and other.schedule == s.schedule
    assert other.store_fingerprint() == s.store_fingerprint() and other.fingerprint() != s.fingerprint()
    assert s.updated({"capture_dtype": "float32"}).store_fingerprint() != s.store_fingerprint()
    # Intra-request cache knobs: their own part and fingerprint; a miss stores the same tensors under any of them.
    mix = s.updated({"step_threshold": 0.3, "granularities": "step"})
    assert mix.mixcache == MixCacheSettings(step_threshold=0.3, granularities=("step",))
    assert mix.store_fingerprint() == s.store_fingerprint() and mix.fingerprint() != s.fingerprint()
    assert mix.cache_attention_config() == s.cache_attention_config()
    with pytest.raises(ValueError, match="granularities"):
        resolve_settings(None, {"granularities": ("step", "tokens")})
    with pytest.raises(ValueError, match="warmup_steps"):
        resolve_settings(None, {"warmup_steps": 0})
    assert s.schedule.fingerprint() == "SCHED_N30_F8_G2_float16"
    assert s.attention.fingerprint() == "ATTN_C2-3-4_B0_concat_both"
    assert json.loads(json.dumps(s.to_dict()))["attention"]["cache_steps"] == [2, 3, 4]
    legacy = CacheAttentionConfig(fast_steps=10, mode="concat", threshold=0.8)
    assert RequestSettings.from_config(legacy).cache_attention_config() == legacy


def test_the_compatibility_key_is_built_in_one_place(parts, store):
    model, _vae, captions = parts
    lookup = CacheLookup(store, CountingExtractor(), CountingEmbedder(), LookupConfig(threshold=0.8))
    pipe = ChaiPipeline(model, None, captions, lookup, size_dtype=torch.float32)
    key = pipe.compat_key(64, 64, 17)
    assert key == compat_key(pipe.model_fingerprint, (4, 5, 8, 8), 64, 64, 17, torch.float32, pipe.settings)
    assert key.endswith("|64x64f17|float32|CHAI_F8_C2-3-4_N30_G7_float16")
    assert pipe.with_settings({"cfg_scale": 3.0}).compat_key(64, 64, 17) != key
    assert pipe.with_settings({"branches": "both"}).compat_key(64, 64, 17) == key


# ------------------------------------------------------------------------------ modes


class EveryOtherStep(M.SamplingMode):
    """A toy mode: half the fast schedule, no cache; proves a mode is one class and one registration."""

    name = "toyhalf"
    description = "half of fast_steps, no cache (a test mode)"

    def sample(self, request):
        steps = max(1, request.settings.schedule.fast_steps // 2)
        latent = request.rflow.sample(request.model, request.noise, num_steps=steps,
                                      cfg_scale=request.settings.schedule.cfg_scale, callback=request.callback,
                                      **request.sample_kwargs)
        return M.ModeOutput(latent=latent, steps=steps, label="toyhalf")


class Doubler(ModelHook):
    name = "doubler"

    def __init__(self):
        self.calls = 0

    def forward(self, call_next, *args, **kwargs):
        self.calls += 1
        return call_next(*args, **kwargs)


def test_a_new_mode_is_one_class_and_one_registration(parts, store, tmp_path):
    model, vae, captions = parts
    lookup = CacheLookup(store, CountingExtractor(), CountingEmbedder(), LookupConfig(threshold=0.8))
    pipe = ChaiPipeline(model, vae, captions, lookup, size_dtype=torch.float32)
    assert M.mode_names()[:4] == ["chai", "full", "plain", "warm"]
    with pytest.raises(ValueError, match="unknown sampling mode 'toyhalf'"):
        pipe.generate("a red fox, snow", mode="toyhalf", decode=False, **SIZE)
    M.register_mode(EveryOtherStep())
    seen = []
    M.register_model_hook("doubler", lambda request: seen.append(request.settings) or Doubler())
    try:
        assert "toyhalf" in M.mode_choices()
        with pytest.raises(ValueError, match="taken"):
            M.register_mode(EveryOtherStep())
        progress = []
        r = pipe.generate("a red fox, snow", mode="toyhalf", decode=False, progress=lambda d, t: progress.append(t),
                          **SIZE)
        assert (r.mode, r.steps, r.sampling_mode, r.hit, r.lookup) == ("toyhalf", 4, "toyhalf", False, None)
        assert progress == [4] * 4 and len(store) == 0  # nothing looked up or stored
        # The same through the command line's --mode and the ComfyUI node's list.
        from comfyui_chai.cli import build_parser
        from comfyui_chai.nodes import NODES
        from comfyui_chai.nodes.comfy_v3 import node_info

        args = build_parser().parse_args(["generate", "--prompts", "p", "--out", "o", "--store", "s", "--mode", "toyhalf"])
        assert args.mode == "toyhalf"
        node_modes = node_info(NODES["CHAI_Sampler"])["input"]["required"]["mode"][1]["options"]
        assert {"chai", "full", "plain", "warm", "toyhalf", "auto", "plain_fast"} <= set(node_modes)
        # Mode specs: a step count sets the mode's own schedule field; +hook attaches a registered hook.
        spec = M.parse_mode_spec("toyhalf6+doubler")
        assert (spec.mode, spec.steps, spec.hooks, spec.overrides()) == ("toyhalf", 6, ("doubler",), {"fast_steps": 6})
        assert M.parse_mode_spec("full20").overrides() == {"full_steps": 20}
        assert M.parse_mode_spec("auto").mode == "auto"  # auto reuse; no longer CHAI's old name
        assert M.parse_mode_spec("plain_fast4").mode == "plain" and M.parse_mode_spec("plain_fast4").steps == 4
        hooked = pipe.with_settings(spec.overrides()).generate("a red fox, snow", mode=spec.mode, hooks=spec.hooks,
                                                                decode=False, **SIZE)
        assert hooked.steps == 3 and len(seen) == 1 and seen[0].schedule.fast_steps == 6
        assert model.hooks.names == []  # the request's hook came off again
        for bad in ("turbo8", "chai8+nohook", "", "chai0"):
            with pytest.raises(ValueError):
                M.parse_mode_spec(bad)
    finally:
        M.unregister_mode("toyhalf")
        M.unregister_model_hook("doubler")
    assert "toyhalf" not in M.mode_choices()


def test_builtin_modes_keep_their_behaviour(parts, store):
    model, _vae, captions = parts
    lookup = CacheLookup(store, CountingExtractor(), CountingEmbedder(), LookupConfig(threshold=0.8))
    pipe = ChaiPipeline(model, None, captions, lookup, size_dtype=torch.float32)
    miss = pipe.generate("a red fox, snow", seed=1, decode=False, **SIZE)
    assert (miss.sampling_mode, miss.mode, miss.inserted_entry_id) == ("chai", "full", 1)
    full = pipe.generate("a red fox, snow", seed=1, mode="full", decode=False, **SIZE)
    assert torch.equal(full.latent, miss.latent) and full.inserted_entry_id is None  # the same trajectory
    hit = pipe.generate("red fox, river", seed=2, mode="chai", decode=False, **SIZE)
    assert hit.hit and hit.sampling_mode == "chai" and hit.inserted_entry_id is None
    # warm stores even when the store already holds a match (it fills a store ahead of a batch)
    warm = pipe.generate("red fox, meadow", seed=3, mode="warm", decode=False, **SIZE)
    assert warm.lookup.hit and warm.lookup.latents is None and warm.lookup.matched == "a red fox"  # found, not loaded
    assert not warm.hit and warm.inserted_entry_id == 2 and warm.mode == "full" and len(store) == 2


# ------------------------------------------------------------------------------ one extraction, one embedding


def test_a_request_extracts_and_embeds_once(parts, store):
    model, _vae, captions = parts
    CountingExtractor.calls = CountingEmbedder.calls = 0
    lookup = CacheLookup(store, CountingExtractor(), CountingEmbedder(), LookupConfig(threshold=0.8))
    pipe = ChaiPipeline(model, None, captions, lookup, size_dtype=torch.float32)
    pipe.generate("a red fox, snow", decode=False, **SIZE)  # a miss, stored: lookup + insert
    assert (CountingExtractor.calls, CountingEmbedder.calls) == (1, 1)
    query = pipe.query("red fox, river")  # made once (e.g. by the Cache Lookup node) ...
    lookup.preview(query)
    hit = pipe.generate("red fox, river", decode=False, query=query, **SIZE)  # ... and reused
    assert hit.hit and (CountingExtractor.calls, CountingEmbedder.calls) == (2, 2)
    assert hit.lookup.timings.extract_ms == 0.0 and hit.lookup.timings.embed_ms == 0.0
    with pytest.raises(ValueError, match="another prompt"):
        pipe.generate("a blue whale", decode=False, query=query, **SIZE)


def _tiny_nodes(monkeypatch):
    from comfyui_chai.nodes import models, registry

    monkeypatch.setattr(registry, "_EXTRACTORS", {"entity": CountingExtractor()})
    monkeypatch.setattr(registry, "_EMBEDDERS", {"default": CountingEmbedder()})
    model, = _node("CHAI_LoadSTDiT3", models.TINY)["result"]
    enc, = _node("CHAI_LoadTextEncoder", models.TINY_HASHED)["result"]
    return registry, model, enc


def _node(node_id, *args, **kwargs):
    """A CHAI node's ``execute`` called directly: ``{"result": outputs, "ui": display data or None}``."""
    from comfyui_chai.nodes import NODES

    out = NODES[node_id].execute(*args, **kwargs)
    return {"result": tuple(out.args), "ui": out.ui}


def _sample(*args, **kwargs):
    """The CHAI Sampler on one prompt (it takes ComfyUI's lists whole), its outputs unwrapped."""
    out = _node("CHAI_Sampler", *[[a] for a in args], **{k: [v] for k, v in kwargs.items()})
    return {"result": tuple(values[0] for values in out["result"]), "ui": out["ui"]}


SMALL = dict(resolution="144p", aspect_ratio="9:16", num_frames=17, height=32, width=32, steps=6, fast_steps=4, cfg=7.0)


def test_comfyui_request_extracts_once_embeds_once_and_the_lookup_never_contradicts_the_sampler(tmp_path,
                                                                                                  monkeypatch):
    """A batch the way ComfyUI runs lists: every node runs for every prompt before the next node. The
    Entity Extractor extracts once per prompt, the Cache Lookup embeds once, the Sampler reuses both; the
    Lookup node shows a preview that names the Sampler as the judge, and the Sampler names its verdict
    per prompt (hit or miss, matched entity, similarity, steps, ms)."""
    registry, model, enc = _tiny_nodes(monkeypatch)
    CountingExtractor.calls = CountingEmbedder.calls = 0
    try:
        cache, = _node("CHAI_Cache", str(tmp_path / "store"), 64, "lru", create_new=True)["result"]
        prompts = ["a red fox, deep snow", "red fox, a river", "a blue whale, open sea"]
        conds = [_node("CHAI_TextEncode", enc, p)["result"][0] for p in prompts]
        ents = [_node("CHAI_EntityExtractor", c, "entity")["result"][0] for c in conds]
        looks = [_node("CHAI_CacheLookup", cache, e, 0.72) for e in ents]
        assert (CountingExtractor.calls, CountingEmbedder.calls) == (3, 3)
        texts = [lk["ui"]["text"][0] for lk in looks]
        assert all(t.startswith("preview: nothing comparable stored yet") and "CHAI Sampler decides" in t
                   for t in texts)
        assert not any(re.search(r"\b(hit|miss)\b:", t) for t in texts)  # no verdict a sampler could contradict
        reports = []
        for cond, lk in zip(conds, looks):
            out = _sample(model, cond, 3, **SMALL, mode="chai", store_on_miss=True, lookup=lk["result"][0])
            reports.append(out["result"][1])
        assert (CountingExtractor.calls, CountingEmbedder.calls) == (3, 3)  # the sampler reused the queries
        assert reports[0].startswith("miss") and "stored as entry #1" in reports[0]
        assert re.match(r"hit: served by chai \(entity 'red fox' ~ 'a red fox' 0\.\d{3} >= 0\.72\), entry #1 -> 4 steps",
                        reports[1])
        assert re.match(r"miss \(entity '[a-z ]+' ~ '[a-z ]+' 0\.\d{3} < 0\.72\) -> full mode", reports[2])
        for prompt, report in zip(prompts, reports):
            assert f'prompt "{prompt}"' in report and re.search(r"total \d+ ms", report)
        # a Lookup node run now (the store holds the fox) previews the match, still naming the sampler
        again = _node("CHAI_CacheLookup", cache, ents[1], 0.72)
        assert re.match(r"preview: 'red fox' ~ 'a red fox' similarity 0\.\d{3}, above", again["ui"]["text"][0])
        assert again["result"][1] is True
    finally:
        registry.close_all()


def test_the_models_cfg_reaches_the_comfyui_sampler(tmp_path, monkeypatch):
    """cfg 0 and steps 0 on the Sampler mean the model's own (its config.json); a number given wins."""
    _registry, _model, _enc = _tiny_nodes(monkeypatch)
    from comfyui_chai.nodes import NODES
    from comfyui_chai.nodes.comfy_v3 import node_info
    from comfyui_chai.nodes.models import bundled_models
    from comfyui_chai.pipeline import ChaiPipeline as Pipe

    name = next(n for n, f in bundled_models().items() if f.name == "reference_v1")
    model, = _node("CHAI_LoadSTDiT3", name)["result"]
    enc, = _node("CHAI_LoadTextEncoder", name)["result"]
    cond = _node("CHAI_TextEncode", enc, "a red circle sliding left on a black background")["result"][0]
    used = []
    real = Pipe.generate

    def spy(self, *args, **kwargs):
        used.append(self.settings)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Pipe, "generate", spy)
    spec = node_info(NODES["CHAI_Sampler"])["input"]["required"]
    assert spec["cfg"][1]["default"] == 0.0 and spec["steps"][1]["default"] == 0
    _sample(model, cond, 1, "144p", "9:16", 0, 0, 0, 0, 2, 0.0, "plain")
    _sample(model, cond, 1, "144p", "9:16", 0, 0, 0, 0, 2, 4.0, "plain")
    config = json.loads((bundled_models()[name] / "config.json").read_text())
    assert used[0].schedule.cfg_scale == config["sampler"]["cfg_scale"] != 7.0
    assert used[0].schedule.full_steps == config["sampler"]["num_sampling_steps"]
    assert used[0].attention.mode == config["cache_attention"]["mode"]
    assert used[1].schedule.cfg_scale == 4.0  # the node's number wins over the model's
