"""The package's seams, read from the source: who may import whom, and who may touch a store's files.

* ``cache/`` and ``opensora/`` never import each other; the reference model (``refmodel/``) is a model
  family beside OpenSora: it imports neither ``cache/`` nor the pipeline;
* outside ``cache/store.py`` and ``cache/backend.py`` nothing constructs the folder store, runs SQLite or
  reads a store's private attributes: every caller goes through ``cache.backend.open_store`` and the
  ``StoreBackend`` protocol;
* ``pipeline`` re-exports its public names, so ``comfyui_chai.pipeline.ChaiPipeline`` keeps working.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "opensora", "refmodel", "pipeline", "nodes", "cli")


def _sources(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _imported_packages(path: Path) -> set:
    """Top-level packages of comfyui_chai that ``path`` imports (relative or absolute, any depth)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(ROOT).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("comfyui_chai."):
                parts = node.module.split(".")[1:]
            else:
                continue
            names = parts[:1] if parts else [alias.name for alias in node.names]
            found.update(n for n in names if n in PACKAGES)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("comfyui_chai."):
                    found.add(alias.name.split(".")[1])
    return found - set(package[:1])


@pytest.mark.parametrize("folder, forbidden", [
    ("cache", {"opensora", "pipeline", "refmodel", "nodes", "cli"}),
    ("opensora", {"cache", "pipeline", "refmodel", "nodes", "cli"}),
    ("refmodel", {"cache", "pipeline", "nodes", "cli"}),
    ("pipeline", {"nodes", "cli"}),
])
def test_packages_import_only_downwards(folder, forbidden):
    bad = {str(p.relative_to(ROOT)): sorted(_imported_packages(p) & forbidden) for p in _sources(folder)}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_only_the_store_touches_store_files():
    # The store and its parts (store_manifest, store_files, store_index, store_budget, store_types).
    allowed = {ROOT / "cache" / "backend.py", *(ROOT / "cache").glob("store*.py")}
    offenders = []
    for path in _sources(*PACKAGES, "bench"):
        if path in allowed or path.name == "cache_bench.py":  # the store's own benchmark measures the class
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if "sqlite3" in names or "LatentStore" in names:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {names}")
            if isinstance(node, ast.Attribute) and node.attr in ("_closed", "_conn", "_tx", "_lock", "index"):
                if isinstance(node.value, ast.Attribute) and node.value.attr == "store" or \
                        isinstance(node.value, ast.Name) and node.value.id == "store":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} reads store.{node.attr}")
    assert not offenders, offenders


def test_pipeline_public_names_are_re_exported():
    import comfyui_chai.pipeline as pipeline

    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
    from comfyui_chai.pipeline import ChaiPipeline, tiny_components, write_video  # noqa: F401
    from comfyui_chai.pipeline.core import ChaiPipeline as Core

    assert ChaiPipeline is Core
