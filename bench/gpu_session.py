"""Every GPU figure the issues ask for, in one command with a time budget, on a machine with a CUDA GPU and no internet.

    python bench/gpu_session.py --device cuda --out DIR        # STDiT3-XL/2, 240p, 51 frames, bf16, random weights
    python bench/gpu_session.py --smoke --out DIR              # the same parts on the CPU, small configuration

One model build (``chai_bench.build_pipeline``: STDiT3-XL/2 + OpenSora VAE v1.2 + a T5-XXL-sized encoder, all
random weights: timing only), then these parts, in order, each written to ``DIR/gpu_session.{json,md}`` as soon
as it is measured (a run cut short keeps what it measured):

* ``requests``: whole requests through ``ChaiPipeline.generate`` (caption, denoise with the mode's hooks, VAE
  decode), side by side, median of rounds after a warm-up round: ``miss`` (``auto``: 30 steps capturing what a
  CHAI and a Chorus hit need), ``full`` (30 steps, CFG 7), ``chai_hit`` (8 steps, Cache Attention at steps 2-4),
  ``plain8``, ``chorus_hit@<s>`` (Chorus's stages and region mask, for a donor at whole-prompt similarity s: by
  default the threshold and 1.0, the two ends of its stage map) and ``mixcache`` (30 steps with the MixCache hook;
  its decision rule's time per step from the hook's report, CUDA-synchronised). Hits are served the entry the
  round's miss stored, in this process (:class:`ReplayLookup`).
* ``step``: one STDiT3 call on the CFG batch (``opensora_bench.time_step``): ms, achieved TFLOP/s, MFU.
* ``loop``: the denoising loop alone (``intra_bench.timing_runs``): plain, MixCache, MixCache computing every step
  (the whole hook's overhead), TeaCache, each granularity forced.

The lookup (entity extraction with spaCy, MiniLM embedding, hnswlib search, latent load and SHA-256) runs on the
CPU in the pack; it is not measured here but read from a ``bench/cache_bench.py`` result (``--lookup-json``,
default ``bench/results/cache_bench_lookup.json``: where, when and how it was measured is in that file), and
added to the GPU hit's time in the summary (CHAI targets: full / hit >= 3.5x at 240p, cache work <= 3% of a hit).

:class:`ReplayLookup` is **timing-only**: it serves a hit from the entry the preceding miss stored in this
process, at a stated similarity, instead of searching a store (no entity extraction, embedding or ANN search).
The sampling, Cache Attention, Chorus and MixCache code it feeds is the pack's own. Nothing here measures quality.

The time guard (``--budget-s``: the whole run's wall time, imports and build included; default 450 s) sizes the
measured rounds and the loop's repeats from the warm-up round's time and drops the loop's last runs when time is
short, so the run ends close to the budget (a slow warm-up round and the short step part can overrun it).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the budget counts from here: imports and the model build included

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from cache_bench import import_pack  # noqa: E402

import_pack()

import torch  # noqa: E402

import chai_bench  # noqa: E402
import intra_bench  # noqa: E402
import opensora_bench  # noqa: E402

DEFAULT_LOOKUP_JSON = REPO_ROOT / "bench" / "results" / "cache_bench_lookup.json"
DONOR_PROMPT = chai_bench.MISS_PROMPT  # "a red fox running through deep snow in a pine forest"
NEAR_PROMPT = "a red fox running through deep snow in a birch forest"  # a near-duplicate sharing "red fox"
#: Cosine similarity of a CHAI entity hit served by ReplayLookup (the shared entity "red fox" matches itself).
ENTITY_SIMILARITY = 1.0


class ReplayLookup:
    """Timing-only stand-in for ``cache.lookup.CacheLookup``: serves the entry an earlier request of this process
    stored, without extraction, embedding or ANN search (those run on the CPU and are timed by
    ``bench/cache_bench.py``).

    ``lookup(prompt, key)`` is a hit when an entry of another prompt was inserted under ``key`` (the pipeline's
    compatibility key plus the lookup mode) and the configured similarity of that mode (``similarity[mode]``)
    reaches the threshold; it returns the newest such entry's tensors as inserted (CPU, capture dtype: what a
    store returns). Views made by :meth:`with_config` share the entries and similarities. Never used for a
    quality figure.
    """

    def __init__(self, similarity: Optional[Dict[str, float]] = None, config: Any = None, _entries=None) -> None:
        from comfyui_chai.cache.lookup import LookupConfig

        self.config = config or LookupConfig()
        self.similarity = similarity if similarity is not None else {"entity": ENTITY_SIMILARITY, "prompt": 1.0}
        self._entries: Dict[str, List[Dict[str, Any]]] = {} if _entries is None else _entries
        self.store = self  # the pipeline loads fused entries through lookup.store.load

    def with_config(self, **changes: Any) -> "ReplayLookup":
        """A view with ``changes`` to its ``LookupConfig`` (mode, threshold), sharing entries and similarities."""
        from dataclasses import replace

        return ReplayLookup(self.similarity, replace(self.config, **changes), self._entries)

    def _key(self, compat_key: str) -> str:
        return f"{compat_key}|{self.config.mode}"

    def lookup(self, prompt: str, compat_key: str, load: bool = True, record: bool = True, query: Any = None):
        """A ``LookupResult``: hit on the newest entry of another prompt under ``compat_key`` (see the class)."""
        from comfyui_chai.cache.lookup import LookupResult

        mode, threshold = self.config.mode, float(self.config.threshold)
        key = self._key(compat_key)
        result = LookupResult(prompt=prompt, mode=mode, entities=[prompt], embeddings=np.zeros((1, 0), np.float32),
                              compat_key=key, threshold=threshold)
        stored = [e for e in self._entries.get(key, ()) if e["prompt"] != prompt]
        if stored:
            entry = stored[-1]
            result.similarity = float(self.similarity[mode])
            result.matched = entry["prompt"]
            if result.similarity >= threshold:
                result.hit, result.entry_id, result.prompt_matched = True, entry["id"], entry["prompt"]
                result.latents = dict(entry["tensors"]) if load else None
        return result

    def record(self, result: Any) -> None:
        """Statistics are the store's (CPU) work: nothing to record here."""

    def insert(self, result: Any, tensors: Dict[str, torch.Tensor], info: Any = None,
               thumbnail: Optional[bytes] = None) -> int:
        """Keep ``tensors`` (moved to the CPU, as a store keeps them) under ``result.compat_key``; the entry id.
        ``info`` and ``thumbnail`` (made by the pipeline, which times that) are accepted as ``CacheLookup.insert``
        takes them and not kept."""
        entry_id = 1 + sum(len(v) for v in self._entries.values())
        self._entries.setdefault(result.compat_key, []).append(
            {"id": entry_id, "prompt": result.prompt, "tensors": {k: v.detach().cpu() for k, v in tensors.items()}})
        return entry_id

    def load(self, entry_id: int) -> Optional[Dict[str, torch.Tensor]]:
        """The tensors of entry ``entry_id`` (None when unknown)."""
        for entry in itertools.chain.from_iterable(self._entries.values()):
            if entry["id"] == entry_id:
                return dict(entry["tensors"])
        return None


# ------------------------------------------------------------------------------------------------ output


class Session:
    """The run's results, the time budget, and writing ``gpu_session.json`` / ``.md`` after every part."""

    def __init__(self, out: Path, budget_s: float, info: Dict[str, Any], t0: float) -> None:
        self.out = out
        self.t0 = t0  # perf_counter() at the start of the run: budget and wall count from it
        self.budget_s = float(budget_s)
        self.result: Dict[str, Any] = {"info": info, "parts": {}, "errors": [], "notes": []}
        self.md: Dict[str, str] = {}
        out.mkdir(parents=True, exist_ok=True)

    def left_s(self) -> float:
        """Seconds of the budget left."""
        return self.budget_s - (time.perf_counter() - self.t0)

    def note(self, text: str) -> None:
        """A line for the reader (budget decisions, skipped parts), printed and kept."""
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {text}", flush=True)
        self.result["notes"].append(text)

    def error(self, part: str, exc: BaseException) -> None:
        """Record a part's failure (the traceback goes to the JSON) and go on with the next part."""
        self.result["errors"].append({"part": part, "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()})
        self.note(f"{part} failed: {type(exc).__name__}: {exc}")
        self.write()

    def part(self, name: str, data: Dict[str, Any], markdown: str, echo: bool = True) -> None:
        """Store a part's data and its markdown, write both files; ``echo``: print the markdown."""
        self.result["parts"][name] = data
        self.md[name] = markdown
        self.write()
        if echo:
            print("\n" + markdown + "\n", flush=True)

    def write(self) -> None:
        """Write ``gpu_session.json`` and ``gpu_session.md`` (each replaced whole)."""
        self.result["wall_s"] = round(time.perf_counter() - self.t0, 1)
        info = self.result["info"]
        head = [f"# GPU session: {info['config']}", "",
                f"{info['device_name']}; torch {info['torch']}; {info['height']}x{info['width']}, {info['num_frames']} "
                f"frames, latent {info['latent']}; random weights (timing only); budget {self.budget_s:.0f} s, wall "
                f"{self.result['wall_s']:.0f} s.", ""]
        tail = ["## Notes", "", *(f"- {n}" for n in self.result["notes"])] if self.result["notes"] else []
        text = "\n".join(head + [m + "\n" for m in self.md.values()] + tail) + "\n"
        for name, content in (("gpu_session.json", json.dumps(self.result, indent=1, default=str) + "\n"),
                              ("gpu_session.md", text)):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(content)
            os.replace(tmp, self.out / name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ requests


def request_plan(pipe, chorus_similarities: Sequence[float]) -> List[Dict[str, Any]]:
    """The requests of one round, in the order of the first round: the miss first (it fills the entries every
    hit of the round is served from), then the rest (rotated from round to round)."""
    plan = [{"name": "miss", "prompt": DONOR_PROMPT, "mode": "auto", "seed_offset": 1},
            {"name": "full", "prompt": NEAR_PROMPT, "mode": "full"},
            {"name": "chai_hit", "prompt": NEAR_PROMPT, "mode": "chai", "store": False},
            {"name": f"plain{pipe.settings.schedule.fast_steps}", "prompt": NEAR_PROMPT, "mode": "plain"}]
    plan += [{"name": f"chorus_hit@{s:.2f}", "prompt": NEAR_PROMPT, "mode": "chorus", "store": False, "similarity": s}
             for s in chorus_similarities]
    plan.append({"name": "mixcache", "prompt": NEAR_PROMPT, "mode": "full", "hooks": ("mixcache",)})
    return plan


def one_round(pipe, plan: List[Dict[str, Any]], size: Dict[str, Any], seed: int, failed: Dict[str, str]
              ) -> Dict[str, Dict[str, Any]]:
    """Run the round's requests on a fresh :class:`ReplayLookup`; per request its timings, steps and extras.
    A request that raises is recorded in ``failed`` (and left out of later rounds); the round goes on."""
    lookup = ReplayLookup()
    pipe.lookup = lookup
    rest = plan[1:]
    k = seed % len(rest) if rest else 0
    rows: Dict[str, Dict[str, Any]] = {}
    for req in [plan[0]] + rest[k:] + rest[:k]:
        name = req["name"]
        if name in failed:
            continue
        if "similarity" in req:
            lookup.similarity["prompt"] = float(req["similarity"])
        try:
            r = pipe.generate(req["prompt"], seed=seed + req.get("seed_offset", 0), mode=req["mode"],
                              store=req.get("store", True), hooks=req.get("hooks", ()), **size)
        except Exception as exc:  # recorded; the other requests still run
            failed[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            continue
        wants_hit = name.startswith(("chai_hit", "chorus_hit"))
        if wants_hit and not r.hit:
            failed[name] = f"expected a hit, got a miss ({r.reason})"
            continue
        row = {**asdict(r.timings), "steps": r.steps, "hit": r.hit, "served_by": r.served_by}
        if r.details:
            row["details"] = r.details
        if "mixcache" in r.hook_reports:
            rep = r.hook_reports["mixcache"]
            row["mixcache"] = {key: rep.get(key) for key in ("map", "full", "steps", "work_share", "decision_ms")}
        rows[name] = row
    return rows


def medians(rounds: List[Dict[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Per request, the median of each timing over the rounds (the last round's steps and extras)."""
    out: Dict[str, Dict[str, Any]] = {}
    names = dict.fromkeys(n for r in rounds for n in r)
    for name in names:
        rows = [r[name] for r in rounds if name in r]
        last = rows[-1]
        med = {k: statistics.median(row[k] for row in rows) for k, v in last.items() if isinstance(v, float)}
        out[name] = {**last, **med, "rounds": len(rows)}
        if "mixcache" in last:
            out[name]["mixcache"] = {**last["mixcache"], "decision_ms": statistics.median(
                row["mixcache"]["decision_ms"] for row in rows)}
    return out


def lookup_cpu(path: Optional[Path]) -> Optional[Dict[str, Any]]:
    """The CPU lookup figures of a ``bench/cache_bench.py`` result (``results.lookup``), or None (no file)."""
    if path is None or not path.is_file():
        return None
    data = json.loads(path.read_text())
    lk = data.get("results", {}).get("lookup")
    if not lk or "split_ms" not in lk:
        raise ValueError(f"{path} holds no lookup phase of bench/cache_bench.py (results.lookup.split_ms)")
    split = {k: round(v["p50"], 3) for k, v in lk["split_ms"].items()}
    return {"file": str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path),
            "note": data.get("note", ""), "p50_ms": split, "lookups": lk.get("lookups"),
            "entries": lk.get("fill", {}).get("entries"), "cpus": lk.get("cpus"),
            "load_avg_1min": lk.get("load_avg_1min"), "embedder": lk.get("embedder"), "extractor": lk.get("extractor")}


def requests_summary(med: Dict[str, Dict[str, Any]], lookup: Optional[Dict[str, Any]], fast: int
                     ) -> Dict[str, Any]:
    """Ratios of the median requests, the CHAI hit with the CPU lookup added, the Chorus and MixCache extras."""
    full = med.get("full")
    out: Dict[str, Any] = {"ratios": {}}
    if full is None:
        return out
    ratios = out["ratios"]
    for name, row in med.items():
        if name != "full":
            ratios[f"full_over_{name}"] = full["total_ms"] / row["total_ms"]
            ratios[f"denoise_full_over_{name}"] = full["denoise_ms"] / row["denoise_ms"]
    hit = med.get("chai_hit")
    if hit is not None:
        lookup_ms = lookup["p50_ms"]["total"] if lookup else 0.0
        with_lookup = hit["total_ms"] + lookup_ms
        cache_ms = lookup_ms + hit["cache_kv_ms"]
        out["chai_hit"] = {"gpu_request_ms": hit["total_ms"], "cache_kv_ms": hit["cache_kv_ms"],
                           "cpu_lookup_p50_ms": lookup_ms if lookup else None,
                           "hit_with_lookup_ms": with_lookup, "full_over_hit_with_lookup": full["total_ms"] / with_lookup,
                           "cache_share_of_hit": cache_ms / with_lookup, "lookup_source": lookup["file"] if lookup else None}
    mix = med.get("mixcache")
    if mix is not None and "mixcache" in mix:
        m = mix["mixcache"]
        steps = int(m.get("steps") or mix["steps"] or 1)
        out["mixcache"] = {"decision_ms_per_step": m["decision_ms"] / steps,
                           "decision_share_of_denoise": m["decision_ms"] / mix["denoise_ms"],
                           "computed_steps": m.get("full"), "steps": steps, "map": m.get("map"),
                           "work_share": m.get("work_share")}
    out["fast_steps"] = fast
    return out


def requests_markdown(med: Dict[str, Dict[str, Any]], summary: Dict[str, Any], lookup: Optional[Dict[str, Any]],
                      rounds: int, failed: Dict[str, str]) -> str:
    """The requests part as markdown: the latency split table, ratios, CHAI with its lookup, Chorus, MixCache."""
    cols = ("total_ms", "text_ms", "denoise_ms", "cache_kv_ms", "decode_ms", "store_ms")
    lines = [f"## Requests (median of {rounds} round(s); ms)", "",
             "| request | steps | " + " | ".join(c[:-3] for c in cols) + " | full / this |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    ratios = summary.get("ratios", {})
    for name, row in med.items():
        ratio = ratios.get(f"full_over_{name}")
        lines.append(f"| {name} | {row['steps']} | " + " | ".join(f"{row[c]:.1f}" for c in cols)
                     + f" | {'' if ratio is None else f'{ratio:.2f}x'} |")
    lines.append("")
    hit = summary.get("chai_hit")
    if hit is not None:
        if lookup is not None:
            p = lookup["p50_ms"]
            lines.append(
                f"CHAI hit with its lookup: {hit['gpu_request_ms']:.1f} ms on the device + {p['total']:.1f} ms lookup "
                f"on the CPU (p50 of {lookup['lookups']} lookups in a {lookup['entries']}-entry store: extraction "
                f"{p['extract']:.1f}, embedding {p['embed']:.1f}, ANN {p['ann_query']:.2f}, load + SHA-256 "
                f"{p['load_sha256']:.2f}; from `{lookup['file']}`, bench/cache_bench.py) = "
                f"{hit['hit_with_lookup_ms']:.1f} ms: full / hit = {hit['full_over_hit_with_lookup']:.2f}x (target >= "
                f"3.5x); cache work (lookup + extra K/V {hit['cache_kv_ms']:.1f} ms) = "
                f"{100 * hit['cache_share_of_hit']:.2f}% of the hit (target <= 3%).")
        else:
            lines.append(f"CHAI hit: no CPU lookup figure (--lookup-json): extra K/V {hit['cache_kv_ms']:.1f} ms = "
                         f"{100 * hit['cache_share_of_hit']:.2f}% of the hit's device time.")
    for name, row in med.items():
        d = row.get("details")
        if name.startswith("chorus_hit") and d:
            lines.append(f"{name}: K1 {d['k1']}, K2 {d['k2']} of {d['full_steps']}, {d['model_steps']} model steps "
                         f"({d['step_equivalents']} step equivalents), region {d['region']:.2f}, new words "
                         f"{', '.join(d['new_words']) or 'none'}.")
    mix = summary.get("mixcache")
    if mix is not None:
        lines.append(f"MixCache on a {mix['steps']}-step run: {mix['computed_steps']}/{mix['steps']} steps computed, "
                     f"block work {100 * float(mix['work_share']):.0f}%, decision rule "
                     f"{mix['decision_ms_per_step']:.3f} ms per step ({100 * mix['decision_share_of_denoise']:.2f}% of "
                     f"its denoising); map {mix['map']}.")
    for name, why in failed.items():
        lines.append(f"{name}: FAILED: {why.splitlines()[0]}")
    return "\n".join(lines)


def run_requests(session: Session, pipe, size: Dict[str, Any], args, lookup: Optional[Dict[str, Any]]
                 ) -> Optional[float]:
    """The requests part (warm-up round, then measured rounds while the budget allows); returns the full
    request's denoising seconds (the loop part's cost unit), or None when no full request ran."""
    plan = request_plan(pipe, args.chorus_similarity)
    failed: Dict[str, str] = {}
    t = time.perf_counter()
    warm = one_round(pipe, plan, size, seed=1000, failed=failed)
    round_s = time.perf_counter() - t
    session.note(f"warm-up round: {round_s:.1f} s ({len(warm)} requests)")
    rounds: List[Dict[str, Dict[str, Any]]] = []
    from_warmup = False

    def publish(echo: bool = False) -> Dict[str, Dict[str, Any]]:
        med = medians(rounds or [warm])
        summary = requests_summary(med, lookup, pipe.settings.schedule.fast_steps)
        session.part("requests", {"medians_ms": med, "summary": summary, "rounds": len(rounds),
                                  "from_warmup_round": from_warmup, "failed": failed, "plan": plan},
                     requests_markdown(med, summary, lookup, len(rounds) or 1, failed)
                     + ("\n\n(warm-up round only: the budget left no measured round)" if from_warmup else ""), echo)
        return med

    full_denoise_s = warm["full"]["denoise_ms"] / 1000 if "full" in warm else None
    loop_reserve_s = 0.0 if args.skip_loop or full_denoise_s is None else 2 * 3 * full_denoise_s
    for i in range(args.repeats):
        if session.left_s() - loop_reserve_s < round_s:
            session.note(f"budget: {len(rounds)} measured round(s) of {args.repeats} "
                         f"({session.left_s():.0f} s left, a round takes {round_s:.0f} s)")
            break
        t = time.perf_counter()
        rounds.append(one_round(pipe, plan, size, seed=i, failed=failed))
        round_s = time.perf_counter() - t
        publish()
    if not rounds:
        from_warmup = True
    med = publish(echo=True)
    return med["full"]["denoise_ms"] / 1000 if "full" in med else full_denoise_s


# ------------------------------------------------------------------------------------------------ step, loop


def run_step(session: Session, pipe, latent, h: int, w: int, f: int, args) -> None:
    """One STDiT3 call on the CFG batch: median ms, achieved TFLOP/s and MFU (``opensora_bench.time_step``)."""
    device = pipe.device
    tokens = int(pipe.captions.encode(NEAR_PROMPT)[1].sum())
    iters = args.step_iters
    r = opensora_bench.time_step(pipe.model, tuple(latent[1:]), h, w, f, text_tokens=tokens, size_dtype=pipe.size_dtype,
                                 warmup=2, iters=iters)
    data = {"latency_ms": r["latency_s"] * 1000, "times_ms": [t * 1000 for t in r["times_s"]],
            "tflop_per_step": r["flops"]["total"] / 1e12, "achieved_tflops": r["achieved_tflops"],
            "tokens_per_step": int(r["flops"]["tokens"]), "text_tokens": tokens}
    line = (f"One STDiT3 call on the CFG batch (2 x {data['tokens_per_step'] // 2:,} tokens, {tokens} caption tokens): "
            f"{data['latency_ms']:.1f} ms (median of {iters}), {data['tflop_per_step']:.3g} TFLOP (analytic), "
            f"{data['achieved_tflops']:.3g} TFLOP/s")
    if device.type == "cuda":
        data["mfu"] = data["achieved_tflops"] / args.peak_tflops
        line += f", MFU {100 * data['mfu']:.1f}% of {args.peak_tflops:.0f} TFLOP/s"
    session.part("step", data, "## STDiT3 step\n\n" + line + ".")


def run_loop(session: Session, pipe, latent, h: int, w: int, f: int, full_denoise_s: Optional[float], args) -> None:
    """The denoising loop alone, hook by hook (``intra_bench.timing_runs``), sized to the budget left."""
    device = pipe.device
    steps = pipe.settings.schedule.full_steps
    y, mask = pipe.captions.encode(NEAR_PROMPT)
    y, mask = y.to(device), mask.to(device)
    from comfyui_chai.opensora.rflow import make_noise

    noise = make_noise((1, *latent), 0, device=device)

    def sample(_hook):
        pipe.rflow.sample(pipe.model, noise, y=y, y_mask=mask, y_null=pipe.model.y_embedder.y_embedding, height=h,
                          width=w, num_frames=f, num_steps=steps, size_dtype=pipe.size_dtype)

    names = list(intra_bench.TIMING_RUNS)
    repeats = args.repeats
    if full_denoise_s is None:  # no full request measured: no cost estimate, so the smallest useful set
        names, repeats = names[:3], 1
        session.note(f"loop part without a cost estimate (no full request): {', '.join(names)}, 1 repeat")
    else:
        def cost(n_runs: int, reps: int) -> float:
            return n_runs * (reps + 1) * full_denoise_s * 1.1

        while repeats > 1 and cost(len(names), repeats) > session.left_s():
            repeats -= 1
        while len(names) > 2 and cost(len(names), repeats) > session.left_s():
            names.pop()
        if cost(len(names), repeats) > session.left_s():
            session.note(f"budget: loop part skipped ({session.left_s():.0f} s left, it needs "
                         f"{cost(len(names), repeats):.0f} s)")
            return
        if len(names) < len(intra_bench.TIMING_RUNS) or repeats < args.repeats:
            session.note(f"budget: loop part runs {', '.join(names)} with {repeats} repeat(s)")
    done: Dict[str, Any] = {}

    def on_run(name: str, row: Dict[str, Any]) -> None:
        done[name] = row
        session.part("loop", {"steps": steps, "repeats": repeats, "runs": dict(done)}, loop_markdown(done, steps, repeats),
                     echo=False)

    intra_bench.timing_runs(pipe.model, sample, steps=steps, repeats=repeats, sync=lambda: _sync(device), names=names,
                            on_run=on_run)
    print("\n" + loop_markdown(done, steps, repeats) + "\n", flush=True)


def loop_markdown(runs: Dict[str, Any], steps: int, repeats: int) -> str:
    """The loop part as markdown (``intra_bench.timing_table``)."""
    return (f"## Denoising loop alone ({steps} steps, median of {repeats}; decision ms from the hooks, "
            f"CUDA-synchronised on a GPU)\n\n" + intra_bench.timing_table(runs))


# ------------------------------------------------------------------------------------------------ main


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_session.json and gpu_session.md")
    p.add_argument("--device", default=None, help="torch device (default cuda; --smoke: cpu)")
    p.add_argument("--smoke", action="store_true",
                   help="the small CPU configuration (seeded random tiny STDiT3 and VAE, 128x128, 17 frames)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-time budget of the whole run in s, imports and model build included (default 450; "
                        "--smoke 100)")
    p.add_argument("--repeats", type=int, default=None, help="measured rounds and loop repeats (default 3; --smoke 1)")
    p.add_argument("--chorus-similarity", type=float, nargs="+", default=None,
                   help="whole-prompt similarities of the Chorus hits (default: the Chorus threshold and 1.0)")
    p.add_argument("--lookup-json", type=Path, default=DEFAULT_LOOKUP_JSON,
                   help="bench/cache_bench.py result with the CPU lookup split (default bench/results/cache_bench_lookup.json)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--depth", type=int, default=28, help="STDiT3 depth (28 = XL/2)")
    p.add_argument("--t5-layers", type=int, default=24, help="layers of the T5-XXL-sized encoder")
    p.add_argument("--step-iters", type=int, default=10, help="timed calls of the step part")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM: 989)")
    p.add_argument("--skip-loop", action="store_true", help="leave out the loop part")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.smoke else "cuda")
    a.budget_s = a.budget_s if a.budget_s is not None else (100.0 if a.smoke else 450.0)
    a.repeats = a.repeats if a.repeats is not None else (1 if a.smoke else 3)
    if a.repeats < 1 or a.budget_s <= 0 or a.step_iters < 1:
        p.error("--repeats and --step-iters must be >= 1 and --budget-s > 0")
    return a


def main(argv=None) -> int:
    """Run the session; 0 when every part ran, 1 when one failed (what was measured is written either way)."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    t_zero = _T0 if argv is None else t_start  # run as a script: the budget includes the imports
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; run with --smoke on a CPU", file=sys.stderr)
        return 2
    bench_args = argparse.Namespace(device=args.device, full_size=not args.smoke, dtype=args.dtype, fast_steps=8,
                                    full_steps=30, cache_steps=[2, 3, 4], depth=args.depth, t5_layers=args.t5_layers)
    try:
        pipe, config = chai_bench.build_pipeline(bench_args, None)
        _sync(pipe.device)
    except Exception as exc:  # nothing measured yet: say why in the output folder too
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_session.json").write_text(json.dumps(
            {"errors": [{"part": "build", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}]},
            indent=1) + "\n")
        raise
    device = pipe.device
    build_s = time.perf_counter() - t_start
    size = (dict(resolution="240p", aspect_ratio="9:16", height=None, width=None, num_frames=51) if not args.smoke
            else dict(resolution=None, height=128, width=128, num_frames=17))
    h, w, f = pipe.resolve_size(size["resolution"], size.get("aspect_ratio", "9:16"), size["height"], size["width"],
                                size["num_frames"])
    latent = pipe.latent_shape(h, w, f)
    if args.chorus_similarity is None:
        args.chorus_similarity = [float(pipe.settings.chorus.chorus_threshold), 1.0]
    cuda = device.type == "cuda"
    info = {"config": config, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "commit": _git_commit(), "height": h, "width": w, "num_frames": f, "latent": list(latent),
            "build_s": round(build_s, 1), "argv": sys.argv[1:] if argv is None else list(argv),
            "chorus_similarity": args.chorus_similarity, "replay_lookup": "timing-only (ReplayLookup)"}
    if cuda:
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    session = Session(args.out, args.budget_s, info, t_zero)
    session.note(f"built {config} in {build_s:.1f} s on {info['device_name']}")
    try:
        lookup = lookup_cpu(args.lookup_json)
    except (ValueError, OSError) as exc:
        session.error("lookup-json", exc)
        lookup = None
    if lookup is None:
        session.note(f"no CPU lookup figure: {args.lookup_json} is missing or unreadable")
    ok = True
    full_denoise_s = None
    for name, run in (("requests", lambda: run_requests(session, pipe, size, args, lookup)),
                      ("step", lambda: run_step(session, pipe, latent, h, w, f, args)),
                      ("loop", lambda: run_loop(session, pipe, latent, h, w, f, full_denoise_s, args))):
        if name == "loop" and args.skip_loop:
            continue
        try:
            value = run()
        except Exception as exc:  # the next part still runs; the traceback is in the JSON
            session.error(name, exc)
            ok = False
            continue
        if name == "requests":
            full_denoise_s = value
            ok = ok and not session.result["parts"]["requests"]["failed"]
    if cuda:
        session.result["info"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    session.write()
    print(f"wall {time.perf_counter() - t_zero:.0f} s (build {build_s:.0f} s); wrote {args.out / 'gpu_session.json'} "
          f"and {args.out / 'gpu_session.md'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
