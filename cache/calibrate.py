"""Choosing the similarity threshold by measurement.

The paper does not publish its threshold (reference/papers.md 1.5), so we measure one. Ground
truth for "these two entity phrases name the same kind of thing" is approximated by their head
noun: spaCy's root lemma of the phrase ("golden retriever" and "retriever" share "retriever";
"red car" and "blue car" share "car"; "car" and "truck" do not). Every pair of distinct entity
phrases from a prompt list is labelled that way and scored by cosine similarity; a threshold is
then judged by precision (the share of pairs above it that really share a head noun: a false hit
costs quality) and recall (the share of same-head pairs it accepts: a missed hit costs speed).
We pick the threshold that maximises F-beta with beta = 0.5, which weighs precision twice as much
as recall, the precision-first lesson of GPTCache's users (reference/ecosystem.md 2.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["ThresholdRow", "ThresholdSweep", "sweep_thresholds"]


@dataclass
class ThresholdRow:
    """Quality of one threshold over all phrase pairs: precision, recall, F0.5, accepted pairs."""

    threshold: float
    precision: float
    recall: float
    f_beta: float
    accepted: int


@dataclass
class ThresholdSweep:
    """A full sweep: the phrases used, positive/total pair counts, one row per threshold, the best."""

    phrases: int
    pairs: int
    positive_pairs: int
    rows: list[ThresholdRow]
    best: ThresholdRow

    def table(self, every: int = 5) -> str:
        """Markdown table of every ``every``-th row plus the best one."""
        lines = ["| threshold | precision | recall | F0.5 | pairs accepted |", "|---|---|---|---|---|"]
        chosen = [r for i, r in enumerate(self.rows) if i % every == 0 or r is self.best]
        for r in chosen:
            mark = " **(best)**" if r is self.best else ""
            lines.append(f"| {r.threshold:.2f}{mark} | {r.precision:.3f} | {r.recall:.3f} | {r.f_beta:.3f} | {r.accepted} |")
        return "\n".join(lines)


def _head_lemma(nlp, phrases: Sequence[str]) -> list[str]:
    heads = []
    for doc in nlp.pipe(phrases, batch_size=256):
        root = next((t for t in doc if t.head is t), doc[-1] if len(doc) else None)
        if root is None:
            heads.append("")
            continue
        # A root that is not nominal (a mis-parse) falls back to the last nominal token.
        if root.pos_ not in ("NOUN", "PROPN"):
            nominal = [t for t in doc if t.pos_ in ("NOUN", "PROPN")]
            root = nominal[-1] if nominal else root
        heads.append((root.lemma_ or root.text).lower())
    return heads


def sweep_thresholds(prompts: Sequence[str], extractor, embedder, thresholds: Sequence[float] | None = None,
                     beta: float = 0.5) -> ThresholdSweep:
    """Label every pair of distinct entity phrases by head noun and score thresholds.

    Args:
        prompts: prompt list (e.g. the 946 VBench prompts).
        extractor: an ``EntityExtractor`` (entities, and its spaCy pipeline for head lemmas).
        embedder: an ``Embedder`` (L2-normalised vectors, so the dot product is the cosine).
        thresholds: candidates, default 0.50, 0.51, ..., 0.99.
        beta: F-beta weight; 0.5 favours precision.

    Returns:
        A :class:`ThresholdSweep` with the best threshold by F-beta.

    Raises:
        ValueError: fewer than two distinct phrases.
    """
    phrases = sorted({e for ents in extractor.extract_batch(list(prompts)) for e in ents})
    if len(phrases) < 2:
        raise ValueError("need at least two distinct entity phrases to calibrate a threshold")
    heads = np.asarray(_head_lemma(extractor.nlp, phrases))
    vectors = embedder.encode(phrases)
    sims = vectors @ vectors.T
    upper = np.triu_indices(len(phrases), k=1)
    pair_sims = sims[upper]
    same = (heads[upper[0]] == heads[upper[1]]) & (heads[upper[0]] != "")
    positives = int(same.sum())
    thresholds = list(thresholds) if thresholds is not None else [round(0.5 + 0.01 * i, 2) for i in range(50)]
    rows = []
    for t in thresholds:
        accepted = pair_sims >= t
        n_acc = int(accepted.sum())
        true_pos = int((accepted & same).sum())
        precision = true_pos / n_acc if n_acc else 1.0
        recall = true_pos / positives if positives else 0.0
        b2 = beta * beta
        f_beta = (1 + b2) * precision * recall / (b2 * precision + recall) if (precision + recall) else 0.0
        rows.append(ThresholdRow(float(t), precision, recall, f_beta, n_acc))
    best = max(rows, key=lambda r: (r.f_beta, r.threshold))
    return ThresholdSweep(phrases=len(phrases), pairs=int(pair_sims.size), positive_pairs=positives, rows=rows,
                          best=best)
