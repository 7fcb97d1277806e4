"""OpenSora 1.2 prompt side: caption cleaning, score suffixes, and the T5-v1.1-XXL text encoder.

Prompt path (OpenSora v1.2.0 `scripts/inference.py`, `opensora/utils/inference_utils.py` and
`opensora/models/text_encoder/t5.py`; reference sheet opensora.md sections 4 and 5.5):

  1. text after a "{" is JSON options for image conditioning (refused here: text-to-video only);
  2. "|0|a ...|2|b ..." multi-loop prompts are split into segments;
  3. each segment gets " aesthetic score: 6.5." appended unless it already has one (likewise the
     optional motion score and camera motion);
  4. each segment is cleaned twice with the PixArt/DeepFloyd caption cleaner (`clean_caption`);
  5. the segments are merged and the one for the requested loop is what T5 receives.

`clean_caption` needs `ftfy` (Unicode repair) and `beautifulsoup4` (HTML to text with Python's
html.parser), exactly as the reference does; both are imported on first use.

The text encoder is transformers' `T5EncoderModel`, loaded from a local HF folder or from a single
safetensors file as ComfyUI keeps it (`models/text_encoders/t5xxl_fp16.safetensors`, keys
`shared.weight`, `encoder.block.N...`, optionally under a prefix such as
"text_encoders.t5xxl.transformer."). Prompts are tokenized to 300 tokens (padding and truncation,
end-of-text token appended); the output is y [n, 1, 300, 4096] and mask [n, 300]. OpenSora runs T5 in
fp32. The null (unconditional) caption for CFG is not a T5 output: it is STDiT3's learned
`y_embedder.y_embedding` (see `null_caption_embedding`).
"""

from __future__ import annotations

import html
import json
import re
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .loading import (
    CheckpointFormatError,
    StateDictMismatchError,
    assign_state_dict,
    empty_parameters,
    load_state_dict,
    read_tensor_infos,
    resolve_safetensors_files,
)

__all__ = [
    "DEFAULT_AESTHETIC_SCORE",
    "T5_MAX_LENGTH",
    "append_score",
    "clean_caption",
    "text_preprocessing",
    "prepare_prompt",
    "prepare_prompts",
    "TextEncoding",
    "T5TextEncoder",
    "infer_t5_config",
    "load_t5_encoder",
    "load_tokenizer",
    "null_caption_embedding",
    "token_words",
]

#: Aesthetic score OpenSora 1.2's inference config appends to every prompt.
DEFAULT_AESTHETIC_SCORE = 6.5
#: Token length of OpenSora 1.2's T5 (model_max_length).
T5_MAX_LENGTH = 300

# --------------------------------------------------------------------------------------------
# Caption cleaning (PixArt / DeepFloyd IF cleaner as used by OpenSora's `clean_caption`)
# --------------------------------------------------------------------------------------------

_URL_TLDS = r"(?:com|co|ru|net|org|edu|gov|it)"
# Two URL passes: "http(s):" links and bare domains, then "www:"-style remnants and bare domains.
_URL_HTTP = re.compile(r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _URL_TLDS + r"[\w/-]*\b\/?(?!@)))")
_URL_WWW = re.compile(r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _URL_TLDS + r"[\w/-]*\b\/?(?!@)))")
_HANDLE = re.compile(r"@[\w\d]+\b")
# CJK strokes, katakana phonetic extensions, enclosed CJK, CJK compatibility, CJK ideographs
# (extension A, Yijing hexagrams, unified). Plain katakana/hiragana are kept.
_CJK_BLOCKS = [
    re.compile(r"[\u31c0-\u31ef]+"),
    re.compile(r"[\u31f0-\u31ff]+"),
    re.compile(r"[\u3200-\u32ff]+"),
    re.compile(r"[\u3300-\u33ff]+"),
    re.compile(r"[\u3400-\u4dbf]+"),
    re.compile(r"[\u4dc0-\u4dff]+"),
    re.compile(r"[\u4e00-\u9fff]+"),
]
_DASHES = re.compile(
    "[\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
    "\ufe31\ufe32\ufe58\ufe63\uff0d]+"
)
_DOUBLE_QUOTES = re.compile("[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]")  # ` ´ « » “ ” ¨
_SINGLE_QUOTES = re.compile("[\u2018\u2019]")  # ‘ ’
# Characters replaced by a space (runs of them count once).
_BAD_PUNCT = re.compile("[" + re.escape("#®•©™&@·º½¾¿¡§~)(][}{|\\/*") + "]+")
_FILE_EXTS = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_SEPARATORS = re.compile(r"(?:\-|\_)")

# (pattern, replacement) pairs applied in order before the Unicode/HTML repair.
_RULES_BEFORE_FIX: List[Tuple[re.Pattern, str]] = [
    (re.compile(r"&quot;?"), ""),
    (re.compile(r"&amp"), ""),
    (re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"), " "),  # IP addresses
    (re.compile(r"\d:\d\d\s+$"), ""),  # trailing article ids / times
    (re.compile(r"\\n"), " "),  # literal backslash-n
    (re.compile(r"#\d{1,3}\b"), ""),
    (re.compile(r"#\d{5,}\b"), ""),
    (re.compile(r"\b\d{6,}\b"), ""),
    (re.compile(r"[\S]+\." + _FILE_EXTS), ""),  # file names
    (re.compile(r"[\"\']{2,}"), '"'),
    (re.compile(r"[\.]{2,}"), " "),
    (_BAD_PUNCT, " "),
    (re.compile(r"\s+\.\s+"), " "),
]

# Applied after the Unicode/HTML repair.
_RULES_AFTER_FIX: List[Tuple[re.Pattern, str]] = [
    (re.compile(r"\b[a-zA-Z]{1,3}\d{3,15}\b"), ""),  # product codes like jc6640
    (re.compile(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"), ""),  # jc6640vc
    (re.compile(r"\b\d+[a-zA-Z]+\d+\b"), ""),  # 6640vc231
    (re.compile(r"(worldwide\s+)?(free\s+)?shipping"), ""),
    (re.compile(r"(free\s)?download(\sfree)?"), ""),
    (re.compile(r"\bclick\b\s(?:for|on)\s\w+"), ""),
    (re.compile(r"\b" + _FILE_EXTS + r"(\simage[s]?)?"), ""),
    (re.compile(r"\bpage\s+\d+\b"), ""),
    (re.compile(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b"), " "),  # j2d1a2a...
    (re.compile("\\b\\d+\\.?\\d*[x\u0445\u00d7]\\d+\\.?\\d*\\b"), ""),  # sizes like 1920x1080 (latin x, cyrillic х, ×)
    (re.compile(r"\b\s+\:\s+"), ": "),
    (re.compile(r"(\D[,\./])\b"), r"\1 "),
    (re.compile(r"\s+"), " "),
]

# Applied to the whole caption at the end.
_RULES_EDGES: List[Tuple[re.Pattern, str]] = [
    (re.compile(r"^[\"\']([\w\W]+)[\"\']$"), r"\1"),  # surrounding quotes
    (re.compile(r"^[\'\_,\-\:;]"), ""),
    (re.compile(r"[\'\_,\-\:\-\+]$"), ""),
    (re.compile(r"^\.\S+$"), ""),
]


def _require(module: str, package: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(
            f"OpenSora's caption cleaner needs the '{package}' package; install it with `pip install {package}`"
        ) from exc


def _html_to_text(text: str) -> str:
    """Text content of `text` parsed as HTML, as BeautifulSoup(text, "html.parser").text."""
    bs4 = _require("bs4", "beautifulsoup4")
    with warnings.catch_warnings():
        # bs4 warns when the "markup" looks like a URL or a file name; the text is still what we want.
        warnings.simplefilter("ignore")
        return bs4.BeautifulSoup(text, features="html.parser").text


def _repair_unicode(text: str) -> str:
    """ftfy.fix_text, then HTML entities decoded twice, then stripped (OpenSora's `basic_clean`)."""
    ftfy = _require("ftfy", "ftfy")
    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def _apply(rules: Sequence[Tuple[re.Pattern, str]], text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def clean_caption(caption: str) -> str:
    """One pass of OpenSora's caption cleaner (PixArt-alpha / DeepFloyd IF rules).

    In order: URL-unquote; strip and lower-case; "<person>" -> "person"; remove URLs; HTML to text;
    remove @handles; remove CJK ideographs and related blocks (kana is kept); unify dashes to "-"
    and quotes to '"' / "'"; remove "&quot", "&amp", IP addresses, "#123" tags, long numbers, file
    names; collapse quote runs and "..."; replace the characters #®•©™&@·º½¾¿¡§~()[]{}|\\/* with
    spaces; split words joined by more than three "-"/"_"; repair Unicode with ftfy and unescape
    HTML entities; remove product codes, shipping/download/click spam, image-format words, "page N",
    sizes like "1920x1080"; tidy spaces and punctuation; drop surrounding quotes and stray edge
    punctuation. Source: `clean_caption` in OpenSora v1.2.0 `opensora/models/text_encoder/t5.py`.

    Args:
        caption: any string (non-strings are converted with `str`).

    Returns:
        the cleaned caption (lower case, single spaces, stripped).

    Raises:
        ImportError: `ftfy` or `beautifulsoup4` is not installed (the message says how to install them).
    """
    text = str(caption)
    text = urllib.parse.unquote_plus(text)
    text = text.strip().lower()
    text = text.replace("<person>", "person")
    text = _URL_HTTP.sub("", text)
    text = _URL_WWW.sub("", text)
    text = _html_to_text(text)
    text = _HANDLE.sub("", text)
    for block in _CJK_BLOCKS:
        text = block.sub("", text)
    text = _DASHES.sub("-", text)
    text = _DOUBLE_QUOTES.sub('"', text)
    text = _SINGLE_QUOTES.sub("'", text)
    text = _apply(_RULES_BEFORE_FIX, text)
    # "this-is-my-cute-cat" / "this_is_my_cute_cat": more than three joiners -> words.
    if len(_SEPARATORS.findall(text)) > 3:
        text = _SEPARATORS.sub(" ", text)
    text = _repair_unicode(text)
    text = _apply(_RULES_AFTER_FIX, text)
    text = _apply(_RULES_EDGES, text)
    return text.strip()


def text_preprocessing(text: str) -> str:
    """OpenSora's `text_preprocessing`: `clean_caption` applied twice (as in training)."""
    return clean_caption(clean_caption(text))


def append_score(
    prompt: str,
    aes: Optional[float] = DEFAULT_AESTHETIC_SCORE,
    flow: Optional[float] = None,
    camera_motion: Optional[str] = None,
) -> str:
    """Append OpenSora 1.2's conditioning suffixes to a prompt (`append_score_to_prompts`).

    Adds " aesthetic score: {aes:.1f}." unless the prompt already contains "aesthetic score:",
    then " motion score: {flow:.1f}." unless it contains "motion score:", then
    " camera motion: {camera_motion}." unless it contains "camera motion:". None skips a suffix.
    Example: "a cat" -> "a cat aesthetic score: 6.5.".

    Raises:
        TypeError: prompt is not a string.
        ValueError: a score that is not a finite number.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    text = prompt
    if aes is not None and "aesthetic score:" not in prompt:
        text = f"{text} aesthetic score: {_finite(aes, 'aes'):.1f}."
    if flow is not None and "motion score:" not in prompt:
        text = f"{text} motion score: {_finite(flow, 'flow'):.1f}."
    if camera_motion is not None and "camera motion:" not in prompt:
        text = f"{text} camera motion: {camera_motion}."
    return text


def _finite(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def _split_loops(prompt: str) -> Tuple[List[str], Optional[List[int]]]:
    """Split "|0|text a|2|text b" into (["text a", "text b"], [0, 2]); plain prompts -> ([prompt], None)."""
    if not prompt.startswith("|0|"):
        return [prompt], None
    parts = prompt.split("|")[1:]
    if len(parts) % 2:
        raise ValueError(f"malformed multi-loop prompt {prompt!r}: expected |0|text|k|text...")
    texts, starts = [], []
    for i in range(0, len(parts), 2):
        try:
            starts.append(int(parts[i]))
        except ValueError:
            raise ValueError(f"malformed multi-loop prompt {prompt!r}: {parts[i]!r} is not a loop index") from None
        texts.append(parts[i + 1].strip())
    return texts, starts


def _text_for_loop(texts: Sequence[str], starts: Sequence[int], loop_index: int) -> str:
    """The segment active at `loop_index`: segment k covers loops starts[k] .. starts[k+1]-1."""
    expanded: List[str] = []
    for k, (text, start) in enumerate(zip(texts, starts)):
        end = starts[k + 1] if k + 1 < len(starts) else loop_index + 1
        expanded.extend([text] * (end - start))
    if not 0 <= loop_index < len(expanded):
        raise ValueError(f"loop {loop_index} is not covered by the multi-loop prompt (loop starts {list(starts)})")
    return expanded[loop_index]


def prepare_prompt(
    prompt: str,
    *,
    aes: Optional[float] = DEFAULT_AESTHETIC_SCORE,
    flow: Optional[float] = None,
    camera_motion: Optional[str] = None,
    clean: bool = True,
    loop_index: int = 0,
) -> str:
    """The exact string OpenSora 1.2's inference driver hands to the T5 tokenizer for `prompt`.

    Steps: refuse JSON options after "{"; split "|0|...|k|..." multi-loop prompts; append the score
    suffixes (`append_score`); clean each segment twice (`text_preprocessing`) unless clean=False;
    return the segment for `loop_index` (0 = the first video loop).

    Example: "A cat (cute) wearing a hat, 4K" -> "a cat cute wearing a hat, 4k aesthetic score: 6.5."

    Raises:
        TypeError: prompt is not a string.
        ValueError: empty prompt, a "{" (OpenSora's JSON options for reference images, not supported
            in text-to-video), or a malformed multi-loop prompt.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty; describe the video to generate")
    if "{" in prompt:
        raise ValueError(
            "prompt contains '{': OpenSora reads everything after it as JSON options (reference_path, "
            "mask_strategy) for image-to-video, which this text-to-video pack does not support; remove the braces"
        )
    texts, starts = _split_loops(prompt)
    processed = []
    for text in texts:
        text = append_score(text, aes=aes, flow=flow, camera_motion=camera_motion)
        processed.append(text_preprocessing(text) if clean else text)
    if starts is None:
        return processed[0]
    return _text_for_loop(processed, starts, loop_index)


def prepare_prompts(prompts: Sequence[str], **kwargs) -> List[str]:
    """`prepare_prompt` for each prompt of a list (same keyword arguments)."""
    if isinstance(prompts, str):
        raise TypeError("prepare_prompts takes a list of prompts; use prepare_prompt for one string")
    return [prepare_prompt(p, **kwargs) for p in prompts]


# --------------------------------------------------------------------------------------------
# T5 encoder
# --------------------------------------------------------------------------------------------

_FINAL_NORM = "encoder.final_layer_norm.weight"
_EMBED_ALIAS = "encoder.embed_tokens.weight"
_BLOCK_KEY = re.compile(r"^encoder\.block\.(\d+)\.")


@dataclass
class TextEncoding:
    """Output of `T5TextEncoder.encode`.

    Attributes:
        y: caption embedding [n, 1, L, D] (L = 300, D = 4096 for T5-XXL) in the encoder's dtype
            (fp32 by default); positions past each prompt's length hold T5's outputs for padding and
            are ignored downstream through `mask`.
        mask: attention mask [n, L] int64, 1 for real tokens (including the end-of-text token).
        texts: the strings that were tokenized (after `prepare_prompt` when the encoder prepared them).
    """

    y: torch.Tensor
    mask: torch.Tensor
    texts: List[str]

    @property
    def lengths(self) -> List[int]:
        """Number of real tokens of each prompt."""
        return [int(v) for v in self.mask.sum(dim=1)]


def null_caption_embedding(source: Union[torch.nn.Module, torch.Tensor], n: int) -> torch.Tensor:
    """The null (unconditional) caption for classifier-free guidance, repeated for n prompts.

    OpenSora's `T5Encoder.null(n)`: STDiT3's learned buffer `y_embedder.y_embedding` [L, D] repeated
    to [n, 1, L, D]. The sampler concatenates it after the conditional captions and gives both
    branches the conditional mask.

    Args:
        source: an STDiT3 (anything with `.y_embedder.y_embedding`) or the [L, D] tensor itself.
        n: number of prompts.

    Returns:
        tensor [n, 1, L, D], same dtype and device as the buffer.

    Raises:
        ValueError: n < 1 or a tensor that is not 2-D.
        AttributeError: a module without `y_embedder.y_embedding`.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if isinstance(source, torch.nn.Module):
        embedder = getattr(source, "y_embedder", None)
        if embedder is None or not hasattr(embedder, "y_embedding"):
            raise AttributeError("the model has no y_embedder.y_embedding; pass an STDiT3 or the [L, D] tensor")
        table = embedder.y_embedding
    else:
        table = source
    if table.ndim != 2:
        raise ValueError(f"the null caption table must be [L, D], got shape {tuple(table.shape)}")
    return table[None].repeat(n, 1, 1)[:, None]


def _find_t5_prefix(keys: Sequence[str], source: str) -> str:
    prefixes = sorted({k[: -len(_FINAL_NORM)] for k in keys if k.endswith(_FINAL_NORM)})
    if not prefixes:
        raise CheckpointFormatError(
            f"{source} is not a T5 encoder file (no '{_FINAL_NORM}' key); use a T5-v1.1-XXL encoder such as "
            "ComfyUI's t5xxl_fp16.safetensors"
        )
    if len(prefixes) > 1:
        raise CheckpointFormatError(
            f"{source} holds several T5 encoders under prefixes {prefixes}; pass prefix= to choose one"
        )
    return prefixes[0]


def infer_t5_config(shapes: Dict[str, Tuple[int, ...]]):
    """Build a `T5Config` for an encoder from its weight shapes (keys without any file prefix).

    Read from the shapes: vocab_size and d_model (`shared.weight`), num_layers (count of
    `encoder.block.N`), num_heads and relative_attention_num_buckets (`relative_attention_bias`),
    d_kv (q projection rows / heads), d_ff and the feed-forward kind (`wi_0`/`wi_1` = gated-gelu as in
    T5 v1.1, `wi` = relu as in T5 v1.0). Not in the file, so T5 defaults are used:
    relative_attention_max_distance 128 and layer_norm_epsilon 1e-6 (true for T5-v1.1-XXL).

    Raises:
        CheckpointFormatError: a required tensor is missing.
    """
    from transformers import T5Config

    def need(key: str) -> Tuple[int, ...]:
        if key not in shapes:
            raise CheckpointFormatError(f"cannot infer the T5 configuration: tensor {key!r} is missing")
        return tuple(shapes[key])

    embed_key = "shared.weight" if "shared.weight" in shapes else _EMBED_ALIAS
    vocab_size, d_model = need(embed_key)
    blocks = {int(m.group(1)) for k in shapes for m in [_BLOCK_KEY.match(k)] if m}
    if not blocks:
        raise CheckpointFormatError("cannot infer the T5 configuration: no encoder.block.N tensors")
    num_buckets, num_heads = need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = need("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    if inner % num_heads:
        raise CheckpointFormatError(f"T5 attention width {inner} is not divisible by {num_heads} heads")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = need("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner // num_heads,
        d_ff=d_ff,
        num_layers=max(blocks) + 1,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )


def _load_config(config: Any, weights: Path):
    from transformers import T5Config

    if isinstance(config, T5Config):
        return config
    if config is not None:
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        try:
            return T5Config(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"cannot read a T5 config from {path}: {exc}") from exc
    if weights.is_dir() and (weights / "config.json").is_file():
        return _load_config(weights / "config.json", weights)
    return None


def load_t5_encoder(
    weights: Union[str, Path],
    *,
    config: Any = None,
    prefix: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
):
    """Load a transformers `T5EncoderModel` from safetensors without a second copy in memory.

    Accepts a single file as ComfyUI keeps it (`t5xxl_fp16.safetensors`: keys `shared.weight`,
    `encoder.block.N...`, `encoder.final_layer_norm.weight`, with or without
    `encoder.embed_tokens.weight`, possibly under a prefix such as "text_encoders.t5xxl.transformer."
    in bundled checkpoints), or an HF folder with `config.json` and `model.safetensors` (or shards).
    Decoder and LM-head tensors of full T5 checkpoints are skipped. fp16/bf16/fp8 files are cast to
    `dtype` tensor by tensor.

    Args:
        weights: .safetensors file or folder.
        config: a `T5Config`, a config.json path or folder; default: the folder's config.json, else
            inferred from the tensor shapes (`infer_t5_config`).
        prefix: key prefix in front of `shared.weight`/`encoder.`; default: detected.
        dtype: compute dtype (fp32 as OpenSora; bf16 halves memory; fp16 is known to overflow in T5 v1.1).
        device: where the model is placed.

    Returns:
        `T5EncoderModel` in eval mode with gradients off.

    Raises:
        CheckpointFormatError: not safetensors (pickle `.bin` files are refused), not a T5 encoder,
            or a scaled-fp8 file (not supported; use t5xxl_fp16.safetensors).
        StateDictMismatchError: weights that do not fit the configuration (all keys listed).
    """
    from transformers import T5EncoderModel

    path = Path(weights).expanduser()
    files = resolve_safetensors_files(path)
    source = ", ".join(str(f) for f in files)
    infos = read_tensor_infos(files)
    if prefix is None:
        prefix = _find_t5_prefix(list(infos), source)
    if any(k.endswith(".scale_weight") or k.endswith("scaled_fp8") for k in infos):
        raise CheckpointFormatError(
            f"{source} is a scaled-fp8 T5 file, which this pack does not dequantize; use t5xxl_fp16.safetensors"
        )
    skip = ("decoder.", "lm_head.")
    shapes = {
        k[len(prefix):]: info.shape
        for k, info in infos.items()
        if k.startswith(prefix) and not k[len(prefix):].startswith(skip)
    }
    cfg = _load_config(config, path) or infer_t5_config(shapes)
    with empty_parameters():
        model = T5EncoderModel(cfg)

    state = load_state_dict(files, prefix=prefix, ignore=skip, dtype=dtype, device=device)
    # The token embedding is stored once (as shared.weight, or only under its encoder alias).
    if "shared.weight" not in state and _EMBED_ALIAS in state:
        state["shared.weight"] = state.pop(_EMBED_ALIAS)
    alias = state.pop(_EMBED_ALIAS, None)
    if alias is not None and tuple(alias.shape) != tuple(state["shared.weight"].shape):
        raise StateDictMismatchError(
            source, [], [], [(_EMBED_ALIAS, tuple(alias.shape), tuple(state["shared.weight"].shape))]
        )
    if "shared.weight" in state:
        state[_EMBED_ALIAS] = state["shared.weight"]
    assign_state_dict(model, state, strict=True, dtype=dtype, device=device, source=source)
    model.encoder.embed_tokens.weight = model.shared.weight  # keep the tie explicit
    model.eval().requires_grad_(False)
    return model


def load_tokenizer(path: Union[str, Path]):
    """A tokenizer from a local folder (transformers `AutoTokenizer`, no network).

    For T5-v1.1-XXL use any T5 tokenizer folder (`tokenizer.json`, or `spiece.model` with the
    sentencepiece package), e.g. DeepFloyd/t5-v1_1-xxl's files or ComfyUI's bundled
    `comfy/text_encoders/t5_tokenizer`.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: the folder holds no usable tokenizer (the message names what is missing).
    """
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types here (OSError, ValueError, ImportError)
        raise ValueError(
            f"cannot load a tokenizer from {folder} ({type(exc).__name__}: {exc}); the folder needs tokenizer.json, "
            "or spiece.model plus the sentencepiece package"
        ) from exc


class T5TextEncoder:
    """OpenSora 1.2's text encoder: T5 tokenizer + `T5EncoderModel`, 300 tokens, fp32.

    Mirrors OpenSora's `T5Encoder`/`T5Embedder` (`opensora/models/text_encoder/t5.py`): padding to
    max_length, truncation, end-of-text token, attention mask; y = last_hidden_state[:, None].

    Args:
        model: a transformers `T5EncoderModel` (see `load_t5_encoder`).
        tokenizer: a transformers tokenizer (see `load_tokenizer`).
        max_length: tokens per prompt (300 in OpenSora 1.2; must equal STDiT3's model_max_length).
    """

    def __init__(self, model, tokenizer, *, max_length: int = T5_MAX_LENGTH):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @classmethod
    def from_files(
        cls,
        weights: Union[str, Path],
        tokenizer: Union[str, Path, None] = None,
        *,
        config: Any = None,
        prefix: Optional[str] = None,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        max_length: int = T5_MAX_LENGTH,
    ) -> "T5TextEncoder":
        """Load from a safetensors file or HF folder plus a tokenizer folder (default: the weights folder).

        See `load_t5_encoder` and `load_tokenizer` for the arguments and errors.
        """
        weights_path = Path(weights).expanduser()
        if tokenizer is None:
            if not weights_path.is_dir():
                raise ValueError(
                    "a single T5 weight file has no tokenizer; pass tokenizer= a folder with the T5 tokenizer files"
                )
            tokenizer = weights_path
        tok = load_tokenizer(tokenizer)
        model = load_t5_encoder(weights_path, config=config, prefix=prefix, dtype=dtype, device=device)
        return cls(model, tok, max_length=max_length)

    @property
    def output_dim(self) -> int:
        """Width D of the caption embedding (4096 for T5-XXL; STDiT3's caption_channels)."""
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        """Device of the encoder's weights."""
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Token ids and attention mask, each [n, max_length] int64, as OpenSora tokenizes."""
        if isinstance(texts, str) or not texts:
            raise ValueError("tokenize takes a non-empty list of strings")
        tokens = self.tokenizer(
            list(texts),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    @torch.inference_mode()
    def encode(self, texts: Union[str, Sequence[str]]) -> TextEncoding:
        """Encode already-prepared texts (no cleaning here; see `encode_prompts`).

        Args:
            texts: one string or a list of n strings.

        Returns:
            `TextEncoding` with y [n, 1, max_length, D] and mask [n, max_length] int64, on the
            encoder's device.

        Raises:
            ValueError: an empty list, or a text that tokenizes to nothing.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        tokens = self.tokenize(batch)
        device = self.device
        ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device=device, dtype=torch.int64)
        if bool((mask.sum(dim=1) == 0).any()):
            raise ValueError("a prompt produced no tokens; check the tokenizer")
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return TextEncoding(y=hidden[:, None], mask=mask, texts=batch)

    def encode_prompts(self, prompts: Union[str, Sequence[str]], **prepare_kwargs) -> TextEncoding:
        """`prepare_prompt` (score suffix + cleaning, keyword arguments passed on) then `encode`."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.encode([prepare_prompt(p, **prepare_kwargs) for p in batch])


def token_words(tokenizer: Any, text: str, max_length: int) -> List[Optional[str]]:
    """The word each caption token of ``text`` belongs to, in the caption's row order.

    ``text`` is tokenised exactly as a caption encoder does (special tokens added, truncated to
    ``max_length``, no padding). Entry i is the lower-case word (letters and digits only) of token i,
    or None for a special token ([CLS], [SEP], ``</s>``) and for a word of punctuation only. Words are
    the tokenizer's own pre-tokenisation (whitespace and, for WordPiece, punctuation), so every
    sub-word piece of a word gets that word. Chorus compares two prompts' words with it.

    Args:
        tokenizer: a transformers *fast* tokenizer (``tokenizer.json``; T5 and MiniLM folders ship one).
        text: the string the encoder tokenises (OpenSora: :func:`prepare_prompt`'s output).
        max_length: the encoder's caption length.

    Raises:
        ValueError: a slow tokenizer (no word alignment).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("mapping caption tokens to words needs a fast tokenizer (a folder with tokenizer.json)")
    enc = tokenizer(text, max_length=int(max_length), truncation=True, add_special_tokens=True)
    words: List[Optional[str]] = []
    for word in enc.word_ids():
        if word is None:
            words.append(None)
            continue
        span = enc.word_to_chars(word)
        norm = re.sub(r"[\W_]+", "", text[span.start:span.end].lower())
        words.append(norm or None)
    return words

