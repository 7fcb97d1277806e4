"""Clean-room OpenSora 1.2 inference stack: STDiT3, VAE v1.2, T5 wrapper, caption cleaning, RFLOW.

Parameter names match the official checkpoints (hpcai-tech/OpenSora-STDiT-v3, OpenSora-VAE-v1.2)
so they load with strict=True. No ComfyUI imports and no imports from `cache/`.
"""
