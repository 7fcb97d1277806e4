"""One CHAI request end to end: prompt -> lookup -> fast mode (hit) or full mode with capture (miss)
-> decode -> insert into the store (misses only, once the request has completed).

This module is the only place where the cache engine (``cache/``) meets the OpenSora stack
(``opensora/``). What crosses between them is small and typed: a ``name -> tensor`` dict of
latents, a compatibility-key string, and the step schedule (``CacheAttentionConfig``).

Request path (DESIGN.md "The request path", steps 3-6; CHAI arXiv 2602.16132 section 3):

1. **Lookup** (``cache.lookup.CacheLookup``): entities of the prompt, their embeddings, k-NN among
   entries of the same compatibility key (model fingerprint + latent shape and pixel size +
   ``CacheAttentionConfig.fingerprint()``). A hit returns the entry's latents, size- and
   SHA-256-checked.
2. **Fast mode** on a hit: ``fast_steps`` (8) RFLOW steps with Cache Attention at steps 2-4
   (``opensora.cache_attention``). With ``fusion="per_entity"`` the best entry of every matched
   entity is loaded too (at most ``max_fused``) and their K/V are concatenated.
3. **Full mode** on a miss: ``full_steps`` (30) RFLOW steps, CFG 7.0, OpenSora's timestep
   transform, keeping the latents at the noise levels the fast schedule's cache steps use.
4. **Decode** with the OpenSora VAE -> frames in [0, 1].
5. **Store**: a miss's captured latents are inserted *after* the request completed (sampling and
   decoding), so a request that raises or is cancelled leaves the store exactly as it was.

Components of a :class:`ChaiPipeline`: an STDiT3, an OpenSora VAE (optional when only latents
are wanted), a caption encoder (anything with ``encode(prompt) -> (y [1,1,L,D], mask [1,L])`` and
a ``fingerprint`` string) and an optional ``CacheLookup``. Builders:

* :meth:`ChaiPipeline.from_files`: the real OpenSora 1.2 weights (STDiT3 and VAE safetensors, a T5
  folder or single file plus its tokenizer);
* :meth:`ChaiPipeline.tiny`: a small CPU configuration with seeded random weights that runs a
  request in about a second (tiny STDiT3, tiny VAE, and a caption encoder that is either MiniLM
  token states projected to the model width or hashed word vectors; see :func:`tiny_components`);
* :meth:`ChaiPipeline.reference`: the bundled, trained CPU reference model (``refmodel/``,
  ``models/reference_v1``): a *pixel-space* STDiT3 without a VAE, whose "latent" is the RGB clip
  itself in [-1, 1] (8 frames of 32 x 32 pixels), captioned by MiniLM token states.

Pixel-space models (``pixel_space=True``): the latent shape is (C, frames, height, width) in pixels,
sizes default to the model's ``native_size`` and ``default_frames``, OpenSora's VAE size rules and its
17-frame minimum do not apply (the reference sampler has no timestep shift), and decoding maps the
clip from [-1, 1] to [0, 1] without a VAE.
"""

from .builders import (
    OPENSORA_WEIGHT_FILES,
    TINY_STDIT3_CONFIG,
    TINY_VAE_SPATIAL_CONFIG,
    TINY_VAE_TEMPORAL_CONFIG,
    tiny_components,
)
from .captions import HashedWordCaptions, MiniLMCaptions, T5Captions
from .core import ChaiPipeline, GenerationResult, LatencySplit
from .fingerprints import files_fingerprint, module_fingerprint
from .video import frames_to_uint8, write_video

__all__ = [
    "ChaiPipeline",
    "GenerationResult",
    "LatencySplit",
    "T5Captions",
    "MiniLMCaptions",
    "HashedWordCaptions",
    "TINY_STDIT3_CONFIG",
    "TINY_VAE_SPATIAL_CONFIG",
    "TINY_VAE_TEMPORAL_CONFIG",
    "tiny_components",
    "module_fingerprint",
    "files_fingerprint",
    "frames_to_uint8",
    "write_video",
    "OPENSORA_WEIGHT_FILES",
]
