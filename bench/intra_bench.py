"""Intra-request caching (MixCache, the TeaCache baseline) measured on the reference model, in one command.

Parts (``python bench/intra_bench.py <part> ...``; ``all`` runs validate, heldout, stream and vbench in order
and writes everything under ``--out``):

* ``validate``: on the **validation** prompt stream (never the held-out one), a grid of MixCache knob sets
  and TeaCache thresholds side by side with full30 and plain<k> (the quality harness,
  ``pipeline/quality.py``). Picks (:func:`choose`) the MixCache knobs (the fastest set, in equivalent
  steps, whose overall score stays within ``--margin`` of full30), the TeaCache threshold at the same
  speed (equivalent steps closest to MixCache's) and k of plain<k> at the same compute; then, with those
  knobs, chai8 against chai8+mixcache on CHAI hits: MixCache stays on in short schedules
  (``min_steps`` 1) only if it keeps the hits' overall within ``--margin`` of chai8. Writes
  ``validation.json`` and ``validation.png`` (score against equivalent steps).
* ``heldout``: on the **held-out** stream, one run side by side: full30, ``mixcache`` (the shipped
  defaults), ``teacache`` at the threshold validation matched, ``plain<k>`` at the same compute, and
  chai8 against chai8+mixcache (CHAI hits); every evaluator criterion, latency, speed-up, equivalent
  steps. Reads ``validation.json`` (or ``--teacache`` and ``--plain-steps``).
* ``stream``: the held-out mixed stream of scene captions (``refmodel.streams.mixed_stream``:
  near-duplicates, entity-sharing and unrelated prompts) in request order through the real lookup
  (``pipeline.stream.run_stream``: one fresh store per mode, request by request every mode in turn), each
  store's budget ``--budget-share`` (10%) of what keeping every request's entry of that mode would take:
  all full, CHAI alone, CHAI + MixCache, ``auto`` reuse (Chorus, else CHAI, else full) + MixCache. Hit
  rate, steps computed, speed-up and overall against all-full, and by kind of request.
* ``vbench``: the VBench prompts in order (``--limit N``: the first N), same modes and budget rule: hit
  rate and speed alone (the reference model cannot draw them).

The timing of the denoising loop alone (:func:`timing_runs`: plain, MixCache at its defaults, MixCache computing
every step, i.e. its decision overhead, TeaCache, each granularity forced) runs in ``bench/gpu_session.py``:
STDiT3-XL/2 at 240p, 51 frames, bf16 on a GPU, or the small configuration on the CPU (``--smoke``).

Usage::

    python bench/intra_bench.py all --out bench/out/intra                # about 2 h on 2 idle CPU cores
    python bench/intra_bench.py validate --prompts 24 --out bench/out/intra
    python bench/intra_bench.py heldout --prompts 200 --out bench/out/intra
    python bench/intra_bench.py stream --prompts 200 --out bench/out/intra
    python bench/intra_bench.py vbench --limit 300 --out bench/out/intra

Speed-ups are ratios of latencies measured in the same run; equivalent steps (steps run x the share of
block work run) are the deterministic measure of compute that selection uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

#: MixCache knob sets of the validation grid: these thresholds scaled by one factor, times the reuse cap
#: and the warm-up.
GRID_THRESHOLDS = {"trigger_threshold": 0.2, "step_threshold": 0.1, "block_threshold": 0.1, "cfg_threshold": 0.05}
THRESHOLD_SCALES = (0.5, 1.0, 2.0, 4.0)
REUSE_CAPS = (2, 4)
WARMUPS = (3,)
TEACACHE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
PLAIN_STEPS = (8, 12, 16)


def _progress():
    from tqdm import tqdm

    bars: Dict[str, Any] = {}

    def progress(phase, done, total):
        if phase not in bars:
            bars[phase] = tqdm(total=total, desc=phase, file=sys.stderr, mininterval=5.0)
        bars[phase].update(done - bars[phase].n)
        if done == total:
            bars.pop(phase).close()

    return progress


def _spec(name: str, knobs: Dict[str, Any]) -> str:
    """A harness spec with settings, e.g. ``mixcache@step_threshold=0.2@max_reuse=3``."""
    return name + "".join(f"@{k}={v}" for k, v in knobs.items())


def mixcache_grid() -> List[Dict[str, Any]]:
    """The validation grid of MixCache knob sets (GRID_THRESHOLDS x THRESHOLD_SCALES, REUSE_CAPS, WARMUPS)."""
    return [{"warmup_steps": warmup, "max_reuse": cap,
             **{name: round(value * scale, 4) for name, value in GRID_THRESHOLDS.items()}}
            for scale in THRESHOLD_SCALES for cap in REUSE_CAPS for warmup in WARMUPS]


def _load(args):
    from comfyui_chai.refmodel.model import load_reference_model

    torch.set_num_threads(args.threads)
    return load_reference_model(args.model_dir, device=args.device)


def _summary_rows(summary: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [{"spec": name, **m} for name, m in summary["modes"].items()]


def choose(summary: Dict[str, Any], margin: float) -> Dict[str, Any]:
    """The selection rule, on a validation summary (``QualityReport.summary()``).

    MixCache: the knob set with the fewest equivalent steps whose overall score is at least full30's minus
    ``margin`` (ties: the higher score). TeaCache: the threshold whose equivalent steps are closest to that
    set's (equal speed; ties: the faster). plain<k>: k = MixCache's equivalent steps, rounded.
    """
    rows = _summary_rows(summary)
    mix = [r for r in rows if r["spec"].startswith("mixcache")]
    tea = [r for r in rows if r["spec"].startswith("teacache")]
    ok = [r for r in mix if r["delta_overall_vs_full"] >= -margin] or mix
    best = min(ok, key=lambda r: (r["equivalent_steps"], -r["overall"]))
    tea_pick = min(tea, key=lambda r: (abs(r["equivalent_steps"] - best["equivalent_steps"]), r["equivalent_steps"]))
    from comfyui_chai.pipeline.modes import parse_mode_spec

    return {"margin": margin, "mixcache": dict(parse_mode_spec(best["spec"]).settings),
            "mixcache_spec": best["spec"], "mixcache_row": best,
            "teacache_threshold": dict(parse_mode_spec(tea_pick["spec"]).settings)["teacache_threshold"],
            "teacache_row": tea_pick, "plain_steps": max(1, int(round(best["equivalent_steps"])))}


def validate(args) -> Dict[str, Any]:
    from comfyui_chai.pipeline.quality import format_table, run_quality
    from comfyui_chai.refmodel.quality import VALIDATION_SEED, heldout_prompts

    model, encoder = _load(args)
    items = heldout_prompts(args.prompts, seed=VALIDATION_SEED)
    modes = ["full30", *(f"plain{k}" for k in PLAIN_STEPS), *(_spec("mixcache", g) for g in mixcache_grid()),
             *(_spec("teacache", {"teacache_threshold": t}) for t in TEACACHE_THRESHOLDS)]
    t0 = time.perf_counter()
    report = run_quality(model, encoder, items, lookup=False, modes=modes, progress=_progress())
    summary = report.summary()
    picked = choose(summary, args.margin)
    # Short schedules: chai8 against chai8 + MixCache with the chosen knobs (every short schedule cached).
    knobs = {**picked["mixcache"], "min_steps": 1}
    hits = run_quality(model, encoder, items, lookup=False, modes=["full30", "chai8", _spec("chai8+mixcache", knobs)],
                       progress=_progress())
    hit_rows = {r["spec"]: r for r in _summary_rows(hits.summary())}
    chai, cached = hit_rows["chai8"], hit_rows[_spec("chai8+mixcache", knobs)]
    pays = cached["overall"] >= chai["overall"] - args.margin and cached["equivalent_steps"] < chai["equivalent_steps"]
    picked["min_steps"] = 1 if pays else 9
    picked["short_schedule"] = {"chai8": chai, "chai8+mixcache": cached, "pays": pays}
    out = {"stream": "validation", "stream_seed": VALIDATION_SEED, "prompts": len(items),
           "model": getattr(model, "fingerprint", None), "wall_s": round(time.perf_counter() - t0, 1),
           "summary": summary, "short_schedule_summary": hits.summary(), "chosen": picked}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validation.json").write_text(json.dumps(out, indent=2) + "\n")
    _plot_tradeoff(summary, args.out / "validation.png", f"validation stream, {len(items)} prompts")
    print(format_table(report))
    print()
    print(format_table(hits))
    print(f"\nchosen on validation (margin {args.margin}): mixcache {picked['mixcache']}, min_steps {picked['min_steps']} "
          f"({picked['mixcache_row']['equivalent_steps']} equivalent steps, overall "
          f"{picked['mixcache_row']['delta_overall_vs_full']:+.3f}); teacache threshold {picked['teacache_threshold']} "
          f"({picked['teacache_row']['equivalent_steps']} equivalent steps); plain{picked['plain_steps']}")
    print(f"wrote {args.out / 'validation.json'}, {args.out / 'validation.png'}")
    return out


def heldout(args, chosen: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from comfyui_chai.pipeline.quality import format_table, run_quality
    from comfyui_chai.pipeline.settings import MixCacheSettings
    from comfyui_chai.refmodel.quality import HELDOUT_SEED, heldout_prompts

    if chosen is None and (args.out / "validation.json").is_file():
        chosen = json.loads((args.out / "validation.json").read_text())["chosen"]
    threshold = args.teacache if args.teacache is not None else (chosen or {}).get("teacache_threshold")
    plain = args.plain_steps if args.plain_steps is not None else (chosen or {}).get("plain_steps")
    if threshold is None or plain is None:
        raise SystemExit("heldout needs validation.json in --out (run 'validate' first) or --teacache and --plain-steps")
    shipped = MixCacheSettings().to_dict()
    wanted = {**chosen["mixcache"], "min_steps": chosen.get("min_steps", shipped["min_steps"])} if chosen else {}
    if any(shipped[k] != v for k, v in wanted.items()):
        print(f"note: the shipped MixCache defaults differ from validation's choice {wanted}; "
              "held-out measures the shipped defaults", file=sys.stderr)
    model, encoder = _load(args)
    items = heldout_prompts(args.prompts, seed=HELDOUT_SEED)
    modes = ["full30", "mixcache", _spec("teacache", {"teacache_threshold": threshold}), f"plain{plain}", "chai8",
             "chai8+mixcache"]
    t0 = time.perf_counter()
    report = run_quality(model, encoder, items, lookup=False, modes=modes, progress=_progress())
    summary = report.summary()
    out = {"stream": "held-out", "stream_seed": HELDOUT_SEED, "prompts": len(items),
           "model": getattr(model, "fingerprint", None), "wall_s": round(time.perf_counter() - t0, 1),
           "mixcache_settings": shipped, "teacache_threshold": threshold, "plain_steps": plain, "summary": summary,
           "maps": {name: [m.get("mixcache") or m.get("teacache") for m in r.hook_maps][:10]
                    for name, r in report.modes.items() if any(r.hook_maps)}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout.json").write_text(json.dumps(out, indent=2) + "\n")
    print(format_table(report))
    print(f"\nheld-out, {len(items)} prompts, device {report.device}, wall {out['wall_s'] / 60:.1f} min; "
          f"wrote {args.out / 'heldout.json'}")
    return out


def _plot_tradeoff(summary: Dict[str, Any], path: Path, title: str) -> None:
    """Overall score against equivalent steps: MixCache sets, TeaCache thresholds, plain<k>, full30."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    groups = {"mixcache": ("tab:red", "MixCache knob sets"), "teacache": ("tab:blue", "TeaCache thresholds"),
              "plain": ("tab:gray", "plain k steps"), "full": ("black", "full30")}
    for prefix, (colour, label) in groups.items():
        rows = [r for r in _summary_rows(summary) if r["spec"].startswith(prefix)]
        if rows:
            ax.scatter([r["equivalent_steps"] for r in rows], [r["overall"] for r in rows], color=colour,
                       label=label, s=18)
    ax.set_xlabel("equivalent steps (steps x share of block work run)")
    ax.set_ylabel("evaluator overall score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------ streams


def stream_modes() -> List[str]:
    """The reuse modes of the stream measurements (all-full runs besides them): CHAI alone, CHAI + MixCache,
    and ``auto`` reuse (Chorus, else CHAI, else full) + MixCache."""
    return ["chai", "chai+mixcache", "auto+mixcache"]


def stream_budgets(model, encoder, modes: Sequence[str], n: int, share: float) -> Dict[str, int]:
    """Each mode's store budget: ``share`` x ``n`` x the bytes one of its misses stores
    (``pipeline.stream.miss_entry_bytes``, at the harness settings)."""
    from comfyui_chai.pipeline import ChaiPipeline, parse_mode_spec
    from comfyui_chai.pipeline.quality import HARNESS_SETTINGS
    from comfyui_chai.pipeline.stream import miss_entry_bytes

    pipe = ChaiPipeline.from_reference_model(model, encoder).with_settings(HARNESS_SETTINGS)
    return {mode: max(1, int(share * n * miss_entry_bytes(pipe, parse_mode_spec(mode).mode))) for mode in modes}


def kinds_table(report) -> str:
    """Per mode and kind of request (near-duplicate, sharing an entity, unrelated): hit rate / Δ overall."""
    from comfyui_chai.refmodel.streams import NEAR_KINDS

    groups = {"near-duplicate": set(NEAR_KINDS), "shares an entity": {"share"}, "unrelated": {"new"}}
    full = report.runs["full"]
    lines = ["| mode | " + " | ".join(f"{g}: hit rate / Δ overall" for g in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for name, run in report.runs.items():
        cells = []
        for kinds in groups.values():
            idx = [i for i, k in enumerate(report.kinds) if k in kinds]
            if not idx:
                cells.append("")
                continue
            delta = np.mean([run.scores[i]["overall"] - full.scores[i]["overall"] for i in idx])
            cells.append(f"{100 * np.mean([run.hit[i] for i in idx]):.0f}% / {delta:+.3f} ({len(idx)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stream_out(args, name: str, report, extra: Dict[str, Any], tables: List[str], t0: float) -> Dict[str, Any]:
    out = {**extra, "budget_share": args.budget_share, "model_dir": str(args.model_dir or "bundled"),
           "wall_s": round(time.perf_counter() - t0, 1), "summary": report.summary(), "tables": tables}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print("\n\n".join(tables))
    return out


def stream(args) -> Dict[str, Any]:
    from comfyui_chai.pipeline.stream import format_stream_table, run_stream
    from comfyui_chai.refmodel.streams import HELDOUT_STREAM_SEED, mixed_stream

    model, encoder = _load(args)
    items = mixed_stream(args.prompts, seed=HELDOUT_STREAM_SEED)
    modes = stream_modes()
    t0 = time.perf_counter()
    budgets = stream_budgets(model, encoder, modes, len(items), args.budget_share)
    report = run_stream(model, encoder, items, modes=modes, budget_bytes=budgets, seed=args.seed,
                        progress=_progress())
    out = _stream_out(args, "stream", report, {"stream": "held-out mixed scene captions",
                                               "stream_seed": HELDOUT_STREAM_SEED, "prompts": len(items)},
                      [format_stream_table(report), kinds_table(report)], t0)
    print(f"\nmixed stream, {len(items)} prompts ({out['summary']['kinds']}), budget {100 * args.budget_share:.0f}% "
          f"of each mode's entries; wall {out['wall_s'] / 60:.1f} min; wrote {args.out / 'stream.json'}")
    return out


def vbench(args) -> Dict[str, Any]:
    from comfyui_chai.cache.simulate import read_prompts
    from comfyui_chai.pipeline.stream import format_stream_table, run_prompts

    model, encoder = _load(args)
    prompts = read_prompts(REPO / "data" / "vbench" / "all_dimension.txt")
    if args.limit:
        prompts = prompts[: args.limit]
    modes = stream_modes()
    t0 = time.perf_counter()
    budgets = stream_budgets(model, encoder, modes, len(prompts), args.budget_share)
    report = run_prompts(model, encoder, prompts, modes=modes, score=False, budget_bytes=budgets, seed=args.seed,
                         progress=_progress())
    out = _stream_out(args, "vbench", report, {"stream": "VBench in order (hit rate and speed only)",
                                               "prompts": len(prompts)}, [format_stream_table(report)], t0)
    print(f"\nVBench, {len(prompts)} prompts in order, budget {100 * args.budget_share:.0f}% of each mode's entries; "
          f"wall {out['wall_s'] / 60:.1f} min; wrote {args.out / 'vbench.json'}")
    return out


# ------------------------------------------------------------------------------------ timing


#: The denoising-loop runs of the timing table, in the order they run (and are dropped from the end when a
#: time budget is short: ``timing_runs(names=...)``).
TIMING_RUNS = ("plain", "mixcache (defaults)", "mixcache, every step computed", "teacache (defaults)",
               "forced step reuse", "forced block reuse", "forced CFG reuse")


def timing_runs(model, sample, *, steps: int, repeats: int, sync, names: Sequence[str] = TIMING_RUNS,
                on_run=None) -> Dict[str, Any]:
    """Time the denoising loop: plain, MixCache (defaults), TeaCache (balanced), each granularity forced,
    and MixCache computing every step (the decision rule's overhead). ``sample(hook_or_None)`` runs one
    loop; ``names``: which of :data:`TIMING_RUNS` to run (``"plain"`` always runs first: the speed-ups are
    against it); ``on_run(name, row)`` after each. Returns per run the median ms, ms per step, the step map,
    the decision ms per step and the speed-up against plain."""
    from comfyui_chai.opensora.hooks import HookRegistry
    from comfyui_chai.opensora.mixcache import MixCache, MixCacheConfig, TeaCache

    forced = dict(trigger_threshold=1e5, step_threshold=1e5, block_threshold=1e5, cfg_threshold=1e5,
                  warmup_steps=2, max_reuse=steps, min_steps=1)
    makers = {
        "plain": None,
        "mixcache (defaults)": lambda: MixCache(model, MixCacheConfig(), cfg_scale=7.0, measure=True),
        "mixcache, every step computed": lambda: MixCache(model, MixCacheConfig(warmup_steps=steps), cfg_scale=7.0,
                                                          measure=True),
        "teacache (defaults)": lambda: TeaCache(model, MixCacheConfig(), cfg_scale=7.0, measure=True),
        "forced step reuse": lambda: MixCache(model, MixCacheConfig(**forced, granularities=("step",)),
                                              cfg_scale=7.0, measure=True),
        "forced block reuse": lambda: MixCache(model, MixCacheConfig(**forced, granularities=("block",)),
                                               cfg_scale=7.0, measure=True),
        "forced CFG reuse": lambda: MixCache(model, MixCacheConfig(**forced, granularities=("cfg",)),
                                             cfg_scale=7.0, measure=True),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"unknown timing run(s) {unknown}; choose among {', '.join(TIMING_RUNS)}")
    out: Dict[str, Any] = {}
    for name in ["plain", *(n for n in TIMING_RUNS if n in names and n != "plain")]:
        make = makers[name]
        times, report = [], None
        for r in range(repeats + 1):  # the first run warms up kernels and caches
            hook = make() if make else None
            sync()
            t0 = time.perf_counter()
            if hook is None:
                sample(None)
            else:
                with HookRegistry.of(model).attached(hook):
                    sample(hook)
            sync()
            if r:
                times.append((time.perf_counter() - t0) * 1000.0)
            report = hook.report() if hook is not None else None
        ms = float(np.median(times))
        out[name] = {"ms": round(ms, 2), "ms_per_step": round(ms / steps, 3),
                     "map": report["map"] if report else "F" * steps,
                     "decision_ms_per_step": round(report["decision_ms"] / steps, 3) if report else 0.0,
                     "work_share": report["work_share"] if report else 1.0,
                     "speedup_vs_plain": round(out["plain"]["ms"] / ms, 3) if out else 1.0}
        if on_run is not None:
            on_run(name, out[name])
    return out


def timing_table(runs: Dict[str, Any]) -> str:
    """Markdown table of :func:`timing_runs`' result."""
    lines = ["| run | ms | ms / step | speed-up vs plain | decision ms / step | block work | step map |",
             "|---|---|---|---|---|---|---|"]
    for run, r in runs.items():
        lines.append(f"| {run} | {r['ms']:.1f} | {r['ms_per_step']:.2f} | {r['speedup_vs_plain']:.2f}x | "
                     f"{r['decision_ms_per_step']:.3f} | {100 * r['work_share']:.0f}% | {r['map']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["all", "validate", "heldout", "stream", "vbench"])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "intra", help="output folder")
    p.add_argument("--prompts", type=int, default=None,
                   help="prompts (validate 24, heldout 200, stream 200 by default)")
    p.add_argument("--margin", type=float, default=0.01,
                   help="validation: largest overall drop vs full30 a chosen MixCache set may have (0.01)")
    p.add_argument("--teacache", type=float, default=None, help="heldout: TeaCache threshold (default: validation's)")
    p.add_argument("--plain-steps", type=int, default=None, help="heldout: k of plain<k> (default: validation's)")
    p.add_argument("--budget-share", type=float, default=0.1, help="stream/vbench: store budget share (0.1)")
    p.add_argument("--limit", type=int, default=None, help="vbench: only the first N prompts")
    p.add_argument("--seed", type=int, default=0, help="stream/vbench: noise seed of request i is seed + i")
    p.add_argument("--model-dir", type=Path, default=None, help="reference model folder (default: the bundled one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.prompts is not None and a.prompts < 1:
        p.error("--prompts must be >= 1")
    parts = ["validate", "heldout", "stream", "vbench"] if a.part == "all" else [a.part]
    chosen = None
    for part in parts:
        if part == "validate":
            chosen = validate(argparse.Namespace(**{**vars(a), "prompts": a.prompts or 24}))["chosen"]
        elif part == "heldout":
            heldout(argparse.Namespace(**{**vars(a), "prompts": a.prompts or 200}), chosen)
        elif part == "stream":
            stream(argparse.Namespace(**{**vars(a), "prompts": a.prompts or 200}))
        else:
            vbench(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
