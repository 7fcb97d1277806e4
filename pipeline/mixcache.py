"""Intra-request caching in the request path: the ``mixcache`` and ``teacache`` model hooks and their presets.

Importing this module registers both hooks (``modes.register_model_hook``, ``keyed``: a request that runs
one carries its name in the compatibility key). A request names them like any hook
(``generate(..., hooks=("mixcache",))``, the mode specs ``mixcache``, ``teacache``, ``chai8+mixcache``);
their knobs are the settings' ``mixcache`` part (:class:`.settings.MixCacheSettings`), resolved like every
other setting. The algorithms are ``opensora/mixcache.py``.

Presets (:data:`PRESETS`) are named sets of those knobs for the ComfyUI node and the command line; the
defaults of :class:`.settings.MixCacheSettings` are the ``balanced`` ones. :func:`describe` turns a hook's
report into the one line the command line, the report and the Sampler node show.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from ..opensora.mixcache import MixCache, TeaCache
from .modes import ModeRequest, register_model_hook

__all__ = ["INTRA_HOOKS", "PRESETS", "preset_settings", "describe"]

#: The intra-request cache hooks, by name.
INTRA_HOOKS = ("mixcache", "teacache")

#: method -> preset -> settings overrides (flat keys of ``MixCacheSettings``); "balanced" = the defaults.
#: Chosen on the reference model's validation stream (``bench/intra_bench.py validate``, 24 prompts, v1):
#: quality = thresholds x 1/4 of the defaults with a cap of 2 (18.6 equivalent steps of 30, overall +0.004
#: vs full 30), balanced = the selection rule's pick (9.7, +0.016), fast = thresholds x 2, cap 6, warm-up
#: 2 (7.0, +0.007); TeaCache: 0.2 matched balanced MixCache's compute (9.8 equivalent steps).
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "mixcache": {
        "quality": {"max_reuse": 2, "trigger_threshold": 0.2, "step_threshold": 0.1, "block_threshold": 0.1,
                    "cfg_threshold": 0.05},
        "balanced": {},
        "fast": {"warmup_steps": 2, "max_reuse": 6, "trigger_threshold": 1.6, "step_threshold": 0.8,
                 "block_threshold": 0.8, "cfg_threshold": 0.4},
    },
    "teacache": {
        "quality": {"teacache_threshold": 0.1},
        "balanced": {"teacache_threshold": 0.2},
        "fast": {"teacache_threshold": 0.3},
    },
}


def preset_settings(method: str, preset: str) -> Dict[str, Any]:
    """The settings overrides of ``preset`` for ``method`` (``"mixcache"`` or ``"teacache"``), a new dict.

    Raises:
        ValueError: an unknown method or preset (the message lists the known ones).
    """
    if method not in PRESETS:
        raise ValueError(f"unknown intra-request cache {method!r}; choose one of {', '.join(PRESETS)}")
    if preset not in PRESETS[method]:
        raise ValueError(f"unknown {method} preset {preset!r}; choose one of {', '.join(PRESETS[method])}")
    return dict(PRESETS[method][preset])


def describe(report: Optional[Mapping[str, Any]]) -> str:
    """One line from an intra-request cache's report (``IntraCache.report``), e.g.
    ``mixcache: 14/30 steps computed (47%; 9 step-reused, 3 CFG, 4 block, pairs 1-2 reused), block work
    55%, decisions 2 ms; FFFFSSCF...``. Empty for None."""
    if not report:
        return ""
    n = int(report.get("steps") or 0)
    if not n:
        return f"{report.get('method')}: no sampler step ran"
    parts = [f"{report['step']} step-reused"] if report.get("step") else []
    if report.get("cfg"):
        parts.append(f"{report['cfg']} CFG")
    if report.get("block"):
        parts.append(f"{report['block']} block, pairs {report.get('reused_pairs')} reused")
    reused = "; " + ", ".join(parts) if parts else ""
    return (f"{report['method']}: {report['full']}/{n} steps computed ({100 * report['full'] / n:.0f}%{reused}), "
            f"block work {100 * float(report['work_share']):.0f}%, decisions {float(report['decision_ms']):.0f} ms; "
            f"{report['map']}")


def _mixcache(request: ModeRequest) -> MixCache:
    return MixCache(request.model, request.settings.mixcache, cfg_scale=request.settings.schedule.cfg_scale,
                    measure=request.measure)


def _teacache(request: ModeRequest) -> TeaCache:
    return TeaCache(request.model, request.settings.mixcache, cfg_scale=request.settings.schedule.cfg_scale,
                    measure=request.measure)


register_model_hook("mixcache", _mixcache, keyed=True)
register_model_hook("teacache", _teacache, keyed=True)
