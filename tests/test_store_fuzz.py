"""Fuzz: a store from elsewhere with a crafted index file or latent header never crashes the process.

Issue 14, deliverable 6: at least 500 mutated hnswlib index files and 500 mutated safetensors
headers, each opened in a child process (forked from this one, under an address-space limit so a
runaway allocation fails instead of swapping). The attacker controls the whole store, so the
manifest is rewritten to agree with each mutated file (the recorded index size and a plain
SHA-256; the entry's size and SHA-256). Each child must exit normally with a clear outcome: the
partition rebuilt from the manifest (or loaded, when the mutation left a valid graph), the entry
quarantined with a reason (or served with exactly its key's tensor spec), or the store refused
with an error. A third fuzz rewrites cells of the manifest itself (100 cases): the store repairs
them or says in one line what is wrong. Through an audit hook the child also reports every path it touched through Python:
none may lie outside the store (its own code and the index-key folder aside), and a folder next
to the stores must be byte-identical after all cases.
"""

from __future__ import annotations

import hashlib
import json
import gc
import multiprocessing as mp
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest

import _store_fuzz
from _store_util import DIM, KEYS, put_seeded, seeded_entry
from comfyui_chai.cache.index import partition_file_name
from comfyui_chai.cache.store import LatentStore, StoreConfig

N_INDEX = int(os.environ.get("CHAI_FUZZ_N", 500))
N_HEADER = int(os.environ.get("CHAI_FUZZ_N", 500))
N_MANIFEST = int(os.environ.get("CHAI_FUZZ_N", 100))


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def base(tmp_path_factory, request):
    """A small store (about 40 entries over three keys, index saved) and its entries by key."""
    root = tmp_path_factory.mktemp("fuzz")
    if os.access("/dev/shm", os.W_OK):  # a thousand stores are created and fsynced: keep them in memory
        root = Path(tempfile.mkdtemp(prefix="chai-fuzz-", dir="/dev/shm"))
        request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    path = root / "base"
    ids: dict[str, list[int]] = {k: [] for k in KEYS}
    # 12 entries under the key whose partition is mutated (its graph then has upper levels to
    # corrupt), 2 under each other key: a small store, copied once per case.
    seeds = [s for s in range(7000, 7200) if seeded_entry(s)["compat_key"] == KEYS[0]][:12]
    seeds += [s for k in KEYS[1:] for s in [s for s in range(7000, 7200) if seeded_entry(s)["compat_key"] == k][:2]]
    with LatentStore(path, dim=DIM, config=StoreConfig(autosave_every=1)) as store:
        for seed in seeds:
            ids[seeded_entry(seed)["compat_key"]].append(put_seeded(store, seed))
        store.save_index()
    blob = (path / "index" / partition_file_name(KEYS[0])).read_bytes()
    assert any(struct.unpack_from("<I", blob, off)[0] for off in _store_fuzz.upper_offsets(blob)), \
        "the mutated partition needs elements above level 0"
    outside = root / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("someone's notes")
    (outside / "latents").mkdir()
    (outside / "latents" / "1.safetensors").write_bytes((path / "latents" / "1.safetensors").read_bytes())
    return root, path, ids


def _prepare(kind: str, case: int, base) -> tuple[Path, str, int | None]:
    """Copy the base store and apply case ``case``'s mutation. Returns (work folder, description, target entry)."""
    root, path, ids = base
    rng = _store_fuzz.seeded_rng({"index": 0, "latent": 100_000, "manifest": 200_000}[kind] + case)
    work = root / f"{kind}-{case}"
    store = work / "store"
    shutil.copytree(path, store)
    if kind == "index":
        name = partition_file_name(KEYS[0])
        data, desc = _store_fuzz.mutate_index((path / "index" / name).read_bytes(), rng)
        _store_fuzz.record_attack(store, "index", name, data)
        return work, desc, None
    if kind == "manifest":
        return work, _store_fuzz.mutate_manifest(store, rng), None
    target = rng.choice([i for key_ids in ids.values() for i in key_ids])
    data, desc = _store_fuzz.mutate_header((path / "latents" / f"{target}.safetensors").read_bytes(), rng)
    _store_fuzz.record_attack(store, "latent", target, data)
    return work, desc, target


def _outcome(kind: str, case: int, work: Path, desc: str, target: int | None, exitcode) -> str:
    """Check one finished child and name what happened."""
    where = f"{kind} case {case} ({desc})"
    assert exitcode == 0, f"{where}: the child died with exit code {exitcode} (a crash)"
    verdict = json.loads((work / "verdict.json").read_text())
    assert verdict["ok"], f"{where}: {verdict.get('error')}\n{verdict.get('trace')}"
    assert not verdict["outside"], f"{where}: touched paths outside the store: {verdict['outside']}"
    if verdict["outcome"] in ("refused", "error"):
        return f"{verdict['outcome']} with a one-line error"
    if kind == "manifest":
        return "repaired" if verdict["report"] else "opened as is"
    if kind == "index":
        name = partition_file_name(KEYS[0])
        rebuilt = any(line.startswith("index_rebuilt") and name in line for line in verdict["report"])
        return "rebuilt" if rebuilt else "loaded (valid graph)"
    flagged = [e for e in verdict["events"] if f"entry {target}:" in e]
    if flagged:
        assert any(w in flagged[0] for w in ("safetensors", "tensor", "bytes", "SHA-256")), flagged[0]
    return "quarantined" if flagged else "served (valid header)"


def _child(store_dir: str, verdict: str, config_dir: str, target: int | None, errors_allowed: bool) -> None:
    gc.disable()  # a collection would touch (and copy) every page inherited from the parent
    _store_fuzz.limit_memory()
    _store_fuzz.fuzz_child(store_dir, verdict, config_dir, target, errors_allowed)


def _run(kind: str, n: int, base) -> dict:
    """Run ``n`` cases, one forked child process each, four at a time (a child waits on fsync and
    file creation part of its time, so two per core keep a 2-core machine busy)."""
    root = base[0]
    outside_before = _tree(root / "outside")
    ctx = mp.get_context("fork")
    config_dir = os.environ["CHAI_CONFIG_DIR"]
    outcomes: dict[str, int] = {}
    running: list = []

    def finish(item) -> None:
        case, child, work, desc, target = item
        child.join(300)
        outcome = _outcome(kind, case, work, desc, target, child.exitcode)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(work)

    gc.freeze()  # this process's objects move out of the collector's reach: children copy fewer pages
    try:
        for case in range(n):
            work, desc, target = _prepare(kind, case, base)
            child = ctx.Process(target=_child, args=(str(work / "store"), str(work / "verdict.json"), config_dir,
                                                     target, kind == "manifest"))
            child.start()
            running.append((case, child, work, desc, target))
            if len(running) >= 4:
                finish(running.pop(0))
        for item in running:
            finish(item)
    finally:
        gc.unfreeze()
    assert _tree(root / "outside") == outside_before, "a file outside the stores changed"
    print(f"\n{n} mutated {kind} files: {outcomes}")
    return outcomes


def test_500_mutated_index_files_never_crash_and_stay_inside(base):
    outcomes = _run("index", N_INDEX, base)
    assert sum(outcomes.values()) == N_INDEX
    assert outcomes.get("rebuilt", 0) >= N_INDEX // 2, f"most mutations must be caught and rebuilt: {outcomes}"


def test_500_mutated_safetensors_headers_never_crash_and_stay_inside(base):
    outcomes = _run("latent", N_HEADER, base)
    assert sum(outcomes.values()) == N_HEADER
    assert outcomes.get("quarantined", 0) >= N_HEADER * 3 // 4, f"most mutations must be quarantined: {outcomes}"


def test_100_mutated_manifests_never_crash_and_stay_inside(base):
    """Cells of the manifest rewritten with types and values CHAI never writes: the store opens and
    repairs, or says in one line what is wrong; no traceback, no crash, nothing touched outside."""
    outcomes = _run("manifest", N_MANIFEST, base)
    assert sum(outcomes.values()) == N_MANIFEST
