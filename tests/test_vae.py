"""OpenSora 1.2 VAE: key list of the full model, golden encode/decode of the tiny fixtures, latent sizes, chunking.

Tolerances (fp32, CPU, one thread). The fixtures README measured, for these goldens: fp64 copy of the
official model vs the fp32 golden <= 3.8e-8, 2 threads vs 1 thread <= 1.2e-7; output magnitudes are
<= 0.084 (decoded), <= 0.32 (encoded mode), ~1.0 (posterior std) and <= 1.5 (sampled latents). An
independent fp32 re-implementation therefore differs by float rounding only: a few ulps of values of
magnitude <= 1.5, i.e. ~1e-7. We use ``atol=1e-6, rtol=1e-6`` (the README's suggestion): an order of
magnitude above the rounding noise and far below what a wrong op gives (the negative tests below
show single-weight perturbations move outputs by >= 1e-4).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from comfyui_chai.opensora.vae import (
    OPENSORA_VAE_SCALE,
    OPENSORA_VAE_SHIFT,
    SDXL_VAE_CONFIG,
    OpenSoraVAE,
    latent_frames,
    latent_shape,
)
from comfyui_chai.opensora.vae_temporal import VAETemporal, causal_time_padding

ATOL = 1e-6
RTOL = 1e-6


def _json(fixtures_dir, name):
    return json.loads((fixtures_dir / name).read_text())


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    diff = (got - ref).abs().max().item()
    assert torch.allclose(got, ref, atol=ATOL, rtol=RTOL), f"{what}: max abs diff {diff:.3e}"


# ------------------------------------------------------------------ fixtures (module-scoped, tiny)
@pytest.fixture(scope="module")
def temporal_fx(fixtures_dir):
    cfg = _json(fixtures_dir, "vae_temporal_tiny_config.json")
    weights = load_file(str(fixtures_dir / "vae_temporal_tiny_weights.safetensors"))
    golden = load_file(str(fixtures_dir / "vae_temporal_tiny_golden.safetensors"))
    model = VAETemporal.from_config(cfg["constructor_kwargs"]).eval()
    model.load_state_dict(weights, strict=True)
    return cfg, weights, golden, model


@pytest.fixture(scope="module")
def pipeline_fx(fixtures_dir):
    cfg = _json(fixtures_dir, "vae_pipeline_tiny_config.json")
    weights = load_file(str(fixtures_dir / "vae_pipeline_tiny_weights.safetensors"))
    golden = load_file(str(fixtures_dir / "vae_pipeline_tiny_golden.safetensors"))
    model = OpenSoraVAE.from_official_config(cfg["pipeline_kwargs"], cfg["spatial_autoencoderkl_config"]).eval()
    model.load_state_dict(weights, strict=True)
    return cfg, weights, golden, model


def _build_pipeline(cfg, weights, **overrides):
    model = OpenSoraVAE.from_official_config({**cfg["pipeline_kwargs"], **overrides}, cfg["spatial_autoencoderkl_config"])
    model.load_state_dict(weights, strict=True)
    return model.eval()


# ------------------------------------------------------------------ full-size key list
def test_full_model_state_dict_matches_official_key_list(fixtures_dir):
    ref = _json(fixtures_dir, "vae_v1_2_state_dict.json")
    with torch.device("meta"):
        model = OpenSoraVAE()
    sd = model.state_dict()
    ref_keys = [t["key"] for t in ref["tensors"]]
    assert list(sd) == ref_keys, f"missing {sorted(set(ref_keys) - set(sd))[:5]}, extra {sorted(set(sd) - set(ref_keys))[:5]}"
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for t in ref["tensors"]:
        assert list(sd[t["key"]].shape) == t["shape"], t["key"]
        assert str(sd[t["key"]].dtype).removeprefix("torch.") == t["dtype"], t["key"]
        assert (t["key"] in params) == (t["kind"] == "parameter"), t["key"]
        assert (t["key"] in buffers) == (t["kind"] == "buffer"), t["key"]
    assert len(sd) == ref["num_tensors"] == 517
    assert sum(p.numel() for p in params.values()) == ref["total_parameter_count"]
    assert sum(v.numel() for v in sd.values()) == ref["total_state_dict_element_count"]
    for prefix, counts in ref["sub_tree_counts"].items():
        sub = [v for k, v in sd.items() if k.startswith(prefix)]
        assert len(sub) == counts["num_tensors"], prefix
        assert sum(v.numel() for v in sub) == counts["element_count"], prefix
    # non-persistent buffers would be invisible to strict loading; the official model has none
    assert set(buffers) == {t["key"] for t in ref["tensors"] if t["kind"] == "buffer"}


def test_full_model_from_official_pipeline_config(fixtures_dir):
    ref = _json(fixtures_dir, "vae_v1_2_state_dict.json")
    arch_keys = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                 "in_channels", "out_channels", "act_fn", "down_block_types", "up_block_types")
    for k in arch_keys:
        assert SDXL_VAE_CONFIG[k] == ref["spatial_vae_autoencoderkl_config"][k], k
    with torch.device("meta"):
        model = OpenSoraVAE.from_official_config(ref["pipeline_config"])
    assert [k for k in model.state_dict()] == [t["key"] for t in ref["tensors"]]
    assert model.micro_frame_size == 17 and model.micro_z_frame_size == 5
    assert model.spatial_vae.micro_batch_size == 4
    assert model.config["shift"] == pytest.approx(ref["pipeline_config"]["shift"])
    assert model.config["scale"] == pytest.approx(ref["pipeline_config"]["scale"])


def test_default_buffers_hold_official_constants():
    model = OpenSoraVAE(
        spatial_config={**SDXL_VAE_CONFIG, "block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4, "layers_per_block": 1},
        temporal_config={"type": "VAE_Temporal_SD", "filters": 8, "num_groups": 4},
    )
    assert model.shift.shape == model.scale.shape == (1, 4, 1, 1, 1)
    assert model.shift.flatten().tolist() == pytest.approx(OPENSORA_VAE_SHIFT)
    assert model.scale.flatten().tolist() == pytest.approx(OPENSORA_VAE_SCALE)
    assert model.shift.flatten().tolist() == pytest.approx([-0.10, 0.34, 0.27, 0.98])
    assert model.scale.flatten().tolist() == pytest.approx([3.85, 2.32, 2.33, 3.06])


# ------------------------------------------------------------------ temporal VAE goldens
_TEMPORAL_SUFFIXES = ("x", "moments", "mean", "logvar", "std", "decoded_from_mean")


def _temporal_cases(golden):
    cases: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in golden.items():
        case, _, suffix = key.partition("_")
        cases.setdefault(case, {})[suffix] = value
    return cases


def test_temporal_state_dict_order_and_size(temporal_fx):
    cfg, weights, _, model = temporal_fx
    assert list(model.state_dict()) == cfg["state_dict_order"]
    assert sum(p.numel() for p in model.parameters()) == cfg["parameter_count"]
    assert len(weights) == 267


def test_temporal_vae_matches_goldens(temporal_fx):
    cfg, _, golden, model = temporal_fx
    cases = _temporal_cases(golden)
    assert cases, "no golden cases found"
    assert set(cases) >= set(cfg.get("cases", {})), "a case listed in the config has no tensors"
    checked = 0
    with torch.no_grad():
        for case, tensors in sorted(cases.items()):
            x = tensors["x"]
            num_frames = cfg.get("cases", {}).get(case, {}).get("num_frames", x.shape[2])
            post = model.encode(x)
            assert post.mean.shape[2] == model.latent_frames(num_frames)
            for suffix, ref in tensors.items():
                if suffix == "x":
                    continue
                if suffix in ("moments", "mean", "logvar", "std"):
                    got = {"moments": post.parameters, "mean": post.mean, "logvar": post.logvar, "std": post.std}[suffix]
                elif suffix == "decoded_from_mean":
                    got = model.decode(post.mean, num_frames=num_frames)
                elif (m := re.fullmatch(r"sample_seed(\d+)", suffix)) is not None:
                    torch.manual_seed(int(m.group(1)))  # the official sample() uses the global RNG
                    got = post.sample()
                    _close(post.sample(torch.Generator().manual_seed(int(m.group(1)))), ref, f"{case}_{suffix} (generator)")
                else:
                    pytest.fail(f"golden tensor {case}_{suffix} has no check; extend this test")
                _close(got, ref, f"{case}_{suffix}")
                checked += 1
    assert checked >= 2 * len(cases)


def test_temporal_reconstruction_shapes_for_every_remainder(temporal_fx):
    _, _, _, model = temporal_fx
    with torch.no_grad():
        for t in range(1, 10):
            x = torch.randn(1, 4, t, 2, 2, generator=torch.Generator().manual_seed(t))
            post = model.encode(x)
            assert post.mean.shape == (1, 4, math.ceil(t / 4), 2, 2)
            assert model.decode(post.mean, num_frames=t).shape == x.shape
            assert model(x).shape == x.shape


# ------------------------------------------------------------------ pipeline goldens
def _seed_of(call: str) -> int:
    m = re.search(r"manual_seed\((\d+)\)", call)
    assert m, f"no seed in golden call description {call!r}"
    return int(m.group(1))


def test_pipeline_state_dict_order_and_size(pipeline_fx):
    cfg, _, _, model = pipeline_fx
    assert list(model.state_dict()) == cfg["state_dict_order"]
    assert sum(p.numel() for p in model.parameters()) == cfg["parameter_count"]


def test_pipeline_matches_goldens(pipeline_fx):
    cfg, _, golden, model = pipeline_fx
    calls = cfg["golden_calls"]
    inputs = {"x", "z"}
    outputs = [k for k in golden if k not in inputs]
    assert outputs, "no golden outputs"
    with torch.no_grad():
        for key in sorted(outputs):
            ref = golden[key]
            if key.startswith("decoded"):
                got = model.decode(golden["z"], num_frames=ref.shape[2])
            elif key.startswith("encoded_mode"):
                got = model.encode(golden["x"], sample=False)
            elif key.startswith("encoded_sampled"):
                seed = _seed_of(calls[key])
                torch.manual_seed(seed)
                got = model.encode(golden["x"])
                _close(model.encode(golden["x"], generator=torch.Generator().manual_seed(seed)), ref, f"{key} (generator)")
            else:
                pytest.fail(f"golden tensor {key!r} has no check; extend this test")
            _close(got, ref, key)


def test_pipeline_latent_frames_table(pipeline_fx):
    cfg, _, _, model = pipeline_fx
    table = cfg["latent_frames_for_num_frames"]
    assert table
    for frames, lat in table.items():
        assert model.latent_frames(int(frames)) == lat, frames


# ------------------------------------------------------------------ latent-shape helper
# reference/opensora.md section 3.4 (frames) and section 6 (latent H x W per setting), copied as literals.
_DOC_FRAMES = {1: 1, 16: 4, 17: 5, 51: 15, 102: 30, 204: 60, 408: 120, 816: 240}
_DOC_SETTINGS = {  # (H, W) pixels -> (H_lat, W_lat)
    (144, 256): (18, 32),
    (240, 426): (30, 53),
    (320, 320): (40, 40),
    (360, 640): (45, 80),
    (480, 854): (60, 106),
    (720, 1280): (90, 160),
}
_DOC_LATENTS = {  # section 6 "Latent tensors" lines and section 1.1
    (51, 240, 426): (4, 15, 30, 53),
    (51, 480, 854): (4, 15, 60, 106),
    (102, 480, 854): (4, 30, 60, 106),
    (102, 720, 1280): (4, 30, 90, 160),
    (51, 720, 1280): (4, 15, 90, 160),
}
# section 6 resolution table, all five aspect ratios for 144p..720p
_DOC_RESOLUTIONS = [
    (144, 256), (256, 144), (192, 192), (166, 221), (221, 165),
    (240, 426), (426, 240), (320, 320), (276, 368), (370, 278),
    (360, 640), (640, 360), (480, 480), (416, 554), (554, 416),
    (480, 854), (854, 480), (640, 640), (554, 738), (740, 555),
    (720, 1280), (1280, 720), (960, 960), (832, 1110), (1108, 832),
]


def test_latent_shape_matches_doc_tables():
    for frames, t_lat in _DOC_FRAMES.items():
        assert latent_frames(frames) == t_lat, frames
    for (h, w), (hl, wl) in _DOC_SETTINGS.items():
        for frames in (51, 102, 204, 408):
            assert latent_shape(frames, h, w) == (4, _DOC_FRAMES[frames], hl, wl)
    for (frames, h, w), shape in _DOC_LATENTS.items():
        assert latent_shape(frames, h, w) == shape
    for h, w in _DOC_RESOLUTIONS:
        for frames in (51, 102, 204, 408):
            c, t, hl, wl = latent_shape(frames, h, w)
            assert (c, t) == (4, _DOC_FRAMES[frames])
            # decoded frames are 8*latent: never larger than the request, at most 7 pixels smaller
            assert 0 <= h - 8 * hl < 8 and 0 <= w - 8 * wl < 8


def test_latent_shape_matches_fixture_examples(fixtures_dir):
    examples = _json(fixtures_dir, "vae_v1_2_state_dict.json")["latent_size_examples"]
    assert examples
    with torch.device("meta"):
        model = OpenSoraVAE()
    for key, (t, h, w) in examples.items():
        frames, height, width = (int(v) for v in key.split("x"))
        assert latent_shape(frames, height, width) == (4, t, h, w), key
        assert model.latent_shape(frames, height, width) == (4, t, h, w), key


def test_latent_frames_formula_against_chunk_simulation():
    # 5*floor(N/17) + ceil((N mod 17)/4), the closed form of section 3.4
    for n in range(1, 900):
        assert latent_frames(n) == 5 * (n // 17) + math.ceil((n % 17) / 4), n
    assert latent_frames(34, micro_frame_size=None) == 9
    assert latent_frames(16, micro_frame_size=16, time_downsample_factor=2) == 8


def test_latent_shape_agrees_with_real_encode(pipeline_fx):
    cfg, weights, _, _ = pipeline_fx
    model = _build_pipeline(cfg, weights)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        # (20, 27) is not a multiple of 8: the latent floors (2, 3) and the decode comes back 16 x 24
        for frames, h, w in [(1, 16, 24), (4, 16, 24), (5, 16, 24), (16, 8, 8), (17, 16, 24), (18, 8, 8),
                             (21, 8, 8), (34, 8, 8), (35, 20, 27)]:
            x = torch.rand(1, 3, frames, h, w, generator=g) * 2 - 1
            z = model.encode(x, sample=False)
            c, t_lat, h_lat, w_lat = model.latent_shape(frames, h, w)
            assert tuple(z.shape[1:]) == (c, t_lat, h_lat, w_lat), (frames, h, w)
            assert model.decode(z, num_frames=frames).shape == (1, 3, frames, 8 * h_lat, 8 * w_lat)
            assert model(x).shape == (1, 3, frames, 8 * h_lat, 8 * w_lat)


@pytest.mark.parametrize(
    "args",
    [(0, 240, 426), (51, 4, 426), (51, 240, 0), (51.0, 240, 426), (True, 240, 426)],
)
def test_latent_shape_rejects_bad_sizes(args):
    with pytest.raises(ValueError):
        latent_shape(*args)


# ------------------------------------------------------------------ chunking
def test_spatial_micro_batch_size_does_not_change_results(pipeline_fx):
    """Frames go through the 2D VAE independently, so the micro-batch size is a memory knob only."""
    cfg, weights, golden, model = pipeline_fx
    with torch.no_grad():
        ref_dec = model.decode(golden["z"], num_frames=golden["decoded"].shape[2])
        ref_enc = model.encode(golden["x"], sample=False)
        try:
            for mbs in (1, 3, 7, None):
                model.spatial_vae.micro_batch_size = mbs
                _close(model.decode(golden["z"], num_frames=golden["decoded"].shape[2]), ref_dec, f"decode mbs={mbs}")
                _close(model.encode(golden["x"], sample=False), ref_enc, f"encode mbs={mbs}")
        finally:
            model.spatial_vae.micro_batch_size = 4
    with pytest.raises(ValueError):
        model.spatial_vae.micro_batch_size = 0


def test_spatial_wrapper_layout():
    """2D part = AutoencoderKL applied to every frame (batch-major), latents x 0.18215, decode / 0.18215."""
    torch.manual_seed(0)
    cfg = {**SDXL_VAE_CONFIG, "block_out_channels": [8, 16], "norm_num_groups": 4, "layers_per_block": 1,
           "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    model = OpenSoraVAE(cfg, {"type": "VAE_Temporal_SD", "filters": 8, "num_groups": 4}, micro_batch_size=3).eval()
    sp = model.spatial_vae
    assert sp.spatial_downsample_factor == 2 and model.latent_shape(5, 12, 10) == (4, 2, 6, 5)
    x = torch.rand(2, 3, 5, 12, 10, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        got = sp.encode(x, sample=False)
        ref = torch.stack([
            torch.stack([sp.module.encode(x[b : b + 1, :, t]).latent_dist.mode()[0] for t in range(5)], dim=1)
            for b in range(2)
        ]) * 0.18215
        _close(got, ref, "spatial encode layout")
        dec = sp.decode(got)
        ref_dec = torch.stack([
            torch.stack([sp.module.decode(got[b : b + 1, :, t] / 0.18215).sample[0] for t in range(5)], dim=1)
            for b in range(2)
        ])
        # batching 3 frames vs 1 moves conv results by float rounding (~1e-6 at |x| ~ 1); a layout
        # error (frames or batch items swapped) moves them by O(1)
        assert torch.allclose(dec, ref_dec, atol=1e-5, rtol=1e-5), (dec - ref_dec).abs().max()
    assert dec.shape == (2, 3, 5, 12, 10)


def test_temporal_chunks_are_independent(pipeline_fx):
    """Each 17-frame chunk is encoded / 5-latent chunk decoded alone: the full call equals the pieces."""
    cfg, _, golden, model = pipeline_fx
    x, z = golden["x"], golden["z"]  # 26 frames -> 8 latent frames = 17 + 9 frames / 5 + 3 latents
    with torch.no_grad():
        whole = model.encode(x, sample=False)
        _close(torch.cat([model.encode(x[:, :, :17], sample=False), model.encode(x[:, :, 17:], sample=False)], 2), whole, "encode pieces")
        dec = model.decode(z, num_frames=26)
        _close(torch.cat([model.decode(z[:, :, :5], num_frames=17), model.decode(z[:, :, 5:], num_frames=9)], 2), dec, "decode pieces")


def test_single_chunk_equals_unchunked_when_clip_fits(pipeline_fx):
    """For <= 17 frames the chunk loop runs once, so micro_frame_size=None must give the same numbers.

    For longer clips they differ by design: chunking restarts the causal padding and GroupNorm
    statistics at every 17 frames, and even the latent length differs (26 frames -> 8 chunked, 7 not).
    """
    cfg, weights, golden, model = pipeline_fx
    whole = _build_pipeline(cfg, weights, micro_frame_size=None)
    x = golden["x"][:, :, :13]
    with torch.no_grad():
        _close(whole.encode(x, sample=False), model.encode(x, sample=False), "encode 13 frames")
        z = model.encode(x, sample=False)
        _close(whole.decode(z, num_frames=13), model.decode(z, num_frames=13), "decode 13 frames")
        assert whole.latent_frames(26) == 7 and model.latent_frames(26) == 8
        assert whole.encode(golden["x"], sample=False).shape[2] == 7


# ------------------------------------------------------------------ negative checks
# Perturbation = N(0, 0.05^2) noise, the scale the fixture weights were drawn at (so "a different
# weight", not a rounding error). Observed effects: >= 2.9e-5 on decode / >= 8e-5 on encode, i.e.
# >= 29x ATOL. Note: with these tiny random weights the 2D *encoder* output is bias-dominated, so the
# pipeline encode goldens hardly see 2D-encoder weights (changes ~1e-7); the 2D encode wrapper is
# covered by the RNG-order-sensitive sampled golden and by test_spatial_wrapper_layout instead.
@pytest.mark.parametrize(
    "key",
    [
        "temporal_vae.decoder.conv_out.conv.weight",
        "temporal_vae.encoder.conv_blocks.1.conv.bias",
        "temporal_vae.post_quant_conv.conv.weight",
        "spatial_vae.module.decoder.mid_block.attentions.0.to_v.weight",
        "spatial_vae.module.decoder.conv_out.weight",
        "shift",
        "scale",
    ],
)
def test_perturbed_weight_breaks_golden_match(pipeline_fx, key):
    cfg, weights, golden, _ = pipeline_fx
    bad = dict(weights)
    bad[key] = weights[key] + 0.05 * torch.randn(weights[key].shape, generator=torch.Generator().manual_seed(0))
    model = OpenSoraVAE.from_official_config(cfg["pipeline_kwargs"], cfg["spatial_autoencoderkl_config"]).eval()
    model.load_state_dict(bad, strict=True)
    with torch.no_grad():
        dec = (model.decode(golden["z"], num_frames=golden["decoded"].shape[2]) - golden["decoded"]).abs().max().item()
        enc = (model.encode(golden["x"], sample=False) - golden["encoded_mode"]).abs().max().item()
    # an encoder-only weight leaves decode alone and vice versa; one of the two must break
    assert max(dec, enc) > 10 * ATOL, f"perturbing {key} went unnoticed (decode {dec:.2e}, encode {enc:.2e})"


@pytest.mark.parametrize(
    "key",
    [
        "encoder.block_res_blocks.0.0.conv1.conv.weight",
        "encoder.conv_blocks.2.conv.weight",
        "quant_conv.conv.bias",
        "decoder.block_res_blocks.2.1.conv1.conv.weight",
        "decoder.conv_blocks.1.conv.weight",
        "decoder.conv_out.conv.weight",
    ],
)
def test_perturbed_temporal_weight_breaks_temporal_golden(temporal_fx, key):
    cfg, weights, golden, _ = temporal_fx
    bad = dict(weights)
    bad[key] = weights[key] + 0.05 * torch.randn(weights[key].shape, generator=torch.Generator().manual_seed(0))
    model = VAETemporal.from_config(cfg["constructor_kwargs"]).eval()
    model.load_state_dict(bad, strict=True)
    worst = 0.0
    with torch.no_grad():
        for case, tensors in _temporal_cases(golden).items():
            x = tensors["x"]
            worst = max(worst, (model.encode(x).parameters - tensors["moments"]).abs().max().item())
            dec = model.decode(tensors["mean"], num_frames=x.shape[2])
            worst = max(worst, (dec - tensors["decoded_from_mean"]).abs().max().item())
    assert worst > 10 * ATOL, f"perturbing {key} went unnoticed ({worst:.2e})"


def test_wrong_spatial_scaling_factor_breaks_match(pipeline_fx):
    cfg, weights, golden, _ = pipeline_fx
    kwargs = json.loads(json.dumps(cfg["pipeline_kwargs"]))
    kwargs["vae_2d"]["scaling_factor"] = 0.13025  # the SDXL config's own value, which OpenSora does not use
    model = OpenSoraVAE.from_official_config(kwargs, cfg["spatial_autoencoderkl_config"]).eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        got = model.decode(golden["z"], num_frames=golden["decoded"].shape[2])
        enc = model.encode(golden["x"], generator=torch.Generator().manual_seed(_seed_of(cfg["golden_calls"]["encoded_sampled_seed"])))
    assert (got - golden["decoded"]).abs().max().item() > 10 * ATOL  # measured 3.9e-5
    assert (enc - golden["encoded_sampled_seed"]).abs().max().item() > 10 * ATOL  # measured 3.3e-5


# ------------------------------------------------------------------ errors and dtypes
def test_clear_errors_on_bad_input(pipeline_fx):
    cfg, _, golden, model = pipeline_fx
    z = golden["z"]
    with pytest.raises(ValueError, match="latent frames"):
        model.decode(z, num_frames=17)  # 17 frames need 5 latents, z has 8
    with pytest.raises(ValueError, match=r"\[B, 4, T, H, W\]"):
        model.decode(z[:, :3], num_frames=26)
    with pytest.raises(ValueError, match="5D"):
        model.decode(z[0], num_frames=26)
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        model.encode(golden["x"][:, :, :, :4, :4])
    with pytest.raises(ValueError, match="cal_loss"):
        OpenSoraVAE.from_official_config({**cfg["pipeline_kwargs"], "cal_loss": True}, cfg["spatial_autoencoderkl_config"])
    with pytest.raises(ValueError, match="unknown"):
        OpenSoraVAE.from_official_config({**cfg["pipeline_kwargs"], "bogus": 1}, cfg["spatial_autoencoderkl_config"])
    with pytest.raises(ValueError, match="spatial_config"):
        OpenSoraVAE.from_official_config({**cfg["pipeline_kwargs"], "vae_2d": {"type": "VideoAutoencoderKL", "from_pretrained": "x/y"}})
    with pytest.raises(ValueError, match="one value per latent channel"):
        OpenSoraVAE(cfg["spatial_autoencoderkl_config"], cfg["pipeline_kwargs"]["vae_temporal"], shift=[0.0, 1.0])
    with pytest.raises(ValueError, match="temporal_downsample"):
        VAETemporal(filters=8, num_groups=4, temporal_downsample=(True,))
    with pytest.raises(ValueError, match="num_groups"):
        VAETemporal(filters=8, num_groups=3)
    with pytest.raises(ValueError):
        causal_time_padding(0, 4)


def test_bf16_model_casts_inputs(pipeline_fx):
    """The driver runs the VAE in bf16 and feeds fp32 latents; outputs come back in the model dtype."""
    cfg, weights, golden, _ = pipeline_fx
    model = _build_pipeline(cfg, weights).to(torch.bfloat16)
    with torch.no_grad():
        out = model.decode(golden["z"], num_frames=golden["decoded"].shape[2])
    assert out.dtype == torch.bfloat16
    err = (out.float() - golden["decoded"]).abs().max().item()
    # measured 5.5e-4 (0.75% of |decoded|max = 0.074); 5% leaves room for other CPUs' bf16 kernels
    assert err < 0.05 * golden["decoded"].abs().max().item(), err
