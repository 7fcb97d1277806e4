"""Named, removable model hooks (opensora/hooks.py) and Cache Attention as the first of them."""

from __future__ import annotations

import pytest
import torch

from comfyui_chai.opensora.cache_attention import STEP_KWARG, CacheAttention, CacheAttentionConfig, sample_fast
from comfyui_chai.opensora.hooks import HookError, HookRegistry, ModelHook
from comfyui_chai.opensora.rflow import RFlow, make_noise
from comfyui_chai.pipeline import HashedWordCaptions, tiny_components

LATENT = (4, 5, 8, 8)
SIZE = dict(height=64, width=64, num_frames=17)


class Recorder(ModelHook):
    """Passes every call through and records the order it ran in."""

    def __init__(self, name, log, incompatible=()):
        self.name, self.log, self.incompatible = name, log, tuple(incompatible)
        self.attached_to = None

    def on_attach(self, model):
        self.attached_to = model

    def on_detach(self, model):
        self.attached_to = None

    def forward(self, call_next, *args, **kwargs):
        self.log.append(self.name)
        return call_next(*args, **kwargs)


class Scale(ModelHook):
    """Replaces the model output: what a hook returns is what the caller gets."""

    name = "scale"

    def forward(self, call_next, *args, **kwargs):
        return 2.0 * call_next(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    model, _vae, _enc = tiny_components(0)
    captions = HashedWordCaptions(64, 24)
    y, mask = captions.encode("a red fox in the snow")
    return model, y, mask


def _call(model, y, mask, **extra):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((2, *LATENT), generator=gen)
    y2 = torch.cat([y, model.y_embedder.y_embedding[None, None]])
    with torch.no_grad():
        return model(x, torch.full((2,), 700.0), y2, mask=mask, fps=24, height=64, width=64, **extra)


def test_attach_detach_order_and_a_clean_model(tiny):
    model, y, mask = tiny
    plain = _call(model, y, mask)
    registry = model.hooks
    assert registry is HookRegistry.of(model) and registry.names == [] and "forward" not in model.__dict__
    log = []
    outer, inner = Recorder("outer", log), Recorder("inner", log)
    registry.attach(outer)
    registry.attach(inner)
    assert registry.names == ["outer", "inner"] and outer.attached_to is model and "inner" in registry
    assert torch.equal(_call(model, y, mask), plain) and log == ["outer", "inner"]  # outermost first
    with registry.attached(Scale()):
        assert torch.equal(_call(model, y, mask), 2.0 * plain)
    assert registry.names == ["outer", "inner"]
    assert registry.detach("outer") is outer and outer.attached_to is None
    log.clear()
    _call(model, y, mask)
    assert log == ["inner"]
    registry.detach("inner")
    assert len(registry) == 0 and "forward" not in model.__dict__  # the class's forward again
    assert torch.equal(_call(model, y, mask), plain)


def test_the_registry_refuses_what_must_not_stack(tiny):
    model, _y, _mask = tiny
    registry = model.hooks
    log = []
    registry.attach(Recorder("a", log))
    try:
        with pytest.raises(HookError, match="already attached"):
            registry.attach(Recorder("a", log))
        with pytest.raises(HookError, match="cannot be stacked"):  # the newcomer declares it
            registry.attach(Recorder("b", log, incompatible=("a",)))
        registry.attach(Recorder("c", log))
        with pytest.raises(HookError, match="no hook named"):
            registry.detach("b")
        with pytest.raises(HookError, match="no name"):
            registry.attach(ModelHook())
        with pytest.raises(TypeError, match="ModelHook"):
            registry.attach(lambda *a: a, name="fn")
        assert registry.names == ["a", "c"]
    finally:
        for name in registry.names:
            registry.detach(name)
    greedy = Recorder("greedy", log, incompatible=("late",))
    registry.attach(greedy)
    try:  # the attached hook declares the newcomer incompatible
        with pytest.raises(HookError, match="'late' cannot be stacked with the attached hook 'greedy'"):
            registry.attach(Recorder("late", log))
    finally:
        registry.detach("greedy")
    # attached() detaches on error too
    with pytest.raises(RuntimeError, match="boom"):
        with registry.attached(Recorder("x", log)):
            raise RuntimeError("boom")
    assert registry.names == []


def test_cache_attention_is_a_hook_and_stacks_with_a_compatible_one(tiny):
    model, y, mask = tiny
    gen = torch.Generator().manual_seed(5)
    cached = {f"step_{s}": torch.randn(LATENT, generator=gen) for s in (2, 3, 4)}
    cfg = CacheAttentionConfig()
    direct = CacheAttention(model, cfg, cached)
    x = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(3))
    y2 = torch.cat([y, model.y_embedder.y_embedding[None, None]])
    kw = dict(mask=mask, fps=24, height=64, width=64)
    with torch.no_grad():
        wrapped = direct(x, torch.full((2,), 700.0), y2, **{STEP_KWARG: 1}, **kw)
        hooked = CacheAttention(model, cfg, cached)
        with model.hooks.attached(hooked):
            assert model.hooks.names == ["cache_attention"]
            through_model = model(x, torch.full((2,), 700.0), y2, **{STEP_KWARG: 1}, **kw)
            not_a_cache_step = model(x, torch.full((2,), 700.0), y2, **{STEP_KWARG: 0}, **kw)
        plain = model(x, torch.full((2,), 700.0), y2, **kw)
    assert torch.equal(through_model, wrapped) and not torch.equal(through_model, plain)
    assert torch.equal(not_a_cache_step, plain)
    assert [c.step for c in hooked.calls] == [2]

    rflow = RFlow()
    sample = dict(y=y, y_mask=mask, y_null=model.y_embedder.y_embedding, size_dtype=torch.float32, **SIZE)
    z = make_noise((1, *LATENT), 7)
    with torch.no_grad():
        alone, ca = sample_fast(rflow, model, z, cfg, cached=cached, **sample)
        log = []
        with model.hooks.attached(Recorder("counter", log)):
            stacked, _ = sample_fast(rflow, model, z, cfg, cached=cached, **sample)
            assert model.hooks.names == ["counter"]  # sample_fast took its hook off again
        assert torch.equal(stacked, alone) and len(log) == 8  # one model call per step, cache steps included
        with model.hooks.attached(Recorder("skip-block-0", log, incompatible=("cache_attention",))):
            with pytest.raises(HookError, match="cannot be stacked"):
                sample_fast(rflow, model, z, cfg, cached=cached, **sample)
    assert model.hooks.names == [] and [c.step for c in ca.calls] == [2, 3, 4]
    for blk in model.spatial_blocks:
        assert blk.attn.kv_hook is None
