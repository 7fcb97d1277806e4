"""Sentence embeddings (cache/embed.py): shapes, normalisation, determinism, threads, fingerprints, errors."""

import shutil

import numpy as np
import pytest
import torch

from comfyui_chai.cache import embed as embed_mod
from comfyui_chai.cache.embed import (
    DEFAULT_MODEL_ID,
    DEFAULT_WEIGHTS_SHA256,
    Embedder,
    EmptyInputError,
    ModelNotFoundError,
    UnsafeWeightsError,
    WeightsMismatchError,
    default_model_path,
)

PHRASES = ["golden retriever", "beach", "sunset", "a red car on a wet street", "bamboo forest", "panda",
           "astronaut", "horse", "the moon", "eiffel tower", "coffee cup", "snowy mountain peaks"]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A second sentence-transformers model, built offline: random 2-layer BERT + the packaged tokenizer."""
    from transformers import BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    from sentence_transformers import SentenceTransformer

    root = tmp_path_factory.mktemp("tiny_st")
    bert_dir = root / "bert"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(str(bert_dir), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        src = default_model_path() / name
        if src.is_file():
            shutil.copy(src, bert_dir / name)
    word = Transformer(str(bert_dir), max_seq_length=64)
    width = (getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension)()
    pool = Pooling(width, "mean")
    out = root / "st"
    SentenceTransformer(modules=[word, pool], device="cpu").save(str(out))
    return out


def test_shape_dtype_and_unit_norm(embedder):
    vecs = embedder.encode(PHRASES)
    assert vecs.shape == (len(PHRASES), 384) and embedder.dim == 384
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(vecs).all()


def test_deterministic(embedder):
    np.testing.assert_array_equal(embedder.encode(PHRASES[:5]), embedder.encode(PHRASES[:5]))


def test_batch_equals_single(embedder):
    batch = embedder.encode(PHRASES)
    single = np.stack([embedder.encode([p])[0] for p in PHRASES])
    np.testing.assert_allclose(batch, single, atol=2e-5)
    small_batches = Embedder(batch_size=3).encode(PHRASES)
    np.testing.assert_allclose(batch, small_batches, atol=2e-5)


def test_similarity_sanity(embedder):
    dog, puppy, skyscraper = embedder.encode(["dog", "puppy", "skyscraper"])
    assert float(dog @ puppy) > float(dog @ skyscraper) + 0.2
    a, b, c = embedder.encode(["A golden retriever running on a beach at sunset",
                               "A dog runs along the shore as the sun goes down",
                               "an astronaut riding a horse on the moon"])
    assert float(a @ b) > float(a @ c)


def _spy_threads(monkeypatch, embedder):
    model = embedder._load()
    seen = []
    original = model.encode

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "encode", spy)
    return seen


def test_one_thread_for_small_inputs_and_restored(monkeypatch, embedder):
    seen = _spy_threads(monkeypatch, embedder)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        embedder.encode(["one phrase"])
        assert seen[-1] == 1, "a single phrase must run with one torch thread"
        assert torch.get_num_threads() == 2, "the caller's thread count must be restored"
        big = Embedder(single_thread_max=2)
        big.encode(PHRASES[:5])
        assert seen[-1] == 2, "large inputs keep the caller's thread count"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_thread_count_restored_after_error(monkeypatch, embedder):
    model = embedder._load()

    def boom(*args, **kwargs):
        raise RuntimeError("model failure")

    monkeypatch.setattr(model, "encode", boom)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="model failure"):
            embedder.encode(["x"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_default_fingerprint_names_model_and_weights(embedder):
    fp = embedder.fingerprint
    assert fp.startswith(DEFAULT_MODEL_ID + "@" + DEFAULT_WEIGHTS_SHA256[:12])
    assert DEFAULT_WEIGHTS_SHA256.startswith("53aa5117")
    assert fp == Embedder().fingerprint


def test_second_model_has_other_fingerprint_and_dim(embedder, tiny_model_dir):
    tiny = Embedder(str(tiny_model_dir))
    assert tiny.fingerprint != embedder.fingerprint
    assert tiny.fingerprint.startswith("local:st@")
    vecs = tiny.encode(["a dog", "a cat"])
    assert vecs.shape == (2, 32) and tiny.dim == 32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_fingerprint_changes_with_weights(tmp_path, tiny_model_dir):
    copy = tmp_path / "st"
    shutil.copytree(tiny_model_dir, copy)
    fp_before = Embedder(str(copy)).fingerprint
    weights = next(copy.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last tensor value
    weights.write_bytes(bytes(data))
    assert Embedder(str(copy)).fingerprint != fp_before


def test_default_weights_hash_is_checked(monkeypatch):
    monkeypatch.setattr(embed_mod, "DEFAULT_WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(WeightsMismatchError, match="Reinstall"):
        _ = Embedder().fingerprint


def test_missing_folder_and_unknown_name(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Embedder(str(tmp_path / "no_such_model"))
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        Embedder("no-such-org-xyz/no-such-model-xyz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no model weights"):
        Embedder(str(empty))


def test_pickle_only_folder_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "modules.json").write_text("[]")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UnsafeWeightsError, match="safetensors"):
        Embedder(str(folder))


@pytest.mark.parametrize("bad,exc,match", [
    ([], EmptyInputError, "empty list"),
    (["ok", ""], EmptyInputError, r"texts\[1\]"),
    (["ok", "   "], EmptyInputError, r"texts\[1\]"),
    (["ok", 3], TypeError, r"texts\[1\]"),
    ("a bare string", TypeError, "list of strings"),
    (None, TypeError, "list of strings"),
])
def test_bad_input(embedder, bad, exc, match):
    with pytest.raises(exc, match=match):
        embedder.encode(bad)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(batch_size=0)
    with pytest.raises(ValueError, match="device"):
        Embedder(device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Embedder(device="cuda")
