"""The pack's socket types (V3 ``io.Custom``): namespaced ``CHAI_*`` names, the workflow identity of
every link between CHAI nodes (never rename one). Any Python object flows through them: what each
carries is the dataclass named beside it."""

from __future__ import annotations

from .comfy_v3 import io

__all__ = ["Model", "Vae", "TextEncoder", "Conditioning", "Entities", "Cache", "Lookup", "CacheConfig", "ChorusConfig", "IntraCache"]

Model = io.Custom("CHAI_MODEL")  # nodes.models.ChaiModel
Vae = io.Custom("CHAI_VAE")  # nodes.models.ChaiVAE
TextEncoder = io.Custom("CHAI_TEXT_ENCODER")  # nodes.models.ChaiTextEncoder
Conditioning = io.Custom("CHAI_CONDITIONING")  # nodes.models.ChaiConditioning
Entities = io.Custom("CHAI_ENTITIES")  # nodes.text_nodes.ChaiEntities
Cache = io.Custom("CHAI_CACHE")  # nodes.registry.StoreHandle
Lookup = io.Custom("CHAI_LOOKUP")  # nodes.cache_nodes.ChaiLookup
CacheConfig = io.Custom("CHAI_CACHE_CONFIG")  # dict of CacheAttentionConfig keywords
ChorusConfig = io.Custom("CHAI_CHORUS_CONFIG")  # dict of ChorusSettings keywords (nodes.chorus_nodes)
IntraCache = io.Custom("CHAI_INTRA_CACHE")  # {"hook", "settings"} (nodes.intra_cache_node)
