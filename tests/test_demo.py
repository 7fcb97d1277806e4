"""The newcomer's path: ``python -m comfyui_chai demo`` (cli/demo.py), ``generate --model reference``, the
pixel-space ``ChaiPipeline.reference()``, and the errors ``ChaiPipeline.from_files`` gives for missing or
wrong OpenSora 1.2 weight files."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from comfyui_chai import cli
from comfyui_chai.cli.demo import DEMO_PROMPTS, run_demo, upscale_frames
from comfyui_chai.pipeline import ChaiPipeline, tiny_components

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "reference_v1"
LIMIT = 4  # prompts 0 and 2 miss, 1 and 3 hit ("red circle", "yellow star") on a fresh store
FULL, FAST = 12, 4  # shorter schedules than the demo's 30 / 8 keep this file fast; the code path is the same
STEPS = ["--full-steps", str(FULL), "--fast-steps", str(FAST)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A private copy of the bundled reference model, so a checkpoint replaced mid-test cannot change the
    cache key between the two demo runs."""
    if not (BUNDLED / "model.safetensors").is_file() or not (BUNDLED / "config.json").is_file():
        pytest.skip(f"the bundled reference model is not in this checkout ({BUNDLED})")
    d = tmp_path_factory.mktemp("reference_v1")
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(BUNDLED / name, d / name)
    return d


def _png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def _video_info(path: Path):
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), frames[0].shape


@pytest.fixture(scope="module")
def demo_runs(model_dir, tmp_path_factory):
    """The CLI demo twice on one store (--limit 4): returns (first report.json, second report.json, out, stdout)."""
    base = tmp_path_factory.mktemp("demo")
    store = base / "store"
    out1, out2 = base / "run1", base / "run2"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--limit", str(LIMIT), "--out", str(out1), "--store", str(store), "--model-dir",
                       str(model_dir), "--no-progress", *STEPS])
    assert rc == 0
    first = json.loads((out1 / "report.json").read_text())
    second = run_demo(out2, store, limit=LIMIT, model_dir=model_dir, full_steps=FULL, fast_steps=FAST, progress=False,
                      echo=lambda s: None).to_json()
    assert json.loads((out2 / "report.json").read_text())["totals"] == json.loads(json.dumps(second["totals"]))
    return first, json.loads((out2 / "report.json").read_text()), out1, buf.getvalue()


def test_demo_writes_videos_contact_sheet_and_report(demo_runs):
    first, _, out, stdout = demo_runs
    rows = first["prompts"]
    assert [r["prompt"] for r in rows] == list(DEMO_PROMPTS[:LIMIT])
    for r in rows:
        for rel in (r["video"], r["full"]["video"]):
            n, shape = _video_info(out / rel)
            assert n == 8 and shape == (256, 256, 3)  # 8 frames of 32x32, 8x nearest-neighbour
    assert len(list(out.glob("[0-9][0-9]_*.mp4"))) == LIMIT
    assert first["files"]["contact_sheet"] == "contact_sheet.png"
    w, h = _png_size(out / "contact_sheet.png")
    assert w > 1000 and h > 300
    md = (out / "report.md").read_text()
    assert "hit rate" in md and "speed-up against all-full" in md and "contact_sheet.png" in md
    for r in rows:
        assert r["prompt"] in md
    # the printed summary and the hint for a second run
    assert "hit rate" in stdout and "speed-up" in stdout and "run the same command again" in stdout


def test_demo_rows_hold_the_per_prompt_fields_and_follow_chai(demo_runs):
    first, _, _, _ = demo_runs
    rows = first["prompts"]
    assert [r["hit"] for r in rows] == [False, True, False, True]
    split = {"lookup_ms", "text_ms", "denoise_ms", "cache_kv_ms", "decode_ms", "store_ms", "total_ms"}
    for i, r in enumerate(rows):
        assert r["index"] == i and r["seed"] == 42 + i
        assert set(r["timings_ms"]) == split and set(r["full"]["timings_ms"]) == split
        assert set(r["scores"]) == {"overall", "shape", "color", "background", "motion", "temporal"}
        assert 0.0 <= r["score"] <= 1.0 and r["score"] == r["scores"]["overall"]
        assert r["full"]["steps"] == FULL and r["full"]["timings_ms"]["lookup_ms"] == 0.0
        if r["hit"]:
            assert r["mode"] == "fast" and r["steps"] == FAST and r["inserted_entry_id"] is None
            assert r["similarity"] >= first["run"]["threshold"] and r["entity"] and r["matched"]
            assert r["timings_ms"]["cache_kv_ms"] > 0 and r["timings_ms"]["store_ms"] == 0.0
        else:
            assert r["mode"] == "full" and r["steps"] == FULL and r["inserted_entry_id"] is not None
            # a miss is the full run with capture: same seed, same schedule -> the very same clip
            assert r["score"] == r["full"]["score"] and r["scores"] == r["full"]["scores"]
    # each hit names the batch prompt whose full run made the entry it used
    assert rows[1]["source_index"] == 0 and rows[1]["matched"] == "red circle"
    assert rows[3]["source_index"] == 2 and rows[3]["matched"] == "yellow star"
    assert first["totals"]["contact_sheet_prompt"] == 1


def test_demo_totals_are_consistent(demo_runs):
    first, _, _, _ = demo_runs
    rows, t = first["prompts"], first["totals"]
    n = len(rows)
    hits = sum(r["hit"] for r in rows)
    chai = [r["timings_ms"]["total_ms"] for r in rows]
    full = [r["full"]["timings_ms"]["total_ms"] for r in rows]
    assert t["prompts"] == n and t["hits"] == hits and t["misses"] == n - hits
    assert t["hit_rate"] == pytest.approx(hits / n)
    assert t["mean_latency_ms"] == pytest.approx(sum(chai) / n, rel=1e-6)
    assert t["mean_full_latency_ms"] == pytest.approx(sum(full) / n, rel=1e-6)
    assert t["speedup_vs_all_full"] == pytest.approx(sum(full) / sum(chai), rel=1e-6)
    assert t["speedup_vs_all_full"] > 1.0  # FAST steps instead of FULL on half the prompts, measured
    mean_chai = sum(r["score"] for r in rows) / n
    mean_full = sum(r["full"]["score"] for r in rows) / n
    assert t["mean_score_chai"] == pytest.approx(mean_chai) and t["mean_score_all_full"] == pytest.approx(mean_full)
    assert t["quality_difference"] == pytest.approx(mean_chai - mean_full)
    assert t["cache"]["inserts"] == n - hits and t["cache"]["entries"] == n - hits and t["cache"]["evictions"] == 0
    raw = 3 * (3 * 8 * 32 * 32) * 2  # an entry: 3 fp16 latents of 3x8x32x32, plus its safetensors header
    assert (n - hits) * raw < t["cache"]["bytes"] < (n - hits) * (raw + 4096)
    assert first["run"]["fresh_store"] is True and first["run"]["height"] == 32 and first["run"]["num_frames"] == 8
    assert first["run"]["full_steps"] == FULL and first["run"]["fast_steps"] == FAST


def test_second_run_on_the_same_store_hits_more(demo_runs):
    first, second, _, _ = demo_runs
    assert second["run"]["fresh_store"] is False
    assert second["totals"]["hit_rate"] >= first["totals"]["hit_rate"]
    # every prompt's entities were stored by the first run's misses, so nothing misses now
    assert second["totals"]["hits"] == LIMIT and second["totals"]["cache"]["inserts"] == 0
    assert second["totals"]["cache"]["entries"] == first["totals"]["cache"]["entries"]
    # the misses of the first run now hit the entries they stored themselves
    assert all(r["matched"] for r in second["prompts"])
    # the full-mode twins are the same prompts and seeds on the same weights: the same clips as in run 1
    assert [r["full"]["scores"] for r in second["prompts"]] == [r["full"]["scores"] for r in first["prompts"]]


def test_demo_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="limit"):
        run_demo(tmp_path / "o", limit=0, progress=False)
    with pytest.raises(ValueError, match="scale and fps"):
        run_demo(tmp_path / "o", scale=0, progress=False)
    with pytest.raises(ValueError):  # the evaluator cannot read it: refused before any model work
        run_demo(tmp_path / "o", prompts=["a dog running on a beach"], progress=False)


def test_demo_parser_defaults():
    args = cli.build_parser().parse_args(["demo"])
    assert args.out == "out/demo" and args.store is None and args.limit is None and args.seed == 42
    assert args.full_steps is None and args.fast_steps == 8  # None: the model's 30
    assert len(DEMO_PROMPTS) == 12 and len(set(DEMO_PROMPTS)) == 12


def test_upscale_frames_is_nearest_neighbour():
    frames = torch.arange(2 * 2 * 3 * 3, dtype=torch.uint8).reshape(2, 2, 3, 3)
    up = upscale_frames(frames, 3)
    assert up.shape == (2, 6, 9, 3) and up.dtype == torch.uint8
    assert torch.equal(up[:, ::3, ::3], frames) and torch.equal(up[:, 2::3, 2::3], frames)
    assert torch.equal(up[1, 4, 7], frames[1, 1, 2])
    with pytest.raises(ValueError):
        upscale_frames(frames, 0)


def test_reference_pipeline_is_pixel_space(model_dir):
    pipe = ChaiPipeline.reference(model_dir=model_dir)
    assert pipe.pixel_space and pipe.vae is None and pipe.size_dtype == torch.float32
    assert pipe.resolve_size("240p", "9:16", None, None, None) == (32, 32, 8)  # native size, model default frames
    assert pipe.latent_shape(32, 32, 8) == (3, 8, 32, 32)
    assert pipe.resolve_size(None, "", 64, 48, 4) == (64, 48, 4)  # other sizes: multiples of the 2x2 patch
    with pytest.raises(ValueError, match="patch size"):
        pipe.resolve_size(None, "", 31, 32, 8)
    assert pipe.model_fingerprint.startswith("refmodel:") and "minilm-l6-v2-states" in pipe.model_fingerprint
    r = pipe.generate("a red circle sliding left on a black background", seed=3, mode="plain_fast")
    assert r.frames.shape == (8, 32, 32, 3) and r.latent.shape == (3, 8, 32, 32)
    # no VAE: the frames are the sample mapped from [-1, 1] to [0, 1]
    assert torch.allclose(r.frames, ((r.latent.clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0))


def test_generate_with_the_reference_model(model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle sliding left on a black background\na red circle rising against a sunset sky\n")
    out = tmp_path / "out"
    rc = cli.main(["generate", "--prompts", str(prompts), "--model", "reference", str(model_dir), "--out", str(out),
                   "--store", str(tmp_path / "store"), "--budget-mb", "100", "--no-progress", *STEPS])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["height"] == 32 and report["run"]["width"] == 32 and report["run"]["num_frames"] == 8
    assert [p["hit"] for p in report["prompts"]] == [False, True]
    assert [p["steps"] for p in report["prompts"]] == [FULL, FAST]
    cache = report["totals"]["cache"]
    assert cache["entries"] == 1 and cache["inserts"] == 1 and cache["evictions"] == 0
    assert cache["budget_bytes"] == 100 << 20 and 3 * 3 * 8 * 32 * 32 * 2 < cache["bytes"] < 3 * 3 * 8 * 32 * 32 * 2 + 4096
    n, shape = _video_info(out / report["prompts"][0]["video"])
    assert n == 8 and shape == (32, 32, 3)
    assert "Store after the run: 1 entries" in (out / "report.md").read_text()


def test_reference_settings_reach_generate_and_the_node_model(model_dir, tmp_path):
    """generate --model reference and the node loader use the folder's CFG and Cache Attention mode; a flag
    given on the command line wins; other models keep OpenSora's defaults (CFG 7, replace)."""
    from comfyui_chai.nodes import models as node_models

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["sampler"]["cfg_scale"], cfg["cache_attention"] = 2.5, {"mode": "concat"}
    (model_dir / "config.json").write_text(json.dumps(cfg))

    def config_of(*flags):
        args = cli.build_parser().parse_args([
            "generate", "--prompts", "p.txt", "--out", str(tmp_path), "--store", str(tmp_path / "s"), *flags])
        return cli.generate_pipeline(args, None).config

    ref = config_of("--model", "reference", str(model_dir))
    assert (ref.mode, ref.cfg_scale) == ("concat", 2.5)
    flagged = config_of("--model", "reference", str(model_dir), "--attention-mode", "replace", "--cfg-scale", "4")
    assert (flagged.mode, flagged.cfg_scale) == ("replace", 4.0)
    tiny = config_of("--model", "tiny")
    assert (tiny.mode, tiny.cfg_scale) == ("replace", 7.0)
    # Every knob the folder may set reaches generate, not only CFG and the K/V mode.
    cfg["cache_attention"] = {"mode": "concat", "cache_steps": [2, 3], "branches": "both"}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    ref = config_of("--model", "reference", str(model_dir))
    assert (ref.cache_steps, ref.branches, ref.fast_steps, ref.full_steps) == ((2, 3), "both", 8, 30)
    assert config_of("--model", "reference", str(model_dir), "--cache-steps").cache_steps == ()
    assert (tiny.cache_steps, tiny.branches) == ((2, 3, 4), "cond")
    folder = node_models.bundled_models()
    name = next(n for n, f in folder.items() if f.name == "reference_v1")
    assert node_models.load_stdit3(name).cache_attention == {"mode": "concat"}


def test_from_files_errors_name_the_file_and_what_to_do(tmp_path):
    from safetensors.torch import save_file

    from comfyui_chai.opensora.loading import CheckpointFormatError, StateDictMismatchError

    _, vae, _ = tiny_components(0)
    vae_file = tmp_path / "OpenSora-VAE-v1.2.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vae_file))
    t5_dir = tmp_path / "t5"
    t5_dir.mkdir()
    missing = tmp_path / "OpenSora-STDiT-v3.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        ChaiPipeline.from_files(missing, vae_file, t5_dir)
    msg = str(err.value)
    assert str(missing) in msg and "hpcai-tech/OpenSora-STDiT-v3" in msg and "1st path of --model" in msg
    assert "models/opensora" in msg
    with pytest.raises(FileNotFoundError, match=r"T5-v1\.1-XXL.*not found.*t5xxl_fp16\.safetensors"):
        ChaiPipeline.from_files(vae_file, vae_file, tmp_path / "t5xxl_fp16.safetensors")
    with pytest.raises(ValueError, match=r"without a tokenizer.*t5_tokenizer"):
        ChaiPipeline.from_files(vae_file, vae_file, vae_file)
    # the VAE given where the STDiT3 belongs: the mismatch names the file, what it should be, the order
    with pytest.raises(StateDictMismatchError) as err:
        ChaiPipeline.from_files(vae_file, vae_file, t5_dir)
    msg = str(err.value)
    assert "missing keys" in msg and f"{vae_file} could not be loaded as the STDiT3" in msg
    assert "hpcai-tech/OpenSora-STDiT-v3" in msg and "order of the paths" in msg
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(vae_file.read_bytes()[:100])
    with pytest.raises(CheckpointFormatError, match=r"(?s)damaged\.safetensors.*could not be loaded as the STDiT3"):
        ChaiPipeline.from_files(damaged, vae_file, t5_dir)
