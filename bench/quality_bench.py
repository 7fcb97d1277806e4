"""Quality against latency of every sampling mode on the reference model, side by side in one run.

For N prompts of a held-out stream (``--seed``, default the documented one; ``--validation`` scores the
separate validation stream, where settings are chosen) it runs every mode of ``--modes`` from the same
initial noise per prompt, each prompt as one request through the pipeline (``pipeline/quality.py``).
Modes are parsed, not listed: ``full<k>`` (k RFLOW steps, no cache), ``plain<k>`` (k steps, no cache),
``chai<k>`` (a hit: k steps with Cache Attention on the cached latents of another prompt that shares
one entity, found by the real entity lookup over a store warmed with those prompts' full runs), and any
mode or model hook a later method registers (``<mode>[k][+<hook>...]``, e.g. ``chai8+mixcache``).
``full30`` always runs: it is the reference. Each clip is scored by ``refmodel/evaluator.py`` against its
prompt; every criterion the evaluator returns is reported.

Prints a markdown table (every criterion's mean, overall with its standard error, PSNR / SSIM against the
full run from the same noise, the Frechet distance to the ground-truth renders, mean request latency,
speed-up and the overall delta vs full with its paired standard error) and writes ``<out>/quality_bench.json`` and ``<out>/quality_bench.png`` (score against latency
per mode) plus a strip of sample clips ``<out>/quality_samples.png``.

Usage::

    python bench/quality_bench.py --threads 2         # 200 prompts, real lookup (~10 min on a 2-core CPU)
    python bench/quality_bench.py --modes full30,plain8,chai8,plain4,chai4 --prompts 40 --seed 7000001 --out out/q
    python bench/quality_bench.py --prompts 20 --no-lookup
    python bench/quality_bench.py --model-dir models/reference_v1 --cfg 5 --device cuda
    python bench/quality_bench.py --validation --prompts 40 --modes full30 --cfg 4   # choose CFG here
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from comfyui_chai.cache.lookup import LookupConfig
from comfyui_chai.pipeline.modes import parse_mode_spec
from comfyui_chai.pipeline.quality import DEFAULT_MODES, format_table, run_quality
from comfyui_chai.refmodel.model import load_reference_model, reference_scene_kwargs
from comfyui_chai.refmodel.quality import HELDOUT_SEED, VALIDATION_SEED, heldout_prompts

REPO = Path(__file__).resolve().parents[1]


def plot(report, path: Path) -> None:
    """Overall score (mean +- standard error) against mean latency, one point per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, m in report.modes.items():
        ov = np.array([s["overall"] for s in m.scores])
        se = ov.std(ddof=1) / np.sqrt(len(ov)) if len(ov) > 1 else 0.0
        colour = "tab:red" if m.cached else ("black" if m.mode == "full" else
                                             "tab:blue" if m.mode == "plain" else "tab:green")
        ax.errorbar(m.mean_latency_ms, ov.mean(), yerr=se, fmt="o", color=colour, capsize=3)
        ax.annotate(name, (m.mean_latency_ms, ov.mean()), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.set_xlabel(f"mean request latency, ms ({report.device}, batch 1)")
    ax.set_ylabel("evaluator overall score")
    ax.set_title(f"reference model, {len(report.prompts)} prompts (lookup modes red, plain blue, full black)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def sample_strip(report, path: Path, n: int = 6) -> None:
    """First frame / last frame of the first ``n`` prompts for each mode, as one PNG."""
    from PIL import Image

    rows = []
    for name, m in report.modes.items():
        tiles = [np.concatenate([c[0], c[-1]], axis=1) for c in m.clips[:n]]
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1))
    img = np.concatenate(rows, axis=0)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=200, help="prompts of the stream (default 200)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma-separated mode specs: full<k>, plain<k>, chai<k>, any registered mode[k][+hook] "
                        f"(default {','.join(DEFAULT_MODES)}; full30 always runs)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the held-out prompt stream (default {HELDOUT_SEED}, the documented one)")
    p.add_argument("--validation", action="store_true",
                   help=f"score the validation stream (seed {VALIDATION_SEED}) instead: choose settings there")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="output folder (default bench/out)")
    p.add_argument("--model-dir", type=Path, default=None, help="reference model folder (default models/reference_v1)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's config.json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-lookup", action="store_true",
                   help="serve each prompt its own warm entry through a hermetic pairing lookup (no spaCy/MiniLM)")
    p.add_argument("--no-modifier-agreement", action="store_true",
                   help="let the lookup serve a stored entity whose colour words contradict the request's "
                        "(the gate's ablation: cache/agreement.py)")
    a = p.parse_args(argv)
    if a.prompts < 1:
        p.error("--prompts must be >= 1")
    if a.validation and a.seed is not None:
        p.error("--validation picks the validation stream; give it or --seed, not both")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    try:
        for m in modes:
            parse_mode_spec(m)
    except ValueError as exc:
        p.error(str(exc))
    stream = VALIDATION_SEED if a.validation else (HELDOUT_SEED if a.seed is None else a.seed)
    torch.set_num_threads(a.threads)
    model, encoder = load_reference_model(a.model_dir, device=a.device)
    items = heldout_prompts(a.prompts, seed=stream, **reference_scene_kwargs(model.reference_config))
    t0 = time.perf_counter()
    from tqdm import tqdm

    bars = {}

    def progress(phase, done, total):
        if phase not in bars:
            bars[phase] = tqdm(total=total, desc=phase, file=sys.stderr, mininterval=5.0)
        bars[phase].update(done - bars[phase].n)

    with tempfile.TemporaryDirectory(prefix="chai_quality_store_") as store_dir:
        report = run_quality(model, encoder, items, lookup=not a.no_lookup, cfg_scale=a.cfg, modes=modes,
                             store_dir=store_dir, progress=progress,
                             lookup_config=LookupConfig(modifier_agreement=not a.no_modifier_agreement))
    for b in bars.values():
        b.close()
    wall = time.perf_counter() - t0
    summary = report.summary()
    summary.update({"wall_s": round(wall, 1), "model": getattr(model, "fingerprint", None),
                    "torch_threads": torch.get_num_threads(), "lookup": not a.no_lookup,
                    "prompt_stream": "validation" if a.validation else "held-out", "stream_seed": stream,
                    "modes_requested": modes, "modifier_agreement": not a.no_modifier_agreement})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "quality_bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(report, a.out / "quality_bench.png")
    sample_strip(report, a.out / "quality_samples.png")
    print(format_table(report))
    print()
    print(f"prompts {len(items)}, cfg {report.cfg_scale:g}, device {report.device}, wall {wall / 60:.1f} min; "
          f"lookup hits {summary['lookup_hits']}, served entries share {summary['served_entry_shares']} "
          f"(unrelated: {summary['served_unrelated']}; contradicting colour: {summary['served_contradicting']}; "
          f"lookups where modifier agreement refused a match: {summary['refused_by_modifier_agreement']}), "
          f"mean lookup {summary['mean_lookup_ms'] or 0:.1f} ms")
    print(f"wrote {a.out / 'quality_bench.json'}, {a.out / 'quality_bench.png'}, {a.out / 'quality_samples.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
