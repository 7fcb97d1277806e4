"""Decoded frames to uint8, to an H.264 mp4 (PyAV) and to a store thumbnail (Pillow)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import torch

__all__ = ["frames_to_uint8", "write_video", "thumbnail_jpeg", "THUMBNAIL_SIDE"]

#: Longest side of an entry's thumbnail (pixels): the panel shows it at about this size.
THUMBNAIL_SIDE = 96


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


def thumbnail_jpeg(frame: torch.Tensor, max_side: int = THUMBNAIL_SIDE, quality: int = 90) -> bytes:
    """One video frame as the small JPEG a store entry keeps (``LatentStore.put(thumbnail=...)``).

    Colour is kept at full resolution (4:4:4): at 32-96 px, halving the chroma of sharp shapes
    costs more than the bytes it saves (the reference model's 32 px clips: mean error 4.7 levels
    at 1.6 KB, 10.2 with 4:2:0).

    Args:
        frame: [H, W, 3] uint8, or float in [0, 1] (one frame of ``GenerationResult.frames``).
        max_side: the longest side of the thumbnail in pixels (the aspect ratio is kept; a frame
            already smaller is not enlarged).
        quality: JPEG quality (1..95). At 96 px and 90 a frame is a few KB (pure noise, the worst
            case, 18 KB), below the store's cap (``cache.store.MAX_THUMBNAIL_BYTES``, 32 KiB).

    Returns:
        the JPEG bytes.

    Raises:
        ValueError: ``frame`` is not [H, W, 3].
    """
    from PIL import Image

    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"a thumbnail is made of one frame [H, W, 3], got {tuple(frame.shape)}")
    if frame.dtype != torch.uint8:
        frame = frames_to_uint8(frame.float())
    image = Image.fromarray(frame.contiguous().cpu().numpy())
    image.thumbnail((int(max_side), int(max_side)), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=int(quality), subsampling=0)
    return out.getvalue()
