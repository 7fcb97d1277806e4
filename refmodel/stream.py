"""A mixed stream of scene captions, in request order: near-duplicates, entity-sharing and unrelated prompts.

What a cache in front of the reference model meets when artists batch related prompts: some requests
re-word an earlier one, some keep one of its entities and change the rest, some are new. Each item says
what it is and which earlier item it came from, so a measurement can split hit rates and quality by kind.

* **near-duplicate**: an earlier item's scene (same objects, background and motion) with a caption drawn
  again (:func:`.scenes.caption` paraphrases, so the words usually differ);
* **entity-sharing**: an earlier item's first object (colour and shape) on a new background where that
  colour shows, with a new motion;
* **unrelated**: a fresh scene (:func:`.scenes.sample_scene`); it may still share words with earlier
  prompts by chance, as real prompts do.

The earlier item is drawn uniformly from the last ``window`` items (recent prompts are revisited more, as
in a working session). Item ``i`` depends only on ``(seed, i)`` and the items before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from . import scenes

__all__ = ["STREAM_SEED", "KINDS", "StreamItem", "mixed_stream"]

#: Seed of the default stream (different from the held-out, validation and warm streams).
STREAM_SEED = 7_000_004
#: The kinds of items, in the order of :func:`mixed_stream`'s ``shares``.
KINDS = ("near_duplicate", "entity_sharing", "unrelated")


@dataclass(frozen=True)
class StreamItem:
    """One request of the stream.

    Attributes:
        scene: the clip's ground truth. caption: the prompt. kind: one of :data:`KINDS`.
        source: index of the earlier item it was derived from (None for unrelated items).
    """

    scene: scenes.SceneSpec
    caption: str
    kind: str
    source: Optional[int] = None


def mixed_stream(n: int, seed: int = STREAM_SEED, *, shares: Sequence[float] = (0.3, 0.4, 0.3), window: int = 50,
                 two_shape_prob: float = 0.2) -> List[StreamItem]:
    """``n`` stream items; each after the first is a near-duplicate, entity-sharing or unrelated item with
    probabilities ``shares`` (in :data:`KINDS` order; normalised). The first item is unrelated.

    Raises:
        ValueError: ``n`` < 0, ``window`` < 1, or shares that are negative or sum to 0.
    """
    shares = np.asarray(list(shares), dtype=float)
    if n < 0 or window < 1 or shares.shape != (len(KINDS),) or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(f"need n >= 0, window >= 1 and {len(KINDS)} non-negative shares with a positive sum; "
                         f"got n={n}, window={window}, shares={list(shares)}")
    shares = shares / shares.sum()
    out: List[StreamItem] = []
    for i in range(n):
        g = np.random.default_rng([seed, i])
        kind = "unrelated" if i == 0 else KINDS[int(g.choice(len(KINDS), p=shares))]
        if kind == "unrelated":
            spec = scenes.sample_scene(g, two_shape_prob=two_shape_prob)
            out.append(StreamItem(spec, scenes.caption(spec, g), kind))
            continue
        source = int(g.integers(max(0, i - window), i))
        base = out[source].scene
        if kind == "near_duplicate":
            spec = base
        else:
            obj = base.objects[0]
            backgrounds = [b for b in scenes.BACKGROUNDS if b != base.background and obj.color in scenes.ALLOWED_COLORS[b]]
            motions = [m for m in scenes.MOTIONS if m != base.motion]
            spec = scenes.make_scene(obj.shape, obj.color, backgrounds[int(g.integers(len(backgrounds)))],
                                     motions[int(g.integers(len(motions)))], g)
        out.append(StreamItem(spec, scenes.caption(spec, g), kind, source))
    return out
