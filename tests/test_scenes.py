"""Scene generator: determinism, vocabulary, geometry of the ground truth, captions naming the truth."""

import re

import numpy as np
import pytest

from comfyui_chai.refmodel import scenes as S


def test_vocabulary_sizes():
    assert len(S.SHAPES) >= 5
    assert len(S.COLORS) >= 8
    assert len(S.BACKGROUNDS) >= 6
    assert len(S.MOTIONS) >= 5
    for bg in S.BACKGROUNDS:
        assert len(S.ALLOWED_COLORS[bg]) >= 5, bg
        assert bg in S.BACKGROUND_PHRASES and bg in S.BACKGROUND_COLORS
    for m in S.MOTIONS:
        assert m in S.MOTION_PARTICIPLES and m in S.MOTION_VERBS
    for shape in S.SHAPES:
        assert S.SHAPE_WORDS[shape][0] == shape
    for rgb in S.COLORS.values():
        assert len(rgb) == 3 and all(0 <= c <= 255 for c in rgb)


def test_same_seed_same_scene_pixels_and_caption():
    a = S.sample_dataset(7, 20)
    b = S.sample_dataset(7, 20)
    for (sa, ca), (sb, cb) in zip(a, b):
        assert sa == sb and ca == cb
        np.testing.assert_array_equal(S.render(sa), S.render(sb))
    c = S.sample_dataset(8, 20)
    assert [x[1] for x in a] != [x[1] for x in c]
    # Items depend on (seed, index) only: a prefix of a longer dataset is the shorter dataset.
    assert [x[1] for x in S.sample_dataset(7, 25)[:20]] == [x[1] for x in a]


def test_render_shape_dtype_and_background_visible():
    spec = S.make_scene("circle", "red", "black", "right", 3, size="large")
    v = S.render(spec)
    assert v.shape == (S.DEFAULT_FRAMES, S.DEFAULT_HEIGHT, S.DEFAULT_WIDTH, 3) and v.dtype == np.uint8
    # Corner pixels are background, the centre pixel of the shape is its colour.
    np.testing.assert_array_equal(v[0, 0, 0], S.BACKGROUND_COLORS["black"][0])
    (cx, cy), r = spec.objects[0].centers[0], spec.objects[0].radii[0]
    assert r >= S.SIZE_WORDS["large"][0]
    np.testing.assert_array_equal(v[0, int(cy), int(cx)], S.COLORS["red"])


@pytest.mark.parametrize("motion", S.MOTIONS)
def test_motion_ground_truth_matches_pixels(motion):
    spec = S.make_scene("square", "yellow", "gray", motion, 11)
    masks = S.object_masks(spec)[0]  # [F, H, W]
    area = masks.sum(axis=(1, 2))
    ys, xs = np.mgrid[0:spec.height, 0:spec.width] + 0.5
    cx = (masks * xs).sum(axis=(1, 2)) / area
    cy = (masks * ys).sum(axis=(1, 2)) / area
    # The rendered centroid follows the ground-truth centres.
    gt = np.asarray(spec.objects[0].centers)
    np.testing.assert_allclose(cx, gt[:, 0], atol=0.3)
    np.testing.assert_allclose(cy, gt[:, 1], atol=0.3)
    dx, dy, da = cx[-1] - cx[0], cy[-1] - cy[0], area[-1] / area[0]
    expect = {
        "left": dx < -8 and abs(dy) < 0.5,
        "right": dx > 8 and abs(dy) < 0.5,
        "up": dy < -8 and abs(dx) < 0.5,
        "down": dy > 8 and abs(dx) < 0.5,
        "grow": da > 4 and abs(dx) < 0.5,
        "shrink": da < 0.25 and abs(dx) < 0.5,
    }
    assert expect[motion], (motion, dx, dy, da)
    # Shapes stay inside the frame.
    for (x, y), r in zip(spec.objects[0].centers, spec.objects[0].radii):
        assert r <= x <= spec.width - r and r <= y <= spec.height - r


def test_shapes_have_distinct_masks():
    masks = {}
    for shape in S.SHAPES:
        spec = S.make_scene(shape, "white", "black", "right", 5, size="large")
        masks[shape] = S.object_masks(spec)[0, 0]
    names = list(masks)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.abs(masks[names[i]] - masks[names[j]]).sum() > 5.0, (names[i], names[j])
    # Circle fills more of its circumscribed disc than a star does.
    assert masks["circle"].sum() > 1.8 * masks["star"].sum()


def test_backgrounds_distinct_and_textures_seeded():
    means = {bg: S.render_background(bg, 32, 32, 1).reshape(-1, 3).mean(0) for bg in S.BACKGROUNDS}
    names = list(means)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.linalg.norm(means[names[i]] - means[names[j]]) > 30, (names[i], names[j])
    g1 = S.render_background("grass", 32, 32, 1)
    assert g1.std() > 5  # textured
    np.testing.assert_array_equal(g1, S.render_background("grass", 32, 32, 1))
    assert not np.array_equal(g1, S.render_background("grass", 32, 32, 2))
    sky = S.render_background("sky", 32, 32)
    assert sky[0].mean() < sky[-1].mean()  # gradient: darker blue at the top


def test_captions_name_the_ground_truth():
    for spec, text in S.sample_dataset(3, 300, two_shape_prob=0.3):
        assert text == text.lower() and not text.endswith(".")
        for obj in spec.objects:
            words = "|".join(re.escape(w) for w in S.SHAPE_WORDS[obj.shape])
            assert re.search(rf"\b{obj.color} ({words})\b", text), (text, obj)
        assert any(p in text for p in S.BACKGROUND_PHRASES[spec.background]), text
        motion_phrases = list(S.MOTION_PARTICIPLES[spec.motion]) + [v for pair in S.MOTION_VERBS[spec.motion] for v in pair]
        assert any(p in text for p in motion_phrases), text
        # No other background phrase sneaks in.
        for bg in S.BACKGROUNDS:
            if bg != spec.background:
                assert not any(p in text for p in S.BACKGROUND_PHRASES[bg]), (text, bg)


def test_sample_distribution_covers_vocabulary_and_respects_contrast():
    data = S.sample_dataset(0, 600, two_shape_prob=0.2)
    seen = {"shape": set(), "color": set(), "bg": set(), "motion": set()}
    n_two = 0
    for spec, _ in data:
        seen["bg"].add(spec.background)
        seen["motion"].add(spec.motion)
        n_two += len(spec.objects) == 2
        for obj in spec.objects:
            seen["shape"].add(obj.shape)
            seen["color"].add(obj.color)
            assert obj.color in S.ALLOWED_COLORS[spec.background]
    assert seen == {"shape": set(S.SHAPES), "color": set(S.COLORS), "bg": set(S.BACKGROUNDS), "motion": set(S.MOTIONS)}
    assert 60 < n_two < 180


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown shape"):
        S.make_scene("hexagon", "red", "black", "left")
    with pytest.raises(ValueError, match="unknown color"):
        S.make_scene("circle", "mauve", "black", "left")
    with pytest.raises(ValueError, match="too close to background"):
        S.make_scene("circle", "green", "grass", "left")
    with pytest.raises(ValueError, match="unknown motion"):
        S.make_scene("circle", "red", "black", "spin")
    with pytest.raises(ValueError, match="differ"):
        S.make_scene(["circle", "circle"], ["red", "red"], "black", "left")
    with pytest.raises(ValueError, match="size class"):
        S.make_scene("circle", "red", "black", "grow", size="small")
    with pytest.raises(ValueError, match="two_shape_prob"):
        S.sample_scene(0, two_shape_prob=1.5)
    with pytest.raises(TypeError, match="Generator"):
        S.sample_scene("seed")


def test_position_jitter_narrows_layouts_without_changing_captions():
    full = S.sample_dataset(4, 200)
    narrow = S.sample_dataset(4, 200, position_jitter=0.25)
    fixed = S.sample_dataset(4, 200, position_jitter=0.0)
    assert [c for _, c in full] == [c for _, c in narrow] == [c for _, c in fixed]

    def spread(data, motion):
        starts = [s.objects[0].centers[0] for s, _ in data if s.motion == motion and len(s.objects) == 1]
        return np.ptp(np.asarray(starts), axis=0)

    for motion in ("left", "up"):
        assert np.all(spread(narrow, motion) <= 0.3 * spread(full, motion) + 1.5)
        # No jitter: one start per motion and size class (the size class is still drawn).
        by_size = {}
        for s, _ in fixed:
            if s.motion == motion and len(s.objects) == 1:
                by_size.setdefault(s.size, set()).add(s.objects[0].centers[0])
        assert all(len(v) == 1 for v in by_size.values()), by_size
    with pytest.raises(ValueError, match="position_jitter"):
        S.sample_scene(0, position_jitter=1.5)


def test_position_snap_puts_positions_on_a_grid_and_keeps_several_lanes():
    data = S.sample_dataset(6, 400, position_jitter=0.0, position_snap=4.0)
    lanes = {}
    for spec, _ in data:
        for obj in spec.objects:
            (x, y), r = obj.centers[0], obj.radii
            if spec.motion in ("left", "right"):
                assert y % 4 == 0, (spec.motion, y)
                lanes.setdefault((spec.motion, spec.size, len(spec.objects)), set()).add(y)
            elif spec.motion in ("up", "down"):
                assert x % 4 == 0, (spec.motion, x)
            elif len(spec.objects) == 1:
                assert x % 4 == 0 and y % 4 == 0
            # Still inside the frame.
            for (cx, cy), rr in zip(obj.centers, r):
                assert rr <= cx <= spec.width - rr and rr <= cy <= spec.height - rr
    assert max(len(v) for v in lanes.values()) >= 3  # positions stay random, on the grid
    assert [c for _, c in data] == [c for _, c in S.sample_dataset(6, 400)]
    with pytest.raises(ValueError, match="position_snap"):
        S.sample_scene(0, position_snap=-1.0)
