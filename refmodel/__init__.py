"""The CPU reference model: procedurally generated scenes with exact ground truth, an evaluator that
scores a clip against its prompt, and a small STDiT3 trained on those scenes (issue 6). No ComfyUI
imports; it may import `opensora/` (it is a model) but never `cache/`."""
