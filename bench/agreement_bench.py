"""What the lookup serves: hit rate and contradicting matches with and without modifier agreement.

Replays a prompt stream in order through the real lookup (spaCy entities, MiniLM embeddings, HNSW
over a fresh store per setting; no video model: a miss stores a one-element zero tensor, so
only the keys matter) twice, with ``LookupConfig.modifier_agreement`` off and on. For every hit it
checks whether the served entity names the request entity's head noun with other colour words
("black background" served for "white background", ``cache/agreement.py``) and prints, per setting,
the hit rate, the contradicting hits and examples. Which setting serves better clips is measured on
the quality harness (``bench/quality_bench.py --no-modifier-agreement``); this script counts what is
served.

Streams: the reference model's held-out captions (``--seed``, default the held-out stream;
``--validation`` for the stream settings are chosen on) or a prompt file (``--prompts-file``, e.g.
``data/vbench/all_dimension.txt``).

Usage::

    python bench/agreement_bench.py --prompts 200                 # held-out scene captions
    python bench/agreement_bench.py --validation --prompts 200
    python bench/agreement_bench.py --prompts-file data/vbench/all_dimension.txt --prompts 946
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from comfyui_chai.cache.agreement import contradicts
from comfyui_chai.cache.backend import open_store
from comfyui_chai.cache.embed import Embedder
from comfyui_chai.cache.entities import EntityExtractor
from comfyui_chai.cache.lookup import CacheLookup, LookupConfig
from comfyui_chai.cache.simulate import read_prompts
from comfyui_chai.refmodel.quality import HELDOUT_SEED, VALIDATION_SEED, heldout_prompts

REPO = Path(__file__).resolve().parents[1]
KEY = "agreement-bench"


def replay(prompts: List[str], extractor, embedder, gate: bool) -> Dict[str, object]:
    """One pass over ``prompts`` in order with a fresh store: hits, contradicting hits, examples."""
    hits, contradicting, examples = 0, 0, []
    with tempfile.TemporaryDirectory(prefix="chai-agreement-") as folder:
        store = open_store(folder, dim=embedder.dim)
        try:
            lookup = CacheLookup(store, extractor, embedder, LookupConfig(modifier_agreement=gate))
            for prompt in prompts:
                r = lookup.lookup(prompt, KEY, record=False)
                if r.hit:
                    hits += 1
                    if contradicts(r.entity or "", r.matched or ""):
                        contradicting += 1
                        if len(examples) < 5:
                            examples.append(f"{r.entity!r} served {r.matched!r} ({r.similarity:.2f})")
                else:
                    lookup.insert(r, {"latent": torch.zeros(1)})
        finally:
            store.close()
    n = len(prompts)
    return {"modifier_agreement": gate, "prompts": n, "hits": hits, "hit_rate": round(hits / n, 4),
            "contradicting_hits": contradicting, "examples": examples}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=200, help="prompts of the stream (default 200)")
    p.add_argument("--seed", type=int, default=None, help=f"scene-caption stream seed (default {HELDOUT_SEED})")
    p.add_argument("--validation", action="store_true", help=f"the validation stream (seed {VALIDATION_SEED})")
    p.add_argument("--prompts-file", type=Path, default=None, help="replay this prompt file instead of captions")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="writes agreement_bench.json here")
    a = p.parse_args(argv)
    if a.prompts < 1:
        p.error("--prompts must be >= 1")
    if a.prompts_file is not None:
        prompts = read_prompts(a.prompts_file)[: a.prompts]
        stream = str(a.prompts_file)
    else:
        seed = VALIDATION_SEED if a.validation else (HELDOUT_SEED if a.seed is None else a.seed)
        prompts = [text for _, text in heldout_prompts(a.prompts, seed=seed)]
        stream = f"scene captions, seed {seed}"
    torch.set_num_threads(1)
    extractor, embedder = EntityExtractor(), Embedder()
    t0 = time.perf_counter()
    rows = [replay(prompts, extractor, embedder, gate) for gate in (False, True)]
    print(f"| modifier agreement | hits / prompts | hit rate | contradicting hits |  ({stream})")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['modifier_agreement'] else 'off'} | {r['hits']} / {r['prompts']} | "
              f"{r['hit_rate']:.1%} | {r['contradicting_hits']} |")
    for r in rows:
        for e in r["examples"]:
            print(f"  {'on' if r['modifier_agreement'] else 'off'}: {e}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "agreement_bench.json").write_text(json.dumps({"stream": stream, "rows": rows,
                                                            "wall_s": round(time.perf_counter() - t0, 1)},
                                                           indent=2) + "\n")
    print(f"wall {time.perf_counter() - t0:.0f} s; wrote {a.out / 'agreement_bench.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
