"""CHAI loaders: STDiT3, OpenSora VAE and the text encoder (T5-v1.1-XXL or the tiny encoders)."""

from __future__ import annotations

from . import host, models

__all__ = ["CHAILoadSTDiT3", "CHAILoadVAE", "CHAILoadTextEncoder"]

_DTYPE_TIP = ("Weight dtype. auto: bfloat16 on a CUDA GPU that supports it (OpenSora 1.2's inference dtype), "
              "float32 on the CPU. The cache key includes it, so entries made at another dtype are never reused.")


class CHAILoadSTDiT3:
    """Loads OpenSora 1.2's STDiT3 denoiser (or the tiny CPU test model, or a model bundled with the pack)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (models.stdit3_choices(), {
                "tooltip": "STDiT3 weights: safetensors files (or folders with config.json) in ComfyUI/models/opensora/ "
                           "(e.g. hpcai-tech/OpenSora-STDiT-v3), models shipped with the pack ('pack: ...', e.g. the "
                           "CPU reference model), or the tiny random model for a quick CPU check."}),
            "dtype": (list(models.DTYPES), {"default": "auto", "tooltip": _DTYPE_TIP}),
        }}

    RETURN_TYPES = ("CHAI_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The STDiT3 denoiser, for the CHAI Sampler (kept on the CPU until a sampler places it).",)
    FUNCTION = "load"
    CATEGORY = "CHAI"
    DESCRIPTION = ("Load the STDiT3 video denoiser of OpenSora 1.2 (safetensors only, strict key check). Weights go "
                   "in ComfyUI/models/opensora/. 'tiny' builds a small random model that runs on a CPU in seconds "
                   "(noise-like videos: for checking a graph, not for results).")

    def load(self, model_name, dtype="auto"):
        """Returns (CHAI_MODEL,). Raises FileNotFoundError / CheckpointFormatError with what to do."""
        with host.model_compute():
            return (models.load_stdit3(model_name, dtype),)


class CHAILoadVAE:
    """Loads the OpenSora 1.2 video VAE (SDXL-VAE spatial + temporal VAE)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (models.vae_choices(), {
                "tooltip": "VAE weights: files with 'vae' in their name in ComfyUI/models/opensora/ (e.g. "
                           "hpcai-tech/OpenSora-VAE-v1.2), a bundled model's VAE, or the tiny random VAE."}),
            "dtype": (list(models.DTYPES), {"default": "auto", "tooltip": _DTYPE_TIP}),
        }}

    RETURN_TYPES = ("CHAI_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The OpenSora video VAE, for CHAI VAE Decode.",)
    FUNCTION = "load"
    CATEGORY = "CHAI"
    DESCRIPTION = ("Load OpenSora 1.2's video VAE (4 latent channels, 4x time and 8x space compression). Use the "
                   "same family as the STDiT3 model: the tiny VAE with the tiny model, VAE v1.2 with STDiT-v3.")

    def load(self, vae_name, dtype="auto"):
        """Returns (CHAI_VAE,)."""
        with host.model_compute():
            return (models.load_vae(vae_name, dtype),)


class CHAILoadTextEncoder:
    """Loads the caption encoder: T5-v1.1-XXL for OpenSora 1.2, or the tiny encoders for the tiny model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (models.text_encoder_choices(), {
                "tooltip": "T5-v1.1-XXL for OpenSora 1.2: ComfyUI's usual models/text_encoders/t5xxl_fp16.safetensors "
                           "(tokenizer: ComfyUI's bundled T5 tokenizer) or an HF folder. 'tiny' encoders go with the "
                           "tiny model; 'pack: ...' with the bundled model of that name."}),
            "dtype": (["float32", "bfloat16", "auto"], {
                "default": "float32",
                "tooltip": "T5 dtype. float32 as OpenSora 1.2 (float16 overflows in T5 v1.1, so it is not offered); "
                           "bfloat16 halves memory."}),
        }}

    RETURN_TYPES = ("CHAI_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The caption encoder, for CHAI Text Encode.",)
    FUNCTION = "load"
    CATEGORY = "CHAI"
    DESCRIPTION = ("Load the text encoder whose captions the STDiT3 model was trained on: T5-v1.1-XXL (300 tokens, "
                   "4096 wide) for OpenSora 1.2. The sampler checks that caption width and length fit the model.")

    def load(self, text_encoder, dtype="float32"):
        """Returns (CHAI_TEXT_ENCODER,)."""
        with host.model_compute():
            return (models.load_text_encoder(text_encoder, dtype),)
