"""Chorus (whole-prompt reuse) and auto reuse: the STDiT3 hook points, the three stages, the region and the
amplification, the stage map, the new-token rule, and the modes on the store (keys, cancellation, auto's pick).

The small CPU configuration (``tiny_components``) and a bag-of-words whole-prompt embedder keep it fast
and make which prompt serves which exactly known."""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import pytest
import torch

from comfyui_chai.cache.lookup import CacheLookup, LookupConfig
from comfyui_chai.cache.store import LatentStore
from comfyui_chai.opensora.cache_attention import sample_capturing
from comfyui_chai.opensora.chorus import (
    TokenGuidance,
    _ContextKV,
    chorus_capture_plan,
    chorus_latent_name,
    positions_mask,
    region_positions,
    region_tokens,
    sample_chorus,
)
from comfyui_chai.opensora.hooks import HookRegistry, ModelHook
from comfyui_chai.opensora.layers import MultiHeadCrossAttention, TextContext
from comfyui_chai.opensora.rflow import RFlow, RFlowSchedule, SamplingCancelled, make_noise
from comfyui_chai.pipeline import ChaiPipeline, HashedWordCaptions, new_token_columns, tiny_components
from comfyui_chai.pipeline.settings import ChorusSettings, resolve_settings

SIZE = dict(height=64, width=64, num_frames=17)  # latent (4, 5, 8, 8): patch grid (5, 4, 4)
DIM = 64
N = 30


class CommaExtractor:
    """Entities are the comma-separated parts; the whole prompt is its lower-cased words."""

    fingerprint = "comma-v1"

    def extract(self, prompt):
        return [p.strip().lower() for p in prompt.split(",") if p.strip()]

    def normalize_prompt(self, prompt):
        return " ".join(re.findall(r"\w+", prompt.lower()))


class WordBag:
    """Sum of fixed per-word unit vectors, L2-normalised: prompts sharing most words are close."""

    fingerprint = "wordbag-v1"
    dim = DIM

    def encode(self, texts):
        out = []
        for text in texts:
            v = np.zeros(DIM)
            for w in re.findall(r"\w+", text.lower()):
                v += np.random.default_rng(int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little")
                                           ).standard_normal(DIM)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    return tiny_components(0)


@pytest.fixture
def store(tmp_path):
    with LatentStore(tmp_path / "store", dim=DIM) as s:
        yield s


def _pipe(parts, store, **settings):
    model, _vae, captions = parts
    lookup = CacheLookup(store, CommaExtractor(), WordBag(), LookupConfig())
    base = {"chorus_threshold": 0.6, "chorus_k1": (0.2, 0.4), "chorus_k2": (0.5, 0.7), "chorus_window": (0.2, 0.7)}
    return ChaiPipeline(model, None, captions, lookup, size_dtype=torch.float32).with_settings({**base, **settings})


def _snapshot(store):
    return [(e.entry_id, e.compat_key, e.prompt, e.nbytes) for e in store.entries()], store.generation


def _inputs(model, prompt="a red fox in the snow", seed=0):
    captions = HashedWordCaptions(model.config.caption_channels, model.config.model_max_length)
    y, mask = captions.encode(prompt)
    return dict(y=y, y_mask=mask, y_null=model.y_embedder.y_embedding, height=64, width=64, num_frames=17,
                size_dtype=torch.float32), make_noise((1, 4, 5, 8, 8), seed)


def _donor(model, rflow, seed=7):
    """A full run's latents of every step (the window 0..N-1), as a miss stores them."""
    kw, z = _inputs(model, "a red fox in the snow at night", seed)
    schedule = rflow.schedule(64, 64, 17, num_steps=N, size_dtype=torch.float32)
    run = sample_capturing(rflow, model, z, chorus_capture_plan(0, N - 1), schedule=schedule, cfg_scale=7.0,
                           dtype=torch.float32, **kw)
    return run.captured, schedule


def _donor_caption(model):
    """The caption ``(y, mask)`` of :func:`_donor`'s prompt."""
    return HashedWordCaptions(model.config.caption_channels, model.config.model_max_length).encode(
        "a red fox in the snow at night")


class Calls(ModelHook):
    """Records each model call: its timestep, and the rows and positions per frame the blocks computed."""

    name = "calls"

    def __init__(self, model):
        self.model, self.timesteps, self.blocks = model, [], []

    def on_attach(self, model):
        self.handle = model.spatial_blocks[0].register_forward_pre_hook(
            lambda block, args: self.blocks.append((int(args[0].shape[0]), int(args[0].shape[2]))))

    def on_detach(self, model):
        self.handle.remove()

    def forward(self, call_next, x, timestep, y, **kwargs):
        self.timesteps.append(float(timestep[0]))
        return call_next(x, timestep, y, **kwargs)

    @property
    def seen(self):
        return [(t, rows, positions) for t, (rows, positions) in zip(self.timesteps, self.blocks)]


# ------------------------------------------------------------------------------ STDiT3 hook points


def test_the_hook_points_cost_nothing_unused_and_the_region_sees_the_whole_frame(parts):
    model = parts[0]
    kw, z = _inputs(model)
    y = torch.cat([kw["y"], model.y_embedder.y_embedding[None, None]])
    args = dict(mask=kw["y_mask"], fps=24, height=64, width=64)
    x, t = torch.cat([z, z]), torch.tensor([700.0, 700.0])
    with torch.no_grad():
        plain = model(x, t, y, **args)
        with model.cross_attention_hook(lambda layer, q, k, ctx: None):
            assert torch.equal(model(x, t, y, **args), plain)  # a hook that adds nothing changes nothing
        with model.token_subset(torch.arange(16)):
            assert torch.equal(model(x, t, y, **args), plain)  # every position: the plain model
        # The region's positions, with every other position's keys and values from a capture of this input:
        # the same predictions there as the whole model (keys in another order only).
        context, keep = _ContextKV(model), torch.tensor([1, 2, 5, 6, 9])
        with context.capture():
            assert torch.equal(model(x, t, y, **args), plain)
        with model.token_subset(keep), context.filling(keep, 16):
            part = model(x, t, y, **args)
        voxels = positions_mask(keep, (5, 4, 4), model.patch_size, (5, 8, 8)).expand_as(plain)
        assert torch.allclose(part[voxels], plain[voxels], atol=1e-5)
        assert part[~voxels].abs().max() == 0  # positions not computed hold nothing
        with model.token_subset(keep):  # without the other positions' keys, the region alone is another model
            assert not torch.allclose(model(x, t, y, **args)[voxels], plain[voxels], atol=1e-3)
    assert all(b.cross_attn.logit_hook is None for b in model.spatial_blocks) and model._token_subset is None
    with pytest.raises(ValueError, match="distinct"):
        with model.token_subset(torch.tensor([1, 1])):
            pass


def test_tgaa_changes_attention_weights_only_in_the_new_tokens_columns_of_the_conditional_rows(monkeypatch):
    from comfyui_chai.opensora import layers

    torch.manual_seed(0)
    layer = MultiHeadCrossAttention(32, 4)
    x, text = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    key_mask = torch.tensor([True, True, True, True, False]).expand(2, 1, 1, 5)  # the last key is padding
    ctx = TextContext(text, key_mask, (4, 4))
    guidance = TokenGuidance(_LayerModel(layer), columns=[1, 3], alpha=3.0)
    guidance._rows = 1  # one sample: row 0 conditional, row 1 unconditional
    weights = []
    sdpa = layers.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):  # the weights the layer really uses, from what it hands SDPA
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        bias = torch.zeros_like(logits).masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else attn_mask
        w = (logits + bias).softmax(-1)
        weights.append(w)
        out = sdpa(q, k, v, attn_mask=attn_mask, **kw)
        assert torch.allclose(out, w @ v, atol=1e-5)
        return out

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    layer.logit_hook = guidance._logit_hook
    amplified = layer(x, ctx)
    layer.logit_hook = None
    plain = layer(x, ctx)
    w_amp, w_plain = weights
    assert torch.equal(w_amp[1], w_plain[1]) and torch.equal(amplified[1], plain[1])  # unconditional row untouched
    assert (w_amp[..., 4] == 0).all()  # a padded key stays masked
    ratio = w_amp[0] / w_plain[0]  # per query, the other columns keep their relative weights ...
    others = ratio[..., [0, 2]]
    assert torch.allclose(others, others[..., :1].expand_as(others), atol=1e-5)
    assert (others < 1).all()  # ... and lose what the new columns gain
    assert torch.allclose(ratio[..., [1, 3]], 3.0 * others[..., :1].expand(-1, -1, 2), atol=1e-4)
    assert not torch.allclose(amplified[0], plain[0])
    guidance.alpha = 1.0  # no amplification: the plain path, no bias at all
    assert guidance._logit_hook(layer, torch.zeros(2, 4, 6, 8), torch.zeros(2, 4, 5, 8), ctx) is None


class _LayerModel(torch.nn.Module):
    def patch_grid(self, thw):
        return tuple(thw)

    def __init__(self, layer):
        super().__init__()
        self.layer = layer


class SyntheticAttention(torch.nn.Module):
    """A stand-in denoiser whose one cross-attention layer attends to caption column 2 exactly where the
    latent is bright (its value in [0, 1]) and to column 0 elsewhere: the differing token's region is known."""

    patch_size = (1, 1, 1)

    def __init__(self):
        super().__init__()
        self.layer = MultiHeadCrossAttention(4, 1)
        self.hook = None

    def patch_grid(self, thw):
        return tuple(int(v) for v in thw)

    def cross_attention_hook(self, fn):
        import contextlib

        @contextlib.contextmanager
        def installed():
            self.hook = fn
            try:
                yield
            finally:
                self.hook = None
        return installed()

    def forward(self, x, timestep, y, **kwargs):
        b, _, t, h, w = x.shape
        bright = x[:, 0].reshape(b, 1, t * h * w, 1)
        q = 12.0 * (bright * torch.tensor([0.0, 0.0, 1.0, 0.0]) + (1 - bright) * torch.tensor([1.0, 0.0, 0.0, 0.0]))
        k = torch.eye(4)[None, None].expand(b, 1, 4, 4)
        if self.hook is not None:
            self.hook(self.layer, q, k, TextContext(torch.zeros(b, 4, 4), None, (4,) * b))
        return torch.zeros_like(x)


def test_the_region_covers_where_a_differing_token_draws_attention():
    model = SyntheticAttention()
    x = torch.zeros(2, 1, 2, 8, 8)
    x[:, 0, :, 2:4, 5:7] = 1.0  # the region: rows 2-3, columns 5-6 of both frames
    guidance = TokenGuidance(model, columns=[2])
    with HookRegistry.of(model).attached(guidance):
        model(x, torch.tensor([500.0, 500.0]), None)
    tokens = region_tokens(guidance.last_map, guidance.grid, threshold=0.5, dilation=0)
    expected = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    expected[:, :, 2:4, 5:7] = True
    assert torch.equal(tokens, expected)
    grown = region_tokens(guidance.last_map, guidance.grid, threshold=0.5, dilation=1)
    ring = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    ring[:, :, 1:5, 4:8] = True
    assert torch.equal(grown, ring)  # one token more on every side, clipped at the frame's edge
    positions = region_positions(grown)
    assert positions.tolist() == [r * 8 + c for r in range(1, 5) for c in range(4, 8)]
    assert torch.equal(positions_mask(positions, (2, 8, 8), (1, 1, 1), (2, 8, 8))[0, 0], ring[0])
    # a token the prompt shares draws attention nowhere special: the whole frame passes a zero threshold
    assert region_tokens(guidance.last_map, guidance.grid, threshold=0.0, dilation=0).all()


# ------------------------------------------------------------------------------ the three stages


def test_which_steps_run_and_which_are_skipped(parts):
    model = parts[0]
    rflow = RFlow()
    donor, schedule = _donor(model, rflow)
    kw, _z = _inputs(model)
    ts = [float(t) for t in schedule.timesteps]
    calls = Calls(model)
    donor_caption = _donor_caption(model)
    with HookRegistry.of(model).attached(calls):
        run = sample_chorus(rflow, model, donor, k1=6, k2=12, full_steps=N, cfg_scale=7.0, columns=[1],
                            mask_threshold=1.0, dilation=0, tgaa=2.0, tgaa_decay=0.8, donor_caption=donor_caption,
                            donor_columns=[5, 6], **kw)
    assert calls.timesteps == ts[6:] and len(calls.blocks) == 24  # stage 1 (steps 0-5) skipped, later steps once
    first, later, final = calls.seen[0], calls.seen[1:6], calls.seen[6:]
    assert first == (ts[6], 3, 16)  # the whole latent, plus one row under the donor's caption
    assert all(rows == 2 and positions == round(run.region * 16) for _, rows, positions in later)
    assert 0 < run.region < 1
    assert all(rows == 2 and positions == 16 for _, rows, positions in final)  # stage 3: the whole model
    assert (run.k1, run.k2, run.model_steps) == (6, 12, 24)
    assert run.step_equivalents == pytest.approx(18 + 1 + 5 * run.region)
    assert model.hooks.names == [] and model._token_subset is None
    # Nothing differs from the donor: stage 2 computes nothing, the request takes the donor's z_12.
    calls = Calls(model)
    with HookRegistry.of(model).attached(calls):
        same = sample_chorus(rflow, model, donor, k1=6, k2=12, full_steps=N, cfg_scale=7.0, columns=[],
                             mask_threshold=0.5, dilation=0, **kw)
    assert calls.timesteps == ts[12:] and same.model_steps == 18
    plain = rflow.sample(model, donor[chorus_latent_name(12)][None], schedule=_tail(schedule, 12), cfg_scale=7.0, **kw)
    assert torch.equal(same.latent, plain)


def _tail(schedule, start):
    from comfyui_chai.opensora.rflow import RFlowSchedule

    return RFlowSchedule(timesteps=schedule.timesteps[start:], dts=schedule.dts[start:])


def test_stage_two_over_the_whole_latent_without_amplification_is_plain_denoising_bit_for_bit(parts):
    model = parts[0]
    rflow = RFlow()
    donor, schedule = _donor(model, rflow)
    kw, _z = _inputs(model)
    run = sample_chorus(rflow, model, donor, k1=5, k2=20, full_steps=N, cfg_scale=7.0, columns=[1, 2],
                        mask_threshold=0.0, dilation=0, tgaa=1.0, **kw)
    plain = rflow.sample(model, donor[chorus_latent_name(5)][None], schedule=_tail(schedule, 5), cfg_scale=7.0, **kw)
    assert run.region == 1.0 and torch.equal(run.latent, plain)
    amplified = sample_chorus(rflow, model, donor, k1=5, k2=20, full_steps=N, cfg_scale=7.0, columns=[1, 2],
                              mask_threshold=0.0, dilation=0, tgaa=3.0, **kw)
    assert not torch.equal(amplified.latent, plain)  # the amplification does change the result
    with pytest.raises(ValueError, match="K1 <= K2 < N"):
        sample_chorus(rflow, model, donor, k1=5, k2=30, full_steps=N, cfg_scale=7.0, columns=[], mask_threshold=0.5,
                      dilation=0, **kw)
    with pytest.raises(ValueError, match="lacks chorus_z4"):
        sample_chorus(rflow, model, {k: v for k, v in donor.items() if k != "chorus_z4"}, k1=4, k2=9, full_steps=N,
                      cfg_scale=7.0, columns=[], mask_threshold=0.5, dilation=0, **kw)


def test_a_strided_hit_visits_every_sth_step_and_fills_from_donor_latents_on_its_grid(parts):
    model = parts[0]
    rflow = RFlow()
    donor, schedule = _donor(model, rflow)
    kw, _z = _inputs(model)
    ts = [float(t) for t in schedule.timesteps]
    calls, seen_steps, filled = Calls(model), [], []
    donor_caption = _donor_caption(model)

    class Watched(dict):  # records which donor latents stage 2 reads
        def __getitem__(self, name):
            filled.append(name)
            return dict.__getitem__(self, name)

    with HookRegistry.of(model).attached(calls):
        run = sample_chorus(rflow, model, Watched(donor), k1=6, k2=14, full_steps=N, cfg_scale=7.0, columns=[1],
                            mask_threshold=1.0, dilation=0, tgaa=2.0, tgaa_decay=0.8, stride=3,
                            donor_caption=donor_caption, donor_columns=[5, 6],
                            callback=lambda state: seen_steps.append(state.info.index), **kw)
    grid = list(range(6, N, 3))  # 6, 9, ..., 27: K2 = 14 is rounded down to 12, the grid point below it
    assert calls.timesteps == [ts[k] for k in grid] and seen_steps == grid
    assert (run.k1, run.k2, run.stride, run.model_steps) == (6, 12, 3, len(grid))
    assert filled == ["chorus_z6", "chorus_z9", "chorus_z12"]  # stage 2 fills from the grid's own latents
    assert calls.seen[0][1:] == (3, 16) and calls.seen[1][2] == round(run.region * 16)  # stage 2's later step
    assert all(positions == 16 for _, _, positions in calls.seen[2:])  # stage 3 on the whole latent
    assert run.step_equivalents == pytest.approx(6 + 1 + 1 * run.region)
    # Over the whole latent without amplification, a strided hit is plain Euler on the same grid, bit for bit.
    whole = sample_chorus(rflow, model, donor, k1=6, k2=14, full_steps=N, cfg_scale=7.0, columns=[1, 2],
                          mask_threshold=0.0, dilation=0, tgaa=1.0, stride=3, **kw)
    t = schedule.timesteps[grid]
    grid_schedule = RFlowSchedule(timesteps=t, dts=torch.cat([t[:-1] - t[1:], t[-1:]]) / 1000)
    plain = rflow.sample(model, donor[chorus_latent_name(6)][None], schedule=grid_schedule, cfg_scale=7.0, **kw)
    assert torch.equal(whole.latent, plain)
    every = sample_chorus(rflow, model, donor, k1=6, k2=14, full_steps=N, cfg_scale=7.0, columns=[1, 2],
                          mask_threshold=0.0, dilation=0, tgaa=1.0, **kw)
    assert every.model_steps == 24 and not torch.equal(every.latent, plain)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="stride"):
            sample_chorus(rflow, model, donor, k1=6, k2=14, full_steps=N, cfg_scale=7.0, columns=[],
                          mask_threshold=0.5, dilation=0, stride=bad, **kw)
    with pytest.raises(ValueError, match="chorus_stride"):
        ChorusSettings(chorus_stride=0)


# ------------------------------------------------------------------------------ settings and the new-token rule


def test_the_stage_map_is_monotonic_inside_its_window_and_checked():
    c = ChorusSettings(chorus_threshold=0.8, chorus_k1=(0.1, 0.4), chorus_k2=(0.6, 0.9), chorus_window=(0.1, 0.9))
    bounds = [c.stage_bounds(m, 30) for m in np.linspace(0.5, 1.0, 26)]
    assert bounds[0] == (3, 18) and bounds[-1] == (12, 27) and c.window(30) == (3, 27)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(bounds, bounds[1:]))  # a closer donor reuses more
    assert all(3 <= k1 <= k2 <= 27 for k1, k2 in bounds)
    assert ChorusSettings(chorus_stage2=False).stage_bounds(0.9, 30)[0] == ChorusSettings(
        chorus_stage2=False).stage_bounds(0.9, 30)[1]
    s = resolve_settings(None, {"chorus_k1": [0.1, 0.4], "chorus_k2": [0.6, 0.9], "chorus_window": [0.1, 0.9]})
    assert s.chorus == c.__class__(chorus_k1=(0.1, 0.4), chorus_k2=(0.6, 0.9), chorus_window=(0.1, 0.9))
    # What a miss stores names the key; how an entry is used does not.
    assert s.updated({"chorus_tgaa": 4.0, "chorus_k1": (0.2, 0.3)}).chorus_store_fingerprint() == \
        s.chorus_store_fingerprint() == "CHORUS_N30_G7_float16_W3-27"
    assert s.updated({"chorus_window": (0.0, 0.9)}).chorus_store_fingerprint() != s.chorus_store_fingerprint()
    for bad, match in [({"chorus_k1": (0.5, 0.4)}, "chorus_k1"), ({"chorus_window": (0.35, 0.9)}, "inside"),
                       ({"chorus_tgaa": 0.5}, "chorus_tgaa"), ({"chorus_dilation": -1}, "chorus_dilation")]:
        with pytest.raises(ValueError, match=match):
            resolve_settings(None, bad)


def test_the_new_tokens_are_the_words_the_donor_lacks():
    hashed = HashedWordCaptions(16, 12)
    words = hashed.token_words("A blue fox, in the snow!")
    assert words == ["a", "blue", "fox", "in", "the", "snow", None]
    donor = hashed.token_words("the red fox in snow")
    assert new_token_columns(words, donor) == [1]  # "blue"; articles and the end token never count
    assert new_token_columns(donor, words) == [1]  # the donor's "red"
    assert new_token_columns(words, words) == []
    from comfyui_chai.refmodel.model import MiniLMTokenStates

    minilm = MiniLMTokenStates(max_length=32)
    words = minilm.token_words("a red plus-sign sliding left over sand")
    y, mask = minilm.encode("a red plus-sign sliding left over sand")
    assert len(words) == int(mask.sum()) and words[0] is None and words[-1] is None  # [CLS] ... [SEP]
    cols = new_token_columns(words, minilm.token_words("a red cross sliding left over sand"))
    assert sorted({words[c] for c in cols}) == ["plus", "sign"]  # every piece of a new word counts


def test_the_new_tokens_of_opensoras_t5_captions_are_words_of_the_prepared_caption():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from comfyui_chai.opensora.text import T5TextEncoder
    from comfyui_chai.pipeline import T5Captions

    # A SentencePiece-style (Unigram, "▁" word starts) tokenizer like T5's, trained here on a few captions.
    sp = Tokenizer(models.Unigram())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    corpus = ["a red fox in the snow aesthetic score: 6.5.", "a blue whale swimming in the deep ocean",
              "a golden retriever running on a beach at sunset", "snowy mountains under a clear sky"] * 20
    sp.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"],
                                                           unk_token="<unk>"))
    sp.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    captions = T5Captions(T5TextEncoder(t5, tok, max_length=40), "tiny")
    words = captions.token_words("A blue fox in the snow")
    _y, mask = captions.encode("A blue fox in the snow")
    assert len(words) == int(mask.sum()) and words[-1] is None  # one word per real row; </s> has none
    assert [w for w in dict.fromkeys(words) if w] == ["a", "blue", "fox", "in", "the", "snow", "aesthetic", "score",
                                                     "65"]  # the prepared caption: the score suffix included
    assert len(words) > len(set(words))  # words split into several pieces share the word
    cols = new_token_columns(words, captions.token_words("a red fox in the snow"))
    assert cols and {words[c] for c in cols} == {"blue"}  # the suffix is in both prompts


# ------------------------------------------------------------------------------ the modes on the store


def test_a_chorus_miss_stores_its_window_and_a_near_duplicate_is_served_from_it(parts, store):
    pipe = _pipe(parts, store)
    miss = pipe.generate("a red fox running in snow, pine forest", seed=1, mode="chorus", decode=False, **SIZE)
    assert (miss.hit, miss.served_by, miss.steps, len(miss.inserted_entry_ids)) == (False, "full", 30, 1)
    entry = store.load(miss.inserted_entry_id)
    assert sorted(entry) == sorted(chorus_latent_name(k) for k in range(6, 22))  # the window 0.2-0.7 of 30
    assert all(tuple(t.shape) == (4, 5, 8, 8) and t.dtype == torch.float16 for t in entry.values())
    near = pipe.generate("a red fox running in deep snow, pine forest", seed=2, mode="chorus", decode=False,
                         store=False, **SIZE)
    d = near.details
    assert near.hit and near.served_by == "chorus" and near.entry_id == miss.inserted_entry_id
    assert d["new_words"] == ["deep"] and d["missing_words"] == [] and 6 <= d["k1"] < d["k2"] <= 21
    assert d["stride"] == ChorusSettings().chorus_stride == 4  # the default: every 4th step from K1
    assert near.steps == len(range(d["k1"], 30, 4)) and "0.6" in near.reason and near.similarity > 0.6
    same = pipe.generate("A red fox running in snow, pine forest!", seed=3, mode="chorus", decode=False, store=False,
                         **SIZE)
    k1 = same.details["k1"]  # nothing to re-denoise: stage 3 from K2 = 21, rounded down onto the grid
    assert same.hit and same.details["k2"] == k1 + 4 * ((21 - k1) // 4) and same.steps == len(range(same.details["k2"], 30, 4))
    every = _pipe(parts, store, chorus_stride=1).generate("A red fox running in snow, pine forest!", seed=3,
                                                          mode="chorus", decode=False, store=False, **SIZE)
    assert every.steps == 30 - 21 and every.details["k2"] == 21
    # A Chorus hit continues the donor: it does not depend on the request's seed.
    again = pipe.generate("A red fox running in snow, pine forest!", seed=99, mode="chorus", decode=False,
                          store=False, **SIZE)
    assert torch.equal(again.latent, same.latent)


def test_a_donor_of_another_compatibility_key_is_never_used(parts, store):
    prompt = "a red fox running in snow, pine forest"
    base = _pipe(parts, store)
    assert base.generate(prompt, mode="chorus", decode=False, **SIZE).inserted_entry_id is not None
    assert base.generate(prompt, mode="chorus", decode=False, store=False, **SIZE).hit
    others = [base.with_settings({"cfg_scale": 5.0}), base.with_settings({"full_steps": 20}),
              base.with_settings({"capture_dtype": "float32"}),
              base.with_settings({"chorus_window": (0.1, 0.7), "chorus_k1": (0.2, 0.4)})]
    for other in others:
        r = other.generate(prompt, mode="chorus", decode=False, store=False, **SIZE)
        assert not r.hit and r.served_by == "full" and r.similarity is None  # nothing of its key to compare
    r = base.generate(prompt, mode="chorus", decode=False, store=False, height=80, width=64, num_frames=17)
    assert not r.hit
    # CHAI's entries (another key, another lookup) never serve Chorus, nor the reverse.
    assert not base.generate("a blue kite, windy beach", mode="warm", decode=False, **SIZE).hit
    assert not base.generate("a blue kite, windy beach", mode="chorus", decode=False, store=False, **SIZE).hit
    assert not base.generate("a red fox running in snow, pine forest", mode="chai", decode=False, store=False,
                             **SIZE).hit


def test_a_failed_or_cancelled_chorus_or_auto_request_leaves_the_store_unchanged(parts, store):
    pipe = _pipe(parts, store)
    pipe.generate("a red fox running in snow, pine forest", mode="auto", decode=False, **SIZE)
    before = _snapshot(store)

    def cancel_after(n):
        calls = {"n": 0}

        def should_cancel():
            calls["n"] += 1
            return calls["n"] > n
        return should_cancel

    for mode, prompt, after in [("chorus", "a green boat on a calm lake", 12), ("auto", "a green boat on a calm lake", 20),
                                ("chorus", "a red fox running in deep snow, pine forest", 3),
                                ("auto", "a red fox running in deep snow, pine forest", 2)]:
        with pytest.raises(SamplingCancelled):
            pipe.generate(prompt, mode=mode, decode=False, should_cancel=cancel_after(after), **SIZE)

    def explode(state):
        if state.info.index == 25:
            raise RuntimeError("out of memory (simulated)")
    for mode in ("chorus", "auto"):
        with pytest.raises(RuntimeError, match="simulated"):
            pipe.generate("a yellow tram in an old town", mode=mode, decode=False, on_step=explode, **SIZE)
    assert _snapshot(store) == before and store.verify().ok
    assert pipe.generate("a red fox running in deep snow, pine forest", mode="auto", decode=False, store=False,
                         **SIZE).served_by == "chorus"


def test_auto_serves_chorus_else_chai_else_full_and_says_why(parts, store):
    pipe = _pipe(parts, store)
    first = pipe.generate("a red fox running in snow, pine forest", seed=1, mode="auto", decode=False, **SIZE)
    assert (first.served_by, first.hit, first.steps) == ("full", False, 30)
    assert "no whole-prompt donor" in first.reason and "no entity hit" in first.reason
    keys = {e.compat_key for e in store.entries()}
    assert len(first.inserted_entry_ids) == 2 and len(keys) == 2  # one trajectory, a Chorus and a CHAI entry
    chai_entry = next(e for e in store.entries() if "CHAI_" in e.compat_key)
    assert sorted(store.load(chai_entry.entry_id)) == ["step_2", "step_3", "step_4"]

    near = pipe.generate("a red fox running in deep snow, pine forest", seed=2, mode="auto", decode=False, **SIZE)
    assert (near.served_by, near.hit) == ("chorus", True) and near.reason.startswith("whole-prompt donor")
    shared = pipe.generate("a red fox running in snow, sunny meadow by a river", seed=3, mode="auto", decode=False,
                           **SIZE)
    assert (shared.served_by, shared.steps, shared.hit) == ("chai", 8, True)
    assert "no whole-prompt donor" in shared.reason and "'a red fox running in snow'" in shared.reason
    assert shared.lookup.mode == "entity" and shared.inserted_entry_ids == []
    new = pipe.generate("a green boat, calm lake", seed=4, mode="auto", decode=False, **SIZE)
    assert new.served_by == "full" and len(new.inserted_entry_ids) == 2
    stats = store.stats()
    assert (stats.lookups, stats.hits) == (4, 2)  # one lookup counted per request: the one that decided
    # Without a store auto runs full and stores nothing.
    model, _vae, captions = parts
    bare = ChaiPipeline(model, None, captions, None, size_dtype=torch.float32)
    r = bare.generate("a green boat, calm lake", mode="auto", decode=False, **SIZE)
    assert (r.served_by, r.inserted_entry_ids, r.reason) == ("full", [], "no whole-prompt donor (no store); "
                                                             "no entity hit (no store)")


def test_an_auto_miss_too_large_for_the_budget_says_why_for_each_entry_it_could_not_store(parts, tmp_path):
    from comfyui_chai.nodes.sampler_nodes import _report_line

    with LatentStore(tmp_path / "small", dim=DIM, budget_bytes=4096) as small:  # holds neither entry
        r = _pipe(parts, small).generate("a green boat, calm lake", mode="auto", decode=False, **SIZE)
        assert small.stats().entries == 0
    assert (r.served_by, r.inserted_entry_ids, len(r.not_stored)) == ("full", [], 2)
    assert all("more than the store's whole budget" in why for why in r.not_stored)
    line = _report_line(r.summary())
    assert line.startswith("miss (no whole-prompt donor") and line.count("not cached") == 2


# ------------------------------------------------------------------------------ ComfyUI


def test_the_sampler_node_runs_its_reuse_input_and_a_saved_mode_auto_still_runs_chai(tmp_path):
    from comfyui_chai.nodes import NODES, models, registry
    from comfyui_chai.nodes.comfy_v3 import node_info
    from comfyui_chai.nodes.sampler_nodes import CHAISampler, run_mode

    def node(node_id, *args, **kwargs):
        return NODES[node_id].execute(*args, **kwargs)

    definition = node_info(NODES["CHAI_Sampler"])["input"]
    modes, reuse = definition["required"]["mode"][1]["options"], definition["optional"]["reuse"]
    assert modes[0] == "chai" and "auto" in modes and "plain_fast" in modes and "chorus" not in modes
    assert reuse[0] == "COMBO" and reuse[1]["options"] == ["chai", "chorus", "auto"] and reuse[1]["default"] == "chai"
    assert all(name in reuse[1]["tooltip"] for name in ("chai:", "chorus:", "auto:"))
    assert (run_mode("auto"), run_mode("auto", "chorus"), run_mode("chai", "auto"), run_mode("full", "chorus")) == \
        ("chai", "chorus", "auto", "full")
    with pytest.raises(ValueError, match="reuse must be one of chai, chorus, auto"):
        run_mode("chai", "warm")
    model, = node("CHAI_LoadSTDiT3", models.TINY).args
    enc, = node("CHAI_LoadTextEncoder", models.TINY_HASHED).args
    chorus, = node("CHAI_ChorusSettings", threshold=0.5, k1_low=0.2, k1_high=0.4, k2_low=0.5, k2_high=0.7,
                   window_low=0.2, window_high=0.7).args
    with pytest.raises(ValueError, match="^CHAI Chorus Settings: .*chorus_k1"):
        node("CHAI_ChorusSettings", k1_low=0.6, k1_high=0.5)
    try:
        cache, = node("CHAI_Cache", str(tmp_path / "store"), 64, "lru", create_new=True).args

        def run(prompt, seed, **kw):
            cond, = node("CHAI_TextEncode", enc, prompt).args
            ents = node("CHAI_EntityExtractor", cond, "entity").args[0]
            lookup = node("CHAI_CacheLookup", cache, ents, 0.72).args[0]
            inputs = dict(zip(("seed", "resolution", "aspect_ratio", "num_frames", "height", "width", "steps",
                               "fast_steps", "cfg"), (seed, "144p", "9:16", 17, 32, 32, 6, 4, 7.0)), lookup=lookup, **kw)
            out = node("CHAI_Sampler", [model], [cond], **{k: [v] for k, v in inputs.items()})  # the node takes lists
            return out.ui["chai_run"][0], out.args[1][0], out.ui["chai_stats"][0]

        # A workflow saved before auto reuse existed holds mode "auto" (CHAI's old name) and no reuse value.
        saved, _report, _panel = run("a red fox running through snow", 1, mode="auto")
        assert (saved["sampling_mode"], saved["served_by"]) == ("chai", "full")
        assert all("CHAI_" in e.compat_key for e in cache.store.entries())
        assert CHAISampler.fingerprint_inputs(mode=["auto"], reuse=["chorus"]) != ("",)  # reads the store

        miss, report, _panel = run("a red fox running through deep snow", 2, mode="chai", reuse="chorus",
                                   chorus_settings=chorus)
        assert miss["served_by"] == "full" and report.startswith("miss (") and "stored as entry #2" in report
        hit, report, panel = run("a red fox running through deep white snow", 3, mode="chai", reuse="chorus",
                                 chorus_settings=chorus)
        assert hit["hit"] and hit["served_by"] == "chorus" and hit["details"]["new_words"] == ["white"]
        assert report.startswith("hit: served by chorus (whole prompt ~ 'a red fox running through deep snow'")
        assert panel["last_run"]["served_by"] == "chorus" and "whole prompt" in panel["last_run"]["reason"]
        picked, _report, _panel = run("a red fox running through deep white snow", 4, mode="auto", reuse="auto",
                                      chorus_settings=chorus)
        assert picked["sampling_mode"] == "auto" and picked["served_by"] == "chorus"
    finally:
        registry.close_all()


def test_generate_reuse_on_the_command_line(tmp_path, monkeypatch, capsys):
    import json

    from comfyui_chai.cache import embed as embed_mod
    from comfyui_chai.cache import entities as entities_mod
    from comfyui_chai.cli import main

    class Extractor(CommaExtractor):
        def __init__(self, mode="entity"):
            self.mode = mode

    monkeypatch.setattr(entities_mod, "EntityExtractor", Extractor)
    monkeypatch.setattr(embed_mod, "Embedder", WordBag)
    prompts = ["a red fox running in snow, pine forest", "a red fox running in deep snow, pine forest",
               "a red fox running in snow, sunny meadow by a river", "a green boat, calm lake"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    args = ["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--store", str(tmp_path / "store"),
            "--model", "tiny", "--captions", "hashed", "--no-progress", "--num-frames", "17", "--reuse", "auto",
            "--chorus-threshold", "0.6", "--chorus-k1", "0.2", "0.4", "--chorus-k2", "0.5", "0.7",
            "--chorus-window", "0.2", "0.7"]
    assert main(args) == 0
    printed = capsys.readouterr().out  # the command line's output says what served each prompt and why
    assert "| served by | why |" in printed and "| chorus | whole-prompt donor: whole prompt ~" in printed
    assert "served by full 2, chorus 1, chai 1" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["mode"] == "auto" and report["run"]["settings"]["chorus"]["chorus_threshold"] == 0.6
    rows = report["prompts"]
    assert [r["served_by"] for r in rows] == ["full", "chorus", "chai", "full"]
    assert rows[1]["reason"].startswith("whole-prompt donor") and "no entity hit" in rows[3]["reason"]
    assert report["totals"]["served_by"] == {"full": 2, "chorus": 1, "chai": 1}
    md = (out / "report.md").read_text()
    assert "| served by | why |" in md and "served by full 2, chorus 1, chai 1" in md
    # with intra-request caching: the same requests, each with a MixCache step map; keys name the hook
    cached_out = tmp_path / "cached"
    assert main([*args[:4], str(cached_out), "--store", str(tmp_path / "cached-store"), *args[7:], "--intra",
                 "mixcache"]) == 0
    cached = json.loads((cached_out / "report.json").read_text())
    assert [r["served_by"] for r in cached["prompts"]] == ["full", "chorus", "chai", "full"]
    assert all(len(r["hook_reports"]["mixcache"]["map"]) == r["steps"] for r in cached["prompts"])
    assert "|hooks=mixcache" in cached["run"]["compat_key"]
    capsys.readouterr()
    assert main(args[:-13] + ["--reuse", "chorus", "--mode", "full"]) == 2
    assert "name different modes" in capsys.readouterr().err


# ------------------------------------------------------------------------------ measurement


def test_the_harness_and_the_stream_run_chorus_and_auto_by_name():
    from comfyui_chai.pipeline.modes import parse_mode_spec
    from comfyui_chai.pipeline.quality import run_quality
    from comfyui_chai.pipeline.stream import format_stream_table, run_prompts
    from comfyui_chai.refmodel import model as R
    from comfyui_chai.refmodel.quality import heldout_prompts

    model, encoder = R.load_reference_model(R.default_model_dir())
    stage1 = parse_mode_spec("chorus").variant("chorus-stage1", chorus_stage2=False)
    rep = run_quality(model, encoder, heldout_prompts(1), lookup=False, modes=("chorus", stage1, "auto"), warm="near")
    assert list(rep.modes) == ["full30", "chorus", "chorus-stage1", "auto"] and rep.warm == "near"
    assert rep.lookup_hits == {"chorus": 1, "chorus-stage1": 1, "auto": 1}  # the hermetic lookup pairs them
    chorus, only1 = rep.modes["chorus"], rep.modes["chorus-stage1"]
    assert chorus.served == ["chorus"] and rep.modes["auto"].served == ["chorus"]
    assert only1.details[0]["k1"] == only1.details[0]["k2"] and chorus.details[0]["k2"] > chorus.details[0]["k1"]
    assert rep.summary()["modes"]["chorus"]["mean_model_steps"] == chorus.steps_run[0] < 30
    prompts = ["a red circle moving left on a black background", "a red circle moving left on a black background",
               "a video of a green star rising in a blue sky"]
    stream = run_prompts(model, encoder, prompts, modes=("auto",), settings={"chorus_threshold": 0.9})
    auto = stream.runs["auto"]
    assert auto.served[:2] == ["full", "chorus"] and auto.hit[:2] == [False, True] and len(auto.scores) == 3
    s = stream.summary()["modes"]
    assert s["full"]["speedup_vs_full"] == 1.0 and s["auto"]["hits"] == sum(auto.hit) and s["auto"]["entries"] >= 2
    assert "| auto |" in format_stream_table(stream)


def test_the_reuse_bench_parses_variants_and_refuses_bad_settings(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "reuse_bench.py"
    spec = importlib.util.spec_from_file_location("reuse_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_variant("v:chorus_k1=(0.1, 0.3),chorus_tgaa=2") == ("v", {"chorus_k1": (0.1, 0.3),
                                                                             "chorus_tgaa": 2})
    with pytest.raises(SystemExit):
        bench.main(["--set", "chorus_k1=(0.5, 0.4)", "--prompts", "0", "--stream", "0", "--out", str(tmp_path)])
