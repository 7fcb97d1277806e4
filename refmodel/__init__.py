"""The CPU reference model, a model family beside OpenSora: procedurally generated scenes with exact
ground truth, an evaluator that scores a clip against its prompt, a small STDiT3 trained on those
scenes (issue 6), and the prompt streams the quality harness samples. No ComfyUI imports; it may import
`opensora/` (its model is an STDiT3) but never `cache/` nor the pipeline: the request path
(`pipeline/`, its quality harness `pipeline/quality.py`) uses it, never the other way round."""
