"""RFLOW sampler against the official OpenSora 1.2 recordings.

- `rflow_timesteps.json`: the exact t the official `RFLOW.sample` fed the model for 6 sizes x {30, 8}
  steps x {bf16, fp32} size tensors. Compared bit for bit (timesteps, Euler dt, shift ratio, size
  conditioning values).
- `rflow_tiny_sample.*`: one official end-to-end run with the tiny STDiT3 (4 steps, CFG 7). The
  sampler is checked twice: replaying the recorded model outputs (exact, no STDiT3 needed) and
  running our STDiT3 on the recorded weights (tolerance 5e-5 as the fixture README suggests; the
  recorded 1-vs-2-thread noise is 2.6e-6).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from comfyui_chai.opensora.rflow import (
    RFlow,
    RFlowSchedule,
    SamplingCancelled,
    StepInfo,
    current_step,
    make_noise,
    rflow_schedule,
    shift_ratio,
    size_conditioning,
    timestep_transform,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _settings(fixtures_dir):
    return json.loads((fixtures_dir / "rflow_timesteps.json").read_text())["settings"]


@pytest.fixture(scope="module")
def timestep_settings(fixtures_dir):
    return _settings(fixtures_dir)


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return load_file(str(fixtures_dir / "rflow_tiny_sample.safetensors"))


def test_every_recorded_schedule_is_reproduced_exactly(timestep_settings):
    assert len(timestep_settings) == 24
    for s in timestep_settings:
        dtype = DTYPES[s["dtype"]]
        h, w = s["image_size_hw"]
        label = f"{s['resolution']} {s['aspect_ratio']} {s['num_frames']}f {s['num_sampling_steps']} steps {s['dtype']}"
        sched = rflow_schedule(s["num_sampling_steps"], height=h, width=w, num_frames=s["num_frames"], size_dtype=dtype)
        assert sched.timesteps.dtype == torch.float32
        assert sched.timesteps.tolist() == s["timesteps_fed_to_model"], label
        assert sched.dts.tolist() == s["euler_dt"], label
        assert sched.ratio == s["shift_ratio"], label
        cast = sched.timesteps.to(dtype).to(torch.float32).tolist()
        assert cast == s["timesteps_after_model_cast"], label
        cond = size_conditioning(h, w, s["num_frames"], dtype=dtype)
        assert {k: float(v[0]) for k, v in cond.items()} == s["model_kwargs_values"], label
        assert all(v.dtype == dtype and v.shape == (1,) for v in cond.values())


def test_bf16_rounding_of_the_size_tensors_matters(timestep_settings):
    # A sampler that ignores the bf16 size tensors gets the fp32 values, which differ from the bf16 recording.
    s = next(x for x in timestep_settings if x["resolution"] == "480p" and x["dtype"] == "bf16" and x["num_sampling_steps"] == 30)
    fp32 = rflow_schedule(30, height=480, width=854, num_frames=51, size_dtype=torch.float32)
    assert fp32.timesteps.tolist() != s["timesteps_fed_to_model"]
    bf16 = size_conditioning(480, 854, 51, dtype=torch.bfloat16)
    assert float(bf16["width"][0]) == 856.0


# opensora.md section 5.2: ratio on the bf16 path and with exact math.
SHEET_RATIOS = [
    ((240, 426, 51), 2.421875, 2.418723),
    ((240, 426, 102), 3.421875, 3.420591),
    ((360, 640, 51), 3.625, 3.630922),
    ((480, 854, 51), 4.84375, 4.843120),
    ((480, 854, 204), 9.6875, 9.686240),
    ((720, 1280, 51), 7.25, 7.261844),
    ((720, 1280, 102), 10.25, 10.269798),
    ((144, 256, 51), 1.453125, 1.452369),
    ((240, 426, 1), 0.625, 0.624512),
]


@pytest.mark.parametrize("size,bf16_ratio,exact_ratio", SHEET_RATIOS)
def test_shift_ratio_matches_reference_sheet(size, bf16_ratio, exact_ratio):
    h, w, f = size
    bf = size_conditioning(h, w, f, dtype=torch.bfloat16)
    fp = size_conditioning(h, w, f, dtype=torch.float32)
    assert float(shift_ratio(bf["height"], bf["width"], bf["num_frames"])[0]) == bf16_ratio
    assert float(shift_ratio(fp["height"], fp["width"], fp["num_frames"])[0]) == pytest.approx(exact_ratio, abs=2e-6)
    n_lat = 1 if f == 1 else f // 17 * 5
    assert exact_ratio == pytest.approx(math.sqrt(h * w) / 512 * math.sqrt(n_lat), abs=1e-6)


def test_timestep_transform_formula():
    cond = size_conditioning(240, 426, 51, dtype=torch.float32)
    t = torch.tensor([1000.0, 500.0, 0.0])
    r = float(shift_ratio(cond["height"], cond["width"], cond["num_frames"])[0])
    out = timestep_transform(t, cond["height"][:1].repeat(3), cond["width"][:1].repeat(3), cond["num_frames"][:1].repeat(3))
    for t_in, t_out in zip(t.tolist(), out.tolist()):
        s = t_in / 1000
        assert t_out == pytest.approx(1000 * r * s / (1 + (r - 1) * s), rel=1e-6)
    assert out[0].item() == 1000.0 and out[2].item() == 0.0


def test_schedule_invariants_and_short_schedules():
    full = rflow_schedule(30, height=240, width=426, num_frames=51)
    short = RFlow().schedule(240, 426, 51, num_steps=8)
    for sched, n in ((full, 30), (short, 8)):
        assert len(sched) == n
        assert sched.timesteps[0].item() == 1000.0
        assert bool((sched.timesteps[1:] < sched.timesteps[:-1]).all())
        assert sched.dts[-1].item() == pytest.approx(sched.timesteps[-1].item() / 1000)
        assert sched.dts.double().sum().item() == pytest.approx(1.0, abs=1e-6)  # ends at sigma 0
        assert torch.equal(sched.sigmas, sched.timesteps / 1000)
    info = short.step(2)
    assert isinstance(info, StepInfo) and info.index == 2 and info.total == 8 and not info.is_last
    assert info.t == float(short.timesteps[2]) and info.sigma == pytest.approx(info.t / 1000)
    assert info.dt == float(short.dts[2])
    assert short.step(-1).is_last and short.step(-1).index == 7
    assert [s.index for s in short.steps()] == list(range(8))
    with pytest.raises(IndexError):
        short.step(8)
    # Pair each short step with the full step at the nearest noise level (brute force check).
    for step in short.steps():
        idx = full.nearest_index(step.t)
        best = min(range(30), key=lambda j: abs(full.timesteps[j].item() - step.t))
        assert idx == best
    assert full.nearest_index(1000.0) == 0 and full.nearest_index(0.0) == 29


def test_schedule_errors():
    with pytest.raises(ValueError, match="num_steps"):
        rflow_schedule(0, height=240, width=426, num_frames=51)
    with pytest.raises(ValueError, match="17 frames"):
        rflow_schedule(8, height=240, width=426, num_frames=9)
    with pytest.raises(ValueError):
        RFlowSchedule(timesteps=torch.ones(3), dts=torch.ones(2))
    # Without the transform the grid is uniform.
    plain = rflow_schedule(4, height=240, width=426, num_frames=9, use_timestep_transform=False)
    assert plain.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0] and plain.ratio is None



def test_fixed_shift_ratio_shifts_any_size_and_matches_the_size_rule():
    # 8 frames: the size rule has no ratio, a fixed one shifts the uniform grid by r s / (1 + (r - 1) s).
    s = rflow_schedule(8, height=32, width=32, num_frames=8, fixed_shift_ratio=3.0)
    grid = [1000.0 * (1 - i / 8) for i in range(8)]
    expect = [3 * g / 1000 / (1 + 2 * g / 1000) * 1000 for g in grid]
    assert s.ratio == 3.0 and torch.allclose(s.timesteps, torch.tensor(expect), atol=1e-3)
    assert abs(float(s.timesteps[-1]) - 300.0) < 1e-3 and abs(float(s.dts.sum()) - 1.0) < 1e-6
    # Ratio 1 is the plain grid; the size's own ratio reproduces the size-derived schedule.
    one = rflow_schedule(8, height=32, width=32, num_frames=8, fixed_shift_ratio=1.0)
    assert one.timesteps.tolist() == grid
    sized = rflow_schedule(30, height=240, width=426, num_frames=51, size_dtype=torch.float32)
    fixed = rflow_schedule(30, height=240, width=426, num_frames=51, fixed_shift_ratio=sized.ratio)
    assert torch.allclose(sized.timesteps, fixed.timesteps, atol=1e-3)
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fixed_shift_ratio"):
            rflow_schedule(8, height=32, width=32, num_frames=8, fixed_shift_ratio=bad)
    with pytest.raises(ValueError, match="use_timestep_transform"):
        rflow_schedule(8, height=32, width=32, num_frames=8, use_timestep_transform=False, fixed_shift_ratio=2.0)

def _run_tiny(tiny, model, **kwargs):
    return RFlow(num_sampling_steps=4).sample(
        model,
        tiny["z_in"],
        y=tiny["y_cond"],
        y_mask=tiny["text_mask"],
        y_null=tiny["y_null"],
        height=64,
        width=88,
        num_frames=17,
        size_dtype=torch.float32,
        **kwargs,
    )


def test_tiny_sample_replay_is_exact(tiny):
    """The sampler alone: feed back the official model outputs, expect the official inputs and result."""
    calls = []

    def replay(x, t, y, **kwargs):
        i = len(calls)
        calls.append(kwargs)
        assert torch.equal(x, tiny["model_z_in_per_step"][i]), f"z fed at step {i}"
        assert t.dtype == torch.float32 and torch.equal(t, tiny["timesteps_fed"][i]), f"t at step {i}"
        assert torch.equal(y, torch.cat([tiny["y_cond"], tiny["y_null"]]))
        assert torch.equal(kwargs["mask"], tiny["text_mask"])
        for key in ("fps", "height", "width"):
            assert torch.equal(kwargs[key], tiny[key]), key
        return tiny["model_out_per_step"][i]

    z = _run_tiny(tiny, replay)
    assert len(calls) == 4
    assert z.dtype == torch.float32
    assert torch.equal(z, tiny["z_out"])


def test_tiny_sample_end_to_end_with_stdit3(tiny, fixtures_dir):
    """Needs opensora/stdit3.py (another engineer's part); fails, not skips, while it is missing."""
    from comfyui_chai.opensora.loading import build_and_load
    from comfyui_chai.opensora.stdit3 import STDiT3
    from comfyui_chai.opensora.text import null_caption_embedding

    cfg = json.loads((fixtures_dir / "stdit3_tiny_config.json").read_text())["config_kwargs"]
    model = build_and_load(lambda: STDiT3(**cfg), fixtures_dir / "stdit3_tiny_weights.safetensors")
    y_null = null_caption_embedding(model, 2)
    assert torch.equal(y_null, tiny["y_null"])
    traced = []
    z = RFlow(num_sampling_steps=4).sample(
        model, tiny["z_in"], y=tiny["y_cond"], y_mask=tiny["text_mask"], y_null=y_null,
        height=64, width=88, num_frames=17, size_dtype=torch.float32,
        callback=lambda st: traced.append(st.z_before.clone()),
    )  # fmt: skip
    assert float((z - tiny["z_out"]).abs().max()) < 5e-5
    for i, z_before in enumerate(traced):
        assert float((z_before - tiny["model_z_in_per_step"][i][:2]).abs().max()) < 5e-5


class _ConstModel:
    """Velocity A for conditional rows and B for unconditional rows; junk in channels C..2C-1."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, sigma_channels: bool = True):
        self.a, self.b, self.sigma_channels = a, b, sigma_channels
        self.calls = []

    def __call__(self, x, t, y, **kwargs):
        self.calls.append({"x": x.clone(), "t": t.clone(), "y": y, **kwargs})
        n = x.shape[0] // 2
        v = torch.cat([self.a.expand(n, *self.a.shape[1:]), self.b.expand(n, *self.b.shape[1:])])
        if self.sigma_channels:
            v = torch.cat([v, torch.full_like(v, 1e6)], dim=1)
        return v


def _small_inputs(n=2, length=5, dim=6):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 4, 2, 3, 5, generator=g)
    y = torch.randn(n, 1, length, dim, generator=g)
    mask = torch.zeros(n, length, dtype=torch.int64)
    mask[:, :3] = 1
    null = torch.randn(length, dim, generator=g)
    return z, y, mask, null


@pytest.mark.parametrize("sigma_channels", [True, False])
@pytest.mark.parametrize("scale", [7.0, 1.0, 3.5])
def test_cfg_combination_and_euler_updates(scale, sigma_channels):
    z, y, mask, null = _small_inputs()
    a = torch.full((1, 4, 2, 3, 5), 0.3)
    b = torch.full((1, 4, 2, 3, 5), -0.2)
    model = _ConstModel(a, b, sigma_channels)
    sampler = RFlow(num_sampling_steps=5, cfg_scale=scale)
    out = sampler.sample(model, z, y=y, y_mask=mask, y_null=null, height=240, width=426, num_frames=51)
    v = b + scale * (a - b)
    torch.testing.assert_close(out, z + v, atol=1e-5, rtol=0)  # sum of dt is 1
    sched = sampler.schedule(240, 426, 51)
    for i, call in enumerate(model.calls):
        assert call["x"].shape[0] == 4 and torch.equal(call["x"][:2], call["x"][2:])
        assert call["t"].tolist() == [sched.timesteps[i].item()] * 4
        assert torch.equal(call["y"][2:], null[None, None].expand(2, 1, 5, 6))
        assert call["height"].dtype == torch.bfloat16 and call["width"].tolist() == [426.0, 426.0]
        assert call["fps"].tolist() == [24.0, 24.0]


def test_cfg_scale_override_per_call():
    z, y, mask, null = _small_inputs()
    model = _ConstModel(torch.ones(1, 4, 2, 3, 5), torch.zeros(1, 4, 2, 3, 5))
    out = RFlow(num_sampling_steps=3).sample(
        model, z, y=y, y_mask=mask, y_null=null, height=240, width=426, num_frames=51, cfg_scale=2.0
    )
    torch.testing.assert_close(out, z + 2.0, atol=1e-5, rtol=0)


def test_callback_hook_and_cancellation():
    z, y, mask, null = _small_inputs()
    model = _ConstModel(torch.ones(1, 4, 2, 3, 5), torch.zeros(1, 4, 2, 3, 5))
    states, hook_calls = [], []

    def hook(info, z_live):
        hook_calls.append((info.index, z_live.clone()))
        return {"cache_kv": f"step{info.index}"} if info.index in (1, 2, 3) else None

    sampler = RFlow(num_sampling_steps=8)
    out = sampler.sample(
        model, z, y=y, y_mask=mask, y_null=null, height=240, width=426, num_frames=51,
        model_kwargs={"x_mask": None}, step_model_kwargs=hook, callback=states.append,
    )  # fmt: skip
    sched = sampler.schedule(240, 426, 51)
    assert [s.info.index for s in states] == list(range(8))
    assert all(s.info.total == 8 for s in states)
    assert [s.info.t for s in states] == sched.timesteps.tolist()
    assert torch.equal(states[0].z_before, z)
    for prev, cur in zip(states, states[1:]):
        assert torch.equal(prev.z_after, cur.z_before)
    assert torch.equal(states[-1].z_after, out)
    for state, (index, z_live) in zip(states, hook_calls):
        assert state.info.index == index and torch.equal(state.z_before, z_live)
        torch.testing.assert_close(state.z_after, state.z_before + state.velocity * state.info.dt)
    assert [c.get("cache_kv") for c in model.calls] == [None, "step1", "step2", "step3", None, None, None, None]
    assert all("x_mask" in c for c in model.calls)

    checks = []

    def cancel_at_third():
        checks.append(1)
        return len(checks) == 3

    model.calls.clear()
    with pytest.raises(SamplingCancelled, match="before step 3 of 8") as err:
        sampler.sample(model, z, y=y, y_mask=mask, y_null=null, height=240, width=426, num_frames=51,
                       should_cancel=cancel_at_third)  # fmt: skip
    assert err.value.step_index == 2 and err.value.total == 8
    assert len(model.calls) == 2


def test_explicit_schedule_and_input_errors():
    z, y, mask, null = _small_inputs()
    model = _ConstModel(torch.ones(1, 4, 2, 3, 5), torch.zeros(1, 4, 2, 3, 5))
    custom = RFlowSchedule(timesteps=torch.tensor([1000.0, 400.0]), dts=torch.tensor([0.6, 0.4]))
    RFlow().sample(model, z, y=y, y_mask=mask, y_null=null, height=240, width=426, num_frames=51, schedule=custom)
    assert [c["t"][0].item() for c in model.calls] == [1000.0, 400.0]

    common = dict(height=240, width=426, num_frames=51)
    with pytest.raises(ValueError, match="may not replace mask"):
        RFlow().sample(model, z, y=y, y_mask=mask, y_null=null, model_kwargs={"mask": mask}, **common)
    with pytest.raises(ValueError, match="may not replace height"):
        RFlow(num_sampling_steps=2).sample(
            model, z, y=y, y_mask=mask, y_null=null, step_model_kwargs=lambda i, zz: {"height": 1}, **common
        )
    with pytest.raises(ValueError, match="latent"):
        RFlow().sample(model, z[0], y=y, y_mask=mask, y_null=null, **common)
    with pytest.raises(ValueError, match="y_null"):
        RFlow().sample(model, z, y=y, y_mask=mask, y_null=null[:4], **common)
    with pytest.raises(ValueError, match="y_mask"):
        RFlow().sample(model, z, y=y, y_mask=mask[:, :4], y_null=null, **common)
    with pytest.raises(ValueError, match="real token"):
        RFlow().sample(model, z, y=y, y_mask=torch.zeros_like(mask), y_null=null, **common)

    def bad_model(x, t, y, **kwargs):
        return torch.zeros(x.shape[0], 3, *x.shape[2:])

    with pytest.raises(ValueError, match="model returned"):
        RFlow().sample(bad_model, z, y=y, y_mask=mask, y_null=null, **common)


def test_bf16_noise_runs_in_fp32_and_image_fps():
    z, y, mask, null = _small_inputs()
    model = _ConstModel(torch.ones(1, 4, 2, 3, 5), torch.zeros(1, 4, 2, 3, 5))
    out = RFlow(num_sampling_steps=2).sample(
        model, z.to(torch.bfloat16), y=y, y_mask=mask, y_null=null, height=240, width=426, num_frames=1
    )
    assert out.dtype == torch.float32
    assert model.calls[0]["x"].dtype == torch.float32
    assert model.calls[0]["fps"].tolist() == [120.0, 120.0]


def test_make_noise_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = make_noise((1, 4, 3, 4, 5), seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = make_noise((1, 4, 3, 4, 5), seed=7, dtype=torch.bfloat16)
    c = make_noise((1, 4, 3, 4, 5), seed=8)
    assert a.dtype == torch.float32 and torch.equal(a.to(torch.bfloat16), b)
    assert not torch.equal(a, c)
    assert abs(float(make_noise((4, 4, 8, 8, 8), seed=1).std()) - 1.0) < 0.05
    with pytest.raises(ValueError):
        make_noise((1, 0, 2), seed=1)


def test_current_step_is_published_around_each_model_call_only():
    z, y, mask, null = _small_inputs()
    seen = []

    class Model(_ConstModel):
        def __call__(self, x, t, y_in, **kwargs):
            seen.append(current_step())
            return super().__call__(x, t, y_in, **kwargs)

    model = Model(torch.ones(1, 4, 2, 3, 5), torch.zeros(1, 4, 2, 3, 5))
    sampler = RFlow(num_sampling_steps=6)
    plain = sampler.sample(model, z, y=y, y_mask=mask, y_null=null, height=240, width=426, num_frames=51)
    assert current_step() is None  # outside the model call
    assert [s.index for s in seen] == list(range(6)) and all(s.total == 6 for s in seen)
    assert not any(s.exact for s in seen)
    seen.clear()
    states = []
    marked = sampler.sample(model, z, y=y, y_mask=mask, y_null=null, height=240, width=426, num_frames=51,
                            exact_steps=[0, 3], callback=states.append)
    assert [s.exact for s in seen] == [True, False, False, True, False, False]
    assert [s.info.exact for s in states] == [True, False, False, True, False, False]
    assert torch.equal(plain, marked)  # the flag is information for hooks; the sampler computes the same
    assert current_step() is None

    class Failing(_ConstModel):
        def __call__(self, *args, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sampler.sample(Failing(torch.ones(1, 4, 2, 3, 5), torch.zeros(1, 4, 2, 3, 5)), z, y=y, y_mask=mask,
                       y_null=null, height=240, width=426, num_frames=51)
    assert current_step() is None  # reset also on error
