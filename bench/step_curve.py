"""Step-count curve of a reference model: quality of plain k-step sampling against full 30 steps.

For N prompts (default 200 held-out; ``--validation`` for the stream settings are chosen on) and one
initial noise per prompt (the noise ``refmodel.quality`` uses: seed ``--noise-seed + i``), it samples
plain RFLOW with each step count in ``--steps`` and the full schedule (``--full``, 30), all at the
model's CFG, and scores every clip with ``refmodel/evaluator.py`` against its prompt *and* the
ground-truth render of the prompt's scene spec (drawn with the model's scene distribution,
``model.reference_scene_kwargs``), so the detail criterion is scored. Per mode it reports the mean of
every criterion with its standard error, the gap to full 30 with the standard error of the paired
difference and of the two means, PSNR / SSIM against the full-30 clip of the same noise and the
Frechet distance between the evaluator features of the mode's clips and the ground-truth renders
(``refmodel/fidelity.py``). The ground-truth renders themselves are scored as a row too.

Writes ``<out>/step_curve.json``, ``<out>/step_curve.png`` (criteria against steps) and
``<out>/step_curve_samples.png`` (first and last frame of the first prompts, one row per mode, the
ground truth on top), and prints a markdown table.

Usage::

    python bench/step_curve.py --model-dir models/reference_v2 --threads 2          # 200 held-out prompts
    python bench/step_curve.py --model-dir models/reference_v1 --validation --prompts 64
    python bench/step_curve.py --steps 1,2,4,8,12 --full 30 --cfg 2 --validation
    python bench/step_curve.py --model-dir models/reference_v2 --validation --prompts 32 --steps 4,8 --timestep-shift 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from comfyui_chai.opensora.rflow import make_noise, rflow_schedule
from comfyui_chai.refmodel import evaluator, fidelity, scenes
from comfyui_chai.refmodel.model import (CLIP, load_reference_model, model_to_pixels, reference_rflow,
                                         reference_scene_kwargs)
from comfyui_chai.refmodel.quality import HELDOUT_SEED, VALIDATION_SEED

REPO = Path(__file__).resolve().parents[1]
CRITERIA = ("overall", "shape", "color", "background", "motion", "detail", "ghost_free", "temporal")


def sample_mode(model, encoder, captions: List[str], steps: int, cfg: float, noise_seed: int,
                batch: int, shift: Optional[float] = None) -> np.ndarray:
    """uint8 clips [N, F, H, W, 3]: plain RFLOW with ``steps`` steps, prompt i from noise ``noise_seed + i``;
    ``shift``: timesteps shifted with this fixed ratio (``opensora.rflow.rflow_schedule``), None: the model's."""
    rflow = reference_rflow(cfg_scale=cfg)
    schedule = None if shift is None else rflow_schedule(steps, height=CLIP.height, width=CLIP.width,
                                                         num_frames=CLIP.num_frames, use_timestep_transform=True,
                                                         fixed_shift_ratio=shift)
    null = model.y_embedder.y_embedding
    out = []
    for lo in range(0, len(captions), batch):
        caps = captions[lo:lo + batch]
        z = torch.cat([make_noise((1,) + CLIP.shape, noise_seed + lo + j) for j in range(len(caps))])
        y, mask = encoder(caps)
        latent = rflow.sample(model, z.to(next(model.parameters()).device), y=y, y_mask=mask, y_null=null,
                              height=CLIP.height, width=CLIP.width, num_frames=CLIP.num_frames, fps=CLIP.fps,
                              size_dtype=torch.float32, num_steps=steps, schedule=schedule)
        out.append(model_to_pixels(latent))
    return np.concatenate(out)


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def summarise(rows: List[Dict[str, float]], full_rows: List[Dict[str, float]]) -> Dict[str, float]:
    """Means and standard errors of every criterion, detail parts, and the overall gap to full."""
    out: Dict[str, float] = {}
    for k in CRITERIA:
        v = np.array([r[k] for r in rows])
        out[k] = float(v.mean())
        out[k + "_se"] = _se(v)
    for part in ("edge_sharpness", "texture_contrast"):
        v = np.array([r[part] for r in rows if part in r])
        out[part] = float(v.mean()) if v.size else float("nan")
    a = np.array([r["overall"] for r in rows])
    b = np.array([r["overall"] for r in full_rows])
    out["delta_vs_full"] = float(a.mean() - b.mean())
    out["delta_se_paired"] = _se(a - b)
    out["delta_se_unpaired"] = float(np.hypot(_se(a), _se(b)))
    return out


def sample_strip(clips: Dict[str, np.ndarray], path: Path, n: int = 6, scale: int = 3) -> None:
    """One row per mode (label on the left): first and last frame of the first ``n`` prompts."""
    from PIL import Image, ImageDraw

    label_w = 70
    rows = []
    for name, cl in clips.items():
        tiles = [np.pad(np.concatenate([c[0], c[-1]], axis=1), ((2, 2), (2, 2), (0, 0)), constant_values=255)
                 for c in cl[:n]]
        row = np.concatenate(tiles, axis=1)
        row = np.asarray(Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST))
        label = Image.new("RGB", (label_w, row.shape[0]), "white")
        ImageDraw.Draw(label).text((4, row.shape[0] // 2 - 6), name, fill="black")
        rows.append(np.concatenate([np.asarray(label), row], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def plot(summary: Dict[str, Dict[str, float]], steps: List[int], full: int, path: Path, title: str) -> None:
    """Criteria (mean +- SE) against the step count, log x axis; full as the right-most point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = steps + [full]
    names = [f"plain{k}" for k in steps] + [f"full{full}"]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for k, style in (("overall", "o-"), ("detail", "s--"), ("ghost_free", "^--"), ("shape", "v:"), ("temporal", "d:")):
        ax.errorbar(xs, [summary[n][k] for n in names], yerr=[summary[n][k + "_se"] for n in names], fmt=style,
                    capsize=2, label=k, lw=2 if k == "overall" else 1)
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("sampling steps (RFLOW, same noise per prompt)")
    ax.set_ylabel("evaluator score")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="reference model folder (default models/reference_v1)")
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--steps", default="1,2,4,8,12", help="plain step counts, comma-separated")
    p.add_argument("--full", type=int, default=30, help="the full schedule's steps (the reference)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's config.json)")
    p.add_argument("--timestep-shift", type=float, default=None, metavar="R",
                   help="shift every schedule's timesteps with the fixed ratio R >= 1 (OpenSora's shift; 2.42 is "
                        "what 240p 51 frames gets); default: the model's sampler (no shift for the reference models)")
    p.add_argument("--validation", action="store_true", help="the validation prompt stream (choose settings here)")
    p.add_argument("--noise-seed", type=int, default=0, help="prompt i uses noise seed noise_seed + i")
    p.add_argument("--batch", type=int, default=25, help="prompts sampled together")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    a = p.parse_args(argv)
    try:
        steps = sorted({int(s) for s in a.steps.split(",") if s.strip()})
    except ValueError:
        p.error(f"--steps must be comma-separated positive integers, got {a.steps!r}")
    if not steps or steps[0] < 1 or a.full < 1 or a.full in steps:
        p.error("--steps must be positive integers and must not contain --full")
    if a.prompts < 2 or a.batch < 1:
        p.error("--prompts must be >= 2 and --batch >= 1")
    if a.timestep_shift is not None and not a.timestep_shift >= 1.0:
        p.error(f"--timestep-shift must be a number >= 1, got {a.timestep_shift}")
    torch.set_num_threads(a.threads)
    model, encoder = load_reference_model(a.model_dir, device=a.device)
    cfg_file = model.reference_config
    cfg = float(cfg_file["sampler"].get("cfg_scale", 7.0) if a.cfg is None else a.cfg)
    seed = VALIDATION_SEED if a.validation else HELDOUT_SEED
    items = scenes.sample_dataset(seed, a.prompts, **reference_scene_kwargs(cfg_file))
    captions = [c for _, c in items]
    truth = np.stack([scenes.render(s) for s, _ in items])
    truth_meas = [evaluator.measure_clip(c) for c in truth]

    t0 = time.perf_counter()
    clips: Dict[str, np.ndarray] = {}
    for k in [a.full] + steps[::-1]:
        name = f"full{k}" if k == a.full else f"plain{k}"
        t = time.perf_counter()
        clips[name] = sample_mode(model, encoder, captions, k, cfg, a.noise_seed, a.batch, a.timestep_shift)
        print(f"{name}: sampled {len(captions)} clips in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)

    def score(cl: np.ndarray):
        rows, meas = [], []
        for c, cap, ref in zip(cl, captions, truth_meas):
            m = evaluator.measure_clip(c)
            r = evaluator.score_measurement(evaluator.parse_prompt(cap), m, ref)
            rows.append({**r.scores, **r.detail_parts})
            meas.append(m)
        return rows, meas

    full_name = f"full{a.full}"
    scored = {"ground_truth": score(truth)}
    scored.update({name: score(cl) for name, cl in clips.items()})
    summary: Dict[str, Dict[str, float]] = {}
    for name, (rows, meas) in scored.items():
        s = summarise(rows, scored[full_name][0])
        s["frechet_distance"] = fidelity.frechet_distance(meas, truth_meas)
        if name.startswith("plain"):
            ps = fidelity.psnr_ssim(clips[name], clips[full_name])
            s["psnr_db_vs_full"], s["ssim_vs_full"] = ps["psnr_db"], ps["ssim"]
        summary[name] = s
    wall = time.perf_counter() - t0

    order = ["ground_truth", full_name] + [f"plain{k}" for k in steps[::-1]]
    head = ("| mode | overall (± SE) | Δ vs full (± paired SE; ± SE of means) | shape | colour | background | motion "
            "| detail | edge | texture | ghost-free | temporal | PSNR vs full | SSIM vs full | Fréchet vs GT |")
    lines = [head, "|" + "---|" * 15]
    for name in order:
        s = summary[name]
        fid = (f"{s['psnr_db_vs_full']:.1f} | {s['ssim_vs_full']:.3f}" if "psnr_db_vs_full" in s else "- | -")
        delta = ("-" if name == full_name else
                 f"{s['delta_vs_full']:+.3f} (± {s['delta_se_paired']:.3f}; ± {s['delta_se_unpaired']:.3f})")
        lines.append(f"| {name} | {s['overall']:.3f} (± {s['overall_se']:.3f}) | {delta} | {s['shape']:.3f} | "
                     f"{s['color']:.3f} | {s['background']:.3f} | {s['motion']:.3f} | {s['detail']:.3f} | "
                     f"{s['edge_sharpness']:.3f} | {s['texture_contrast']:.3f} | {s['ghost_free']:.3f} | "
                     f"{s['temporal']:.3f} | {fid} | {s['frechet_distance']:.2f} |")
    table = "\n".join(lines)
    a.out.mkdir(parents=True, exist_ok=True)
    stream = "validation" if a.validation else "held-out"
    result = {"model": model.fingerprint, "model_dir": str(a.model_dir or "models/reference_v1"), "prompts": len(items),
              "prompt_stream": stream, "cfg_scale": cfg, "timestep_shift": a.timestep_shift, "steps": steps, "full_steps": a.full,
              "scene_kwargs": reference_scene_kwargs(cfg_file), "noise_seed": a.noise_seed, "device": a.device,
              "torch_threads": torch.get_num_threads(), "wall_s": round(wall, 1), "modes": summary}
    (a.out / "step_curve.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, steps, a.full, a.out / "step_curve.png",
         f"{Path(result['model_dir']).name}: {len(items)} {stream} prompts, CFG {cfg:g}")
    sample_strip({"truth": truth, **{n: clips[n] for n in order[1:]}}, a.out / "step_curve_samples.png")
    print(table)
    print()
    shift = "" if a.timestep_shift is None else f", timestep shift {a.timestep_shift:g}"
    print(f"{len(items)} {stream} prompts, CFG {cfg:g}{shift}, wall {wall / 60:.1f} min; wrote {a.out / 'step_curve.json'}, "
          f"{a.out / 'step_curve.png'}, {a.out / 'step_curve_samples.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
