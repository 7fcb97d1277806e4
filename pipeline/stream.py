"""Cross-request reuse measured on a stream: requests in order, one fresh store per mode, against all-full.

Where the quality harness (:mod:`.quality`) serves every test prompt from a store warmed for it, a
stream is what a user's batch is: each request is looked up among the requests *before* it, a miss is
stored, hits come as they come. :func:`run_stream` sends the same requests, in the same order and from
the same noise (request i: seed ``seed + i``), through each reuse mode with a fresh store of its own
(real lookup: spaCy entities, MiniLM embeddings, hnswlib), and once through ``full`` (the reference:
every request at the full schedule, nothing stored). Every clip is scored by ``refmodel.evaluator``;
per mode it reports the hit rate (and, for ``auto``, what served each request), the mean latency and
the speed-up against all-full measured in the same run (request by request, every mode in turn, so the
load of a shared machine falls on every mode alike), and the quality against all-full.

Prompts that the evaluator cannot read (VBench's) give hit rate and speed only: :func:`run_prompts`.

A mode may be a mode spec with model hooks (``chai+mixcache``, ``auto+mixcache``: intra-request caching
inside every run); each request then also reports the steps computed in full (``computed``).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..cache.backend import open_store
from ..cache.lookup import CacheLookup, LookupConfig
from ..refmodel import evaluator
from ..refmodel.model import model_to_pixels
from .core import ChaiPipeline
from .modes import get_mode, parse_mode_spec
from .quality import HARNESS_SETTINGS

__all__ = ["StreamRun", "StreamReport", "run_stream", "run_prompts", "format_stream_table", "format_kind_table",
           "miss_entry_bytes"]


@dataclass
class StreamRun:
    """One mode over the stream.

    Attributes:
        mode: the mode spec (``chai``, ``chai+mixcache``). served: what served each request (``served_by``).
        hit: per request. latency_ms: request ``total_ms``. steps: model steps. computed: model steps
        computed in full (an intra-request cache reuses the others; = steps without one). scores: the evaluator's scores (empty for
        prompts it cannot read). clips: uint8 [F, H, W, 3] per request (empty when not kept).
        store_bytes / entries: the store after the stream.
    """

    mode: str
    served: List[str] = field(default_factory=list)
    hit: List[bool] = field(default_factory=list)
    latency_ms: List[float] = field(default_factory=list)
    steps: List[int] = field(default_factory=list)
    computed: List[int] = field(default_factory=list)
    scores: List[Dict[str, float]] = field(default_factory=list)
    clips: List[np.ndarray] = field(default_factory=list)
    store_bytes: int = 0
    entries: int = 0

    @property
    def hit_rate(self) -> float:
        """Requests served from the store / requests."""
        return float(np.mean(self.hit)) if self.hit else 0.0

    @property
    def mean_latency_ms(self) -> float:
        """Mean request latency (ms)."""
        return float(np.mean(self.latency_ms)) if self.latency_ms else float("nan")

    def mean(self, key: str = "overall") -> float:
        """Mean of one evaluator criterion over the requests."""
        return float(np.mean([s[key] for s in self.scores])) if self.scores else float("nan")


@dataclass
class StreamReport:
    """Every mode over one stream, with all-full as the reference (``runs["full"]``).

    Attributes:
        prompts: the requests in order. kinds: what each request is (``"new"``, ``"share"``, a near-duplicate
        kind) when known. runs: mode -> :class:`StreamRun`. device. budget_bytes: each store's budget
        (None: the default).
    """

    prompts: List[str]
    kinds: List[str]
    runs: Dict[str, StreamRun]
    device: str
    budget_bytes: Union[None, int, Dict[str, int]] = None

    def summary(self) -> Dict[str, Any]:
        """JSON-ready: per mode hit rate, served-by counts, latency, speed-up and quality against all-full."""
        full = self.runs["full"]
        out: Dict[str, Any] = {"n_requests": len(self.prompts), "device": self.device,
                               "budget_bytes": self.budget_bytes,
                               "kinds": {k: self.kinds.count(k) for k in dict.fromkeys(self.kinds)}, "modes": {}}
        for name, run in self.runs.items():
            row: Dict[str, Any] = {
                "hit_rate": round(run.hit_rate, 4), "hits": int(sum(run.hit)),
                "served_by": {k: run.served.count(k) for k in dict.fromkeys(run.served)},
                "latency_ms": round(run.mean_latency_ms, 2),
                "speedup_vs_full": round(full.mean_latency_ms / run.mean_latency_ms, 3),
                "mean_model_steps": round(float(np.mean(run.steps)), 2),
                "mean_computed_steps": round(float(np.mean(run.computed)), 2),
                "store_bytes": run.store_bytes, "entries": run.entries,
            }
            if run.scores:
                row.update({k: round(run.mean(k), 4) for k in run.scores[0]})
                row["delta_overall_vs_full"] = round(run.mean() - full.mean(), 4)
                hits = [i for i, h in enumerate(run.hit) if h]
                if hits:
                    row["delta_overall_on_hits"] = round(float(np.mean(
                        [run.scores[i]["overall"] - full.scores[i]["overall"] for i in hits])), 4)
                    row["speedup_on_hits"] = round(float(np.mean([full.latency_ms[i] for i in hits]) /
                                                         np.mean([run.latency_ms[i] for i in hits])), 3)
                row["by_kind"] = {}
                for kind in dict.fromkeys(self.kinds):
                    idx = [i for i, k in enumerate(self.kinds) if k == kind]
                    served = [run.served[i] for i in idx]
                    row["by_kind"][kind] = {
                        "n": len(idx), "hits": int(sum(run.hit[i] for i in idx)),
                        "served_by": {k: served.count(k) for k in dict.fromkeys(served)},
                        "delta_overall": round(float(np.mean(
                            [run.scores[i]["overall"] - full.scores[i]["overall"] for i in idx])), 4)}
            out["modes"][name] = row
        return out




def miss_entry_bytes(pipe: ChaiPipeline, mode: str) -> int:
    """Bytes of the tensors one miss of ``mode`` stores at ``pipe``'s settings and its model's native size:
    CHAI's captured latents, Chorus's window (``chorus.chorus_entry_bytes``), both for ``auto``.

    Raises:
        ValueError: a mode that stores nothing (not ``chai``, ``chorus`` or ``auto``).
    """
    from .chorus import chorus_entry_bytes

    settings = pipe.settings
    shape = pipe.latent_shape(*pipe.resolve_size(None, "", None, None, None))
    itemsize = torch.empty((), dtype=getattr(torch, settings.schedule.capture_dtype)).element_size()
    chai = len(settings.cache_attention_config().latent_names) * int(np.prod(shape)) * itemsize
    chorus = chorus_entry_bytes(settings, shape)
    sizes = {"chai": chai, "chorus": chorus, "auto": chai + chorus}
    if mode not in sizes:
        raise ValueError(f"mode {mode!r} stores no entry; one of {', '.join(sizes)}")
    return sizes[mode]


def run_prompts(model, encoder, prompts: Sequence[str], *, modes: Sequence[str] = ("chai", "chorus", "auto"),
                kinds: Optional[Sequence[str]] = None, score: bool = True, keep_clips: bool = False,
                budget_bytes: Union[None, int, Mapping[str, int]] = None,
                settings: Optional[Mapping[str, Any]] = None,
                cfg_scale: Optional[float] = None, seed: int = 0,
                progress: Optional[Callable[[str, int, int], None]] = None) -> StreamReport:
    """Every mode over ``prompts`` in order (one fresh store each) plus ``full`` (no store): the stream measure.

    Args:
        model, encoder: the reference model and its caption encoder (``refmodel.model.load_reference_model``).
        prompts: the requests, in order. kinds: what each is (reported as counts), optional.
        modes: mode specs that look up (``chai``, ``chorus``, ``auto``, with hooks: ``chai+mixcache``);
            ``full`` always runs first.
        score: score every clip with ``refmodel.evaluator`` (False for prompts it cannot read, e.g. VBench's).
        keep_clips: keep the uint8 clips in the report.
        budget_bytes: each store's byte budget, or one per mode (None: the store's default); eviction is LRU.
        settings: setting overrides of every request (Chorus knobs, ...). cfg_scale: default the model's.
        seed: request i is drawn from noise seed ``seed + i`` in every mode.
        progress: ``fn("stream", done, total)``.

    Returns:
        :class:`StreamReport`.

    Raises:
        ValueError: no prompts, a bad mode spec, or a mode that does not look up.
    """
    if not prompts:
        raise ValueError("no prompts given")
    specs = {name: parse_mode_spec(name) for name in ("full", *modes)}
    for name in modes:
        if not get_mode(specs[name].mode).uses_lookup:
            raise ValueError(f"mode {name!r} does not look up: a stream measures reuse modes (chai, chorus, auto)")
    from ..cache.embed import Embedder
    from ..cache.entities import EntityExtractor

    extractor, embedder = EntityExtractor(), Embedder()
    base = ChaiPipeline.from_reference_model(model, encoder).with_settings(
        HARNESS_SETTINGS, {"cfg_scale": cfg_scale}, settings)
    shape_args = dict(height=None, width=None, num_frames=None, resolution=None)
    names = ("full", *modes)
    runs: Dict[str, StreamRun] = {name: StreamRun(mode=name) for name in names}
    with contextlib.ExitStack() as stack:
        pipes = {}
        for name in names:  # one fresh store per reuse mode; full stores nothing
            store = None
            if name != "full":
                folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="chai-stream-store-"))
                budget = budget_bytes.get(name) if isinstance(budget_bytes, Mapping) else budget_bytes
                store = stack.enter_context(open_store(folder, budget_bytes=budget, dim=embedder.dim))
            lookup = None if store is None else CacheLookup(store, extractor, embedder, LookupConfig())
            pipes[name] = (base.with_settings(specs[name].overrides(), lookup=lookup), store)
        # Request by request, every mode in turn: load on a shared machine hits every mode alike.
        for i, prompt in enumerate(prompts):
            for name in names:
                run, pipe = runs[name], pipes[name][0]
                r = pipe.generate(prompt, seed=seed + i, mode=specs[name].mode, hooks=specs[name].hooks,
                                  decode=False, **shape_args)
                run.served.append(r.served_by)
                run.hit.append(bool(r.hit))
                run.latency_ms.append(r.timings.total_ms)
                run.steps.append(r.steps)
                run.computed.append(r.steps - sum(rep["steps"] - rep["full"] for rep in r.hook_reports.values()
                                                  if "map" in rep))
                if score or keep_clips:
                    pixels = model_to_pixels(r.latent[None])[0]
                    if score:
                        run.scores.append(dict(evaluator.evaluate(pixels, prompt).scores))
                    if keep_clips:
                        run.clips.append(pixels)
            if progress:
                progress("stream", i + 1, len(prompts))
        for name, (_pipe, store) in pipes.items():
            if store is not None:
                stats = store.stats()
                runs[name].store_bytes, runs[name].entries = int(stats.bytes), int(stats.entries)
    return StreamReport(prompts=list(prompts), kinds=list(kinds or []), runs=runs, device=str(base.device),
                        budget_bytes=dict(budget_bytes) if isinstance(budget_bytes, Mapping) else budget_bytes)


def run_stream(model, encoder, stream: Sequence[Any], **kwargs: Any) -> StreamReport:
    """:func:`run_prompts` over a ``refmodel.streams.mixed_stream`` (its captions and kinds)."""
    return run_prompts(model, encoder, [item.caption for item in stream], kinds=[item.kind for item in stream],
                       **kwargs)


def format_kind_table(report: StreamReport) -> str:
    """Markdown table: per mode and kind of request (new, share, paraphrase, ...), hits/n and Δ overall
    against all-full over that kind's requests; empty when the evaluator could not score the stream."""
    s = report.summary()
    modes = {name: m for name, m in s["modes"].items() if "by_kind" in m and name != "full"}
    if not modes:
        return ""
    kinds = list(s["kinds"])
    lines = ["| mode | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, m in modes.items():
        cells = []
        for kind in kinds:
            k = m["by_kind"][kind]
            served = "" if set(k["served_by"]) <= {"full", name} else \
                " (" + ", ".join(f"{b} {c}" for b, c in k["served_by"].items() if b != "full") + ")"
            cells.append(f"{k['hits']}/{k['n']}{served}, {k['delta_overall']:+.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_stream_table(report: StreamReport) -> str:
    """Markdown table: per mode hit rate, served by, mean model and computed steps, latency, speed-up,
    quality against all-full."""
    s = report.summary()
    head = ["mode", "hit rate", "served by", "mean steps", "computed steps", "latency ms", "speed-up vs all-full",
            "overall", "Δ overall vs full", "Δ on hits", "speed-up on hits", "store MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in s["modes"].items():
        served = ", ".join(f"{k} {v}" for k, v in m["served_by"].items())
        cells = [name, f"{100 * m['hit_rate']:.0f}%", served, f"{m['mean_model_steps']:.1f}",
                 f"{m['mean_computed_steps']:.1f}", f"{m['latency_ms']:.0f}",
                 f"{m['speedup_vs_full']:.2f}x", f"{m['overall']:.3f}" if "overall" in m else "",
                 f"{m['delta_overall_vs_full']:+.3f}" if "delta_overall_vs_full" in m else "",
                 f"{m['delta_overall_on_hits']:+.3f}" if "delta_overall_on_hits" in m else "",
                 f"{m['speedup_on_hits']:.2f}x" if "speedup_on_hits" in m else "",
                 f"{m['store_bytes'] / 2 ** 20:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
