"""The headless command line: ``python -m comfyui_chai <command>``.

Commands:
    cache stats STORE        counters, sizes, hit rate, top entities (``--json`` for machines)
    cache verify STORE       check every file and the index against the manifest; repair; exit 1 if
                             anything needed repair
    cache compact STORE      rebuild the HNSW index without tombstones
    simulate                 replay a prompt list through the cache at several budgets (no video model)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "default_prompt_file"]

PACKAGE_DIR = Path(__file__).resolve().parent


def default_prompt_file() -> Path:
    """The VBench prompt list shipped with the pack (946 prompts, Apache-2.0, data/vbench/)."""
    return PACKAGE_DIR / "data" / "vbench" / "all_dimension.txt"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command (used by ``main`` and by the docs)."""
    parser = argparse.ArgumentParser(prog="python -m comfyui_chai",
                                     description="CHAI: cross-request latent cache for OpenSora 1.2")
    sub = parser.add_subparsers(dest="command", required=True)

    cache = sub.add_parser("cache", help="inspect or maintain a cache store")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in (("stats", "print counters, sizes, hit rate and top entities"),
                       ("verify", "check and repair the store (exit 1 if anything needed repair)"),
                       ("compact", "rebuild the index without tombstones")):
        p = cache_sub.add_parser(name, help=text)
        p.add_argument("store", help="store folder")
        if name == "stats":
            p.add_argument("--json", action="store_true", help="print JSON")
        if name == "verify":
            p.add_argument("--quick", action="store_true", help="check sizes only, not SHA-256")

    sim = sub.add_parser("simulate", help="replay prompts through the cache at several budgets")
    sim.add_argument("--prompts", default=str(default_prompt_file()),
                     help="prompt file: one per line, or JSON (default: the 946 VBench prompts shipped with the pack)")
    sim.add_argument("--budget-mb", type=float, nargs="+", default=[25, 50, 100, 200, 400, 1000],
                     help="cache budgets in MB (10^6 bytes); several give a curve")
    sim.add_argument("--mode", choices=["entity", "prompt", "both"], default="both",
                     help="entity-level (CHAI), whole-prompt (baseline) or both")
    sim.add_argument("--threshold", type=float, default=None, help="similarity threshold (default: the pack's)")
    sim.add_argument("--policy", choices=["lru", "lfu", "fifo"], default="lru", help="eviction policy")
    sim.add_argument("--latent-shape", type=int, nargs=4, default=[4, 15, 30, 53], metavar=("C", "T", "H", "W"),
                     help="latent of one video (default OpenSora 1.2 at 240p 9:16, 51 frames)")
    sim.add_argument("--cache-steps", type=int, default=3, help="latents stored per entry (steps 2-4 -> 3)")
    sim.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored latent dtype")
    sim.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    sim.add_argument("--out", default="out/simulate", help="folder for simulate.md, simulate.json and simulate.png")
    sim.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _cmd_cache(args) -> int:
    from .cache.store import LatentStore, StoreError

    path = Path(args.store)
    if not (path / "manifest.sqlite").is_file():
        print(f"error: {path} is not a CHAI store (no manifest.sqlite in it)", file=sys.stderr)
        return 2
    try:
        store = LatentStore(path)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with store:
        for line in store.open_report:
            print(f"repaired on open: {line}")
        if args.cache_command == "stats":
            stats = store.stats()
            if args.json:
                print(json.dumps(stats.to_dict(), indent=2))
                return 0
            print(f"store        {path}")
            print(f"entries      {stats.entries} ({stats.entities} entities)")
            print(f"bytes        {stats.bytes:,} of {stats.budget_bytes:,} ({100 * stats.bytes / stats.budget_bytes:.1f}%)")
            print(f"policy       {stats.policy}")
            print(f"lookups      {stats.lookups}  hits {stats.hits}  misses {stats.misses}  "
                  f"hit rate {100 * stats.hit_rate:.1f}%")
            print(f"evictions    {stats.evictions}  inserts {stats.inserts}  repairs {stats.repairs}  "
                  f"quarantined {stats.quarantined}")
            print(f"lookup ms    mean {stats.lookup_ms_mean:.2f}  p50 {stats.lookup_ms_p50:.2f}  "
                  f"p99 {stats.lookup_ms_p99:.2f}")
            if stats.top_entities:
                print("top entities " + ", ".join(f"{t} ({n})" for t, n in stats.top_entities))
            return 0
        if args.cache_command == "verify":
            report = store.verify(full=not args.quick)
            print(f"checked {report.entries_checked} entries")
            for problem in report.problems:
                print(f"repaired: {problem}")
            print("OK: store is consistent" if report.ok else f"{len(report.problems)} problem(s) found and repaired")
            return 0 if report.ok else 1
        if args.cache_command == "compact":
            result = store.compact()
            print(f"compacted {result['partitions']} partition(s): {result['vectors']} vectors kept, "
                  f"{result['tombstones_removed']} tombstones removed")
            return 0
    return 2


def _cmd_simulate(args) -> int:
    from .cache.simulate import read_prompts, simulate

    prompts = read_prompts(args.prompts)
    if args.limit:
        prompts = prompts[: args.limit]
    modes = ["entity", "prompt"] if args.mode == "both" else [args.mode]
    report = simulate(prompts, args.budget_mb, modes=modes, threshold=args.threshold,
                      latent_shape=args.latent_shape, cache_steps=args.cache_steps, dtype=args.dtype,
                      policy=args.policy, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = report.table()
    header = (f"{report.prompts} prompts from {args.prompts}, in order; one entry = {report.entry_bytes:,} bytes "
              f"({args.cache_steps} x {tuple(args.latent_shape)} {args.dtype}); threshold {report.threshold:.2f}; "
              f"policy {args.policy}; {report.seconds:.1f} s")
    (out / "simulate.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    (out / "simulate.json").write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
    png = report.plot(out / "simulate.png")
    print(header)
    print()
    print(table)
    print(f"\nwrote {out / 'simulate.md'}, {out / 'simulate.json'}, {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "cache":
            return _cmd_cache(args)
        if args.command == "simulate":
            return _cmd_simulate(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
