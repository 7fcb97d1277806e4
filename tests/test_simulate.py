"""The `simulate` replay: real extraction, embedding, lookup, insertion and eviction on a small list."""

import json

import pytest

from comfyui_chai.cache.simulate import entry_tensors, read_prompts, simulate
from comfyui_chai.cli import main

PROMPTS = [
    "a red fox running through snow",
    "a lighthouse on a rocky coast at night",
    "a red fox sleeping under a tree",
    "a sailboat drifting on a calm lake",
    "a lighthouse beam sweeping over waves",
    "a child building a sandcastle on the beach",
    "a fox cub playing in tall grass",
    "a sailboat racing in strong wind",
]


@pytest.fixture(scope="module")
def models():
    from comfyui_chai.cache.embed import Embedder
    from comfyui_chai.cache.entities import EntityExtractor

    return EntityExtractor(), Embedder()


def test_entity_level_beats_whole_prompt_and_budget_limits_entries(models, tmp_path):
    extractor, embedder = models
    shape = (4, 2, 4, 4)
    entry = len(__import__("safetensors.torch", fromlist=["save"]).save(entry_tensors(shape), metadata={"compat_key": "simulate"}))
    tight_mb = 2.5 * entry / 1e6  # room for two entries
    report = simulate(PROMPTS, [tight_mb, 1.0], latent_shape=shape, extractor=extractor, embedder=embedder,
                      progress=False, workdir=tmp_path)
    rows = {(r.mode, r.budget_mb): r for r in report.rows}
    roomy_entity = rows[("entity", 1.0)]
    roomy_prompt = rows[("prompt", 1.0)]
    # fox, lighthouse and sailboat each recur: entity-level matching must hit on the repeats.
    assert roomy_entity.hits >= 3
    assert roomy_entity.hits > roomy_prompt.hits
    assert roomy_entity.evictions == 0 and roomy_entity.entries == len(PROMPTS) - roomy_entity.hits
    tight = rows[("entity", tight_mb)]
    assert tight.entries <= 2 and tight.bytes_held <= tight_mb * 1e6
    assert tight.evictions == len(PROMPTS) - tight.hits - tight.entries
    assert tight.hits <= roomy_entity.hits
    assert "| budget (MiB) |" in report.table()


def test_cli_writes_table_json_and_plot(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n\n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(["simulate", "--prompts", str(prompts), "--budget-mb", "1", "--latent-shape", "4", "2", "4", "4",
                 "--out", str(out), "--no-progress", "--mode", "entity"])
    assert code == 0
    data = json.loads((out / "simulate.json").read_text())
    assert data["prompts"] == 4 and data["rows"][0]["lookups"] == 4
    assert (out / "simulate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "entity-level hit rate" in (out / "simulate.md").read_text()


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts(empty)
    with pytest.raises(ValueError, match="budgets"):
        simulate(["a fox"], [0])
    assert main(["simulate", "--prompts", str(empty), "--no-progress"]) == 2


def test_vbench_json_format_is_read(tmp_path):
    path = tmp_path / "info.json"
    path.write_text(json.dumps([{"prompt_en": "a cat", "dimension": ["x"]}, "a dog", {"prompt": "a cow"}]))
    assert read_prompts(path) == ["a cat", "a dog", "a cow"]
