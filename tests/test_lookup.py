"""CacheLookup: ranking, threshold, compatibility keys, modes, fall-through on bad files, stats.

The ranking tests use an extractor that splits on commas and an embedder with hand-set vectors, so
every similarity is known exactly; the last tests run the real spaCy + MiniLM stack.
"""

import zlib

import numpy as np
import pytest
import torch

from comfyui_chai.cache.lookup import DEFAULT_THRESHOLD, CacheLookup, LookupConfig
from comfyui_chai.cache.store import LatentStore

DIM = 8


class CommaExtractor:
    """Entities are the comma-separated parts of the prompt (known exactly in tests)."""

    fingerprint = "comma-v1"

    def extract(self, prompt):
        if not prompt.strip():
            raise ValueError("empty prompt")
        return [p.strip() for p in prompt.split(",") if p.strip()]

    def normalize_prompt(self, prompt):
        return " ".join(prompt.lower().split())


class TableEmbedder:
    """Each text maps to a fixed unit vector; unknown texts get a seeded random one."""

    fingerprint = "table-v1"

    def __init__(self, table=None):
        self.table = dict(table or {})

    def encode(self, texts):
        out = []
        for text in texts:
            if text not in self.table:
                # A stable seed: Python's str hash changes between processes.
                rng = np.random.default_rng(zlib.crc32(text.encode("utf-8")))
                v = rng.normal(size=DIM)
                self.table[text] = v / np.linalg.norm(v)
            out.append(self.table[text])
        return np.asarray(out, dtype=np.float32)


def unit(*components):
    v = np.zeros(DIM, dtype=np.float32)
    for i, c in enumerate(components):
        v[i] = c
    return v / np.linalg.norm(v)


def latents(value):
    return {"step_2": torch.full((2, 3, 4), float(value)), "step_3": torch.full((2, 3, 4), float(value) + 0.5)}


@pytest.fixture
def setup(tmp_path):
    table = {
        "fox": unit(1, 0, 0),
        "river": unit(0, 1, 0),
        "snow": unit(0, 0, 1),
        "wolf": unit(0.85, np.sqrt(1 - 0.85**2), 0),  # cosine 0.85 with "fox"
        "dog": unit(0.6, 0, 0, 0.8),  # cosine 0.6 with "fox"
    }
    store = LatentStore(tmp_path / "store", dim=DIM)
    lookup = CacheLookup(store, CommaExtractor(), TableEmbedder(table), LookupConfig(threshold=0.8))
    yield store, lookup
    store.close()


def insert(lookup, prompt, value, key="K"):
    result = lookup.lookup(prompt, key, record=False)
    return lookup.insert(result, latents(value), {"value": value})


def test_miss_then_entity_hit_serves_the_stored_latents(setup):
    store, lookup = setup
    first = lookup.lookup("fox, snow", "K")
    assert not first.hit and first.latents is None
    entry = lookup.insert(first, latents(1.0))
    second = lookup.lookup("river, fox", "K")
    assert second.hit and second.entry_id == entry
    assert second.entity == "fox" and second.matched == "fox"
    assert second.similarity == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(second.latents["step_2"], latents(1.0)["step_2"])
    assert second.prompt_matched == "fox, snow"
    per = {s.entity: s for s in second.per_entity}
    assert per["fox"].hit and per["fox"].entry_id == entry
    assert per["river"].matched in ("fox", "snow") and not per["river"].hit


def test_threshold_decides_hit_or_miss(setup):
    store, lookup = setup
    insert(lookup, "fox", 1.0)
    near = lookup.lookup("wolf", "K")  # cosine 0.85 >= 0.8
    far = lookup.lookup("dog", "K")  # cosine 0.6 < 0.8
    assert near.hit and near.similarity == pytest.approx(0.85, abs=1e-4)
    assert not far.hit and far.similarity == pytest.approx(0.6, abs=1e-4)
    strict = CacheLookup(store, lookup.extractor, lookup.embedder, LookupConfig(threshold=0.9))
    assert not strict.lookup("wolf", "K").hit


def test_ties_go_to_the_entry_matching_more_entities(setup):
    store, lookup = setup
    both = insert(lookup, "fox, river", 1.0)
    insert(lookup, "fox", 2.0)  # newer, same best similarity (1.0) but matches only one entity
    result = lookup.lookup("fox, river", "K")
    assert result.hit and result.entry_id == both and result.entities_matched == 2
    newest = lookup.lookup("fox", "K")  # one entity: both entries tie on everything -> newest wins
    assert newest.entry_id != both


def test_ties_then_go_to_the_more_specific_entity(setup):
    """Equal similarity and entity count: the entry sharing the entity fewer entries hold wins, even
    when it is older (a common background says less than a rare object)."""
    store, lookup = setup
    fox = insert(lookup, "fox", 1.0)
    snowy = [insert(lookup, "snow", 2.0 + i) for i in range(3)]  # newer, all tie with the fox entry
    result = lookup.lookup("fox, snow", "K")
    assert result.hit and result.entry_id == fox and result.entity == "fox"
    assert result.entities_matched == 1 and result.entity_sharers == 1
    assert result.summary()["entity_sharers"] == 1
    # The other way round: with four "fox" entries against three "snow" ones, the newest snow entry wins.
    for i in range(3):
        insert(lookup, "fox", 10.0 + i)
    flipped = lookup.lookup("snow, fox", "K")
    assert flipped.entry_id == snowy[-1] and flipped.entity == "snow" and flipped.entity_sharers == 3


def test_higher_similarity_beats_more_entities(setup):
    store, lookup = setup
    insert(lookup, "wolf, river", 1.0)  # matches "fox" at 0.85 and "river" at 1.0
    exact = insert(lookup, "snow", 2.0)
    result = lookup.lookup("snow, fox", "K")
    assert result.entry_id == exact and result.similarity == pytest.approx(1.0, abs=1e-5)


def test_entries_of_another_compatibility_key_never_match(setup):
    store, lookup = setup
    insert(lookup, "fox", 1.0, key="model-a|4x15x30x53")
    assert not lookup.lookup("fox", "model-b|4x15x30x53").hit
    assert not lookup.lookup("fox", "model-a|4x30x60x106").hit
    assert lookup.lookup("fox", "model-a|4x15x30x53").hit
    other_embedder = TableEmbedder(lookup.embedder.table)
    other_embedder.fingerprint = "another-model"
    assert not CacheLookup(store, lookup.extractor, other_embedder, lookup.config).lookup(
        "fox", "model-a|4x15x30x53").hit


def test_prompt_mode_only_hits_the_same_prompt(setup):
    store, lookup = setup
    whole = CacheLookup(store, lookup.extractor, lookup.embedder, LookupConfig(threshold=0.8, mode="prompt"))
    first = whole.lookup("Fox, Snow", "K")
    assert first.entities == ["fox, snow"]
    whole.insert(first, latents(1.0))
    assert whole.lookup("fox,  snow", "K").hit
    assert not whole.lookup("fox, river", "K").hit
    assert not lookup.lookup("fox", "K").hit  # entity mode never sees prompt-mode entries


def test_corrupt_best_entry_falls_through_to_the_next_and_is_quarantined(setup):
    store, lookup = setup
    good = insert(lookup, "fox, river", 1.0)
    bad = insert(lookup, "fox, river", 2.0)  # newer: ranked first
    bad_file = store.path / "latents" / f"{bad}.safetensors"
    raw = bytearray(bad_file.read_bytes())
    raw[-3] ^= 0xFF
    bad_file.write_bytes(bytes(raw))
    result = lookup.lookup("fox, river", "K")
    assert result.hit and result.entry_id == good
    assert store.entry(bad) is None
    assert list((store.path / "quarantine").glob(f"{bad}-*.safetensors"))
    assert store.stats().quarantined == 1


def test_stats_count_hits_misses_and_entities(setup):
    store, lookup = setup
    insert(lookup, "fox", 1.0)
    lookup.lookup("fox, river", "K")
    lookup.lookup("snow", "K")
    lookup.lookup("fox", "K")
    stats = store.stats()
    assert (stats.lookups, stats.hits, stats.misses) == (3, 2, 1)
    assert stats.hit_rate == pytest.approx(2 / 3)
    assert stats.top_entities[0] == ("fox", 2)
    assert stats.last_lookups[0]["prompt"] == "fox" and stats.last_lookups[0]["hit"]
    served = store.entry(store.entries()[0].entry_id)
    assert served.access_count == 2


def test_timings_are_split_and_consistent(setup):
    store, lookup = setup
    insert(lookup, "fox", 1.0)
    t = lookup.lookup("fox", "K").timings
    parts = [t.extract_ms, t.embed_ms, t.ann_ms, t.load_ms]
    assert all(p >= 0 for p in parts) and t.load_ms > 0
    assert t.total_ms >= sum(parts) - 1e-6


def test_bad_inputs_raise_clear_errors(setup):
    store, lookup = setup
    with pytest.raises(ValueError):
        lookup.lookup("   ", "K")
    with pytest.raises(ValueError, match="compat_key"):
        lookup.lookup("fox", "")
    with pytest.raises(ValueError, match="threshold"):
        LookupConfig(threshold=1.5)
    with pytest.raises(ValueError, match="mode"):
        LookupConfig(mode="sentence")


def test_default_threshold_is_the_documented_one():
    assert LookupConfig().threshold == DEFAULT_THRESHOLD
    assert LookupConfig().fingerprint().startswith("LOOKUP_entity_T")


@pytest.fixture(scope="module")
def real_models():
    from comfyui_chai.cache.embed import Embedder
    from comfyui_chai.cache.entities import EntityExtractor

    return EntityExtractor(), Embedder()


def test_real_models_share_an_entity_across_related_prompts(tmp_path, real_models):
    extractor, embedder = real_models
    with LatentStore(tmp_path / "s") as store:
        lookup = CacheLookup(store, extractor, embedder)
        first = lookup.lookup("A golden retriever running on a beach at sunset", "K")
        assert not first.hit
        lookup.insert(first, latents(1.0))
        related = lookup.lookup("a surfer riding a wave near the beach", "K")
        assert related.hit and related.matched == "beach"
        unrelated = lookup.lookup("an astronaut floating inside a space station", "K")
        assert not unrelated.hit
        whole = CacheLookup(store, extractor, embedder, LookupConfig(mode="prompt"))
        assert not whole.lookup("a surfer riding a wave near the beach", "K").hit


def test_default_threshold_matches_the_vbench_calibration(real_models):
    """The shipped default is the F0.5-best threshold of the head-noun calibration (README)."""
    from comfyui_chai.cache.calibrate import sweep_thresholds
    from comfyui_chai.cache.simulate import read_prompts
    from comfyui_chai.cli import default_prompt_file

    extractor, embedder = real_models
    sweep = sweep_thresholds(read_prompts(default_prompt_file()), extractor, embedder)
    assert abs(sweep.best.threshold - DEFAULT_THRESHOLD) <= 0.02
    at_default = min(sweep.rows, key=lambda r: abs(r.threshold - DEFAULT_THRESHOLD))
    assert at_default.precision >= 0.85
    loose = min(sweep.rows, key=lambda r: abs(r.threshold - 0.5))
    assert loose.precision < at_default.precision  # the calibration discriminates


def test_agreement_rule_reads_closed_class_words():
    from comfyui_chai.cache.agreement import closed_class_words, contradicts

    assert contradicts("white background", "black background")
    assert contradicts("a red circle", "the blue circles")  # plural head, articles ignored
    assert not contradicts("grey cat", "gray cat")  # synonyms agree
    assert not contradicts("white background", "white sky")  # another head noun: not this rule's call
    assert not contradicts("cat", "black cat") and not contradicts("black cat", "cat")  # one side names no colour
    assert not contradicts("red and white flag", "white flag")  # share a colour
    assert closed_class_words("a light grey cat") == {"colour": frozenset({"gray"})}
    assert closed_class_words("a cat") == {}


def test_modifier_agreement_refuses_a_contradicting_colour(tmp_path):
    """'white background' sits at cosine 0.9 of 'black background' (above the 0.8 threshold): the gate
    refuses that match and serves the next agreeing entry; with the gate off the contradicting one wins."""
    table = {"black background": unit(1, 0, 0), "white background": unit(0.9, np.sqrt(1 - 0.81), 0),
             "pale background": unit(0.9, 0, 0.44)}  # cosine 0.81 with white
    embedder = TableEmbedder(table)
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        gated = CacheLookup(store, CommaExtractor(), embedder, LookupConfig(threshold=0.8))
        black = insert(gated, "black background", 1.0)
        result = gated.lookup("white background", "K")
        assert not result.hit and result.refused == [("white background", "black background")]
        assert gated.preview(gated.query("white background"))["matched"] is None
        pale = insert(gated, "pale background", 2.0)  # no colour word: agrees with anything
        served = gated.lookup("white background", "K")
        assert served.hit and served.entry_id == pale and served.refused
        open_gate = gated.with_config(modifier_agreement=False)
        assert open_gate.lookup("white background", "K").entry_id == black
        assert open_gate.config.fingerprint() != gated.config.fingerprint()


def test_agreement_bench_counts_what_the_gate_refuses(tmp_path, real_models):
    """On scene captions the open gate serves colour-contradicting entities ('white background' gets
    'gray background'); the closed gate serves none and keeps nearly every hit."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "agreement_bench.py"
    spec = importlib.util.spec_from_file_location("agreement_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--validation", "--prompts", "60", "--out", str(tmp_path)]) == 0
    off, on = json.loads((tmp_path / "agreement_bench.json").read_text())["rows"]
    assert (off["modifier_agreement"], on["modifier_agreement"]) == (False, True)
    assert off["contradicting_hits"] >= 3 and on["contradicting_hits"] == 0
    assert on["hits"] >= off["hits"] - 3
