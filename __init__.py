"""ComfyUI-CHAI: CacHe Attention Inference (arXiv 2602.16132) for OpenSora 1.2.

This file is the ComfyUI entry point and does wiring only. It must import without ComfyUI
installed (ComfyUI modules are imported lazily inside the nodes); models load only when a node or
command runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
__version__ = "0.1.0"
