"""``generate --reuse chai|chorus|auto`` and the Chorus flags of the command line."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

__all__ = ["add_reuse_arguments", "reuse_settings", "request_mode", "reuse_choices"]


def reuse_choices() -> List[str]:
    """The registered cross-request reuse modes (``SamplingMode.reuse``): chai, chorus, auto."""
    from ..pipeline.modes import get_mode, mode_names

    return [name for name in mode_names() if get_mode(name).reuse]


def add_reuse_arguments(gen: argparse.ArgumentParser) -> None:
    """Add ``--reuse`` and the "Chorus settings" flags (each None when not given: the model's or the
    built-in default applies)."""
    from ..pipeline.modes import get_mode

    gen.add_argument("--reuse", choices=reuse_choices(), default=None,
                     help="cross-request reuse: " + "; ".join(f"{n}: {get_mode(n).description}" for n in reuse_choices())
                          + " (the same as --mode with that name; default chai)")
    ch = gen.add_argument_group("Chorus settings (--reuse chorus or auto; pipeline.settings.ChorusSettings, defaults "
                                "chosen on the reference model's validation stream)")
    ch.add_argument("--chorus-threshold", type=float, default=None,
                    help="least whole-prompt cosine similarity for a donor")
    ch.add_argument("--chorus-k1", type=float, nargs=2, default=None, metavar=("AT_THRESHOLD", "AT_1"),
                    help="stage 1 ends at this fraction of the steps, for a donor at the threshold and an identical one")
    ch.add_argument("--chorus-k2", type=float, nargs=2, default=None, metavar=("AT_THRESHOLD", "AT_1"),
                    help="stage 2 (only the region of the differing words is denoised) ends here")
    ch.add_argument("--chorus-window", type=float, nargs=2, default=None, metavar=("FIRST", "LAST"),
                    help="fractions of the steps whose latents a miss stores (an entry's size; part of its key)")
    ch.add_argument("--chorus-mask-threshold", type=float, default=None,
                    help="a latent token joins the region at this share of its frame's largest attention")
    ch.add_argument("--chorus-dilation", type=int, default=None, help="tokens the region grows by")
    ch.add_argument("--chorus-tgaa", type=float, default=None,
                    help="amplification of the new words' cross-attention (1 = off)")
    ch.add_argument("--chorus-tgaa-decay", type=float, default=None, help="per-step decay of the amplification")
    ch.add_argument("--chorus-stride", type=int, default=None,
                    help="a hit runs every Nth step of the full schedule after stage 1 (1 = every step; faster above)")
    ch.add_argument("--chorus-stage1-only", action="store_true",
                    help="no region denoising: stage 1, then plain steps (ablation)")


def reuse_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The Chorus settings the flags name (None = not given)."""
    def pair(value):
        return None if value is None else tuple(value)

    return {"chorus_threshold": args.chorus_threshold, "chorus_k1": pair(args.chorus_k1),
            "chorus_k2": pair(args.chorus_k2), "chorus_window": pair(args.chorus_window),
            "chorus_mask_threshold": args.chorus_mask_threshold, "chorus_dilation": args.chorus_dilation,
            "chorus_tgaa": args.chorus_tgaa, "chorus_tgaa_decay": args.chorus_tgaa_decay,
            "chorus_stage2": False if args.chorus_stage1_only else None, "chorus_stride": args.chorus_stride}


def request_mode(args: argparse.Namespace, default: str) -> str:
    """The mode every request runs: ``--reuse``, else ``--mode``, else ``default``.

    Raises:
        ValueError: ``--reuse`` and ``--mode`` name different modes.
    """
    mode: Optional[str] = args.mode
    if args.reuse is not None and mode is not None and mode != args.reuse:
        raise ValueError(f"--reuse {args.reuse} and --mode {mode} name different modes; give one of them")
    return args.reuse or mode or default
