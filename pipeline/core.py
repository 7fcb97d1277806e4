"""The request path: one :class:`ChaiPipeline` call per request (see the package docstring).

This package is the only place where the cache engine (``cache/``) meets the OpenSora stack
(``opensora/``). What crosses between them is small and typed: a ``name -> tensor`` dict of
latents, a compatibility-key string, and the step schedule (``CacheAttentionConfig``).

A request: resolve the size and the compatibility key (:func:`.settings.compat_key`); look the
prompt up when its sampling mode asks for it; encode the caption; draw the noise; let the mode
(:mod:`.modes`) sample, with any requested model hooks attached; decode; insert what the mode asked to
store, only once the whole request completed (a cancelled or failed request leaves the store as it was).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..cache.lookup import CacheLookup, LookupQuery, LookupResult
from ..cache.store_manifest import check_thumbnail
from ..opensora.buckets import get_image_size, get_num_frames
from ..opensora.cache_attention import CacheAttentionConfig
from ..opensora.hooks import HookRegistry
from ..opensora.rflow import RFlow, StepState, make_noise
from ..opensora.stdit3 import STDiT3
from ..opensora.vae import OpenSoraVAE, latent_shape
from .builders import opensora_parts, reference_parts, tiny_parts
from .captions import check_prompt
from .fingerprints import module_fingerprint
from .modes import DEFAULT_MODE, LookupSpec, ModeRequest, get_mode, keyed_hook_names, make_model_hook, model_hook_names
from .settings import RequestSettings, compat_key, resolve_settings
from .video import frames_to_uint8, thumbnail_jpeg

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
        sampling_mode: the registered mode that ran (``"chai"``, ``"full"``, ``"plain"``, ...).
        served_by: what served the request: the reuse method on a hit (``"chai"``, ``"chorus"``; for
            ``auto`` the one it picked), ``"full"`` when a reuse mode ran the full schedule, else the mode's
            name. reason: why, in one line (the similarity against the threshold).
        inserted_entry_ids: every entry this request created (``auto`` stores a miss under two keys).
        details: the mode's extras for reports (Chorus: stage bounds, region, new tokens).
        not_stored: why an entry this request asked to store was skipped (one line each; the request's
            video is unaffected), e.g. a prompt with no entity, or an entry larger than the budget.
        hooks: the model hooks the request ran, in order. hook_reports: ``name -> report`` of every hook
            that reports (``ModelHook.report``; an intra-request cache: which steps it computed or reused
            at which granularity, see ``opensora.mixcache.IntraCache.report``).
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
    sampling_mode: str = DEFAULT_MODE
    served_by: str = DEFAULT_MODE
    reason: str = ""
    inserted_entry_ids: List[int] = field(default_factory=list)
    details: Dict[str, Any] = field(default_factory=dict)
    not_stored: List[str] = field(default_factory=list)
    hooks: Tuple[str, ...] = ()
    hook_reports: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def frames_uint8(self) -> torch.Tensor:
        """frames as uint8 [F, H, W, 3] (round to nearest). Raises ValueError when not decoded."""
        if self.frames is None:
            raise ValueError("this result has no frames: generate(..., decode=True) with a VAE")
        return frames_to_uint8(self.frames)

    def summary(self) -> Dict[str, Any]:
        """JSON-friendly view (no tensors): the request, hit/miss, match, steps and latency split."""
        return {
            "prompt": self.prompt, "seed": self.seed, "height": self.height, "width": self.width,
            "num_frames": self.num_frames, "mode": self.mode, "sampling_mode": self.sampling_mode,
            "hit": self.hit, "steps": self.steps,
            "entity": self.entity, "matched": self.matched,
            "similarity": None if self.similarity is None else round(float(self.similarity), 4),
            "entry_id": self.entry_id, "fused_entry_ids": list(self.fused_entry_ids),
            "inserted_entry_id": self.inserted_entry_id, "inserted_entry_ids": list(self.inserted_entry_ids),
            "served_by": self.served_by, "reason": self.reason, "details": dict(self.details),
            "not_stored": "; ".join(self.not_stored) or None,
            "compat_key": self.compat_key, "latent_shape": list(self.latent.shape),
            "timings_ms": {k: round(v, 3) for k, v in asdict(self.timings).items()},
            "hooks": list(self.hooks), "hook_reports": self.hook_reports,
        }



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ChaiPipeline:
    """CHAI text-to-video for OpenSora 1.2 (and any STDiT3 family): one :meth:`generate` call per request.

    Args:
        model: an STDiT3 (any dtype/device; the noise and captions follow it).
        vae: an OpenSoraVAE for decoding, or None (then ``generate(decode=False)`` only).
        captions: caption encoder with ``encode(prompt) -> (y [1,1,L,D], mask [1,L])`` and a
            ``fingerprint`` str (:class:`T5Captions`, :class:`MiniLMCaptions`,
            :class:`HashedWordCaptions`); L must equal the model's ``model_max_length``.
        lookup: a ``cache.lookup.CacheLookup`` on an open store, or None (every request is then a
            full run and nothing is stored).
        config: a ``CacheAttentionConfig`` naming every setting (kept for callers of the flat
            config); give either it or ``settings``.
        settings: the :class:`.settings.RequestSettings` of every request (default: resolved from
            ``model_defaults`` by :func:`.settings.resolve_settings`). A lookup threshold in it
            replaces the lookup's own.
        model_defaults: the model's own settings (flat keys, e.g. from its ``config.json``), the layer
            :meth:`with_settings` resolves user overrides on top of.
        model_fingerprint: identifies the denoiser's weights; default :func:`module_fingerprint`
            of the model (reads all weights once). The cache key also holds the caption encoder's
            fingerprint, the model dtype and the size-conditioning dtype.
        size_dtype: dtype of the size conditioning (torch.bfloat16 = OpenSora's default config).
        rflow: the sampler (default ``RFlow()``: OpenSora 1.2's settings).
        pixel_space: the model denoises RGB pixels in [-1, 1] directly (no VAE; latent
            [C, frames, height, width]); see the package docstring.
        native_size: (height, width) in pixels used when a request gives no size (pixel-space
            models; ignored otherwise).
        default_frames: frames when a request gives none (OpenSora 1.2: 51 = "2s").
        fps: frame rate of the model's videos, for writing them (OpenSora 1.2 and the reference
            model: 24, which is also the sampler's fps conditioning for videos).

    Raises:
        ValueError: a caption length that differs from the model's ``model_max_length``; a
            pixel-space ``native_size`` or ``default_frames`` below 1; both ``config`` and ``settings``.
    """

    def __init__(self, model: STDiT3, vae: Optional[OpenSoraVAE], captions: Any, lookup: Optional[CacheLookup] = None,
                 config: Optional[CacheAttentionConfig] = None, *, settings: Optional[RequestSettings] = None,
                 model_defaults: Optional[Mapping[str, Any]] = None, model_fingerprint: Optional[str] = None,
                 size_dtype: torch.dtype = torch.bfloat16, rflow: Optional[RFlow] = None, pixel_space: bool = False,
                 native_size: Optional[Tuple[int, int]] = None, default_frames: int = 51, fps: int = 24) -> None:
        if config is not None and settings is not None:
            raise ValueError("give either config= (a CacheAttentionConfig) or settings= (RequestSettings), not both")
        self.model = model
        self.vae = vae
        self.captions = captions
        self.model_defaults: Dict[str, Any] = dict(model_defaults or {})
        if settings is None:
            settings = RequestSettings.from_config(config) if config is not None \
                else resolve_settings(self.model_defaults)
        self.settings = settings
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
        self.lookup = lookup
        weights = model_fingerprint or module_fingerprint(model, "stdit3")
        self._weights_fingerprint = weights
        self.model_fingerprint = f"{weights}+{captions.fingerprint}+{str(model.dtype).replace('torch.', '')}"

    @property
    def lookup(self) -> Optional[CacheLookup]:
        """The cache lookup (None: no store), with this pipeline's lookup threshold applied."""
        return self._lookup

    @lookup.setter
    def lookup(self, lookup: Optional[CacheLookup]) -> None:
        threshold = self.settings.lookup.threshold
        if lookup is not None and threshold is not None and float(threshold) != float(lookup.config.threshold):
            lookup = lookup.with_config(threshold=float(threshold))
        self._lookup = lookup

    @property
    def config(self) -> CacheAttentionConfig:
        """Every setting as one flat ``CacheAttentionConfig`` (what the sampling functions take)."""
        return self.settings.cache_attention_config()

    def with_settings(self, *overrides: Optional[Mapping[str, Any]], lookup: Any = "same") -> "ChaiPipeline":
        """A pipeline sharing this one's model, VAE, captions (and lookup, unless given) whose settings are
        these with ``overrides`` on top (:meth:`.settings.RequestSettings.updated`). Cheap: nothing is
        copied or re-fingerprinted."""
        return ChaiPipeline(self.model, self.vae, self.captions, self._lookup if lookup == "same" else lookup,
                            settings=self.settings.updated(*overrides), model_defaults=self.model_defaults,
                            model_fingerprint=self._weights_fingerprint, size_dtype=self.size_dtype,
                            rflow=self.rflow, pixel_space=self.pixel_space, native_size=self.native_size,
                            default_frames=self.default_frames, fps=self.fps)

    # ---------------------------------------------------------------- builders
    @classmethod
    def tiny(cls, lookup: Optional[CacheLookup] = None, config: Optional[CacheAttentionConfig] = None, *,
             seed: int = 0, captions: str = "hashed", settings: Optional[RequestSettings] = None) -> "ChaiPipeline":
        """The small CPU configuration (:func:`.builders.tiny_components`: seeded random weights, noise-like
        frames; the request path and its timing are real). ``captions``: ``"hashed"`` or ``"minilm"``."""
        return cls(**tiny_parts(seed, captions), lookup=lookup, config=config, settings=settings)

    @classmethod
    def reference(cls, lookup: Optional[CacheLookup] = None, config: Optional[CacheAttentionConfig] = None, *,
                  model_dir: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu",
                  settings: Optional[RequestSettings] = None) -> "ChaiPipeline":
        """The bundled CPU reference model as a pixel-space pipeline (:func:`.builders.reference_parts`).

        Args:
            lookup, config, settings: as the constructor; without config or settings the folder's own
                (its ``config.json``: CFG, steps, "cache_attention").
            model_dir: folder with ``config.json`` and ``model.safetensors`` (default the bundled
                ``models/reference_v1``). device: torch device.

        Raises:
            refmodel.model.ModelFilesError (a FileNotFoundError): a missing or malformed file, or
                weights that do not match the config (the message names the file).
        """
        from ..refmodel.model import load_reference_model

        model, encoder = load_reference_model(model_dir, device=device)
        return cls.from_reference_model(model, encoder, lookup, config, settings=settings)

    @classmethod
    def from_reference_model(cls, model: torch.nn.Module, encoder: Any, lookup: Optional[CacheLookup] = None,
                             config: Optional[CacheAttentionConfig] = None, *,
                             settings: Optional[RequestSettings] = None) -> "ChaiPipeline":
        """:meth:`reference` for a reference model already loaded (``refmodel.model.load_reference_model``)."""
        return cls(**reference_parts(model, encoder), lookup=lookup, config=config, settings=settings)

    @classmethod
    def from_files(cls, stdit3: Union[str, Path], vae: Optional[Union[str, Path]], t5: Union[str, Path],
                   tokenizer: Optional[Union[str, Path]] = None, lookup: Optional[CacheLookup] = None,
                   config: Optional[CacheAttentionConfig] = None, *, device: Union[str, torch.device] = "cpu",
                   dtype: torch.dtype = torch.float32, t5_dtype: torch.dtype = torch.float32,
                   vae_spatial_config: Optional[Mapping[str, Any]] = None,
                   settings: Optional[RequestSettings] = None) -> "ChaiPipeline":
        """The real OpenSora 1.2 weights (:func:`.builders.opensora_parts`, whose errors name the file, what it
        must be and its place in ``--model``).

        Args:
            stdit3: ``model.safetensors`` of ``hpcai-tech/OpenSora-STDiT-v3``, or its folder.
            vae: ``model.safetensors`` of ``hpcai-tech/OpenSora-VAE-v1.2`` or its folder, or None.
            t5: T5-v1.1-XXL: an HF folder or a single file such as ComfyUI's ``t5xxl_fp16.safetensors``.
            tokenizer: T5 tokenizer folder (required for a single T5 file).
            lookup, config, settings: as the constructor. device, dtype (STDiT3 and VAE), t5_dtype,
                vae_spatial_config: see :func:`.builders.opensora_parts`.

        Raises:
            FileNotFoundError, ValueError, ``opensora.loading.CheckpointFormatError``,
            ``StateDictMismatchError``: see :func:`.builders.opensora_parts`.
        """
        parts = opensora_parts(stdit3, vae, t5, tokenizer, device=device, dtype=dtype, t5_dtype=t5_dtype,
                               vae_spatial_config=vae_spatial_config)
        return cls(**parts, lookup=lookup, config=config, settings=settings)

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

    def compat_key(self, height: int, width: int, num_frames: int, mode: str = DEFAULT_MODE,
                   hooks: Sequence[str] = ()) -> str:
        """The cache's compatibility key of a request at this size (:func:`.settings.compat_key`):
        denoiser, caption encoder and dtype, latent shape, pixel size and frames, size-conditioning
        dtype, the store fingerprint of ``mode``'s entries (``SamplingMode.lookup_spec``; CHAI's by
        default) and the names of the request's ``hooks`` that change the model's output
        (``modes.keyed_hook_names``). Only entries of the same key are ever matched.

        Raises:
            ValueError: an unknown mode.
        """
        spec = get_mode(mode).lookup_spec(self.settings)
        return compat_key(self.model_fingerprint, self.latent_shape(height, width, num_frames), height, width,
                          num_frames, self.size_dtype, self.settings, keyed_hook_names(hooks),
                          store_fingerprint=spec.store_fingerprint)

    def _lookup_as(self, spec: LookupSpec, prompt: str, key: str, *, load: bool, record: bool,
                   query: Optional[LookupQuery]) -> Optional[LookupResult]:
        """``spec``'s lookup of ``prompt`` under ``key`` (None without a store). A query made for other
        lookup keys (an entity query for a whole-prompt lookup) is not reused."""
        lookup = self.lookup
        if lookup is None:
            return None
        changes: Dict[str, Any] = {}
        if spec.mode != lookup.config.mode:
            changes["mode"] = spec.mode
        if spec.threshold is not None and float(spec.threshold) != float(lookup.config.threshold):
            changes["threshold"] = float(spec.threshold)
        if changes:
            lookup = lookup.with_config(**changes)
        if query is not None and query.mode != spec.mode:
            query = None
        return lookup.lookup(prompt, key, load=load, record=record and spec.record, query=query)

    # ---------------------------------------------------------------- the request
    def query(self, prompt: str, entities: Optional[Sequence[str]] = None) -> Optional[LookupQuery]:
        """The prompt's lookup keys and embeddings, made once for :meth:`generate` to reuse (``query=``);
        None without a lookup. ``entities``: keys already extracted (e.g. by an entity-extractor node)."""
        if self.lookup is None:
            return None
        return self.lookup.query(check_prompt(prompt), None if entities is None else list(entities))

    def _thumbnail(self, latent: torch.Tensor, frames: Optional[torch.Tensor]) -> Optional[bytes]:
        """The stored entry's thumbnail: the middle frame of the request's video as a small JPEG
        (:func:`.video.thumbnail_jpeg`), from the frames the request decoded ([F, H, W, 3] in [0, 1]),
        or from the sample itself in pixel space (``latent`` [1, 3, F, H, W] in [-1, 1]). None when
        the request decoded no frames of a latent-space model (no extra VAE decode is run for a
        thumbnail), or when making it fails: the entry is then stored without one (logged)."""
        try:
            if frames is not None:
                frame = frames[frames.shape[0] // 2]
            elif self.pixel_space:
                frame = ((latent[0, :, latent.shape[2] // 2].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu()
            else:
                return None
            return check_thumbnail(thumbnail_jpeg(frame))  # what put() accepts, so put never refuses it
        except Exception as exc:  # a thumbnail is a convenience: never lose the entry for it
            log.warning("CHAI: no thumbnail for this entry (%s: %s); the entry is stored without one",
                        type(exc).__name__, exc)
            return None

    @torch.no_grad()
    def generate(self, prompt: str, *, seed: int = 0, resolution: Optional[str] = "240p", aspect_ratio: str = "9:16",
                 height: Optional[int] = None, width: Optional[int] = None, num_frames: Union[int, str, None] = None,
                 mode: str = DEFAULT_MODE, decode: bool = True, store: bool = True,
                 progress: Optional[ProgressFn] = None, should_cancel: Optional[Callable[[], bool]] = None,
                 on_step: Optional[Callable[[StepState], None]] = None, query: Optional[LookupQuery] = None,
                 hooks: Sequence[str] = ()) -> GenerationResult:
        """Generate one video for ``prompt``.

        Args:
            prompt: the text prompt (non-empty).
            seed: noise seed (``opensora.rflow.make_noise``: same seed, same noise on any device).
            resolution, aspect_ratio: OpenSora bucket, e.g. "240p" and "9:16" (240x426);
                ignored when ``height`` and ``width`` (pixels) are given, and by pixel-space models
                (their ``native_size`` is the default there).
            num_frames: pixel frames (51 = OpenSora's "2s") or a name such as "4s"; 1 = image;
                None = the model's ``default_frames`` (51; the reference model: 8).
            mode: a registered sampling mode (:mod:`.modes`): ``"chai"`` (default; legacy ``"auto"``:
                lookup, fast on a hit, full + store on a miss), ``"full"`` (baseline: full_steps, no
                lookup, nothing stored), ``"plain"`` (legacy ``"plain_fast"``: fast_steps without
                cache), ``"warm"`` (full + store whatever the lookup finds), or any mode registered since.
            decode: decode the latent into frames (needs a VAE, except in pixel space).
            store: insert what the mode asks to store (a CHAI miss's capture) once the request completed.
            progress: ``fn(done_steps, total_steps)`` after every denoising step.
            should_cancel: ``fn() -> bool`` checked before every step; True raises
                ``opensora.rflow.SamplingCancelled`` and nothing is stored.
            on_step: ``fn(StepState)`` after every step (latents before/after, velocity).
            query: the prompt's :meth:`query`, made earlier for this request (extraction and embedding
                are then not repeated).
            hooks: names of registered model hooks (``modes.register_model_hook``) attached to the model
                for this request, outermost first (``"mixcache"``, ``"teacache"``: intra-request caching,
                its knobs from the settings' ``mixcache`` part). Hooks registered ``keyed`` are part of the
                request's compatibility key.

        Returns:
            :class:`GenerationResult`.

        Raises:
            ValueError / TypeError: empty prompt, bad size, unknown mode or hook, decode without a VAE,
                a query of another prompt.
            SamplingCancelled: cancelled; the store is unchanged.
        """
        t_start = time.perf_counter()
        check_prompt(prompt)
        sampling = get_mode(mode)
        hooks = tuple(hooks)
        unknown = [h for h in hooks if h not in model_hook_names()]
        if unknown:
            raise ValueError(f"unknown model hook(s) {unknown}; registered hooks: {', '.join(model_hook_names()) or 'none'}")
        if decode and self.vae is None and not self.pixel_space:
            raise ValueError("decode=True needs a VAE; build the pipeline with one or pass decode=False")
        height, width, frames = self.resolve_size(resolution, aspect_ratio, height, width, num_frames)
        shape = self.latent_shape(height, width, frames)
        key = self.compat_key(height, width, frames, sampling.name, hooks)
        device = self.device
        timings = LatencySplit()
        lookup = self.lookup

        # 1. lookup (when the mode asks for one and there is a store)
        lookup_result: Optional[LookupResult] = None
        if sampling.uses_lookup and lookup is not None:
            t0 = time.perf_counter()
            lookup_result = self._lookup_as(sampling.lookup_spec(self.settings), prompt, key,
                                            load=sampling.loads_latents, record=True, query=query)
            timings.lookup_ms = (time.perf_counter() - t0) * 1000.0

        extra_lookup_ms = [0.0]  # lookups a mode makes while sampling: lookup time, not denoising

        def key_for(name: str) -> str:
            return self.compat_key(height, width, frames, name, hooks)

        def lookup_for(name: str, record: bool = True) -> Optional[LookupResult]:
            other = get_mode(name)
            t1 = time.perf_counter()
            result = self._lookup_as(other.lookup_spec(self.settings), prompt, key_for(name),
                                     load=other.loads_latents, record=record, query=query)
            extra_lookup_ms[0] += (time.perf_counter() - t1) * 1000.0
            return result

        def record_lookup(result: LookupResult) -> None:
            if lookup is not None:
                lookup.record(result)

        # 2. caption
        t0 = time.perf_counter()
        y, y_mask = self.captions.encode(prompt)
        y = y.to(device)
        y_mask = y_mask.to(device)
        _sync(device)
        timings.text_ms = (time.perf_counter() - t0) * 1000.0

        # 3. denoise: the mode samples, with the requested model hooks attached
        def callback(state: StepState) -> None:
            if on_step is not None:
                on_step(state)
            if progress is not None:
                progress(state.info.index + 1, state.info.total)

        request = ModeRequest(
            prompt=prompt, seed=int(seed), height=height, width=width, num_frames=frames, settings=self.settings,
            model=self.model, rflow=self.rflow, noise=make_noise((1, *shape), seed, device=device),
            sample_kwargs=dict(y=y, y_mask=y_mask, y_null=self.model.y_embedder.y_embedding, height=height,
                               width=width, num_frames=frames, size_dtype=self.size_dtype,
                               should_cancel=should_cancel),
            callback=callback, lookup=lookup_result, load_entry=None if lookup is None else lookup.store.load,
            measure=device.type == "cuda", captions=self.captions, lookup_for=lookup_for,
            record_lookup=record_lookup, compat_key_for=key_for)
        t0 = time.perf_counter()
        running = []
        with contextlib.ExitStack() as attached:
            for name in hooks:
                running.append((name, attached.enter_context(
                    HookRegistry.of(self.model).attached(make_model_hook(name, request), name))))
            out = sampling.sample(request)
        hook_reports = {name: r for name, r in ((name, hook.report()) for name, hook in running) if r is not None}
        _sync(device)
        timings.denoise_ms = (time.perf_counter() - t0) * 1000.0 - out.load_ms - extra_lookup_ms[0]
        timings.lookup_ms += out.load_ms + extra_lookup_ms[0]
        timings.cache_kv_ms = out.kv_ms
        latent = out.latent

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

        # 5. store (the request completed)
        inserted: List[int] = []
        not_stored: List[str] = []
        pending = list(out.inserts)
        if out.store is not None and lookup_result is not None:
            pending.insert(0, (lookup_result, out.store, out.store_info))
        if store and pending and lookup is not None:
            t0 = time.perf_counter()
            thumbnail = self._thumbnail(latent, frames_out)
            ids = [lookup.insert(result, tensors, info, thumbnail=thumbnail) for result, tensors, info in pending]
            inserted = [i for i in ids if i is not None]
            not_stored = [r.not_stored for (r, _t, _i), i in zip(pending, ids) if i is None and r.not_stored]
            timings.store_ms = (time.perf_counter() - t0) * 1000.0

        timings.total_ms = (time.perf_counter() - t_start) * 1000.0
        lr = out.lookup if out.lookup is not None else lookup_result
        return GenerationResult(
            prompt=prompt, seed=int(seed), height=height, width=width, num_frames=frames, mode=out.label,
            hit=out.hit, steps=out.steps, compat_key=out.compat_key or key, latent=latent[0].float().cpu(),
            frames=frames_out, entity=lr.entity if lr is not None else None,
            matched=lr.matched if lr is not None else None,
            similarity=float(lr.similarity) if lr is not None and lr.matched is not None else None,
            entry_id=out.entry_ids[0] if out.hit and out.entry_ids else None, fused_entry_ids=list(out.entry_ids),
            inserted_entry_id=inserted[0] if inserted else None, timings=timings, lookup=lr,
            sampling_mode=sampling.name, served_by=out.served_by or sampling.name, reason=out.reason,
            inserted_entry_ids=inserted, details=dict(out.details), not_stored=not_stored,
            hooks=hooks, hook_reports=hook_reports,
        )
