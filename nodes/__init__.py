"""ComfyUI node classes, one file per node group. Only this package may import ComfyUI modules,
and only lazily inside node methods, so the pack and its tests import without ComfyUI."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
