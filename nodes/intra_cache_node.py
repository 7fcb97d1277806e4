"""The CHAI Intra-Request Cache node: MixCache or the TeaCache baseline for the CHAI Sampler (off by default)."""

from __future__ import annotations

from typing import Any, Dict, Tuple

from .adapter import comfy_entry
from .comfy_v3 import io
from .socket_types import IntraCache

__all__ = ["CHAIIntraCacheSettings", "INTRA_CACHE_TYPE", "GRANULARITY_CHOICES"]

#: Socket type between this node and the CHAI Sampler's optional ``intra_cache`` input.
INTRA_CACHE_TYPE = IntraCache.io_type
#: The granularity subsets the node offers ("preset" keeps the preset's).
GRANULARITY_CHOICES = ["preset", "step+block+cfg", "step", "block", "cfg", "step+block", "step+cfg", "block+cfg"]

_KEEP = "-1 = the preset's value."
# knob -> (ComfyUI type, widget options, tooltip)
_KNOBS: Dict[str, Tuple[str, Dict[str, Any], str]] = {
    "warmup_steps": ("INT", {"min": -1, "max": 200},
                     "First steps always computed in full (MixCache; default 3). "),
    "final_steps": ("INT", {"min": -1, "max": 200}, "Last steps always computed in full (MixCache; default 1). "),
    "min_steps": ("INT", {"min": -1, "max": 200},
                  "Schedules with fewer steps (a cache hit's 8, say) run without caching (MixCache; default 9; 1 = always cache). "),
    "max_reuse": ("INT", {"min": -1, "max": 200},
                  "Most approximated steps in a row, any granularity; the next step is computed (MixCache; default 4). "),
    "trigger_threshold": ("FLOAT", {"min": -1.0, "max": 100.0, "step": 0.01},
                          "Caching starts once the measured change of the blocks' residual per step is at most this "
                          "(MixCache's trigger; 0 = never). "),
    "step_threshold": ("FLOAT", {"min": -1.0, "max": 100.0, "step": 0.01},
                       "Predicted residual change up to which a whole step is reused, no block run (MixCache). "),
    "block_threshold": ("FLOAT", {"min": -1.0, "max": 100.0, "step": 0.01},
                        "Change of the first blocks' residual up to which the middle blocks are reused (MixCache). "),
    "cfg_threshold": ("FLOAT", {"min": -1.0, "max": 100.0, "step": 0.01},
                      "Predicted guidance error up to which only the conditional half runs and the guidance "
                      "difference is reused (MixCache). "),
    "block_front": ("INT", {"min": -1, "max": 27}, "Block pairs always run at a block step, from the first (default 1). "),
    "block_back": ("INT", {"min": -1, "max": 27}, "Block pairs always run at a block step, from the last (default 0). "),
    "teacache_threshold": ("FLOAT", {"min": -1.0, "max": 100.0, "step": 0.01},
                           "TeaCache: reuse the whole step while the accumulated input change stays below this. "),
}


class CHAIIntraCacheSettings(io.ComfyNode):
    """Intra-request caching for the CHAI Sampler: MixCache (hybrid) or TeaCache (baseline); a preset plus knobs."""

    DISPLAY_NAME = "CHAI Intra-Request Cache"

    @classmethod
    def define_schema(cls):
        from ..pipeline.mixcache import PRESETS

        knobs = [(io.Int if kind == "INT" else io.Float).Input(
                     name, default=-1 if kind == "INT" else -1.0, **options, tooltip=tip + _KEEP)
                 for name, (kind, options, tip) in _KNOBS.items()]
        return io.Schema(
            node_id="CHAI_IntraCacheSettings", display_name=cls.DISPLAY_NAME, category="CHAI",
            description=("Intra-request caching (MixCache, arXiv 2508.12691, or TeaCache): inside one run, reuse what "
                         "an earlier step computed when run-time indicators say it changed little. No calibration per "
                         "model or step count. The Sampler's report shows which steps were computed or reused."),
            inputs=[
                io.Combo.Input("method", options=["off", "mixcache", "teacache"], default="off", tooltip=(
                    "off: every step computed (default). mixcache: reuse whole steps, the middle blocks or the "
                    "unconditional CFG half when the run-time indicators say it is safe. teacache: reuse whole steps "
                    "(the single-granularity baseline). A cache miss still computes every step its stored latents "
                    "depend on.")),
                io.Combo.Input("preset", options=list(PRESETS["mixcache"]), default="balanced", tooltip=(
                    "quality: reuse less; balanced: the defaults (chosen on the reference model's validation "
                    "prompts); fast: reuse more. The knobs below override single values.")),
                *knobs,
                io.Combo.Input("granularities", options=GRANULARITY_CHOICES, default="preset",
                               tooltip="Granularities MixCache may use (preset: all three)."),
            ],
            outputs=[IntraCache.Output(display_name="intra_cache", tooltip=(
                "Intra-request cache settings, for the CHAI Sampler's optional 'intra_cache' input."))])

    @classmethod
    @comfy_entry()
    def execute(cls, method="off", preset="balanced", granularities="preset", **knobs):
        """Returns ({"hook": None | "mixcache" | "teacache", "settings": {MixCacheSettings field: value}},).

        Raises:
            ValueError: an unknown method, preset or granularity, or a knob out of range (names it).
        """
        from ..pipeline.mixcache import preset_settings
        from ..pipeline.settings import MixCacheSettings

        if method == "off":
            return ({"hook": None, "settings": {}},)
        settings = preset_settings(method, preset)
        for name, value in knobs.items():
            if name not in _KNOBS:
                raise ValueError(f"unknown intra-request cache knob {name!r}")
            if value is not None and value >= 0:
                settings[name] = int(value) if _KNOBS[name][0] == "INT" else float(value)
        if granularities != "preset":
            if granularities not in GRANULARITY_CHOICES:
                raise ValueError(f"granularities must be one of {GRANULARITY_CHOICES}, got {granularities!r}")
            settings["granularities"] = tuple(granularities.split("+"))
        MixCacheSettings(**settings)  # validate now, with the node that holds the values
        return ({"hook": method, "settings": settings},)
