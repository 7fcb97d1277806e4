"""STDiT3 per-step latency, tokens/s and achieved TFLOP/s; RFLOW sampling overhead.

One RFLOW step is one STDiT3 call on the CFG-doubled batch (2n samples), so "per-step latency"
below is the latency of that call.

    python bench/opensora_bench.py                       # CPU: tiny STDiT3 (fixture config), < 1 min
    python bench/opensora_bench.py --device cuda         # GPU: STDiT3-XL/2, random weights, 240p 9:16
                                                         # 51 frames, bf16, TFLOP/s vs --peak-tflops

Achieved TFLOP/s uses an analytic count of the matmul/attention FLOPs of one forward (see
`stdit3_flops`), divided by the measured latency; MFU is that over `--peak-tflops` (default 989,
the H100 SXM dense bf16 figure). Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Dict, Tuple

import torch

from comfyui_chai.opensora.buckets import get_image_size, get_latent_size, get_num_frames
from comfyui_chai.opensora.rflow import RFlow, make_noise, size_conditioning
from comfyui_chai.opensora.stdit3 import STDiT3, build_stdit3, stdit3_xl2_config

# The tiny STDiT3 of the golden fixtures (stdit3_tiny_config.json): depth 2, hidden 96, 4 heads.
TINY_CONFIG = dict(
    depth=2, hidden_size=96, num_heads=4, patch_size=(1, 2, 2), in_channels=4, caption_channels=32,
    model_max_length=12, qk_norm=True, mlp_ratio=4.0, pred_sigma=True, input_sq_size=512,
)  # fmt: skip

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def stdit3_flops(cfg, batch: int, latent_thw: Tuple[int, int, int], text_tokens: int) -> Dict[str, float]:
    """Analytic FLOPs (multiply-add = 2) of one STDiT3 forward on `batch` samples.

    Counts every matmul and attention product: per block 28·N·C² for the linear layers (qkv 6, self
    proj 2, cross q 2, cross proj 2, MLP 16 with ratio 4), self-attention 4·N·S·C (spatial, per frame)
    or 4·N·T·C (temporal), cross-attention 4·N·L·C plus the text K/V projection 4·B·L·C²; then the
    caption MLP over all model_max_length positions, the patch embedding, the timestep/fps MLPs and
    the final layer. Norms, modulation and activations (O(N·C)) are left out. N = B·T'·S tokens.
    Checked against torch.utils.flop_counter.FlopCounterMode on the tiny model: every matmul and
    convolution agrees exactly (FlopCounterMode does not count the CPU SDPA kernel, whose share is
    the attention terms here).
    """
    t, h, w = latent_thw
    pt, ph, pw = cfg.patch_size
    tp, hp, wp = math.ceil(t / pt), math.ceil(h / ph), math.ceil(w / pw)
    s = hp * wp
    n = batch * tp * s
    c = cfg.hidden_size
    mlp = int(c * cfg.mlp_ratio)
    linear = 2 * n * c * (3 * c + c + c + c) + 2 * n * c * mlp * 2
    cross_kv = 2 * batch * text_tokens * c * 2 * c
    spatial_attn = 4 * n * s * c
    temporal_attn = 4 * n * tp * c
    cross_attn = 4 * n * text_tokens * c
    per_depth = 2 * (linear + cross_kv + cross_attn) + spatial_attn + temporal_attn
    out_ch = cfg.in_channels * (2 if cfg.pred_sigma else 1)
    embed = 2 * n * c * cfg.in_channels * pt * ph * pw
    caption = 2 * batch * cfg.model_max_length * (cfg.caption_channels * c + c * c)
    final = 2 * n * c * pt * ph * pw * out_ch
    timestep = 2 * 2 * batch * (256 * c + c * c) + 2 * batch * c * 6 * c  # t and fps MLPs, t_block
    total = cfg.depth * per_depth + embed + caption + final + timestep
    return {
        "total": float(total),
        "blocks_linear": float(cfg.depth * 2 * (linear + cross_kv)),
        "self_attention": float(cfg.depth * (spatial_attn + temporal_attn)),
        "cross_attention": float(cfg.depth * 2 * cross_attn),
        "tokens": float(n),
        "tokens_per_frame": float(s),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn, device: torch.device, warmup: int, iters: int) -> list:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def build_model(config: str, device: torch.device, dtype: torch.dtype) -> STDiT3:
    """A random-weight STDiT3 ("tiny" = the fixture config, "xl2" = STDiT3-XL/2) on device in dtype."""
    cfg = TINY_CONFIG if config == "tiny" else stdit3_xl2_config()
    torch.manual_seed(0)
    model = build_stdit3(cfg, device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def time_step(model: STDiT3, latent: Tuple[int, int, int], height: int, width: int, num_frames: int, *,
              batch: int = 1, text_tokens: int = 40, size_dtype: torch.dtype = torch.bfloat16, warmup: int = 2,
              iters: int = 10) -> Dict[str, object]:
    """Median latency of one RFLOW step's STDiT3 call (the CFG-doubled batch of ``2 * batch`` samples at
    timestep 900, random inputs) and its achieved TFLOP/s (:func:`stdit3_flops` / latency).

    Args:
        model: an STDiT3 on its device. latent: (T, H, W) of the latent. height, width, num_frames: the
        pixel size of the size conditioning. text_tokens: real caption tokens (at most ``model_max_length``).

    Returns:
        ``{"times_s": [...], "latency_s": median s, "flops": stdit3_flops(...), "achieved_tflops": float}``.
    """
    cfg = model.config
    device = next(model.parameters()).device
    text_tokens = min(int(text_tokens), int(cfg.model_max_length))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * batch, cfg.in_channels, *latent, generator=g).to(device)
    y = torch.randn(2 * batch, 1, cfg.model_max_length, cfg.caption_channels, generator=g).to(device)
    mask = torch.zeros(batch, cfg.model_max_length, dtype=torch.int64)
    mask[:, :text_tokens] = 1
    mask = mask.to(device)
    cond = size_conditioning(height, width, num_frames, batch_size=batch, dtype=size_dtype, device=device)
    timestep = torch.full((2 * batch,), 900.0, device=device)

    def step():
        with torch.no_grad():
            return model(x, timestep, y, mask=mask, fps=cond["fps"], height=cond["height"], width=cond["width"])

    times = _time_calls(step, device, warmup, iters)
    latency = statistics.median(times)
    flops = stdit3_flops(cfg, 2 * batch, latent, text_tokens)
    return {"times_s": times, "latency_s": latency, "flops": flops, "achieved_tflops": flops["total"] / latency / 1e12}


def run(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    num_frames = get_num_frames(args.num_frames)
    height, width = get_image_size(args.resolution, args.aspect_ratio)
    latent = get_latent_size(num_frames, height, width)
    n = args.batch

    t0 = time.perf_counter()
    model = build_model(args.config, device, dtype)
    build_s = time.perf_counter() - t0
    cfg = model.config
    text_tokens = min(args.text_tokens, cfg.model_max_length)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    size_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    step = time_step(model, latent, height, width, num_frames, batch=n, text_tokens=text_tokens,
                     size_dtype=size_dtype, warmup=args.warmup, iters=args.iters)
    times, latency, flops, achieved = step["times_s"], step["latency_s"], step["flops"], step["achieved_tflops"]
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2 * n, 1, cfg.model_max_length, cfg.caption_channels, generator=g).to(device)
    mask = torch.zeros(n, cfg.model_max_length, dtype=torch.int64)
    mask[:, :text_tokens] = 1
    mask = mask.to(device)
    result: Dict[str, object] = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "config": args.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "resolution": f"{args.resolution} {args.aspect_ratio} ({height}x{width}), {num_frames} frames",
        "latent_batch": [2 * n, cfg.in_channels, *latent],
        "text_tokens": text_tokens,
        "tokens_per_step": int(flops["tokens"]),
        "build_s": build_s,
        "step_latency_s_median": latency,
        "step_latency_s_min": min(times),
        "step_latency_s_all": times,
        "tokens_per_s": flops["tokens"] / latency,
        "flops_per_step": flops["total"],
        "flops_breakdown": {k: v for k, v in flops.items() if k not in ("total", "tokens", "tokens_per_frame")},
        "achieved_tflops": achieved,
    }
    if device.type == "cuda":
        result["peak_tflops"] = args.peak_tflops
        result["mfu"] = achieved / args.peak_tflops
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    if args.sample_steps > 0:
        # Whole RFLOW sample vs steps x model latency: what the sampler itself adds.
        z = make_noise((n, cfg.in_channels, *latent), seed=0, device=device)
        y_cond = y[:n]
        null = model.y_embedder.y_embedding
        sampler = RFlow(num_sampling_steps=args.sample_steps)

        def sample():
            return sampler.sample(
                model, z, y=y_cond, y_mask=mask, y_null=null, height=height, width=width,
                num_frames=num_frames, size_dtype=size_dtype,
            )  # fmt: skip

        sample_times = _time_calls(sample, device, 1 if args.warmup else 0, max(1, args.iters // 2))
        total = statistics.median(sample_times)
        result["sample_steps"] = args.sample_steps
        result["sample_s_median"] = total
        result["sampler_overhead_per_step_s"] = total / args.sample_steps - latency
    return result


def _print(result: Dict[str, object]) -> None:
    print(f"device           {result['device']} ({result['torch_threads']} torch threads)")
    print(f"model            STDiT3 {result['config']} ({result['parameters'] / 1e6:.1f} M params, random), {result['dtype']}")
    print(f"input            {result['resolution']}; CFG batch latent {result['latent_batch']}, {result['text_tokens']} text tokens")
    print(f"tokens per step  {result['tokens_per_step']:,}")
    print(f"step latency     median {result['step_latency_s_median'] * 1e3:.2f} ms (min {result['step_latency_s_min'] * 1e3:.2f} ms, "
          f"{len(result['step_latency_s_all'])} runs)")  # fmt: skip
    print(f"throughput       {result['tokens_per_s']:,.0f} tokens/s")
    print(f"FLOPs per step   {result['flops_per_step'] / 1e12:.4f} TFLOP (analytic)")
    print(f"achieved         {result['achieved_tflops']:.4f} TFLOP/s")
    if "mfu" in result:
        print(f"MFU              {result['mfu'] * 100:.1f} % of {result['peak_tflops']:.0f} TFLOP/s peak")
        print(f"peak memory      {result['peak_memory_gib']:.2f} GiB")
    if "sample_steps" in result:
        print(f"RFLOW sample     {result['sample_steps']} steps in {result['sample_s_median'] * 1e3:.1f} ms "
              f"(sampler overhead {result['sampler_overhead_per_step_s'] * 1e3:+.2f} ms/step)")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default: tiny config) or cuda (default: XL/2)")
    p.add_argument("--config", choices=("tiny", "xl2"), help="model size; default tiny on cpu, xl2 on cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--resolution", help="resolution bucket (default 144p on cpu, 240p on cuda)")
    p.add_argument("--aspect-ratio", default="9:16", help="height:width name (default 9:16)")
    p.add_argument("--num-frames", help="frames or duration (default 17 on cpu, 51 on cuda)")
    p.add_argument("--batch", type=int, default=1, help="prompts n (the model sees 2n with CFG)")
    p.add_argument("--text-tokens", type=int, default=40, help="real caption tokens per prompt")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 10 cpu, 20 cuda)")
    p.add_argument("--sample-steps", type=int, default=None, help="also time a whole RFLOW sample (default 8 cpu, 0 cuda)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s of the GPU (H100 SXM bf16: 989)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="also write the result as JSON to this path")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.config = args.config or ("xl2" if cuda else "tiny")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.resolution = args.resolution or ("240p" if cuda else "144p")
    args.num_frames = args.num_frames or ("51" if cuda else "17")
    args.iters = args.iters or (20 if cuda else 10)
    args.sample_steps = (0 if cuda else 8) if args.sample_steps is None else args.sample_steps
    if args.batch < 1 or args.iters < 1 or args.warmup < 0 or args.text_tokens < 1:
        p.error("--batch, --iters and --text-tokens must be positive and --warmup non-negative")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    _print(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
