"""Prompt streams for measuring cross-request reuse on the reference model: near-duplicates and a mixed stream.

Both are built from :mod:`.scenes`, so every caption is one the evaluator reads, and both are seeded:
the same seed gives the same stream. Validation and held-out streams use separate seeds (settings are
chosen on :data:`VALIDATION_STREAM_SEED`, results reported on :data:`HELDOUT_STREAM_SEED`).

* :func:`near_duplicate`: a scene close to a given one, of one :data:`NEAR_KINDS` kind drawn with the
  documented :data:`NEAR_PROPORTIONS`: the same scene in new words (``paraphrase``: nothing the
  evaluator scores changes), or one scored attribute changed (``color``, ``shape``, ``motion``,
  ``background``), in new words too. Users batching "a fox in snow, wide shot" / "... close-up" are the
  case: a few words differ, the rest of the video should stay.
* :func:`mixed_stream`: requests in order where near-duplicates of earlier requests, requests sharing one
  entity (an object: colour and shape) with an earlier one and unrelated requests mix in the documented
  :data:`MIXED_PROPORTIONS`. The earlier request is drawn uniformly from those before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import scenes
from .quality import warm_scene_for

__all__ = [
    "NEAR_KINDS",
    "NEAR_PROPORTIONS",
    "MIXED_PROPORTIONS",
    "VALIDATION_STREAM_SEED",
    "HELDOUT_STREAM_SEED",
    "NEAR_SEED",
    "StreamItem",
    "near_duplicate",
    "near_duplicate_pairs",
    "mixed_stream",
]

#: The kinds of near-duplicate, in order.
NEAR_KINDS: Tuple[str, ...] = ("paraphrase", "color", "shape", "motion", "background")
#: How often each kind is drawn: the same scene in other words 40 %, one scored attribute changed 60 %.
NEAR_PROPORTIONS: Dict[str, float] = {"paraphrase": 0.4, "color": 0.15, "shape": 0.15, "motion": 0.15,
                                      "background": 0.15}
#: The mixed stream: a near-duplicate of an earlier request, one sharing an object with an earlier request,
#: or an unrelated one (a fresh random scene).
MIXED_PROPORTIONS: Dict[str, float] = {"near": 0.4, "share": 0.3, "new": 0.3}
#: Seed of the mixed stream settings are chosen on.
VALIDATION_STREAM_SEED = 7_000_013
#: Seed of the mixed stream results are reported on (never used to choose anything).
HELDOUT_STREAM_SEED = 7_000_011
#: Seed of the near-duplicates drawn for a prompt list (the warm prompts of the near-duplicate table).
NEAR_SEED = 7_000_012


@dataclass(frozen=True)
class StreamItem:
    """One request of a stream.

    Attributes:
        spec: the scene (ground truth). caption: the prompt. kind: ``"new"``, ``"share"`` or the
        near-duplicate kind (``"paraphrase"``, ``"color"``, ...). source: index of the earlier request it
        was made from (None for ``"new"``).
    """

    spec: scenes.SceneSpec
    caption: str
    kind: str
    source: Optional[int] = None


def _pick(rng: np.random.Generator, table: Dict[str, float]) -> str:
    keys = list(table)
    p = np.array([table[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _other(rng: np.random.Generator, options, current):
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def near_duplicate(spec: scenes.SceneSpec, caption: str, rng: np.random.Generator,
                   kind: Optional[str] = None, tries: int = 50) -> Tuple[scenes.SceneSpec, str, str]:
    """A near-duplicate of ``(spec, caption)``.

    Args:
        spec, caption: the scene and its prompt.
        rng: the generator (the stream's).
        kind: one of :data:`NEAR_KINDS`, or None to draw one with :data:`NEAR_PROPORTIONS`.
        tries: caption redraws until the new caption differs from ``caption``.

    Returns:
        (scene, caption, kind). The first object is the one changed; a second object keeps its shape and
        colour. A colour change keeps the colour visible on the background; a background change keeps the
        colours visible on the new one (only backgrounds where they are are drawn).

    Raises:
        ValueError: an unknown ``kind``.
    """
    kind = kind or _pick(rng, NEAR_PROPORTIONS)
    if kind not in NEAR_KINDS:
        raise ValueError(f"kind must be one of {NEAR_KINDS}, got {kind!r}")
    shapes, colors = list(spec.shapes), list(spec.colors)
    background, motion = spec.background, spec.motion
    if kind == "color":
        palette = [c for c in scenes.ALLOWED_COLORS[background] if c not in colors]
        colors[0] = palette[int(rng.integers(len(palette)))]
    elif kind == "shape":
        shapes[0] = _other(rng, scenes.SHAPES, shapes[0])
    elif kind == "motion":
        motion = _other(rng, scenes.MOTIONS, motion)
    elif kind == "background":
        fits = [b for b in scenes.BACKGROUNDS
                if b != background and all(c in scenes.ALLOWED_COLORS[b] for c in colors)]
        background = fits[int(rng.integers(len(fits)))]
    # A single translating shape keeps its size class (drawn afresh when the scene had none).
    size = spec.size if len(shapes) == 1 and motion not in ("grow", "shrink") else None
    near = scenes.make_scene(shapes, colors, background, motion, rng, size=size, num_frames=spec.num_frames,
                             height=spec.height, width=spec.width)
    text = caption
    for _ in range(tries):
        text = scenes.caption(near, rng)
        if text != caption:
            break
    return near, text, kind


def near_duplicate_pairs(items: List[Tuple[scenes.SceneSpec, str]], seed: int = NEAR_SEED
                         ) -> List[Tuple[scenes.SceneSpec, str, str]]:
    """One near-duplicate per (scene, caption) of ``items`` (kinds drawn with :data:`NEAR_PROPORTIONS`),
    from one generator seeded with ``seed``: the warm prompts of the near-duplicate table."""
    rng = np.random.default_rng(seed)
    return [near_duplicate(spec, text, rng) for spec, text in items]


def mixed_stream(n: int, seed: int = HELDOUT_STREAM_SEED, *, two_shape_prob: float = 0.2) -> List[StreamItem]:
    """``n`` requests in order: near-duplicates, entity-sharing and unrelated requests in :data:`MIXED_PROPORTIONS`.

    Item 0 is always new. A ``"near"`` item is :func:`near_duplicate` of a uniformly drawn earlier item (its
    kind drawn with :data:`NEAR_PROPORTIONS`); a ``"share"`` item keeps an earlier item's first object
    (colour and shape) on a new background with a new motion (``quality.warm_scene_for``); a ``"new"`` item
    is a fresh :func:`.scenes.sample_scene` (it may share words with earlier ones by chance, as real
    prompts do).

    Raises:
        ValueError: ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"a stream needs n >= 1 requests, got {n}")
    rng = np.random.default_rng(seed)
    out: List[StreamItem] = []
    for i in range(n):
        what = "new" if i == 0 else _pick(rng, MIXED_PROPORTIONS)
        if what == "new":
            spec = scenes.sample_scene(rng, two_shape_prob=two_shape_prob)
            out.append(StreamItem(spec, scenes.caption(spec, rng), "new"))
            continue
        source = int(rng.integers(i))
        base = out[source]
        if what == "near":
            spec, text, kind = near_duplicate(base.spec, base.caption, rng)
            out.append(StreamItem(spec, text, kind, source))
        else:
            spec, text, _entity = warm_scene_for(base.spec, base.caption, rng)
            out.append(StreamItem(spec, text, "share", source))
    return out
