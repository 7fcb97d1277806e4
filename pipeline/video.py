"""Decoded frames to uint8 and to an H.264 mp4 (PyAV)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

__all__ = ["frames_to_uint8", "write_video"]


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[F, H, W, C] floats in [0, 1] -> uint8 (clamped, rounded to nearest)."""
    return (frames.clamp(0, 1) * 255.0).round().to(torch.uint8)


def write_video(frames: torch.Tensor, path: Union[str, Path], fps: int = 24, crf: int = 18) -> Path:
    """Write frames as an H.264 mp4 (yuv420p) with PyAV.

    Args:
        frames: [F, H, W, 3] uint8, or float in [0, 1]. Odd H or W lose their last row/column
            (yuv420p needs even sizes).
        path: output file (parent folders are created).
        fps: frames per second (OpenSora 1.2: 24). crf: x264 quality (lower = better; 18 near-lossless).

    Returns:
        the path written.

    Raises:
        ValueError: frames not [F, H, W, 3] or smaller than 2x2.
    """
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        frames = frames_to_uint8(frames)
    h, w = (int(frames.shape[1]) // 2) * 2, (int(frames.shape[2]) // 2) * 2
    if h < 2 or w < 2:
        raise ValueError(f"frames of {frames.shape[1]}x{frames.shape[2]} are too small for H.264")
    frames = frames[:, :h, :w].contiguous().cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(int(crf))}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path

