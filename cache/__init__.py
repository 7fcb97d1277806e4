"""The CHAI cache engine: entities, embeddings, HNSW index, persistent latent store, lookup, stats.

No ComfyUI imports and no imports from `opensora/`: the only things that cross the boundary are
latent tensors, fingerprint strings and step schedules.
"""
