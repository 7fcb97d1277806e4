"""The CHAI Chorus Settings node: the knobs of whole-prompt reuse (the Sampler's ``reuse`` = chorus or auto)."""

from __future__ import annotations

from typing import Any, Dict, List

from .adapter import comfy_entry
from .comfy_v3 import io
from .socket_types import ChorusConfig

__all__ = ["CHAIChorusSettings", "reuse_choices", "reuse_help"]


def reuse_choices() -> List[str]:
    """The registered cross-request reuse modes (``chai``, ``chorus``, ``auto``), for the Sampler's ``reuse`` input."""
    from ..pipeline.modes import get_mode, mode_names

    return [name for name in mode_names() if get_mode(name).reuse]


def reuse_help() -> str:
    """One sentence per reuse mode, for tooltips."""
    from ..pipeline.modes import get_mode

    return " ".join(f"{name}: {get_mode(name).description}." for name in reuse_choices())


class CHAIChorusSettings(io.ComfyNode):
    """Chorus knobs for the CHAI Sampler (defaults chosen on the reference model's validation stream)."""

    DISPLAY_NAME = "CHAI Chorus Settings"

    @classmethod
    def define_schema(cls):
        from ..pipeline.settings import ChorusSettings

        d = ChorusSettings()
        frac = {"min": 0.0, "max": 0.99, "step": 0.01}
        return io.Schema(
            node_id="CHAI_ChorusSettings", display_name=cls.DISPLAY_NAME, category="CHAI",
            description=("Whole-prompt reuse (Chorus) knobs: the donor threshold, the map from similarity to stage "
                         "bounds, the region rule and the amplification. Only the window changes what is stored (and "
                         "the cache key); the others change how a donor is used."),
            inputs=[
                io.Float.Input("threshold", default=d.chorus_threshold, min=-1.0, max=0.99, step=0.01,
                               tooltip="Least cosine similarity of the whole prompts (MiniLM) for a donor."),
                io.Float.Input("k1_low", default=d.chorus_k1[0], **frac, tooltip=(
                    "Stage 1 ends at this fraction of the steps for a donor at the threshold (skipped steps: the "
                    "request starts from the donor's latent there).")),
                io.Float.Input("k1_high", default=d.chorus_k1[1], **frac,
                               tooltip="... and at this fraction for an identical prompt; linear in between."),
                io.Float.Input("k2_low", default=d.chorus_k2[0], **frac, tooltip=(
                    "Stage 2 (only the region of the differing words is denoised) ends here at the threshold...")),
                io.Float.Input("k2_high", default=d.chorus_k2[1], **frac, tooltip=(
                    "... and here for an identical prompt. Stage 3 runs plain after it.")),
                io.Float.Input("window_low", default=d.chorus_window[0], **frac, tooltip=(
                    "First step (fraction) whose latent a miss stores. The window sets a Chorus entry's size and is "
                    "part of its cache key.")),
                io.Float.Input("window_high", default=d.chorus_window[1], **frac,
                               tooltip="Last step (fraction) whose latent a miss stores."),
                io.Float.Input("mask_threshold", default=d.chorus_mask_threshold, min=0.0, max=1.0, step=0.05,
                               tooltip=("A latent token joins the region when its attention to the differing words "
                                        "is at least this share of its frame's largest.")),
                io.Int.Input("dilation", default=d.chorus_dilation, min=0, max=8, tooltip="Tokens the region grows by."),
                io.Float.Input("tgaa", default=d.chorus_tgaa, min=1.0, max=16.0, step=0.25, tooltip=(
                    "Token-Guided Attention Amplification: the new words' cross-attention is multiplied by this (a "
                    "logit bias log(alpha)); 1 = off.")),
                io.Float.Input("tgaa_decay", default=d.chorus_tgaa_decay, min=0.0, max=1.0, step=0.05,
                               tooltip="The amplification's excess over 1 is multiplied by this per step."),
                io.Boolean.Input("stage2", default=d.chorus_stage2,
                                 tooltip="Off: stage 1, then plain steps (no region denoising)."),
                io.Int.Input("stride", default=d.chorus_stride, min=1, max=10, tooltip=(
                    "A hit runs every stride-th step of the full schedule after stage 1: higher is faster "
                    "(a hit costs about (steps - K1) / stride steps). Changes nothing that is stored.")),
            ],
            outputs=[ChorusConfig.Output(display_name="chorus_settings", tooltip=(
                "Chorus settings, for the CHAI Sampler's optional 'chorus_settings' input."))])

    @classmethod
    @comfy_entry()
    def execute(cls, threshold=None, k1_low=None, k1_high=None, k2_low=None, k2_high=None, window_low=None,
              window_high=None, mask_threshold=None, dilation=None, tgaa=None, tgaa_decay=None, stage2=None,
              stride=None):
        """Returns ({ChorusSettings field: value},); an input left out keeps ``ChorusSettings``' default.
        Raises ValueError on a bad value (the message names it)."""
        from ..pipeline.settings import ChorusSettings

        d = ChorusSettings()

        def pick(value, default):
            return default if value is None else value

        settings: Dict[str, Any] = {
            "chorus_threshold": float(pick(threshold, d.chorus_threshold)),
            "chorus_k1": (float(pick(k1_low, d.chorus_k1[0])), float(pick(k1_high, d.chorus_k1[1]))),
            "chorus_k2": (float(pick(k2_low, d.chorus_k2[0])), float(pick(k2_high, d.chorus_k2[1]))),
            "chorus_window": (float(pick(window_low, d.chorus_window[0])),
                              float(pick(window_high, d.chorus_window[1]))),
            "chorus_mask_threshold": float(pick(mask_threshold, d.chorus_mask_threshold)),
            "chorus_dilation": int(pick(dilation, d.chorus_dilation)), "chorus_tgaa": float(pick(tgaa, d.chorus_tgaa)),
            "chorus_tgaa_decay": float(pick(tgaa_decay, d.chorus_tgaa_decay)),
            "chorus_stage2": bool(pick(stage2, d.chorus_stage2)),
            "chorus_stride": int(pick(stride, d.chorus_stride))}
        ChorusSettings(**settings)  # validate now, with the node that holds the values
        return (settings,)
