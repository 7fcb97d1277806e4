"""The quality harness: every sampling mode side by side on the reference model, through the request path.

Each mode is a spec parsed by :func:`.modes.parse_mode_spec` (``full30``, ``plain8``, ``chai8``,
``chai4``, any registered mode by name with an optional step count, ``+hook`` for a registered model
hook), so a method that registers a mode or a hook is measured here without editing this file. Every
prompt runs every mode from the same initial noise (prompt i: seed ``seed + i``), as one request of
:meth:`.core.ChaiPipeline.generate` with ``store=False``; ``full30`` is always run (it is the reference
for speed-ups and deltas).

Modes that look the prompt up (``chai``, ``chorus``, ``auto``) are served from a store warmed first: for
each test prompt a warm prompt runs in the mode's ``warm_with`` mode(s) (``warm``: the full schedule, its
CHAI capture stored; ``chorus_warm``: its Chorus window stored), once per distinct compatibility key
(``chai8`` and ``chai4`` store at different noise levels). The warm prompt shares exactly one entity with
the test prompt (``warm="share"``, ``refmodel.quality.warm_scene_for``) or is a near-duplicate of it
(``warm="near"``, ``refmodel.streams.near_duplicate``: the same scene in other words, or one scored
attribute changed). A spec may be a ``ModeSpec`` variant with settings of its own (an ablation). With ``lookup=True`` the lookup is the
real one (spaCy entities, MiniLM embeddings, HNSW over the store); with ``lookup=False`` a hermetic
pairing lookup (no spaCy or MiniLM) keys test prompt i and warm prompt i alike, so prompt i is served
warm entry i through the same store and request path. A lookup that misses runs CHAI's miss path (the
full schedule), as a real request would.

Scores come from ``refmodel.evaluator.evaluate`` on the uint8 clip against its prompt and the
ground-truth render of the prompt's scene spec (so the detail criterion is scored); every field of its
result's ``scores`` dict is reported (a new criterion appears without a change here). Per mode the report
adds fidelity to the full run from the same noise (PSNR / SSIM, ``refmodel.fidelity.psnr_ssim``) and the
FVD-style Frechet distance between the mode's clips and the ground-truth renders
(``refmodel.fidelity.frechet_distance``). Latency is a request's ``total_ms`` (lookup, caption,
sampling), batch 1, on the model's device.
Compute is reported as *equivalent steps*: the steps run times the share of block work a model hook
ran (an intra-request cache's ``work_share``; 1 without one), so ``plain<k>`` at the same compute is
easy to read off.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..cache.backend import open_store
from ..cache.agreement import contradicts
from ..cache.lookup import CacheLookup, LookupConfig
from ..refmodel import evaluator, fidelity, scenes
from ..refmodel.model import model_to_pixels
from ..refmodel.quality import WARM_SEED, share_kind, warm_scene_for
from ..refmodel.streams import NEAR_SEED, near_duplicate_pairs
from .core import ChaiPipeline
from .modes import ModeSpec, get_mode, parse_mode_spec

__all__ = ["DEFAULT_MODES", "REFERENCE_MODE", "ModeResult", "QualityReport", "run_quality", "format_table"]

#: The modes of the default table, in order.
DEFAULT_MODES: Tuple[str, ...] = ("full30", "plain8", "chai8", "plain4", "chai4")
#: The reference every other mode is compared with (always run, first).
REFERENCE_MODE = "full30"
#: Settings of every harness request before a spec's own step count: the paper's 8 / 30 steps, and
#: float32 captures (the harness measures the method, not the fp16 rounding of its store).
HARNESS_SETTINGS: Dict[str, Any] = {"fast_steps": 8, "full_steps": 30, "capture_dtype": "float32"}


@dataclass
class ModeResult:
    """Per-prompt results of one mode spec.

    Attributes:
        name: the spec as written (``chai8``). mode: the registered mode. steps: its nominal step count
        (the settings field its number sets). cached: it looks prompts up (served from the store).
        scores: the evaluator's ``scores`` dict per prompt. latency_ms: request ``total_ms`` per prompt.
        clips: uint8 [F, H, W, 3] per prompt. hits: prompts served from the store.
        settings: the request settings' fingerprint. served: what served each prompt (``served_by``).
        steps_run: model steps per prompt. details: each request's mode details (Chorus: stage bounds,
        region, ``step_equivalents``). equivalent_steps: per prompt, the mode's step equivalents (its
        steps, or Chorus's ``step_equivalents``) x the share of block work the model hooks ran.
        hook_maps: per prompt, each reporting hook's step map (``FFSSC...``). psnr_db / ssim: mean
        fidelity to the reference mode's clip of the same prompt and noise (``inf`` / 1.0 for the
        reference itself). frechet: Frechet distance of the mode's clips to the ground-truth renders
        (squared feature units).
    """

    name: str
    mode: str
    steps: int
    cached: bool
    settings: str = ""
    scores: List[Dict[str, float]] = field(default_factory=list)
    latency_ms: List[float] = field(default_factory=list)
    clips: List[np.ndarray] = field(default_factory=list)
    hits: int = 0
    psnr_db: float = float("nan")
    ssim: float = float("nan")
    frechet: float = float("nan")
    served: List[str] = field(default_factory=list)
    steps_run: List[int] = field(default_factory=list)
    details: List[Dict[str, Any]] = field(default_factory=list)
    equivalent_steps: List[float] = field(default_factory=list)
    hook_maps: List[Dict[str, str]] = field(default_factory=list)

    def mean(self, key: str = "overall") -> float:
        """Mean of one criterion over prompts (``overall`` or any key of the evaluator's scores)."""
        return float(np.mean([s[key] for s in self.scores])) if self.scores else float("nan")

    def stderr(self, key: str = "overall") -> float:
        """Standard error of the mean of one criterion over prompts (NaN below 2 prompts)."""
        vals = np.array([s[key] for s in self.scores], dtype=np.float64)
        return float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else float("nan")

    @property
    def criteria(self) -> List[str]:
        """Every criterion the evaluator returned, in its order (``overall`` first when present)."""
        keys: List[str] = []
        for s in self.scores:
            keys += [k for k in s if k not in keys]
        return sorted(keys, key=lambda k: k != "overall")

    @property
    def mean_latency_ms(self) -> float:
        """Mean request latency in ms."""
        return float(np.mean(self.latency_ms)) if self.latency_ms else float("nan")


@dataclass
class QualityReport:
    """Everything one :func:`run_quality` call measured.

    Attributes:
        modes: spec text -> :class:`ModeResult` (the reference first). prompts / warm_prompts /
        shared_entities: the test captions, their warm captions and the entity each pair shares (warm
        ``"share"``) or the near-duplicate's kind (warm ``"near"``). warm: which warm prompts.
        lookup_hits: spec -> prompts served from the store (modes that look up). lookup_ms: every real
        lookup's total ms. served_shares: what served entries share with their request (object,
        background, ...: ``refmodel.quality.share_kind``; a served entry that shares neither the object nor
        the background contradicts or ignores the request). refused: matches the modifier-agreement gate
        refused, per spec. served_contradicting: hits, per spec, whose served entity names the request
        entity's head noun with other colour words (``cache.agreement.contradicts``: "black background"
        served for "white background"). warm_ms: time of the warm runs. device.
        cfg_scale: the CFG scale every mode ran at.
    """

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
    refused: Dict[str, int] = field(default_factory=dict)
    served_contradicting: Dict[str, int] = field(default_factory=dict)
    warm: str = "share"

    def summary(self) -> Dict[str, Any]:
        """JSON-friendly view (no clips): per mode every criterion's mean, latency, speed-up and deltas."""
        full = self.modes[REFERENCE_MODE]
        out = {"n_prompts": len(self.prompts), "device": self.device, "cfg_scale": self.cfg_scale,
               "warm_prompts": self.warm, "lookup_hits": self.lookup_hits, "served_entry_shares": self.served_shares,
               "served_unrelated": sum(n for kind, n in self.served_shares.items()
                                       if "object" not in kind and "background" not in kind),
               "refused_by_modifier_agreement": self.refused,
               "served_contradicting": self.served_contradicting,
               "mean_lookup_ms": float(np.mean(self.lookup_ms)) if self.lookup_ms else None,
               "warm_full_runs_s": round(self.warm_ms / 1000, 2), "modes": {}}
        ref = np.array([s["overall"] for s in full.scores])
        for name, m in self.modes.items():
            diff = np.array([s["overall"] for s in m.scores]) - ref
            paired_se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
            out["modes"][name] = {
                "mode": m.mode, "steps": m.steps, "cache_attention": m.cached, "settings": m.settings,
                **{k: round(m.mean(k), 4) for k in m.criteria},
                "overall_se": round(m.stderr(), 4),
                "latency_ms": round(m.mean_latency_ms, 2),
                "equivalent_steps": round(float(np.mean(m.equivalent_steps)), 2) if m.equivalent_steps else None,
                "speedup_vs_full": round(full.mean_latency_ms / m.mean_latency_ms, 3),
                "delta_overall_vs_full": round(m.mean() - full.mean(), 4),
                "delta_overall_paired_se": round(paired_se, 4),
                "psnr_db_vs_full": None if not np.isfinite(m.psnr_db) else round(m.psnr_db, 2),
                "ssim_vs_full": round(m.ssim, 4),
                "frechet_vs_ground_truth": round(m.frechet, 3),
                "lookup_hits": self.lookup_hits.get(name),
                "mean_model_steps": round(float(np.mean(m.steps_run)), 3) if m.steps_run else None,
                "served_by": {k: m.served.count(k) for k in dict.fromkeys(m.served)},
            }
        return out


class _PairKeys:
    """Hermetic lookup keys: test prompt i and warm prompt i share the key ``pair <i>`` and nothing else,
    embedded as a fixed random unit vector per pair (an extractor and an embedder for
    ``cache.lookup.CacheLookup``).

    Random 128-d directions rather than one-hot ones: every pair of one-hot vectors is equally far apart,
    which leaves the HNSW graph nothing to navigate by (at 200 pairs a third of the exact matches were
    missed); random directions keep the matching pair at cosine 1 and the others near 0 (at most about
    0.4 among a few hundred pairs, far below the lookup's threshold), and the graph finds them.
    """

    dim = 128

    def __init__(self, pairs: Sequence[Tuple[str, str]]) -> None:
        self.index: Dict[str, int] = {}
        for i, (test, warm) in enumerate(pairs):
            self.index.setdefault(test, i)
            self.index.setdefault(warm, i)
        digest = hashlib.sha256("\n".join(f"{t}\t{w}" for t, w in pairs).encode()).hexdigest()[:12]
        self.fingerprint = f"pairs-{digest}"
        vectors = np.random.default_rng(0).standard_normal((max(1, len(pairs)), self.dim))
        self.vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    def extract(self, prompt: str) -> List[str]:
        return [f"pair {self.index[prompt]}"]

    def normalize_prompt(self, prompt: str) -> str:
        return self.extract(prompt)[0]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.vectors[int(text.split()[-1])] for text in texts]) if texts else \
            np.zeros((0, self.dim), dtype=np.float32)


def _specs(modes: Sequence[Union[str, ModeSpec]]) -> List[ModeSpec]:
    specs: Dict[str, ModeSpec] = {REFERENCE_MODE: parse_mode_spec(REFERENCE_MODE)}
    for item in modes:
        spec = item if isinstance(item, ModeSpec) else parse_mode_spec(item)
        get_mode(spec.mode)
        specs.setdefault(spec.text, spec)
    return list(specs.values())


def _warm_modes(spec: ModeSpec) -> Tuple[str, ...]:
    warm = get_mode(spec.mode).warm_with
    return (warm,) if isinstance(warm, str) else tuple(warm)


def run_quality(model, encoder, items: Sequence[Tuple[scenes.SceneSpec, str]], *, lookup: bool = True,
                cfg_scale: Optional[float] = None, modes: Sequence[Union[str, ModeSpec]] = DEFAULT_MODES,
                store_dir: Optional[str] = None, seed: int = 0, warm: str = "share",
                lookup_config: Optional[LookupConfig] = None,
                settings: Optional[Dict[str, Any]] = None,
                progress: Optional[Callable[[str, int, int], None]] = None) -> QualityReport:
    """Run every mode spec on every prompt through the request path and score the clips.

    Args:
        model: the reference STDiT3 (``refmodel.model.load_reference_model``: with ``reference_config``
            and ``fingerprint``). encoder: its caption encoder.
        items: (scene, caption) pairs; only the captions reach the model.
        lookup: serve lookup modes through the real lookup (spaCy, MiniLM, hnswlib; needs ``store_dir``);
            False: the hermetic pairing lookup (prompt i is served warm prompt i's entry).
        cfg_scale: CFG scale of every mode (default: the model's ``config.json``).
        modes: mode specs (:func:`.modes.parse_mode_spec`) or ``ModeSpec`` variants; ``full30`` is always run,
            first. Warm prompts are made and run only when a mode looks prompts up.
        store_dir: an empty directory for the store (``lookup=True``; default for the hermetic lookup:
            a temporary folder).
        seed: base of the noise seeds (prompt i: ``seed + i``; warm prompt i: ``seed + 100000 + i``).
        lookup_config: the lookup's knobs (default ``LookupConfig()``: the pack's threshold, modifier
            agreement on).
        warm: ``"share"`` (warm prompts share one entity with the test prompts) or ``"near"`` (they are
            near-duplicates of them, ``refmodel.streams.near_duplicate_pairs``).
        settings: setting overrides of every request (e.g. Chorus knobs), under each spec's own.
        progress: ``fn(phase, done, total)``.

    Returns:
        :class:`QualityReport`.

    Raises:
        ValueError: an unknown mode or hook, empty ``items``, ``lookup=True`` with a lookup mode but no
            ``store_dir``, an unknown ``warm``.
    """
    specs = _specs(modes)
    if not items:
        raise ValueError("no prompts given")
    if warm not in ("share", "near"):
        raise ValueError(f"warm must be 'share' or 'near', got {warm!r}")
    cached_specs = [s for s in specs if get_mode(s.mode).uses_lookup]
    real_lookup = lookup and bool(cached_specs)  # no lookup mode: no store to warm (half a CFG sweep's work)
    if real_lookup and not store_dir:
        raise ValueError("lookup=True needs store_dir (an empty directory for the latent store)")
    rng = np.random.default_rng(WARM_SEED)
    extractor = embedder = None
    if real_lookup:
        from ..cache.embed import Embedder
        from ..cache.entities import EntityExtractor

        extractor, embedder = EntityExtractor(), Embedder()
    kind = warm
    if not cached_specs:
        warm = []
    elif kind == "near":
        warm = near_duplicate_pairs(list(items), NEAR_SEED)
    else:
        warm = [warm_scene_for(spec, text, rng, extractor) for spec, text in items]
    if cached_specs and not real_lookup:
        extractor = embedder = _PairKeys([(text, w[1]) for (_spec, text), w in zip(items, warm)])

    with tempfile.TemporaryDirectory(prefix="chai-quality-store-") as scratch:
        store = open_store(store_dir or scratch, dim=embedder.dim) if cached_specs else None
        try:
            cache = CacheLookup(store, extractor, embedder, lookup_config or LookupConfig()) if store is not None else None
            base = ChaiPipeline.from_reference_model(model, encoder, cache)
            base = base.with_settings(HARNESS_SETTINGS, {"cfg_scale": cfg_scale}, settings)
            report = _run(base, specs, cached_specs, items, warm, real_lookup, seed, progress)
            report.warm = kind
            return report
        finally:
            if store is not None:
                store.close()


def _run(base, specs, cached_specs, items, warm, real_lookup, seed, progress) -> QualityReport:
    pipes = {s.text: base.with_settings(s.overrides()) for s in specs}
    clip = model_to_pixels  # the model tensor is the RGB clip in [-1, 1]
    shape_args = dict(height=None, width=None, num_frames=None, resolution=None)

    # Warm: once per distinct store key among the lookup modes' warm modes; a spec's hooks may be part of
    # its key, so it warms with them.
    entry_scene: Dict[int, scenes.SceneSpec] = {}
    warm_keys: Dict[str, Tuple[ModeSpec, str]] = {}
    for s in cached_specs:
        pipe = pipes[s.text]
        h, w, f = pipe.resolve_size(None, "", None, None, None)
        for warm_mode in _warm_modes(s):
            warm_keys.setdefault(pipe.compat_key(h, w, f, warm_mode, s.hooks), (s, warm_mode))
    t0 = time.perf_counter()
    for i, (wspec, wtext, _) in enumerate(warm):
        for s, warm_mode in warm_keys.values():
            r = pipes[s.text].generate(wtext, seed=seed + 100_000 + i, mode=warm_mode, hooks=s.hooks, decode=False,
                                       **shape_args)
            for entry in r.inserted_entry_ids:
                entry_scene[entry] = wspec
        if progress:
            progress("warm", i + 1, len(warm))
    warm_ms = (time.perf_counter() - t0) * 1000

    results = {s.text: ModeResult(s.text, s.mode, int(getattr(pipes[s.text].settings.schedule,
                                                              get_mode(s.mode).steps_setting)),
                                  get_mode(s.mode).uses_lookup, pipes[s.text].settings.fingerprint())
               for s in specs}
    shares: Dict[str, int] = {}
    lookup_ms: List[float] = []
    truths: List[evaluator.ClipMeasurement] = []
    refused: Dict[str, int] = {}
    contradicting: Dict[str, int] = {}
    for i, (spec, text) in enumerate(items):
        truth = evaluator.measure_clip(scenes.render(spec))  # measured once, shared by every mode
        truths.append(truth)
        for s in specs:
            r = pipes[s.text].generate(text, seed=seed + i, mode=s.mode, hooks=s.hooks, decode=False, store=False,
                                       **shape_args)
            m = results[s.text]
            if r.lookup is not None and real_lookup:
                lookup_ms.append(r.lookup.timings.total_ms)
                if r.lookup.refused:
                    refused[s.text] = refused.get(s.text, 0) + 1
            if r.hit:
                m.hits += 1
                if real_lookup:
                    kind = share_kind(spec, entry_scene.get(r.entry_id))
                    shares[kind] = shares.get(kind, 0) + 1
                    if r.lookup is not None and contradicts(r.lookup.entity or "", r.lookup.matched or ""):
                        contradicting[s.text] = contradicting.get(s.text, 0) + 1
            pixels = clip(r.latent[None])[0]
            m.scores.append(dict(evaluator.evaluate(pixels, text, truth).scores))
            m.latency_ms.append(r.timings.total_ms)
            m.clips.append(pixels)
            m.served.append(r.served_by)
            m.steps_run.append(r.steps)
            m.details.append(dict(r.details))
            work = float(np.prod([rep["work_share"] for rep in r.hook_reports.values() if "work_share" in rep]))
            m.equivalent_steps.append(float(r.details.get("step_equivalents", r.steps)) * work)
            m.hook_maps.append({name: rep["map"] for name, rep in r.hook_reports.items() if "map" in rep})
        if progress:
            progress("test", i + 1, len(items))
    reference = results[REFERENCE_MODE]
    for m in results.values():
        fid = fidelity.psnr_ssim(m.clips, reference.clips)
        m.psnr_db, m.ssim = fid["psnr_db"], fid["ssim"]
        if len(m.clips) >= 2:
            m.frechet = fidelity.frechet_distance(m.clips, truths)
    return QualityReport(modes=results, prompts=[t for _, t in items], warm_prompts=[w[1] for w in warm],
                         shared_entities=[w[2] for w in warm], lookup_hits={s.text: results[s.text].hits
                                                                            for s in cached_specs},
                         lookup_ms=lookup_ms, served_shares=shares, warm_ms=warm_ms,
                         device=str(base.device), cfg_scale=float(base.settings.schedule.cfg_scale),
                         refused=refused, served_contradicting=contradicting)


def format_table(report: QualityReport) -> str:
    """Markdown table: mode, steps (the mean model steps where they vary), whether it looks up, every
    criterion's mean (overall +- standard error), PSNR / SSIM vs full, Frechet distance to the ground truth,
    latency, speed-up, delta vs full (+- paired SE)."""
    s = report.summary()
    criteria: List[str] = []
    for m in report.modes.values():
        criteria += [k for k in m.criteria if k not in criteria]
    head = ["mode", "steps", "equivalent steps", "looks up", *criteria, "PSNR vs full", "SSIM vs full",
            "Fréchet vs GT", "latency ms", "speed-up", "Δ overall vs full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in s["modes"].items():
        steps = str(m["steps"]) if m["mean_model_steps"] in (None, m["steps"]) else f"{m['mean_model_steps']:.1f}"
        cells = [name, steps, "" if m["equivalent_steps"] is None else f"{m['equivalent_steps']:.1f}",
                 "yes" if m["cache_attention"] else "no",
                 *((f"{m[k]:.3f} ± {m['overall_se']:.3f}" if k == "overall" else f"{m[k]:.3f}") if k in m else ""
                   for k in criteria),
                 "-" if m["psnr_db_vs_full"] is None else f"{m['psnr_db_vs_full']:.1f} dB", f"{m['ssim_vs_full']:.3f}",
                 f"{m['frechet_vs_ground_truth']:.2f}",
                 f"{m['latency_ms']:.1f}", f"{m['speedup_vs_full']:.2f}x",
                 f"{m['delta_overall_vs_full']:+.3f} ± {m['delta_overall_paired_se']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
