"""Thumbnails written at generation time (issue 15, item 7): a request that stores an entry keeps the
middle frame of its video with it, as a small JPEG.

* from the frames the request decoded (a VAE model with ``decode=True``), scaled to at most 96 px;
* from the sample itself for a pixel-space model (the bundled reference model), even with
  ``decode=False`` (the Sampler node's path);
* none for a latent-space request that decoded nothing (no extra VAE decode is run);
* a failure to make one never loses the entry.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_chai.cache.lookup import CacheLookup, LookupConfig
from comfyui_chai.cache.store import MAX_THUMBNAIL_BYTES, LatentStore
from comfyui_chai.pipeline import ChaiPipeline, frames_to_uint8, thumbnail_jpeg, tiny_components
from test_pipeline import DIM, CommaExtractor, WordBagEmbedder


def _decode(jpeg: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _scaled(frame: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A float [H, W, 3] frame in [0, 1] scaled to ``size`` (width, height) as the reference."""
    image = Image.fromarray(frames_to_uint8(frame).numpy()).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.int16)


def _lookup(store):
    return CacheLookup(store, CommaExtractor(), WordBagEmbedder(), LookupConfig(threshold=0.8))


@pytest.fixture(scope="module")
def parts():
    return tiny_components(0)


def test_thumbnail_jpeg_keeps_the_aspect_and_never_enlarges():
    frame = torch.linspace(0, 1, 120 * 200 * 3).reshape(120, 200, 3)
    jpeg = thumbnail_jpeg(frame)
    assert len(jpeg) < MAX_THUMBNAIL_BYTES // 4
    pixels = _decode(jpeg)
    assert pixels.shape == (58, 96, 3)
    assert np.abs(pixels - _scaled(frame, (96, 58))).mean() < 3
    assert _decode(thumbnail_jpeg(frames_to_uint8(frame[:40, :30]))).shape == (40, 30, 3)
    with pytest.raises(ValueError, match=r"one frame \[H, W, 3\]"):
        thumbnail_jpeg(torch.zeros(2, 8, 8, 3))


def test_a_decoded_request_keeps_its_middle_frame_and_a_latent_only_one_none(parts, tmp_path):
    model, vae, captions = parts
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        pipe = ChaiPipeline(model, vae, captions, _lookup(store), size_dtype=torch.float32)
        size = dict(height=128, width=192, num_frames=17)
        first = pipe.generate("a red fox, snowy forest", seed=1, **size)
        assert first.frames.shape == (17, 128, 192, 3) and first.inserted_entry_id is not None
        thumb = store.thumbnail(first.inserted_entry_id)
        assert store.entry(first.inserted_entry_id).has_thumbnail and len(thumb) < 8192
        assert thumb == thumbnail_jpeg(first.frames[8]), "the middle of the 17 decoded frames"
        pixels = _decode(thumb)
        assert pixels.shape == (64, 96, 3)
        assert np.abs(pixels - _scaled(first.frames[8], (96, 64))).mean() < 4

        latent_only = pipe.generate("a blue whale, deep ocean", seed=2, decode=False, **size)
        assert latent_only.inserted_entry_id is not None, "no frames: the entry is stored all the same"
        assert store.thumbnail(latent_only.inserted_entry_id) is None
        assert not store.entry(latent_only.inserted_entry_id).has_thumbnail


def test_a_pixel_space_request_keeps_the_sample_as_its_thumbnail(tmp_path):
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        pipe = ChaiPipeline.reference(_lookup(store))
        result = pipe.generate("a red ball, a green room", seed=4, decode=False)  # the Sampler node's path
        clip = ((result.latent.clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)  # [F, H, W, 3] in [0, 1]
        pixels = _decode(store.thumbnail(result.inserted_entry_id))
        assert pixels.shape == (32, 32, 3)  # the reference clip is 32x32: never enlarged
        middle = np.abs(pixels - _scaled(clip[clip.shape[0] // 2], (32, 32))).mean()
        assert middle < 6, middle  # JPEG at 4:4:4 (4:2:0 measured 10-12 here)
        assert np.abs(pixels - np.full_like(pixels, int(pixels.mean()))).mean() > 2 * middle  # not a flat frame


def test_a_failed_thumbnail_never_loses_the_entry(parts, tmp_path, monkeypatch, caplog):
    import comfyui_chai.pipeline.core as core

    def broken(frame, *args, **kwargs):
        raise OSError("encoder unavailable")

    monkeypatch.setattr(core, "thumbnail_jpeg", broken)
    model, vae, captions = parts
    with LatentStore(tmp_path / "s", dim=DIM) as store:
        pipe = ChaiPipeline(model, vae, captions, _lookup(store), size_dtype=torch.float32)
        with caplog.at_level(logging.WARNING, logger="comfyui_chai.pipeline"):
            result = pipe.generate("a red fox, snowy forest", seed=1, height=64, width=64, num_frames=17)
        assert result.inserted_entry_id is not None and result.frames is not None
        assert len(store) == 1 and store.thumbnail(result.inserted_entry_id) is None
        assert any("no thumbnail for this entry (OSError: encoder unavailable)" in r.message for r in caplog.records)
        assert sorted(store.load(result.inserted_entry_id)) == ["step_2", "step_3", "step_4"]
        hit = pipe.generate("red fox, a river", seed=5, height=64, width=64, num_frames=17)
        assert hit.hit and hit.entry_id == result.inserted_entry_id
