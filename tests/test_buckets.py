"""Resolution buckets, aspect ratios and frame counts against OpenSora 1.2 (opensora.md section 6).

The expected sizes below are the reference sheet's table; the RFLOW fixture independently records
the image and latent sizes the official driver built for six settings.
"""

from __future__ import annotations

import json

import pytest

from comfyui_chai.opensora import buckets
from comfyui_chai.opensora.buckets import (
    ASPECT_RATIO_MAP,
    RESOLUTIONS,
    closest_aspect_ratio,
    get_fps,
    get_image_size,
    get_latent_num_frames,
    get_latent_size,
    get_num_frames,
    get_num_pixels,
    list_aspect_ratios,
    list_resolutions,
)

# opensora.md section 6: (resolution, aspect ratio) -> (H, W)
SHEET = {
    ("144p", "9:16"): (144, 256), ("144p", "16:9"): (256, 144), ("144p", "1:1"): (192, 192),
    ("144p", "3:4"): (166, 221), ("144p", "4:3"): (221, 165),
    ("240p", "9:16"): (240, 426), ("240p", "16:9"): (426, 240), ("240p", "1:1"): (320, 320),
    ("240p", "3:4"): (276, 368), ("240p", "4:3"): (370, 278),
    ("360p", "9:16"): (360, 640), ("360p", "16:9"): (640, 360), ("360p", "1:1"): (480, 480),
    ("360p", "3:4"): (416, 554), ("360p", "4:3"): (554, 416),
    ("480p", "9:16"): (480, 854), ("480p", "16:9"): (854, 480), ("480p", "1:1"): (640, 640),
    ("480p", "3:4"): (554, 738), ("480p", "4:3"): (740, 555),
    ("720p", "9:16"): (720, 1280), ("720p", "16:9"): (1280, 720), ("720p", "1:1"): (960, 960),
    ("720p", "3:4"): (832, 1110), ("720p", "4:3"): (1108, 832),
}  # fmt: skip

BUDGETS = {"144p": 36864, "240p": 102240, "360p": 230400, "480p": 409920, "720p": 921600}


@pytest.mark.parametrize("key,expected", sorted(SHEET.items()))
def test_image_size_matches_reference_sheet(key, expected):
    assert get_image_size(*key) == expected


def test_names_are_case_and_space_tolerant():
    assert get_image_size("240P", " 9:16 ") == (240, 426)
    assert get_image_size("720p", "9 : 16") == (720, 1280)


def test_sizes_recorded_by_the_official_driver(fixtures_dir):
    settings = json.loads((fixtures_dir / "rflow_timesteps.json").read_text())["settings"]
    seen = set()
    for s in settings:
        h, w = get_image_size(s["resolution"], s["aspect_ratio"])
        assert [h, w] == s["image_size_hw"]
        assert list(get_latent_size(s["num_frames"], h, w)) == s["latent_size_thw"]
        assert get_fps(s["num_frames"]) == s["model_kwargs_values"]["fps"]
        seen.add((s["resolution"], s["aspect_ratio"], s["num_frames"]))
    assert len(seen) == 6


def test_every_bucket_fits_its_budget_and_ratio():
    # Catches a mistyped table entry: each size keeps the bucket's pixel budget and its H/W ratio.
    assert list_resolutions() == ("144p", "240p", "360p", "480p", "720p")
    for res, (budget, table) in RESOLUTIONS.items():
        assert budget == BUDGETS[res] == get_num_pixels(res)
        assert set(table) == set(ASPECT_RATIO_MAP.values())
        for ratio_key, (h, w) in table.items():
            assert abs(h * w - budget) / budget < 0.03, (res, ratio_key, h, w)
            assert abs(h / w - float(ratio_key)) < 0.02, (res, ratio_key, h, w)
    for name, key in ASPECT_RATIO_MAP.items():
        hh, ww = (int(v) for v in name.split(":"))
        if name == "50:27":  # upstream quirk kept on purpose: OpenSora maps it to the 2.08 bucket
            assert key == "2.08"
            continue
        assert abs(hh / ww - float(key)) < 0.006, name
    assert list_aspect_ratios()[0] == "3:8" and "9:16" in list_aspect_ratios()


def test_hand_adjusted_entries_are_kept():
    # OpenSora's tables were edited by hand in places; recomputing them would give other sizes.
    assert get_image_size("480p", "12:25") == (444, 925)
    assert get_image_size("240p", "2:3") == (262, 393)
    assert get_image_size("480p", "2:1") == (906, 454)


def test_unknown_resolution_and_ratio_errors_list_the_valid_names():
    with pytest.raises(ValueError, match="unknown resolution '999p'.*144p, 240p, 360p, 480p, 720p"):
        get_image_size("999p", "9:16")
    with pytest.raises(ValueError, match="1080p.*does not offer"):
        get_image_size("1080p", "9:16")
    with pytest.raises(ValueError, match="unknown aspect ratio '7:5'.*height:width.*9:16"):
        get_image_size("240p", "7:5")
    with pytest.raises(TypeError):
        get_image_size(240, "9:16")
    with pytest.raises(ValueError):
        get_num_pixels("4k")


@pytest.mark.parametrize(
    "name,frames",
    [("2s", 51), ("4s", 102), ("8s", 204), ("16s", 408), ("32s", 816),
     ("1x", 51), ("2x", 102), ("4x", 204), ("8x", 408), ("16x", 816),
     ("4S", 102), (1, 1), (17, 17), ("68", 68), (51.0, 51)],
)  # fmt: skip
def test_num_frames(name, frames):
    assert get_num_frames(name) == frames


@pytest.mark.parametrize("bad", ["3s", "abc", "", 0, -5, "0", 2.5, True, None])
def test_num_frames_errors(bad):
    with pytest.raises(ValueError):
        get_num_frames(bad)


@pytest.mark.parametrize(
    "frames,latent", [(1, 1), (4, 1), (5, 2), (16, 4), (17, 5), (18, 6), (34, 10), (51, 15), (102, 30), (204, 60), (408, 120), (816, 240)]
)
def test_latent_num_frames(frames, latent):
    assert get_latent_num_frames(frames) == latent


def test_latent_size_and_fps():
    assert get_latent_size(51, 240, 426) == (15, 30, 53)
    assert get_latent_size("4s", 720, 1280) == (30, 90, 160)
    assert get_latent_size(51, 480, 854) == (15, 60, 106)
    with pytest.raises(ValueError, match="at least 8 pixels"):
        get_latent_size(51, 4, 426)
    assert get_fps(1) == buckets.IMAGE_FPS == 120
    assert get_fps("2s") == buckets.VIDEO_FPS == 24


def test_closest_aspect_ratio():
    assert closest_aspect_ratio(720, 1280) == "9:16"
    assert closest_aspect_ratio(1280, 720) == "16:9"
    assert closest_aspect_ratio(500, 499) == "1:1"
    assert closest_aspect_ratio(1, 3) == "3:8"
    with pytest.raises(ValueError):
        closest_aspect_ratio(0, 10)
