"""ComfyUI node classes, one file per node group. Only this package may touch ComfyUI modules,
and only lazily (``nodes.host`` looks them up in ``sys.modules``), so the pack and its tests
import without ComfyUI. ComfyUI gets each class through ``adapter.for_comfyui`` (errors that
name the node, display data sent to the page, batches mapped by the pack).

Inside ComfyUI, importing this package also registers the ``models/opensora`` model folder and
the read-only ``/chai/stats`` route; outside it, both are skipped.
"""

from . import host as _host
from .adapter import for_comfyui as _for_comfyui
from .cache_nodes import CHAICache, CHAICacheAttentionSettings, CHAICacheLookup, CHAICacheState
from .intra_cache_node import CHAIIntraCacheSettings
from .chorus_nodes import CHAIChorusSettings
from .loader_nodes import CHAILoadSTDiT3, CHAILoadTextEncoder, CHAILoadVAE
from .routes import register_routes as _register_routes
from .sampler_nodes import CHAISampler, CHAIVAEDecode
from .text_nodes import CHAIEntityExtractor, CHAIPromptList, CHAITextEncode

#: node id -> class. Node ids are the workflow identity: never rename them.
_NODE_CLASSES: dict = {
    "CHAI_LoadSTDiT3": CHAILoadSTDiT3,
    "CHAI_LoadVAE": CHAILoadVAE,
    "CHAI_LoadTextEncoder": CHAILoadTextEncoder,
    "CHAI_PromptList": CHAIPromptList,
    "CHAI_TextEncode": CHAITextEncode,
    "CHAI_EntityExtractor": CHAIEntityExtractor,
    "CHAI_Cache": CHAICache,
    "CHAI_CacheLookup": CHAICacheLookup,
    "CHAI_CacheAttentionSettings": CHAICacheAttentionSettings,
    "CHAI_IntraCacheSettings": CHAIIntraCacheSettings,
    "CHAI_Sampler": CHAISampler,
    "CHAI_VAEDecode": CHAIVAEDecode,
    "CHAI_CacheState": CHAICacheState,
}

NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "CHAI_LoadSTDiT3": "CHAI Load STDiT3",
    "CHAI_LoadVAE": "CHAI Load VAE",
    "CHAI_LoadTextEncoder": "CHAI Load Text Encoder",
    "CHAI_PromptList": "CHAI Prompt List",
    "CHAI_TextEncode": "CHAI Text Encode",
    "CHAI_EntityExtractor": "CHAI Entity Extractor",
    "CHAI_Cache": "CHAI Cache",
    "CHAI_CacheLookup": "CHAI Cache Lookup",
    "CHAI_CacheAttentionSettings": "CHAI Cache Attention Settings",
    "CHAI_IntraCacheSettings": "CHAI Intra-Request Cache",
    "CHAI_Sampler": "CHAI Sampler",
    "CHAI_VAEDecode": "CHAI VAE Decode",
    "CHAI_CacheState": "CHAI Cache State",
}

# Whole-prompt reuse (Chorus) knobs for the Sampler's reuse = chorus / auto.
_NODE_CLASSES["CHAI_ChorusSettings"] = CHAIChorusSettings
NODE_DISPLAY_NAME_MAPPINGS["CHAI_ChorusSettings"] = "CHAI Chorus Settings"

#: node id -> the class ComfyUI registers (a subclass of the plain node class, see nodes/adapter.py).
NODE_CLASS_MAPPINGS: dict = {node_id: _for_comfyui(cls, NODE_DISPLAY_NAME_MAPPINGS[node_id])
                             for node_id, cls in _NODE_CLASSES.items()}

_host.register_model_folders()
_register_routes()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
