"""``python -m comfyui_chai demo``: CHAI's batch workflow end to end on the bundled reference model.

What it does (issue 7, item 2):

1. Opens a CHAI store: a fresh one in a temporary folder (deleted afterwards), or ``store_dir`` to
   keep and reuse one.
2. Loads the CPU reference model (:meth:`..pipeline.ChaiPipeline.reference`: a pixel-space STDiT3
   that makes 8-frame 32 x 32 shape videos, ``models/reference_v1``) with the real lookup (spaCy
   entities, all-MiniLM-L6-v2 embeddings, HNSW index).
3. Runs every prompt of :data:`DEMO_PROMPTS` (12 related prompts that share shapes, colours and
   backgrounds) twice, interleaved, from the same seed:

   * **CHAI** (``mode="chai"``): lookup; a hit runs the fast schedule (8 steps, Cache Attention at
     steps 2-4 on the matched entry's latents), a miss runs the full schedule (30 steps) and stores
     its latents;
   * **full-mode twin** (``mode="full"``): the same prompt and seed, 30 steps, no lookup, nothing
     stored: the all-full baseline is *measured* in the same run, not estimated.

4. Scores every clip against its prompt with :func:`..refmodel.evaluator.evaluate` (shape, colour,
   background, motion, temporal consistency; ``overall`` in [0, 1]).
5. Writes to ``out_dir``: ``NN_<slug>.mp4`` per prompt (the CHAI video) and ``full_mode/NN_<slug>.mp4``
   (its twin), upscaled with nearest neighbour; ``contact_sheet.png`` (the first hit next to its
   full-mode twin, plus the video whose full run made the cache entry when it is in this batch);
   ``report.md`` and ``report.json`` (per prompt: hit/miss, matched entity, similarity, steps,
   latency split, scores; totals: hit rate, mean latency, speed-up against the all-full run,
   quality difference, store behaviour).

A second run against the same ``store_dir`` finds the first run's entries (same model checkpoint,
same size and schedule), so its hit rate is higher: the store persists across processes.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["DEMO_PROMPTS", "DemoReport", "run_demo", "write_contact_sheet", "format_report", "upscale_frames"]

#: The built-in batch: 12 prompts in the reference model's domain (``refmodel.scenes`` shapes, colours,
#: backgrounds and motions), written by hand so that later prompts share an object or a background with
#: earlier ones ("red circle", "yellow star", "sunset sky", "sand", ...), as an artist's batch would.
DEMO_PROMPTS: Tuple[str, ...] = (
    "a red circle sliding left on a black background",
    "a red circle rising against a sunset sky",
    "a yellow star falling across a clear blue sky",
    "a yellow star growing on green grass",
    "a blue square moving down over sand",
    "a white cross shrinking against a sunset sky",
    "a small blue square sliding right on a white background",
    "a red circle and a yellow star move right on a gray background",
    "a pink triangle floating upward in a blue sky",
    "a green triangle expanding on a white background",
    "over sand, a large orange ball rises",
    "a cyan cross shrinking against a sunset sky",
)

_SCORE_KEYS = ("overall", "shape", "color", "background", "motion", "temporal")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def upscale_frames(frames: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest-neighbour upscaling of a clip, so 32 x 32 frames stay crisp when viewed.

    Args:
        frames: [F, H, W, 3] (any dtype). scale: integer factor >= 1.

    Returns:
        [F, H * scale, W * scale, 3], same dtype.

    Raises:
        ValueError: a scale below 1 or frames that are not [F, H, W, 3].
    """
    if int(scale) < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {tuple(frames.shape)}")
    s = int(scale)
    return frames.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)


@dataclass
class DemoReport:
    """Everything one :func:`run_demo` call measured and wrote.

    Attributes:
        run: settings and environment (model fingerprint, size, config, store, seeds, load time).
        rows: one dict per prompt (see :func:`run_demo`).
        totals: batch totals (see :func:`run_demo`).
        files: paths written: ``videos``, ``full_videos``, ``contact_sheet`` (None without a hit),
            ``report_md``, ``report_json``.
        markdown: the text of ``report.md``.
    """

    run: Dict[str, Any]
    rows: List[Dict[str, Any]]
    totals: Dict[str, Any]
    files: Dict[str, Any] = field(default_factory=dict)
    markdown: str = ""

    def to_json(self) -> Dict[str, Any]:
        """The ``report.json`` document: ``{"run", "totals", "prompts", "files"}``."""
        return {"run": self.run, "totals": self.totals, "prompts": self.rows, "files": self.files}


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(sum(values) / len(values)) if values else None


def _totals(rows: List[Dict[str, Any]], cache: Dict[str, Any]) -> Dict[str, Any]:
    """Hit rate, latency, measured speed-up and quality difference of a demo batch."""
    n = len(rows)
    hits = [r for r in rows if r["hit"]]
    chai_ms = sum(r["timings_ms"]["total_ms"] for r in rows)
    full_ms = sum(r["full"]["timings_ms"]["total_ms"] for r in rows)
    chai_score = _mean([r["score"] for r in rows])
    full_score = _mean([r["full"]["score"] for r in rows])
    hit_chai = _mean([r["score"] for r in hits])
    hit_full = _mean([r["full"]["score"] for r in hits])
    return {
        "prompts": n, "hits": len(hits), "misses": n - len(hits), "hit_rate": len(hits) / n if n else 0.0,
        "mean_latency_ms": chai_ms / n if n else 0.0,
        "mean_full_latency_ms": full_ms / n if n else 0.0,
        "total_chai_ms": chai_ms, "total_all_full_ms": full_ms,
        "speedup_vs_all_full": full_ms / chai_ms if chai_ms > 0 else None,
        "speedup_note": "all-full time measured in the same run: every prompt also ran in full mode "
                        "(same seed, full schedule), interleaved with its CHAI run",
        "mean_hit_latency_ms": _mean([r["timings_ms"]["total_ms"] for r in hits]),
        "mean_miss_latency_ms": _mean([r["timings_ms"]["total_ms"] for r in rows if not r["hit"]]),
        "mean_cache_ms_on_hits": _mean([r["timings_ms"]["lookup_ms"] + r["timings_ms"]["cache_kv_ms"] for r in hits]),
        "mean_score_chai": chai_score, "mean_score_all_full": full_score,
        "quality_difference": (chai_score - full_score) if chai_score is not None and full_score is not None else None,
        "mean_score_hits_chai": hit_chai, "mean_score_hits_full": hit_full,
        "quality_difference_on_hits": (hit_chai - hit_full) if hits else None,
        "cache": cache,
    }


def format_report(report: DemoReport) -> str:
    """The markdown of ``report.md``: settings, one table row per prompt, totals."""
    run, t = report.run, report.totals

    def num(v, fmt="{:.0f}"):
        return "" if v is None else fmt.format(v)

    lines = [
        "# CHAI demo report", "",
        f"Reference model `{run['model_fingerprint']}`, {run['height']}x{run['width']} pixels, {run['num_frames']} "
        f"frames, device {run['device']}, {run['threads']} torch thread(s); config `{run['config']}`; "
        f"store `{run['store']}` ({'fresh' if run['fresh_store'] else 'reused'}); seed of prompt i = "
        f"{run['seed']} + i.", "",
        f"CHAI = lookup, then fast mode ({run['fast_steps']} steps, Cache Attention) on a hit or full mode "
        f"({run['full_steps']} steps, stored) on a miss. Full = the same prompt and seed in full mode (no cache), run "
        "right after. Score = the evaluator's overall score of the clip against its prompt (0..1).", "",
        "| # | prompt | CHAI | entity -> matched | sim | steps | lookup ms | text ms | denoise ms | store ms "
        "| total ms | score | full steps | full ms | full score |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        tm, ft = r["timings_ms"], r["full"]["timings_ms"]
        match = f"{r['entity']} -> {r['matched']}" if r["matched"] else ""
        lines.append(
            f"| {r['index']} | {r['prompt'].replace('|', '/')} | {'hit' if r['hit'] else 'miss'} | "
            f"{match.replace('|', '/')} | {num(r['similarity'], '{:.3f}')} | {r['steps']} | "
            f"{num(tm['lookup_ms'], '{:.1f}')} | {num(tm['text_ms'])} | {num(tm['denoise_ms'])} | "
            f"{num(tm['store_ms'], '{:.1f}')} | {num(tm['total_ms'])} | {r['score']:.3f} | {r['full']['steps']} | "
            f"{num(ft['total_ms'])} | {r['full']['score']:.3f} |")
    cache = t["cache"]
    lines += [
        "", "## Totals", "",
        f"- **hit rate**: {100 * t['hit_rate']:.1f}% ({t['hits']} of {t['prompts']} prompts)",
        f"- **mean latency**: CHAI {t['mean_latency_ms']:.0f} ms per video, all-full {t['mean_full_latency_ms']:.0f} ms"
        + (f" (hits {t['mean_hit_latency_ms']:.0f} ms, misses {t['mean_miss_latency_ms']:.0f} ms)"
           if t["mean_hit_latency_ms"] is not None and t["mean_miss_latency_ms"] is not None else ""),
        f"- **speed-up against all-full**: {num(t['speedup_vs_all_full'], '{:.2f}')}x "
        f"({t['total_all_full_ms'] / 1000:.1f} s / {t['total_chai_ms'] / 1000:.1f} s, both measured in this run)",
        f"- **quality**: mean score CHAI {t['mean_score_chai']:.3f}, all-full {t['mean_score_all_full']:.3f}, "
        f"difference {t['quality_difference']:+.3f}"
        + (f" (on the hits alone: {t['mean_score_hits_chai']:.3f} vs {t['mean_score_hits_full']:.3f}, "
           f"{t['quality_difference_on_hits']:+.3f})" if t["quality_difference_on_hits"] is not None else ""),
    ]
    if t["mean_cache_ms_on_hits"] is not None:
        lines.append(f"- **cache work on a hit** (lookup + latent load + cached K/V): "
                     f"{t['mean_cache_ms_on_hits']:.1f} ms")
    lines.append(f"- **store**: {cache['entries']} entries, {cache['bytes']:,} of {cache['budget_bytes']:,} bytes; "
                 f"this run inserted {cache['inserts']} and evicted {cache['evictions']}")
    sheet = report.files.get("contact_sheet")
    if sheet:
        lines += ["", f"![contact sheet]({Path(sheet).name})"]
    return "\n".join(lines) + "\n"


def write_contact_sheet(path: Union[str, Path], hit: Dict[str, Any], frames: Dict[str, torch.Tensor],
                        source: Optional[Dict[str, Any]] = None, scale: int = 4) -> Path:
    """A PNG with a hit's CHAI clip next to its full-mode twin (and the clip that made its cache entry).

    Each panel shows the clip's frames in a 2 x 4 grid upscaled by ``scale`` with nearest neighbour,
    under a label with the mode, steps, evaluator score and latency; the title holds the prompt, the
    seed and the match.

    Args:
        path: PNG to write (parent folders are created).
        hit: the hit's report row (:func:`run_demo`).
        frames: ``{"chai": [F, H, W, 3], "full": [F, H, W, 3]}`` floats in [0, 1] (and ``"source"``
            with ``source``).
        source: the report row of the prompt whose full run stored the served entry, or None.
        scale: upscaling factor.

    Returns:
        the path written.

    Raises:
        ValueError: missing frames or a bad ``scale``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels: List[Tuple[str, torch.Tensor, str]] = []
    if source is not None:
        st = source["timings_ms"]["total_ms"]
        panels.append((f"cache entry made by #{source['index']} (its {source['steps']}-step full run)",
                       frames["source"], f"\"{source['prompt']}\"\nscore {source['score']:.3f}, {st / 1000:.2f} s"))
    t = hit["timings_ms"]["total_ms"]
    panels.append((f"CHAI hit: fast mode, {hit['steps']} steps + Cache Attention", frames["chai"],
                   f"score {hit['score']:.3f}   latency {t / 1000:.2f} s"))
    ft = hit["full"]["timings_ms"]["total_ms"]
    panels.append((f"full-mode twin: {hit['full']['steps']} steps, no cache", frames["full"],
                   f"score {hit['full']['score']:.3f}   latency {ft / 1000:.2f} s"))

    def grid(clip: torch.Tensor) -> np.ndarray:
        clip = upscale_frames(clip.float().clamp(0, 1), scale).numpy()
        f, h, w, _ = clip.shape
        cols = 4
        rows = (f + cols - 1) // cols
        gap = max(2, scale)
        out = np.ones((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), dtype=np.float32)
        for i in range(f):
            r, c = divmod(i, cols)
            out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = clip[i]
        return out

    images = [grid(clip) for _, clip, _ in panels]
    h_px, w_px = images[0].shape[:2]
    dpi = 100
    pad = 20
    title_h, label_h, foot_h = 78, 30, 48
    width = len(images) * w_px + (len(images) + 1) * pad
    height = title_h + label_h + h_px + foot_h + pad
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    sim = hit["similarity"]
    fig.text(pad / width, 1 - 10 / height, f"\"{hit['prompt']}\"  (seed {hit['seed']})", ha="left", va="top",
             fontsize=14, fontweight="bold")
    fig.text(pad / width, 1 - 40 / height,
             f"prompt #{hit['index']}: entity '{hit['entity']}' matched '{hit['matched']}' in the cache "
             f"(cosine similarity {sim:.3f}); frames 1-8, left to right, top to bottom, {scale}x nearest-neighbour",
             ha="left", va="top", fontsize=10.5, color="#333333")
    for k, ((label, _, foot), img) in enumerate(zip(panels, images)):
        x0 = pad + k * (w_px + pad)
        y0 = foot_h + pad
        ax = fig.add_axes([x0 / width, y0 / height, w_px / width, h_px / height])
        ax.imshow(img, interpolation="nearest")
        ax.set_axis_off()
        fig.text(x0 / width, (y0 + h_px + 6) / height, label, ha="left", va="bottom", fontsize=11.5,
                 fontweight="bold", color="#1a4f8b" if label.startswith("CHAI") else "#222222")
        fig.text(x0 / width, (y0 - 6) / height, foot, ha="left", va="top", fontsize=10.5, color="#222222")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    plt.close(fig)
    return path


def _clean_outputs(out: Path) -> None:
    """Remove what an earlier demo wrote into ``out`` (only the demo's own file names)."""
    for pattern in ("[0-9][0-9]_*.mp4", "full_mode/[0-9][0-9]_*.mp4", "contact_sheet.png", "report.md", "report.json"):
        for p in out.glob(pattern):
            p.unlink()


def run_demo(out_dir: Union[str, Path] = "out/demo", store_dir: Optional[Union[str, Path]] = None, *,
             prompts: Sequence[str] = DEMO_PROMPTS, limit: Optional[int] = None, seed: int = 42,
             model_dir: Optional[Union[str, Path]] = None, threshold: Optional[float] = None,
             budget_mb: Optional[float] = None, full_steps: Optional[int] = None, fast_steps: int = 8,
             scale: int = 8, fps: int = 8, progress: bool = True, echo: Callable[[str], None] = print) -> DemoReport:
    """Run the demo batch (see the module docstring) and write its outputs.

    Args:
        out_dir: output folder (created; the demo's own files from an earlier run are replaced).
        store_dir: CHAI store folder to create or reuse; None: a fresh store in a temporary folder,
            deleted at the end.
        prompts: the batch (default :data:`DEMO_PROMPTS`); each must be scorable by the evaluator
            (refmodel vocabulary). limit: only the first ``limit`` prompts.
        seed: prompt i uses noise seed ``seed + i`` in both of its runs.
        model_dir: reference-model folder (default the bundled ``models/reference_v1``).
        threshold: hit similarity (default: the lookup's calibrated 0.72).
        budget_mb: store budget in MiB (2^20 bytes; default: a new store's 1024, or the kept one).
        full_steps: steps of a miss and of the full-mode twins (default: the model's, 30).
        fast_steps: steps of a hit (default 8; Cache Attention at steps 2-4, or up to ``fast_steps``).
        scale: nearest-neighbour upscaling of the mp4 files (32 x 32 -> 256 x 256 at 8).
        fps: playback rate of the mp4 files (8 frames at 8 fps = 1 s per clip).
        progress: a tqdm bar per video (CHAI run + its full-mode twin) on stderr.
        echo: where the summary lines go (default ``print``).

    Returns:
        :class:`DemoReport`. Each row: ``index``, ``prompt``, ``seed``, ``hit``, ``mode``, ``steps``,
        ``entity``, ``matched``, ``similarity``, ``entry_id``, ``inserted_entry_id``,
        ``source_index`` (the batch prompt whose full run stored the served entry, if in this run),
        ``timings_ms`` (the latency split), ``score`` / ``scores`` (evaluator), ``video``, and
        ``full`` = {``steps``, ``timings_ms``, ``score``, ``scores``, ``video``}. Totals: see
        ``report.md``'s "Totals" (hit rate, mean latency, measured speed-up, quality difference,
        store behaviour).

    Raises:
        ValueError: an empty batch, a bad ``limit`` / ``scale`` / ``fps``, or a prompt the evaluator
            cannot read.
        refmodel.model.ModelFilesError: the reference model's files are missing or malformed.
        cache.store.StoreError: the store folder cannot be used.
    """
    from tqdm import tqdm

    from ..cache.embed import Embedder
    from ..cache.entities import EntityExtractor
    from ..cache.lookup import CacheLookup
    from ..cache.backend import mib_to_bytes, open_store, store_exists
    from ..pipeline import ChaiPipeline, write_video
    from ..refmodel import evaluator

    batch = list(prompts)
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        batch = batch[: int(limit)]
    if not batch:
        raise ValueError("the demo batch is empty")
    if int(scale) < 1 or int(fps) < 1:
        raise ValueError(f"scale and fps must be >= 1, got {scale} and {fps}")
    for p in batch:  # fail before any model work on a prompt that cannot be scored
        evaluator.parse_prompt(p)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clean_outputs(out)
    temp_dir = None
    if store_dir is None:
        temp_dir = tempfile.mkdtemp(prefix="chai-demo-store-")
        store_path = Path(temp_dir)
    else:
        store_path = Path(store_dir)
    fresh = not store_exists(store_path)
    try:
        t_load = time.perf_counter()
        store = open_store(store_path, budget_bytes=mib_to_bytes(budget_mb) if budget_mb else None)
        with store:
            # The model's own settings (its config.json), then the demo's: pipeline.settings.resolve_settings.
            pipe = ChaiPipeline.reference(CacheLookup(store, EntityExtractor(), Embedder()), model_dir=model_dir)
            pipe = pipe.with_settings({"threshold": threshold, "fast_steps": int(fast_steps),
                                       "full_steps": int(full_steps) if full_steps else None})
            # Load every lazy model and run the sampler once, so no timed request pays for loading.
            pipe.lookup.keys_for(batch[0])
            pipe.lookup.embedder.encode([batch[0]])
            pipe.generate(batch[0], seed=seed, mode="plain", store=False)
            load_s = time.perf_counter() - t_load
            height, width, frames = pipe.resolve_size(None, "", None, None, None)
            before = store.stats()
            run = {
                "model": "reference", "model_dir": str(model_dir) if model_dir else "models/reference_v1 (bundled)",
                "model_fingerprint": pipe.model_fingerprint.split("+")[0], "height": height, "width": width,
                "num_frames": frames, "device": str(pipe.device), "threads": torch.get_num_threads(),
                "config": pipe.config.tag(), "threshold": pipe.lookup.config.threshold,
                "full_steps": pipe.config.full_steps, "fast_steps": pipe.config.fast_steps,
                "store": str(store_path) if temp_dir is None else "a temporary folder (deleted after the run)",
                "fresh_store": fresh, "seed": int(seed), "load_s": round(load_s, 2),
                "compat_key": pipe.compat_key(height, width, frames),
                "video": {"scale": int(scale), "fps": int(fps), "size": [height * int(scale), width * int(scale)]},
            }
            rows: List[Dict[str, Any]] = []
            clips: Dict[int, Dict[str, torch.Tensor]] = {}
            echo(f"CHAI demo: {len(batch)} prompts on the reference model ({height}x{width}, {frames} frames), "
                 f"{'fresh store' if fresh else f'reusing {store_path} ({before.entries} entries)'}; "
                 f"each prompt runs with CHAI, then in full mode for comparison")
            for i, prompt in enumerate(batch):
                rows.append(_run_one(pipe, evaluator, write_video, tqdm, out, i, len(batch), prompt, seed + i,
                                     scale, fps, progress, clips))
            by_entry = {r["inserted_entry_id"]: r["index"] for r in rows if r["inserted_entry_id"] is not None}
            for r in rows:
                r["source_index"] = by_entry.get(r["entry_id"]) if r["hit"] else None
            after = store.stats()
        cache = {"entries": after.entries, "bytes": after.bytes, "budget_bytes": after.budget_bytes,
                 "policy": after.policy, "inserts": after.inserts - before.inserts,
                 "evictions": after.evictions - before.evictions}
        report = DemoReport(run=run, rows=rows, totals=_totals(rows, cache))
        report.files = {"videos": [r["video"] for r in rows], "full_videos": [r["full"]["video"] for r in rows],
                        "contact_sheet": None, "report_md": "report.md", "report_json": "report.json"}
        first_hit = next((r for r in rows if r["hit"]), None)
        if first_hit is not None:
            src = rows[first_hit["source_index"]] if first_hit["source_index"] is not None else None
            sheet_frames = dict(clips[first_hit["index"]])
            if src is not None:
                sheet_frames["source"] = clips[src["index"]]["chai"]
            write_contact_sheet(out / "contact_sheet.png", first_hit, sheet_frames, src)
            report.files["contact_sheet"] = "contact_sheet.png"
            report.totals["contact_sheet_prompt"] = first_hit["index"]
        report.markdown = format_report(report)
        (out / "report.md").write_text(report.markdown, encoding="utf-8")
        (out / "report.json").write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    _print_summary(report, out, store_dir, echo)
    return report


def _run_one(pipe, evaluator, write_video, tqdm, out: Path, i: int, n: int, prompt: str, seed: int, scale: int,
             fps: int, progress: bool, clips: Dict[int, Dict[str, torch.Tensor]]) -> Dict[str, Any]:
    """One prompt: CHAI run, then its full-mode twin; mp4s, scores, one progress bar."""
    full_steps = pipe.config.full_steps
    label = prompt if len(prompt) <= 38 else prompt[:35] + "..."
    bar = tqdm(total=None, desc=f"{i + 1:2d}/{n} {label:<38}", unit="step", disable=not progress, leave=True,
               bar_format="{desc} |{bar:20}| {n_fmt}/{total_fmt} steps{postfix}")
    done = {"chai": 0, "full": 0}

    def tick(phase: str):
        def fn(step: int, total: int) -> None:
            if bar.total is None:
                bar.total = total + full_steps  # the CHAI run's steps are known once its lookup is done
                bar.set_postfix_str("CHAI " + ("fast" if total != full_steps else "full"))
            bar.update(step - done[phase])
            done[phase] = step
        return fn

    try:
        chai = pipe.generate(prompt, seed=seed, mode="chai", progress=tick("chai"))
        bar.set_postfix_str(f"{'hit' if chai.hit else 'miss'}, full twin")
        full = pipe.generate(prompt, seed=seed, mode="full", progress=tick("full"))
        score = evaluator.evaluate(chai.frames.numpy(), prompt)
        full_score = evaluator.evaluate(full.frames.numpy(), prompt)
        name = f"{i:02d}_{_slug(prompt)}.mp4"
        write_video(upscale_frames(chai.frames_uint8(), scale), out / name, fps=fps)
        write_video(upscale_frames(full.frames_uint8(), scale), out / "full_mode" / name, fps=fps)
        match = f" '{chai.entity}'~'{chai.matched}' {chai.similarity:.2f}" if chai.hit else ""
        bar.set_postfix_str(f"{'HIT' if chai.hit else 'miss'}{match}: {chai.steps} steps "
                            f"{chai.timings.total_ms / 1000:.2f}s score {score.overall:.2f} | full "
                            f"{full.timings.total_ms / 1000:.2f}s score {full_score.overall:.2f}")
    finally:
        bar.close()
    clips[i] = {"chai": chai.frames, "full": full.frames}
    row = chai.summary()
    for key in ("height", "width", "num_frames", "compat_key", "latent_shape", "fused_entry_ids"):
        row.pop(key, None)
    row.update(index=i, score=round(score.overall, 4), scores={k: round(score.scores[k], 4) for k in _SCORE_KEYS},
               video=name)
    row["full"] = {"steps": full.steps, "timings_ms": {k: round(v, 3) for k, v in full.summary()["timings_ms"].items()},
                   "score": round(full_score.overall, 4),
                   "scores": {k: round(full_score.scores[k], 4) for k in _SCORE_KEYS}, "video": f"full_mode/{name}"}
    return row


def _print_summary(report: DemoReport, out: Path, store_dir, echo: Callable[[str], None]) -> None:
    t = report.totals
    echo("")
    echo(f"hit rate        {100 * t['hit_rate']:.0f}% ({t['hits']} of {t['prompts']})")
    echo(f"mean latency    CHAI {t['mean_latency_ms'] / 1000:.2f} s, all-full {t['mean_full_latency_ms'] / 1000:.2f} s "
         f"per video")
    if t["speedup_vs_all_full"] is not None:
        echo(f"speed-up        {t['speedup_vs_all_full']:.2f}x against running every prompt in full mode (measured)")
    echo(f"quality         mean score CHAI {t['mean_score_chai']:.3f} vs all-full {t['mean_score_all_full']:.3f} "
         f"({t['quality_difference']:+.3f})")
    echo(f"store           {t['cache']['entries']} entries, {t['cache']['bytes'] / 2**20:.1f} MiB; "
         f"{t['cache']['inserts']} inserted this run")
    echo(f"wrote           {len(report.rows)} mp4 files (+ full_mode/), "
         f"{'contact_sheet.png, ' if report.files.get('contact_sheet') else ''}report.md, report.json in {out}")
    if store_dir is None:
        echo("next            the store was temporary; keep one with --store DIR and run the same command twice: "
             "the second run finds the first run's entries (higher hit rate)")
    else:
        echo(f"next            run the same command again: the store in {store_dir} persists, so the next run "
             f"hits more")
