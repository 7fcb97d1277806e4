"""Helpers shared by the latent-store tests (test_store*.py, test_index.py, test_cli_cache.py).

Everything here is deterministic from a seed, so a test (or a worker process) can regenerate the
exact tensors and embeddings of an entry from the seed alone and compare them byte for byte with
what the store returns. No spaCy, no MiniLM: embeddings are random L2-normalised 16-d vectors.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import torch

DIM = 16

# Compatibility keys used by the seeded entries, each with its own fixed tensor spec (the store
# requires one spec per key): name -> (shape, dtype).
KEY_SPECS: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {
    "model=a|shape=4x3x5x7|fp16": {"step_2": ((4, 3, 5, 7), torch.float16), "step_3": ((4, 3, 5, 7), torch.float16)},
    "model=a|shape=4x2x4x4|bf16": {"step_2": ((4, 2, 4, 4), torch.bfloat16)},
    "model=b|shape=2x6x6|fp32": {"step_2": ((2, 6, 6), torch.float32), "step_4": ((2, 6, 6), torch.float32)},
}
KEYS = list(KEY_SPECS)


def unit_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """[n, dim] float32 random vectors of L2 norm 1."""
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def seeded_entry(seed: int) -> dict:
    """Everything needed to ``put`` one entry, derived from ``seed`` only.

    Returns a dict with tensors (name -> tensor), entities (1-3 strings), embeddings
    ([n, DIM] float32), compat_key, prompt and info.
    """
    rng = np.random.default_rng(seed)
    key = KEYS[int(rng.integers(len(KEYS)))]
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=gen).to(dtype) for name, (shape, dtype) in KEY_SPECS[key].items()}
    n = int(rng.integers(1, 4))
    entities = [f"entity {seed} #{i}" for i in range(n)]
    return {
        "tensors": tensors,
        "entities": entities,
        "embeddings": unit_vectors(rng, n),
        "compat_key": key,
        "prompt": f"prompt of seed {seed}: " + " and ".join(entities),
        "info": {"seed": seed, "steps": [2, 3, 4]},
    }


def put_seeded(store, seed: int) -> int:
    """Insert the entry of ``seed``; returns its id."""
    e = seeded_entry(seed)
    return store.put(e["tensors"], e["entities"], e["embeddings"], e["compat_key"], e["prompt"], e["info"])


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (bfloat16-safe), for byte-equality checks."""
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()


def assert_tensors_equal(got: dict | None, want: dict, what: str = "entry") -> None:
    """Same names, dtypes, shapes and bytes."""
    assert got is not None, f"{what}: load() returned None"
    assert sorted(got) == sorted(want), f"{what}: tensor names {sorted(got)} != {sorted(want)}"
    for name in want:
        assert got[name].dtype == want[name].dtype, f"{what}/{name}: dtype {got[name].dtype} != {want[name].dtype}"
        assert tuple(got[name].shape) == tuple(want[name].shape), f"{what}/{name}: shape differs"
        assert tensor_bytes(got[name]) == tensor_bytes(want[name]), f"{what}/{name}: bytes differ"


def assert_seeded_entry(store, entry_id: int, seed: int) -> None:
    """The stored entry ``entry_id`` is exactly the entry of ``seed`` (record and tensors)."""
    want = seeded_entry(seed)
    rec = store.entry(entry_id)
    assert rec is not None, f"entry {entry_id} (seed {seed}) is missing"
    assert rec.prompt == want["prompt"] and rec.compat_key == want["compat_key"]
    assert rec.entities == want["entities"]
    assert rec.info == want["info"]
    assert_tensors_equal(store.load(entry_id), want["tensors"], f"entry {entry_id} (seed {seed})")


def manifest_rows(store_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Run a read-only query on a store's manifest through an independent connection."""
    conn = sqlite3.connect(f"file:{Path(store_dir) / 'manifest.sqlite'}?mode=ro", uri=True, timeout=60)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def manifest_total(store_dir: Path) -> int:
    """Sum of the manifest's recorded latent sizes (bytes)."""
    return int(manifest_rows(store_dir, "SELECT COALESCE(SUM(nbytes), 0) FROM entries")[0][0])


def manifest_files(store_dir: Path) -> set[str]:
    """The latent file names the manifest's entries imply (``<entry id>.safetensors``)."""
    return {f"{r[0]}.safetensors" for r in manifest_rows(store_dir, "SELECT id FROM entries")}


def latent_path(store_dir: Path, entry_id: int) -> Path:
    """Where the store keeps an entry's latents."""
    return Path(store_dir) / "latents" / f"{int(entry_id)}.safetensors"


def quarantined(store_dir: Path, entry_id: int) -> list[Path]:
    """The files of entry ``entry_id`` in ``quarantine/`` (named ``<id>-<16 hex>.safetensors``)."""
    return sorted((Path(store_dir) / "quarantine").glob(f"{int(entry_id)}-*.safetensors"))


def latent_files(store_dir: Path) -> dict[str, int]:
    """name -> size of every file in ``latents/``."""
    return {p.name: p.stat().st_size for p in (Path(store_dir) / "latents").iterdir()}


def manifest_labels(store_dir: Path, key: str) -> set[int]:
    """Entity labels the manifest holds under ``key``."""
    return {int(r[0]) for r in manifest_rows(store_dir, "SELECT label FROM entities WHERE compat_key=?", (key,))}


def entity_vectors(store_dir: Path, entry_id: int) -> np.ndarray:
    """[n, DIM] embeddings the manifest holds for one entry."""
    rows = manifest_rows(store_dir, "SELECT embedding FROM entities WHERE entry_id=? ORDER BY label", (entry_id,))
    return np.frombuffer(b"".join(r[0] for r in rows), dtype=np.float32).reshape(len(rows), -1)


def assert_search_sound(store, queries: np.ndarray, k: int = 20) -> int:
    """Every match of every key names a live row whose file exists and loads; returns the match count."""
    count = 0
    for key in KEYS:
        for m in store.search(queries, key, k=k):
            count += 1
            rec = store.entry(m.entry_id)
            assert rec is not None, f"search returned entry {m.entry_id} whose row is gone"
            assert rec.compat_key == key, f"search under {key!r} returned an entry of {rec.compat_key!r}"
            assert m.text in rec.entities
            assert store.load(m.entry_id) is not None, f"search returned entry {m.entry_id} whose file is bad"
    return count
