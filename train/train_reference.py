"""Train the reference model (small pixel-space STDiT3) on procedural scene clips with OpenSora's
rectified-flow objective. Resumable, shows progress, exports a loadable model folder as it goes.

Objective (OpenSora 1.2 RFLOW, ``opensora/schedulers/rf/rectified_flow.py``; reference/opensora.md 5.1):
draw s in (0, 1), eps ~ N(0, I), x_t = (1 - s) x_0 + s eps, timestep t = 1000 s; the model predicts
v = x_0 - eps and the loss is the mean squared error of v. The network itself outputs the clean clip
and :class:`refmodel.model.ReferenceSTDiT3` turns it into v = (x0_hat - x_t) / max(s, 0.05) (x0
parametrisation with a velocity loss, Li & He 2025 "JiT"; see refmodel/model.py for why). s is drawn
as sigmoid(N(0.8, 0.8)) (OpenSora's logit-normal sampler, shifted toward noise as in JiT) for 90 % of
the batch and uniformly for 10 % (``--uniform-frac``, ``--ln-mean``, ``--ln-std``). Captions are replaced by the model's null
caption ``y_embedder.y_embedding`` with probability ``class_dropout_prob`` (0.1) so CFG works.

Data: clip i of the training stream is ``scenes.sample_scene(np.random.default_rng([seed, i]))``
with its caption, rendered on the fly (about 5 ms per clip) and captioned by all-MiniLM-L6-v2 on
the fly (infinite data, nothing cached on disk). Step k uses clips [k B, (k + 1) B), and its noise is
seeded by (seed, k), so a resumed run sees exactly the batches an uninterrupted one would.
Held-out prompts (benchmarks, tests) use other seeds (see ``bench/quality_bench.py``).

Outputs:
  <state-dir>/state.safetensors   model, EMA and AdamW moments + step/elapsed (safetensors metadata)
  <state-dir>/log.jsonl           one line per step: step, loss, lr, seconds
  <out-dir>/model.safetensors     EMA weights (what ``refmodel.model.load_reference_model`` reads)
  <out-dir>/config.json           STDiT3 config, clip geometry, sampler, training summary
  <out-dir>/loss.png              loss curve

Usage::

    python train/train_reference.py --steps 3000 --batch-size 16            # starts or resumes
    nohup python train/train_reference.py --steps 3000 > out/train.log 2>&1 &
    python train/train_reference.py --export-only                          # re-export + plot
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

try:
    from comfyui_chai.refmodel import scenes
    from comfyui_chai.refmodel.model import (CACHE_ATTENTION, CLIP, REFERENCE_CONFIG, SAMPLER, MiniLMTokenStates,
                                             ReferenceSTDiT3, build_reference_model, count_parameters, cosine_lr,
                                             pixels_to_model)
except ImportError as e:  # pragma: no cover - environment problem, say what to do
    raise SystemExit(f"cannot import comfyui_chai ({e}); run `pip install -c constraints.txt --no-deps -e .` first")

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="total optimizer steps (a resumed run continues up to this)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=8e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported weights")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the box is shared: 1)")
    p.add_argument("--seed", type=int, default=1, help="training stream seed (held-out prompts use others)")
    p.add_argument("--two-shape-prob", type=float, default=0.2)
    p.add_argument("--position-jitter", type=float, default=0.0,
                   help="scenes.sample_scene position_jitter: randomness of positions, sizes and travel "
                        "(1 = full, 0 = one canonical layout per caption: the caption then fixes the clip)")
    p.add_argument("--position-snap", type=float, default=0.0,
                   help="scenes.sample_scene position_snap: positions on a grid of this many pixels (0 = off)")
    p.add_argument("--background-grain", type=float, default=0.0,
                   help="scenes.sample_scene background_grain: sRGB std of the static background grain (0 = none, "
                        "scene distribution v1; v2 uses 6, see scenes.DISTRIBUTIONS)")
    p.add_argument("--uniform-frac", type=float, default=0.2,
                   help="share of noise levels drawn uniformly (the rest logit-normal)")
    p.add_argument("--ln-mean", type=float, default=1.2, help="logit-normal mean of the noise level s")
    p.add_argument("--ln-std", type=float, default=1.0, help="logit-normal std of the noise level s")
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="extra loss weight on pixels within one pixel of an object (0 = plain mean); see pixel_weights")
    p.add_argument("--loss-sigma-floor", type=float, default=ReferenceSTDiT3.sigma_min,
                   help="noise level below which the loss weight stops growing (default: the model's sigma_min, "
                        f"{ReferenceSTDiT3.sigma_min}, i.e. the plain velocity loss); "
                        "see loss_sigma_factor")
    p.add_argument("--patch-size", default=None,
                   help="STDiT3 patch T,H,W (default: REFERENCE_CONFIG's); a resumed run must keep it")
    p.add_argument("--hidden-size", type=int, default=None, help="STDiT3 width (default: REFERENCE_CONFIG's)")
    p.add_argument("--depth", type=int, default=None, help="STDiT3 blocks per kind (default: REFERENCE_CONFIG's)")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints and exports")
    p.add_argument("--state-dir", type=Path, default=REPO / "out" / "train" / "reference_v1")
    p.add_argument("--out-dir", type=Path, default=REPO / "models" / "reference_v1")
    p.add_argument("--init-from", type=Path, default=None,
                   help="fresh runs only: copy every same-named, same-shaped tensor from this state.safetensors "
                        "(its EMA weights) or model.safetensors; the rest keeps its initialisation")
    p.add_argument("--init-skip", default="",
                   help="comma-separated name prefixes --init-from leaves initialised (default none; the patch "
                        "embedding and output projection are re-initialised by themselves when the patch differs)")
    p.add_argument("--export-only", action="store_true", help="write out-dir from the last checkpoint and exit")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (plain log lines)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.save_every < 1 or a.threads < 1:
        p.error("--steps, --batch-size, --save-every and --threads must be positive")
    a.stdit3 = dict(REFERENCE_CONFIG)
    if a.patch_size is not None:
        try:
            patch = tuple(int(v) for v in a.patch_size.split(","))
        except ValueError:
            patch = ()
        clip = (CLIP.num_frames, CLIP.height, CLIP.width)
        if len(patch) != 3 or any(q < 1 or n % q for n, q in zip(clip, patch)):
            p.error(f"--patch-size must be three positive ints T,H,W dividing the clip {clip}, got {a.patch_size!r}")
        a.stdit3["patch_size"] = patch
    if a.hidden_size is not None:
        if a.hidden_size < 16 or a.hidden_size % a.stdit3["num_heads"]:
            p.error(f"--hidden-size must be >= 16 and a multiple of {a.stdit3['num_heads']} (heads)")
        a.stdit3["hidden_size"] = a.hidden_size
    if a.depth is not None:
        if a.depth < 1:
            p.error("--depth must be >= 1")
        a.stdit3["depth"] = a.depth
    if not 0.0 <= a.position_jitter <= 1.0:
        p.error("--position-jitter must be in [0, 1]")
    if not 0.0 <= a.position_snap <= 8.0:
        p.error("--position-snap must be in [0, 8] pixels")
    if not 0.0 <= a.background_grain <= 20.0:
        p.error("--background-grain must be in [0, 20] sRGB units")
    if a.object_weight < 0.0:
        p.error("--object-weight must be >= 0")
    if not 0.0 < a.loss_sigma_floor < 1.0:
        p.error("--loss-sigma-floor must be in (0, 1)")
    if not 0.0 <= a.uniform_frac <= 1.0:
        p.error("--uniform-frac must be in [0, 1]")
    if not 0.0 < a.ema < 1.0:
        p.error("--ema must be in (0, 1)")
    return a


# ------------------------------------------------------------------------------ data


def batch_for_step(step: int, batch_size: int, seed: int, two_shape_prob: float,
                   position_jitter: float = 1.0, position_snap: float = 0.0, with_objects: bool = False,
                   background_grain: float = 0.0):
    """Clips [B, F, H, W, 3] uint8 and captions of optimizer step ``step`` (deterministic).

    With ``with_objects`` a third element is returned: float32 [B, F, H, W] in [0, 1], the pixels within one
    pixel of any object in each frame (its coverage dilated by a 3x3 max filter), for :func:`pixel_weights`.
    The clips and captions do not depend on it.
    """
    vids, caps, covers = [], [], []
    for i in range(step * batch_size, (step + 1) * batch_size):
        g = np.random.default_rng([seed, i])
        spec = scenes.sample_scene(g, two_shape_prob=two_shape_prob, num_frames=CLIP.num_frames,
                                   height=CLIP.height, width=CLIP.width, position_jitter=position_jitter,
                                   position_snap=position_snap, background_grain=background_grain)
        masks = scenes.object_masks(spec) if with_objects else None
        vids.append(scenes.render(spec, masks))
        caps.append(scenes.caption(spec, g))
        if with_objects:
            covers.append(masks.max(axis=0))
    if not with_objects:
        return np.stack(vids), caps
    # Frames as channels: a 3x3 max pool per frame counts the pixels just outside a shape as its outline.
    near = F.max_pool2d(torch.from_numpy(np.stack(covers)), kernel_size=3, stride=1, padding=1)
    return np.stack(vids), caps, near.numpy()


def pixel_weights(objects: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, F, H, W] fp32 from object coverage [B, F, H, W]: ``1 + object_weight *
    coverage``, divided by their batch mean so the loss keeps its scale. ``object_weight`` 0 gives all ones.

    Why: a shape's outline is a few dozen of a clip's 8x32x32 pixels, so with a plain mean the error that
    tells a star from a blob is a tiny part of the loss; weighting the object pixels makes it count.
    """
    w = 1.0 + float(object_weight) * objects.to(torch.float32)
    return (w / w.mean()).unsqueeze(1)


def loss_sigma_factor(s: torch.Tensor, floor: float, sigma_min: float = ReferenceSTDiT3.sigma_min) -> torch.Tensor:
    """Per-sample factor [B] on the velocity loss: ``(max(s, sigma_min) / max(s, floor))**2``.

    The velocity loss is the clean-clip error divided by ``max(s, sigma_min)**2`` (``ReferenceSTDiT3``), which
    weights nearly clean inputs up to 400x more than noisy ones. With ``floor`` above ``sigma_min`` the
    divisor becomes ``max(s, floor)**2``: low-noise samples weigh at most ``1/floor**2`` and the high-noise
    levels, where the caption decides the shape, get a larger share of the gradient. ``floor <= sigma_min``
    gives 1 (the plain velocity loss).
    """
    return (s.clamp(min=sigma_min) / s.clamp(min=max(floor, sigma_min))).pow(2)


def sample_sigmas(n: int, gen: torch.Generator, uniform_frac: float = 0.2, mean: float = 1.2,
                  std: float = 1.0) -> torch.Tensor:
    """Noise levels s in (0, 1): sigmoid(N(mean, std)) with probability ``1 - uniform_frac``, else uniform."""
    s_ln = torch.sigmoid(mean + std * torch.randn(n, generator=gen))
    s_u = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) >= uniform_frac
    return torch.where(pick, s_ln, s_u).clamp(1e-4, 1.0)


# ------------------------------------------------------------------------------ checkpoints


def _atomic_save(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state(path: Path, model, ema, opt, step: int, elapsed: float, args) -> None:
    t: Dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        t[f"model.{k}"] = v
    for k, v in ema.state_dict().items():
        t[f"ema.{k}"] = v
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                t[f"optim.{names[id(p)]}.exp_avg"] = st["exp_avg"]
                t[f"optim.{names[id(p)]}.exp_avg_sq"] = st["exp_avg_sq"]
                t[f"optim.{names[id(p)]}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    meta = {"step": str(step), "elapsed_s": f"{elapsed:.1f}", "args": json.dumps(_jsonable(vars(args)))}
    _atomic_save(t, path, meta)


def load_state(path: Path, model, ema, opt) -> Tuple[int, float]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")}, strict=True)
    ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")}, strict=True)
    for n, p in model.named_parameters():
        if f"optim.{n}.exp_avg" in t:
            opt.state[p] = {"step": t[f"optim.{n}.step"].reshape(()).clone(),
                            "exp_avg": t[f"optim.{n}.exp_avg"].to(p.device),
                            "exp_avg_sq": t[f"optim.{n}.exp_avg_sq"].to(p.device)}
    return int(meta["step"]), float(meta["elapsed_s"])


def init_from(path: Path, model, ema, skip: Tuple[str, ...] = ()) -> Dict[str, object]:
    """Warm start: copy matching tensors (EMA ones from a training state) into ``model`` and ``ema``.

    When the source has another patch size (its ``x_embedder.proj.weight`` differs in shape), the output
    projection ``final_layer.linear`` is skipped too: its rows are pixels of a patch, so even where its
    shape matches (patch (2, 4, 4) and (8, 2, 2) both give 96 rows) their meaning does not.

    Returns a JSON summary: source, its step and elapsed seconds, copied and skipped tensor names.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        prefix = "ema." if any(k.startswith("ema.") for k in keys) else ""
        src = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    own = model.state_dict()
    patch_key = "x_embedder.proj.weight"
    if patch_key in src and tuple(src[patch_key].shape) != tuple(own[patch_key].shape):
        skip = tuple(skip) + ("x_embedder.", "final_layer.linear.")
    copied = {k: v for k, v in src.items()
              if k in own and tuple(own[k].shape) == tuple(v.shape) and not k.startswith(tuple(skip))}
    skipped = sorted(k for k in own if k not in copied)
    model.load_state_dict(copied, strict=False)
    ema.load_state_dict(model.state_dict())
    return {"source": str(path), "source_step": int(meta.get("step", 0)),
            "source_elapsed_s": float(meta.get("elapsed_s", 0.0)), "copied": len(copied), "reinitialised": skipped}


def _jsonable(d):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def read_log(path: Path) -> List[dict]:
    """Rows of ``log.jsonl`` (later rows for the same step win, so a resumed run's log stays clean)."""
    rows: Dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            rows[int(r["step"])] = r
    return [rows[k] for k in sorted(rows)]


def plot_loss(rows: List[dict], path: Path) -> None:
    """Loss per step (faint) and its 50-step moving average, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    k = min(50, len(loss))
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.5, alpha=0.35, label="per step")
    ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"{k}-step mean")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rectified-flow MSE (v = x0 - eps)")
    ax.set_title("reference model training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _hardware(device: torch.device) -> str:
    """CPU model and count (from /proc/cpuinfo where it exists), plus the GPU name on CUDA."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = f"{name}, {os.cpu_count()} logical CPUs (shared)"
    if device.type == "cuda":
        out += f", {torch.cuda.get_device_name(device)}"
    return out


def export(out_dir: Path, ema, step: int, elapsed: float, args, rows: List[dict], n_params: int) -> None:
    """Write the EMA weights, config.json and loss.png to ``out_dir`` (atomic per file)."""
    _atomic_save(dict(ema.state_dict()), out_dir / "model.safetensors", {"step": str(step)})
    recent = [r["loss"] for r in rows[-100:]]
    cfg = {
        "stdit3": {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.stdit3.items()},
        "clip": {"num_frames": CLIP.num_frames, "height": CLIP.height, "width": CLIP.width, "fps": CLIP.fps,
                 "channels": "RGB pixels in [-1, 1]"},
        "prediction": "x0",
        "sampler": dict(SAMPLER),
        "cache_attention": dict(CACHE_ATTENTION),
        "scene_distribution": {"two_shape_prob": args.two_shape_prob, "position_jitter": args.position_jitter,
                               "position_snap": args.position_snap, "background_grain": args.background_grain},
        "text_encoder": {"name": "sentence-transformers/all-MiniLM-L6-v2", "output": "last_hidden_state",
                         "max_length": REFERENCE_CONFIG["model_max_length"], "padding": "zeros + attention mask"},
        "training": {
            "steps": step, "batch_size": args.batch_size, "peak_lr": args.lr, "warmup": args.warmup,
            "ema": args.ema, "seed": args.seed, "two_shape_prob": args.two_shape_prob,
            "position_jitter": args.position_jitter, "position_snap": args.position_snap,
            "background_grain": args.background_grain,
            "uniform_frac": args.uniform_frac, "logit_normal": [args.ln_mean, args.ln_std],
            "object_weight": args.object_weight, "loss_sigma_floor": args.loss_sigma_floor,
            "elapsed_s": round(elapsed, 1), "device": args.device, "threads": args.threads,
            "hardware": _hardware(torch.device(args.device)),
            "init_from": getattr(args, "init_info", None),
            "parameters": n_params, "loss_last100_mean": (float(np.mean(recent)) if recent else None),
            "objective": "rectified flow (OpenSora RFLOW): x_t=(1-s)x0+s*eps, t=1000s, target v=x0-eps, MSE; "
                         "network output read as x0, v=(x0_hat-x_t)/max(s,0.05)",
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, out_dir / "config.json")
    plot_loss(rows, out_dir / "loss.png")


# ------------------------------------------------------------------------------ training


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_reference_model(args.stdit3, seed=args.seed).to(device)
    ema = build_reference_model(args.stdit3, seed=args.seed).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0, eps=1e-8)
    n_params = count_parameters(model)

    state_path = args.state_dir / "state.safetensors"
    log_path = args.state_dir / "log.jsonl"
    step, elapsed = 0, 0.0
    init_info_path = args.state_dir / "init_from.json"
    if state_path.is_file():
        step, elapsed = load_state(state_path, model, ema, opt)
        print(f"resumed from {state_path} at step {step} ({elapsed / 60:.1f} min trained so far)", flush=True)
    elif args.init_from is not None:
        info = init_from(args.init_from, model, ema, tuple(p for p in args.init_skip.split(",") if p))
        args.state_dir.mkdir(parents=True, exist_ok=True)
        init_info_path.write_text(json.dumps(info, indent=2) + "\n")
        print(f"warm start from {args.init_from} (step {info['source_step']}): {info['copied']} tensors copied, "
              f"re-initialised {info['reinitialised']}", flush=True)
    args.init_info = json.loads(init_info_path.read_text()) if init_info_path.is_file() else None
    if args.export_only:
        if step == 0:
            print(f"no checkpoint at {state_path}; nothing to export", file=sys.stderr)
            return 1
        export(args.out_dir, ema, step, elapsed, args, read_log(log_path), n_params)
        print(f"exported step {step} to {args.out_dir}")
        return 0

    print(f"reference STDiT3: {n_params:,} parameters, tokens/clip = "
          f"{math.prod(n // p for n, p in zip((CLIP.num_frames, CLIP.height, CLIP.width), args.stdit3['patch_size']))}, batch {args.batch_size}, "
          f"steps {step} -> {args.steps}, device {device}, threads {args.threads}", flush=True)
    encoder = MiniLMTokenStates(max_length=REFERENCE_CONFIG["model_max_length"], device=device)
    null = model.y_embedder.y_embedding  # [L, 384]: the CFG null caption, fixed buffer
    p_drop = float(REFERENCE_CONFIG["class_dropout_prob"])
    fps = torch.full((args.batch_size,), float(CLIP.fps), device=device)
    hw = torch.full((args.batch_size,), float(CLIP.height), device=device)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=5.0)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    log_f = open(log_path, "a")
    model.train()
    t_last = time.perf_counter()
    weighted = args.object_weight > 0.0
    while step < args.steps:
        vids, caps, *covers = batch_for_step(step, args.batch_size, args.seed, args.two_shape_prob,
                                             args.position_jitter, args.position_snap, with_objects=weighted,
                                             background_grain=args.background_grain)
        x0 = pixels_to_model(vids).to(device)
        y, mask = encoder(caps)  # [B, 1, L, 384], [B, L]
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        drop = (torch.rand(args.batch_size, generator=gen) < p_drop).to(device)
        y = torch.where(drop[:, None, None, None], null[None, None].to(y.dtype), y)
        s = sample_sigmas(args.batch_size, gen, args.uniform_frac, args.ln_mean, args.ln_std).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        sb = s[:, None, None, None, None]
        x_t = (1.0 - sb) * x0 + sb * eps
        lr = cosine_lr(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        v = model(x_t, s * 1000.0, y, mask=mask, fps=fps, height=hw, width=hw)
        err = (v - (x0 - eps)).pow(2)
        if weighted:
            err = err * pixel_weights(torch.from_numpy(covers[0]).to(device), args.object_weight)
        loss = (err.mean(dim=(1, 2, 3, 4)) * loss_sigma_factor(s, args.loss_sigma_floor)).mean()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite loss at step {step}; lower --lr and resume from the last checkpoint")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, 1.0))
        opt.step()
        ema_update(ema, model, min(args.ema, (1.0 + step) / (10.0 + step)))
        step += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        log_f.write(json.dumps({"step": step, "loss": round(loss_value, 6), "lr": lr, "grad_norm": round(gnorm, 4),
                                "elapsed_s": round(elapsed, 1)}) + "\n")
        log_f.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.1e}")
        elif step % 10 == 0:
            print(f"step {step} loss {loss_value:.4f} lr {lr:.2e} {elapsed / step if step else 0:.2f}s/step", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save_state(state_path, model, ema, opt, step, elapsed, args)
            export(args.out_dir, ema, step, elapsed, args, read_log(log_path), n_params)
    log_f.close()
    if bar is not None:
        bar.close()
    print(f"done: {step} steps, {elapsed / 3600:.2f} h; model in {args.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
