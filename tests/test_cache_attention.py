"""Cache Attention (opensora/cache_attention.py) on a tiny random STDiT3, in the style of diffusers'
cache-hook tests: record what block 0's attention really receives at every step, check that no
other block computes anything different, and that disabling the cache gives the plain sampler.
"""

from __future__ import annotations

import types

import pytest
import torch

from comfyui_chai.opensora import layers
from comfyui_chai.opensora.cache_attention import (
    STEP_KWARG,
    CacheAttention,
    CacheAttentionConfig,
    capture_plan,
    sample_fast,
    sample_full,
)
from comfyui_chai.opensora.rflow import RFlow, make_noise, rflow_schedule
from comfyui_chai.opensora.stdit3 import STDiT3

LATENT = (4, 5, 8, 8)  # [C, T, H, W]: 17 frames of 64x64 pixels
SIZE = dict(height=64, width=64, num_frames=17)
L, D = 6, 16  # caption tokens, caption channels


def _tiny_model(seed: int = 7) -> STDiT3:
    model = STDiT3(depth=2, hidden_size=64, num_heads=4, caption_channels=D, model_max_length=L).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name != "rope.freqs":  # a fixed constant in every checkpoint
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def text():
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(1, 1, L, D, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    return y, mask


@pytest.fixture(scope="module")
def cached():
    gen = torch.Generator().manual_seed(11)
    return {f"step_{k}": torch.randn(LATENT, generator=gen).half() for k in (2, 3, 4)}


def _kw(model, text):
    y, mask = text
    return dict(y=y, y_mask=mask, y_null=model.y_embedder.y_embedding, **SIZE)


class AttentionRecorder:
    """Records (q, k, v, attn_mask) that SDPA receives inside spatial block 0's self-attention, per
    model call, by wrapping the ``F`` the attention layer calls and flagging block 0's forward."""

    def __init__(self, model, monkeypatch, block_index=0):
        self.calls = []  # one list of SDPA records per model forward
        self.inputs = []  # block's attention input x per model forward
        self.inside = False
        attn = model.spatial_blocks[block_index].attn
        real = layers.F

        def sdpa(q, k, v, attn_mask=None, **kw):
            if self.inside:
                self.calls[-1].append((q.clone(), k.clone(), v.clone(), None if attn_mask is None else attn_mask.clone()))
            return real.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)

        proxy = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real) if not n.startswith("__")})
        proxy.scaled_dot_product_attention = sdpa
        monkeypatch.setattr(layers, "F", proxy)

        def model_pre(module, args, kwargs):
            self.calls.append([])
            self.inputs.append(None)

        def attn_pre(module, args):
            self.inside = True
            self.inputs[-1] = args[0].clone()

        def attn_post(module, args, out):
            self.inside = False

        self.handles = [model.register_forward_pre_hook(model_pre, with_kwargs=True),
                        attn.register_forward_pre_hook(attn_pre), attn.register_forward_hook(attn_post)]

    def remove(self):
        for h in self.handles:
            h.remove()


def test_config_defaults_fingerprint_and_validation():
    cfg = CacheAttentionConfig()
    assert (cfg.fast_steps, cfg.cache_steps, cfg.block_index, cfg.mode, cfg.branches) == (8, (2, 3, 4), 0, "replace", "cond")
    assert (cfg.fusion, cfg.capture_dtype, cfg.full_steps, cfg.cfg_scale, cfg.threshold) == ("best", "float16", 30, 7.0, None)
    assert cfg.latent_names == ["step_2", "step_3", "step_4"] and cfg.torch_capture_dtype == torch.float16
    assert cfg.fingerprint() == "CHAI_F8_C2-3-4_N30_G7_float16"
    # Fields that change the stored tensors change the fingerprint ...
    for change in (dict(fast_steps=10), dict(cache_steps=(2, 3)), dict(full_steps=50), dict(cfg_scale=4.5),
                   dict(capture_dtype="float32")):
        assert CacheAttentionConfig(**change).fingerprint() != cfg.fingerprint(), change
    # ... fields that only change how they are used do not (entries stay valid), but the tag does.
    for change in (dict(mode="concat"), dict(branches="both"), dict(block_index=1), dict(fusion="per_entity"),
                   dict(threshold=0.9)):
        other = CacheAttentionConfig(**change)
        assert other.fingerprint() == cfg.fingerprint() and other.tag() != cfg.tag(), change
    assert not CacheAttentionConfig(cache_steps=()).enabled
    for bad in (dict(cache_steps=(0, 2)), dict(cache_steps=(3, 2)), dict(cache_steps=(9,)), dict(mode="add"),
                dict(branches="uncond"), dict(fusion="mean"), dict(capture_dtype="bfloat16"), dict(fast_steps=0),
                dict(threshold=1.5), dict(block_index=-1)):
        with pytest.raises(ValueError):
            CacheAttentionConfig(**bad)


def test_capture_plan_is_the_nearest_full_step():
    cfg = CacheAttentionConfig()
    for h, w, f in ((240, 426, 51), (64, 64, 17), (720, 1280, 102)):
        full = rflow_schedule(30, height=h, width=w, num_frames=f)
        fast = rflow_schedule(8, height=h, width=w, num_frames=f)
        plan = capture_plan(cfg, full, fast)
        assert list(plan) == ["step_2", "step_3", "step_4"]
        for step, (name, index) in zip(cfg.cache_steps, plan.items()):
            target = float(fast.timesteps[step - 1])
            dist = [abs(float(t) - target) for t in full.timesteps]
            assert index == dist.index(min(dist)), (h, w, f, name)
    full = rflow_schedule(30, height=240, width=426, num_frames=51)
    assert capture_plan(cfg, full, rflow_schedule(8, height=240, width=426, num_frames=51)) == \
        {"step_2": 4, "step_3": 7, "step_4": 11}


def test_block0_kv_come_from_cache_exactly_at_cache_steps(model, text, cached, monkeypatch):
    rflow = RFlow()
    cfg = CacheAttentionConfig()
    kw = _kw(model, text)
    rec = AttentionRecorder(model, monkeypatch)
    try:
        with torch.no_grad():
            _, ca = sample_fast(rflow, model, make_noise((1, *LATENT), 5), cfg, cached=cached, **kw)
    finally:
        rec.remove()
    schedule = rflow.schedule(**SIZE, num_steps=8)
    assert len(rec.calls) == 8 and all(len(c) == 1 for c in rec.calls)
    assert [c.step for c in ca.calls] == [2, 3, 4]
    frames = LATENT[1]
    attn = model.spatial_blocks[0].attn
    for index, (records, x) in enumerate(zip(rec.calls, rec.inputs)):
        q, k, v, mask = records[0]
        with torch.no_grad():
            _, k_own, v_own = attn.project_qkv(x)
        assert mask is None
        assert k.shape == k_own.shape  # replace: same key length
        step = index + 1
        if step not in cfg.cache_steps:
            assert torch.equal(k, k_own) and torch.equal(v, v_own), f"step {step} must use its own K/V"
            continue
        t = schedule.timesteps[index].reshape(1)
        with torch.no_grad():
            k_c, v_c = model.spatial_self_attention_kv(cached[f"step_{step}"][None], t, fps=torch.tensor([24.0]),
                                                       height=64, width=64)
        assert k_c.shape == (frames, *k_own.shape[1:])
        # conditional rows (frame f of sample 0 -> row f) take the cache's frame f exactly ...
        assert torch.equal(k[:frames], k_c) and torch.equal(v[:frames], v_c), f"step {step}"
        assert not torch.allclose(k[:frames], k_own[:frames], atol=1e-3)  # ... which is not the live K
        # ... the unconditional rows keep their own K/V.
        assert torch.equal(k[frames:], k_own[frames:]) and torch.equal(v[frames:], v_own[frames:])
    for blk in list(model.spatial_blocks) + list(model.temporal_blocks):
        assert blk.attn.kv_hook is None  # nothing left installed


def test_no_other_block_changes(model, text, cached):
    """Every block except spatial block 0 at a cache step computes exactly what it computes without
    a hook on the same input; spatial block 0 at a cache step does not (so the check can fail)."""
    cfg = CacheAttentionConfig()
    kw = _kw(model, text)
    records = []  # (step, name, args, output)
    state = {"step": 0}
    blocks = [(f"spatial{i}", b) for i, b in enumerate(model.spatial_blocks)]
    blocks += [(f"temporal{i}", b) for i, b in enumerate(model.temporal_blocks)]

    def make_hook(name):
        def hook(module, args, out):
            others = [b.attn.kv_hook for n, b in blocks if n != "spatial0"]
            assert all(h is None for h in others), "a hook was installed outside spatial block 0"
            records.append((state["step"], name, tuple(a.clone() if torch.is_tensor(a) else a for a in args),
                            out.clone()))
        return hook

    def on_model(module, args, kwargs):
        state["step"] += 1

    handles = [b.register_forward_hook(make_hook(n)) for n, b in blocks]
    handles.append(model.register_forward_pre_hook(on_model, with_kwargs=True))
    try:
        with torch.no_grad():
            sample_fast(RFlow(), model, make_noise((1, *LATENT), 6), cfg, cached=cached, **kw)
    finally:
        for h in handles:
            h.remove()
    assert len(records) == 8 * len(blocks)
    changed = []
    with torch.no_grad():
        for step, name, args, out in records:
            block = dict(blocks)[name]
            if not torch.equal(block(*args), out):
                changed.append((step, name))
    assert changed == [(2, "spatial0"), (3, "spatial0"), (4, "spatial0")]


def test_disabled_cache_attention_is_the_plain_8_step_rflow(model, text, cached):
    rflow = RFlow()
    kw = _kw(model, text)
    z = make_noise((1, *LATENT), 9)
    with torch.no_grad():
        plain = rflow.sample(model, z, num_steps=8, cfg_scale=7.0, **kw)
        off, ca_off = sample_fast(rflow, model, z, CacheAttentionConfig(cache_steps=()), cached=cached, **kw)
        none, ca_none = sample_fast(rflow, model, z, CacheAttentionConfig(), cached=None, **kw)
        on, _ = sample_fast(rflow, model, z, CacheAttentionConfig(), cached=cached, **kw)
        # A wrapper whose cache steps lie beyond the run is never active: also the plain run.
        trajectory = []
        late = CacheAttentionConfig(fast_steps=8, cache_steps=(8,))
        ca = CacheAttention(model, late, cached={"step_8": cached["step_2"]})
        rflow.sample(ca, z, num_steps=7, cfg_scale=7.0, step_model_kwargs=ca.step_kwargs,
                     callback=lambda s: trajectory.append(s.z_after), **kw)
        plain7 = rflow.sample(model, z, num_steps=7, cfg_scale=7.0, **kw)
    assert ca_off is None and ca_none is None and ca.calls == []
    assert torch.equal(off, plain) and torch.equal(none, plain)
    assert torch.equal(trajectory[-1], plain7)
    assert not torch.allclose(on, plain, atol=1e-4)  # and the cache does change the result


def _one_call(model, text, cfg, cached, samples=1):
    """One model call at fast step 2 on a CFG batch of 2*samples rows, with and without cache."""
    y, mask = text
    gen = torch.Generator().manual_seed(21)
    z = torch.randn((samples, *LATENT), generator=gen)
    x = torch.cat([z, z])
    t = torch.full((2 * samples,), 800.0)
    y_in = torch.cat([y.repeat(samples, 1, 1, 1), model.y_embedder.y_embedding[None, None].repeat(samples, 1, 1, 1)])
    kw = dict(mask=mask, fps=torch.tensor([24.0]), height=torch.tensor([64.0]), width=torch.tensor([64.0]))
    ca = CacheAttention(model, cfg, cached)
    with torch.no_grad():
        plain = model(x, t, y_in, **kw)
        with_cache = ca(x, t, y_in, **{STEP_KWARG: 1}, **kw)
    return plain, with_cache, ca


def test_cond_only_leaves_the_uncond_half_identical(model, text, cached):
    for samples in (1, 2):
        plain, out, ca = _one_call(model, text, CacheAttentionConfig(), cached, samples)
        assert torch.equal(out[samples:], plain[samples:]), "unconditional half must be untouched"
        for s in range(samples):
            assert not torch.allclose(out[s], plain[s], atol=1e-4), "conditional half must change"
        assert ca.calls[0].rows == samples * LATENT[1]
    plain, out, _ = _one_call(model, text, CacheAttentionConfig(branches="both"), cached)
    assert not torch.allclose(out[1], plain[1], atol=1e-4)
    # Both halves see the same cache and the same latent: only the caption differs between them.
    assert ca.calls[0].entries == 1


def test_concat_doubles_key_length_and_fusion_concatenates_entries(model, text, cached, monkeypatch):
    frames = LATENT[1]
    tokens = (LATENT[2] // 2) * (LATENT[3] // 2)  # S per frame (patch 2x2)
    other = {k: (v.float() * -0.5 + 0.3).half() for k, v in cached.items()}
    expected = {  # (config, entries) -> key length of block 0's attention
        ("replace", "best", 1): tokens, ("concat", "best", 1): 2 * tokens,
        ("replace", "per_entity", 2): 2 * tokens, ("concat", "per_entity", 2): 3 * tokens,
    }
    for (mode, fusion, n), length in expected.items():
        entries = [cached, other][:n]
        rec = AttentionRecorder(model, monkeypatch)
        try:
            plain, out, ca = _one_call(model, text, CacheAttentionConfig(mode=mode, fusion=fusion), entries)
        finally:
            rec.remove()
        _, k, v, mask = rec.calls[-1][0]  # the cached call comes second
        assert k.shape[2] == length and ca.calls[0].key_length == length, (mode, fusion)
        if length != tokens:  # the unconditional rows keep S real keys, the padding is masked
            assert mask is not None and mask.shape == (2 * frames, 1, 1, length)
            assert mask[:frames].all() and mask[frames:, ..., :tokens].all() and not mask[frames:, ..., tokens:].any()
            assert torch.allclose(out[1], plain[1], atol=1e-5, rtol=1e-5)
        if mode == "concat":  # own keys first, then the cache
            _, k_own, _ = model.spatial_blocks[0].attn.project_qkv(rec.inputs[-1])
            assert torch.equal(k[:frames, :, :tokens], k_own[:frames])
        if n == 2:  # entry 1's keys follow entry 0's
            start = tokens if mode == "concat" else 0
            with torch.no_grad():
                k1, _ = model.spatial_self_attention_kv(other["step_2"][None], torch.tensor([800.0]),
                                                        fps=torch.tensor([24.0]), height=64, width=64)
            assert torch.equal(k[:frames, :, start + tokens: start + 2 * tokens], k1)
    # "best" fusion uses only the first entry even when several are given.
    _, _, ca = _one_call(model, text, CacheAttentionConfig(), [cached, other])
    assert ca.calls[0].entries == 1


def test_full_mode_captures_the_planned_latents(model, text):
    rflow = RFlow()
    kw = _kw(model, text)
    seen = []
    z = make_noise((1, *LATENT), 4)
    for dtype in ("float16", "float32"):
        seen.clear()
        cfg = CacheAttentionConfig(capture_dtype=dtype, full_steps=12)
        with torch.no_grad():
            run = sample_full(rflow, model, z, cfg, callback=lambda s: seen.append(s.z_before.clone()), **kw)
            plain = rflow.sample(model, z, num_steps=12, cfg_scale=7.0, **kw)
        assert torch.equal(run.latent, plain) and len(seen) == 12
        plan = capture_plan(cfg, rflow.schedule(**SIZE, num_steps=12), rflow.schedule(**SIZE, num_steps=8))
        assert run.plan == plan and sorted(run.captured) == ["step_2", "step_3", "step_4"]
        for name, index in plan.items():
            got = run.captured[name]
            assert got.dtype == cfg.torch_capture_dtype and got.shape == LATENT
            assert torch.equal(got, seen[index][0].to(cfg.torch_capture_dtype))


def test_bad_inputs_raise_clear_errors(model, text, cached):
    with pytest.raises(ValueError, match="lacks"):
        CacheAttention(model, CacheAttentionConfig(), {"step_2": cached["step_2"]})
    with pytest.raises(ValueError, match="at least one"):
        CacheAttention(model, CacheAttentionConfig(), [])
    with pytest.raises(ValueError, match="expected"):
        CacheAttention(model, CacheAttentionConfig(), {**cached, "step_3": torch.zeros(4, 5, 8, 6)})
    small = {k: v[:, :, :6, :6] for k, v in cached.items()}
    ca = CacheAttention(model, CacheAttentionConfig(), small)
    x = torch.zeros(2, *LATENT)
    y = torch.cat([text[0], model.y_embedder.y_embedding[None, None]])
    with pytest.raises(ValueError, match="another shape"):
        ca(x, torch.full((2,), 900.0), y, **{STEP_KWARG: 1}, mask=text[1], fps=24, height=64, width=64)
    ca = CacheAttention(model, CacheAttentionConfig(), cached)
    with pytest.raises(ValueError, match="even"):
        ca(x[:1], torch.full((1,), 900.0), y[:1], **{STEP_KWARG: 1}, mask=text[1], fps=24, height=64, width=64)
    assert model.spatial_blocks[0].attn.kv_hook is None
