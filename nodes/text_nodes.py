"""CHAI text nodes: a prompt list (batches), Text Encode and the Entity Extractor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from . import host, registry
from .models import ChaiConditioning, ChaiTextEncoder

__all__ = ["CHAIPromptList", "CHAITextEncode", "CHAIEntityExtractor", "ChaiEntities", "parse_prompt_list"]


def _require(value, cls, what: str, source: str):
    if not isinstance(value, cls):
        raise TypeError(f"{what} must come from a {source} node, got {type(value).__name__}")
    return value


def parse_prompt_list(text: str) -> List[str]:
    """One prompt per non-empty line; lines starting with ``#`` are comments.

    Raises:
        ValueError: no prompt in the text.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompts must be text, got {type(text).__name__}")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError("the prompt list is empty: write one prompt per line")
    return prompts


class CHAIPromptList:
    """Turns a block of text into a list of prompts, so the nodes after it run once per prompt."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prompts": ("STRING", {
            "multiline": True, "default": "a red fox running through snow\na red fox sleeping in a forest",
            "tooltip": "One prompt per line (blank lines and lines starting with # are skipped). Related prompts "
                       "that share an entity (a fox, a beach) hit the cache after the first one."})}}

    RETURN_TYPES = ("STRING", "INT")
    RETURN_NAMES = ("prompt", "count")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_TOOLTIPS = ("The prompts as a list: every node downstream runs once per prompt, in order.",
                       "How many prompts the list holds.")
    FUNCTION = "split"
    CATEGORY = "CHAI"
    DESCRIPTION = ("Batch of related prompts: connect 'prompt' to CHAI Text Encode's text input and every node "
                   "after it runs once per prompt, in order. The CHAI Sampler looks each prompt up just before "
                   "sampling it, so a prompt can hit the entry an earlier prompt of the same batch stored.")

    def split(self, prompts):
        """Returns (list of prompts, count). Raises ValueError on an empty list."""
        items = parse_prompt_list(prompts)
        return (items, len(items))


class CHAITextEncode:
    """Encodes one prompt into OpenSora caption embeddings."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("CHAI_TEXT_ENCODER", {"tooltip": "From CHAI Load Text Encoder."}),
            "text": ("STRING", {"multiline": True, "default": "a red fox running through snow",
                                "tooltip": "The video prompt. Connect a CHAI Prompt List here to run a batch."}),
        }}

    RETURN_TYPES = ("CHAI_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The prompt and its caption embedding [1, 1, L, D], for the Entity Extractor and the Sampler.",)
    FUNCTION = "encode"
    CATEGORY = "CHAI"
    DESCRIPTION = ("Encode a prompt with the loaded text encoder (OpenSora 1.2: caption cleaning, aesthetic score, "
                   "T5-XXL, 300 tokens). The prompt travels with the embedding so the cache sees the same text.")

    def encode(self, text_encoder, text):
        """Returns (CHAI_CONDITIONING,). Raises ValueError on an empty prompt, TypeError on a wrong input."""
        enc = _require(text_encoder, ChaiTextEncoder, "text_encoder", "CHAI Load Text Encoder")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the prompt is empty: describe the video to generate")
        if enc.placement is not None:
            enc.placement.load()
        with torch.no_grad():
            y, mask = enc.captions.encode(text)
        device = host.intermediate_device()
        cond = ChaiConditioning(prompt=text, y=y.detach().to(device=device, dtype=torch.float32),
                                mask=mask.detach().to(device=device, dtype=torch.int64),
                                fingerprint=enc.fingerprint, encoder=enc.name, text_encoder=enc)
        if enc.placement is not None:
            enc.placement.release()
        return (cond,)


@dataclass
class ChaiEntities:
    """``CHAI_ENTITIES``: the lookup keys of one prompt.

    Attributes:
        prompt: the prompt. entities: normalised noun-phrase entities (entity mode) or the
        normalised prompt (prompt mode). mode: ``"entity"`` or ``"prompt"``.
    """

    prompt: str
    entities: List[str] = field(default_factory=list)
    mode: str = "entity"


class CHAIEntityExtractor:
    """Finds the entities (noun phrases such as 'red fox', 'snowy forest') the cache matches on."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CHAI_CONDITIONING", {"tooltip": "From CHAI Text Encode: its prompt is analysed."}),
            "mode": (["entity", "prompt"], {
                "default": "entity",
                "tooltip": "entity: CHAI's noun-phrase entities (spaCy), so 'a fox in snow' can reuse 'a fox at "
                           "dusk'. prompt: the whole prompt is the only key (baseline; hits only near-identical prompts)."}),
        }}

    RETURN_TYPES = ("CHAI_ENTITIES", "STRING")
    RETURN_NAMES = ("entities", "entities_text")
    OUTPUT_TOOLTIPS = ("The prompt's lookup keys, for CHAI Cache Lookup.",
                       "The entities found, comma-separated (for display or other nodes).")
    FUNCTION = "extract"
    CATEGORY = "CHAI"
    DESCRIPTION = ("Extract the prompt's entities (normalised noun phrases) with spaCy; the node shows what it "
                   "found. A prompt with no entity falls back to the whole prompt as its key.")

    def extract(self, conditioning, mode="entity"):
        """Returns {"ui": {"text": [...]}, "result": (CHAI_ENTITIES, str)}."""
        cond = _require(conditioning, ChaiConditioning, "conditioning", "CHAI Text Encode")
        if mode not in ("entity", "prompt"):
            raise ValueError(f"mode must be 'entity' or 'prompt', got {mode!r}")
        extractor = registry.shared_extractor(mode)
        found = extractor.extract(cond.prompt)
        keys = found or [extractor.normalize_prompt(cond.prompt)]
        text = ", ".join(keys)
        label = text if found else f"(no entity: whole prompt) {text}"
        return {"ui": {"text": [label]}, "result": (ChaiEntities(cond.prompt, keys, mode), text)}
