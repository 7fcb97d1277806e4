"""OpenSora 1.2 resolution buckets, aspect ratios and frame counts.

Follows `opensora/datasets/aspect.py` of OpenSora v1.2.0 (commit 17cce908): the pixel sizes are that
file's (H, W) tables, which were generated from a pixel budget and then hand-adjusted in places
(e.g. 480p "12:25" is 444x925, 240p "2:3" is 262x393), so they are kept as data rather than
recomputed. Aspect-ratio names are **height:width**: "9:16" is the landscape default (240x426),
"16:9" is portrait.

Only the buckets OpenSora 1.2 was trained on are offered: 144p, 240p, 360p, 480p and 720p
(reference sheet opensora.md section 6). Frame counts are any positive integer or one of the named
durations "2s"/"4s"/"8s"/"16s"/"32s" (= "1x".."16x"); 1 frame is an image.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple, Union

__all__ = [
    "ASPECT_RATIO_MAP",
    "RESOLUTIONS",
    "NUM_FRAMES_MAP",
    "IMAGE_FPS",
    "VIDEO_FPS",
    "list_resolutions",
    "list_aspect_ratios",
    "get_image_size",
    "get_num_pixels",
    "get_num_frames",
    "get_latent_num_frames",
    "get_latent_size",
    "get_fps",
    "closest_aspect_ratio",
]

#: Frames per second used as the fps conditioning of STDiT3 for videos (and the save fps).
VIDEO_FPS = 24
#: fps conditioning OpenSora uses for single images (`IMG_FPS` in the official code).
IMAGE_FPS = 120

#: Aspect-ratio name (height:width) -> the two-decimal key of the size tables. As upstream, "50:27"
#: (1.85) selects the 2.08 bucket (462x222 at 240p); kept so names mean what they mean in OpenSora.
ASPECT_RATIO_MAP: Dict[str, str] = {
    "3:8": "0.38",
    "9:21": "0.43",
    "12:25": "0.48",
    "1:2": "0.50",
    "9:17": "0.53",
    "27:50": "0.54",
    "9:16": "0.56",
    "5:8": "0.62",
    "2:3": "0.67",
    "3:4": "0.75",
    "1:1": "1.00",
    "4:3": "1.33",
    "3:2": "1.50",
    "16:9": "1.78",
    "17:9": "1.89",
    "2:1": "2.00",
    "50:27": "2.08",
}

# Table rows in ASPECT_RATIO_MAP key order: (H, W) in pixels.
_KEYS = ("0.38", "0.43", "0.48", "0.50", "0.53", "0.54", "0.56", "0.62", "0.67",
         "0.75", "1.00", "1.33", "1.50", "1.78", "1.89", "2.00", "2.08")  # fmt: skip

_TABLES: Dict[str, Tuple[int, Tuple[Tuple[int, int], ...]]] = {
    "144p": (36864, (
        (117, 312), (125, 291), (133, 277), (135, 270), (139, 262), (141, 260), (144, 256),
        (151, 241), (156, 234), (166, 221), (192, 192), (221, 165), (235, 156), (256, 144),
        (263, 139), (271, 135), (277, 132),
    )),
    "240p": (102240, (
        (196, 522), (210, 490), (222, 462), (226, 452), (232, 438), (236, 436), (240, 426),
        (252, 404), (262, 393), (276, 368), (320, 320), (370, 278), (392, 262), (426, 240),
        (440, 232), (452, 226), (462, 222),
    )),
    "360p": (230400, (
        (294, 784), (314, 732), (332, 692), (340, 680), (350, 662), (352, 652), (360, 640),
        (380, 608), (392, 588), (416, 554), (480, 480), (554, 416), (588, 392), (640, 360),
        (660, 350), (678, 340), (692, 332),
    )),
    "480p": (409920, (
        (392, 1046), (420, 980), (444, 925), (452, 904), (466, 880), (470, 870), (480, 854),
        (506, 810), (522, 784), (554, 738), (640, 640), (740, 555), (784, 522), (854, 480),
        (880, 466), (906, 454), (924, 444),
    )),
    "720p": (921600, (
        (588, 1568), (628, 1466), (666, 1388), (678, 1356), (698, 1318), (706, 1306), (720, 1280),
        (758, 1212), (784, 1176), (832, 1110), (960, 960), (1108, 832), (1176, 784), (1280, 720),
        (1320, 698), (1358, 680), (1386, 666),
    )),
}  # fmt: skip

#: resolution name -> (pixel budget, {ratio key: (H, W)}), as OpenSora's `ASPECT_RATIOS`.
RESOLUTIONS: Dict[str, Tuple[int, Dict[str, Tuple[int, int]]]] = {
    name: (budget, dict(zip(_KEYS, sizes))) for name, (budget, sizes) in _TABLES.items()
}

#: Named durations -> frame count (OpenSora's `NUM_FRAMES_MAP`).
NUM_FRAMES_MAP: Dict[str, int] = {
    "1x": 51, "2x": 102, "4x": 204, "8x": 408, "16x": 816,
    "2s": 51, "4s": 102, "8s": 204, "16s": 408, "32s": 816,
}  # fmt: skip

# Official names of larger buckets that exist upstream but are not offered here.
_UNSUPPORTED_RESOLUTIONS = ("256", "512", "1024", "1080p", "2k", "2048", "2880", "4k")

# VAE v1.2 compression (opensora.md section 3.4).
_VAE_FRAME_CHUNK = 17
_VAE_LATENT_CHUNK = 5
_VAE_TIME_DOWN = 4
_VAE_SPACE_DOWN = 8


def list_resolutions() -> Tuple[str, ...]:
    """Names of the supported resolution buckets, smallest first: ("144p", "240p", "360p", "480p", "720p")."""
    return tuple(RESOLUTIONS)


def list_aspect_ratios() -> Tuple[str, ...]:
    """Aspect-ratio names (height:width) accepted by `get_image_size`, narrowest (most landscape) first."""
    return tuple(ASPECT_RATIO_MAP)


def _check_resolution(resolution: str) -> str:
    if not isinstance(resolution, str):
        raise TypeError(f"resolution must be a string such as '240p', got {type(resolution).__name__}")
    key = resolution.strip().lower()
    if key in RESOLUTIONS:
        return key
    if key in _UNSUPPORTED_RESOLUTIONS:
        raise ValueError(
            f"resolution {resolution!r} is an OpenSora bucket that this pack does not offer (OpenSora 1.2 was "
            f"trained up to 720p, and larger sizes need several GPUs); use one of {', '.join(RESOLUTIONS)}"
        )
    raise ValueError(f"unknown resolution {resolution!r}; use one of {', '.join(RESOLUTIONS)}")


def _check_aspect_ratio(aspect_ratio: str) -> str:
    if not isinstance(aspect_ratio, str):
        raise TypeError(f"aspect_ratio must be a string such as '9:16', got {type(aspect_ratio).__name__}")
    key = aspect_ratio.strip().replace(" ", "")
    if key in ASPECT_RATIO_MAP:
        return key
    raise ValueError(
        f"unknown aspect ratio {aspect_ratio!r}; names are height:width (\"9:16\" is landscape 240x426 at 240p, "
        f"\"16:9\" is portrait); use one of {', '.join(ASPECT_RATIO_MAP)}"
    )


def get_image_size(resolution: str, aspect_ratio: str) -> Tuple[int, int]:
    """Pixel size (height, width) of a resolution bucket and aspect ratio, as OpenSora's `get_image_size`.

    Args:
        resolution: "144p", "240p", "360p", "480p" or "720p" (case-insensitive).
        aspect_ratio: height:width name from `ASPECT_RATIO_MAP`, e.g. "9:16" (landscape) or "1:1".

    Returns:
        (H, W) in pixels, e.g. ("240p", "9:16") -> (240, 426). W may be odd (480p "12:25" is 444x925);
        the VAE floors both to multiples of 8.

    Raises:
        ValueError: unknown resolution or aspect ratio (the message lists the valid names).
        TypeError: a non-string argument.
    """
    res = _check_resolution(resolution)
    ar = _check_aspect_ratio(aspect_ratio)
    return RESOLUTIONS[res][1][ASPECT_RATIO_MAP[ar]]


def get_num_pixels(resolution: str) -> int:
    """Pixel budget H*W of a resolution bucket (e.g. "240p" -> 102240). Raises ValueError for unknown names."""
    return RESOLUTIONS[_check_resolution(resolution)][0]


def get_num_frames(num_frames: Union[int, str]) -> int:
    """Frame count from a named duration ("2s", "4s", "8s", "16s", "32s", "1x".."16x") or a number.

    As OpenSora's `get_num_frames`: "2s" = "1x" = 51, "4s" = 102, "8s" = 204, "16s" = 408, "32s" = 816
    frames at 24 fps; anything else is parsed as an integer. 1 frame means an image.

    Raises:
        ValueError: an unknown name, a non-integer value, or a count below 1.
    """
    if isinstance(num_frames, bool):
        raise ValueError("num_frames must be a frame count or a duration name such as '4s', not a bool")
    if isinstance(num_frames, str):
        key = num_frames.strip().lower()
        if key in NUM_FRAMES_MAP:
            return NUM_FRAMES_MAP[key]
        try:
            value = int(key)
        except ValueError:
            raise ValueError(
                f"unknown frame count {num_frames!r}; give a positive integer or one of {', '.join(NUM_FRAMES_MAP)}"
            ) from None
    elif isinstance(num_frames, float):
        if not num_frames.is_integer():
            raise ValueError(f"num_frames must be a whole number, got {num_frames}")
        value = int(num_frames)
    elif isinstance(num_frames, int):
        value = num_frames
    else:
        raise ValueError(f"num_frames must be an int or a duration name such as '4s', got {type(num_frames).__name__}")
    if value < 1:
        raise ValueError(f"num_frames must be at least 1 (1 = image), got {value}")
    return value


def get_latent_num_frames(num_frames: int) -> int:
    """Latent frame count of the OpenSora VAE v1.2 for `num_frames` pixel frames.

    Each full chunk of 17 frames gives 5 latent frames; a remainder of r frames gives ceil(r/4)
    (opensora.md section 3.4): 1 -> 1, 17 -> 5, 51 -> 15, 102 -> 30, 204 -> 60.

    Raises:
        ValueError: num_frames < 1.
    """
    n = get_num_frames(num_frames)
    full, rest = divmod(n, _VAE_FRAME_CHUNK)
    return full * _VAE_LATENT_CHUNK + math.ceil(rest / _VAE_TIME_DOWN)


def get_latent_size(num_frames: Union[int, str], height: int, width: int) -> Tuple[int, int, int]:
    """Latent size (T, H, W) for a video of `num_frames` x `height` x `width` pixels.

    T from `get_latent_num_frames`; H = height // 8, W = width // 8 (floor, so 426 -> 53 and the
    decoded width is 424). Example: (51, 240, 426) -> (15, 30, 53).

    Raises:
        ValueError: non-positive sizes, or a frame size below 8 pixels.
    """
    if int(height) < _VAE_SPACE_DOWN or int(width) < _VAE_SPACE_DOWN:
        raise ValueError(f"height and width must be at least 8 pixels, got {height}x{width}")
    return get_latent_num_frames(num_frames), int(height) // _VAE_SPACE_DOWN, int(width) // _VAE_SPACE_DOWN


def get_fps(num_frames: Union[int, str]) -> int:
    """fps conditioning for STDiT3: 24 for videos, 120 for a single image (OpenSora `IMG_FPS`)."""
    return IMAGE_FPS if get_num_frames(num_frames) == 1 else VIDEO_FPS


def closest_aspect_ratio(height: float, width: float) -> str:
    """Name of the supported aspect ratio (height:width) closest to height/width, e.g. (720, 1280) -> "9:16".

    Ties go to the earlier (more landscape) entry. Raises ValueError for non-positive sizes.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    target = height / width
    return min(ASPECT_RATIO_MAP, key=lambda name: abs(float(ASPECT_RATIO_MAP[name]) - target))
