"""The reference model's prompt streams for measuring quality: held-out, validation and warm prompts.

* :func:`heldout_prompts`: (scene, caption) pairs from a seed stream training never used
  (:data:`HELDOUT_SEED`); :data:`VALIDATION_SEED` is a second stream, where settings (CFG, Cache
  Attention mode) are chosen, never on the held-out one;
* :func:`warm_scene_for`: for a test scene, a different scene that keeps its first object (colour and
  shape) and changes background and motion, so the warm prompt shares exactly that entity ("red
  circle") and nothing else a scorer would check. With an entity extractor, its caption is resampled
  until the extractor finds that shared entity in both prompts (so the lookup can match it); a few
  prompts whose object phrase the extractor splits ("plus sign") share their background instead;
* :func:`share_kind`: what a served entry's scene shares with the request's.

The harness that runs every sampling mode on these prompts through the request path is
``pipeline/quality.py`` (``bench/quality_bench.py``); this module, like the rest of the reference model,
imports neither ``cache/`` nor the pipeline (an extractor is passed in, duck-typed).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from . import scenes

__all__ = [
    "HELDOUT_SEED",
    "WARM_SEED",
    "VALIDATION_SEED",
    "heldout_prompts",
    "warm_scene_for",
    "share_kind",
]

#: Seed of the held-out prompt stream (training uses seed 1: ``scenes.sample_dataset(1, ...)``).
HELDOUT_SEED = 7_000_001
#: Seed of the warm-prompt stream.
WARM_SEED = 7_000_002
#: Seed of the validation prompt stream: sampler settings (CFG scale) are chosen on it, never on the
#: held-out stream the benchmark reports.
VALIDATION_SEED = 7_000_003


def heldout_prompts(n: int, seed: int = HELDOUT_SEED, two_shape_prob: float = 0.2,
                    **scene_kwargs: float) -> List[Tuple[scenes.SceneSpec, str]]:
    """``n`` held-out (scene, caption) pairs from a seed stream the training never used.

    Args:
        n: number of pairs. seed: the stream (:data:`HELDOUT_SEED`, :data:`VALIDATION_SEED`, ...).
        two_shape_prob: share of two-object scenes (training's).
        scene_kwargs: layout and grain knobs of :func:`.scenes.sample_dataset` (a model's
            ``refmodel.model.reference_scene_kwargs``), so the scene specs are the ground truth that model
            was trained to draw; the captions do not depend on them.

    Raises:
        ValueError: as :func:`.scenes.sample_dataset`.
    """
    return scenes.sample_dataset(seed, n, two_shape_prob=two_shape_prob, **scene_kwargs)


def _entities(extractor, text: str) -> List[str]:
    return list(extractor.extract(text)) if extractor is not None else []


def warm_scene_for(spec: scenes.SceneSpec, caption_text: str, rng: np.random.Generator,
                   extractor: Any = None, tries: int = 300) -> Tuple[scenes.SceneSpec, str, str]:
    """A warm prompt that shares one entity with ``(spec, caption_text)``.

    Keeps ``spec``'s first object (shape, colour) and draws a new background (one where that colour
    is allowed) and a new motion; with ``extractor`` the caption is redrawn until both prompts' entity
    lists share a string. If no caption does (the extractor splits the object phrase), a scene with a
    new object and motion on the same background is tried the same way.

    Returns:
        (warm scene, warm caption, the shared entity: the extractor's string, or "<colour> <shape>"
        without an extractor).

    Raises:
        RuntimeError: no warm prompt found in ``tries`` draws per strategy (names the prompt).
    """
    obj = spec.objects[0]
    mine = set(_entities(extractor, caption_text))
    for share in ("object", "background"):
        for _ in range(tries):
            if share == "object":
                bgs = [b for b in scenes.BACKGROUNDS if b != spec.background and obj.color in scenes.ALLOWED_COLORS[b]]
                bg = bgs[int(rng.integers(len(bgs)))]
                motion = [m for m in scenes.MOTIONS if m != spec.motion][int(rng.integers(len(scenes.MOTIONS) - 1))]
                warm = scenes.make_scene(obj.shape, obj.color, bg, motion, rng)
            else:
                palette = [c for c in scenes.ALLOWED_COLORS[spec.background] if c not in spec.colors]
                color = palette[int(rng.integers(len(palette)))]
                shape = [s for s in scenes.SHAPES if s not in spec.shapes][int(rng.integers(len(scenes.SHAPES) - len(set(spec.shapes))))]
                motion = [m for m in scenes.MOTIONS if m != spec.motion][int(rng.integers(len(scenes.MOTIONS) - 1))]
                warm = scenes.make_scene(shape, color, spec.background, motion, rng)
            text = scenes.caption(warm, rng)
            if extractor is None:
                if share == "object":
                    return warm, text, f"{obj.color} {obj.shape}"
                break
            shared = [e for e in _entities(extractor, text) if e in mine]
            if len(shared) == 1:
                return warm, text, shared[0]
    raise RuntimeError(f"no warm prompt sharing one entity with {caption_text!r} in {tries} draws per strategy")


def share_kind(test: scenes.SceneSpec, served: Optional[scenes.SceneSpec]) -> str:
    """What a served entry's scene shares with the test scene: ``"object"``, ``"background"``,
    ``"motion"`` joined by ``+``, ``"none"``, or ``"unknown"`` when the served scene is not known."""
    if served is None:
        return "unknown"
    parts = []
    if set(zip(test.shapes, test.colors)) & set(zip(served.shapes, served.colors)):
        parts.append("object")
    if test.background == served.background:
        parts.append("background")
    if test.motion == served.motion:
        parts.append("motion")
    return "+".join(parts) or "none"
