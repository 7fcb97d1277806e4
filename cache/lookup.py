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
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Mapping

import numpy as np

from .agreement import contradicts

if TYPE_CHECKING:  # pragma: no cover
    from .embed import Embedder
    from .entities import EntityExtractor
    from .backend import StoreBackend

__all__ = ["LookupConfig", "EntityScore", "LookupTimings", "LookupQuery", "LookupResult", "CacheLookup",
           "DEFAULT_THRESHOLD", "lookup_keys"]

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
        modifier_agreement: entity mode: refuse a stored entity with the request entity's head noun whose
            colour words contradict it ("black background" for "white background": ``cache/agreement.py``).
            Default on: measured on the reference model's validation stream (README, "What the
            lookup serves").
    """

    threshold: float = DEFAULT_THRESHOLD
    mode: str = "entity"
    neighbours: int = 8
    max_candidates: int = 3
    modifier_agreement: bool = True

    def __post_init__(self) -> None:
        if not (-1.0 <= float(self.threshold) <= 1.0):
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold}")
        if self.mode not in ("entity", "prompt"):
            raise ValueError(f"mode must be 'entity' or 'prompt', got {self.mode!r}")
        if self.neighbours < 1 or self.max_candidates < 1:
            raise ValueError("neighbours and max_candidates must be >= 1")

    def fingerprint(self) -> str:
        """E.g. ``LOOKUP_entity_T0.72_K8``: names the settings in reports and keys."""
        return f"LOOKUP_{self.mode}_T{self.threshold:.2f}_K{self.neighbours}" + ("_MA" if self.modifier_agreement else "")


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
class LookupQuery:
    """A prompt's lookup keys and their embeddings, computed once and reused by every lookup of the
    request (the ComfyUI Cache Lookup node makes it; the Sampler's lookup under its exact key reuses it).

    Attributes:
        prompt: the prompt. mode: ``"entity"`` or ``"prompt"`` (the lookup's mode it was made for).
        entities: the keys (see :func:`lookup_keys`). embeddings: [len(entities), dim] float32.
        fingerprint: the embedder's and extractor's fingerprints it was made with.
        extract_ms / embed_ms: what making it cost.
    """

    prompt: str
    mode: str
    entities: list[str]
    embeddings: np.ndarray
    fingerprint: str
    extract_ms: float = 0.0
    embed_ms: float = 0.0


def lookup_keys(extractor, prompt: str, mode: str = "entity") -> list[str]:
    """The strings a prompt is looked up (and later stored) by.

    Entity mode: its entities, possibly none (a prompt of filler or stop words such as "a the of"
    names nothing: its lookup is a miss and nothing is stored for it). Prompt mode: the whole
    normalised prompt.

    Raises:
        ValueError: an empty or whitespace-only prompt, or one over the extractor's length limit.
    """
    if mode == "prompt":
        return [extractor.normalize_prompt(prompt)]
    return extractor.extract(prompt)


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
        threshold: the similarity threshold this lookup applied.
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
    refused: list = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD
    not_stored: str | None = None

    def summary(self) -> dict:
        """JSON-friendly view (no tensors, no embeddings)."""
        return {
            "prompt": self.prompt, "mode": self.mode, "entities": list(self.entities), "hit": self.hit,
            "entry_id": self.entry_id, "prompt_matched": self.prompt_matched, "entity": self.entity,
            "matched": self.matched, "similarity": round(float(self.similarity), 4),
            "entities_matched": self.entities_matched, "entity_sharers": self.entity_sharers,
            "per_entity": [asdict(s) for s in self.per_entity], "timings_ms": asdict(self.timings),
            "refused": [list(pair) for pair in self.refused],
            "threshold": float(self.threshold),
            "not_stored": self.not_stored,
        }


class CacheLookup:
    """Runs lookups against a store (``cache.backend.StoreBackend``) and inserts requests after a miss.

    Args:
        store: the open store.
        extractor: an ``EntityExtractor`` (its ``extract(prompt) -> list[str]`` and ``fingerprint``).
        embedder: an ``Embedder`` (its ``encode(list[str]) -> [n, dim] float32`` and ``fingerprint``).
        config: :class:`LookupConfig`.
    """

    def __init__(self, store: "StoreBackend", extractor: "EntityExtractor", embedder: "Embedder",
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
        """The strings a prompt is looked up (and later stored) by (:func:`lookup_keys` in this lookup's mode).

        Raises:
            ValueError: an empty or whitespace-only prompt, or one over the extractor's length limit.
        """
        return lookup_keys(self.extractor, prompt, self.config.mode)

    def with_config(self, **changes) -> "CacheLookup":
        """A lookup on the same store, extractor and embedder with ``changes`` to its :class:`LookupConfig`."""
        return CacheLookup(self.store, self.extractor, self.embedder, replace(self.config, **changes))

    def _fingerprint(self) -> str:
        return f"{self.embedder.fingerprint}|{self.extractor.fingerprint}"

    def query(self, prompt: str, entities: list[str] | None = None) -> LookupQuery:
        """Extract (unless ``entities`` are given, e.g. by an entity-extractor node) and embed a prompt's
        keys once, for :meth:`lookup`, :meth:`preview` and :meth:`insert` to reuse.

        Raises:
            ValueError: a bad prompt, or ``entities`` that are not a list of non-empty strings.
        """
        t0 = time.perf_counter()
        if entities is None:
            entities = self.keys_for(prompt)
        elif not isinstance(entities, (list, tuple)) or not all(isinstance(e, str) and e for e in entities):
            raise ValueError("entities must be a list of non-empty strings (the prompt's lookup keys)")
        t1 = time.perf_counter()
        # No entity (a prompt of stop words): nothing to embed, and the lookup is a miss.
        embeddings = (self.embedder.encode(list(entities)) if entities
                      else np.zeros((0, self.store.dim or 0), dtype=np.float32))
        t2 = time.perf_counter()
        return LookupQuery(prompt=prompt, mode=self.config.mode, entities=list(entities), embeddings=embeddings,
                           fingerprint=self._fingerprint(), extract_ms=(t1 - t0) * 1000, embed_ms=(t2 - t1) * 1000)

    def _check_query(self, query: LookupQuery, prompt: str) -> None:
        if query.prompt != prompt or query.mode != self.config.mode or query.fingerprint != self._fingerprint():
            raise ValueError("this lookup query was made for another prompt, mode, extractor or embedder; "
                             "make it with this lookup's query()")

    def lookup(self, prompt: str, compat_key: str, load: bool = True, record: bool = True,
               query: LookupQuery | None = None) -> LookupResult:
        """Look a prompt up.

        Args:
            prompt: the request's text prompt.
            compat_key: the caller's compatibility key (model fingerprint, latent shape, sampler
                settings that change the cached tensors); only entries of the same key match.
            load: read and verify the best entry's latents (a hit is only reported when they load).
            record: count the lookup in the store's statistics.
            query: the prompt's :meth:`query`, made earlier for this request: its keys and embeddings
                are reused (this call then spends nothing on extraction or embedding).

        Returns:
            A :class:`LookupResult`.

        Raises:
            ValueError: bad prompt (empty, too long), bad compat_key, or a query of another prompt.
        """
        t0 = time.perf_counter()
        key = self.full_key(compat_key)
        if query is None:
            query = self.query(prompt)
            t2 = time.perf_counter()
            t1 = t2 - query.embed_ms / 1000
        else:  # made earlier for this request: no extraction or embedding here
            self._check_query(query, prompt)
            t1 = t2 = t0
        entities, embeddings = query.entities, query.embeddings
        # A prompt with no entity has nothing to look up: a miss, and insert() stores nothing.
        matches = self.store.search(embeddings, key, k=self.config.neighbours) if entities else []
        matches, refused = self._agreeing(entities, matches)
        t3 = time.perf_counter()
        threshold = float(self.config.threshold)
        result = LookupResult(prompt=prompt, mode=self.config.mode, entities=entities, embeddings=embeddings,
                              compat_key=key, threshold=threshold)
        result.refused = refused

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
            self.record(result)
            result.timings.record_ms = (time.perf_counter() - t4) * 1000
        return result

    def _agreeing(self, entities: list, matches: list) -> tuple[list, list]:
        """Split ANN matches into those the modifier-agreement gate keeps and the (request entity, stored
        entity) pairs it refuses (``LookupConfig.modifier_agreement``; off, or in prompt mode, where a key
        is a whole prompt rather than a noun phrase with a head: everything is kept)."""
        if not self.config.modifier_agreement or self.config.mode != "entity":
            return matches, []
        kept, refused = [], []
        for m in matches:
            if contradicts(entities[m.query_index], m.text):
                refused.append((entities[m.query_index], m.text))
            else:
                kept.append(m)
        return kept, refused

    def record(self, result: LookupResult) -> None:
        """Count a lookup made with ``record=False`` in the store's statistics (hit or miss, the match and
        its similarity, the lookup's time): for a caller that looks up twice and counts the deciding one."""
        self.store.record_lookup(result.prompt, result.entities, result.entry_id, result.entity, result.matched,
                                 result.similarity if result.matched is not None else None, result.timings.total_ms)

    def preview(self, query: LookupQuery, limit_neighbours: int | None = None) -> dict:
        """The best stored match of each of a query's keys over every compatibility key of the store that
        was made with this lookup's embedder, extractor and mode (any model, size or schedule).

        Nothing is recorded in the store's statistics and no latent is loaded. A hit here means "an
        entry this close exists"; a request's own lookup, under its exact key, decides.

        Returns:
            ``{"entities", "hit", "entity", "matched", "similarity", "entry_id", "entry_prompt",
            "entry_size", "threshold", "per_entity": [{"entity", "matched", "similarity", "entry_id",
            "hit"}]}`` (JSON-ready; ``matched`` None when nothing comparable is stored).

        Raises:
            ValueError: a query made with another mode, extractor or embedder.
        """
        self._check_query(query, query.prompt)
        marker = "\x00"
        suffix = self.full_key(marker)[len(marker):]
        keys = query.entities
        best: dict[int, object] = {}
        for key in (k for k in self.store.compat_keys() if k.endswith(suffix) and keys):
            found = self.store.search(query.embeddings, key, k=limit_neighbours or self.config.neighbours)
            for m in self._agreeing(keys, found)[0]:
                if m.query_index not in best or m.similarity > best[m.query_index].similarity:
                    best[m.query_index] = m
        threshold = float(self.config.threshold)
        per_entity = []
        for i, key in enumerate(keys):
            m = best.get(i)
            per_entity.append({"entity": key, "matched": getattr(m, "text", None),
                               "similarity": round(float(m.similarity), 4) if m is not None else None,
                               "entry_id": getattr(m, "entry_id", None),
                               "hit": bool(m is not None and m.similarity >= threshold)})
        top = max(best.values(), key=lambda m: m.similarity) if best else None
        out = {"entities": list(keys), "hit": bool(top is not None and top.similarity >= threshold), "entity": None,
               "matched": None, "similarity": None, "entry_id": None, "entry_prompt": None, "entry_size": None,
               "per_entity": per_entity, "threshold": threshold}
        if top is not None:
            out.update(entity=keys[top.query_index], matched=top.text, similarity=round(float(top.similarity), 4),
                       entry_id=int(top.entry_id))
            record = self.store.entry(int(top.entry_id))
            if record is not None:
                info = record.info or {}
                out["entry_prompt"] = record.prompt
                if "height" in info and "width" in info:
                    out["entry_size"] = f"{info['height']}x{info['width']}, {info.get('num_frames', '?')} frames"
        return out

    def insert(self, result: LookupResult, tensors: Mapping, info: Mapping | None = None,
               thumbnail: bytes | None = None) -> int | None:
        """Store a request's latents under the keys and embeddings its lookup computed.

        A request is not stored, with a warning (logged, and kept in ``result.not_stored``), when
        its prompt has no entity to be found by, or when its latents are larger than the store's
        whole budget: the request itself (its video) is unaffected.

        Args:
            result: the :class:`LookupResult` of this request (normally a miss).
            tensors: name -> torch tensor, e.g. the latents captured at the cache steps.
            info: JSON-serialisable metadata (seed, steps, timesteps ...).
            thumbnail: a small JPEG or PNG of one frame of the request's video, kept with the entry
                where the backend keeps thumbnails (``StoreBackend.put``); None for none.

        Returns:
            The new entry id, or None when nothing was stored.

        Raises:
            ValueError: see ``StoreBackend.put`` (bad tensors or embeddings).
            StoreError: the store cannot be written (read-only, disk full).
        """
        from .store_types import EntryTooLargeError

        if not result.entities:
            result.not_stored = (f"not cached: the prompt {result.prompt[:60]!r} has no entity to be found by "
                                 "(only filler or stop words)")
        else:
            try:
                return self.store.put(tensors, result.entities, result.embeddings, result.compat_key, result.prompt,
                                      info, thumbnail=thumbnail)
            except EntryTooLargeError as exc:
                result.not_stored = f"not cached: {exc}"
        log.warning("CHAI: %s", result.not_stored)
        return None
