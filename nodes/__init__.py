"""ComfyUI node classes (V3 schema, ``comfy_api.v0_0_2``), one file per node group.

Only this package touches ComfyUI, and only lazily: ``nodes.host`` looks ComfyUI's modules up in
``sys.modules`` and ``nodes.comfy_v3`` takes the V3 API from ComfyUI when it runs, else from the
pack's stand-in, so the pack and its tests import without ComfyUI. Every node's ``execute`` goes
through ``adapter.comfy_entry`` (errors that name the node, display data sent to the page, batches
mapped by the pack).

Inside ComfyUI, importing this package also registers the ``models/opensora`` model folder and
the ``/chai/*`` routes; outside it, both are skipped.
"""

from . import host as _host
from .cache_nodes import CHAICache, CHAICacheAttentionSettings, CHAICacheLookup, CHAICacheState
from .chorus_nodes import CHAIChorusSettings
from .comfy_v3 import ComfyExtension as _ComfyExtension
from .intra_cache_node import CHAIIntraCacheSettings
from .loader_nodes import CHAILoadSTDiT3, CHAILoadTextEncoder, CHAILoadVAE
from .routes import register_routes as _register_routes
from .sampler_nodes import CHAISampler, CHAIVAEDecode
from .text_nodes import CHAIEntityExtractor, CHAIPromptList, CHAITextEncode

#: The pack's node classes, in menu order. Their node ids (``Schema.node_id``) and input names are
#: the identity of every saved workflow: never rename one (tests/test_workflows.py checks them).
NODE_LIST: list = [CHAILoadSTDiT3, CHAILoadVAE, CHAILoadTextEncoder, CHAIPromptList, CHAITextEncode,
                   CHAIEntityExtractor, CHAICache, CHAICacheLookup, CHAICacheAttentionSettings,
                   CHAIIntraCacheSettings, CHAISampler, CHAIVAEDecode, CHAICacheState, CHAIChorusSettings]

#: node id -> class, and node id -> display name (for tests, tools and scripts; ComfyUI takes the
#: list from :func:`comfy_entrypoint`).
NODES: dict = {cls.GET_SCHEMA().node_id: cls for cls in NODE_LIST}
DISPLAY_NAMES: dict = {node_id: cls.DISPLAY_NAME for node_id, cls in NODES.items()}


class ChaiExtension(_ComfyExtension):
    """The pack as a V3 extension: its node list."""

    async def get_node_list(self) -> list:
        """Every CHAI node class."""
        return list(NODE_LIST)


async def comfy_entrypoint() -> ChaiExtension:
    """ComfyUI's V3 entry point (reference/comfyui.md section 1.1)."""
    return ChaiExtension()


_host.register_model_folders()
_register_routes()

__all__ = ["NODE_LIST", "NODES", "DISPLAY_NAMES", "comfy_entrypoint", "ChaiExtension"]
