"""The CHAI request path: prompt -> settings -> lookup -> sampling mode -> decode -> store.

This package is the only place where the cache engine (``cache/``) meets the model stacks
(``opensora/``; the reference model ``refmodel/``, an STDiT3 family of its own). What crosses between
them is small and typed: a ``name -> tensor`` dict of latents, a compatibility-key string, and the
request's settings. Modules, each with one job:

* :mod:`.settings`: the request's settings (``ScheduleSettings``, ``AttentionSettings``,
  ``LookupSettings``, together ``RequestSettings``), resolved in one function with one precedence
  (built-in defaults < the model's ``config.json`` < the user's overrides), and the compatibility key;
* :mod:`.modes`: sampling modes as plug-ins (``chai``, ``full``, ``plain``, ``warm``; a new one is one
  class and one ``register_mode`` call) and named model hooks per request (``+hook``);
* :mod:`.mixcache`: intra-request caching as two registered hooks, ``mixcache`` (hybrid step / CFG /
  block reuse) and ``teacache`` (the single-granularity baseline), with presets;
* :mod:`.chorus`: whole-prompt reuse after Chorus (``chorus``, ``chorus_warm``) and ``auto`` reuse
  (Chorus, else CHAI, else full);
* :mod:`.core`: :class:`ChaiPipeline`, one :meth:`ChaiPipeline.generate` call per request;
* :mod:`.builders`: what a pipeline is built from per model family: the small CPU configuration
  (seeded random weights), the bundled reference model (pixel space, no VAE) and the real OpenSora 1.2
  files; :mod:`.captions` (T5, MiniLM token states, hashed words), :mod:`.fingerprints` (weights in
  cache keys), :mod:`.video` (frames to mp4);
* :mod:`.quality`: the quality harness, every mode side by side on the reference model.

A request (CHAI arXiv 2602.16132 section 3):

1. **Size and key**: pixels, frames and latent shape; the compatibility key (model fingerprint, latent
   shape, pixel size, size dtype, the settings' store fingerprint). Only entries of that key match.
2. **Lookup**, when the mode asks for one (``chai``): entities of the prompt, their embeddings (once per
   request: a ``LookupQuery`` made earlier, e.g. by the ComfyUI Cache Lookup node, is reused), k-NN
   among entries of the key; a hit returns the entry's latents, size- and SHA-256-checked.
3. **Sampling** by the mode: ``chai`` runs ``fast_steps`` (8) with Cache Attention (a model hook on
   spatial block 0 at steps 2-4) on a hit, and ``full_steps`` (30) with capture of the latents a later
   hit needs on a miss; ``full`` and ``plain`` are the uncached baselines.
4. **Decode** with the OpenSora VAE -> frames in [0, 1] (pixel-space models: the clip itself).
5. **Store** what the mode asked to store, only *after* the request completed (sampling and decoding),
   so a request that raises or is cancelled leaves the store exactly as it was.

Pixel-space models (``pixel_space=True``, the reference model): the latent shape is (C, frames, height,
width) in pixels, sizes default to the model's ``native_size`` and ``default_frames``, OpenSora's VAE
size rules and its 17-frame minimum do not apply, and decoding maps the clip from [-1, 1] to [0, 1].
"""

from .builders import (
    OPENSORA_WEIGHT_FILES,
    TINY_STDIT3_CONFIG,
    TINY_VAE_SPATIAL_CONFIG,
    TINY_VAE_TEMPORAL_CONFIG,
    tiny_components,
)
from .captions import HashedWordCaptions, MiniLMCaptions, T5Captions
from .chorus import chorus_entry_bytes, new_token_columns  # registers chorus, chorus_warm, auto
from .core import ChaiPipeline, GenerationResult, LatencySplit
from .fingerprints import files_fingerprint, module_fingerprint
from .modes import ModeOutput, ModeRequest, SamplingMode, parse_mode_spec, register_mode, register_model_hook
from . import mixcache as _mixcache  # registers the "mixcache" and "teacache" hooks
from .settings import (
    AttentionSettings,
    ChorusSettings,
    LookupSettings,
    MixCacheSettings,
    RequestSettings,
    ScheduleSettings,
    resolve_settings,
)
from .video import frames_to_uint8, thumbnail_jpeg, write_video

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
    "thumbnail_jpeg",
    "OPENSORA_WEIGHT_FILES",
    "RequestSettings",
    "ScheduleSettings",
    "AttentionSettings",
    "LookupSettings",
    "MixCacheSettings",
    "ChorusSettings",
    "resolve_settings",
    "chorus_entry_bytes",
    "new_token_columns",
    "SamplingMode",
    "ModeRequest",
    "ModeOutput",
    "register_mode",
    "register_model_hook",
    "parse_mode_spec",
]
