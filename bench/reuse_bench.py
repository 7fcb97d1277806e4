"""Cross-request reuse on the reference model, side by side in one run: CHAI, Chorus and auto against full.

One command reruns every measurement of issue 18 (``python bench/reuse_bench.py``; ``--model-dir`` picks
the yardstick, e.g. ``models/reference_v2``):

* ``near``: prompts that have a near-duplicate among the warm prompts (``refmodel.streams``: the same
  scene in other words, or one scored attribute changed). Every test prompt runs ``full30``, ``chai8``,
  ``chorus``, its ablation (``chorus-stage1``: stage 1 then plain; ``chorus-stage2``: + Selective Region
  Denoising without amplification; ``chorus`` = + TGAA), ``auto``, and plain sampling at Chorus's cost
  (``plain<k>``: k = Chorus's mean model steps; and k from its mean latency when that differs), each from
  the same noise, through the quality harness (``pipeline/quality.py``, real lookup).
* ``stream``: a mixed stream of scene captions in order (near-duplicates, entity-sharing and unrelated
  requests, ``refmodel.streams.mixed_stream``), one fresh store per mode (``pipeline/stream.py``): hit
  rate by mode (and what ``auto`` picked), mean speed-up against all-full and quality against all-full,
  measured in the same run.
* ``vbench`` (``--vbench N``): the first N VBench prompts in order with each store's budget 10 % of what
  keeping every prompt's entry of that mode would take: hit rate and speed only (the evaluator cannot read
  VBench prompts).

The GPU timing of a Chorus hit against full (STDiT3-XL/2, random weights, 240p, 51 frames) is part of
``bench/gpu_session.py``.

Settings are chosen on the validation streams only (``--validation``: the validation prompt stream and the
validation mixed stream); the default reports the held-out ones. ``--set KEY=VALUE`` overrides a setting
(e.g. ``--set chorus_threshold=0.8``); ``--variant NAME:KEY=VALUE,...`` adds a Chorus variant to the
``near`` table (a sweep on the validation stream).

Writes ``<out>/reuse_bench.json`` and ``<out>/reuse_bench.md`` and prints the tables.

Usage::

    python bench/reuse_bench.py --prompts 40 --stream 60 --out bench/out/reuse          # held-out
    python bench/reuse_bench.py --validation --prompts 24 --stream 0 --variant t9:chorus_threshold=0.9
    python bench/reuse_bench.py --model-dir models/reference_v2 --prompts 40 --stream 60 --vbench 300
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ABLATION = {"chorus-stage1": {"chorus_stage2": False}, "chorus-stage2": {"chorus_tgaa": 1.0}}


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_settings(items: List[str]) -> Dict[str, Any]:
    """``["chorus_threshold=0.8", "chorus_k1=(0.1, 0.3)"]`` -> {name: value} (Python literals)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(value.strip())
    return out


def parse_variant(text: str):
    """``NAME:KEY=VALUE,KEY=VALUE`` -> (name, settings); values are Python literals (tuples in parentheses)."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise ValueError(f"--variant takes NAME:KEY=VALUE,..., got {text!r}")
    settings, depth, part = {}, 0, ""
    for ch in rest + ",":
        if ch == "," and depth == 0:
            if part.strip():
                settings.update(parse_settings([part.strip()]))
            part = ""
            continue
        depth += ch in "([" and 1 or (-1 if ch in ")]" else 0)
        part += ch
    return name, settings


def progress_bars():
    from tqdm import tqdm

    bars = {}

    def progress(phase, done, total):
        if phase not in bars:
            bars[phase] = tqdm(total=total, desc=phase, file=sys.stderr, mininterval=10.0)
        bars[phase].update(done - bars[phase].n)

    return progress, bars


# ---------------------------------------------------------------------------------------- near-duplicates


def near_table(model, encoder, items, settings, variants, progress) -> Dict[str, Any]:
    """The near-duplicate table: full30, chai8, chorus (+ablation, +variants), auto, plain at Chorus's cost."""
    from comfyui_chai.pipeline.modes import parse_mode_spec
    from comfyui_chai.pipeline.quality import format_table, run_quality

    chorus = parse_mode_spec("chorus")
    specs = ["chai8", chorus, *(chorus.variant(n, **s) for n, s in ABLATION.items()),
             *(chorus.variant(n, **s) for n, s in variants), "auto"]
    with tempfile.TemporaryDirectory(prefix="reuse-bench-store-") as store_dir:
        rep = run_quality(model, encoder, items, modes=specs, store_dir=store_dir, warm="near", settings=settings,
                          progress=progress)
    summary = rep.summary()
    hits = [d for d in rep.modes["chorus"].details if d]  # a miss has no details
    full_ms = rep.modes["full30"].mean_latency_ms
    steps_k = max(1, round(float(np.mean(rep.modes["chorus"].steps_run))))
    cost_k = max(1, round(30 * rep.modes["chorus"].mean_latency_ms / full_ms))
    plain_specs = sorted({f"plain{steps_k}", f"plain{cost_k}"})
    plain = run_quality(model, encoder, items, lookup=False, modes=plain_specs, settings=settings)
    summary["plain_at_chorus_cost"] = plain.summary()["modes"]
    kinds = rep.shared_entities
    per_kind = {}
    for name in ("chai8", "chorus", "auto"):
        m = rep.modes[name]
        full = rep.modes["full30"]
        per_kind[name] = {}
        for kind in dict.fromkeys(kinds):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            per_kind[name][kind] = {
                "n": len(idx), "hits": sum(1 for i in idx if m.served[i] != "full"),
                "delta_overall": round(float(np.mean([m.scores[i]["overall"] - full.scores[i]["overall"] for i in idx])), 4),
                "speedup": round(float(np.mean([full.latency_ms[i] for i in idx]) / np.mean([m.latency_ms[i] for i in idx])), 3)}
    summary["per_kind"] = per_kind
    summary["chorus_hits"] = {"k1_mean": float(np.mean([d["k1"] for d in hits])) if hits else None,
                              "k2_mean": float(np.mean([d["k2"] for d in hits])) if hits else None,
                              "region_mean": float(np.mean([d["region"] for d in hits])) if hits else None,
                              "step_equivalents_mean": float(np.mean([d["step_equivalents"] for d in hits])) if hits else None}
    summary["plain_at_chorus_cost_specs"] = {"by_model_steps": f"plain{steps_k}", "by_latency": f"plain{cost_k}"}
    return {"summary": summary, "table": format_table(rep), "plain_table": format_table(plain)}

def kind_table(per_kind: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """Markdown: per near-duplicate kind, hits / n, Δ overall and speed-up of each reuse mode."""
    kinds = list(next(iter(per_kind.values())))
    lines = ["| mode | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, row in per_kind.items():
        cells = [f"{row[k]['hits']}/{row[k]['n']} hit, {row[k]['delta_overall']:+.3f}, {row[k]['speedup']:.2f}x"
                 for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=40, help="test prompts of the near-duplicate table (0: skip it)")
    p.add_argument("--stream", type=int, default=60, help="requests of the mixed stream (0: skip it)")
    p.add_argument("--vbench", type=int, default=0, help="first N VBench prompts in order, 10%% budget (0: skip)")
    p.add_argument("--stream-modes", default="chai,chorus,auto",
                   help="reuse modes of the stream and VBench runs (default chai,chorus,auto; full always runs)")
    p.add_argument("--validation", action="store_true", help="the validation streams (choose settings here)")
    p.add_argument("--model-dir", type=Path, default=None, help="reference model folder (default models/reference_v1)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="setting override for every request (repeatable), e.g. chorus_threshold=0.8")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="an extra Chorus variant in the near-duplicate table (a sweep; use with --validation)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "reuse", help="output folder")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    try:
        a.stream_modes = tuple(m.strip() for m in a.stream_modes.split(",") if m.strip())
        a.settings = parse_settings(a.sets)
        variants = [parse_variant(v) for v in a.variant]
        from comfyui_chai.pipeline.settings import resolve_settings

        resolve_settings(None, a.settings, *(s for _n, s in variants))
    except ValueError as exc:
        p.error(str(exc))
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: Dict[str, Any] = {"settings": a.settings, "validation": a.validation}
    md: List[str] = []

    from comfyui_chai.refmodel.model import load_reference_model
    from comfyui_chai.refmodel.quality import HELDOUT_SEED, VALIDATION_SEED, heldout_prompts
    from comfyui_chai.refmodel.streams import HELDOUT_STREAM_SEED, VALIDATION_STREAM_SEED, mixed_stream

    model, encoder = load_reference_model(a.model_dir, device=a.device)
    result["model"] = getattr(model, "fingerprint", None)
    progress, bars = progress_bars()
    if a.prompts:
        items = heldout_prompts(a.prompts, seed=VALIDATION_SEED if a.validation else HELDOUT_SEED)
        near = near_table(model, encoder, items, a.settings, variants, progress)
        result["near"] = near["summary"]
        md += [f"## Near-duplicates: {a.prompts} {'validation' if a.validation else 'held-out'} prompts", "",
               near["table"], "", "Plain sampling at Chorus's cost (a second run: same prompts and noise, its own "
               "full30):", "", near["plain_table"], "", "Per near-duplicate kind (hits/n, Δ overall vs full30, "
               "speed-up):", "", kind_table(near["summary"]["per_kind"]), ""]
    if a.stream:
        from comfyui_chai.pipeline.stream import format_kind_table, format_stream_table, run_stream

        stream = mixed_stream(a.stream, VALIDATION_STREAM_SEED if a.validation else HELDOUT_STREAM_SEED)
        rep = run_stream(model, encoder, stream, modes=a.stream_modes, settings=a.settings, progress=progress)
        result["stream"] = rep.summary()
        md += [f"## Mixed stream: {a.stream} {'validation' if a.validation else 'held-out'} requests "
               f"({result['stream']['kinds']})", "", format_stream_table(rep), "",
               "By kind of request (hits/n, what served them when not the mode itself, Δ overall vs all-full):", "",
               format_kind_table(rep), ""]
    if a.vbench:
        md += vbench(a, model, encoder, result, progress)
    for b in bars.values():
        b.close()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (a.out / "reuse_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / "reuse_bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wall {result['wall_s'] / 60:.1f} min; wrote {a.out / 'reuse_bench.json'} and {a.out / 'reuse_bench.md'}")
    return 0


def vbench(a, model, encoder, result, progress) -> List[str]:
    """VBench prompts in order, each mode's store at 10 % of the bytes all its entries would take."""
    from comfyui_chai.cache.simulate import read_prompts
    from comfyui_chai.pipeline import ChaiPipeline
    from comfyui_chai.pipeline.quality import HARNESS_SETTINGS
    from comfyui_chai.pipeline.stream import format_stream_table, miss_entry_bytes, run_prompts

    prompts = read_prompts(REPO / "data" / "vbench" / "all_dimension.txt")[: a.vbench]
    pipe = ChaiPipeline.from_reference_model(model, encoder).with_settings(HARNESS_SETTINGS, a.settings)
    per_entry = {mode: miss_entry_bytes(pipe, mode) for mode in a.stream_modes}
    budgets = {mode: int(0.10 * len(prompts) * entry) for mode, entry in per_entry.items()}
    rep = run_prompts(model, encoder, prompts, modes=tuple(per_entry), score=False, budget_bytes=budgets,
                      settings=a.settings, progress=progress)
    result["vbench"] = {**rep.summary(), "entry_bytes": per_entry}
    sizes = ", ".join(f"{m} {budgets[m] / 2 ** 20:.2f} MiB ({per_entry[m]:,} bytes an entry)" for m in per_entry)
    return [f"## VBench, first {len(prompts)} prompts in order; budgets 10% of every prompt's entries: {sizes}", "",
            format_stream_table(rep), ""]

if __name__ == "__main__":
    raise SystemExit(main())
