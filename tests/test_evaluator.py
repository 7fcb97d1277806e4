"""Evaluator (refmodel/evaluator.py): prompt parsing, accuracy on ground-truth renders, chance on shuffled
pairs, per-criterion response to its own corruption, input checks, speed."""

import time
from dataclasses import replace

import numpy as np
import pytest

from comfyui_chai.refmodel import evaluator as ev
from comfyui_chai.refmodel import scenes

N_PROMPTS = 500
SEED = 20240611  # any seed: the figures hold for every seed tried (see the report in the module docstring)


@pytest.fixture(scope="module")
def dataset():
    pairs = scenes.sample_dataset(SEED, N_PROMPTS)
    clips = [scenes.render(spec) for spec, _ in pairs]
    return pairs, clips


@pytest.fixture(scope="module")
def matched(dataset):
    pairs, clips = dataset
    return [ev.evaluate(c, p) for c, (_, p) in zip(clips, pairs)]


def _derangement(n, seed):
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


# ------------------------------------------------------------------------------------------------ parsing


def test_parse_recovers_ground_truth_of_generated_captions():
    pairs = scenes.sample_dataset(SEED + 1, 3000, two_shape_prob=0.5)
    for spec, cap in pairs:
        a = ev.parse_prompt(cap)
        assert a.background == spec.background, cap
        assert a.motion == spec.motion, cap
        assert tuple(o.shape for o in a.objects) == spec.shapes, cap
        assert tuple(o.color for o in a.objects) == spec.colors, cap
        words = cap.split()
        for o in a.objects:
            if o.size is not None:
                assert o.size == spec.size and o.size in words, cap
        if spec.size is not None and spec.size in words:
            assert a.objects[0].size == spec.size, cap


def test_parse_every_phrase_of_the_vocabulary():
    # Each background/motion phrase and shape word, in a sentence whose other slots use other labels.
    for bg, phrases in scenes.BACKGROUND_PHRASES.items():
        for ph in phrases:
            a = ev.parse_prompt(f"a pink star moving down {ph}")
            assert (a.background, a.motion, a.objects[0].shape, a.objects[0].color) == (bg, "down", "star", "pink")
            a = ev.parse_prompt(f"{ph}, a blue box and a white disc rise")
            assert a.background == bg and [o.color for o in a.objects] == ["blue", "white"]
    for motion, parts in scenes.MOTION_PARTICIPLES.items():
        for ph in parts:
            assert ev.parse_prompt(f"a red triangle {ph} on green grass").motion == motion
    for motion, verbs in scenes.MOTION_VERBS.items():
        for sing, plur in verbs:
            assert ev.parse_prompt(f"over sand, a cyan cross {sing}").motion == motion
            a = ev.parse_prompt(f"over sand, a cyan cross and a red ball {plur}")
            assert a.motion == motion and [o.shape for o in a.objects] == ["cross", "circle"]
    for shape, words in scenes.SHAPE_WORDS.items():
        for w in words:
            a = ev.parse_prompt(f"a large yellow {w} moves left against a black backdrop")
            assert a.objects == (ev.PromptObject(shape, "yellow", "large"),)


def test_parse_colour_words_inside_background_phrases_are_not_objects():
    a = ev.parse_prompt("in front of an orange sunset, a green circle falls")
    assert a.background == "sunset" and a.objects == (ev.PromptObject("circle", "green"),)
    a = ev.parse_prompt("a white square growing on a white background")
    assert a.background == "white" and a.objects[0].color == "white"
    a = ev.parse_prompt("across a clear blue sky, a red star is shrinking")
    assert a.background == "sky" and a.objects[0].color == "red" and a.motion == "shrink"


def test_parse_loose_wording_falls_back_to_distinctive_words():
    a = ev.parse_prompt("A Red Circle drifting LEFTWARD, on a sandy beach!")
    assert (a.background, a.motion) == ("sand", "left")
    a = ev.parse_prompt("a purple cross expanding over a grassy meadow")
    assert (a.background, a.motion) == ("grass", "grow")
    a = ev.parse_prompt("a white star sinking against a grey background")
    assert (a.background, a.motion) == ("gray", "down")


@pytest.mark.parametrize("prompt, match", [
    ("", "empty"),
    ("a red moving left on a black background", "no shape"),
    ("a circle moving left on a black background", "no colour"),
    ("a red circle moving left", "no background"),
    ("a red circle on a black background", "no motion"),
    ("a red circle moving left on a black background over sand", "several backgrounds"),
    ("a red circle moving left and growing on a black background", "several motions"),
])
def test_parse_errors_say_what_is_missing(prompt, match):
    with pytest.raises(ValueError, match=match):
        ev.parse_prompt(prompt)


def test_parse_rejects_non_string():
    with pytest.raises(TypeError, match="str"):
        ev.parse_prompt(["a red circle"])


# ------------------------------------------------------------------------------ ground truth and chance


def test_ground_truth_renders_score_at_least_095(matched):
    means = {k: float(np.mean([r.scores[k] for r in matched])) for k in matched[0].scores}
    assert means["overall"] >= 0.95, means
    for k in ("shape", "color", "background", "motion", "temporal"):
        assert means[k] >= 0.95, (k, means)
    # Nearly every clip, not just the mean.
    assert np.mean([r.overall >= 0.8 for r in matched]) >= 0.98
    assert all(0.0 <= r.overall <= 1.0 for r in matched)


def test_measured_attributes_match_ground_truth(dataset, matched):
    pairs, _ = dataset
    bg = np.mean([r.measurement.background == s.background for r, (s, _) in zip(matched, pairs)])
    singles = [(r, s) for r, (s, _) in zip(matched, pairs) if len(s.objects) == 1]
    n_obj = np.mean([len(r.measurement.objects) == 1 for r, _ in singles])
    shape = np.mean([r.measurement.objects[0].shape == s.shapes[0] for r, s in singles])
    color = np.mean([r.measurement.objects[0].color == s.colors[0] for r, s in singles])
    motion = np.mean([r.measurement.objects[0].motion == s.motion for r, s in singles])
    assert bg == 1.0 and n_obj == 1.0
    assert min(shape, color, motion) >= 0.99, (shape, color, motion)


def test_shuffled_pairs_score_at_chance(dataset, matched):
    pairs, clips = dataset
    perm = _derangement(len(pairs), 7)
    shuffled = [ev.evaluate(clips[j], pairs[i][1]) for i, j in enumerate(perm)]
    mean_shuffled = float(np.mean([r.overall for r in shuffled]))
    mean_matched = float(np.mean([r.overall for r in matched]))
    # A perfect reader on exactly these pairs: the pixel evaluator must give no credit for wrong attributes.
    ideal = float(np.mean([ev.score_measurement(ev.parse_prompt(pairs[i][1]),
                                                ev.ideal_measurement(pairs[j][0])).overall
                           for i, j in enumerate(perm)]))
    chance, per = ev.chance_level(4000, seed=3, per_criterion=True)
    assert 0.12 <= chance <= 0.20, chance  # documented: about 0.16
    assert per["shape"] == pytest.approx(1 / 5, abs=0.03)
    assert per["motion"] == pytest.approx(1 / 6, abs=0.03)
    assert per["background"] == pytest.approx(1 / 7, abs=0.03)
    assert abs(mean_shuffled - ideal) <= 0.02, (mean_shuffled, ideal)
    assert abs(mean_shuffled - chance) <= 0.04, (mean_shuffled, chance)
    assert mean_matched - mean_shuffled >= 0.7


# --------------------------------------------------------------------------------- corruption responses


def _single(shape, color, background, motion, seed, **kw):
    spec = scenes.make_scene(shape, color, background, motion, seed, **kw)
    return spec, scenes.render(spec).astype(np.float32)


def _prompt(spec):
    o = spec.objects[0]
    return f"a {o.color} {o.shape} {scenes.MOTION_PARTICIPLES[spec.motion][0]} " \
           f"{scenes.BACKGROUND_PHRASES[spec.background][0]}"


CASES = [("circle", "red", "black", "left"), ("square", "yellow", "sky", "right"), ("star", "cyan", "grass", "up"),
         ("triangle", "white", "sand", "down"), ("cross", "pink", "gray", "grow"), ("star", "blue", "sunset", "shrink"),
         ("square", "green", "white", "left"), ("circle", "orange", "grass", "grow")]


def _others_stay(before, after, changed, floor=0.9):
    for k in ("shape", "color", "background", "motion", "temporal"):
        if k not in changed:
            assert after.scores[k] >= floor, (k, before.scores, after.scores)


@pytest.mark.parametrize("case", CASES)
def test_recolouring_the_object_drops_colour(case):
    spec, clip = _single(*case, seed=11)
    before = ev.evaluate(clip.astype(np.uint8), _prompt(spec))
    cov = scenes.object_masks(spec)[0][..., None]
    old = np.asarray(scenes.COLORS[case[1]], np.float32)
    allowed = [c for c in scenes.ALLOWED_COLORS[case[2]] if c != case[1]]
    new = max(allowed, key=lambda c: np.linalg.norm(np.subtract(scenes.COLORS[c], old)))
    recol = np.clip(np.rint(clip + cov * (np.asarray(scenes.COLORS[new], np.float32) - old)), 0, 255)
    after = ev.evaluate(recol.astype(np.uint8), _prompt(spec))
    assert before.color >= 0.95 and after.color <= 0.05, (before.scores, after.scores)
    _others_stay(before, after, {"color"})


@pytest.mark.parametrize("case", CASES)
def test_swapping_the_background_drops_background(case):
    spec, clip = _single(*case, seed=12)
    before = ev.evaluate(clip.astype(np.uint8), _prompt(spec))
    other = next(b for b in scenes.BACKGROUNDS[::-1] if b != case[2] and case[1] in scenes.ALLOWED_COLORS[b])
    cov = scenes.object_masks(spec)[0][..., None]
    bg = scenes.render_background(other, spec.height, spec.width, texture_seed=5)[None]
    swapped = bg * (1 - cov) + np.asarray(scenes.COLORS[case[1]], np.float32) * cov
    after = ev.evaluate(np.rint(swapped).astype(np.uint8), _prompt(spec))
    assert before.background >= 0.95 and after.background <= 0.05, (before.scores, after.scores)
    assert after.measurement.background == other
    _others_stay(before, after, {"background"})


@pytest.mark.parametrize("case", CASES)
def test_changing_the_shape_drops_shape(case):
    spec, clip = _single(*case, seed=13)
    before = ev.evaluate(clip.astype(np.uint8), _prompt(spec))
    for other in scenes.SHAPES:
        if other == case[0]:
            continue
        obj = replace(spec.objects[0], shape=other)
        after = ev.evaluate(scenes.render(replace(spec, objects=(obj,))), _prompt(spec))
        assert before.shape >= 0.95 and after.shape <= 0.1, (other, before.scores, after.scores)
        assert after.measurement.objects[0].shape == other
        _others_stay(before, after, {"shape"})


@pytest.mark.parametrize("motion, reverse", [("left", "right"), ("right", "left"), ("up", "down"),
                                             ("down", "up"), ("grow", "shrink"), ("shrink", "grow")])
def test_reversing_the_frames_drops_motion(motion, reverse):
    for seed, (shape, color, bg) in enumerate([("circle", "red", "black"), ("star", "yellow", "sand"),
                                                ("cross", "white", "sunset")]):
        spec, clip = _single(shape, color, bg, motion, seed=20 + seed)
        before = ev.evaluate(clip.astype(np.uint8), _prompt(spec))
        after = ev.evaluate(clip[::-1].astype(np.uint8), _prompt(spec))
        assert before.motion >= 0.95 and after.motion <= 0.05, (before.scores, after.scores)
        assert after.measurement.objects[0].motion == reverse
        _others_stay(before, after, {"motion"})


@pytest.mark.parametrize("case", CASES)
def test_shuffling_the_frames_drops_temporal_consistency(case):
    spec, clip = _single(*case, seed=14)
    before = ev.evaluate(clip.astype(np.uint8), _prompt(spec))
    order = np.array([3, 7, 0, 5, 1, 6, 2, 4])  # no two neighbours stay neighbours
    after = ev.evaluate(clip[order].astype(np.uint8), _prompt(spec))
    assert before.temporal >= 0.95 and after.temporal <= 0.3, (before.scores, after.scores)
    assert after.overall <= 0.5 * before.overall
    for k in ("shape", "color", "background"):  # a single frame still shows the right things
        assert after.scores[k] >= 0.9


@pytest.mark.parametrize("case", CASES[:4])
def test_flicker_and_vanishing_frames_drop_temporal_consistency(case):
    spec, clip = _single(*case, seed=15)
    prompt = _prompt(spec)
    before = ev.evaluate(clip.astype(np.uint8), prompt)
    flick = clip.copy()
    flick[1::2] = np.clip(flick[1::2] + 20.0, 0, 255)  # every other frame brighter
    assert ev.evaluate(flick.astype(np.uint8), prompt).temporal <= 0.2
    gone = clip.copy()
    bg = scenes.render_background(spec.background, spec.height, spec.width, spec.texture_seed)
    gone[[2, 5]] = np.rint(bg)  # the object vanishes in two frames
    after = ev.evaluate(gone.astype(np.uint8), prompt)
    assert before.temporal >= 0.95 and after.temporal <= 0.6, (before.scores, after.scores)


def test_mild_noise_and_blur_keep_scores_high():
    # Generated clips are slightly noisy and soft: the evaluator must not punish that as a wrong scene.
    pairs = scenes.sample_dataset(SEED + 2, 60)
    rng = np.random.default_rng(0)
    scores, counts = [], []
    for spec, cap in pairs:
        x = scenes.render(spec).astype(np.float32)
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
        x = 0.25 * x[:, :, :-2] + 0.5 * x[:, :, 1:-1] + 0.25 * x[:, :, 2:]
        x = x + rng.normal(0, 8.0, x.shape)
        r = ev.evaluate(np.clip(x / 255.0, 0, 1), cap)
        scores.append(r.overall)
        counts.append(len(r.measurement.objects) == len(spec.objects))
    assert np.mean(scores) >= 0.9, np.mean(scores)
    assert np.mean(counts) >= 0.95  # noise does not make extra objects


def test_noise_on_a_white_background_is_not_a_white_object():
    rng = np.random.default_rng(1)
    for k, (shape, color, motion) in enumerate([("triangle", "cyan", "up"), ("cross", "green", "up"),
                                                ("star", "red", "shrink"), ("square", "red", "grow"),
                                                ("triangle", "purple", "shrink"), ("circle", "blue", "left")]):
        spec, clip = _single(shape, color, "white", motion, seed=16 + k)
        noisy = np.clip(clip + rng.normal(0, 10.0, clip.shape), 0, 255).astype(np.uint8)
        r = ev.evaluate(noisy, _prompt(spec))
        assert [o.color for o in r.measurement.objects] == [color], r.measurement.summary()
        assert r.overall >= 0.8, r.scores


def test_partly_occluded_second_object_is_still_found():
    # Two-object scenes may overlap (later objects are drawn on top); find one where a third or more of
    # the first object is hidden.
    for seed in range(400):
        spec = scenes.make_scene(["star", "circle"], ["red", "white"], "sunset", "right", seed)
        cov = scenes.object_masks(spec)
        visible = (cov[0] * (1 - cov[1])).sum() / cov[0].sum()
        if 0.4 <= visible <= 0.67:
            break
    else:
        pytest.fail("no overlapping scene found")
    r = ev.evaluate(scenes.render(spec), "a red star and a white disc moving right over a sunset background")
    assert sorted(o.color for o in r.measurement.objects) == ["red", "white"]
    assert r.color >= 0.95 and r.motion >= 0.95 and r.background >= 0.95


def test_clip_without_object_scores_low():
    bg = scenes.render_background("grass", 32, 32, texture_seed=3)
    clip = np.repeat(np.rint(bg)[None], 8, axis=0).astype(np.uint8)
    r = ev.evaluate(clip, "a red circle moving left on green grass")
    assert r.measurement.objects == ()
    assert r.shape == r.color == r.motion == 0.0 and r.background >= 0.99
    assert r.overall <= 0.26


def test_two_object_scene_matches_objects_by_colour():
    spec = scenes.make_scene(["star", "square"], ["red", "cyan"], "black", "right", 4)
    clip = scenes.render(spec)
    good = ev.evaluate(clip, "a red star and a cyan box moving right on a black background")
    swapped = ev.evaluate(clip, "a red box and a cyan star moving right on a black background")
    one = ev.evaluate(clip, "a cyan square moving right on a black background")
    assert good.shape >= 0.95 and good.color >= 0.95 and good.overall >= 0.95
    assert swapped.shape <= 0.05 and swapped.color >= 0.95
    assert one.shape >= 0.95 and one.color >= 0.95
    assert sorted(o.color for o in good.measurement.objects) == ["cyan", "red"]


# ------------------------------------------------------------------------------------ inputs and output


def test_float_and_uint8_inputs_agree_and_results_are_deterministic(dataset):
    pairs, clips = dataset
    for (spec, cap), clip in list(zip(pairs, clips))[:10]:
        a = ev.evaluate(clip, cap)
        b = ev.evaluate(clip.astype(np.float64) / 255.0, cap)
        c = ev.evaluate(clip, cap)
        assert a.scores == pytest.approx(b.scores, abs=1e-4)
        assert a.scores == c.scores
        d = a.as_dict()
        assert set(d) == {"scores", "detail_parts", "prompt", "measured"} and d["prompt"]["background"] == spec.background
        assert d["detail_parts"] == {} and d["measured"]["ghost_ratio"] == pytest.approx(a.measurement.ghost_ratio, abs=1e-4)


@pytest.mark.parametrize("clip, match", [
    (np.zeros((8, 3, 32, 32), np.uint8), "channels first"),
    (np.zeros((8, 32, 32), np.uint8), r"\[F, H, W, 3\]"),
    (np.zeros((1, 32, 32, 3), np.uint8), "at least 2 frames"),
    (np.full((8, 32, 32, 3), 2.0, np.float32), r"\(x \+ 1\) / 2"),
    (np.full((8, 32, 32, 3), np.nan, np.float32), "NaN"),
    (np.zeros((8, 32, 32, 3), np.complex64), "dtype"),
    (np.full((8, 32, 32, 3), 300, np.int32), "0..255"),
])
def test_bad_clips_raise_clear_errors(clip, match):
    with pytest.raises(ValueError, match=match):
        ev.measure_clip(clip)


def test_evaluate_many_checks_counts_and_averages(dataset, matched):
    pairs, clips = dataset
    out = ev.evaluate_many(clips[:5], [p for _, p in pairs[:5]])
    assert out["n"] == 5 and out["overall"] == pytest.approx(np.mean([r.overall for r in matched[:5]]))
    with pytest.raises(ValueError, match="one prompt per clip"):
        ev.evaluate_many(clips[:3], [p for _, p in pairs[:2]])
    with pytest.raises(ValueError, match="no clips"):
        ev.evaluate_many([], [])


def test_weights_sum_to_one_and_overall_follows_the_documented_formula(matched):
    assert sum(ev.WEIGHTS.values()) == pytest.approx(1.0)
    for r in matched[:50]:
        expect = r.temporal * r.ghost_free * sum(ev.WEIGHTS[k] * r.scores[k]
                                                 for k in ("shape", "color", "background", "motion"))
        assert r.overall == pytest.approx(expect)
        assert r.detail is None and "detail" not in r.scores  # no reference: no detail criterion


def test_measurement_takes_a_few_milliseconds(dataset):
    _, clips = dataset
    ev.measure_clip(clips[0])  # build the cached tables first
    t0 = time.process_time()
    for c in clips[:100]:
        ev.measure_clip(c)
    per_clip_ms = (time.process_time() - t0) * 10
    assert per_clip_ms < 15.0, per_clip_ms  # 4-6 ms of CPU on this shared 2-core machine
