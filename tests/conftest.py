"""Shared pytest fixtures: offline model loading, one torch thread, paths to ../shared."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    env = os.environ.get("CHAI_SHARED_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared"


SHARED_DIR = _shared_dir()
FIXTURES_DIR = SHARED_DIR / "fixtures" / "opensora_v1_2"
VBENCH_DIR = SHARED_DIR / "data" / "vbench"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a test requirement
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The golden OpenSora 1.2 fixtures (../shared/fixtures/opensora_v1_2, or $CHAI_SHARED_DIR)."""
    if not FIXTURES_DIR.is_dir():
        pytest.fail(f"golden fixtures not found at {FIXTURES_DIR}; set CHAI_SHARED_DIR to the shared/ folder")
    return FIXTURES_DIR
