"""Replay a prompt list through the real cache: extraction, embedding, lookup, insertion, eviction.

No video model runs: on a miss the simulator stores zero-filled latents of the size a real entry
would have (``entry_tensors``), so byte accounting and eviction behave exactly as in production.
Each (mode, budget) pair replays the list in order against a fresh store in a temporary folder.
Extraction and embedding results are memoised per distinct text, since they do not depend on
the budget; every lookup still goes through the HNSW index and the manifest.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .lookup import CacheLookup, LookupConfig
from .backend import mib_to_bytes, open_store
from .store_types import MAX_BUDGET_BYTES

__all__ = ["SimulationRow", "SimulationReport", "read_prompts", "entry_tensors", "simulate",
           "OPENSORA_240P_51F_LATENT"]

# OpenSora 1.2 latent of one 240p "9:16" 51-frame video: [C, T, H, W] (reference/opensora.md 1.1).
OPENSORA_240P_51F_LATENT = (4, 15, 30, 53)
SIMULATED_COMPAT_KEY = "simulate"


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a JSON list (strings, or
    objects with ``prompt_en``/``prompt`` as in VBench_full_info.json).

    Raises:
        FileNotFoundError: no such file. ValueError: naming the file and what is wrong: not UTF-8
            text (a binary file), not JSON, a JSON value that is not a list, an item that is
            neither a string nor an object with a string ``prompt_en``/``prompt``, or no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                         "give a text file with one prompt per line, or a JSON list of strings") from None
    if "\x00" in text:
        raise ValueError(f"prompt file {path} holds NUL bytes (a binary file?); give a text file with one prompt "
                         "per line, or a JSON list of strings")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"prompt file {path} is not valid JSON ({exc}); give a JSON list of strings") from None
        if not isinstance(rows, list):
            raise ValueError(f"prompt file {path} holds a JSON {type(rows).__name__}, not a list; give a JSON list of "
                             'prompt strings (or of objects with a "prompt" field)')
        prompts = []
        for i, row in enumerate(rows):
            if isinstance(row, dict):
                row = row.get("prompt_en") or row.get("prompt")
            if not isinstance(row, str):
                raise ValueError(f"prompt file {path}: item {i} is {json.dumps(rows[i])[:60]}, not a prompt string "
                                 '(or an object with a string "prompt"); fix or remove it')
            prompts.append(row)
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one per line, or a JSON list)")
    return prompts


def entry_tensors(latent_shape: Sequence[int] = OPENSORA_240P_51F_LATENT, cache_steps: int = 3,
                  dtype: str = "float16") -> dict:
    """Zero latents shaped like one real entry: ``cache_steps`` tensors of ``latent_shape``.

    240p 51 frames, 3 cache steps, fp16: 3 x 4x15x30x53 x 2 bytes = 572,400 bytes of tensor data.
    """
    import torch

    return {f"step_{i}": torch.zeros(tuple(latent_shape), dtype=getattr(torch, dtype)) for i in range(cache_steps)}


@dataclass
class SimulationRow:
    """Result of one replay: mode, budget (MiB = 2**20 bytes), hits, lookups, hit rate, evictions,
    entries and bytes held at the end, and mean lookup latency (ms)."""

    mode: str
    budget_mb: float
    lookups: int
    hits: int
    hit_rate: float
    evictions: int
    entries: int
    bytes_held: int
    lookup_ms_mean: float


@dataclass
class SimulationReport:
    """All replays plus the inputs that produced them."""

    prompts: int
    entry_bytes: int
    threshold: float
    rows: list[SimulationRow] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        """Markdown table: one row per budget, entity-level against whole-prompt hit rate."""
        budgets = sorted({r.budget_mb for r in self.rows})
        modes = [m for m in ("entity", "prompt") if any(r.mode == m for r in self.rows)]
        head = "| budget (MiB) | entries that fit | " + " | ".join(
            f"{m}-level hit rate | {m} evictions" for m in modes) + " |"
        sep = "|" + "---|" * (2 + 2 * len(modes))
        lines = [head, sep]
        for b in budgets:
            cells = [f"{b:g}", str(int(mib_to_bytes(b) // self.entry_bytes))]
            for m in modes:
                row = next(r for r in self.rows if r.mode == m and r.budget_mb == b)
                cells += [f"{row.hit_rate * 100:.1f}% ({row.hits}/{row.lookups})", str(row.evictions)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """JSON-serialisable dict."""
        return {"prompts": self.prompts, "entry_bytes": self.entry_bytes, "threshold": self.threshold,
                "seconds": self.seconds, "rows": [asdict(r) for r in self.rows]}

    def plot(self, path: str | Path) -> Path:
        """Write a PNG: hit rate against budget, one line per mode."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
        for mode, label in (("entity", "entity-level (CHAI)"), ("prompt", "whole-prompt (NIRVANA-style)")):
            rows = sorted((r for r in self.rows if r.mode == mode), key=lambda r: r.budget_mb)
            if rows:
                ax.plot([r.budget_mb for r in rows], [100 * r.hit_rate for r in rows], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("cache budget (MiB)")
        ax.set_ylabel("hit rate (%)")
        ax.set_title(f"{self.prompts} prompts, {self.entry_bytes / 2**20:.2f} MiB per entry, threshold {self.threshold:.2f}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path


class _MemoEmbedder:
    """Wraps an embedder so each distinct text is encoded once across replays."""

    def __init__(self, embedder) -> None:
        self.inner = embedder
        self.fingerprint = embedder.fingerprint
        self.memo: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            for text, vec in zip(missing, self.inner.encode(missing)):
                self.memo[text] = vec
        return np.stack([self.memo[t] for t in texts]).astype(np.float32)


class _MemoExtractor:
    """Wraps an extractor so each prompt is parsed once across replays."""

    def __init__(self, extractor, prompts: Sequence[str]) -> None:
        self.inner = extractor
        self.fingerprint = extractor.fingerprint
        self.memo = dict(zip(prompts, extractor.extract_batch(list(prompts))))

    def extract(self, prompt: str) -> list[str]:
        if prompt not in self.memo:
            self.memo[prompt] = self.inner.extract(prompt)
        return self.memo[prompt]

    def normalize_prompt(self, prompt: str) -> str:
        return self.inner.normalize_prompt(prompt)


def simulate(
    prompts: Sequence[str],
    budgets_mb: Sequence[float],
    modes: Sequence[str] = ("entity", "prompt"),
    threshold: float | None = None,
    latent_shape: Sequence[int] = OPENSORA_240P_51F_LATENT,
    cache_steps: int = 3,
    dtype: str = "float16",
    policy: str = "lru",
    extractor=None,
    embedder=None,
    progress: bool = True,
    workdir: str | Path | None = None,
) -> SimulationReport:
    """Replay ``prompts`` in order for every (mode, budget) and report hit rates.

    Args:
        prompts: the request stream. budgets_mb: cache budgets in MiB (2**20 bytes), each > 0.
        modes: "entity" (CHAI) and/or "prompt" (whole-prompt baseline).
        threshold: similarity threshold (default: :data:`LookupConfig.threshold`).
        latent_shape / cache_steps / dtype: size of one stored entry (see :func:`entry_tensors`).
        policy: eviction policy (lru, lfu, fifo). extractor / embedder: default ones if None.
        progress: show a tqdm progress bar. workdir: where the temporary stores go.

    Returns:
        A :class:`SimulationReport`.

    Raises:
        ValueError: empty prompt list, a non-positive budget, an unknown mode or policy.
    """
    from tqdm import tqdm

    from .embed import Embedder
    from .entities import EntityExtractor

    if not prompts:
        raise ValueError("no prompts to simulate")
    if any(not 0 < float(b) <= MAX_BUDGET_BYTES / 2**20 for b in budgets_mb):  # NaN and inf fail too
        raise ValueError(f"budgets must be > 0 MiB and at most 1 PiB, got {list(budgets_mb)}")
    for mode in modes:
        LookupConfig(mode=mode)  # validates
    started = time.perf_counter()
    tensors = entry_tensors(latent_shape, cache_steps, dtype)
    embedder = _MemoEmbedder(embedder or Embedder())
    base_extractor = extractor or EntityExtractor()
    memo_extractor = _MemoExtractor(base_extractor, prompts)
    # Encode every distinct key once, batched: per-request encoding would dominate the replay.
    keys = {memo_extractor.normalize_prompt(p) for p in prompts}
    keys.update(e for ents in memo_extractor.memo.values() for e in ents)
    embedder.encode(sorted(keys))
    from safetensors.torch import save

    entry_bytes = len(save(tensors, metadata={"compat_key": SIMULATED_COMPAT_KEY}))
    cfg_threshold = LookupConfig().threshold if threshold is None else float(threshold)
    report = SimulationReport(prompts=len(prompts), entry_bytes=entry_bytes, threshold=cfg_threshold)
    total = len(prompts) * len(budgets_mb) * len(modes)
    bar = tqdm(total=total, desc="simulate", unit="prompt", disable=not progress)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="chai-sim-") as tmp:
        for mode in modes:
            for budget in budgets_mb:
                store_dir = Path(tmp) / f"{mode}-{budget:g}"
                store = open_store(store_dir, budget_bytes=mib_to_bytes(budget), policy=policy,
                                   options={"durable": False, "autosave_every": 10**9})
                lookup = CacheLookup(store, memo_extractor, embedder, LookupConfig(threshold=cfg_threshold, mode=mode))
                hits = 0
                lat = []
                for prompt in prompts:
                    result = lookup.lookup(prompt, SIMULATED_COMPAT_KEY, load=True)
                    lat.append(result.timings.total_ms)
                    if result.hit:
                        hits += 1
                    else:
                        lookup.insert(result, tensors, {"simulated": True})
                    bar.update(1)
                stats = store.stats()
                report.rows.append(SimulationRow(mode=mode, budget_mb=float(budget), lookups=len(prompts), hits=hits,
                                                 hit_rate=hits / len(prompts), evictions=stats.evictions,
                                                 entries=stats.entries, bytes_held=stats.bytes,
                                                 lookup_ms_mean=float(np.mean(lat))))
                store.close()
    bar.close()
    report.seconds = time.perf_counter() - started
    return report
