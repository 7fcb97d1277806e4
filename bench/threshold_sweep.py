"""Measure the lookup's similarity threshold on a prompt list (default: the 946 VBench prompts).

Prints precision / recall / F0.5 of "same head noun" phrase pairs per threshold and the best one
(method: cache/calibrate.py). Usage: python bench/threshold_sweep.py [--prompts FILE]
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from comfyui_chai.cache.calibrate import sweep_thresholds
    from comfyui_chai.cache.embed import Embedder
    from comfyui_chai.cache.entities import EntityExtractor
    from comfyui_chai.cache.lookup import DEFAULT_THRESHOLD
    from comfyui_chai.cache.simulate import read_prompts
    from comfyui_chai.cli import default_prompt_file

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", default=str(default_prompt_file()))
    args = parser.parse_args()
    start = time.perf_counter()
    result = sweep_thresholds(read_prompts(args.prompts), EntityExtractor(), Embedder())
    print(f"{result.phrases} distinct entity phrases, {result.pairs:,} pairs, "
          f"{result.positive_pairs:,} share a head noun ({time.perf_counter() - start:.1f} s)")
    print(result.table())
    print(f"\nbest threshold by F0.5: {result.best.threshold:.2f} "
          f"(precision {result.best.precision:.3f}, recall {result.best.recall:.3f}); "
          f"the pack's default is {DEFAULT_THRESHOLD:.2f}")


if __name__ == "__main__":
    main()
