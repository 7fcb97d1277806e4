"""CHAI loaders: STDiT3, OpenSora VAE and the text encoder (T5-v1.1-XXL or the tiny encoders)."""

from __future__ import annotations

from . import host, models
from .adapter import comfy_entry
from .comfy_v3 import io
from .socket_types import Model, TextEncoder, Vae

__all__ = ["CHAILoadSTDiT3", "CHAILoadVAE", "CHAILoadTextEncoder"]

_DTYPE_TIP = ("Weight dtype. auto: bfloat16 on a CUDA GPU that supports it (OpenSora 1.2's inference dtype), "
              "float32 on the CPU. The cache key includes it, so entries made at another dtype are never reused.")


class CHAILoadSTDiT3(io.ComfyNode):
    """Loads OpenSora 1.2's STDiT3 denoiser (or the tiny CPU test model, or a model bundled with the pack)."""

    DISPLAY_NAME = "CHAI Load STDiT3"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CHAI_LoadSTDiT3", display_name=cls.DISPLAY_NAME, category="CHAI",
            description=("Load the STDiT3 video denoiser of OpenSora 1.2 (safetensors only, strict key check). "
                         "Weights go in ComfyUI/models/opensora/. 'tiny' builds a small random model that runs on a "
                         "CPU in seconds (noise-like videos: for checking a graph, not for results)."),
            inputs=[io.Combo.Input("model_name", options=models.stdit3_choices(), tooltip=(
                        "STDiT3 weights: safetensors files (or folders with config.json) in ComfyUI/models/opensora/ "
                        "(e.g. hpcai-tech/OpenSora-STDiT-v3), models shipped with the pack ('pack: ...', e.g. the "
                        "CPU reference model), or the tiny random model for a quick CPU check.")),
                    io.Combo.Input("dtype", options=list(models.DTYPES), default="auto", tooltip=_DTYPE_TIP)],
            outputs=[Model.Output(display_name="model", tooltip=(
                "The STDiT3 denoiser, for the CHAI Sampler (kept on the CPU until a sampler places it)."))])

    @classmethod
    @comfy_entry()
    def execute(cls, model_name, dtype="auto"):
        """Returns (CHAI_MODEL,). Raises FileNotFoundError / CheckpointFormatError with what to do."""
        with host.model_compute():
            return (models.load_stdit3(model_name, dtype),)


class CHAILoadVAE(io.ComfyNode):
    """Loads the OpenSora 1.2 video VAE (SDXL-VAE spatial + temporal VAE)."""

    DISPLAY_NAME = "CHAI Load VAE"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CHAI_LoadVAE", display_name=cls.DISPLAY_NAME, category="CHAI",
            description=("Load OpenSora 1.2's video VAE (4 latent channels, 4x time and 8x space compression). Use "
                         "the same family as the STDiT3 model: the tiny VAE with the tiny model, VAE v1.2 with "
                         "STDiT-v3."),
            inputs=[io.Combo.Input("vae_name", options=models.vae_choices(), tooltip=(
                        "VAE weights: files with 'vae' in their name in ComfyUI/models/opensora/ (e.g. "
                        "hpcai-tech/OpenSora-VAE-v1.2), a bundled model's VAE, or the tiny random VAE.")),
                    io.Combo.Input("dtype", options=list(models.DTYPES), default="auto", tooltip=_DTYPE_TIP)],
            outputs=[Vae.Output(display_name="vae", tooltip="The OpenSora video VAE, for CHAI VAE Decode.")])

    @classmethod
    @comfy_entry()
    def execute(cls, vae_name, dtype="auto"):
        """Returns (CHAI_VAE,)."""
        with host.model_compute():
            return (models.load_vae(vae_name, dtype),)


class CHAILoadTextEncoder(io.ComfyNode):
    """Loads the caption encoder: T5-v1.1-XXL for OpenSora 1.2, or the tiny encoders for the tiny model."""

    DISPLAY_NAME = "CHAI Load Text Encoder"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CHAI_LoadTextEncoder", display_name=cls.DISPLAY_NAME, category="CHAI",
            description=("Load the text encoder whose captions the STDiT3 model was trained on: T5-v1.1-XXL (300 "
                         "tokens, 4096 wide) for OpenSora 1.2. The sampler checks that caption width and length fit "
                         "the model."),
            inputs=[io.Combo.Input("text_encoder", options=models.text_encoder_choices(), tooltip=(
                        "T5-v1.1-XXL for OpenSora 1.2: ComfyUI's usual models/text_encoders/t5xxl_fp16.safetensors "
                        "(tokenizer: ComfyUI's bundled T5 tokenizer) or an HF folder. 'tiny' encoders go with the "
                        "tiny model; 'pack: ...' with the bundled model of that name.")),
                    io.Combo.Input("dtype", options=["float32", "bfloat16", "auto"], default="float32", tooltip=(
                        "T5 dtype. float32 as OpenSora 1.2 (float16 overflows in T5 v1.1, so it is not offered); "
                        "bfloat16 halves memory."))],
            outputs=[TextEncoder.Output(display_name="text_encoder",
                                        tooltip="The caption encoder, for CHAI Text Encode.")])

    @classmethod
    @comfy_entry()
    def execute(cls, text_encoder, dtype="float32"):
        """Returns (CHAI_TEXT_ENCODER,)."""
        with host.model_compute():
            return (models.load_text_encoder(text_encoder, dtype),)
