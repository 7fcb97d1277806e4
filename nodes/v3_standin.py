"""A thin stand-in for the parts of ComfyUI's V3 node API (``comfy_api.v0_0_2.io``) the pack uses,
so the node classes import, describe themselves and run without ComfyUI (tests, scripts).

Inside ComfyUI the real module is used instead (:mod:`.comfy_v3`); this one exists only so the pack
stays importable and testable on a machine without ComfyUI. It is written from the API's public
description (reference/comfyui.md section 5; docs.comfy.org "V3 migration"): the same names,
constructor keywords and V1-compatible node description (``GET_NODE_INFO_V1``, the shape
``GET /object_info`` serves), nothing more. What it does not do: validate inputs against their
ranges, lock the class during ``execute``, or run lists (the executor does that).
"""

from __future__ import annotations

import enum
from typing import Any, Dict, List, Optional

__all__ = ["ComfyNode", "Schema", "NodeOutput", "Hidden", "HiddenHolder", "Custom", "Int", "Float", "String",
           "Boolean", "Combo", "Latent", "Image", "NumberDisplay", "ComfyExtension"]


def _pruned(values: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class NumberDisplay(str, enum.Enum):
    """How a number widget is drawn."""

    number = "number"
    slider = "slider"


class Hidden(str, enum.Enum):
    """Hidden inputs a node may ask for; the value is the V1 name."""

    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class HiddenHolder:
    """The hidden inputs of one execution (``cls.hidden``); a value not given reads as None."""

    def __init__(self, values: Optional[Dict[Any, Any]] = None) -> None:
        values = values or {}
        for hidden in Hidden:
            setattr(self, hidden.name, values.get(hidden, values.get(hidden.value)))


# Keyword -> key in the V1 description, per widget kind (None: not part of the description).
_WIDGET_KEYS = {"default": "default", "min": "min", "max": "max", "step": "step", "round": "round",
                "control_after_generate": "control_after_generate", "display_mode": "display",
                "multiline": "multiline", "placeholder": "placeholder", "dynamic_prompts": "dynamicPrompts",
                "label_on": "label_on", "label_off": "label_off", "force_input": "forceInput",
                "socketless": "socketless", "options": "options"}


# Options the real API puts in every description of an input of these types.
_ALWAYS = {"STRING": {"multiline": False}, "COMBO": {"multiselect": False}}


class _Input:
    """One input: a socket, or a widget with its options."""

    io_type = "*"

    def __init__(self, id: str, display_name: Optional[str] = None, optional: bool = False,  # noqa: A002
                 tooltip: Optional[str] = None, lazy: Optional[bool] = None, **options: Any) -> None:
        unknown = set(options) - set(_WIDGET_KEYS)
        if unknown:
            raise TypeError(f"input {id!r}: unknown option(s) {sorted(unknown)}")
        self.id, self.display_name, self.optional, self.tooltip, self.lazy = id, display_name, optional, tooltip, lazy
        self.options = options

    def get_io_type(self) -> str:
        """The V1 type name (``"INT"``, ``"COMBO"``, ``"CHAI_CACHE"``...)."""
        return self.io_type

    def as_dict(self) -> Dict[str, Any]:
        """The options of the V1 description (without ``optional``, which picks the section); strings
        and combos carry the ``multiline`` / ``multiselect`` flag the real API always sends."""
        values = {"display_name": self.display_name, "tooltip": self.tooltip, "lazy": self.lazy,
                  **_ALWAYS.get(self.io_type, {})}
        for key, value in self.options.items():
            values[_WIDGET_KEYS[key]] = value.value if isinstance(value, enum.Enum) else value
        return _pruned(values)


class _Output:
    """One output socket."""

    io_type = "*"

    def __init__(self, id: Optional[str] = None, display_name: Optional[str] = None,  # noqa: A002
                 tooltip: Optional[str] = None, is_output_list: bool = False) -> None:
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list


def Custom(io_type: str) -> type:  # noqa: N802 - the real API's name
    """A socket type named ``io_type`` (any Python object flows through it), with ``.Input`` and ``.Output``."""
    input_cls = type("Input", (_Input,), {"io_type": io_type})
    output_cls = type("Output", (_Output,), {"io_type": io_type})
    return type(io_type, (), {"io_type": io_type, "Input": input_cls, "Output": output_cls})


Int = Custom("INT")
Float = Custom("FLOAT")
String = Custom("STRING")
Boolean = Custom("BOOLEAN")
Combo = Custom("COMBO")
Latent = Custom("LATENT")
Image = Custom("IMAGE")


class Schema:
    """What a node is: id, display name, category, inputs, outputs, hidden inputs and flags."""

    def __init__(self, node_id: str, display_name: Optional[str] = None, category: str = "sd",
                 inputs: Optional[List[_Input]] = None, outputs: Optional[List[_Output]] = None,
                 hidden: Optional[List[Hidden]] = None, description: str = "", is_input_list: bool = False,
                 is_output_node: bool = False, is_deprecated: bool = False, is_experimental: bool = False,
                 not_idempotent: bool = False) -> None:
        self.node_id, self.display_name, self.category = node_id, display_name, category
        self.inputs, self.outputs, self.hidden = list(inputs or []), list(outputs or []), list(hidden or [])
        self.description, self.is_input_list, self.is_output_node = description, is_input_list, is_output_node
        self.is_deprecated, self.is_experimental, self.not_idempotent = is_deprecated, is_experimental, not_idempotent

    def finalize(self) -> "Schema":
        """Output nodes get the prompt hidden inputs; outputs without an id get one. Raises ValueError
        on duplicate ids."""
        if self.is_output_node:
            self.hidden += [h for h in (Hidden.prompt, Hidden.extra_pnginfo) if h not in self.hidden]
        for index, output in enumerate(self.outputs):
            output.id = output.id or f"_{index}_{output.io_type}_"
        ids = [i.id for i in self.inputs] + [o.id for o in self.outputs]
        if len(ids) != len(set(ids)):
            raise ValueError(f"{self.node_id}: input and output ids must be unique, got {ids}")
        return self


class NodeOutput:
    """What ``execute`` returns: the output values in order, and optional display data (``ui``)."""

    def __init__(self, *args: Any, ui: Optional[Dict[str, Any]] = None) -> None:
        self.args, self.ui = args, ui

    @property
    def result(self) -> Optional[tuple]:
        """The output values, or None for a node without outputs."""
        return self.args if self.args else None

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class ComfyNode:
    """Base of a V3 node: classmethods only, no instance state."""

    hidden: Optional[HiddenHolder] = None

    @classmethod
    def define_schema(cls) -> Schema:
        """The node's :class:`Schema` (every node defines it)."""
        raise TypeError(f"{cls.__name__} defines no schema")

    @classmethod
    def execute(cls, **inputs: Any) -> NodeOutput:
        """Run the node (every node defines it)."""
        raise TypeError(f"{cls.__name__} defines no execute")

    @classmethod
    def PREPARE_CLASS_CLONE(cls, hidden_inputs: Optional[Dict[Any, Any]]) -> type:  # noqa: N802
        """A subclass carrying one execution's hidden inputs (``cls.hidden``), as the executor makes."""
        return type(cls.__name__, (cls,), {"hidden": HiddenHolder(hidden_inputs)})

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802
        """The finalized schema."""
        return cls.define_schema().finalize()

    @classmethod
    def GET_NODE_INFO_V1(cls) -> Dict[str, Any]:  # noqa: N802
        """The node as ``GET /object_info`` describes it."""
        schema = cls.GET_SCHEMA()
        inputs: Dict[str, Dict[str, Any]] = {"required": {}}
        for item in schema.inputs:
            inputs.setdefault("optional" if item.optional else "required", {})[item.id] = [item.get_io_type(),
                                                                                          item.as_dict()]
        if schema.hidden:
            inputs["hidden"] = {h.name: [h.value] for h in schema.hidden}
        return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                "output": [o.io_type for o in schema.outputs],
                "output_is_list": [o.is_output_list for o in schema.outputs],
                "output_name": [o.display_name or o.io_type for o in schema.outputs],
                "output_tooltips": [o.tooltip for o in schema.outputs],
                "name": schema.node_id, "display_name": schema.display_name, "description": schema.description,
                "category": schema.category, "output_node": schema.is_output_node,
                "deprecated": schema.is_deprecated, "experimental": schema.is_experimental, "api_node": False,
                "python_module": "custom_nodes.ComfyUI-CHAI"}


class ComfyExtension:
    """What ``comfy_entrypoint()`` returns: lists the extension's node classes."""

    async def on_load(self) -> None:
        """Called once when ComfyUI loads the extension."""

    async def get_node_list(self) -> List[type]:
        """The node classes (every extension defines it)."""
        raise TypeError(f"{type(self).__name__} lists no nodes")
