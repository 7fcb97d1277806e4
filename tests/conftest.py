"""Shared pytest fixtures: offline model loading, one torch thread, the golden fixtures folder."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


# Golden tensors and key lists from the official OpenSora 1.2 code, copied into the repository so a
# fresh clone passes its tests with nothing beside it (how they were made: the folder's README.md).
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures" / "opensora_v1_2"


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
    """The golden OpenSora 1.2 fixtures (tests/fixtures/opensora_v1_2)."""
    if not FIXTURES_DIR.is_dir():
        pytest.fail(f"golden fixtures not found at {FIXTURES_DIR}; the repository's tests/fixtures folder is incomplete")
    return FIXTURES_DIR


@pytest.fixture(autouse=True, scope="session")
def _private_config_dir(tmp_path_factory):
    """Keep the per-user index key (cache/index_file.py) of the test run out of the real home."""
    os.environ["CHAI_CONFIG_DIR"] = str(tmp_path_factory.mktemp("chai-config"))
    yield
