"""Side-by-side quality and latency of CHAI's sampling modes on the reference model.

Modes (each prompt runs every mode from the same initial noise):

* ``full30`` – a miss: 30 RFLOW steps with latent capture (``opensora.cache_attention.sample_full``);
* ``plain8`` / ``plain4`` – 8 or 4 RFLOW steps, no cache (what a short schedule alone gives);
* ``chai8`` / ``chai4`` – a hit: 8 or 4 steps with Cache Attention at steps 2, 3, 4 on the latents of
  an *other* prompt that shares one entity with this one (``sample_fast``; K/V mode and the rest from
  the model's ``config.json`` "cache_attention" section, ``model.cache_attention_defaults``). With ``lookup=True``
  the entry comes from the real CHAI lookup (spaCy entities -> MiniLM embeddings -> HNSW in a
  :class:`..cache.store.LatentStore`) over a store warmed with every warm prompt's full run; with
  ``lookup=False`` the prompt's own warm entry is used directly (hermetic, for tests).

Warm prompts (:func:`warm_scene_for`): a different scene that keeps the test scene's first object
(colour and shape) and changes both background and motion, so the warm prompt shares exactly that
entity ("red circle") and nothing else a scorer would check. With an entity extractor, its caption
is resampled until the extractor finds that shared entity in both prompts (so the lookup can match
it); a few prompts whose object phrase the extractor splits ("plus sign") share their background
instead.

Scores come from :func:`.evaluator.evaluate` on the decoded uint8 clip; latency is the wall time of
one request (caption encoding, lookup for CHAI, sampling), batch 1, on the model's device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..opensora.cache_attention import CacheAttentionConfig, LatentCapture, capture_plan, sample_fast, sample_full
from ..opensora.rflow import RFlow, make_noise
from . import scenes
from .model import CLIP, cache_attention_defaults, model_to_pixels, reference_rflow

__all__ = [
    "HELDOUT_SEED",
    "WARM_SEED",
    "VALIDATION_SEED",
    "MODES",
    "ModeResult",
    "QualityReport",
    "heldout_prompts",
    "warm_scene_for",
    "run_quality",
    "format_table",
]

#: Seed of the held-out prompt stream (training uses seed 1: ``scenes.sample_dataset(1, ...)``).
HELDOUT_SEED = 7_000_001
#: Seed of the warm-prompt stream.
WARM_SEED = 7_000_002
#: Seed of the validation prompt stream: sampler settings (CFG scale) are chosen on it, never on the
#: held-out stream the benchmark reports.
VALIDATION_SEED = 7_000_003
#: Mode names in table order: (name, steps, uses cache).
MODES: Tuple[Tuple[str, int, bool], ...] = (("full30", 30, False), ("plain8", 8, False), ("chai8", 8, True),
                                            ("plain4", 4, False), ("chai4", 4, True))


def heldout_prompts(n: int, seed: int = HELDOUT_SEED, two_shape_prob: float = 0.2) -> List[Tuple[scenes.SceneSpec, str]]:
    """``n`` held-out (scene, caption) pairs from a seed stream the training never used."""
    return scenes.sample_dataset(seed, n, two_shape_prob=two_shape_prob)


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


@dataclass
class ModeResult:
    """Per-prompt results of one mode: scores (evaluator dicts), latency (ms), clips [N, F, H, W, 3] uint8."""

    name: str
    steps: int
    cached: bool
    scores: List[Dict[str, float]] = field(default_factory=list)
    latency_ms: List[float] = field(default_factory=list)
    clips: List[np.ndarray] = field(default_factory=list)

    def mean(self, key: str = "overall") -> float:
        """Mean of one score over prompts (``overall``, ``shape``, ``color``, ``background``, ``motion``, ``temporal``)."""
        return float(np.mean([s[key] for s in self.scores])) if self.scores else float("nan")

    @property
    def mean_latency_ms(self) -> float:
        """Mean request latency in ms."""
        return float(np.mean(self.latency_ms)) if self.latency_ms else float("nan")


@dataclass
class QualityReport:
    """Everything one :func:`run_quality` call measured."""

    modes: Dict[str, ModeResult]
    prompts: List[str]
    warm_prompts: List[str]
    shared_entities: List[str]
    lookup_hits: Dict[str, int]
    lookup_ms: List[float]
    served_shares: Dict[str, int]
    warm_ms: float
    device: str
    cfg_scale: float

    def summary(self) -> Dict[str, Any]:
        """JSON-friendly view (no clips)."""
        full = self.modes["full30"]
        out = {"n_prompts": len(self.prompts), "device": self.device, "cfg_scale": self.cfg_scale,
               "lookup_hits": self.lookup_hits, "served_entry_shares": self.served_shares,
               "mean_lookup_ms": float(np.mean(self.lookup_ms)) if self.lookup_ms else None,
               "warm_full_runs_s": round(self.warm_ms / 1000, 2), "modes": {}}
        for name, m in self.modes.items():
            out["modes"][name] = {
                "steps": m.steps, "cache_attention": m.cached,
                **{k: round(m.mean(k), 4) for k in ("overall", "shape", "color", "background", "motion", "temporal")},
                "latency_ms": round(m.mean_latency_ms, 2),
                "speedup_vs_full": round(full.mean_latency_ms / m.mean_latency_ms, 3),
                "delta_overall_vs_full": round(m.mean() - full.mean(), 4),
            }
        return out


def _request(model, encoder, prompt: str, seed: int, rflow: RFlow, config: CacheAttentionConfig, *,
             cached=None, full: bool = False, extra_capture: Optional[LatentCapture] = None):
    """One request: caption -> noise -> sampling. Returns (model tensor [1, 3, F, H, W], captured dict or None)."""
    y, mask = encoder([prompt])
    null = model.y_embedder.y_embedding
    z = make_noise((1,) + CLIP.shape, seed)
    kw = dict(y=y, y_mask=mask, y_null=null, height=CLIP.height, width=CLIP.width, num_frames=CLIP.num_frames,
              fps=CLIP.fps, size_dtype=torch.float32)
    if full:
        run = sample_full(rflow, model, z, config, callback=extra_capture, **kw)
        return run.latent, run.captured
    latent, _ = sample_fast(rflow, model, z, config, cached=cached, **kw)
    return latent, None


def _share_kind(test: scenes.SceneSpec, served: Optional[scenes.SceneSpec]) -> str:
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


def run_quality(model, encoder, items: Sequence[Tuple[scenes.SceneSpec, str]], *, lookup: bool = True,
                cfg_scale: Optional[float] = None, modes: Sequence[str] = tuple(m[0] for m in MODES),
                store_dir: Optional[str] = None, seed: int = 0,
                progress: Optional[Callable[[str, int, int], None]] = None) -> QualityReport:
    """Run every mode on every prompt and score the clips.

    Args:
        model: the reference STDiT3 (``load_reference_model``), with a ``fingerprint`` attribute for cache keys.
        encoder: its caption encoder (``encoder(prompts) -> (y, mask)``).
        items: (scene, caption) pairs; only the captions reach the model.
        lookup: serve CHAI entries through the real lookup (needs spaCy, MiniLM, hnswlib and ``store_dir``);
            False: each prompt uses its own warm entry.
        cfg_scale: CFG scale of every mode (default: the model's ``config.json`` sampler setting).
        modes: subset of :data:`MODES` names; ``full30`` is always run (it is the reference). Warm prompts
            are made and run only when a CHAI mode is among them.
        store_dir: an empty directory for the latent store (``lookup=True``).
        seed: base of the per-prompt noise seeds (prompt i uses ``seed + i``; warm prompt i ``seed + 100000 + i``).
        progress: ``fn(phase, done, total)``.

    Returns:
        :class:`QualityReport`.

    Raises:
        ValueError: unknown mode, empty ``items``, ``lookup=True`` with a CHAI mode but no ``store_dir``.
    """
    from . import evaluator

    known = {m[0]: m for m in MODES}
    for m in modes:
        if m not in known:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(known)}")
    if not items:
        raise ValueError("no prompts given")
    cached_modes = any(known[m][2] for m in modes)
    lookup = lookup and cached_modes  # no CHAI mode: no cache to warm or look up (half a CFG sweep's work)
    if lookup and not store_dir:
        raise ValueError("lookup=True needs store_dir (an empty directory for the latent store)")
    modes = ["full30"] + [m for m in modes if m != "full30"]
    defaults = cache_attention_defaults(getattr(model, "reference_config", {}))
    cfg = float(defaults.get("cfg_scale", 7.0) if cfg_scale is None else cfg_scale)
    rflow = reference_rflow(cfg_scale=cfg)
    base = CacheAttentionConfig(**{**defaults, "fast_steps": 8, "full_steps": 30, "cfg_scale": cfg,
                                   "capture_dtype": "float32"})
    configs = {8: base, 4: replace(base, fast_steps=4)}
    shape = CLIP.shape
    fingerprint = getattr(model, "fingerprint", "refmodel:unfingerprinted")

    def compat(fast: int) -> str:
        c = configs[fast]
        return f"{fingerprint}|{'x'.join(map(str, shape))}|{CLIP.height}x{CLIP.width}f{CLIP.num_frames}|{c.fingerprint()}"

    extractor = cl = None
    if lookup:
        from ..cache.embed import Embedder
        from ..cache.entities import EntityExtractor
        from ..cache.lookup import CacheLookup
        from ..cache.store import LatentStore

        extractor = EntityExtractor()
        embedder = Embedder()
        store = LatentStore(store_dir, dim=embedder.dim)
        cl = CacheLookup(store, extractor, embedder)

    # Warm prompts and their full runs (the cache a later hit reads).
    rng = np.random.default_rng(WARM_SEED)
    warm = [warm_scene_for(spec, text, rng, extractor) for spec, text in items] if cached_modes else []
    warm_entries: List[Dict[int, Dict[str, torch.Tensor]]] = []
    entry_scene: Dict[Tuple[int, int], scenes.SceneSpec] = {}
    full_sched = rflow.schedule(CLIP.height, CLIP.width, CLIP.num_frames, num_steps=30, size_dtype=torch.float32)
    fast4 = rflow.schedule(CLIP.height, CLIP.width, CLIP.num_frames, num_steps=4, size_dtype=torch.float32)
    t0 = time.perf_counter()
    for i, (wspec, wtext, _) in enumerate(warm):
        cap4 = LatentCapture(capture_plan(configs[4], full_sched, fast4), torch.float32)
        _, cap8 = _request(model, encoder, wtext, seed + 100_000 + i, rflow, configs[8], full=True, extra_capture=cap4)
        entries = {8: cap8, 4: dict(cap4.tensors)}
        warm_entries.append(entries)
        if cl is not None:
            for fast, tensors in entries.items():
                res = cl.lookup(wtext, compat(fast), load=False, record=False)
                entry_id = cl.insert(res, tensors, {"warm_index": i})
                entry_scene[(fast, entry_id)] = wspec
        if progress:
            progress("warm", i + 1, len(warm))
    warm_ms = (time.perf_counter() - t0) * 1000

    results = {m: ModeResult(m, known[m][1], known[m][2]) for m in modes}
    hits = {m: 0 for m in modes if known[m][2]}
    shares: Dict[str, int] = {}
    lookup_ms: List[float] = []
    for i, (spec, text) in enumerate(items):
        for m in modes:
            _, steps, cached = known[m]
            t = time.perf_counter()
            if m == "full30":
                latent, _ = _request(model, encoder, text, seed + i, rflow, configs[8], full=True)
            elif not cached:
                latent, _ = _request(model, encoder, text, seed + i, rflow, replace(configs[steps], cache_steps=()))
            else:
                entry = warm_entries[i][steps]
                if cl is not None:
                    res = cl.lookup(text, compat(steps), load=True, record=False)
                    lookup_ms.append(res.timings.total_ms)
                    if res.hit:
                        hits[m] += 1
                        entry = {k: v for k, v in res.latents.items()}
                        kind = _share_kind(spec, entry_scene.get((steps, res.entry_id)))
                        shares[kind] = shares.get(kind, 0) + 1
                latent, _ = _request(model, encoder, text, seed + i, rflow, configs[steps], cached=entry)
            ms = (time.perf_counter() - t) * 1000
            clip = model_to_pixels(latent)[0]
            r = results[m]
            r.scores.append(evaluator.evaluate(clip, text).scores)
            r.latency_ms.append(ms)
            r.clips.append(clip)
        if progress:
            progress("test", i + 1, len(items))
    if cl is None:
        hits = {m: len(items) for m in hits}
    return QualityReport(modes=results, prompts=[t for _, t in items], warm_prompts=[w[1] for w in warm],
                         shared_entities=[w[2] for w in warm], lookup_hits=hits, lookup_ms=lookup_ms,
                         served_shares=shares, warm_ms=warm_ms, device=str(next(model.parameters()).device),
                         cfg_scale=cfg)


def format_table(report: QualityReport) -> str:
    """Markdown table: mode, steps, overall and per-criterion means, latency, speed-up, delta vs full."""
    s = report.summary()
    head = ("| mode | steps | Cache Attention | overall | shape | colour | background | motion | temporal "
            "| latency ms | speed-up | Δ overall vs full |")
    lines = [head, "|" + "---|" * 12]
    for name, m in s["modes"].items():
        lines.append(f"| {name} | {m['steps']} | {'yes' if m['cache_attention'] else 'no'} | {m['overall']:.3f} | "
                     f"{m['shape']:.3f} | {m['color']:.3f} | {m['background']:.3f} | {m['motion']:.3f} | "
                     f"{m['temporal']:.3f} | {m['latency_ms']:.1f} | {m['speedup_vs_full']:.2f}x | "
                     f"{m['delta_overall_vs_full']:+.3f} |")
    return "\n".join(lines)
