"""Loading a model's tokenizer in the scheduler, without importing torch (DESIGN.md invariant 1).

`transformers.AutoTokenizer` imports torch whenever torch is installed (through its model utilities),
but `PreTrainedTokenizerFast` built from a `tokenizer.json` does not, so that is the path taken
whenever the model directory has one. transformers itself is imported lazily, inside the functions,
so that importing this module costs nothing for code that never loads a tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Files from which AutoTokenizer can build a tokenizer when there is no tokenizer.json (slow
# sentencepiece / vocab-file tokenizers, or a config naming a tokenizer class).
_FALLBACK_FILES = (
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)

# Single characters tried, in order, as the anchor token of `TokenTexts`.
_ANCHOR_CANDIDATES = ("a", "x", "0", ".")


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of the model in `model_dir`, loaded from local files only.

    With a `tokenizer.json` the fast tokenizer is built from it directly, which never imports torch;
    class-specific Python behaviour of the model's tokenizer class (if it has any beyond what
    `tokenizer.json` and `tokenizer_config.json` describe) is not applied. Without one, this falls
    back to `AutoTokenizer`, which may import torch, and logs a warning saying so.

    Raises:
        FileNotFoundError: `model_dir` is not a directory, or holds no tokenizer files at all.
        ValueError: the files there could not be loaded as a tokenizer.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist or is not a directory")
    if (path / "tokenizer.json").is_file():
        return _load_fast(path)
    if not any((path / name).is_file() for name in _FALLBACK_FILES):
        raise FileNotFoundError(
            f"no tokenizer files in {str(path)!r}: expected tokenizer.json (or one of "
            f"{', '.join(_FALLBACK_FILES)})"
        )
    return _load_auto(path)


def _load_fast(path: Path) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer: PreTrainedTokenizerFast = PreTrainedTokenizerFast.from_pretrained(str(path),
                                                                                    local_files_only=True)
        return tokenizer
    except Exception as err:  # tokenizers raises bare Exceptions for malformed files
        raise ValueError(f"cannot load the tokenizer in {str(path)!r}: {err!r}") from err


def _load_auto(path: Path) -> PreTrainedTokenizerBase:
    logger.warning(
        "%s has no tokenizer.json; loading it with transformers.AutoTokenizer, which may import torch "
        "into the scheduler process", path,
    )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # whatever the tokenizer class raises for files it cannot read
        raise ValueError(f"cannot load the tokenizer in {str(path)!r}: {err!r}") from err


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The token ids of a text prompt, with the special tokens (BOS, ...) the model expects added by the
    tokenizer's own post-processor."""
    return list(tokenizer(text, add_special_tokens=True).input_ids)


class TokenTexts:
    """The text of single tokens, cached by id, for logprob candidates.

    A token's text is what it contributes when it follows other text, independent of its actual
    context: for byte-level BPE that is just `decode([token_id])`; for sentencepiece (Metaspace)
    tokenizers it keeps the leading space of a "▁" token, which `decode([token_id])` alone drops
    because the decoder strips the space of a sequence's first token. To get it, the token is decoded
    after an anchor token (one plain character) and the anchor's text is cut off.
    A token holding only part of a multi-byte character reads as U+FFFD. Special tokens keep their text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        # The vocabulary bounds the cache, so a plain dict needs no eviction.
        self._cache: dict[int, str] = {}
        self._anchor = _find_anchor(tokenizer)

    def text(self, token_id: int) -> str:
        """The text of `token_id` on its own (cached)."""
        text = self._cache.get(token_id)
        if text is None:
            text = self._decode_one(token_id)
            self._cache[token_id] = text
        return text

    def _decode_one(self, token_id: int) -> str:
        if self._anchor is None:
            return _decode(self._tokenizer, [token_id])
        anchor_id, anchor_text = self._anchor
        both = _decode(self._tokenizer, [anchor_id, token_id])
        if not both.startswith(anchor_text):  # a decoder that merges across tokens; be safe
            return _decode(self._tokenizer, [token_id])
        return both[len(anchor_text):]


def _find_anchor(tokenizer: PreTrainedTokenizerBase) -> tuple[int, str] | None:
    """A token that decodes to one plain character, followed unchanged by whatever comes after it."""
    for char in _ANCHOR_CANDIDATES:
        ids = tokenizer.encode(char, add_special_tokens=False)
        if len(ids) != 1:
            continue
        text = _decode(tokenizer, ids)
        if text and text.strip() == char and _decode(tokenizer, ids * 2).startswith(text):
            return ids[0], text
    return None


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    # decode() is typed str | list[str] (a batch gives a list); one sequence of ids gives a str.
    return cast(str, tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
