"""Prompt -> entities -> embeddings -> candidates of the same compatibility key -> hit or miss.

This is the CHAI retrieval step (arXiv 2602.16132, section 3.2 "entity extractor, vector DB"):
a request is a hit when one of its entities is close enough (cosine similarity >= threshold) to
an entity of an earlier request stored under the same compatibility key. The best entry is the
one with the highest similarity; ties go to the entry that matches more of the prompt's entities,
then to the one whose matched entity fewer stored entries share (the more specific match: "red fox"
over "blue background" when many entries share the background), then to the newest. Its latents
are read and checked before the result says "hit", so a hit can always be served.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .embed import Embedder
    from .entities import EntityExtractor
    from .store import LatentStore

__all__ = ["LookupConfig", "EntityScore", "LookupTimings", "LookupResult", "CacheLookup", "DEFAULT_THRESHOLD"]

# Chosen by bench/threshold_sweep.py on the 946 VBench prompts (README, "Choosing the threshold").
DEFAULT_THRESHOLD = 0.72

log = logging.getLogger("comfyui_chai.lookup")


@dataclass(frozen=True)
class LookupConfig:
    """Knobs of the cache lookup (one documented field each, plus a fingerprint).

    Attributes:
        threshold: least cosine similarity between a prompt entity and a stored entity for a hit.
            Default 0.72, measured (README, "Choosing the threshold"); raise it for fewer, safer hits.
        mode: ``"entity"`` (CHAI: match noun-phrase entities) or ``"prompt"`` (NIRVANA-style
            baseline: the whole normalised prompt is the only key).
        neighbours: stored entities fetched per prompt entity from the HNSW index.
        max_candidates: entries tried, best first, when the best one's latent file turns out invalid.
    """

    threshold: float = DEFAULT_THRESHOLD
    mode: str = "entity"
    neighbours: int = 8
    max_candidates: int = 3

    def __post_init__(self) -> None:
        if not (-1.0 <= float(self.threshold) <= 1.0):
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold}")
        if self.mode not in ("entity", "prompt"):
            raise ValueError(f"mode must be 'entity' or 'prompt', got {self.mode!r}")
        if self.neighbours < 1 or self.max_candidates < 1:
            raise ValueError("neighbours and max_candidates must be >= 1")

    def fingerprint(self) -> str:
        """E.g. ``LOOKUP_entity_T0.72_K8``: names the settings in reports and keys."""
        return f"LOOKUP_{self.mode}_T{self.threshold:.2f}_K{self.neighbours}"


@dataclass
class EntityScore:
    """The best stored match of one prompt entity.

    Attributes:
        entity: the prompt's entity. matched: the stored entity text (None when nothing is stored).
        entry_id: the entry holding ``matched``. similarity: cosine similarity in [-1, 1].
        hit: similarity >= threshold.
    """

    entity: str
    matched: str | None
    entry_id: int | None
    similarity: float
    hit: bool


@dataclass
class LookupTimings:
    """Where a lookup's time went (milliseconds, wall clock)."""

    extract_ms: float = 0.0
    embed_ms: float = 0.0
    ann_ms: float = 0.0
    load_ms: float = 0.0
    record_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class LookupResult:
    """Outcome of one lookup.

    Attributes:
        prompt: the prompt looked up. mode: ``"entity"`` or ``"prompt"``.
        entities: the keys that were searched (entities, or the whole prompt).
        embeddings: [len(entities), dim] float32, reused when the request is inserted after a miss.
        compat_key: the full key searched (caller's key + embedder, extractor and mode fingerprints).
        hit: True when an entry was found and its latents loaded and verified.
        entry_id / prompt_matched: the served entry and the prompt that produced it.
        entity / matched / similarity: the query entity, the stored entity it matched, and their
            cosine similarity (the best pair; similarity is the best seen even on a miss).
        entities_matched: how many of the prompt's entities the served entry matches.
        entity_sharers: how many stored entries (of the ``neighbours`` fetched per entity, so at most
            that many) hold an entity within the threshold of the served query entity; fewer means
            a more specific match (the third ranking key).
        per_entity: the best stored match of every prompt entity (for fusion and reports).
        latents: name -> tensor of the served entry (None on a miss).
        timings: :class:`LookupTimings`.
        not_stored: why :meth:`CacheLookup.insert` stored nothing for this request (None otherwise).
    """

    prompt: str
    mode: str
    entities: list[str]
    embeddings: np.ndarray
    compat_key: str
    hit: bool = False
    entry_id: int | None = None
    prompt_matched: str | None = None
    entity: str | None = None
    matched: str | None = None
    similarity: float = 0.0
    entities_matched: int = 0
    entity_sharers: int = 0
    per_entity: list[EntityScore] = field(default_factory=list)
    latents: Mapping | None = None
    timings: LookupTimings = field(default_factory=LookupTimings)
    not_stored: str | None = None

    def summary(self) -> dict:
        """JSON-friendly view (no tensors, no embeddings)."""
        return {
            "prompt": self.prompt, "mode": self.mode, "entities": list(self.entities), "hit": self.hit,
            "entry_id": self.entry_id, "prompt_matched": self.prompt_matched, "entity": self.entity,
            "matched": self.matched, "similarity": round(float(self.similarity), 4),
            "entities_matched": self.entities_matched, "entity_sharers": self.entity_sharers,
            "per_entity": [asdict(s) for s in self.per_entity], "timings_ms": asdict(self.timings),
            "not_stored": self.not_stored,
        }


class CacheLookup:
    """Runs lookups against a :class:`LatentStore` and inserts requests after a miss.

    Args:
        store: the open store.
        extractor: an ``EntityExtractor`` (its ``extract(prompt) -> list[str]`` and ``fingerprint``).
        embedder: an ``Embedder`` (its ``encode(list[str]) -> [n, dim] float32`` and ``fingerprint``).
        config: :class:`LookupConfig`.
    """

    def __init__(self, store: "LatentStore", extractor: "EntityExtractor", embedder: "Embedder",
                 config: LookupConfig | None = None) -> None:
        self.store = store
        self.extractor = extractor
        self.embedder = embedder
        self.config = config or LookupConfig()

    def full_key(self, compat_key: str) -> str:
        """The caller's key plus everything on our side that changes what a match means."""
        if not compat_key or not isinstance(compat_key, str):
            raise ValueError("compat_key must be a non-empty string (model fingerprint, latent shape, config)")
        return f"{compat_key}|{self.embedder.fingerprint}|{self.extractor.fingerprint}|{self.config.mode}"

    def keys_for(self, prompt: str) -> list[str]:
        """The strings a prompt is looked up (and later stored) by.

        Entity mode: its entities, possibly none (a prompt of filler or stop words such as "a the
        of" names nothing: its lookup is a miss and nothing is stored for it). Prompt mode: the
        whole normalised prompt.

        Raises:
            ValueError: an empty or whitespace-only prompt, or one over the extractor's length limit.
        """
        if self.config.mode == "prompt":
            return [self.extractor.normalize_prompt(prompt)]
        return self.extractor.extract(prompt)

    def lookup(self, prompt: str, compat_key: str, load: bool = True, record: bool = True) -> LookupResult:
        """Look a prompt up.

        Args:
            prompt: the request's text prompt.
            compat_key: the caller's compatibility key (model fingerprint, latent shape, sampler
                settings that change the cached tensors); only entries of the same key match.
            load: read and verify the best entry's latents (a hit is only reported when they load).
            record: count the lookup in the store's statistics.

        Returns:
            A :class:`LookupResult`.

        Raises:
            ValueError: bad prompt (empty, too long) or bad compat_key.
        """
        t0 = time.perf_counter()
        key = self.full_key(compat_key)
        entities = self.keys_for(prompt)
        t1 = time.perf_counter()
        if entities:
            embeddings = self.embedder.encode(entities)
            t2 = time.perf_counter()
            matches = self.store.search(embeddings, key, k=self.config.neighbours)
        else:  # nothing to look up: a miss, and insert() will store nothing
            embeddings = np.zeros((0, self.store.dim or 0), dtype=np.float32)
            t2 = time.perf_counter()
            matches = []
        t3 = time.perf_counter()
        result = LookupResult(prompt=prompt, mode=self.config.mode, entities=entities, embeddings=embeddings,
                              compat_key=key)
        threshold = float(self.config.threshold)

        best_per_entity: dict[int, object] = {}
        for m in matches:  # sorted by similarity, so the first seen per query is its best
            best_per_entity.setdefault(m.query_index, m)
        result.per_entity = [
            EntityScore(entity=entities[i], matched=getattr(best_per_entity.get(i), "text", None),
                        entry_id=getattr(best_per_entity.get(i), "entry_id", None),
                        similarity=float(getattr(best_per_entity.get(i), "similarity", 0.0)),
                        hit=float(getattr(best_per_entity.get(i), "similarity", -2.0)) >= threshold)
            for i in range(len(entities))
        ]
        # Rank entries: best similarity, then number of prompt entities matched, then specificity
        # (an entity that many stored entries share, like a common background, says less about any
        # one of them: like inverse document frequency in text retrieval), then newest.
        per_entry: dict[int, dict] = {}
        sharers: dict[int, set] = {}  # query entity -> entries matching it within the threshold
        for m in matches:
            slot = per_entry.setdefault(m.entry_id, {"best": m, "matched": set()})
            if m.similarity >= threshold:
                slot["matched"].add(m.query_index)
                sharers.setdefault(m.query_index, set()).add(m.entry_id)
        ranked = sorted(
            (s for s in per_entry.values() if s["best"].similarity >= threshold),
            key=lambda s: (-round(s["best"].similarity, 5), -len(s["matched"]),
                           len(sharers[s["best"].query_index]), -s["best"].entry_id),
        )
        if matches:
            top = matches[0]
            result.entity, result.matched, result.similarity = entities[top.query_index], top.text, top.similarity
        load_ms = 0.0
        for slot in ranked[: self.config.max_candidates]:
            best = slot["best"]
            latents = None
            if load:
                tl = time.perf_counter()
                latents = self.store.load(best.entry_id)
                load_ms += (time.perf_counter() - tl) * 1000
                if latents is None:
                    continue  # quarantined by the store: try the next candidate
            record_ = self.store.entry(best.entry_id)
            if record_ is None:
                continue
            result.hit = True
            result.entry_id = best.entry_id
            result.prompt_matched = record_.prompt
            result.entity, result.matched, result.similarity = entities[best.query_index], best.text, best.similarity
            result.entities_matched = len(slot["matched"])
            result.entity_sharers = len(sharers[best.query_index])
            result.latents = latents
            break
        t4 = time.perf_counter()
        result.timings = LookupTimings(extract_ms=(t1 - t0) * 1000, embed_ms=(t2 - t1) * 1000,
                                       ann_ms=(t3 - t2) * 1000, load_ms=load_ms, total_ms=(t4 - t0) * 1000)
        if record:
            self.store.record_lookup(prompt, entities, result.entry_id, result.entity, result.matched,
                                     result.similarity if matches else None, result.timings.total_ms)
            result.timings.record_ms = (time.perf_counter() - t4) * 1000
        return result

    def insert(self, result: LookupResult, tensors: Mapping, info: Mapping | None = None) -> int | None:
        """Store a request's latents under the keys and embeddings its lookup computed.

        A request is not stored, with a warning (logged, and kept in ``result.not_stored``), when
        its prompt has no entity to be found by, or when its latents are larger than the store's
        whole budget: the request itself (its video) is unaffected.

        Args:
            result: the :class:`LookupResult` of this request (normally a miss).
            tensors: name -> torch tensor, e.g. the latents captured at the cache steps.
            info: JSON-serialisable metadata (seed, steps, timesteps ...).

        Returns:
            The new entry id, or None when nothing was stored.

        Raises:
            ValueError: see :meth:`LatentStore.put` (bad tensors or embeddings).
            StoreError: the store cannot be written (read-only, disk full).
        """
        from .store_types import EntryTooLargeError

        if not result.entities:
            result.not_stored = (f"not cached: the prompt {result.prompt[:60]!r} has no entity to be found by "
                                 "(only filler or stop words)")
        else:
            try:
                return self.store.put(tensors, result.entities, result.embeddings, result.compat_key, result.prompt,
                                      info)
            except EntryTooLargeError as exc:
                result.not_stored = f"not cached: {exc}"
        log.warning("CHAI: %s", result.not_stored)
        return None
