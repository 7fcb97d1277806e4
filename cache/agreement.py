"""Modifier agreement: refuse a cached match whose closed-class modifiers contradict the request's.

The lookup matches entities by embedding similarity, and sentence embedders place phrases that differ
only in a colour close together: "white background" and "black background" score 0.81 with MiniLM,
above the 0.72 threshold, although an entry drawn on a black background is the wrong thing to attend
to for a white one. For words of a closed class (the basic colour terms) the contradiction can be
read off the words themselves: two entities with the same head noun whose colour words are disjoint
name different things. CacheSeek gates its donor with a learned reranker for the same reason; a word
list needs no model and is exact on the class it covers.

Rule (:func:`contradicts`): the request entity and the stored entity have the same head noun (last
word, a plural "s" ignored) and, for some closed class, both name at least one of its words and share
none. Entities with different head nouns, or where either side names no word of the class ("a cat"
against "a black cat"), never contradict: the cache only refuses what the words rule out.
"""

from __future__ import annotations

import re
from typing import Dict, FrozenSet

__all__ = ["COLOUR_WORDS", "CLOSED_CLASSES", "closed_class_words", "contradicts"]

#: Basic colour terms (Berlin and Kay's eleven, with common synonyms and video-prompt colours), each
#: mapped to its canonical term so "grey" agrees with "gray" and "violet" with "purple".
COLOUR_WORDS: Dict[str, str] = {
    "black": "black", "white": "white", "red": "red", "green": "green", "yellow": "yellow",
    "blue": "blue", "brown": "brown", "orange": "orange", "pink": "pink", "purple": "purple",
    "violet": "purple", "gray": "gray", "grey": "gray", "cyan": "cyan", "turquoise": "cyan",
    "magenta": "magenta", "golden": "gold", "gold": "gold", "silver": "silver", "beige": "beige",
    "crimson": "red", "scarlet": "red", "navy": "blue", "teal": "cyan",
}
#: Closed word classes checked for agreement: class name -> word -> canonical term.
CLOSED_CLASSES: Dict[str, Dict[str, str]] = {"colour": COLOUR_WORDS}

_WORD = re.compile(r"[a-z]+")


def _head(words: list) -> str:
    head = words[-1] if words else ""
    return head[:-1] if len(head) > 3 and head.endswith("s") and not head.endswith("ss") else head


def closed_class_words(entity: str) -> Dict[str, FrozenSet[str]]:
    """The canonical closed-class words an entity names, per class (classes it names none of are absent).

    Example: ``closed_class_words("a light grey cat")`` -> ``{"colour": frozenset({"gray"})}``.
    """
    words = _WORD.findall(entity.lower())
    out: Dict[str, FrozenSet[str]] = {}
    for name, table in CLOSED_CLASSES.items():
        found = frozenset(table[w] for w in words if w in table)
        if found:
            out[name] = found
    return out


def contradicts(request_entity: str, stored_entity: str) -> bool:
    """True when the two entities share a head noun and disagree on a closed class (see module docstring).

    Args:
        request_entity: an entity of the request's prompt, e.g. ``"white background"``.
        stored_entity: the stored entity it matched, e.g. ``"black background"``.

    Returns:
        bool: ``contradicts("white background", "black background")`` is True;
        ``contradicts("white background", "white sky")`` and ``contradicts("cat", "black cat")`` are False.
    """
    req_words, sto_words = _WORD.findall(request_entity.lower()), _WORD.findall(stored_entity.lower())
    if not req_words or not sto_words or _head(req_words) != _head(sto_words):
        return False
    req, sto = closed_class_words(request_entity), closed_class_words(stored_entity)
    return any(name in sto and not (words & sto[name]) for name, words in req.items())
