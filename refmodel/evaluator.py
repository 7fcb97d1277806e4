"""Score a shape-video clip against its prompt text: shape, colour, background, motion, temporal
consistency, ghosting and (against the ground truth of the prompt's scene) detail.

A generated clip comes only with its prompt, so the evaluator never sees a :class:`.scenes.SceneSpec`:
it parses the prompt with the scene generator's vocabulary (:mod:`.scenes` constants, including every
caption paraphrase) and measures the attributes from the pixels alone.

Measurement (:func:`measure_clip`, numpy and SciPy; 6-10 ms of CPU for an 8 x 32 x 32 clip on the
shared 2-core machine):

1. **Background.** Each background class has an expected appearance that depends only on the row
   (plain colours, vertical gradients, stationary textures): its per-row mean ``M_k`` and spread ``S_k``
   are estimated once per frame size from :func:`.scenes.render_background` over 16 texture seeds. A
   pixel is an inlier of class ``k`` when its RMS z-score ``sqrt(mean_c ((x - M_k) / S_k)^2)`` is below
   :data:`BG_INLIER_Z` (``S_k`` includes a floor of :data:`BG_NOISE_FLOOR` so mildly noisy clips still
   fit). The class score is the inlier fraction over the pixels (every other row and column) of all
   frames; the posterior is ``softmax(fraction / BG_TEMPERATURE)``. Objects cover at most about a third
   of the frame, so the true class wins by a wide margin.
2. **Objects.** The background image is re-estimated per pixel as the median over the frames where the
   pixel fits the best class (z below :data:`BG_ESTIMATE_Z`; the row model where it never does).
   Foreground = pixels further than :data:`FG_THRESHOLD` from it, plus their neighbours further than
   :data:`EDGE_THRESHOLD` (anti-aliased rims). Each foreground pixel is unmixed against every named
   colour ``c``: ``x = alpha c + (1 - alpha) b`` with ``alpha`` in [0, 1] the coverage and ``b`` the
   background; the colour with the smallest residual labels the pixel, so rims keep their object's
   colour (colours closer than :data:`MIN_COLOR_CONTRAST` to the local background are not candidates). Colours holding at least :data:`MIN_OBJECT_SHARE` of the largest colour's solid coverage
   (pixels with ``alpha >= 1/2``; noise makes faint pixels of every colour) and :data:`MIN_OBJECT_MASS`
   solid pixels per frame are the objects, at most two, largest first. (Two objects of
   the same colour therefore read as one; the generator's sampler never draws that.)
3. **Colour.** Mean of the object's core pixels (``alpha >= CORE_ALPHA``), posterior
   ``softmax(-|m - c|^2 / (2 COLOR_SIGMA^2))`` over :data:`.scenes.COLORS`.
4. **Shape.** On the :data:`SHAPE_FRAMES` frames where the object is largest, its coverage map is
   compared with each shape's template: the exact pixel coverage of the generator's own unit shape
   (:func:`.scenes.object_masks`, upright, rasterised once at radius 64 and integrated through a
   summed-area table) scaled to the object's area and placed at its centroid. Error = ``sum|alpha - tmpl|
   / sum(alpha + tmpl)`` (1 - soft Dice), averaged over frames weighted by area; posterior
   ``softmax(-err / SHAPE_TEMPERATURE)``. Ground-truth errors are 0.005-0.03, the runner-up's >= 0.066.
5. **Motion.** Least-squares slopes over frames of the centroid (x, y) and of the log equivalent radius
   give the net displacement ``u = dx / W``, ``v = dy / H`` and growth ``g = d ln r``; the evidence for
   (left, right, up, down, grow, shrink) is ``(-u, u, -v, v, GROWTH_GAIN g, -GROWTH_GAIN g)`` and the
   posterior ``softmax(evidence / MOTION_TEMPERATURE)``. A static object gets the uniform 1/6.
6. **Temporal consistency** ``T = exp(-1/2 sum_i (x_i / s_i)^2)``, scales ``s_i`` in
   :data:`TEMPORAL_SCALES`, over five penalties (object ones averaged over objects by area):
   ``position_jerk`` and ``size_jerk``, |second difference| over frames of the centroid and of the
   equivalent radius (px; mean of the smallest two thirds, so one kink such as a growth that reaches
   its cap is forgiven); ``color_spread``, spread of the object's per-frame core colour (sRGB);
   ``flicker``, mean |change| between consecutive frames of 4 x 4 block averages of the pixels that are
   background in both (sRGB; block averages keep brightness flicker and drop per-pixel noise); and
   ``dropout``, the share of frames where an object vanishes (< 1 px, or < 1/4 of both neighbours).
7. **Detail** (what a short sampling schedule loses first: each step of an RFLOW sampler outputs the
   mean of the clips the noisy input still allows, so few steps average fine structure away).
   ``edge_sharpness``: each object's coverage of its own colour is unmixed against the background image
   over all pixels within :data:`EDGE_NEIGHBOURHOOD` px of its solid pixels; the coverage steps between
   neighbouring pixels of at least :data:`EDGE_MIN_STEP` give ``sum(step^2) / sum(step)``, the mean step
   weighted by step: 1 for a one-pixel edge, about 0.6 for the generator's anti-aliased edges, about
   ``1/w`` for an edge smeared over ``w`` pixels (it does not depend on the size, shape or position).
   ``texture_contrast``: RMS of ``luma - its 3 x 3 mean`` (Rec. 601 luma of the background image, sRGB
   units) where the background shows in at least half the frames: the static fine luminance texture
   (grass blades, sand, the grain of scene distribution v2), the detail a viewer sees (as video codecs
   keep luma detail and drop chroma detail); not per-frame noise, which the median over frames removes,
   nor colour speckle, which luma leaves out.
8. **Ghosting** ``ghost_ratio``: an object is its largest solid blob in each frame; every pixel more
   than :data:`GHOST_NEIGHBOURHOOD` px from one is unmixed against the detected objects' colours over
   the background class's row model (not the median image, so a faint copy that stays in place counts
   too), the coverage is averaged over 3 x 3 pixels, and 8-connected blobs of at least
   :data:`GHOST_MIN_PIXELS` pixels with at least :data:`GHOST_ALPHA` coverage are ghosts: faint extra
   copies, trails, smears (a pixel counts only where the mix of object colour and background explains it
   within :data:`GHOST_RESIDUAL` spreads, so a foreign background colour leaking in is not a ghost). Their coverage over the objects' own is the ratio. Fainter ghosts than
   :data:`GHOST_ALPHA` (11 sRGB units at the generator's minimum contrast) are not counted: lower, the
   grass and sand textures of ground-truth clips start to read as ghosts.

Scoring (:func:`score_measurement`): each prompt object is matched to the detected object with the
highest posterior for the prompted colour (two prompt objects and two detected ones: the assignment
with the larger total). Differences below :data:`MATCH_MARGIN` are ties, broken towards the larger
object, so an absent colour is matched by size rather than by noise. Then

* ``shape`` = mean over prompt objects of the matched object's posterior for the prompted shape,
* ``color`` = the same for the prompted colour,
* ``background`` = posterior of the prompted background,
* ``motion`` = area-weighted mean over detected objects of the posterior of the prompted motion,
* ``temporal`` = ``T``,
* ``ghost_free`` = ``1 - ghost_ratio`` (clipped at 0): the share of the objects' ink that stays on them,
* ``detail`` (only with a ground-truth ``reference``, the render of the prompt's scene spec; see
  :func:`detail_score`) = mean of ``edge_sharpness / reference's`` and, where the reference has texture
  (at least :data:`TEXTURE_MIN`), ``texture_contrast / reference's``, each capped at 1: the share of the
  scene's detail the clip keeps,
* ``overall = T * ghost_free * sum_k w_k * score_k``, with :data:`WEIGHTS` = 1/4 each for shape, colour,
  background and motion, or with a reference :data:`WEIGHTS_WITH_DETAIL` = 1/5 each for those and detail.

Why this form. Temporal consistency and ghosting are multiplicative gates, not addends, because they
do not depend on the prompt: a coherent, clean clip of the wrong scene must not earn points for being
coherent and clean, and a flickering or ghosted clip of the right scene is worse in proportion
(``ghost_free`` is linear in the leaked share, with no scale to choose). Detail is an addend: it is
measured against the prompted scene's own ground truth (grass has texture and black does not; a star's
points are sharp), so, like the four attributes, it says how much of *that* scene the clip shows, and
it weighs what each of them weighs. Both detail ratios and ``ghost_free`` are shares with no tuning
constant; the detection thresholds were set on ground-truth renders and on corruptions (blur, copies,
trails, noise) before any model was scored. With a reference, an unrelated but perfect-looking clip
keeps its detail points: chance rises from 0.161 to 0.2 + 0.8 x 0.161 = 0.329. Compare ``overall``
only between clips scored the same way (with or without references).

A clip without any detected object scores 0 for shape, colour and motion (and for edge sharpness).
Prompt sizes ("small", "large") are parsed and reported but not scored.

**Chance.** For a clip that is coherent (``T`` = 1) but unrelated to its prompt, the expected overall is
what a perfect reader scores on independent prompt/clip pairs from the generator's distribution.
:func:`chance_level` computes it by scoring captions against one-hot measurements
(:func:`ideal_measurement`) of independent ground-truth scenes: **0.161** overall (20,000 pairs:
shape 0.197 ~ 1/5, colour 0.135, background 0.142 ~ 1/7, motion 0.169 ~ 1/6; colour is below 1/9
because palettes depend on the background and above it where two objects offer two chances).

**Measured** (ground-truth renders of 500 random captions, ``scenes.sample_dataset``): overall 0.995
(shape 0.999, colour 0.999, background 1.000, motion 0.999, temporal 0.996); the same clips with the
captions shuffled: 0.161, against 0.162 for a perfect reader on the same pairs. Blur (3 x 3 binomial)
plus Gaussian noise of 10 sRGB units still scores 0.88; independent per-frame colour jitter of 8 units
(flicker) drops temporal consistency to about 0.3. New criteria (random layouts on v2's grained backgrounds, 120 renders, setup of
``tests/test_fidelity.py``): another valid clip of the same caption (other layout and grain) keeps detail
0.975 of its reference (edges 0.969, texture 0.981) and ghost-free 1.000 (ghost ratio 0.0003); a
Gaussian blur of 0.7 / 1.0 px leaves detail 0.41 / 0.27 (edges 0.54 / 0.42, texture 0.27 / 0.12) with
ghost-free 1.000 / 0.998; a copy of the object at 15 / 30 % opacity gives ghost-free 0.935 / 0.835 with
detail 0.997 / 0.996; Gaussian noise of 8 units leaves detail 0.99 and ghost-free 0.999 (PSNR / SSIM
against the clean clip see it: ``refmodel/fidelity.py``). Overall with the reference: 0.994 (ground
truth), 0.869 / 0.819 (blur), 0.895 / 0.719 (copies), 0.966 (noise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy.ndimage import binary_dilation, label, minimum_filter, uniform_filter

from . import scenes

__all__ = [
    "WEIGHTS",
    "WEIGHTS_WITH_DETAIL",
    "detail_score",
    "PromptObject",
    "PromptAttributes",
    "DetectedObject",
    "ClipMeasurement",
    "EvalResult",
    "parse_prompt",
    "measure_clip",
    "ideal_measurement",
    "score_measurement",
    "evaluate",
    "evaluate_many",
    "chance_level",
]

CRITERIA: Tuple[str, ...] = ("shape", "color", "background", "motion")
WEIGHTS: Dict[str, float] = {"shape": 0.25, "color": 0.25, "background": 0.25, "motion": 0.25}
#: With a ground-truth reference the detail criterion joins the mean: 1/5 each.
WEIGHTS_WITH_DETAIL: Dict[str, float] = {"shape": 0.2, "color": 0.2, "background": 0.2, "motion": 0.2, "detail": 0.2}

SHAPES = scenes.SHAPES
COLOR_NAMES: Tuple[str, ...] = tuple(scenes.COLORS)
BACKGROUNDS = scenes.BACKGROUNDS
MOTIONS = scenes.MOTIONS

# Measurement constants (sRGB units 0..255 unless stated). Chosen on ground-truth renders: each gives
# a margin of several temperatures between the true class and the runner-up.
BG_NOISE_FLOOR = 8.0  # added in quadrature to each class's spread so slightly noisy clips still fit
BG_INLIER_Z = 3.0
BG_ESTIMATE_Z = 4.0  # looser: which pixels may inform the background image (rare texture extremes too)
BG_TEMPERATURE = 0.05  # on inlier fractions
FG_THRESHOLD = 30.0  # Euclidean sRGB distance from the background estimate
EDGE_THRESHOLD = 12.0  # the same, for pixels touching the foreground (anti-aliased rims)
MIN_OBJECT_SHARE = 0.12  # of the largest colour's coverage: an occluded second object still counts
MIN_OBJECT_MASS = 2.0  # coverage-weighted pixels per frame, on average over the clip
CORE_ALPHA = 0.9
MIN_COLOR_CONTRAST = 0.5 * scenes.MIN_CONTRAST  # sRGB distance a colour needs from the background to be read
COLOR_SIGMA = 25.0
SHAPE_TEMPERATURE = 0.012  # on 1 - soft Dice
SHAPE_FRAMES = 4  # shape is judged on the frames with the largest object area
MATCH_MARGIN = 0.01  # colour-posterior difference that decides which detected object a prompt object is
GROWTH_GAIN = 0.6  # ln-radius change -> displacement-fraction units
MOTION_TEMPERATURE = 0.06
TEMPORAL_SCALES: Dict[str, float] = {
    "position_jerk": 1.0,  # px / frame^2
    "size_jerk": 0.75,  # px / frame^2 (equivalent radius)
    "color_spread": 25.0,  # sRGB
    "flicker": 6.0,  # sRGB, mean |change| of block averages between frames
    "dropout": 0.2,  # share of frames where an object vanishes
}

EDGE_NEIGHBOURHOOD = 2  # px around an object's solid pixels whose coverage steps count as its edges
EDGE_MIN_STEP = 0.1  # coverage steps below this between neighbouring pixels are noise, not edge
TEXTURE_MIN = 2.0  # sRGB; a reference whose background detail is below this has no texture to lose
GHOST_NEIGHBOURHOOD = 2  # px around each object's solid pixels that belong to the object (its rims)
GHOST_ALPHA = 0.1  # 3 x 3 mean coverage of an object colour that makes a pixel a ghost candidate
GHOST_MIN_PIXELS = 4  # connected candidate pixels (8-neighbourhood) that make a ghost, not noise
GHOST_RESIDUAL = 2.0  # what mixing with an object colour leaves unexplained, in the class's RMS spreads

FLICKER_GRID = 4  # blocks per side for the flicker measure
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # Rec. 601 luma weights
_LUT_RADIUS = 64  # unit shape templates are rasterised at this radius (px) once
_BG_SEEDS = 16


# ----------------------------------------------------------------------------------------------------
# Prompt parsing
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptObject:
    """One object named by a prompt: ``shape`` in :data:`.scenes.SHAPES`, ``color`` in
    :data:`.scenes.COLORS`, ``size`` ``"small"``/``"large"`` or ``None``."""

    shape: str
    color: str
    size: Optional[str] = None


@dataclass(frozen=True)
class PromptAttributes:
    """What a prompt asks for: one or more objects (prompt order), a background and a motion."""

    objects: Tuple[PromptObject, ...]
    background: str
    motion: str

    def as_dict(self) -> Dict[str, object]:
        """Plain-JSON form: ``{"objects": [{"shape", "color", "size"}], "background", "motion"}``."""
        return {
            "objects": [{"shape": o.shape, "color": o.color, "size": o.size} for o in self.objects],
            "background": self.background,
            "motion": self.motion,
        }


_STOP = {"a", "an", "the", "of", "on", "in", "over", "across", "against", "to", "front", "plain",
         "background", "backdrop", "video", "is", "are", "and"}


def _tokens(text: str) -> List[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _phrase_table(table: Mapping[str, Iterable[str]]) -> List[Tuple[Tuple[str, ...], str]]:
    out = []
    for label, phrases in table.items():
        for p in phrases:
            out.append((tuple(_tokens(p)), label))
    out.sort(key=lambda t: -len(t[0]))  # longest first so "a sunset sky" beats "the sky"
    return out


def _distinctive_words(table: Mapping[str, Iterable[str]], extra_stop: Iterable[str] = ()) -> Dict[str, str]:
    """Words that occur in the phrases of exactly one label (plus each label's own name)."""
    owners: Dict[str, set] = {}
    for label, phrases in table.items():
        for p in phrases:
            for w in _tokens(p):
                owners.setdefault(w, set()).add(label)
    stop = _STOP | set(extra_stop)
    out = {w: next(iter(o)) for w, o in owners.items() if len(o) == 1 and w not in stop}
    for label in table:
        out[label] = label
    return out


def _motion_phrases() -> Dict[str, Tuple[str, ...]]:
    out = {}
    for m in MOTIONS:
        ph = list(scenes.MOTION_PARTICIPLES.get(m, ()))
        for sing, plur in scenes.MOTION_VERBS.get(m, ()):
            ph += [sing, plur]
        out[m] = tuple(ph)
    return out


_BG_PHRASES = _phrase_table(scenes.BACKGROUND_PHRASES)
_BG_WORDS = _distinctive_words(scenes.BACKGROUND_PHRASES, extra_stop=COLOR_NAMES)
_BG_WORDS.setdefault("grey", "gray")
_MOTION_TABLE = _motion_phrases()
_MOTION_PHRASES = _phrase_table(_MOTION_TABLE)
_MOTION_WORDS = _distinctive_words(_MOTION_TABLE)
_SHAPE_PHRASES = _phrase_table(scenes.SHAPE_WORDS)
_SIZE_WORDS = set(scenes.SIZE_WORDS)


def _match_phrases(tok: List[Optional[str]], table) -> List[Tuple[int, int, str]]:
    """Greedy longest-first, non-overlapping phrase matches; consumed tokens become None."""
    found = []
    for phrase, label in table:
        n = len(phrase)
        i = 0
        while i + n <= len(tok):
            if tuple(tok[i:i + n]) == phrase:
                found.append((i, i + n, label))
                for j in range(i, i + n):
                    tok[j] = None
                i += n
            else:
                i += 1
    found.sort()
    return found


def _one_label(found: Sequence[str], what: str, prompt: str) -> Optional[str]:
    labels = list(dict.fromkeys(found))
    if len(labels) > 1:
        raise ValueError(f"prompt {prompt!r} names several {what}s ({', '.join(labels)}); "
                         f"a scene has exactly one {what}")
    return labels[0] if labels else None


def parse_prompt(prompt: str) -> PromptAttributes:
    """Read the objects, background and motion a prompt asks for, with the scene generator's vocabulary.

    Exact caption phrases (:data:`.scenes.BACKGROUND_PHRASES`, :data:`.scenes.MOTION_PARTICIPLES`,
    :data:`.scenes.MOTION_VERBS`, :data:`.scenes.SHAPE_WORDS`) are matched first, longest first, and removed
    (so "in a blue sky" does not read as a blue object); if none matches, a word that belongs to exactly one
    background or motion in those tables is used ("grassy", "leftward"), or "<name> background". Each shape
    word takes the colour (:data:`.scenes.COLORS`) and size word among the three tokens before it.

    Args:
        prompt: the caption, any case and punctuation.

    Returns:
        :class:`PromptAttributes`.

    Raises:
        TypeError: ``prompt`` is not a string.
        ValueError: the prompt names no shape, a shape without a colour, no or several backgrounds, or no or
            several motions; the message lists the accepted words.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    tok: List[Optional[str]] = _tokens(prompt)
    if not tok:
        raise ValueError("prompt is empty; describe a scene such as 'a red circle moving left on a black background'")

    bg = _one_label([lab for _, _, lab in _match_phrases(tok, _BG_PHRASES)], "background", prompt)
    if bg is None:
        cands = []
        for i, w in enumerate(tok):
            if w is None:
                continue
            nxt = tok[i + 1] if i + 1 < len(tok) else None
            if nxt in ("background", "backdrop") and (w in BACKGROUNDS or w == "grey"):
                cands.append((i, i + 2, "gray" if w == "grey" else w))
            elif w in _BG_WORDS and w not in COLOR_NAMES:
                cands.append((i, i + 1, _BG_WORDS[w]))
        if any(lab != "sky" for *_, lab in cands):  # "sunset sky" is a sunset
            cands = [c for c in cands if c[2] != "sky"]
        bg = _one_label([c[2] for c in cands], "background", prompt)
        for i, j, _ in cands:
            for k in range(i, j):
                tok[k] = None
    if bg is None:
        raise ValueError(f"prompt {prompt!r} names no background; use a phrase such as "
                         f"'on a black background' or one of: {', '.join(BACKGROUNDS)}")

    motion = _one_label([lab for _, _, lab in _match_phrases(tok, _MOTION_PHRASES)], "motion", prompt)
    if motion is None:
        cands = [(i, _MOTION_WORDS[w]) for i, w in enumerate(tok) if w is not None and w in _MOTION_WORDS]
        motion = _one_label([lab for _, lab in cands], "motion", prompt)
        for i, _ in cands:
            tok[i] = None
    if motion is None:
        raise ValueError(f"prompt {prompt!r} names no motion; use e.g. 'moving left', 'rises', 'growing' "
                         f"(motions: {', '.join(MOTIONS)})")

    objects = []
    for start, _, shape in _match_phrases(tok, _SHAPE_PHRASES):
        color = size = None
        for k in range(start - 1, max(-1, start - 4), -1):
            w = tok[k]
            if w is None or w in ("and", "with"):
                break
            if color is None and w in scenes.COLORS:
                color = w
            elif size is None and w in _SIZE_WORDS:
                size = w
        if color is None:
            raise ValueError(f"prompt {prompt!r}: the {shape} has no colour; put one of "
                             f"{', '.join(COLOR_NAMES)} before the shape word")
        objects.append(PromptObject(shape, color, size))
    if not objects:
        words = sorted({w for ws in scenes.SHAPE_WORDS.values() for w in ws})
        raise ValueError(f"prompt {prompt!r} names no shape; use one of: {', '.join(words)}")
    return PromptAttributes(tuple(objects), bg, motion)


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedObject:
    """One object found in a clip.

    Attributes:
        color_probs: posterior over :data:`.scenes.COLORS` names (sums to 1).
        shape_probs: posterior over :data:`.scenes.SHAPES`.
        motion_probs: posterior over :data:`.scenes.MOTIONS`.
        mass: mean coverage per frame, pixels.
        centers: per-frame centroid (x, y) in pixels (NaN where absent), float array [F, 2].
        radii: per-frame equivalent radius ``sqrt(area / pi)`` in pixels, float array [F].
    """

    color_probs: Mapping[str, float]
    shape_probs: Mapping[str, float]
    motion_probs: Mapping[str, float]
    mass: float
    centers: np.ndarray = field(repr=False, compare=False)
    radii: np.ndarray = field(repr=False, compare=False)

    @property
    def color(self) -> str:
        """Most probable colour name."""
        return max(self.color_probs, key=self.color_probs.get)

    @property
    def shape(self) -> str:
        """Most probable shape name."""
        return max(self.shape_probs, key=self.shape_probs.get)

    @property
    def motion(self) -> str:
        """Most probable motion name."""
        return max(self.motion_probs, key=self.motion_probs.get)


@dataclass(frozen=True)
class ClipMeasurement:
    """Everything :func:`measure_clip` reads from the pixels.

    Attributes:
        objects: detected objects, largest first (zero to two).
        background_probs: posterior over :data:`.scenes.BACKGROUNDS`.
        temporal: temporal consistency in [0, 1].
        temporal_terms: the raw penalties (see :data:`TEMPORAL_SCALES`), name -> value.
        edge_sharpness: mean coverage step across the objects' edges, weighted by step (1 for a
            one-pixel edge, about 0.6 for an anti-aliased one, about 1/w for an edge blurred over w
            pixels); None without objects.
        texture_contrast: RMS high-frequency luma (pixel minus its 3 x 3 mean, Rec. 601 luma in sRGB
            units) of the static background image; 0 when too little background shows.
        ghost_ratio: coverage of the objects' colours found outside the objects (faint extra copies,
            trails, smears: connected blobs of at least :data:`GHOST_MIN_PIXELS` pixels more than
            :data:`GHOST_NEIGHBOURHOOD` px from any object's main blob), as a share of the coverage of
            the objects' main blobs (an object's main blob: its largest solid blob in each frame).
    """

    objects: Tuple[DetectedObject, ...]
    background_probs: Mapping[str, float]
    temporal: float
    temporal_terms: Mapping[str, float] = field(default_factory=dict)
    edge_sharpness: Optional[float] = None
    texture_contrast: float = 0.0
    ghost_ratio: float = 0.0

    @property
    def background(self) -> str:
        """Most probable background name."""
        return max(self.background_probs, key=self.background_probs.get)

    def summary(self) -> Dict[str, object]:
        """Plain-JSON form of the most probable attributes."""
        return {
            "objects": [{"shape": o.shape, "color": o.color, "motion": o.motion, "mass": round(o.mass, 2)}
                        for o in self.objects],
            "background": self.background,
            "temporal": round(self.temporal, 4),
            "temporal_terms": {k: round(float(v), 4) for k, v in self.temporal_terms.items()},
            "edge_sharpness": None if self.edge_sharpness is None else round(self.edge_sharpness, 4),
            "texture_contrast": round(self.texture_contrast, 3),
            "ghost_ratio": round(self.ghost_ratio, 4),
        }


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _as_pixels(clip) -> np.ndarray:
    """Validate a clip and return float32 [F, H, W, 3] in sRGB units 0..255."""
    arr = np.asarray(clip)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        hint = " (channels first? move the channel axis last)" if arr.ndim == 4 and arr.shape[1] == 3 else ""
        raise ValueError(f"clip must be an array [F, H, W, 3], got shape {arr.shape}{hint}")
    f, h, w, _ = arr.shape
    if f < 2 or h < 8 or w < 8:
        raise ValueError(f"clip needs at least 2 frames of 8 x 8 pixels, got {f} x {h} x {w}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise ValueError(f"clip dtype must be uint8 (0..255) or float (0..1), got {arr.dtype}")
    x = arr.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError("clip contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if arr.dtype.kind in "iu":
        if lo < 0 or hi > 255:
            raise ValueError(f"integer clip values must lie in 0..255, got {lo}..{hi}")
        return x
    if lo < -0.05 or hi > 1.05:
        raise ValueError(f"float clip values must lie in [0, 1], got {lo:.3f}..{hi:.3f}; "
                         "map model output from [-1, 1] with (x + 1) / 2, or pass uint8")
    return np.clip(x, 0.0, 1.0) * 255.0


@lru_cache(maxsize=8)
def _background_models(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-class row models: mean [K, H, 1, 3] and spread [K, H, 1, 3] (sRGB), from the generator's renders."""
    means, spreads = [], []
    for name in BACKGROUNDS:
        imgs = np.stack([scenes.render_background(name, h, w, texture_seed=s) for s in range(_BG_SEEDS)])
        imgs = np.rint(imgs)  # clips are quantised
        mu = imgs.mean(axis=(0, 2))  # [H, 3]
        var = ((imgs - mu[None, :, None, :]) ** 2).mean(axis=(0, 1, 2))  # [3] stationary spread
        sd = np.sqrt(var + BG_NOISE_FLOOR ** 2)
        means.append(mu[:, None, :])
        spreads.append(np.broadcast_to(sd, (h, 1, 3)))
    return np.stack(means).astype(np.float32), np.stack(spreads).astype(np.float32)


@lru_cache(maxsize=1)
def _shape_luts() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed-area tables [S, L+1, L+1] of the binary unit shapes rasterised at radius ``_LUT_RADIUS``
    (from :func:`.scenes.object_masks`), unit areas [S] and unit centroids (x, y) [S, 2]."""
    r = _LUT_RADIUS
    n = 2 * r + 4
    sats, areas, cents = [], [], []
    for s in SHAPES:
        track = scenes.ObjectTrack(s, COLOR_NAMES[0], ((n / 2, n / 2),), (float(r),))
        spec = scenes.SceneSpec(objects=(track,), background=BACKGROUNDS[0], motion=MOTIONS[0], size=None,
                                num_frames=1, height=n, width=n)
        lut = scenes.object_masks(spec)[0, 0] >= 0.5
        ii, jj = np.nonzero(lut)
        sat = np.zeros((n + 1, n + 1), np.float64)
        sat[1:, 1:] = lut.cumsum(0).cumsum(1)
        sats.append(sat)
        areas.append(lut.sum() / r ** 2)
        cents.append(((jj + 0.5 - n / 2).mean() / r, (ii + 0.5 - n / 2).mean() / r))
    return np.stack(sats), np.asarray(areas), np.asarray(cents)


def _shape_errors(alpha: np.ndarray, mass: np.ndarray, cent: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """1 - soft Dice between the object's coverage and each shape's template, area-weighted over frames.

    Templates are exact pixel coverages of the unit shape placed at the centroid and scaled to the area,
    integrated with a summed-area table (4 look-ups per pixel).

    alpha: [F, H, W] coverage; mass: [F] pixels; cent: [F, 2] centroid (x, y); frames: indices to use.
    Returns errors [S] in [0, 1].
    """
    sats, areas, ucent = _shape_luts()
    n_lut = sats.shape[-1] - 1
    r_lut = _LUT_RADIUS
    a = alpha[frames]
    m = mass[frames]
    c = cent[frames]
    nf, h, w = a.shape
    fi = np.arange(nf)[:, None, None]
    errs = np.empty(len(SHAPES))
    for k in range(len(SHAPES)):
        rad = np.sqrt(m / areas[k])  # [nf]
        ctr = c - rad[:, None] * ucent[k][None, :]
        win = int(np.ceil(2 * rad.max())) + 4
        x0 = np.floor(ctr[:, 0] - win / 2).astype(int)
        y0 = np.floor(ctr[:, 1] - win / 2).astype(int)
        edge = np.arange(win + 1)[None, :]
        # Pixel edges in LUT cells, rounded to the nearest cell corner (error <= 1/128 radius).
        ex = np.rint((x0[:, None] + edge - ctr[:, 0, None]) / rad[:, None] * r_lut + n_lut / 2).astype(np.intp)
        ey = np.rint((y0[:, None] + edge - ctr[:, 1, None]) / rad[:, None] * r_lut + n_lut / 2).astype(np.intp)
        corner = sats[k][np.clip(ey, 0, n_lut)[:, :, None], np.clip(ex, 0, n_lut)[:, None, :]]  # [nf, win+1, win+1]
        cell = corner[:, 1:, 1:] - corner[:, :-1, 1:] - corner[:, 1:, :-1] + corner[:, :-1, :-1]
        # Divide by each pixel's own (rounded, unclipped) cell count; the LUT is empty beyond its border.
        px_cells = np.diff(ey, axis=1)[:, :, None] * np.diff(ex, axis=1)[:, None, :]
        tmpl = cell / np.maximum(px_cells, 1)
        rows = y0[:, None] + np.arange(win)[None, :]
        cols = x0[:, None] + np.arange(win)[None, :]
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        obs = a[fi, np.clip(rows, 0, h - 1)[:, :, None], np.clip(cols, 0, w - 1)[:, None, :]]
        obs = np.where(inside, obs, 0.0)
        # Coverage the window misses counts as error (the template lies inside the window by construction).
        outside = np.maximum(m - obs.sum(axis=(1, 2)), 0.0)
        num = np.abs(obs - tmpl).sum(axis=(1, 2)) + outside
        den = m + tmpl.sum(axis=(1, 2))
        e = num / np.maximum(den, 1e-6)
        errs[k] = float((e * m).sum() / m.sum())
    return errs


def _masked_median(x: np.ndarray, mask: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per-pixel median over frames of ``x`` [F, H, W, 3] where ``mask`` [F, H, W]; ``fallback`` [H, W, 3]
    where the mask is empty. Returns float32 [H, W, 3]."""
    nf = x.shape[0]
    srt = np.sort(np.where(mask[..., None], x, np.inf), axis=0)  # valid values first
    n = mask.sum(axis=0)  # [H, W]
    lo = np.clip((n - 1) // 2, 0, nf - 1)[None, ..., None]
    hi = np.clip(n // 2, 0, nf - 1)[None, ..., None]
    lo_v = np.take_along_axis(srt, np.broadcast_to(lo, (1,) + srt.shape[1:]), axis=0)[0]
    hi_v = np.take_along_axis(srt, np.broadcast_to(hi, (1,) + srt.shape[1:]), axis=0)[0]
    med = 0.5 * (lo_v + hi_v)
    return np.where((n > 0)[..., None], med, fallback).astype(np.float32)


def _robust_mean(x: np.ndarray) -> float:
    """Mean of the smallest two thirds (at least one value): one kink (e.g. a clamped growth) is forgiven."""
    x = np.sort(np.asarray(x, dtype=np.float64)[np.isfinite(x)])
    if x.size == 0:
        return 0.0
    keep = max(1, int(np.ceil(x.size * 2 / 3)))
    return float(x[:keep].mean())


def _slope(y: np.ndarray, t: np.ndarray) -> float:
    tc = t - t.mean()
    return float((tc * (y - y.mean())).sum() / max((tc * tc).sum(), 1e-9))


def _coverage(x: np.ndarray, b: np.ndarray, color: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Unmix pixels ``x`` [..., 3] as ``alpha * color + (1 - alpha) * b`` (``b`` broadcastable to ``x``).

    Returns (alpha in [0, 1], the part of ``x - b`` that mixing does not explain, sRGB), each [...]."""
    d = color - b
    pb = x - b
    alpha = np.clip((pb * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-6), 0.0, 1.0)
    resid = np.sqrt(((pb - alpha[..., None] * d) ** 2).sum(-1))
    return alpha, resid


def _texture_contrast(bgimg: np.ndarray, bg_share: np.ndarray) -> float:
    """RMS of ``luma - its 3 x 3 mean`` (Rec. 601 luma of ``bgimg`` [H, W, 3], sRGB units) over interior
    pixels whose whole 3 x 3 neighbourhood is background in at least half the frames (``bg_share`` [H, W]);
    0 below 16 such pixels."""
    luma = bgimg @ _LUMA
    hf = luma - uniform_filter(luma, size=3, mode="nearest")
    valid = minimum_filter(bg_share >= 0.5, size=3, mode="constant", cval=False)
    valid[0, :] = valid[-1, :] = valid[:, 0] = valid[:, -1] = False
    if valid.sum() < 16:
        return 0.0
    return float(np.sqrt((hf[valid] ** 2).mean()))


def _edge_steps(alpha: np.ndarray, near: np.ndarray) -> np.ndarray:
    """Coverage steps |alpha(p) - alpha(q)| between horizontal and vertical neighbours p, q both in
    ``near``, at least :data:`EDGE_MIN_STEP`. alpha, near: [F, H, W]. Returns a flat float array."""
    gx = np.abs(np.diff(alpha, axis=2))[near[:, :, 1:] & near[:, :, :-1]]
    gy = np.abs(np.diff(alpha, axis=1))[near[:, 1:] & near[:, :-1]]
    g = np.concatenate([gx, gy])
    return g[g >= EDGE_MIN_STEP]


def _main_blob(solid: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Per frame, the 8-connected blob of ``solid`` [F, H, W] with the most coverage ``alpha``; pixels one
    apart join (thin anti-aliased tips stay attached). Returns bool [F, H, W]."""
    out = np.zeros_like(solid)
    eight = np.ones((3, 3), bool)
    for f in range(solid.shape[0]):
        lab, n = label(binary_dilation(solid[f], structure=eight), structure=eight)
        if n == 0:
            continue
        mass = np.bincount(lab[solid[f]], weights=alpha[f][solid[f]], minlength=n + 1)
        out[f] = solid[f] & (lab == int(np.argmax(mass[1:])) + 1)
    return out


def _ghost_mass(x: np.ndarray, row_mean: np.ndarray, row_spread: np.ndarray, colors: Sequence[np.ndarray],
                own: np.ndarray) -> float:
    """Coverage of ``colors`` outside the objects: see :attr:`ClipMeasurement.ghost_ratio`.

    x: [F, H, W, 3] sRGB; row_mean, row_spread: the background class's row model [H, 1, 3]; colors: the
    detected objects' named colours; own: [F, H, W] pixels that belong to an object (its main blobs dilated
    by :data:`GHOST_NEIGHBOURHOOD`). Coverage is measured against the row model, not the per-pixel median,
    so a faint copy that stays in place (what a short schedule leaves of the other layouts it averaged)
    counts too; a pixel counts only where mixing explains it (residual within :data:`GHOST_RESIDUAL` times the
    class's spread: another background's colour leaking in is not a copy of the object)."""
    cover = np.zeros(x.shape[:3], np.float32)
    limit = GHOST_RESIDUAL * np.sqrt((row_spread ** 2).sum(-1))  # [H, 1]
    for c in colors:
        a, resid = _coverage(x, row_mean, c)
        cover = np.maximum(cover, np.where(resid <= limit[None], a, 0.0))
    smooth = uniform_filter(cover, size=(1, 3, 3), mode="nearest")
    cand = (smooth >= GHOST_ALPHA) & ~own
    eight = np.ones((3, 3), bool)
    mass = 0.0
    for f in range(x.shape[0]):
        lab, n = label(cand[f], structure=eight)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        keep = (sizes >= GHOST_MIN_PIXELS)[lab] & (lab > 0)
        mass += float(smooth[f][keep].sum())
    return mass


def measure_clip(clip) -> ClipMeasurement:
    """Measure background, objects (colour, shape, motion) and temporal consistency from the pixels.

    Args:
        clip: array-like [F, H, W, 3], uint8 sRGB 0..255 or float in [0, 1] (values within 0.05 outside are
            clipped). F >= 2, H, W >= 8. Any H, W works; the vocabulary's scales follow the generator's.

    Returns:
        :class:`ClipMeasurement`. See the module docstring for the method.

    Raises:
        ValueError: wrong rank/shape, too small, unsupported dtype, NaN/inf or out-of-range values.
    """
    x = _as_pixels(clip)
    nf, h, w, _ = x.shape
    means, spreads = _background_models(h, w)

    # 1. Background class: inlier fraction under each row model (every other pixel is plenty).
    xs = x[:, ::2, ::2]
    dz = (xs[None] - means[:, None, ::2]) / spreads[:, None, ::2]  # [K, F, H/2, W/2, 3]
    frac = (np.einsum("kfhwc,kfhwc->kfhw", dz, dz) < 3 * BG_INLIER_Z ** 2).mean(axis=(1, 2, 3))
    bg_post = _softmax(frac / BG_TEMPERATURE)
    kb = int(np.argmax(frac))

    # 2. Background image: median over frames where the pixel fits the class, else the row model.
    d_b = (x - means[kb][None]) / spreads[kb][None]
    inl_b = np.einsum("fhwc,fhwc->fhw", d_b, d_b) < 3 * BG_ESTIMATE_Z ** 2  # [F, H, W]
    bgimg = _masked_median(x, inl_b, np.broadcast_to(means[kb], (h, w, 3)))
    diff = x - bgimg[None]
    dist2 = np.einsum("fhwc,fhwc->fhw", diff, diff)
    fg = dist2 > FG_THRESHOLD ** 2  # [F, H, W]
    # Anti-aliased rims: fainter pixels next to the foreground join it, so areas and outlines stay whole.
    near = fg.copy()
    near[:, 1:] |= fg[:, :-1]
    near[:, :-1] |= fg[:, 1:]
    near[:, :, 1:] |= fg[:, :, :-1]
    near[:, :, :-1] |= fg[:, :, 1:]
    fg |= near & (dist2 > EDGE_THRESHOLD ** 2)

    # Background flicker: mean change of 4 x 4 block averages of the pixels that are background in both
    # frames. Block averaging keeps brightness/colour flicker and drops per-pixel sampling noise.
    both = (~fg[1:] & ~fg[:-1]).astype(np.float32)  # [F-1, H, W]
    dsum = (x[1:] - x[:-1]) * both[..., None]
    rb = np.linspace(0, h, FLICKER_GRID + 1).astype(int)[:-1]
    cb = np.linspace(0, w, FLICKER_GRID + 1).astype(int)[:-1]
    bsum = np.add.reduceat(np.add.reduceat(dsum, rb, axis=1), cb, axis=2)  # [F-1, G, G, 3]
    bcnt = np.add.reduceat(np.add.reduceat(both, rb, axis=1), cb, axis=2)  # [F-1, G, G]
    valid = bcnt >= 0.25 * (h / FLICKER_GRID) * (w / FLICKER_GRID)
    bmean = np.abs(bsum / np.maximum(bcnt, 1.0)[..., None]).mean(-1)
    flicker_per = (bmean * valid).sum(axis=(1, 2)) / np.maximum(valid.sum(axis=(1, 2)), 1)

    # 3. Unmix foreground pixels against every named colour.
    palette = np.asarray([scenes.COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # [C, 3]
    fidx = np.nonzero(fg)
    objects: List[DetectedObject] = []
    dropout_terms, pos_terms, size_terms, col_terms, weights = [], [], [], [], []
    solid_maps: List[np.ndarray] = []  # [F, H, W] bool per object: coverage >= 1/2
    alpha_maps: List[np.ndarray] = []  # [F, H, W] coverage per object
    object_colors: List[np.ndarray] = []
    if fidx[0].size:
        p = x[fidx]  # [N, 3]
        b = bgimg[fidx[1], fidx[2]]  # [N, 3]
        d = palette[None] - b[:, None]  # [N, C, 3]
        pb = (p - b)[:, None, :]
        al = np.clip((pb * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-6), 0.0, 1.0)  # [N, C]
        res = ((pb - al[..., None] * d) ** 2).sum(-1)
        # A colour this close to the local background cannot show on it (the generator never draws it
        # there); without this rule noise on a white background reads as a white object.
        res[(d * d).sum(-1) < MIN_COLOR_CONTRAST ** 2] = np.inf
        lab = np.argmin(res, axis=1)
        alpha = al[np.arange(lab.size), lab]
        # Objects are chosen on solid coverage (alpha >= 1/2): sampling noise makes faint pixels of every
        # colour, an object makes solid ones.
        solid = np.bincount(lab, weights=alpha * (alpha >= 0.5), minlength=len(COLOR_NAMES))
        order = np.argsort(-solid)
        top = solid[order[0]]
        chosen = [int(c) for c in order[:2] if solid[c] >= max(MIN_OBJECT_MASS * nf, MIN_OBJECT_SHARE * top)]
        t = np.arange(nf, dtype=np.float64)
        yy, xx = np.mgrid[0:h, 0:w]
        for c in chosen:
            sel = lab == c
            a_map = np.zeros((nf, h, w), np.float32)
            a_map[fidx[0][sel], fidx[1][sel], fidx[2][sel]] = alpha[sel]
            m = a_map.sum(axis=(1, 2)).astype(np.float64)  # [F]
            # Present: at least one pixel and not collapsed against both neighbours (a vanishing object).
            nb = np.maximum(np.concatenate([[0.0], m[:-1]]), np.concatenate([m[1:], [0.0]]))
            present = (m >= 1.0) & (m >= 0.25 * nb)
            with np.errstate(all="ignore"):
                cx = (a_map * xx).sum(axis=(1, 2)) / m
                cy = (a_map * yy).sum(axis=(1, 2)) / m
            cent = np.stack([cx + 0.5, cy + 0.5], axis=1)  # pixel centres
            cent[~present] = np.nan
            rad = np.where(present, np.sqrt(m / np.pi), np.nan)
            fr = np.nonzero(present)[0]

            # Colour: core pixels over the clip, and per frame for the spread.
            core = sel & (alpha >= CORE_ALPHA)
            if not core.any():
                core = sel & (alpha >= alpha[sel].max() - 1e-6)
            mcol = p[core].mean(axis=0)
            col_post = _softmax(-((palette - mcol) ** 2).sum(-1) / (2 * COLOR_SIGMA ** 2))
            cf = fidx[0][core]
            cnt = np.bincount(cf, minlength=nf)
            sums = np.stack([np.bincount(cf, weights=p[core][:, ch], minlength=nf) for ch in range(3)], 1)
            ok = cnt > 0
            per_frame = sums[ok] / cnt[ok][:, None]
            spread = float(np.sqrt(per_frame.var(axis=0).sum())) if ok.sum() > 1 else 0.0

            # Shape.
            if fr.size:
                # The largest frames show the shape best (and least occluded in two-object scenes).
                big = fr[np.argsort(-m[fr], kind="stable")[:SHAPE_FRAMES]]
                errs = _shape_errors(a_map, m, cent, big)
                shape_post = _softmax(-errs / SHAPE_TEMPERATURE)
            else:
                shape_post = np.full(len(SHAPES), 1.0 / len(SHAPES))

            # Motion.
            if fr.size >= 2:
                u = _slope(cent[fr, 0], t[fr]) * (nf - 1) / w
                v = _slope(cent[fr, 1], t[fr]) * (nf - 1) / h
                g = _slope(np.log(rad[fr]), t[fr]) * (nf - 1)
                ev = {"left": -u, "right": u, "up": -v, "down": v, "grow": GROWTH_GAIN * g,
                      "shrink": -GROWTH_GAIN * g}
                mot_post = _softmax(np.array([ev[k] for k in MOTIONS]) / MOTION_TEMPERATURE)
            else:
                mot_post = np.full(len(MOTIONS), 1.0 / len(MOTIONS))

            # Temporal terms for this object.
            if fr.size >= 3:
                jerk_pos = np.sqrt((np.diff(cent[fr], n=2, axis=0) ** 2).sum(-1))
                jerk_size = np.abs(np.diff(rad[fr], n=2))
                pos_terms.append(_robust_mean(jerk_pos))
                size_terms.append(_robust_mean(jerk_size))
            else:
                pos_terms.append(0.0)
                size_terms.append(0.0)
            col_terms.append(spread)
            dropout_terms.append(1.0 - fr.size / nf)
            weights.append(float(m.mean()))

            solid_maps.append(a_map >= 0.5)
            alpha_maps.append(a_map)
            object_colors.append(palette[c])

            objects.append(DetectedObject(
                color_probs=dict(zip(COLOR_NAMES, map(float, col_post))),
                shape_probs=dict(zip(SHAPES, map(float, shape_post))),
                motion_probs=dict(zip(MOTIONS, map(float, mot_post))),
                mass=float(m.mean()), centers=cent, radii=rad))

    terms = {"flicker": float(flicker_per.mean())}
    if objects:
        wt = np.asarray(weights) / sum(weights)
        terms["position_jerk"] = float(np.dot(wt, pos_terms))
        terms["size_jerk"] = float(np.dot(wt, size_terms))
        terms["color_spread"] = float(np.dot(wt, col_terms))
        terms["dropout"] = float(np.dot(wt, dropout_terms))
    temporal = float(np.exp(-0.5 * sum((v / TEMPORAL_SCALES[k]) ** 2 for k, v in terms.items())))

    # 7. Detail: static background texture, and the coverage steps across each object's edges.
    texture = _texture_contrast(bgimg, (inl_b & ~fg).mean(axis=0))
    edge = None
    ghost_ratio = 0.0
    if objects:
        def grow(mask: np.ndarray, px: int) -> np.ndarray:
            return binary_dilation(mask, structure=np.ones((1, 2 * px + 1, 2 * px + 1), bool))

        steps = []
        for k, (solid, col) in enumerate(zip(solid_maps, object_colors)):
            others = np.logical_or.reduce([sm for j, sm in enumerate(solid_maps) if j != k] + [np.zeros_like(solid)])
            a_full, _ = _coverage(x, bgimg[None], col)
            steps.append(_edge_steps(a_full, grow(solid, EDGE_NEIGHBOURHOOD) & ~others))
        g = np.concatenate(steps)
        edge = float((g * g).sum() / g.sum()) if g.size else 0.0
        # 8. Ghosting: the objects' colours outside the objects. An object is its largest solid blob per
        # frame; a second solid blob of its colour (a strong copy) is a ghost too.
        main = [_main_blob(sm, am) for sm, am in zip(solid_maps, alpha_maps)]
        own = grow(np.logical_or.reduce(main), GHOST_NEIGHBOURHOOD)
        ghost = _ghost_mass(x, means[kb], spreads[kb], object_colors, own)
        main_mass = sum(float((am * grow(mb, 1)).sum()) for am, mb in zip(alpha_maps, main))
        ghost_ratio = ghost / max(main_mass, 1e-6)
    return ClipMeasurement(objects=tuple(objects),
                           background_probs=dict(zip(BACKGROUNDS, map(float, bg_post))),
                           temporal=temporal, temporal_terms=terms, edge_sharpness=edge,
                           texture_contrast=texture, ghost_ratio=float(ghost_ratio))


def ideal_measurement(spec: "scenes.SceneSpec") -> ClipMeasurement:
    """What a perfect reader would measure on ``spec``'s render: one-hot posteriors, temporal 1.

    Used by :func:`chance_level`; also a reference point for tests.

    Raises:
        TypeError: ``spec`` is not a :class:`.scenes.SceneSpec`.
    """
    if not isinstance(spec, scenes.SceneSpec):
        raise TypeError(f"spec must be a scenes.SceneSpec, got {type(spec).__name__}")

    def onehot(names, hit):
        return {n: float(n == hit) for n in names}

    objs = []
    _, areas, _ = _shape_luts()
    for o in spec.objects:
        # Mean area per frame, as measure_clip reports it (it orders objects, largest first).
        mass = float(areas[SHAPES.index(o.shape)] * np.mean(np.square(o.radii)))
        objs.append(DetectedObject(onehot(COLOR_NAMES, o.color), onehot(SHAPES, o.shape),
                                   onehot(MOTIONS, spec.motion), mass,
                                   np.asarray(o.centers, dtype=np.float64), np.asarray(o.radii)))
    objs.sort(key=lambda d: -d.mass)
    return ClipMeasurement(tuple(objs), onehot(BACKGROUNDS, spec.background), 1.0, {})


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    """Scores of one clip against one prompt, each in [0, 1].

    Attributes:
        shape, color, background, motion, temporal: per-criterion scores (see the module docstring).
        ghost_free: ``1 - ghost_ratio`` (clipped to [0, 1]): the share of the objects' coverage that is
            not smeared outside them.
        detail: with a ground-truth reference, the share of its detail the clip keeps (mean of the edge
            sharpness and texture contrast ratios, each capped at 1; see :func:`detail_score`); None
            without a reference.
        overall: ``temporal * ghost_free * sum(w_k * score_k)``: :data:`WEIGHTS` without a reference,
            :data:`WEIGHTS_WITH_DETAIL` (detail included) with one.
        prompt: the parsed prompt.
        measurement: what was read from the pixels.
        detail_parts: ``{"edge_sharpness": ratio, "texture_contrast": ratio}``, the parts that apply.
    """

    shape: float
    color: float
    background: float
    motion: float
    temporal: float
    overall: float
    prompt: PromptAttributes
    measurement: ClipMeasurement = field(repr=False)
    ghost_free: float = 1.0
    detail: Optional[float] = None
    detail_parts: Mapping[str, float] = field(default_factory=dict)

    @property
    def scores(self) -> Dict[str, float]:
        """Per-criterion scores and ``overall``, name -> value (``detail`` only when it was measured)."""
        out = {"shape": self.shape, "color": self.color, "background": self.background,
               "motion": self.motion}
        if self.detail is not None:
            out["detail"] = self.detail
        out.update({"ghost_free": self.ghost_free, "temporal": self.temporal, "overall": self.overall})
        return out

    def as_dict(self) -> Dict[str, object]:
        """Plain-JSON form: scores, detail parts, parsed prompt, measured attributes."""
        return {"scores": self.scores, "detail_parts": dict(self.detail_parts), "prompt": self.prompt.as_dict(),
                "measured": self.measurement.summary()}


def detail_score(meas: ClipMeasurement, reference: ClipMeasurement) -> Tuple[float, Dict[str, float]]:
    """How much of the ground truth's detail a clip keeps.

    Two ratios against the ground-truth render of the same scene spec, each capped at 1 (more than
    the reference is not more detail; excess noise is what PSNR/SSIM and flicker see):

    * ``edge_sharpness``: the clip's :attr:`ClipMeasurement.edge_sharpness` over the reference's (0 when
      the clip shows no object);
    * ``texture_contrast``: the same for the static background texture, only when the reference has
      texture (at least :data:`TEXTURE_MIN`): a plain background has none to lose.

    Args:
        meas: the clip's measurement. reference: :func:`measure_clip` of the ground-truth render.

    Returns:
        (mean of the parts that apply, ``{part: ratio}``); (1.0, {}) if none applies (a reference
        without objects or texture).

    Raises:
        TypeError: arguments that are not :class:`ClipMeasurement`.
    """
    if not isinstance(meas, ClipMeasurement) or not isinstance(reference, ClipMeasurement):
        raise TypeError("detail_score needs two ClipMeasurement objects (measure_clip of the clip and of its "
                        "ground-truth render)")
    parts: Dict[str, float] = {}
    if reference.edge_sharpness:
        parts["edge_sharpness"] = min(1.0, (meas.edge_sharpness or 0.0) / reference.edge_sharpness)
    if reference.texture_contrast >= TEXTURE_MIN:
        parts["texture_contrast"] = min(1.0, meas.texture_contrast / reference.texture_contrast)
    return (float(np.mean(list(parts.values()))) if parts else 1.0), parts


def _assign(attrs: PromptAttributes, meas: ClipMeasurement) -> List[int]:
    """Index of the detected object each prompt object is matched to, by colour posterior."""
    n_det = len(meas.objects)
    cp = np.array([[d.color_probs[o.color] for d in meas.objects] for o in attrs.objects])  # [P, D]
    # Differences below MATCH_MARGIN are ties, broken towards the larger object (listed first), so that a
    # prompt whose colours are absent is matched by size, not by noise in tiny posteriors.
    if len(attrs.objects) == 2 and n_det == 2:
        straight = cp[0, 0] + cp[1, 1]
        crossed = cp[0, 1] + cp[1, 0]
        return [1, 0] if crossed > straight + MATCH_MARGIN else [0, 1]
    out = []
    for row in cp:
        j = int(np.argmax(row))
        out.append(j if row[j] > row[0] + MATCH_MARGIN else 0)
    return out


def score_measurement(attrs: PromptAttributes, meas: ClipMeasurement,
                      reference: Optional[ClipMeasurement] = None) -> EvalResult:
    """Score a measurement against parsed prompt attributes (the rules in the module docstring).

    Args:
        attrs: from :func:`parse_prompt`. meas: from :func:`measure_clip` or :func:`ideal_measurement`.
        reference: :func:`measure_clip` of the ground-truth render of the prompt's scene spec; with it the
            detail criterion is scored and joins ``overall`` (:data:`WEIGHTS_WITH_DETAIL`).

    Returns:
        :class:`EvalResult`; every score in [0, 1].

    Raises:
        TypeError: wrong argument types.
    """
    if not isinstance(attrs, PromptAttributes) or not isinstance(meas, ClipMeasurement):
        raise TypeError("score_measurement needs (PromptAttributes, ClipMeasurement); "
                        "use parse_prompt() and measure_clip()")
    if reference is not None and not isinstance(reference, ClipMeasurement):
        raise TypeError(f"reference must be a ClipMeasurement (measure_clip of the ground-truth render), "
                        f"got {type(reference).__name__}")
    background = float(meas.background_probs[attrs.background])
    if meas.objects:
        match = _assign(attrs, meas)
        shape = float(np.mean([meas.objects[j].shape_probs[o.shape] for o, j in zip(attrs.objects, match)]))
        color = float(np.mean([meas.objects[j].color_probs[o.color] for o, j in zip(attrs.objects, match)]))
        masses = np.array([d.mass for d in meas.objects])
        mp = np.array([d.motion_probs[attrs.motion] for d in meas.objects])
        motion = float((masses * mp).sum() / masses.sum()) if masses.sum() > 0 else float(mp.mean())
    else:
        shape = color = motion = 0.0
    parts = {"shape": shape, "color": color, "background": background, "motion": motion}
    weights = WEIGHTS
    detail, detail_parts = None, {}
    if reference is not None:
        detail, detail_parts = detail_score(meas, reference)
        parts["detail"] = detail
        weights = WEIGHTS_WITH_DETAIL
    ghost_free = float(min(1.0, max(0.0, 1.0 - meas.ghost_ratio)))
    overall = meas.temporal * ghost_free * sum(weights[k] * parts[k] for k in weights)
    return EvalResult(shape=shape, color=color, background=background, motion=motion, temporal=meas.temporal,
                      overall=float(min(1.0, max(0.0, overall))), prompt=attrs, measurement=meas,
                      ghost_free=ghost_free, detail=detail, detail_parts=detail_parts)


def evaluate(clip, prompt: str, reference=None) -> EvalResult:
    """Score a clip against its prompt text (and, for detail, against its ground truth).

    Args:
        clip: array-like [F, H, W, 3], uint8 0..255 or float in [0, 1] (e.g. the model's decoded frames).
        prompt: the caption the clip was generated from.
        reference: optional ground truth of the prompt's scene spec: its render (``scenes.render(spec)``,
            same forms as ``clip``) or that render's :func:`measure_clip` (to measure it once for several
            clips). With it the detail criterion is scored and joins ``overall``.

    Returns:
        :class:`EvalResult` with per-criterion scores, ``overall`` in [0, 1], the parsed prompt and the
        measured attributes.

    Raises:
        ValueError, TypeError: see :func:`parse_prompt` and :func:`measure_clip`.
    """
    attrs = parse_prompt(prompt)
    if reference is not None and not isinstance(reference, ClipMeasurement):
        reference = measure_clip(reference)
    return score_measurement(attrs, measure_clip(clip), reference)


def evaluate_many(clips: Sequence, prompts: Sequence[str], references: Optional[Sequence] = None) -> Dict[str, float]:
    """Mean of each score over clip/prompt pairs.

    Args:
        clips: sequence (or array [N, F, H, W, 3]) of clips; prompts: the same number of strings.
        references: optional, one ground-truth render (or its measurement) per clip (see :func:`evaluate`).

    Returns:
        ``{"shape", "color", "background", "motion", ["detail",] "ghost_free", "temporal", "overall", "n"}``
        -> mean (``n`` = count; ``detail`` with references).

    Raises:
        ValueError: different counts or no pairs; otherwise as :func:`evaluate`.
    """
    if len(clips) != len(prompts) or (references is not None and len(references) != len(prompts)):
        raise ValueError(f"got {len(clips)} clips, {len(prompts)} prompts and "
                         f"{'no' if references is None else len(references)} references; pass one prompt per "
                         "clip (and one reference per clip, if any)")
    if len(prompts) == 0:
        raise ValueError("no clips to evaluate")
    refs = [None] * len(prompts) if references is None else references
    rows = [evaluate(c, p, r).scores for c, p, r in zip(clips, prompts, refs)]
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["n"] = float(len(rows))
    return out


def chance_level(num_pairs: int = 20000, seed: int = 12345, *, two_shape_prob: float = 0.2,
                 per_criterion: bool = False):
    """Expected score of a coherent clip on an unrelated prompt, under the generator's distribution.

    Draws ``num_pairs`` (caption, scene) pairs from :func:`.scenes.sample_dataset` with two independent
    streams and scores each caption against the other stream's :func:`ideal_measurement` (a perfect reader),
    so the per-criterion chance accounts for the colour palettes allowed per background and two-object
    scenes. Monte-Carlo error is about 0.002 at the default size.

    Args:
        num_pairs: pairs to draw (>= 1). seed: base seed (non-negative). two_shape_prob: as the generator.
        per_criterion: also return each criterion's chance.

    Returns:
        The overall chance (float), or ``(overall, {criterion: chance})`` with ``per_criterion``.

    Raises:
        ValueError: ``num_pairs`` < 1 or negative ``seed``.
    """
    if num_pairs < 1 or seed < 0:
        raise ValueError(f"need num_pairs >= 1 and seed >= 0, got {num_pairs}, {seed}")
    prompts = scenes.sample_dataset(seed, num_pairs, two_shape_prob=two_shape_prob)
    clips = scenes.sample_dataset(seed + 1, num_pairs, two_shape_prob=two_shape_prob)
    rows = [score_measurement(parse_prompt(cap), ideal_measurement(spec)).scores
            for (_, cap), (spec, _) in zip(prompts, clips)]
    overall = float(np.mean([r["overall"] for r in rows]))
    if not per_criterion:
        return overall
    return overall, {k: float(np.mean([r[k] for r in rows])) for k in CRITERIA}
