"""The headless command line: ``python -m comfyui_chai <command>``.

Commands:
    cache stats STORE        counters, sizes, hit rate, top entities (``--json`` for machines; a store
                             on a read-only mount is read without repair, or ask with ``--read-only``)
    cache verify STORE       check every file and the index against the manifest; repair; exit 1 if
                             anything needed repair
    cache compact STORE      rebuild the HNSW index without tombstones
    cache pin|unpin STORE ID pin an entry (never evicted; its bytes count against the budget) or release it
    simulate                 replay a prompt list through the cache at several budgets (no video model)
    generate                 run prompts through CHAI (lookup, fast or full mode, store): one mp4 each + report
    demo                     the CHAI batch on the bundled reference model over 12 related prompts, against an
                             all-full run of the same batch: mp4s, a contact sheet, report.{md,json} (cli/demo.py)
    db, worker, cache migrate, generate --queue
                             the render farm: an embedded PostgreSQL, the job queue's worker, store
                             migration, queued batches (cli/farm.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .reuse import add_reuse_arguments, request_mode, reuse_settings

__all__ = ["main", "build_parser", "default_prompt_file"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def default_prompt_file() -> Path:
    """The VBench prompt list shipped with the pack (946 prompts, Apache-2.0, data/vbench/)."""
    return PACKAGE_DIR / "data" / "vbench" / "all_dimension.txt"


SEED_MAX = (1 << 64) - 1  # torch.manual_seed accepts 0 .. 2**64 - 1


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (``--limit 0`` or ``-1`` would silently run all or none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _seed(text: str) -> int:
    """argparse type: a noise seed torch accepts (0 .. 2**64 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {SEED_MAX}, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {SEED_MAX}, got {text!r}")
    return value


def _budget_mb(text: str) -> float:
    """argparse type: a store budget in MiB (2^20 bytes): finite, at least one byte, at most 1 PiB."""
    from ..cache.store_types import MAX_BUDGET_BYTES

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of MiB, e.g. 1024, got {text!r}") from None
    if not (value > 0 and value * 2**20 <= MAX_BUDGET_BYTES) or round(value * 2**20) < 1:
        raise argparse.ArgumentTypeError(
            f"must be a number of MiB above 0 and at most {MAX_BUDGET_BYTES >> 20:,} (1 PiB), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command (used by ``main`` and by the docs)."""
    parser = argparse.ArgumentParser(prog="python -m comfyui_chai",
                                     description="CHAI: cross-request latent cache for OpenSora 1.2")
    sub = parser.add_subparsers(dest="command", required=True)

    cache = sub.add_parser("cache", help="inspect or maintain a cache store")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in (("stats", "print counters, sizes, hit rate and top entities"),
                       ("verify", "check and repair the store (exit 1 if anything needed repair)"),
                       ("compact", "rebuild the index without tombstones"),
                       ("pin", "pin an entry: never evicted, its bytes still count against the budget"),
                       ("unpin", "release a pinned entry (evictable again by the policy)")):
        p = cache_sub.add_parser(name, help=text)
        p.add_argument("store", help="store folder (or the URL of a registered store backend)")
        if name in ("pin", "unpin"):
            p.add_argument("entry_id", type=int, metavar="ID", help="entry id (as `cache stats` and reports show it)")
        if name == "stats":
            p.add_argument("--json", action="store_true", help="print JSON")
            p.add_argument("--read-only", action="store_true",
                           help="only read the manifest: no lock, no repair, nothing written (automatic when "
                                "the folder is not writable)")
        if name == "verify":
            p.add_argument("--quick", action="store_true", help="check sizes only, not SHA-256")

    sim = sub.add_parser("simulate", help="replay prompts through the cache at several budgets")
    sim.add_argument("--prompts", default=str(default_prompt_file()),
                     help="prompt file: one per line, or JSON (default: the 946 VBench prompts shipped with the pack)")
    sim.add_argument("--budget-mb", type=_budget_mb, nargs="+", default=[25, 50, 100, 200, 400, 1000],
                     help="cache budgets in MiB (2^20 bytes); several give a curve")
    sim.add_argument("--mode", choices=["entity", "prompt", "both"], default="both",
                     help="entity-level (CHAI), whole-prompt (baseline) or both")
    sim.add_argument("--threshold", type=float, default=None, help="similarity threshold (default: the pack's)")
    sim.add_argument("--policy", choices=["lru", "lfu", "fifo"], default="lru", help="eviction policy")
    sim.add_argument("--latent-shape", type=int, nargs=4, default=[4, 15, 30, 53], metavar=("C", "T", "H", "W"),
                     help="latent of one video (default OpenSora 1.2 at 240p 9:16, 51 frames)")
    sim.add_argument("--cache-steps", type=int, default=3, help="latents stored per entry (steps 2-4 -> 3)")
    sim.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored latent dtype")
    sim.add_argument("--limit", type=_positive_int, default=None, help="use only the first N prompts")
    sim.add_argument("--out", default="out/simulate", help="folder for simulate.md, simulate.json and simulate.png")
    sim.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_generate_parser(sub)
    _add_demo_parser(sub)
    from .farm import add_parsers as add_farm_parsers

    add_farm_parsers(sub)  # db, worker, cache migrate, generate --queue (cli/farm.py)
    return parser


_DEMO_EPILOG = """\
Runs the CHAI batch workflow on the bundled CPU reference model (8-frame 32x32 shape videos, no
weights to download) over 12 built-in prompts that share shapes, colours and backgrounds. Every
prompt runs with CHAI (lookup -> 8-step fast mode with Cache Attention on a hit, 30-step full mode
stored on a miss) and then in full mode from the same seed, so the speed-up and the quality
difference are measured in the same run. Writes one mp4 per prompt (plus its full-mode twin in
full_mode/), contact_sheet.png (a hit next to its full-mode twin) and report.{md,json}.

By default the store is a fresh temporary folder. Keep one with --store DIR and run the same
command twice: the second run finds the first run's entries (higher hit rate).
"""


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="CHAI batch on the bundled reference model: videos, contact sheet, report",
                          epilog=_DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    demo.add_argument("--store", default=None,
                      help="cache store folder to create or reuse (default: a fresh temporary store, deleted after)")
    demo.add_argument("--limit", type=_positive_int, default=None, help="only the first N of the 12 prompts")
    demo.add_argument("--seed", type=_seed, default=42, help="noise seed of prompt i is seed + i (both runs)")
    demo.add_argument("--model-dir", default=None, help="reference-model folder (default: the bundled models/reference_v1)")
    demo.add_argument("--threshold", type=float, default=None, help="hit similarity (default: the lookup's, 0.72)")
    demo.add_argument("--budget-mb", type=_budget_mb, default=None,
                      help="store budget in MiB (2^20 bytes; default: kept, 1024 when new)")
    demo.add_argument("--full-steps", type=int, default=None, help="steps on a miss and of the full-mode twins (default 30)")
    demo.add_argument("--fast-steps", type=int, default=8, help="steps on a hit (default 8)")
    demo.add_argument("--scale", type=int, default=8, help="nearest-neighbour upscaling of the mp4 files (32 -> 256 px)")
    demo.add_argument("--fps", type=int, default=8, help="playback rate of the mp4 files (8 frames -> 1 s)")
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _cmd_demo(args) -> int:
    import torch

    from ..cache.store import StoreError
    from .demo import run_demo

    torch.set_num_threads(max(1, args.threads))
    try:
        run_demo(args.out, args.store, limit=args.limit, seed=args.seed, model_dir=args.model_dir,
                 threshold=args.threshold, budget_mb=args.budget_mb, full_steps=args.full_steps,
                 fast_steps=args.fast_steps, scale=args.scale, fps=args.fps,
                 progress=not args.no_progress)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_stats(path: Path, stats, as_json: bool) -> None:
    if as_json:
        print(json.dumps(stats.to_dict(), indent=2))
        return
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
    print(f"pinned       {stats.pinned_entries} entries, {stats.pinned_bytes:,} bytes (never evicted)")
    if stats.top_entities:
        print("top entities " + ", ".join(f"{t} ({n})" for t, n in stats.top_entities))


def _cmd_cache(args) -> int:
    from ..cache.backend import location_scheme, open_store, read_stats
    from ..cache.store import StoreError

    location = args.store
    try:
        folder = not location_scheme(location)  # a URL (PostgreSQL) has no folder to be read-only
        if args.cache_command == "stats" and (args.read_only or (folder and not os.access(Path(location).expanduser(),
                                                                                          os.W_OK))):
            stats = read_stats(location)
            if not args.json:
                print("read-only: manifest read as is (no repair, nothing written)")
            _print_stats(Path(location), stats, args.json)
            return 0
        store = open_store(location, create=False)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with store:
        report_to = sys.stderr if getattr(args, "json", False) else sys.stdout  # --json keeps stdout pure JSON
        for line in store.notes:
            print(f"note: {line}", file=report_to)
        repaired_on_open = list(store.open_report)
        for line in repaired_on_open:
            print(f"repaired on open: {line}", file=report_to)
        if args.cache_command == "stats":
            _print_stats(Path(location), store.stats(), args.json)
            return 0
        if args.cache_command == "verify":
            report = store.verify(full=not args.quick)
            print(f"checked {report.entries_checked} entries")
            for problem in report.problems:
                print(f"repaired: {problem}")
            for name in report.left_alone:
                print(f"left alone (not the store's own file, never touched): {name}")
            found = len(report.problems) + len(repaired_on_open)
            print("OK: store is consistent" if not found else f"{found} problem(s) found and repaired")
            return 0 if not found else 1
        if args.cache_command == "compact":
            result = store.compact()
            print(f"compacted {result['partitions']} partition(s): {result['vectors']} vectors kept, "
                  f"{result['tombstones_removed']} tombstones removed")
            return 0
        if args.cache_command in ("pin", "unpin"):
            try:
                found = store.pin(args.entry_id, args.cache_command == "pin")
            except StoreError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if not found:
                print(f"error: the store {location} has no entry {args.entry_id}; `cache stats --json` lists what "
                      "it holds", file=sys.stderr)
                return 2
            stats = store.stats()
            print(f"{args.cache_command}ned entry {args.entry_id}; pinned: {stats.pinned_entries} entries, "
                  f"{stats.pinned_bytes:,} of {stats.budget_bytes:,} budget bytes")
            return 0
    return 2


def _cmd_simulate(args) -> int:
    from ..cache.simulate import read_prompts, simulate

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


# ------------------------------------------------------------------ generate

_GENERATE_EPILOG = """\
--model tiny (default) runs the small CPU configuration: a tiny STDiT3 and VAE with seeded random
weights and MiniLM token states as captions (noise-like videos; the request path and its timing are
real). --model reference [DIR] runs the bundled, trained CPU reference model (models/reference_v1, or
DIR): a pixel-space STDiT3 without a VAE that makes 8-frame 32x32 shape videos at its native size
(--height/--width/--num-frames override it). --model STDIT3 VAE T5 [TOKENIZER] loads OpenSora 1.2's safetensors: hpcai-tech/OpenSora-STDiT-v3
(file or folder), hpcai-tech/OpenSora-VAE-v1.2 (file or folder), T5-v1.1-XXL (HF folder, or a single
file such as ComfyUI's t5xxl_fp16.safetensors plus a tokenizer folder).

The report's speed-up compares the batch's measured time with an all-miss run estimated as
(number of prompts) x (mean time of this batch's full-mode runs); it is left out when the batch
ran no full-mode request.

--intra mixcache (or teacache) adds intra-request caching to every request (off by default): steps,
CFG halves or block spans are reused inside a run; a miss still computes every step before its last
captured latent, so what it stores is unchanged (the store key carries the hook's name). --intra-preset
picks a set of knobs (balanced = the defaults); each expert flag overrides one of them. The report
says per request which steps were computed and which reused at which granularity.
"""


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate videos for a prompt list through the CHAI cache",
                         epilog=_GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--prompts", required=True, help="prompt file: one per line, or a JSON list")
    gen.add_argument("--out", required=True, help="folder for the mp4 files and report.{json,md}")
    gen.add_argument("--store", required=True,
                     help="cache store folder (created if missing), or a postgresql:// URL shared by a farm")
    gen.add_argument("--model", nargs="+", default=["tiny"], metavar="tiny|reference|PATH",
                     help="'tiny', 'reference' [DIR], or STDIT3 VAE T5 [TOKENIZER] weight paths (see below)")
    gen.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="STDiT3/VAE dtype (default: bfloat16 on cuda, float32 on cpu)")
    gen.add_argument("--resolution", default=None,
                     help="OpenSora bucket (default 240p; tiny: 64x64 pixels; reference: its native 32x32)")
    gen.add_argument("--aspect-ratio", default="9:16", help="height:width bucket name (9:16 = 240x426 at 240p)")
    gen.add_argument("--height", type=int, default=None, help="pixel height (overrides --resolution)")
    gen.add_argument("--width", type=int, default=None, help="pixel width (overrides --resolution)")
    gen.add_argument("--num-frames", default=None,
                     help="frames or a duration name (default 51 = '2s'; tiny: 17; reference: 8)")
    gen.add_argument("--seed", type=_seed, default=42, help="noise seed of prompt i is seed + i")
    gen.add_argument("--fps", type=int, default=None, help="frame rate of the mp4 files (default: the model's, 24)")
    gen.add_argument("--limit", type=_positive_int, default=None, help="only the first N prompts")
    gen.add_argument("--captions", choices=["minilm", "hashed"], default="minilm",
                     help="caption encoder of --model tiny: MiniLM token states or hashed words (no model)")
    gen.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: 1 for --model tiny/reference on cpu, else torch's default)")
    gen.add_argument("--mode", choices=_mode_choices(), default=None,
                     help="sampling mode (default chai; registered modes: " + "; ".join(_mode_help()) + ")")
    # Every knob defaults to None: pipeline.settings.resolve_settings takes the model's config.json, else
    # the built-in default (OpenSora 1.2 / the CHAI paper).
    ca = gen.add_argument_group("CHAI settings (pipeline.settings; a flag left out takes the model's own setting from "
                                "its config.json, else the paper's default)")
    ca.add_argument("--fast-steps", type=int, default=None, help="steps on a hit (8)")
    ca.add_argument("--cache-steps", type=int, nargs="*", default=None,
                    help="1-based Cache Attention steps (2 3 4; none given: no Cache Attention)")
    ca.add_argument("--full-steps", type=int, default=None, help="steps on a miss (30)")
    ca.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (7.0)")
    ca.add_argument("--block-index", type=int, default=None, help="spatial block that attends to the cache (0)")
    ca.add_argument("--attention-mode", choices=["replace", "concat"], default=None,
                    help="replace the block's K/V (paper) or concatenate with them (replace)")
    ca.add_argument("--branches", choices=["cond", "both"], default=None, help="CFG halves that use the cache (cond)")
    ca.add_argument("--fusion", choices=["best", "per_entity"], default=None,
                    help="one best entry (paper) or one per matched entity, K/V concatenated (best)")
    ca.add_argument("--threshold", type=float, default=None, help="hit similarity (default: the lookup's, 0.72)")
    ca.add_argument("--capture-dtype", choices=["float16", "float32"], default=None,
                    help="stored latent dtype (float16)")
    ca.add_argument("--no-modifier-agreement", action="store_true",
                    help="serve a stored entity even when its colour words contradict the prompt's "
                         "('black background' for 'white background'); default: refused")
    ca.add_argument("--lookup-mode", choices=["entity", "prompt"], default="entity",
                    help="entity-level keys (CHAI) or the whole prompt (NIRVANA-style baseline)")
    ca.add_argument("--budget-mb", type=_budget_mb, default=None,
                    help="store budget in MiB (2^20 bytes, as the ComfyUI Cache node; default: kept, 1024 when new)")
    ca.add_argument("--evict-to-fit", action="store_true",
                    help="allow a --budget-mb smaller than what the store holds (evicts the entries beyond it); "
                         "without it such a budget is refused and nothing is evicted")
    ca.add_argument("--policy", choices=["lru", "lfu", "fifo"], default=None, help="eviction policy (default: kept)")
    add_reuse_arguments(gen)
    _add_intra_flags(gen)
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_intra_flags(gen) -> None:
    """Intra-request caching flags (pipeline/mixcache.py): the hook, a preset, and one flag per knob."""
    from ..opensora.mixcache import GRANULARITIES
    from ..pipeline.mixcache import INTRA_HOOKS, PRESETS

    ic = gen.add_argument_group("intra-request caching (off by default; a knob flag overrides the preset's value)")
    ic.add_argument("--intra", choices=["off", *INTRA_HOOKS], default="off",
                    help="mixcache: hybrid step / block / CFG reuse; teacache: step reuse (baseline); off")
    ic.add_argument("--intra-preset", choices=list(PRESETS["mixcache"]), default="balanced",
                    help="named knob set (balanced = the defaults, chosen on the reference model's validation stream)")
    ic.add_argument("--warmup-steps", type=int, default=None, help="first steps always computed (3)")
    ic.add_argument("--final-steps", type=int, default=None, help="last steps always computed (1)")
    ic.add_argument("--min-steps", type=int, default=None,
                    help="schedules with fewer steps run without caching (9: not in an 8-step hit; 1: in every schedule)")
    ic.add_argument("--max-reuse", type=int, default=None, help="most approximated steps in a row (4)")
    ic.add_argument("--trigger-threshold", type=float, default=None,
                    help="caching starts once the measured residual change per step is at most this")
    ic.add_argument("--step-threshold", type=float, default=None, help="predicted change up to which a step is reused")
    ic.add_argument("--block-threshold", type=float, default=None,
                    help="front-block residual change up to which the block span is reused")
    ic.add_argument("--cfg-threshold", type=float, default=None,
                    help="predicted guidance error up to which only the conditional half runs")
    ic.add_argument("--block-front", type=int, default=None, help="block pairs always run at a block step, first (1)")
    ic.add_argument("--block-back", type=int, default=None, help="block pairs always run at a block step, last (0)")
    ic.add_argument("--granularities", nargs="+", choices=list(GRANULARITIES), default=None,
                    help="granularities MixCache may use (all three)")
    ic.add_argument("--teacache-threshold", type=float, default=None, help="TeaCache's accumulated-change threshold")


def _intra_settings(args) -> dict:
    """The intra-request cache settings the flags name: the preset's, then every knob flag given."""
    from ..pipeline.mixcache import preset_settings

    if args.intra == "off":
        return {}
    out = preset_settings(args.intra, args.intra_preset)
    knobs = {"warmup_steps": args.warmup_steps, "final_steps": args.final_steps, "min_steps": args.min_steps,
             "max_reuse": args.max_reuse,
             "trigger_threshold": args.trigger_threshold, "step_threshold": args.step_threshold,
             "block_threshold": args.block_threshold, "cfg_threshold": args.cfg_threshold,
             "block_front": args.block_front, "block_back": args.block_back,
             "granularities": None if args.granularities is None else tuple(args.granularities),
             "teacache_threshold": args.teacache_threshold}
    out.update({k: v for k, v in knobs.items() if v is not None})
    return out


def _mode_choices() -> list:
    from ..pipeline.modes import mode_choices

    return mode_choices()


def _mode_help() -> list:
    from ..pipeline.modes import get_mode, mode_names

    return [f"{name}: {get_mode(name).description}" for name in mode_names()]


def _generate_settings(args) -> dict:
    """The CHAI settings the command line names (None = not given): the user layer of resolve_settings."""
    return {"fast_steps": args.fast_steps, "cache_steps": None if args.cache_steps is None else tuple(args.cache_steps),
            "block_index": args.block_index, "mode": args.attention_mode, "branches": args.branches,
            "threshold": args.threshold, "fusion": args.fusion, "capture_dtype": args.capture_dtype,
            "full_steps": args.full_steps, "cfg_scale": args.cfg_scale, **reuse_settings(args),
            **_intra_settings(args)}


def generate_pipeline(args, lookup):
    """The ChaiPipeline of ``--model``, its settings resolved from the model's defaults and the flags."""
    import torch

    from ..pipeline import ChaiPipeline
    from ..pipeline.settings import resolve_settings

    flags = _generate_settings(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == ["tiny"]:
        pipe = ChaiPipeline.tiny(lookup, settings=resolve_settings(None, flags), captions=args.captions)
        pipe.model.to(device)
        pipe.vae.to(device)
        return pipe
    if args.model[0] == "reference":
        if len(args.model) > 2:
            raise ValueError("--model reference takes at most one folder: --model reference [DIR]")
        pipe = ChaiPipeline.reference(lookup, model_dir=args.model[1] if len(args.model) == 2 else None,
                                      device=device)
        return pipe.with_settings(flags)
    if len(args.model) not in (3, 4):
        raise ValueError("--model takes 'tiny', 'reference' [DIR] or 3-4 paths: STDIT3 VAE T5 [TOKENIZER]")
    default = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default
    stdit, vae, t5 = args.model[:3]
    tokenizer = args.model[3] if len(args.model) == 4 else None
    return ChaiPipeline.from_files(stdit, vae, t5, tokenizer, lookup, settings=resolve_settings(None, flags),
                                   device=device, dtype=dtype)


def cache_behaviour(before, after) -> dict:
    """What a run did to the store: sizes after it, and this run's share of the lifetime counters."""
    return {
        "entries": after.entries, "entities": after.entities, "bytes": after.bytes, "budget_bytes": after.budget_bytes,
        "policy": after.policy, "inserts": after.inserts - before.inserts,
        "evictions": after.evictions - before.evictions, "repairs": after.repairs - before.repairs,
        "quarantined": after.quarantined - before.quarantined, "lookup_ms_mean": round(after.lookup_ms_mean, 3),
        "lookup_ms_p99": round(after.lookup_ms_p99, 3),
    }


def generate_report(rows: list[dict], header: dict, cache: dict | None = None) -> tuple[dict, str]:
    """Totals and the markdown table of a generate run (``cache``: :func:`cache_behaviour`)."""
    from ..pipeline.mixcache import describe as describe_intra

    n = len(rows)
    hits = sum(1 for r in rows if r["hit"])
    total_ms = sum(r["timings_ms"]["total_ms"] for r in rows)
    full = [r["timings_ms"]["total_ms"] for r in rows if r["mode"] == "full"]
    fast = [r["timings_ms"]["total_ms"] for r in rows if r["mode"] == "fast"]
    all_miss = n * (sum(full) / len(full)) if full else None
    served_by = [r.get("served_by", "") for r in rows]
    totals = {
        "prompts": n, "hits": hits, "misses": n - hits, "hit_rate": hits / n if n else 0.0,
        "served_by": {k: served_by.count(k) for k in dict.fromkeys(served_by)},
        "mean_latency_ms": total_ms / n if n else 0.0, "total_ms": total_ms,
        "mean_full_ms": sum(full) / len(full) if full else None,
        "mean_fast_ms": sum(fast) / len(fast) if fast else None,
        "estimated_all_miss_ms": all_miss,
        "speedup_vs_all_miss": (all_miss / total_ms) if all_miss and total_ms else None,
        "speedup_note": ("all-miss time estimated as prompts x mean measured full-mode request time of this batch"
                         if full else "no full-mode request in this batch: all-miss time not estimated"),
        "mean_cache_ms_on_hits": (sum(r["timings_ms"]["lookup_ms"] + r["timings_ms"]["cache_kv_ms"]
                                      for r in rows if r["hit"]) / hits) if hits else None,
    }
    if cache is not None:
        totals["cache"] = cache
    intra = [rep for r in rows for rep in r.get("hook_reports", {}).values() if "map" in rep]
    if intra:
        steps, computed = sum(rep["steps"] for rep in intra), sum(rep["full"] for rep in intra)
        totals["intra"] = {
            "method": intra[0]["method"], "steps": steps, "computed_steps": computed,
            "computed_share": computed / steps if steps else None,
            "work_share": sum(rep["work_share"] * rep["steps"] for rep in intra) / steps if steps else None,
            "reused": {kind: sum(rep[kind] for rep in intra) for kind in ("step", "block", "cfg")}}

    def cell(v, fmt="{:.0f}"):
        return "" if v is None else fmt.format(v)

    lines = [
        "# CHAI generate report", "",
        f"model `{header['model']}`, {header['height']}x{header['width']}, {header['num_frames']} frames, "
        f"device {header['device']}, mode `{header.get('mode', 'chai')}`, config `{header['config']}`", "",
        "| # | prompt | hit | served by | why | steps | lookup ms | denoise ms | decode ms | store ms | total ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        t = r["timings_ms"]
        prompt = r["prompt"].replace("|", "/")
        prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        lines.append(f"| {i} | {prompt} | {'hit' if r['hit'] else 'miss'} | {r.get('served_by', '')} | "
                     f"{r.get('reason', '').replace('|', '/')} | {r['steps']} | {cell(t['lookup_ms'], '{:.1f}')} | "
                     f"{cell(t['denoise_ms'])} | {cell(t['decode_ms'])} | {cell(t['store_ms'], '{:.1f}')} | "
                     f"{cell(t['total_ms'])} |")
    served = ", ".join(f"{k} {v}" for k, v in totals["served_by"].items())
    lines += [
        "", f"**Totals**: {n} prompts, {hits} hits (hit rate {100 * totals['hit_rate']:.1f}%; served by {served}), "
        f"mean latency {totals['mean_latency_ms']:.0f} ms, total {total_ms / 1000:.2f} s.",
    ]
    if totals["speedup_vs_all_miss"] is not None:
        lines.append(f"Speed-up against an all-miss run: **{totals['speedup_vs_all_miss']:.2f}x** "
                     f"(all-miss time {all_miss / 1000:.2f} s, estimated as {n} prompts x the mean measured "
                     f"full-mode request, {totals['mean_full_ms']:.0f} ms).")
    else:
        lines.append(f"Speed-up against an all-miss run: not estimated ({totals['speedup_note']}).")
    if totals["mean_cache_ms_on_hits"] is not None and totals["mean_fast_ms"]:
        share = 100 * totals["mean_cache_ms_on_hits"] / totals["mean_fast_ms"]
        lines.append(f"Cache work on a hit (lookup + latent load + extra K/V): "
                     f"{totals['mean_cache_ms_on_hits']:.1f} ms, {share:.1f}% of a hit's time.")
    if intra:
        t = totals["intra"]
        lines += ["", f"**Intra-request caching** ({t['method']}): {t['computed_steps']} of {t['steps']} steps computed "
                  f"in full ({100 * t['computed_share']:.0f}%), reused: {t['reused']['step']} steps, "
                  f"{t['reused']['block']} block spans, {t['reused']['cfg']} unconditional halves; block work "
                  f"{100 * t['work_share']:.0f}% of an uncached batch's. Per request (F computed, S step reused, "
                  "B block span reused, C conditional half only):", ""]
        lines += [f"- #{i}: {describe_intra(rep)}" for i, r in enumerate(rows)
                  for rep in r.get("hook_reports", {}).values() if "map" in rep]
        lines.append("")
    if cache is not None:
        lines.append(f"Store after the run: {cache['entries']} entries, {cache['bytes']:,} of {cache['budget_bytes']:,} "
                     f"bytes ({cache['policy']}); this run inserted {cache['inserts']}, evicted {cache['evictions']}, "
                     f"repaired {cache['repairs']}; lookup mean {cache['lookup_ms_mean']:.1f} ms, "
                     f"p99 {cache['lookup_ms_p99']:.1f} ms.")
    return totals, "\n".join(lines) + "\n"


def _cmd_generate(args) -> int:
    import re
    import time

    from ..cache.embed import Embedder
    from ..cache.entities import EntityExtractor
    from ..cache.lookup import CacheLookup, LookupConfig
    from ..cache.simulate import read_prompts
    from ..cache.backend import mib_to_bytes, open_store
    from ..cache.store import StoreError
    from ..pipeline import write_video

    prompts = read_prompts(args.prompts)
    if args.limit:
        prompts = prompts[: args.limit]
    if args.seed + len(prompts) - 1 > SEED_MAX:
        raise ValueError(f"--seed {args.seed}: prompt i uses seed + i, which must stay at most {SEED_MAX} for "
                         f"{len(prompts)} prompts; give a smaller --seed")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = args.model == ["tiny"]
    small = tiny or args.model[0] == "reference"
    if args.threads is not None or (small and (args.device or "cpu") == "cpu"):
        import torch

        # Small models on a few shared cores run many times slower with one thread per core.
        torch.set_num_threads(max(1, args.threads or 1))
    height, width, resolution = args.height, args.width, args.resolution
    if tiny and resolution is None and (height is None or width is None):
        height, width = 64, 64
    num_frames = args.num_frames or (17 if tiny else None)  # None: the model's default (51; reference: 8)
    try:
        store = open_store(args.store, budget_bytes=mib_to_bytes(args.budget_mb) if args.budget_mb else None,
                           policy=args.policy, evict_to_fit=args.evict_to_fit)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with store:
        t_load = time.perf_counter()
        extractor = EntityExtractor(mode=args.lookup_mode)
        lookup = CacheLookup(store, extractor, Embedder(), LookupConfig(mode=args.lookup_mode,
                                                                   modifier_agreement=not args.no_modifier_agreement))
        pipe = generate_pipeline(args, lookup)
        # Load the lazy models now so the first request's timings hold no loading.
        lookup.keys_for("a red fox in the snow")
        lookup.embedder.encode(["a red fox"])
        pipe.captions.encode("a red fox in the snow")
        load_s = time.perf_counter() - t_load
        height, width, frames = pipe.resolve_size(resolution or "240p", args.aspect_ratio, height, width, num_frames)
        hooks = () if args.intra == "off" else (args.intra,)
        before = store.stats()
        from ..pipeline.modes import DEFAULT_MODE

        mode = request_mode(args, DEFAULT_MODE)
        header = {"model": "tiny" if tiny else " ".join(args.model), "height": height, "width": width,
                  "num_frames": frames, "device": str(pipe.device), "mode": mode,
                  "config": pipe.settings.tag(), "settings": pipe.settings.to_dict(),
                  "compat_key": pipe.compat_key(height, width, frames, mode, hooks), "store": store.location,
                  "load_s": round(load_s, 2), "seed": args.seed, "intra": args.intra,
                  "intra_preset": None if args.intra == "off" else args.intra_preset}
        rows: list[dict] = []
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), unit="prompt", disable=args.no_progress, desc="generate")
        status = 0
        try:
            for i, prompt in enumerate(prompts):
                result = pipe.generate(prompt, seed=args.seed + i, height=height, width=width, num_frames=frames,
                                       mode=mode, hooks=hooks)
                slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
                video = write_video(result.frames, out / f"{i:03d}_{slug}.mp4", fps=args.fps or pipe.fps)
                row = result.summary()
                row["video"] = video.name
                for why in result.not_stored:  # the video is kept; the cache skipped an entry
                    tqdm.write(f"prompt {i}: {why}", file=sys.stderr)
                rows.append(row)
                computed = "".join(f" {r['full']}/{r['steps']} computed" for r in result.hook_reports.values()
                                   if "map" in r)
                bar.set_postfix_str(f"{result.served_by} {result.timings.total_ms / 1000:.2f}s{computed}")
                bar.update(1)
        except KeyboardInterrupt:
            status = 130
            print("\ninterrupted: the report covers the finished prompts; the store holds only finished requests",
                  file=sys.stderr)
        finally:
            bar.close()
        totals, table = generate_report(rows, header, cache_behaviour(before, store.stats()))
        (out / "report.json").write_text(json.dumps({"run": header, "totals": totals, "prompts": rows}, indent=2),
                                         encoding="utf-8")
        (out / "report.md").write_text(table, encoding="utf-8")
        print(table)
        print(f"wrote {len(rows)} video(s), {out / 'report.json'} and {out / 'report.md'}")
    return status


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    from ..cache.store_types import StoreError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        from . import farm

        if farm.handles(args):
            return farm.run(args)
        if args.command == "cache":
            return _cmd_cache(args)
        if args.command == "simulate":
            return _cmd_simulate(args)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "demo":
            return _cmd_demo(args)
    except (ValueError, FileNotFoundError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
