"""Procedural shape-video scenes with exact ground truth, for training and scoring the reference model.

A scene is one or two flat-coloured shapes moving over a background for a few frames. Everything is
deterministic given a seed: ``sample_scene(seed)`` always returns the same :class:`SceneSpec`,
``render(spec)`` always returns the same pixels, and ``caption(spec, seed)`` the same sentence.

Vocabulary (module constants, the evaluator and the benchmarks read them):

* :data:`SHAPES` – 5 kinds: circle, square, triangle, star, cross.
* :data:`COLORS` – 9 named colours, name -> sRGB uint8 triple.
* :data:`BACKGROUNDS` – 7 backgrounds: plain black / white / gray, sky and sunset gradients, grass and
  sand textures.
* :data:`MOTIONS` – 6 motions: left, right, up, down (straight translation), grow, shrink (scaling
  about a fixed centre).

Coordinates are pixels with the origin at the top-left pixel's corner, x to the right, y down; a
pixel (i, j) covers [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5). A shape's *radius*
is the radius of the circle circumscribing it, in pixels.

Shape colours that would be hard to see on a background (sRGB distance below
:data:`MIN_CONTRAST` from any of the background's reference colours) are never sampled on it; see
:data:`ALLOWED_COLORS`.

**Scene distributions** (:data:`DISTRIBUTIONS`, keyword arguments of :func:`sample_scene` /
:func:`sample_dataset`): version 1, what ``models/reference_v1`` was trained on, is one canonical layout
per caption (``position_jitter=0``) on v1's backgrounds: the caption fixes the clip up to the grass and
sand textures, so a sampler's paths are nearly straight and two steps give full quality. Version 2 keeps
the canonical layouts and covers every background with a static luminance grain (``background_grain``
sRGB units of standard deviation, drawn from the texture seed): fine detail that the caption leaves
open, so one caption has many valid clips that differ in exactly what a short sampling schedule
averages away (its last step predicts the mean texture the noisy input still allows: flat). Random
layouts were tried first for v2 and dropped (the reference_v2 model card says why). Captions depend on
none of these knobs: seed ``(s, i)`` gives the same caption in every version, so the held-out prompts are
the same sentences for every model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "SHAPES",
    "COLORS",
    "BACKGROUNDS",
    "BACKGROUND_COLORS",
    "MOTIONS",
    "SHAPE_WORDS",
    "BACKGROUND_PHRASES",
    "MOTION_PARTICIPLES",
    "MOTION_VERBS",
    "SIZE_WORDS",
    "ALLOWED_COLORS",
    "MIN_CONTRAST",
    "DEFAULT_FRAMES",
    "DEFAULT_HEIGHT",
    "DEFAULT_WIDTH",
    "DISTRIBUTIONS",
    "ObjectTrack",
    "SceneSpec",
    "sample_scene",
    "make_scene",
    "render",
    "render_background",
    "object_masks",
    "caption",
    "sample_dataset",
]

DEFAULT_FRAMES = 8
DEFAULT_HEIGHT = 32
DEFAULT_WIDTH = 32

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "orange": (245, 135, 20),
    "purple": (135, 40, 185),
    "pink": (250, 120, 190),
    "cyan": (30, 215, 225),
    "white": (245, 245, 245),
}

BACKGROUNDS: Tuple[str, ...] = ("black", "white", "gray", "sky", "sunset", "grass", "sand")

# Reference colours per background: plain -> one colour; gradient -> top and bottom; texture -> mean.
BACKGROUND_COLORS: Dict[str, Tuple[Tuple[int, int, int], ...]] = {
    "black": ((12, 12, 14),),
    "white": ((240, 240, 236),),
    "gray": ((128, 128, 128),),
    "sky": ((70, 140, 220), (185, 220, 250)),
    "sunset": ((250, 160, 70), (120, 50, 110)),
    "grass": ((60, 140, 45),),
    "sand": ((214, 190, 135),),
}

MOTIONS: Tuple[str, ...] = ("left", "right", "up", "down", "grow", "shrink")

MIN_CONTRAST = 110.0  # sRGB euclidean distance; below this a shape is hard to tell from the background

# Words a caption may use for each shape (first = canonical name).
SHAPE_WORDS: Dict[str, Tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
}

# Phrases naming the background; each is a complete adverbial ("on grass").
BACKGROUND_PHRASES: Dict[str, Tuple[str, ...]] = {
    "black": ("on a black background", "against a black backdrop", "over a plain black background"),
    "white": ("on a white background", "against a white backdrop", "over a plain white background"),
    "gray": ("on a gray background", "against a grey backdrop", "over a plain gray background"),
    "sky": ("in a blue sky", "against the sky", "across a clear blue sky"),
    "sunset": ("against a sunset sky", "in front of an orange sunset", "over a sunset background"),
    "grass": ("on green grass", "over a grassy field", "on a grass background"),
    "sand": ("on a sandy background", "over sand", "across a sandy beach"),
}

# Motion phrases: participles ("a red star sliding left") and finite verbs, singular and plural.
MOTION_PARTICIPLES: Dict[str, Tuple[str, ...]] = {
    "left": ("moving left", "sliding left", "drifting to the left", "gliding leftward"),
    "right": ("moving right", "sliding right", "drifting to the right", "gliding rightward"),
    "up": ("moving up", "rising", "floating upward", "sliding up"),
    "down": ("moving down", "falling", "sinking downward", "sliding down"),
    "grow": ("growing", "getting bigger", "expanding", "growing larger"),
    "shrink": ("shrinking", "getting smaller", "contracting", "shrinking away"),
}
MOTION_VERBS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "left": (("moves left", "move left"), ("slides to the left", "slide to the left")),
    "right": (("moves right", "move right"), ("slides to the right", "slide to the right")),
    "up": (("moves up", "move up"), ("rises", "rise")),
    "down": (("moves down", "move down"), ("falls", "fall")),
    "grow": (("grows", "grow"), ("gets bigger", "get bigger")),
    "shrink": (("shrinks", "shrink"), ("gets smaller", "get smaller")),
}

# Size classes for translating scenes: radius range in pixels at the default 32x32 frame.
SIZE_WORDS: Dict[str, Tuple[float, float]] = {"small": (5.0, 6.0), "large": (7.5, 8.5)}

#: Scene distributions by version: keyword arguments of :func:`sample_scene` (see the module docstring).
#: Version 1 is reference_v1's training distribution; its held-out benchmark stream used random layouts
#: (``position_jitter=1``) on the same backgrounds.
DISTRIBUTIONS: Dict[int, Dict[str, float]] = {
    1: {"position_jitter": 0.0, "position_snap": 0.0, "background_grain": 0.0},
    2: {"position_jitter": 0.0, "position_snap": 0.0, "background_grain": 6.0},
}

_SUPERSAMPLE = 4  # sub-pixel grid per axis for anti-aliased coverage
_EDGE = 1.0  # pixels kept between a shape's circumscribed circle and the frame edge


def _allowed_colors() -> Dict[str, Tuple[str, ...]]:
    out = {}
    for bg, refs in BACKGROUND_COLORS.items():
        ok = []
        for name, rgb in COLORS.items():
            d = min(float(np.linalg.norm(np.subtract(rgb, ref, dtype=np.float64))) for ref in refs)
            if d >= MIN_CONTRAST:
                ok.append(name)
        out[bg] = tuple(ok)
    return out


ALLOWED_COLORS: Dict[str, Tuple[str, ...]] = _allowed_colors()


@dataclass(frozen=True)
class ObjectTrack:
    """Ground truth for one shape over the clip.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: one of :data:`COLORS` (name).
        centers: per-frame shape centre (x, y) in pixels, tuple of ``num_frames`` float pairs.
        radii: per-frame circumscribed radius in pixels, tuple of ``num_frames`` floats.
    """

    shape: str
    color: str
    centers: Tuple[Tuple[float, float], ...]
    radii: Tuple[float, ...]

    @property
    def rgb(self) -> Tuple[int, int, int]:
        """The shape's sRGB colour, uint8 triple."""
        return COLORS[self.color]


@dataclass(frozen=True)
class SceneSpec:
    """Exact ground truth of one clip.

    Attributes:
        objects: one or two :class:`ObjectTrack` (all share ``motion``).
        background: one of :data:`BACKGROUNDS`.
        motion: one of :data:`MOTIONS`.
        size: ``"small"``, ``"large"`` or ``None`` (scaling motions and two-shape scenes have no size class).
        num_frames, height, width: clip geometry (frames, pixels).
        texture_seed: seed of the background texture noise (grass, sand textures and the grain).
        background_grain: standard deviation (sRGB units) of the static luminance grain on the
            background, the same in every frame; 0 for none (scene distribution version 1).
    """

    objects: Tuple[ObjectTrack, ...]
    background: str
    motion: str
    size: Optional[str]
    num_frames: int
    height: int
    width: int
    texture_seed: int = 0
    background_grain: float = 0.0
    meta: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def shapes(self) -> Tuple[str, ...]:
        """Shape kinds, one per object."""
        return tuple(o.shape for o in self.objects)

    @property
    def colors(self) -> Tuple[str, ...]:
        """Colour names, one per object."""
        return tuple(o.color for o in self.objects)


def _rng(rng: Union[np.random.Generator, int, None]) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        if rng is not None and int(rng) < 0:
            raise ValueError(f"seed must be a non-negative int, got {rng}")
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _check_choice(name: str, value: str, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")


def _draw(rng: np.random.Generator, lo: float, hi: float, jitter: float) -> float:
    """A value in [lo, hi]: uniform for jitter 1, squeezed toward the middle by ``jitter`` in [0, 1]."""
    u = float(rng.random())  # one draw whatever the jitter, so captions stay seed-for-seed the same
    if jitter == 1.0:
        return lo + (hi - lo) * u
    return lo + (hi - lo) * (0.5 + jitter * (u - 0.5))


def _pos(rng: np.random.Generator, lo: float, hi: float, jitter: float, snap: float) -> float:
    """A position in [lo, hi]: :func:`_draw`, or with ``snap`` > 0 a uniform draw over the whole range
    rounded to the nearest multiple of ``snap`` that lies in [lo, hi] (the raw draw if none does)."""
    if snap <= 0.0:
        return _draw(rng, lo, hi, jitter)
    v = _draw(rng, lo, hi, 1.0)
    q = round(v / snap) * snap
    if q < lo - 1e-9:
        q += snap
    elif q > hi + 1e-9:
        q -= snap
    return float(q) if lo - 1e-9 <= q <= hi + 1e-9 else v


def _track(rng: np.random.Generator, motion: str, radius: float, h: int, w: int, f: int,
           lane: Optional[Tuple[float, float]] = None, jitter: float = 1.0,
           snap: float = 0.0) -> Tuple[Tuple[Tuple[float, float], ...], Tuple[float, ...]]:
    """Centres and radii for one shape. ``lane`` limits the cross-motion coordinate to [lo, hi] of the frame
    fraction; ``jitter`` scales the randomness of positions and sizes, ``snap`` puts positions on a grid
    (see :func:`make_scene`)."""
    t = np.linspace(0.0, 1.0, f)
    lo_f, hi_f = lane if lane is not None else (0.0, 1.0)
    if motion in ("left", "right", "up", "down"):
        horizontal = motion in ("left", "right")
        along, across = (w, h) if horizontal else (h, w)
        lo = radius + _EDGE
        hi = along - radius - _EDGE
        travel = _draw(rng, 0.45, 0.6, jitter) * along
        travel = min(travel, hi - lo)
        start = _pos(rng, lo, lo + max(0.0, hi - lo - travel), jitter, snap)
        path = start + travel * t
        if motion in ("left", "up"):
            path = path[::-1]
        c_lo = max(radius + _EDGE, lo_f * across + radius * 0.5)
        c_hi = min(across - radius - _EDGE, hi_f * across - radius * 0.5)
        if c_hi < c_lo:
            c_lo = c_hi = 0.5 * (lo_f + hi_f) * across
        other = _pos(rng, c_lo, c_hi, jitter, snap)
        centers = [(float(p), other) if horizontal else (other, float(p)) for p in path]
        radii = [radius] * f
    else:
        r_small = _draw(rng, 2.5, 3.5, jitter) * min(h, w) / 32.0
        r_big = _draw(rng, 8.5, 10.0, jitter) * min(h, w) / 32.0
        radii_arr = r_small + (r_big - r_small) * t
        if motion == "shrink":
            radii_arr = radii_arr[::-1]
        if lane is not None:  # two shapes side by side: lane is the horizontal slot
            r_big = min(r_big, 0.5 * (hi_f - lo_f) * w - _EDGE)
            radii_arr = np.minimum(radii_arr, r_big)
            cx = 0.5 * (lo_f + hi_f) * w
            cy = _pos(rng, r_big + _EDGE, h - r_big - _EDGE, jitter, snap)
        else:
            cx = _pos(rng, r_big + _EDGE, w - r_big - _EDGE, jitter, snap)
            cy = _pos(rng, r_big + _EDGE, h - r_big - _EDGE, jitter, snap)
        centers = [(cx, cy)] * f
        radii = [float(r) for r in radii_arr]
    return tuple(centers), tuple(float(r) for r in radii)


def make_scene(shapes: Union[str, Sequence[str]], colors: Union[str, Sequence[str]], background: str, motion: str,
               rng: Union[np.random.Generator, int, None] = 0, *, size: Optional[str] = None,
               num_frames: int = DEFAULT_FRAMES, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
               position_jitter: float = 1.0, position_snap: float = 0.0,
               background_grain: float = 0.0) -> SceneSpec:
    """Build a scene with the given attributes; positions, travel and texture come from ``rng``.

    Args:
        shapes: one shape name or a sequence of one or two (see :data:`SHAPES`).
        colors: colour name(s), same count as ``shapes`` (see :data:`COLORS`). Two shapes must differ in
            shape or colour so a caption can tell them apart.
        background: one of :data:`BACKGROUNDS`.
        motion: one of :data:`MOTIONS`; all objects share it.
        rng: numpy Generator or int seed (deterministic).
        size: ``"small"``/``"large"`` for a single translating shape, else ``None`` (drawn at random when
            ``None`` and a single shape translates).
        num_frames: frames, >= 2. height, width: pixels, >= 16.
        position_jitter: in [0, 1]; scales every random position, travel and radius draw toward the
            middle of its range (1: the full ranges; 0: one fixed layout per shape count, motion and
            size class). It consumes the same random numbers, so captions do not depend on it.
        position_snap: pixels; when > 0, positions (start and cross-motion coordinate, scaling centre)
            are drawn over their full range and rounded to multiples of it, while radii and travel keep
            following ``position_jitter``. With jitter 0 and snap 4 every shape's footprint sits at the
            same offset to a 4-pixel grid in every clip, but where it sits (which lane) stays random.
        background_grain: sRGB standard deviation of the background's static luminance grain, in
            [0, 20] (0: none). It draws no random numbers here, so layouts and captions do not depend on it.

    Returns:
        A :class:`SceneSpec`.

    Raises:
        ValueError: unknown vocabulary, colour not visible on the background (see :data:`ALLOWED_COLORS`),
            bad counts, geometry, jitter or grain.
    """
    g = _rng(rng)
    shapes_t = (shapes,) if isinstance(shapes, str) else tuple(shapes)
    colors_t = (colors,) if isinstance(colors, str) else tuple(colors)
    if not 1 <= len(shapes_t) <= 2 or len(colors_t) != len(shapes_t):
        raise ValueError(f"need one or two shapes with one colour each, got shapes={shapes_t} colors={colors_t}")
    for s in shapes_t:
        _check_choice("shape", s, SHAPES)
    for c in colors_t:
        _check_choice("color", c, tuple(COLORS))
    _check_choice("background", background, BACKGROUNDS)
    _check_choice("motion", motion, MOTIONS)
    for c in colors_t:
        if c not in ALLOWED_COLORS[background]:
            raise ValueError(f"colour {c!r} is too close to background {background!r}; "
                             f"use one of {', '.join(ALLOWED_COLORS[background])}")
    if len(shapes_t) == 2 and shapes_t[0] == shapes_t[1] and colors_t[0] == colors_t[1]:
        raise ValueError("two shapes must differ in shape or colour")
    if num_frames < 2 or height < 16 or width < 16:
        raise ValueError(f"need num_frames >= 2 and height, width >= 16; got {num_frames}, {height}, {width}")
    if not 0.0 <= float(position_jitter) <= 1.0:
        raise ValueError(f"position_jitter must be in [0, 1], got {position_jitter}")
    if not 0.0 <= float(position_snap) <= min(height, width) / 4:
        raise ValueError(f"position_snap must be in [0, {min(height, width) / 4:g}] pixels, got {position_snap}")
    if not 0.0 <= float(background_grain) <= 20.0:
        raise ValueError(f"background_grain must be in [0, 20] sRGB units, got {background_grain}")
    jit, snap = float(position_jitter), float(position_snap)
    scale = min(height, width) / 32.0
    translating = motion in ("left", "right", "up", "down")
    if size is not None:
        _check_choice("size", size, tuple(SIZE_WORDS))
        if not translating or len(shapes_t) != 1:
            raise ValueError("a size class applies only to a single translating shape")
    objects: List[ObjectTrack] = []
    if len(shapes_t) == 1:
        if translating:
            if size is None:
                size = "small" if g.random() < 0.5 else "large"
            radius = _draw(g, *SIZE_WORDS[size], jit) * scale
        else:
            radius = 0.0
        centers, radii = _track(g, motion, radius, height, width, num_frames, jitter=jit, snap=snap)
        objects.append(ObjectTrack(shapes_t[0], colors_t[0], centers, radii))
    else:
        lanes = ((0.0, 0.5), (0.5, 1.0))
        order = [0, 1] if g.random() < 0.5 else [1, 0]
        for k in range(2):
            radius = _draw(g, 4.5, 5.5, jit) * scale if translating else 0.0
            centers, radii = _track(g, motion, radius, height, width, num_frames, lane=lanes[order[k]], jitter=jit,
                                    snap=snap)
            objects.append(ObjectTrack(shapes_t[k], colors_t[k], centers, radii))
    return SceneSpec(objects=tuple(objects), background=background, motion=motion, size=size,
                     num_frames=num_frames, height=height, width=width,
                     texture_seed=int(g.integers(0, 2**31 - 1)), background_grain=float(background_grain))


def sample_scene(rng: Union[np.random.Generator, int, None] = None, *, two_shape_prob: float = 0.2,
                 num_frames: int = DEFAULT_FRAMES, height: int = DEFAULT_HEIGHT,
                 width: int = DEFAULT_WIDTH, position_jitter: float = 1.0, position_snap: float = 0.0,
                 background_grain: float = 0.0) -> SceneSpec:
    """Draw a random scene: uniform shape, motion and background, a colour visible on that background.

    Args:
        rng: numpy Generator or int seed; the same seed gives the same scene.
        two_shape_prob: probability of a two-shape scene, in [0, 1].
        num_frames, height, width: clip geometry.
        position_jitter, position_snap, background_grain: see :func:`make_scene` (defaults: full random
            layouts, no grain); :data:`DISTRIBUTIONS` lists the versions the reference models use.

    Returns:
        A :class:`SceneSpec`.

    Raises:
        ValueError: ``two_shape_prob`` or ``position_jitter`` outside [0, 1], or bad geometry.
    """
    if not 0.0 <= two_shape_prob <= 1.0:
        raise ValueError(f"two_shape_prob must be in [0, 1], got {two_shape_prob}")
    g = _rng(rng)
    background = BACKGROUNDS[int(g.integers(len(BACKGROUNDS)))]
    motion = MOTIONS[int(g.integers(len(MOTIONS)))]
    palette = ALLOWED_COLORS[background]
    n = 2 if g.random() < two_shape_prob else 1
    shapes = [SHAPES[int(g.integers(len(SHAPES)))] for _ in range(n)]
    if n == 2:
        colors = list(g.choice(len(palette), size=2, replace=False))
        colors = [palette[int(i)] for i in colors]
    else:
        colors = [palette[int(g.integers(len(palette)))]]
    return make_scene(shapes, colors, background, motion, g, num_frames=num_frames, height=height, width=width,
                      position_jitter=position_jitter, position_snap=position_snap,
                      background_grain=background_grain)


def _polygon_inside(px: np.ndarray, py: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(vx)
    for i in range(n):
        x0, y0, x1, y1 = vx[i], vy[i], vx[(i + 1) % n], vy[(i + 1) % n]
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < xint)
    return inside


def _star_vertices() -> Tuple[np.ndarray, np.ndarray]:
    k = np.arange(10)
    r = np.where(k % 2 == 0, 1.0, 0.45)
    a = -np.pi / 2 + k * np.pi / 5  # first point straight up (y is down, so -pi/2)
    return r * np.cos(a), r * np.sin(a)


_STAR = _star_vertices()
_TRI = (np.cos(-np.pi / 2 + np.arange(3) * 2 * np.pi / 3), np.sin(-np.pi / 2 + np.arange(3) * 2 * np.pi / 3))


def _unit_shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in the unit shape (circumscribed radius 1, upright), coordinates relative to its centre."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        s = 1.0 / np.sqrt(2.0)
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if shape == "triangle":
        return _polygon_inside(u, v, _TRI[0], _TRI[1] + 0.12)  # shift down so the centroid sits near the centre
    if shape == "star":
        return _polygon_inside(u, v, *_STAR)
    if shape == "cross":
        a, b = 0.3, 0.95
        return ((np.abs(u) <= a) & (np.abs(v) <= b)) | ((np.abs(u) <= b) & (np.abs(v) <= a))
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def object_masks(spec: SceneSpec) -> np.ndarray:
    """Anti-aliased coverage of each object.

    Returns:
        float32 array [n_objects, F, H, W] in [0, 1]: the fraction of each pixel the shape covers
        (4x4 supersampling). Objects are drawn in order, later ones on top (``render`` composites the same way).
    """
    ss = _SUPERSAMPLE
    h, w = spec.height, spec.width
    ys = (np.arange(h * ss, dtype=np.float64) + 0.5) / ss
    xs = (np.arange(w * ss, dtype=np.float64) + 0.5) / ss
    out = np.zeros((len(spec.objects), spec.num_frames, h, w), dtype=np.float32)
    for k, obj in enumerate(spec.objects):
        for f, ((cx, cy), r) in enumerate(zip(obj.centers, obj.radii)):
            if r <= 0:
                continue
            # Only evaluate the bounding box of the shape.
            x0 = max(0, int(np.floor(cx - r)) - 1)
            x1 = min(w, int(np.ceil(cx + r)) + 1)
            y0 = max(0, int(np.floor(cy - r)) - 1)
            y1 = min(h, int(np.ceil(cy + r)) + 1)
            if x1 <= x0 or y1 <= y0:
                continue
            u = (xs[x0 * ss:x1 * ss][None, :] - cx) / r
            v = (ys[y0 * ss:y1 * ss][:, None] - cy) / r
            u, v = np.broadcast_arrays(u, v)
            inside = _unit_shape_inside(obj.shape, u, v).astype(np.float32)
            cov = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
            out[k, f, y0:y1, x0:x1] = cov
    return out


def render_background(background: str, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
                      texture_seed: int = 0, grain: float = 0.0) -> np.ndarray:
    """One background frame.

    Args:
        background: one of :data:`BACKGROUNDS`. height, width: pixels.
        texture_seed: seed of the grass and sand textures and of the grain.
        grain: standard deviation (sRGB units) of a per-pixel luminance grain added to every channel
            (0: none, as in scene distribution version 1; the textures are then bit-identical to it).

    Returns:
        float32 array [H, W, 3] in sRGB units 0..255 (not yet rounded).

    Raises:
        ValueError: unknown background.
    """
    _check_choice("background", background, BACKGROUNDS)
    refs = np.asarray(BACKGROUND_COLORS[background], dtype=np.float32)
    g = np.random.default_rng(texture_seed)
    if background in ("black", "white", "gray"):
        img = np.broadcast_to(refs[0], (height, width, 3)).astype(np.float32)
    elif background in ("sky", "sunset"):
        t = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None, None]
        col = refs[0] * (1 - t) + refs[1] * t
        img = np.broadcast_to(col, (height, width, 3)).astype(np.float32)
    elif background == "grass":
        # Vertical blades: column-correlated brightness plus fine noise.
        blades = g.normal(0.0, 1.0, size=(1, width, 1)).astype(np.float32)
        fine = g.normal(0.0, 1.0, size=(height, width, 1)).astype(np.float32)
        shade = 14.0 * blades + 8.0 * fine
        img = refs[0] + shade * np.array([0.6, 1.0, 0.5], dtype=np.float32)
    else:  # sand: speckles
        fine = g.normal(0.0, 1.0, size=(height, width, 1)).astype(np.float32)
        img = refs[0] + 10.0 * fine * np.array([1.0, 0.95, 0.8], dtype=np.float32)
    if grain > 0.0:  # drawn after the textures, so they do not change with it
        img = img + float(grain) * g.normal(0.0, 1.0, size=(height, width, 1)).astype(np.float32)
    return np.clip(img, 0.0, 255.0).astype(np.float32)


def render(spec: SceneSpec, masks: Optional[np.ndarray] = None) -> np.ndarray:
    """Render a scene.

    Args:
        spec: the scene.
        masks: ``object_masks(spec)`` when the caller has it already (training uses it for loss weights),
            so it is not computed twice; default: computed here.

    Returns:
        uint8 array [F, H, W, 3], sRGB. Static background, objects alpha-composited by anti-aliased coverage.
    """
    bg = render_background(spec.background, spec.height, spec.width, spec.texture_seed, spec.background_grain)
    frames = np.broadcast_to(bg, (spec.num_frames, spec.height, spec.width, 3)).astype(np.float32).copy()
    if masks is None:
        masks = object_masks(spec)
    for k, obj in enumerate(spec.objects):
        a = masks[k][..., None]
        frames = frames * (1.0 - a) + np.asarray(obj.rgb, dtype=np.float32) * a
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: SceneSpec, rng: Union[np.random.Generator, int, None] = 0) -> str:
    """A natural-language caption of ``spec`` drawn from several templates and paraphrases.

    Every caption names each object's colour and shape (a shape word from :data:`SHAPE_WORDS`), the
    motion (a phrase from :data:`MOTION_PARTICIPLES` or :data:`MOTION_VERBS`) and the background (a phrase
    from :data:`BACKGROUND_PHRASES`); single translating shapes may carry their size word. Examples:
    "a red circle sliding left on a black background", "over sand, a small yellow star moves up".

    Args:
        spec: the scene.
        rng: numpy Generator or int seed; the same seed gives the same caption.

    Returns:
        A lower-case sentence without a trailing full stop.
    """
    g = _rng(rng)

    def pick(options):
        return options[int(g.integers(len(options)))]

    nouns = []
    for obj in spec.objects:
        noun = f"{obj.color} {pick(SHAPE_WORDS[obj.shape])}"
        nouns.append(noun)
    if spec.size is not None and len(spec.objects) == 1 and g.random() < 0.5:
        nouns[0] = f"{spec.size} {nouns[0]}"
    plural = len(nouns) == 2
    subject = " and ".join(f"{_article(n)} {n}" for n in nouns)
    bg = pick(BACKGROUND_PHRASES[spec.background])
    part = pick(MOTION_PARTICIPLES[spec.motion])
    verb = pick(MOTION_VERBS[spec.motion])[1 if plural else 0]
    template = int(g.integers(5))
    if template == 0:
        text = f"{subject} {part} {bg}"
    elif template == 1:
        text = f"{bg}, {subject} {verb}"
    elif template == 2:
        text = f"{subject} {verb} {bg}"
    elif template == 3:
        text = f"a video of {subject} {part} {bg}"
    else:
        text = f"{bg}, {subject} {'are' if plural else 'is'} {part}"
    return text


def sample_dataset(seed: int, n: int, *, two_shape_prob: float = 0.2, num_frames: int = DEFAULT_FRAMES,
                   height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
                   position_jitter: float = 1.0, position_snap: float = 0.0,
                   background_grain: float = 0.0) -> List[Tuple[SceneSpec, str]]:
    """``n`` (scene, caption) pairs; item ``i`` depends only on ``(seed, i)`` (its caption not on the layout
    knobs nor the grain).

    Raises:
        ValueError: negative ``seed`` or ``n``.
    """
    if seed < 0 or n < 0:
        raise ValueError(f"seed and n must be non-negative, got seed={seed}, n={n}")
    out = []
    for i in range(n):
        g = np.random.default_rng([seed, i])
        spec = sample_scene(g, two_shape_prob=two_shape_prob, num_frames=num_frames, height=height, width=width,
                            position_jitter=position_jitter, position_snap=position_snap,
                            background_grain=background_grain)
        out.append((spec, caption(spec, g)))
    return out
