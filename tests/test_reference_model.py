"""Reference model: checkpoint files, caption encoder, what training achieved, resumable training, and a
short version of the quality benchmark (full 30 steps vs CHAI 8 steps with Cache Attention)."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from comfyui_chai.refmodel import model as R
from comfyui_chai.refmodel import scenes
from comfyui_chai.pipeline.quality import run_quality
from comfyui_chai.refmodel.quality import heldout_prompts, warm_scene_for

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = R.default_model_dir()

# Short quality run: 16 held-out prompts served through the real entity lookup, like the benchmark
# (deterministic: fixed prompts, noise seeds and weights). 8 prompts were too few for a 0.05 tolerance:
# the step-22,000 checkpoint measured -0.051 on 8 prompts each served its own warm entry, -0.045 on the same
# 8 through the lookup and -0.033 on 16 through the lookup, against -0.046 on the 200-prompt benchmark. The
# current checkpoint measures -0.008 on these 16 (-0.014 on the 200).
N_QUALITY_PROMPTS = 16
# The target for the 200-prompt benchmark is 0.80, which the bundled checkpoint reaches (0.805,
# MODEL_CARD.md); it measures 0.864 on these 16 prompts (the stage-5 checkpoint before it 0.823, the
# step-22,000 one, which drew blobs, 0.773), far above the evaluator's chance level (0.161 for a coherent
# clip of the wrong scene). Raise the floor with every better checkpoint.
FULL_SCORE_FLOOR = 0.80
# The shapes are recognisable (0.748 on these prompts; 0.2 is chance for five shapes, and blobs of the right
# colour scored 0.25-0.32 before stage 5's loss weighting).
FULL_SHAPE_FLOOR = 0.6
CHAI_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def ref():
    return R.load_reference_model(MODEL_DIR)


def _train_module():
    spec = importlib.util.spec_from_file_location("train_reference", REPO_ROOT / "train" / "train_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checkpoint_files_and_config():
    w = MODEL_DIR / "model.safetensors"
    assert w.is_file() and w.stat().st_size <= 20 * 2**20
    cfg = R.read_model_config(MODEL_DIR)
    assert cfg["stdit3"]["in_channels"] == 3 and cfg["stdit3"]["caption_channels"] == 384
    assert cfg["stdit3"]["pred_sigma"] is False
    assert cfg["clip"] == {**cfg["clip"], "num_frames": 8, "height": 32, "width": 32}
    assert cfg["sampler"]["use_timestep_transform"] is False
    assert cfg["training"]["steps"] >= 1000 and cfg["training"]["elapsed_s"] > 0
    for f in ("MODEL_CARD.md", "loss.png"):
        assert (MODEL_DIR / f).is_file(), f


def test_loaded_model(ref):
    model, enc = ref
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert 1_000_000 < R.count_parameters(model.requires_grad_(True)) < 3_000_000
    model.requires_grad_(False)
    assert model.fingerprint.startswith("refmodel:") and len(model.fingerprint) == len("refmodel:") + 16
    assert tuple(model.y_embedder.y_embedding.shape) == (32, 384)
    assert enc.max_length == 32


def test_caption_encoder_shapes_padding_and_determinism(ref):
    _, enc = ref
    y, mask = enc(["a red circle moving left on green grass", "a star"])
    assert y.shape == (2, 1, 32, 384) and y.dtype == torch.float32
    assert mask.shape == (2, 32) and mask.dtype == torch.int64
    n0, n1 = int(mask[0].sum()), int(mask[1].sum())
    assert n0 > n1 >= 3  # [CLS] a star [SEP]
    assert torch.all(y[1, 0, n1:] == 0) and torch.all(y[1, 0, :n1].abs().sum(-1) > 0)
    y2, m2 = enc.encode("a star")
    assert torch.equal(m2[0], mask[1]) and torch.allclose(y2[0], y[1], atol=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        enc(["  "])
    with pytest.raises(ValueError, match="no prompts"):
        enc([])


def _rf_loss(model, enc, n=12, seed=5):
    items = heldout_prompts(n, seed=seed)
    x0 = R.pixels_to_model(np.stack([scenes.render(s) for s, _ in items]))
    y, mask = enc([c for _, c in items])
    g = torch.Generator().manual_seed(seed)
    s = torch.linspace(0.1, 0.9, n)
    eps = torch.randn(x0.shape, generator=g)
    sb = s[:, None, None, None, None]
    with torch.no_grad():
        v = model((1 - sb) * x0 + sb * eps, s * 1000, y, mask=mask, fps=24, height=32, width=32)
    return float(((v - (x0 - eps)) ** 2).mean()), v


def test_training_reduced_the_rectified_flow_loss(ref):
    model, enc = ref
    trained, _ = _rf_loss(model, enc)
    untrained, _ = _rf_loss(R.build_reference_model(seed=123).eval(), enc)
    assert trained < 0.35 * untrained, (trained, untrained)


def test_caption_steers_the_velocity(ref):
    """The conditional branch depends on the caption, and the null caption (CFG) differs from both."""
    model, enc = ref
    x = torch.randn((1,) + R.CLIP.shape, generator=torch.Generator().manual_seed(0))
    y, mask = enc(["a red square moving right on a black background", "a yellow star falling over sand"])
    null = model.y_embedder.y_embedding[None, None].expand(2, 1, 32, 384)
    t = torch.tensor([900.0, 900.0])
    with torch.no_grad():
        v = model(x.expand(2, -1, -1, -1, -1), t, y, mask=mask, fps=24, height=32, width=32)
        vn = model(x.expand(2, -1, -1, -1, -1), t, null, mask=mask, fps=24, height=32, width=32)
    diff_caps = float((v[0] - v[1]).abs().mean())
    assert diff_caps > 0.05
    assert float((v[0] - vn[0]).abs().mean()) > 0.02
    # Early in sampling the predicted clean clip's mean colour follows the caption: red vs yellow channel balance.
    x0_hat = x + 0.9 * v  # x_t = x0 + s * (eps - x0)  =>  x0 = x_t + s * v  (s = 0.9)
    red_first = float(x0_hat[0, 0].mean() - x0_hat[0, 1].mean())
    yellow_second = float(x0_hat[1, 1].mean() - x0_hat[1, 2].mean())
    assert yellow_second > 0.1  # sand and yellow: green well above blue
    assert red_first < yellow_second


def test_pixels_round_trip():
    v = scenes.render(scenes.make_scene("star", "red", "sand", "left", 0))
    x = R.pixels_to_model(v)
    assert x.shape == (1, 3, 8, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    np.testing.assert_array_equal(R.model_to_pixels(x)[0], v)
    with pytest.raises(ValueError, match="3"):
        R.pixels_to_model(np.zeros((8, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="model tensor"):
        R.model_to_pixels(torch.zeros(1, 4, 8, 32, 32))


def test_load_errors(tmp_path):
    with pytest.raises(R.ModelFilesError, match="config.json"):
        R.load_reference_model(tmp_path)
    shutil.copy(MODEL_DIR / "config.json", tmp_path / "config.json")
    with pytest.raises(R.ModelFilesError, match="model.safetensors"):
        R.load_reference_model(tmp_path)
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    cfg["stdit3"]["depth"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(MODEL_DIR / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(R.ModelFilesError, match="does not match"):
        R.load_reference_model(tmp_path)


def test_cache_attention_settings_come_from_the_model_config(tmp_path):
    """The bundled model's Cache Attention mode (concat) reaches the pipeline; a folder without the section
    gets the paper's defaults; an unknown key is refused with a message that lists the allowed ones."""
    from comfyui_chai.pipeline import ChaiPipeline

    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert R.cache_attention_settings(cfg) == {"mode": "concat"}
    assert ChaiPipeline.reference().config.mode == "concat"
    del cfg["cache_attention"]
    assert R.cache_attention_settings(cfg) == {}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(MODEL_DIR / "model.safetensors", tmp_path / "model.safetensors")
    assert ChaiPipeline.reference(model_dir=tmp_path).config.mode == "replace"
    assert R.cache_attention_settings({"cache_attention": {"cache_steps": [2, 3]}}) == {"cache_steps": (2, 3)}
    with pytest.raises(R.ModelFilesError, match="mode, branches"):
        R.cache_attention_settings({"cache_attention": {"strength": 0.5}})


def test_training_resume_is_exact(tmp_path):
    """Two steps in one go == one step, stop, resume for the second (same batches, noise, moments, EMA)."""
    tr = _train_module()
    common = ["--batch-size", "2", "--save-every", "1", "--no-progress", "--warmup", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert tr.main(["--steps", "2", "--state-dir", str(a), "--out-dir", str(a / "out")] + common) == 0
    assert tr.main(["--steps", "1", "--state-dir", str(b), "--out-dir", str(b / "out")] + common) == 0
    assert tr.main(["--steps", "2", "--state-dir", str(b), "--out-dir", str(b / "out")] + common) == 0
    from safetensors.torch import load_file

    sa, sb = load_file(str(a / "state.safetensors")), load_file(str(b / "state.safetensors"))
    assert sa.keys() == sb.keys() and any(k.startswith("optim.") for k in sa)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    la, lb = tr.read_log(a / "log.jsonl"), tr.read_log(b / "log.jsonl")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(la) == 2
    # The exported folder loads.
    m, _ = R.load_reference_model(a / "out")
    assert m.reference_config["training"]["steps"] == 2


def test_loss_weights_object_pixels_and_the_sigma_floor():
    """--object-weight weights the pixels at and next to the objects; --loss-sigma-floor caps low-noise weights."""
    tr = _train_module()
    vids, caps, objects = tr.batch_for_step(3, 2, 1, 0.0, 0.0, 0.0, with_objects=True)
    plain_vids, plain_caps = tr.batch_for_step(3, 2, 1, 0.0, 0.0, 0.0)
    assert np.array_equal(vids, plain_vids) and caps == plain_caps
    assert objects.shape == vids.shape[:4] and objects.dtype == np.float32
    g = np.random.default_rng([1, 3 * 2])  # the first clip's scene, as batch_for_step draws it
    spec = scenes.sample_scene(g, two_shape_prob=0.0, position_jitter=0.0, position_snap=0.0)
    cover = scenes.object_masks(spec).max(axis=0)
    inside, outside = cover >= 0.5, objects[0] == 0
    assert np.all(objects[0][inside] >= 0.5)
    # The ring one pixel outside the shape is included, pixels two away are not.
    ring = (objects[0] > 0) & (cover == 0)
    assert ring.any() and outside.any()
    ys, xs = np.nonzero(ring[0])
    near = cover[0][np.clip(ys[:, None] + [-1, 0, 1], 0, 31)[:, :, None], np.clip(xs[:, None] + [-1, 0, 1], 0, 31)[:, None, :]]
    assert np.all(near.reshape(len(ys), -1).max(axis=1) > 0)
    w = tr.pixel_weights(torch.from_numpy(objects), 4.0)
    assert w.shape == (2, 1) + objects.shape[1:] and abs(float(w.mean()) - 1.0) < 1e-5
    on, off = w[0, 0][torch.from_numpy(objects[0] == 1)], w[0, 0][torch.from_numpy(outside)]
    torch.testing.assert_close(on / off.mean(), torch.full_like(on, 5.0))
    assert torch.equal(tr.pixel_weights(torch.from_numpy(objects), 0.0), torch.ones_like(w))
    s = torch.tensor([0.01, 0.05, 0.1, 0.25, 0.5, 0.9])
    torch.testing.assert_close(tr.loss_sigma_factor(s, 0.05), torch.ones(6))
    # Floor 0.25: the clean-clip error weight is 1/max(s, 0.25)^2, i.e. the factor is (max(s, 0.05)/0.25)^2 below it.
    torch.testing.assert_close(tr.loss_sigma_factor(s, 0.25),
                               torch.tensor([0.04, 0.04, 0.16, 1.0, 1.0, 1.0]))


def test_warm_start_copies_all_and_reinitialises_patch_tensors_when_the_patch_differs():
    tr = _train_module()
    same, same_ema = R.build_reference_model(seed=6), R.build_reference_model(seed=6)
    info = tr.init_from(MODEL_DIR / "model.safetensors", same, same_ema)
    assert info["reinitialised"] == [] and info["source_step"] >= 1000
    shipped = R.load_reference_model(MODEL_DIR)[0].state_dict()
    for k, v in same_ema.state_dict().items():
        torch.testing.assert_close(v, shipped[k], rtol=0, atol=0, msg=k)
    other_cfg = {**R.REFERENCE_CONFIG, "patch_size": (2, 4, 4)}  # also 96 output rows: same shape, other meaning
    other = R.build_reference_model(other_cfg, seed=6)
    fresh = {k: v.clone() for k, v in other.state_dict().items()}
    info = tr.init_from(MODEL_DIR / "model.safetensors", other, R.build_reference_model(other_cfg, seed=6))
    assert set(info["reinitialised"]) == {"x_embedder.proj.weight", "x_embedder.proj.bias",
                                          "final_layer.linear.weight", "final_layer.linear.bias"}
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, fresh[k] if k in info["reinitialised"] else shipped[k], rtol=0, atol=0, msg=k)


def test_warm_prompt_shares_exactly_the_object():
    rng = np.random.default_rng(0)
    for spec, text in heldout_prompts(30):
        warm, _, shared = warm_scene_for(spec, text, rng)
        assert (warm.shapes[0], warm.colors[0]) == (spec.shapes[0], spec.colors[0])
        assert warm.background != spec.background and warm.motion != spec.motion
        assert shared == f"{spec.colors[0]} {spec.shapes[0]}"


def test_quality_short_full_floor_and_chai_close_to_full(ref, tmp_path):
    """Short version of bench/quality_bench.py: CHAI 8 steps (Cache Attention on another prompt's latents that
    share one entity) stays within 0.05 of the full 30-step mode, which clears the score floor (see
    FULL_SCORE_FLOOR: the issue's 0.80)."""
    model, enc = ref
    rep = run_quality(model, enc, heldout_prompts(N_QUALITY_PROMPTS), store_dir=str(tmp_path / "store"),
                      modes=("full30", "chai8"))
    assert rep.lookup_hits == {"chai8": N_QUALITY_PROMPTS}, rep.summary()
    full, chai = rep.modes["full30"].mean(), rep.modes["chai8"].mean()
    assert full >= FULL_SCORE_FLOOR, rep.summary()
    assert rep.modes["full30"].mean("shape") >= FULL_SHAPE_FLOOR, rep.summary()
    assert chai >= full - CHAI_TOLERANCE, rep.summary()
    # Cache Attention really ran: the clips differ from the full ones, and CHAI was faster.
    assert any(not np.array_equal(a, b) for a, b in zip(rep.modes["full30"].clips, rep.modes["chai8"].clips))
    assert rep.modes["chai8"].mean_latency_ms < rep.modes["full30"].mean_latency_ms


def test_full_mode_alone_runs_no_warm_prompts_and_scores_the_same(ref):
    """A CFG sweep asks for full30 only: no warm prompts, no lookup (no store needed), same clips."""
    model, enc = ref
    items = heldout_prompts(2)
    alone = run_quality(model, enc, items, modes=("full30",))
    assert alone.warm_prompts == [] and alone.lookup_hits == {} and list(alone.modes) == ["full30"]
    with_chai = run_quality(model, enc, items, lookup=False, modes=("full30", "chai8"))
    assert len(with_chai.warm_prompts) == 2
    for a, b in zip(alone.modes["full30"].clips, with_chai.modes["full30"].clips):
        np.testing.assert_array_equal(a, b)
