"""ComfyUI-CHAI: CacHe Attention Inference (arXiv 2602.16132) for OpenSora 1.2.

This file is the ComfyUI entry point and does wiring only: ComfyUI calls ``comfy_entrypoint()``
(V3 node API) and serves ``web/``. It must import without ComfyUI installed (ComfyUI modules are
reached lazily inside ``nodes/``); models load only when a node or command runs. It defines no
``NODE_CLASS_MAPPINGS``: ComfyUI would then ignore ``comfy_entrypoint``.
"""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
__version__ = "0.2.0"
