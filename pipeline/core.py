"""The request path: one :class:`ChaiPipeline` call per request (see the package docstring).

This module is the only place where the cache engine (``cache/``) meets the OpenSora stack
(``opensora/``). What crosses between them is small and typed: a ``name -> tensor`` dict of
latents, a compatibility-key string, and the step schedule (``CacheAttentionConfig``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..cache.lookup import CacheLookup, LookupResult
from ..opensora.buckets import get_image_size, get_num_frames
from ..opensora.cache_attention import CacheAttentionConfig, sample_fast, sample_full
from ..opensora.rflow import RFlow, StepState, make_noise
from ..opensora.stdit3 import STDiT3
from ..opensora.vae import OpenSoraVAE, latent_shape
from .captions import check_prompt
from .fingerprints import module_fingerprint
from .video import frames_to_uint8

__all__ = ["ChaiPipeline", "GenerationResult", "LatencySplit", "ProgressFn"]

log = logging.getLogger("comfyui_chai.pipeline")

ProgressFn = Callable[[int, int], None]


@dataclass
class LatencySplit:
    """Where a request's time went, in milliseconds (wall clock; CUDA synchronised at each boundary).

    Attributes:
        lookup_ms: entity extraction, embedding, ANN search and loading/verifying the cached
            latents (fused entries included). text_ms: caption encoding. denoise_ms: the sampling
            loop (includes ``cache_kv_ms``). cache_kv_ms: turning cached latents into K/V at the
            cache steps (hit only). decode_ms: VAE decode. store_ms: inserting the entry (miss
            only). total_ms: the whole request.
    """

    lookup_ms: float = 0.0
    text_ms: float = 0.0
    denoise_ms: float = 0.0
    cache_kv_ms: float = 0.0
    decode_ms: float = 0.0
    store_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def cache_ms(self) -> float:
        """Everything the cache adds to a request: lookup (+ latent load) + cached K/V + store."""
        return self.lookup_ms + self.cache_kv_ms + self.store_ms


@dataclass
class GenerationResult:
    """Outcome of :meth:`ChaiPipeline.generate`.

    Attributes:
        prompt, seed, height, width, num_frames: the request (pixels, frames).
        mode: ``"fast"`` (hit, Cache Attention), ``"full"`` (miss or forced full run) or
            ``"plain_fast"`` (forced fast_steps run without cache, a baseline).
        hit: the lookup found a usable entry. steps: denoising steps run.
        entity / matched / similarity: the prompt entity, the stored entity it matched and their
            cosine similarity (best pair; also filled on a miss when anything was close).
        entry_id: the served entry (hit). fused_entry_ids: every entry whose K/V were used.
        inserted_entry_id: the entry this request created (miss with a store).
        compat_key: the key looked up (and stored under).
        latent: clean latent [C, T, H, W] fp32 on the CPU.
        frames: decoded video [F, H, W, 3] float32 in [0, 1] on the CPU (None without decode).
        timings: :class:`LatencySplit`. lookup: the full ``LookupResult`` (None without a cache).
    """

    prompt: str
    seed: int
    height: int
    width: int
    num_frames: int
    mode: str
    hit: bool
    steps: int
    compat_key: str
    latent: torch.Tensor
    frames: Optional[torch.Tensor] = None
    entity: Optional[str] = None
    matched: Optional[str] = None
    similarity: Optional[float] = None
    entry_id: Optional[int] = None
    fused_entry_ids: List[int] = field(default_factory=list)
    inserted_entry_id: Optional[int] = None
    timings: LatencySplit = field(default_factory=LatencySplit)
    lookup: Optional[LookupResult] = None

    def frames_uint8(self) -> torch.Tensor:
        """frames as uint8 [F, H, W, 3] (round to nearest). Raises ValueError when not decoded."""
        if self.frames is None:
            raise ValueError("this result has no frames: generate(..., decode=True) with a VAE")
        return frames_to_uint8(self.frames)

    def summary(self) -> Dict[str, Any]:
        """JSON-friendly view (no tensors): the request, hit/miss, match, steps and latency split."""
        return {
            "prompt": self.prompt, "seed": self.seed, "height": self.height, "width": self.width,
            "num_frames": self.num_frames, "mode": self.mode, "hit": self.hit, "steps": self.steps,
            "entity": self.entity, "matched": self.matched,
            "similarity": None if self.similarity is None else round(float(self.similarity), 4),
            "entry_id": self.entry_id, "fused_entry_ids": list(self.fused_entry_ids),
            "inserted_entry_id": self.inserted_entry_id, "compat_key": self.compat_key,
            "latent_shape": list(self.latent.shape),
            "timings_ms": {k: round(v, 3) for k, v in asdict(self.timings).items()},
        }



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ChaiPipeline:
    """CHAI text-to-video for OpenSora 1.2: one :meth:`generate` call per request.

    Args:
        model: an STDiT3 (any dtype/device; the noise and captions follow it).
        vae: an OpenSoraVAE for decoding, or None (then ``generate(decode=False)`` only).
        captions: caption encoder with ``encode(prompt) -> (y [1,1,L,D], mask [1,L])`` and a
            ``fingerprint`` str (:class:`T5Captions`, :class:`MiniLMCaptions`,
            :class:`HashedWordCaptions`); L must equal the model's ``model_max_length``.
        lookup: a ``cache.lookup.CacheLookup`` on an open store, or None (every request is then a
            full run and nothing is stored).
        config: :class:`CacheAttentionConfig` (all CHAI knobs). A non-None ``config.threshold``
            replaces the lookup's threshold.
        model_fingerprint: identifies the denoiser's weights; default :func:`module_fingerprint`
            of the model (reads all weights once). The cache key also holds the caption encoder's
            fingerprint, the model dtype and the size-conditioning dtype.
        size_dtype: dtype of the size conditioning (torch.bfloat16 = OpenSora's default config).
        rflow: the sampler (default ``RFlow()``: OpenSora 1.2's settings).
        pixel_space: the model denoises RGB pixels in [-1, 1] directly (no VAE; latent
            [C, frames, height, width]); see the module docstring.
        native_size: (height, width) in pixels used when a request gives no size (pixel-space
            models; ignored otherwise).
        default_frames: frames when a request gives none (OpenSora 1.2: 51 = "2s").
        fps: frame rate of the model's videos, for writing them (OpenSora 1.2 and the reference
            model: 24, which is also the sampler's fps conditioning for videos).

    Raises:
        ValueError: a caption length that differs from the model's ``model_max_length``; a
            pixel-space ``native_size`` or ``default_frames`` below 1.
    """

    def __init__(self, model: STDiT3, vae: Optional[OpenSoraVAE], captions: Any, lookup: Optional[CacheLookup] = None,
                 config: Optional[CacheAttentionConfig] = None, *, model_fingerprint: Optional[str] = None,
                 size_dtype: torch.dtype = torch.bfloat16, rflow: Optional[RFlow] = None, pixel_space: bool = False,
                 native_size: Optional[Tuple[int, int]] = None, default_frames: int = 51, fps: int = 24) -> None:
        self.model = model
        self.vae = vae
        self.captions = captions
        self.config = config or CacheAttentionConfig()
        self.rflow = rflow or RFlow()
        self.size_dtype = size_dtype
        self.pixel_space = bool(pixel_space)
        self.native_size = None if native_size is None else (int(native_size[0]), int(native_size[1]))
        self.default_frames = int(default_frames)
        self.fps = int(fps)
        if self.default_frames < 1 or self.fps < 1 or (self.native_size is not None and min(self.native_size) < 1):
            raise ValueError(f"native_size, default_frames and fps must be positive, got {native_size}, "
                             f"{default_frames}, {fps}")
        length = getattr(captions, "max_length", None)
        max_length = int(model.config.model_max_length)
        if length is not None and int(length) != max_length:
            raise ValueError(f"the caption encoder gives {length} tokens but the model's model_max_length is "
                             f"{max_length}; they must match (OpenSora 1.2: 300)")
        if lookup is not None and self.config.threshold is not None \
                and float(self.config.threshold) != float(lookup.config.threshold):
            lookup = CacheLookup(lookup.store, lookup.extractor, lookup.embedder,
                                 replace(lookup.config, threshold=float(self.config.threshold)))
        self.lookup = lookup
        weights = model_fingerprint or module_fingerprint(model, "stdit3")
        self.model_fingerprint = f"{weights}+{captions.fingerprint}+{str(model.dtype).replace('torch.', '')}"

    # ---------------------------------------------------------------- builders
    @classmethod
    def tiny(cls, lookup: Optional[CacheLookup] = None, config: Optional[CacheAttentionConfig] = None, *,
             seed: int = 0, captions: str = "hashed") -> "ChaiPipeline":
        """The small CPU configuration (``builders.tiny_pipeline``)."""
        from .builders import tiny_pipeline

        return tiny_pipeline(lookup, config, seed=seed, captions=captions)

    @classmethod
    def reference(cls, lookup: Optional[CacheLookup] = None, config: Optional[CacheAttentionConfig] = None, *,
                  model_dir: Optional[Union[str, Path]] = None,
                  device: Union[str, torch.device] = "cpu") -> "ChaiPipeline":
        """The bundled CPU reference model as a pixel-space pipeline (``builders.reference_pipeline``)."""
        from .builders import reference_pipeline

        return reference_pipeline(lookup, config, model_dir=model_dir, device=device)

    @classmethod
    def from_files(cls, stdit3: Union[str, Path], vae: Optional[Union[str, Path]], t5: Union[str, Path],
                   tokenizer: Optional[Union[str, Path]] = None, lookup: Optional[CacheLookup] = None,
                   config: Optional[CacheAttentionConfig] = None, *, device: Union[str, torch.device] = "cpu",
                   dtype: torch.dtype = torch.float32, t5_dtype: torch.dtype = torch.float32,
                   vae_spatial_config: Optional[Mapping[str, Any]] = None) -> "ChaiPipeline":
        """The real OpenSora 1.2 weights (``builders.opensora_pipeline``; its errors name the file)."""
        from .builders import opensora_pipeline

        return opensora_pipeline(stdit3, vae, t5, tokenizer, lookup, config, device=device, dtype=dtype,
                                 t5_dtype=t5_dtype, vae_spatial_config=vae_spatial_config)

    # ---------------------------------------------------------------- keys
    @property
    def device(self) -> torch.device:
        """Device of the denoiser."""
        return self.model.x_embedder.proj.weight.device

    def resolve_size(self, resolution: Optional[str], aspect_ratio: str, height: Optional[int],
                     width: Optional[int], num_frames: Union[int, str, None]) -> Tuple[int, int, int]:
        """(height, width, num_frames) in pixels/frames from a bucket name or explicit sizes.

        ``num_frames=None`` means the model's ``default_frames``. A pixel-space model ignores
        ``resolution``/``aspect_ratio``: its size is ``height`` x ``width``, else ``native_size``.

        Raises:
            ValueError: unknown bucket, sizes below 16 pixels, a video of 2..16 frames (OpenSora's
                timestep shift needs 1 or >= 17); pixel space: no size and no native size, or a size
                that is not a multiple of the patch size.
        """
        if num_frames is None:
            num_frames = self.default_frames
        if self.pixel_space:
            if height is None or width is None:
                if self.native_size is None:
                    raise ValueError("this pixel-space model has no native size: give height= and width= in pixels")
                height, width = self.native_size
            frames = get_num_frames(num_frames)
            patch = tuple(int(p) for p in self.model.config.patch_size)
            if int(height) < patch[1] or int(width) < patch[2] or int(height) % patch[1] or int(width) % patch[2]:
                raise ValueError(f"height and width must be positive multiples of the patch size {patch[1]}x{patch[2]} "
                                 f"for this pixel-space model, got {height}x{width}")
            return int(height), int(width), frames
        if height is None or width is None:
            if resolution is None:
                raise ValueError("give resolution= (e.g. '240p') and aspect_ratio=, or height= and width= in pixels")
            height, width = get_image_size(resolution, aspect_ratio)
        frames = get_num_frames(num_frames)
        if int(height) < 16 or int(width) < 16:
            raise ValueError(f"height and width must be at least 16 pixels (2x2 latent), got {height}x{width}")
        if 1 < frames < 17:
            raise ValueError(f"num_frames={frames}: OpenSora 1.2 videos need at least 17 frames (1 = an image)")
        return int(height), int(width), frames

    def latent_shape(self, height: int, width: int, num_frames: int) -> Tuple[int, int, int, int]:
        """Latent (C, T, H, W) of a request (from the VAE when there is one, else v1.2's rules; a
        pixel-space model: (C, frames, height, width))."""
        if self.pixel_space:
            return (int(self.model.in_channels), int(num_frames), int(height), int(width))
        if self.vae is not None:
            return tuple(self.vae.latent_shape(num_frames, height, width))  # type: ignore[return-value]
        return latent_shape(num_frames, height, width, latent_channels=int(self.model.in_channels))

    def compat_key(self, height: int, width: int, num_frames: int) -> str:
        """The cache's compatibility key of a request at this size.

        ``<model>+<captions>+<dtype>|<C>x<T>x<H>x<W>|<height>x<width>f<frames>|<size dtype>|<config>``:
        the denoiser and caption weights, the latent shape, the pixel size and frame count (they
        set the position-embedding scale and the timestep shift), the size-conditioning dtype and
        ``CacheAttentionConfig.fingerprint()``. Only entries of the same key are ever matched.
        """
        c, t, h, w = self.latent_shape(height, width, num_frames)
        size = str(self.size_dtype).replace("torch.", "")
        return f"{self.model_fingerprint}|{c}x{t}x{h}x{w}|{height}x{width}f{num_frames}|{size}|{self.config.fingerprint()}"

    # ---------------------------------------------------------------- the request
    def _entries_for(self, result: LookupResult, want: Tuple[int, ...]) -> Tuple[List[Dict[str, torch.Tensor]], List[int]]:
        """The cached entries to attend to: the served one, plus (per_entity fusion) the best entry
        of every other matched entity. Entries lacking a latent or of another shape are skipped."""

        def usable(latents: Optional[Mapping[str, torch.Tensor]]) -> bool:
            return latents is not None and all(
                n in latents and tuple(latents[n].shape) == want for n in self.config.latent_names)

        entries: List[Dict[str, torch.Tensor]] = []
        ids: List[int] = []
        if usable(result.latents):
            entries.append(dict(result.latents))  # type: ignore[arg-type]
            ids.append(int(result.entry_id))  # type: ignore[arg-type]
        else:
            log.warning("entry %s does not hold %s of shape %s; treated as a miss",
                        result.entry_id, self.config.latent_names, want)
            return [], []
        if self.config.fusion == "per_entity" and self.lookup is not None:
            ranked = sorted((s for s in result.per_entity if s.hit and s.entry_id is not None),
                            key=lambda s: -s.similarity)
            for score in ranked:
                if len(entries) >= self.config.max_fused:
                    break
                if score.entry_id in ids:
                    continue
                latents = self.lookup.store.load(int(score.entry_id))
                if usable(latents):
                    entries.append(dict(latents))  # type: ignore[arg-type]
                    ids.append(int(score.entry_id))
        return entries, ids

    @torch.no_grad()
    def generate(self, prompt: str, *, seed: int = 0, resolution: Optional[str] = "240p", aspect_ratio: str = "9:16",
                 height: Optional[int] = None, width: Optional[int] = None, num_frames: Union[int, str, None] = None,
                 mode: str = "auto", decode: bool = True, store: bool = True,
                 progress: Optional[ProgressFn] = None, should_cancel: Optional[Callable[[], bool]] = None,
                 on_step: Optional[Callable[[StepState], None]] = None) -> GenerationResult:
        """Generate one video for ``prompt``.

        Args:
            prompt: the text prompt (non-empty).
            seed: noise seed (``opensora.rflow.make_noise``: same seed, same noise on any device).
            resolution, aspect_ratio: OpenSora bucket, e.g. "240p" and "9:16" (240x426);
                ignored when ``height`` and ``width`` (pixels) are given, and by pixel-space models
                (their ``native_size`` is the default there).
            num_frames: pixel frames (51 = OpenSora's "2s") or a name such as "4s"; 1 = image;
                None = the model's ``default_frames`` (51; the reference model: 8).
            mode: ``"auto"`` (CHAI: lookup, fast on a hit, full + store on a miss), ``"full"``
                (baseline: full_steps, no lookup, nothing stored) or ``"plain_fast"`` (baseline:
                fast_steps without cache).
            decode: decode the latent into frames (needs a VAE, except in pixel space).
            store: insert a miss's captured latents (auto mode with a lookup only).
            progress: ``fn(done_steps, total_steps)`` after every denoising step.
            should_cancel: ``fn() -> bool`` checked before every step; True raises
                ``opensora.rflow.SamplingCancelled`` and nothing is stored.
            on_step: ``fn(StepState)`` after every step (latents before/after, velocity).

        Returns:
            :class:`GenerationResult`.

        Raises:
            ValueError / TypeError: empty prompt, bad size, unknown mode, decode without a VAE.
            SamplingCancelled: cancelled; the store is unchanged.
        """
        t_start = time.perf_counter()
        check_prompt(prompt)
        if mode not in ("auto", "full", "plain_fast"):
            raise ValueError(f"mode must be 'auto', 'full' or 'plain_fast', got {mode!r}")
        if decode and self.vae is None and not self.pixel_space:
            raise ValueError("decode=True needs a VAE; build the pipeline with one or pass decode=False")
        height, width, frames = self.resolve_size(resolution, aspect_ratio, height, width, num_frames)
        shape = self.latent_shape(height, width, frames)
        key = self.compat_key(height, width, frames)
        device = self.device
        timings = LatencySplit()
        cfg = self.config

        # 1. lookup
        lookup_result: Optional[LookupResult] = None
        entries: List[Dict[str, torch.Tensor]] = []
        entry_ids: List[int] = []
        if mode == "auto" and self.lookup is not None:
            t0 = time.perf_counter()
            lookup_result = self.lookup.lookup(prompt, key)
            if lookup_result.hit and cfg.enabled:
                entries, entry_ids = self._entries_for(lookup_result, tuple(shape))
            timings.lookup_ms = (time.perf_counter() - t0) * 1000.0
        hit = bool(entries)

        # 2. caption
        t0 = time.perf_counter()
        y, y_mask = self.captions.encode(prompt)
        y = y.to(device)
        y_mask = y_mask.to(device)
        _sync(device)
        timings.text_ms = (time.perf_counter() - t0) * 1000.0

        # 3. denoise
        z = make_noise((1, *shape), seed, device=device)
        kwargs = dict(y=y, y_mask=y_mask, y_null=self.model.y_embedder.y_embedding, height=height, width=width,
                      num_frames=frames, size_dtype=self.size_dtype, should_cancel=should_cancel)
        total = cfg.fast_steps if (hit or mode == "plain_fast") else cfg.full_steps

        def callback(state: StepState) -> None:
            if on_step is not None:
                on_step(state)
            if progress is not None:
                progress(state.info.index + 1, state.info.total)

        t0 = time.perf_counter()
        captured: Dict[str, torch.Tensor] = {}
        run_info: Dict[str, Any] = {}
        if hit:
            latent, ca = sample_fast(self.rflow, self.model, z, cfg, cached=entries, callback=callback,
                                     measure=device.type == "cuda", **kwargs)
            timings.cache_kv_ms = ca.kv_ms if ca is not None else 0.0
            run_mode = "fast"
        elif mode == "plain_fast":
            latent, _ = sample_fast(self.rflow, self.model, z, cfg, cached=None, callback=callback, **kwargs)
            run_mode = "plain_fast"
        else:
            run = sample_full(self.rflow, self.model, z, cfg, callback=callback, **kwargs)
            latent, captured = run.latent, run.captured
            run_info = {"full_step_index": run.plan, "full_timestep": run.timesteps}
            run_mode = "full"
        _sync(device)
        timings.denoise_ms = (time.perf_counter() - t0) * 1000.0

        # 4. decode
        frames_out = None
        if decode:
            t0 = time.perf_counter()
            if self.pixel_space:  # the sample is the RGB clip in [-1, 1]
                video = latent
            else:
                video = self.vae.decode(latent.to(self.vae.dtype), num_frames=frames)  # [1, 3, F, H, W]
            frames_out = ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu()
            _sync(device)
            timings.decode_ms = (time.perf_counter() - t0) * 1000.0

        # 5. store (a miss that completed)
        inserted = None
        if run_mode == "full" and mode == "auto" and store and self.lookup is not None and lookup_result is not None \
                and cfg.enabled:
            t0 = time.perf_counter()
            info = {"seed": int(seed), "height": height, "width": width, "num_frames": frames,
                    "config": cfg.tag(), "cache_steps": list(cfg.cache_steps), **run_info}
            inserted = self.lookup.insert(lookup_result, captured, info)
            timings.store_ms = (time.perf_counter() - t0) * 1000.0

        timings.total_ms = (time.perf_counter() - t_start) * 1000.0
        lr = lookup_result
        return GenerationResult(
            prompt=prompt, seed=int(seed), height=height, width=width, num_frames=frames, mode=run_mode, hit=hit,
            steps=total, compat_key=key, latent=latent[0].float().cpu(), frames=frames_out,
            entity=lr.entity if lr is not None else None, matched=lr.matched if lr is not None else None,
            similarity=float(lr.similarity) if lr is not None and lr.matched is not None else None,
            entry_id=entry_ids[0] if hit else None, fused_entry_ids=entry_ids, inserted_entry_id=inserted,
            timings=timings, lookup=lr,
        )
