"""Every workflow in workflows/ against the node definitions, and the batch workflow run in-process.

* Layout of the folder: ComfyUI lists every ``*.json`` directly under a pack's ``workflows/`` in
  Workflow -> Browse Templates, titled by its file name, with the same-name ``.jpg`` as its
  thumbnail, and an API-format file there wipes the user's graph when clicked. So ``workflows/``
  holds only UI-format workflows, each with a thumbnail; their API-format twins live in
  ``workflows/api/`` (not listed).
* Saved view: no node overlaps another, and every node is on screen at the saved zoom and offset
  in a 1600x1000 window (the editor's canvas and overlays measured in ComfyUI 0.3.64).
* API format (what POST /prompt runs): every class exists, every required input is given, no
  unknown input, literals valid (combo options, INT/FLOAT ranges, types), every link points at an
  existing output whose type the input accepts.
* UI format (what the ComfyUI editor loads): node types exist, the links table agrees with both
  ends and with the definitions, widgets_values match the widget inputs one for one, and the
  graph converts to exactly its API-format twin.
* The batch API workflow runs through a small executor that follows ComfyUI's list semantics
  (a node runs once per list element, node by node); later prompts must hit entries stored by
  earlier prompts of the same batch.

The two ComfyUI core nodes the workflows use (CreateVideo, SaveVideo) are described by
:data:`CORE_NODES`, copied from ``GET /object_info`` of a ComfyUI 0.3.64 server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comfyui_chai.nodes import NODES, models, registry
from comfyui_chai.nodes.comfy_v3 import io, node_info

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
API_WORKFLOWS = WORKFLOWS / "api"
#: UI workflow in workflows/ (its file name is the title Browse Templates shows) -> its API twin in workflows/api/.
TWINS = {
    "CHAI single prompt (tiny test model).json": "chai_single.json",
    "CHAI batch (tiny test model).json": "chai_batch.json",
    "CHAI batch (reference model).json": "chai_batch_reference.json",
}
#: Node ids the saved workflows use: renaming one breaks every workflow users saved.
NODE_IDS = {"CHAI_LoadSTDiT3", "CHAI_LoadVAE", "CHAI_LoadTextEncoder", "CHAI_PromptList", "CHAI_TextEncode",
            "CHAI_EntityExtractor", "CHAI_Cache", "CHAI_CacheLookup", "CHAI_CacheAttentionSettings", "CHAI_Sampler",
            "CHAI_VAEDecode", "CHAI_CacheState", "CHAI_IntraCacheSettings", "CHAI_ChorusSettings"}
VIRTUAL_UI_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only, never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}

# The editor in a 1600x1000 window (ComfyUI 0.3.64, frontend 1.27.10, headless Chromium), screen pixels
# (left, top, right, bottom): the graph canvas, and the minimap and zoom controls drawn over its corner.
CANVAS = (64, 78, 1600, 1000)
OVERLAYS = [(1306, 734, 1556, 934), (1277, 939, 1584, 984)]
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar sits above its pos
BADGE_HEIGHT = 24  # the node-source badge ("CHAI") drawn above the title bar
EDGE = 8  # screen pixels kept free along the canvas edges

# GET /object_info of ComfyUI 0.3.64 (Comfy-Org/ComfyUI a125cd84), the parts the workflows use.
CORE_NODES = {
    "CreateVideo": {
        "input": {"required": {"images": ["IMAGE", {}],
                               "fps": ["FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}]},
                  "optional": {"audio": ["AUDIO", {}]}},
        "output": ["VIDEO"], "output_is_list": [False], "output_node": False,
    },
    "SaveVideo": {
        "input": {"required": {"video": ["VIDEO", {}],
                               "filename_prefix": ["STRING", {"default": "video/ComfyUI", "multiline": False}],
                               "format": ["COMBO", {"default": "auto", "options": ["auto", "mp4"]}],
                               "codec": ["COMBO", {"default": "auto", "options": ["auto", "h264"]}]}},
        "output": [], "output_is_list": [], "output_node": True,
    },
}


def definition(class_type: str) -> dict:
    """Node definition in /object_info's shape: input sections, output types, list flags."""
    if class_type in CORE_NODES:
        return CORE_NODES[class_type]
    if class_type not in NODES:
        raise KeyError(class_type)
    info = node_info(NODES[class_type])
    return {"input": {k: info["input"].get(k, {}) for k in ("required", "optional")}, "output": info["output"],
            "output_is_list": info["output_is_list"], "output_node": info["output_node"]}


def input_spec(defn: dict, name: str):
    for section in ("required", "optional"):
        if name in defn["input"].get(section, {}):
            return defn["input"][section][name]
    return None


def input_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES or spec[0] == "COMBO"


def accepts(input_t: str, output_t: str) -> bool:
    """ComfyUI's rule: '*' matches anything; comma lists are unions."""
    if "*" in (input_t, output_t):
        return True
    return bool(set(input_t.split(",")) & set(output_t.split(",")))


def check_literal(where: str, spec, value) -> None:
    kind, opts = spec[0], spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list) or kind == "COMBO":
        options = kind if isinstance(kind, list) else opts["options"]
        assert value in options, f"{where}: {value!r} is not one of {options[:8]}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where}: {value} out of range"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a FLOAT"
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where}: {value} out of range"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a BOOLEAN"
    else:
        raise AssertionError(f"{where}: a literal was given for the socket type {kind}")


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def load(path: Path) -> dict:
    """A workflow; skips the test when it names a bundled model (``pack: <name>``) that this
    checkout does not hold (the reference model's checkpoint is committed separately)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if "nodes" in data:  # UI format
        values = [v for n in data["nodes"] for v in n.get("widgets_values", [])]
    else:  # API format
        values = [v for n in data.values() for v in n["inputs"].values()]
    missing = {v for v in values if isinstance(v, str) and v.startswith("pack: ") and v not in models.bundled_models()}
    if missing:
        pytest.skip(f"{path.name} uses {sorted(missing)}, not in this checkout's models/ folder")
    return data


def is_api_format(data) -> bool:
    """``{node_id: {"class_type", "inputs"}}``: what POST /prompt takes, not what the editor loads."""
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "class_type" in v
                                                          for v in data.values())


API_FILES = sorted(API_WORKFLOWS.glob("*.json"))
UI_FILES = sorted(WORKFLOWS.glob("*.json"))


def test_workflows_folder_holds_only_ui_workflows_each_with_a_thumbnail():
    from PIL import Image

    assert {p.name for p in UI_FILES} == set(TWINS) and {p.name for p in API_FILES} == set(TWINS.values())
    for path in UI_FILES:
        data = json.loads(path.read_text(encoding="utf-8"))
        assert not is_api_format(data), f"{path.name} is an API-format workflow: move it to workflows/api/"
        assert data.get("version") == 0.4 and isinstance(data.get("nodes"), list), f"{path.name}: not a UI workflow"
        thumbnail = path.with_suffix(".jpg")
        assert thumbnail.is_file(), f"{path.name} has no thumbnail {thumbnail.name} (a frame of its output)"
        assert 1_000 < thumbnail.stat().st_size < 150_000, f"{thumbnail.name}: {thumbnail.stat().st_size} bytes"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and min(image.size) >= 128, f"{thumbnail.name}: {image.format} {image.size}"
            assert max(image.convert("L").getextrema()) > 0, f"{thumbnail.name} is blank"
    assert {p.stem for p in WORKFLOWS.glob("*.jpg")} == {p.stem for p in UI_FILES}  # no thumbnail without workflow
    for path in API_FILES:
        assert is_api_format(json.loads(path.read_text(encoding="utf-8"))), f"{path} is not in API format"


def test_node_ids_never_change():
    assert set(NODES) == NODE_IDS
    used = {n["type"] for p in UI_FILES for n in json.loads(p.read_text(encoding="utf-8"))["nodes"]}
    assert used <= NODE_IDS | set(CORE_NODES) | VIRTUAL_UI_NODES


def screen_box(node: dict, scale: float, offset) -> tuple:
    """A UI node's rectangle on screen (left, top, right, bottom), title bar and badge included."""
    (x, y), (w, h) = node["pos"], node["size"]
    top = y - TITLE_HEIGHT - BADGE_HEIGHT
    return (CANVAS[0] + (x + offset[0]) * scale, CANVAS[1] + (top + offset[1]) * scale,
            CANVAS[0] + (x + w + offset[0]) * scale, CANVAS[1] + (y + h + offset[1]) * scale)


def overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_saved_view_shows_every_node_and_none_overlaps(path):
    ui = json.loads(path.read_text(encoding="utf-8"))
    ds = ui["extra"]["ds"]
    scale, offset = float(ds["scale"]), ds["offset"]
    assert 0.6 <= scale <= 1.5, f"{path.name}: saved zoom {scale} (text becomes unreadable below 0.6)"
    boxes = {n["id"]: screen_box(n, scale, offset) for n in ui["nodes"]}
    for node in ui["nodes"]:
        box = boxes[node["id"]]
        where = f"{path.name} node {node['id']} ({node['type']}) at {tuple(round(v) for v in box)}"
        assert not node.get("flags", {}).get("collapsed"), f"{where} is collapsed"
        assert (CANVAS[0] + EDGE <= box[0] and CANVAS[1] + EDGE <= box[1] and box[2] <= CANVAS[2] - EDGE
                and box[3] <= CANVAS[3] - EDGE), f"{where} is outside the 1600x1000 view"
        for cover in OVERLAYS:
            assert not overlap(box, cover), f"{where} is under the minimap or the zoom controls {cover}"
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            assert not overlap(boxes[a], boxes[b]), f"{path.name}: nodes {a} and {b} overlap"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_workflow_against_definitions(path):
    prompt = load(path)
    name = path.name
    assert prompt and all(isinstance(k, str) for k in prompt)
    outputs_seen = False
    for node_id, node in prompt.items():
        defn = definition(node["class_type"])
        outputs_seen |= defn["output_node"]
        for req in defn["input"].get("required", {}):
            assert req in node["inputs"], f"{name} node {node_id}: required input {req!r} missing"
        for key, value in node["inputs"].items():
            spec = input_spec(defn, key)
            assert spec is not None, f"{name} node {node_id}: unknown input {key!r}"
            where = f"{name} node {node_id} ({node['class_type']}).{key}"
            if is_link(value):
                src, slot = value
                assert src in prompt, f"{where}: links to missing node {src}"
                src_out = definition(prompt[src]["class_type"])["output"]
                assert 0 <= slot < len(src_out), f"{where}: output {slot} of node {src} does not exist"
                assert accepts(input_type(spec), src_out[slot]), f"{where}: {src_out[slot]} into {input_type(spec)}"
            else:
                check_literal(where, spec, value)
    assert outputs_seen, f"{name} has no output node"


def ui_widget_names(defn: dict) -> list:
    """Names of widgets_values entries in order (a seed's control_after_generate takes one more)."""
    names = []
    for section in ("required", "optional"):
        for key, spec in defn["input"].get(section, {}).items():
            if is_widget(spec):
                names.append(key)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    names.append(None)
    return names


def ui_to_api(ui: dict) -> dict:
    """What the frontend sends for a UI graph (virtual nodes dropped, widgets and links resolved)."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_UI_NODES:
            continue
        defn = definition(node["type"])
        inputs = {}
        values = iter(node.get("widgets_values", []))
        for key in ui_widget_names(defn):
            value = next(values)
            if key is not None:
                inputs[key] = value
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_against_definitions(path):
    ui = load(path)
    name = path.name
    assert ui["version"] == 0.4 and {"nodes", "links", "last_node_id", "last_link_id"} <= set(ui)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and max(nodes) <= ui["last_node_id"]
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_UI_NODES:
            continue
        defn = definition(node["type"])
        widgets = ui_widget_names(defn)
        assert len(node["widgets_values"]) == len(widgets), f"{name} node {node['id']}: widgets_values length"
        for key, value in zip(widgets, node["widgets_values"]):
            if key is not None:
                check_literal(f"{name} node {node['id']}.{key}", input_spec(defn, key), value)
            else:
                assert value in ("fixed", "increment", "decrement", "randomize")
        assert [o["type"] for o in node["outputs"]] == defn["output"], f"{name} node {node['id']}: outputs"
        for inp in node["inputs"]:
            spec = input_spec(defn, inp["name"])
            assert spec is not None and inp["type"] == input_type(spec), f"{name} node {node['id']}.{inp['name']}"
    assert max((link[0] for link in ui["links"]), default=0) <= ui["last_link_id"]
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        assert out["type"] == kind and link_id in out["links"], f"{name} link {link_id}: source side"
        inp = nodes[dst]["inputs"][dst_slot]
        assert inp["link"] == link_id, f"{name} link {link_id}: target side"
        assert accepts(inp["type"], kind), f"{name} link {link_id}: {kind} into {inp['type']}"
    for node in ui["nodes"]:
        for inp in node.get("inputs", []):
            assert inp["link"] is None or any(link[0] == inp["link"] for link in ui["links"])


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_matches_its_api_twin(path):
    converted = ui_to_api(load(path))
    twin = {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
            for k, v in load(API_WORKFLOWS / TWINS[path.name]).items()}
    assert converted == twin


# ------------------------------------------------------------------------------ the batch, in-process


def run_api_prompt(prompt: dict, core: dict) -> dict:
    """Execute an API-format prompt with ComfyUI's list semantics; core nodes come from ``core``.

    Each node runs once per element of its longest list input (shorter lists repeat their last
    element) unless its schema says ``is_input_list``; list outputs (``output_is_list``) are flattened.
    Returns ``{node_id: {"outputs": [list per slot], "ui": [ui dicts]}}``.
    """
    done: dict = {}

    def run(node_id):
        if node_id in done:
            return done[node_id]
        node = prompt[node_id]
        cls = NODES.get(node["class_type"]) or core[node["class_type"]]
        inputs = {}
        for key, value in node["inputs"].items():
            inputs[key] = run(value[0])["outputs"][value[1]] if is_link(value) else [value]
        defn = definition(node["class_type"])
        out_lists = [[] for _ in defn["output"]]
        uis = []
        if node["class_type"] in NODES and NODES[node["class_type"]].GET_SCHEMA().is_input_list:
            calls = [inputs]
        else:
            n = max((len(v) for v in inputs.values()), default=1)
            calls = [{k: v[min(i, len(v) - 1)] for k, v in inputs.items()} for i in range(n)]
        flags = defn["output_is_list"]
        for kwargs in calls:
            out = cls.execute(**kwargs)
            uis.append(out.ui or {})
            for slot, value in enumerate(out.args):
                out_lists[slot].extend(value if flags[slot] else [value])
        done[node_id] = {"outputs": out_lists, "ui": uis}
        return done[node_id]

    for node_id in prompt:
        run(node_id)
    return done


class _CreateVideo:
    @classmethod
    def execute(cls, images, fps):
        assert isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[-1] == 3
        return io.NodeOutput((images, fps))


class _SaveVideo:
    saved: list = []

    @classmethod
    def execute(cls, video, filename_prefix, format, codec):
        _SaveVideo.saved.append((filename_prefix, tuple(video[0].shape), video[1]))
        return io.NodeOutput(ui={"images": [filename_prefix]})


def test_batch_workflow_runs_and_later_prompts_hit(tmp_path):
    prompt = load(API_WORKFLOWS / "chai_batch.json")
    for node in prompt.values():
        if node["class_type"] == "CHAI_Cache":
            node["inputs"].update(folder=str(tmp_path / "store"), create_new=True)
        if node["class_type"] == "CHAI_Sampler":  # smaller and shorter than the example, same graph
            node["inputs"].update(height=32, width=32, steps=6, fast_steps=4)
        if node["class_type"] == "CHAI_LoadTextEncoder":
            node["inputs"]["text_encoder"] = "tiny: hashed-word captions (for the tiny model, no model files)"
    _SaveVideo.saved = []
    try:
        done = run_api_prompt(prompt, {"CreateVideo": _CreateVideo, "SaveVideo": _SaveVideo})
    finally:
        registry.close_all()
    prompts = [n for n in prompt.values() if n["class_type"] == "CHAI_PromptList"][0]["inputs"]["prompts"]
    n_prompts = len([p for p in prompts.splitlines() if p.strip()])
    sampler_id = next(k for k, v in prompt.items() if v["class_type"] == "CHAI_Sampler")
    latents = done[sampler_id]["outputs"][0]
    modes = [lat["chai"]["mode"] for lat in latents]
    assert len(modes) == n_prompts == len(_SaveVideo.saved)
    assert modes[0] == "full" and "fast" in modes  # later prompts reuse what earlier ones stored
    assert all(shape[0] == 17 and shape[1:] == (32, 32, 3) for _p, shape, _fps in _SaveVideo.saved)
    assert all(fps == 24.0 for *_x, fps in _SaveVideo.saved)
    state_id = next(k for k, v in prompt.items() if v["class_type"] == "CHAI_CacheState")
    panel = done[state_id]["ui"]
    assert len(panel) == 1  # is_input_list: one panel update for the whole batch
    stats = panel[0]["chai_stats"][0]["stats"]
    assert stats["lookups"] == n_prompts and stats["hits"] == modes.count("fast")
    assert stats["entries"] == modes.count("full")
