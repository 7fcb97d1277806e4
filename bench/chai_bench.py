"""End-to-end latency of CHAI's modes, side by side in one run, same model and inputs.

Modes (each a full request through ``ChaiPipeline.generate``: caption, denoise, VAE decode):

* ``full``   OpenSora 1.2 baseline: 30 RFLOW steps, CFG 7.0, no cache (``mode="full"``);
* ``miss``   a CHAI miss: lookup, 30 steps with latent capture, insertion into the store;
* ``hit``    a CHAI hit: lookup + latent load, 8 steps with Cache Attention at steps 2-4;
* ``plain8`` 8 plain RFLOW steps without cache (``mode="plain"``): what the step cut alone gives.

``full``, ``hit`` and ``plain8`` use the same prompt and seed; the ``miss`` request (another prompt
that shares the entity "red fox") fills a fresh store just before, so every round's hit is real.
Each round runs in a new store; the figures are medians over ``--repeats`` rounds after
``--warmup`` rounds. Printed: the latency split, the ratios full/hit, full/plain8, hit/plain8 and
miss/full, and the share of a hit's time spent on cache work (lookup with latent load and
verification, plus the extra K/V computation of Cache Attention).

Configurations:

* default: the small CPU configuration of ``pipeline.tiny_components`` (seeded random weights);
* ``--full-size``: STDiT3-XL/2 (1.2 B parameters), the full OpenSora VAE v1.2 and a T5-v1.1-XXL
  sized encoder, all with random weights (timing only), at 240p 9:16 with 51 frames:
  ``python bench/chai_bench.py --device cuda --full-size``. Captions are tokenised by hashing
  words into T5's vocabulary (no tokenizer files are needed; tokenising costs microseconds).

The lookup is the real one (spaCy entities, MiniLM embeddings, hnswlib, the SQLite/safetensors
store), so the pack's requirements must be installed where the benchmark runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MISS_PROMPT = "a red fox running through deep snow in a pine forest"
HIT_PROMPT = "a red fox sleeping next to a campfire at night"
WARM_PROMPT = "an old lighthouse on a rocky coast during a storm"
MODES = ("full", "miss", "hit", "plain8")


class HashedTokenT5:
    """A T5-v1.1-XXL-sized encoder with random weights for timing runs (no T5 weights needed).

    Words are hashed into T5's 32,128-token vocabulary, an end token is appended and the ids are
    padded to 300 tokens, as OpenSora tokenises; the encoder is ``transformers.T5EncoderModel``
    with the XXL configuration (24 layers, d_model 4096, 64 heads, d_ff 10240, gated-GELU) and
    N(0, 0.02^2) weights (layer-norm weights 1). ``encode(prompt)`` returns y [1, 1, 300, 4096]
    in ``dtype`` and mask [1, 300] int64 on ``device``.
    """

    def __init__(self, device, dtype, layers: int = 24, max_length: int = 300, seed: int = 0) -> None:
        import torch
        from transformers import T5Config, T5EncoderModel

        cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=layers, num_heads=64,
                       relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                       is_encoder_decoder=False, use_cache=False)
        with torch.device("meta"):
            model = T5EncoderModel(cfg)
        model = model.to_empty(device=device).to(dtype)
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layer_norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        model.encoder.embed_tokens.weight = model.shared.weight
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.device = torch.device(device)
        self.fingerprint = f"random-t5xxl-L{layers}-s{seed}"

    def token_words(self, prompt: str):
        """The word of each real caption row (the hashed words, then None for the end token): Chorus's rule."""
        return re.findall(r"\w+", prompt.lower())[: self.max_length - 1] + [None]

    def encode(self, prompt: str):
        import torch

        words = re.findall(r"\w+", prompt.lower())[: self.max_length - 1]
        ids = [2 + int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little") % 32000 for w in words] + [1]
        input_ids = torch.zeros(1, self.max_length, dtype=torch.long)
        mask = torch.zeros(1, self.max_length, dtype=torch.long)
        input_ids[0, : len(ids)] = torch.tensor(ids)
        mask[0, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden[:, None], mask


def build_pipeline(args, lookup):
    """The ChaiPipeline of the chosen configuration on ``args.device``."""
    import torch

    from comfyui_chai.opensora.stdit3 import build_stdit3, stdit3_xl2_config
    from comfyui_chai.opensora.vae import OpenSoraVAE
    from comfyui_chai.pipeline import ChaiPipeline, tiny_components
    from comfyui_chai.pipeline.settings import resolve_settings

    settings = resolve_settings(None, {"fast_steps": args.fast_steps, "full_steps": args.full_steps,
                                       "cache_steps": tuple(args.cache_steps)})
    device = torch.device(args.device)
    if not args.full_size:
        model, vae, captions = tiny_components(0, captions="hashed")
        return ChaiPipeline(model.to(device), vae.to(device), captions, lookup, settings=settings,
                            size_dtype=torch.float32), "tiny (seeded random weights)"
    dtype = getattr(torch, args.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_stdit3(stdit3_xl2_config(depth=args.depth), device=device, dtype=dtype).eval()
        with torch.device(device):
            vae = OpenSoraVAE().to(dtype).eval()
    captions = HashedTokenT5(device, dtype, layers=args.t5_layers)
    name = f"STDiT3-XL/2 depth {args.depth} + OpenSora VAE v1.2 + T5-XXL-sized ({args.t5_layers} layers), random, {args.dtype}"
    return ChaiPipeline(model, vae, captions, lookup, settings=settings,
                        model_fingerprint=f"random-xl2-d{args.depth}"), name


def one_round(pipe, make_lookup, size, seed, rows):
    """miss (fills a fresh store), then hit, full and plain8 on the same prompt and seed."""
    store, lookup = make_lookup()
    pipe.lookup = lookup
    calls = {
        "miss": lambda: pipe.generate(MISS_PROMPT, seed=seed + 1, **size),
        "hit": lambda: pipe.generate(HIT_PROMPT, seed=seed, **size),
        "full": lambda: pipe.generate(HIT_PROMPT, seed=seed, mode="full", **size),
        "plain8": lambda: pipe.generate(HIT_PROMPT, seed=seed, mode="plain", **size),
    }
    rest = ["hit", "full", "plain8"]
    order = ["miss"] + rest[seed % 3:] + rest[: seed % 3]  # rotate so slow drift hits every mode alike
    out, cpu = {}, {}
    try:
        for mode in order:
            c0 = time.thread_time()
            out[mode] = calls[mode]()
            cpu[mode] = (time.thread_time() - c0) * 1000.0
    finally:
        store.close()
    if out["miss"].hit or not out["hit"].hit:
        raise RuntimeError(f"the round did not produce a miss then a hit (miss.hit={out['miss'].hit}, "
                           f"hit.hit={out['hit'].hit}, matched={out['hit'].matched!r})")
    if rows is not None:
        for mode, r in out.items():
            lt = r.lookup.timings if r.lookup is not None else None
            rows[mode].append({**{k: v for k, v in vars(r.timings).items()}, "steps": r.steps, "cpu_ms": cpu[mode],
                               "extract_ms": lt.extract_ms if lt else 0.0, "embed_ms": lt.embed_ms if lt else 0.0,
                               "ann_ms": lt.ann_ms if lt else 0.0, "load_ms": lt.load_ms if lt else 0.0})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--full-size", action="store_true", help="XL/2 + full VAE + T5-XXL-sized encoder, random")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the full-size models")
    parser.add_argument("--resolution", default=None, help="bucket (full-size default 240p)")
    parser.add_argument("--aspect-ratio", default="9:16")
    parser.add_argument("--height", type=int, default=None, help="pixels (tiny default 128)")
    parser.add_argument("--width", type=int, default=None, help="pixels (tiny default 128)")
    parser.add_argument("--num-frames", type=int, default=None, help="frames (full-size 51, tiny 17)")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--full-steps", type=int, default=30)
    parser.add_argument("--fast-steps", type=int, default=8)
    parser.add_argument("--cache-steps", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--depth", type=int, default=28, help="STDiT3 depth of --full-size (28 = XL/2; less for smoke runs)")
    parser.add_argument("--t5-layers", type=int, default=24, help="encoder layers of the T5-XXL-sized encoder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the medians and ratios to this JSON file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from comfyui_chai.cache.embed import Embedder
    from comfyui_chai.cache.entities import EntityExtractor
    from comfyui_chai.cache.lookup import CacheLookup
    from comfyui_chai.cache.backend import open_store

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    extractor, embedder = EntityExtractor(), Embedder(device="cpu")
    tmp = tempfile.TemporaryDirectory(prefix="chai-bench-")
    counter = {"n": 0}

    def make_lookup():
        counter["n"] += 1
        store = open_store(Path(tmp.name) / f"store{counter['n']}")  # a fresh store: the miss is real
        return store, CacheLookup(store, extractor, embedder)

    t0 = time.perf_counter()
    pipe, name = build_pipeline(args, None)
    extractor.extract(WARM_PROMPT)
    embedder.encode(["warm up"])
    build_s = time.perf_counter() - t0
    if args.full_size:
        size = dict(resolution=args.resolution or "240p", aspect_ratio=args.aspect_ratio,
                    height=args.height, width=args.width, num_frames=args.num_frames or 51)
    else:
        size = dict(resolution=None, height=args.height or 128, width=args.width or 128,
                    num_frames=args.num_frames or 17)
    h, w, f = pipe.resolve_size(size["resolution"], size.get("aspect_ratio", "9:16"), size["height"], size["width"],
                                size["num_frames"])
    print(f"CHAI benchmark: {name}; {h}x{w}, {f} frames, latent {pipe.latent_shape(h, w, f)}, device {args.device}, "
          f"{args.threads} CPU thread(s); steps full {args.full_steps} / fast {args.fast_steps}, cache steps "
          f"{args.cache_steps}; built in {build_s:.1f} s; {args.warmup} warm-up + {args.repeats} measured round(s)")
    rows = {m: [] for m in MODES}
    for i in range(args.warmup):
        one_round(pipe, make_lookup, size, seed=1000 + i, rows=None)
    for i in range(args.repeats):
        one_round(pipe, make_lookup, size, seed=i, rows=rows)
    tmp.cleanup()

    med = {m: {k: statistics.median(r[k] for r in rows[m]) for k in rows[m][0]} for m in MODES}
    cols = ("steps", "total_ms", "cpu_ms", "lookup_ms", "text_ms", "denoise_ms", "cache_kv_ms", "decode_ms", "store_ms")
    print()
    print(f"{'mode':<8}" + "".join(f"{c:>13}" for c in cols))
    for m in MODES:
        print(f"{m:<8}" + "".join(f"{med[m][c]:>13.1f}" if c != "steps" else f"{int(med[m][c]):>13d}" for c in cols))
    ratios = {
        "full_over_hit": med["full"]["total_ms"] / med["hit"]["total_ms"],
        "full_over_plain8": med["full"]["total_ms"] / med["plain8"]["total_ms"],
        "hit_over_plain8": med["hit"]["total_ms"] / med["plain8"]["total_ms"],
        "miss_over_full": med["miss"]["total_ms"] / med["full"]["total_ms"],
        "denoise_full_over_hit": med["full"]["denoise_ms"] / med["hit"]["denoise_ms"],
        "cpu_full_over_hit": med["full"]["cpu_ms"] / med["hit"]["cpu_ms"],
        "cpu_full_over_plain8": med["full"]["cpu_ms"] / med["plain8"]["cpu_ms"],
        "cpu_hit_over_plain8": med["hit"]["cpu_ms"] / med["plain8"]["cpu_ms"],
    }
    hit = med["hit"]
    cache_ms = hit["lookup_ms"] + hit["cache_kv_ms"]
    share = cache_ms / hit["total_ms"]
    print()
    print(f"end to end: full / hit = {ratios['full_over_hit']:.2f}x   full / plain8 = {ratios['full_over_plain8']:.2f}x   "
          f"hit / plain8 = {ratios['hit_over_plain8']:.3f}   miss / full = {ratios['miss_over_full']:.3f}")
    print(f"denoising only: full / hit = {ratios['denoise_full_over_hit']:.2f}x")
    if not args.device.startswith("cuda"):  # CPU time of the calling thread: robust to other processes' load
        print(f"CPU time (this thread): full / hit = {ratios['cpu_full_over_hit']:.2f}x   full / plain8 = "
              f"{ratios['cpu_full_over_plain8']:.2f}x   hit / plain8 = {ratios['cpu_hit_over_plain8']:.3f}")
    print(f"cache work on a hit: lookup {hit['lookup_ms']:.1f} ms (entities {hit['extract_ms']:.1f}, embedding "
          f"{hit['embed_ms']:.1f}, ANN {hit['ann_ms']:.2f}, latent load+verify {hit['load_ms']:.2f}) + extra K/V "
          f"{hit['cache_kv_ms']:.1f} ms = {cache_ms:.1f} ms = {100 * share:.2f}% of the hit's {hit['total_ms']:.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": name, "height": h, "width": w, "num_frames": f,
                                               "device": args.device, "medians_ms": med, "ratios": ratios,
                                               "cache_share_of_hit": share, "repeats": args.repeats}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
