"""The store interface (cache/backend.py): the protocol, the one factory, scheme dispatch, MiB budgets.

The folder store must satisfy :class:`StoreBackend` member for member, callers reach it only through
:func:`open_store`, and a budget given as the same number of MiB to the ComfyUI Cache node and to the
command line sets the same byte budget on one store.
"""

from __future__ import annotations

import hashlib
import inspect
import re

import numpy as np
import pytest

from _store_util import DIM, put_seeded
from comfyui_chai.cache import backend
from comfyui_chai.cache.backend import StoreBackend, mib_to_bytes, open_store
from comfyui_chai.cache.store import LatentStore, StoreError


def _protocol_members():
    return [n for n in dir(StoreBackend) if not n.startswith("_") or n in ("__len__", "__enter__", "__exit__")] + \
        list(StoreBackend.__annotations__)


def test_the_folder_store_satisfies_the_protocol(tmp_path):
    with open_store(tmp_path / "s", dim=DIM) as store:
        assert isinstance(store, LatentStore) and isinstance(store, StoreBackend)
        for name in _protocol_members():
            assert hasattr(store, name), name
        # Every method of the protocol takes the arguments the protocol names.
        for name, member in inspect.getmembers(StoreBackend, inspect.isfunction):
            if name.startswith("_") and name not in ("__len__",):
                continue
            want = list(inspect.signature(member).parameters)
            have = list(inspect.signature(getattr(LatentStore, name)).parameters)
            assert have[: len(want)] == want, (name, have, want)
        assert store.location == str((tmp_path / "s").resolve()) and not store.closed
        assert store.budget_bytes == 1 << 30 and store.policy == "lru" and store.compat_keys() == []
        first = put_seeded(store, 1)
        put_seeded(store, 2)
        assert store.compat_keys() == sorted({e.compat_key for e in store.entries()})
        generation = store.generation
        store.set_policy("fifo")
        assert store.policy == "fifo" and store.generation == generation  # a policy is not an entry change
        with pytest.raises(ValueError, match="policy"):
            store.set_policy("mru")
        assert store.delete([first]) == 1 and store.generation > generation
    assert store.closed
    with open_store(tmp_path / "s") as again:  # policy and budget live in the store
        assert again.policy == "fifo" and len(again) == 1


def test_open_store_creates_only_when_asked_and_dispatches_by_scheme(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(StoreError, match="is not a CHAI store"):
        open_store(missing, create=False)
    assert not missing.exists() and not backend.store_exists(missing)
    assert backend.generation_of(missing) is None
    with open_store(missing, budget_bytes=mib_to_bytes(3), policy="lfu") as store:
        put_seeded(store, 5)
        assert (store.budget_bytes, store.policy) == (3 << 20, "lfu")
        generation = store.generation
    assert backend.store_exists(missing) and backend.generation_of(missing) == generation
    assert backend.read_stats(missing).entries == 1
    with open_store(str(missing), create=False) as store:  # str or Path, same store
        assert store.generation == generation and store.budget_bytes == 3 << 20
    # Backend tuning reaches the folder store's config.
    with open_store(tmp_path / "fast", options={"durable": False, "autosave_every": 7}, dim=DIM) as store:
        assert store.config.durable is False and store.config.autosave_every == 7
    with pytest.raises(TypeError):
        open_store(tmp_path / "bad-option", options={"no_such_option": 1})

    # A URL is dispatched by its scheme: unknown schemes are refused before anything is touched ...
    with pytest.raises(StoreError, match=r"no store backend handles mysql:// locations"):
        open_store("mysql://chai@render-farm/cache")
    # postgresql:// goes to cache/pgstore.py (tests/test_pgstore.py): here only its refusal of a password.
    with pytest.raises(StoreError, match="holds a password"):
        open_store("postgresql://chai:secret@render-farm/cache")
    assert backend.location_scheme("postgresql://x/y") == "postgresql" and backend.location_scheme(missing) == ""
    with pytest.raises(ValueError, match="empty"):
        open_store("  ")

    # ... and a registered backend receives every keyword of the factory.
    seen = {}

    def opener(location, **kwargs):
        seen.update(location=location, **kwargs)
        folder = tmp_path / ("via-" + hashlib.sha256(location.encode()).hexdigest()[:8])
        return open_store(folder, budget_bytes=kwargs["budget_bytes"], policy=kwargs["policy"], dim=kwargs["dim"])

    backend.register_backend("chaitest", opener, read_stats=lambda loc, last=10: None, exists=lambda loc: False)
    try:
        with open_store("chaitest://host/db", budget_bytes=5 << 20, policy="fifo", dim=DIM) as store:
            assert (store.budget_bytes, store.policy, store.dim) == (5 << 20, "fifo", DIM)
        assert seen == {"location": "chaitest://host/db", "budget_bytes": 5 << 20, "policy": "fifo", "dim": DIM,
                        "create": True, "options": None, "evict_to_fit": False}
        assert backend.store_exists("chaitest://host/db") is False
    finally:
        del backend.BACKENDS["chaitest"]
    with pytest.raises(ValueError, match="scheme"):
        backend.register_backend("Not A Scheme", opener, read_stats=None, exists=None)


def test_mib_is_the_one_budget_unit():
    assert mib_to_bytes(1) == 1 << 20 and mib_to_bytes(1024) == 1 << 30 and mib_to_bytes(0.5) == 1 << 19
    assert backend.bytes_to_mib(3 << 20) == 3.0
    for bad in (0, -1, float("inf"), float("nan"), "5", True, 1e-9):
        with pytest.raises(ValueError, match="MiB"):
            mib_to_bytes(bad)


class _CommaExtractor:
    fingerprint = "comma-v1"

    def __init__(self, mode="entity"):
        self.mode = mode

    def extract(self, prompt):
        return [p.strip().lower() for p in prompt.split(",") if p.strip()]

    def normalize_prompt(self, prompt):
        return " ".join(prompt.lower().split())


class _WordEmbedder:
    fingerprint = "words-v1"
    dim = 8

    def encode(self, texts):
        out = []
        for text in texts:
            v = np.zeros(self.dim, dtype=np.float32)
            for w in re.findall(r"\w+", text):
                v[int(hashlib.sha256(w.encode()).hexdigest(), 16) % self.dim] += 1.0
            out.append(v / max(float(np.linalg.norm(v)), 1e-6))
        return np.asarray(out, dtype=np.float32)


def test_the_cache_node_and_the_command_line_set_the_same_bytes_for_the_same_mib(tmp_path, monkeypatch):
    import comfyui_chai.cache.embed as embed_mod
    import comfyui_chai.cache.entities as entities_mod
    from comfyui_chai.cli import main
    from comfyui_chai.nodes import NODE_CLASS_MAPPINGS, registry

    monkeypatch.setattr(entities_mod, "EntityExtractor", _CommaExtractor)
    monkeypatch.setattr(embed_mod, "Embedder", _WordEmbedder)
    folder = tmp_path / "shared-store"
    (tmp_path / "p.txt").write_text("a red fox, snow\n")

    def by_node(mib):
        try:
            handle, = NODE_CLASS_MAPPINGS["CHAI_Cache"]().open(str(folder), mib, "lru")
            return handle.store.budget_bytes
        finally:
            registry.close_all()

    def by_cli(mib):
        assert main(["generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--store",
                     str(folder), "--model", "tiny", "--captions", "hashed", "--no-progress", "--num-frames", "1",
                     "--full-steps", "2", "--fast-steps", "1", "--cache-steps", "--budget-mb", str(mib)]) == 0
        with open_store(folder, create=False) as store:
            return store.budget_bytes

    node_3 = by_node(3)
    cli_5 = by_cli(5)
    assert cli_5 != node_3  # each call really sets the budget ...
    assert by_node(5) == cli_5 == 5 << 20  # ... and the same number of MiB is the same bytes
    assert by_cli(3) == node_3 == 3 << 20
