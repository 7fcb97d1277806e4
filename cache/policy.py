"""Eviction policies of the latent store: which entries go first when the byte budget is exceeded.

The paper's cache policy engine uses LRU (CHAI, arXiv 2602.16132, section 3); LFU and FIFO are the
usual alternatives (GPTCache offers the same three). Recency and frequency live in the manifest
(`last_access`, `access_count`), so the order survives restarts, unlike GPTCache's in-memory LRU.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["EvictionPolicy"]


class EvictionPolicy(str, Enum):
    """How the store picks eviction victims.

    * ``LRU``: least recently used first (``last_access`` ascending) — the paper's policy, default.
    * ``LFU``: least frequently used first (``access_count``), then least recently used.
    * ``FIFO``: oldest insertion first (``created_at``).
    """

    LRU = "lru"
    LFU = "lfu"
    FIFO = "fifo"

    @property
    def order_by(self) -> str:
        """The SQL ``ORDER BY`` clause over the ``entries`` table that lists victims first."""
        return {
            EvictionPolicy.LRU: "last_access ASC, id ASC",
            EvictionPolicy.LFU: "access_count ASC, last_access ASC, id ASC",
            EvictionPolicy.FIFO: "created_at ASC, id ASC",
        }[self]

    @classmethod
    def parse(cls, value: "str | EvictionPolicy") -> "EvictionPolicy":
        """Accept an enum member or its name in any case ("lru", "LFU").

        Raises:
            ValueError: an unknown policy, naming the valid ones.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            valid = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown eviction policy {value!r}; use one of: {valid}") from None
