"""Streaming detokenization of one output, with stop strings.

Decoding token by token is wrong in two ways that decoding a whole output is not: a multi-byte UTF-8
character may be split over several byte-level tokens (each part alone decodes to U+FFFD), and
sentencepiece (Metaspace) decoders drop the leading space of the *first* token they are given, so
`decode([t])` of a "▁word" token loses its space. `IncrementalDetokenizer` therefore uses the
prefix/read offset technique (as vLLM's `detokenize_incrementally`): it decodes a short window of
tokens starting a few tokens before the new ones, and emits only what the new tokens add to the
window's text, and only once that no longer ends in an incomplete character. The window starts with
the last few prompt tokens, so that the first output token is decoded as a continuation too.

For a fast tokenizer the windows are decoded by `tokenizers.decoders.DecodeStream` (tokenizers 0.22 or
later), which runs the same prefix/read offset steps in Rust: on the embedded model a token of Python
source costs 1.5 µs instead of 2.7 µs (benchmarks/results/detokenizer_cpu.md). Its output is the same,
chunk for chunk: the detokenizer keeps the window decoding's offsets alongside the stream, decodes the
window from Python only when the stream holds text back (to stream what comes before an incomplete
character at once, as the window decoding does), and goes on with the window decoding wherever the
stream would part from it (a decoder that rewrites text already emitted).

Stop strings are matched in the streamed text; text that may still turn out to be the start of a stop
string is held back until it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

# How many prompt tokens precede the output in the first decode window: enough for any decoder
# to treat the first output token as a continuation (vLLM uses the same number).
CONTEXT_TOKENS = 5

# What a decoder produces for bytes that do not (yet) form a whole UTF-8 character.
_REPLACEMENT = "\ufffd"
# A UTF-8 character has at most 3 continuation bytes after its first.
_MAX_CONTINUATION_BYTES = 3


class DetokenizerUpdate(NamedTuple):
    """What one `IncrementalDetokenizer.add_tokens` call produced (a named tuple: one is made per
    streamed token, and a frozen dataclass costs three times as much to make).

    `text` is the new text that is safe to stream now. When a stop string matched, `stop_string`
    names it and `stop_token_index` is the index, within the call's token ids, of the token whose text
    completed it: the sequence ends with that token, and the caller discards the tokens after it.
    """

    text: str
    stop_string: str | None = None
    stop_token_index: int | None = None


class IncrementalDetokenizer:
    """Turns the token ids of one output, as they arrive, into text to stream.

    Guarantee: let `D(ids) = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
    clean_up_tokenization_spaces=False)` and `E = D(prompt + output)[len(D(prompt)):]`, the text the
    output adds to its prompt. Then the texts of all `add_tokens` calls, followed by `flush()`, join
    to `E`, cut right before the first stop string in `E` (right after it with
    `include_stop_str_in_output`). For byte-level BPE tokenizers `E == D(output)`; for sentencepiece
    (Metaspace) tokenizers `E` is `D(output)` with the first output token's leading space kept.
    This holds when the prompt's decode does not end inside a character, and for decoders whose output
    for a token depends only on the few tokens before it (byte-level, Metaspace, Replace/Strip, and
    ByteFallback on valid UTF-8); a ByteFallback decoder turns an *invalid* run of byte tokens into one
    U+FFFD per byte, retroactively, so for such runs the characters replaced may differ.
    Tokenization-space clean-up is never applied: it rewrites text across token boundaries.

    The "first stop string" is the one that ends first in the text (ties: the longest), which is what
    a character-by-character scan would stop at, so the result does not depend on how the text is
    split into tokens. Stop strings are matched only in final text: a stop string containing U+FFFD is
    not matched against the replacement characters `flush()` shows for a trailing incomplete character.

    Each token costs two decodes of a window of a few tokens, independent of the output's length. For
    a fast tokenizer `DecodeStream` does them in Rust, and a token it holds back (its window ends inside
    a character) is decoded from Python as well; `decode_stream=False` decodes every window from
    Python, which streams the same texts in the same chunks.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        *,
        decode_stream: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._backend = backend_tokenizer(tokenizer)
        self._backend_decode = None if self._backend is None else self._backend.decode
        self._stops = tuple(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        # Every proper prefix of a stop string: the text that must be held back when it ends the output.
        self._stop_prefixes = frozenset(s[:k] for s in self._stops for k in range(1, len(s)))
        self._stop_prefix_tuple = tuple(self._stop_prefixes)  # for one `str.endswith` over them all

        # Context (the prompt's last tokens) followed by the output's tokens.
        self._ids: list[int] = list(prompt_token_ids[self._context_start(prompt_token_ids):])
        self._num_context = len(self._ids)
        # The decode window is `_ids[_prefix_offset:]`; `_ids[_prefix_offset:_read_offset]` is its
        # part whose text was already emitted (or is prompt), `_prefix_text` that text (None until
        # needed: with a DecodeStream most windows never need it on this side).
        self._prefix_offset = 0
        self._read_offset = self._num_context
        self._prefix_text: str | None = self._decode(self._ids)
        # Characters past `_prefix_text` already emitted while the window still ended in an incomplete
        # character (the text before that character cannot change any more).
        self._window_emitted = 0
        # The Rust stream decoding the same windows, or None to decode them here.
        self._stream = self._new_stream() if decode_stream else None

        self._streamed: list[str] = []  # the texts returned so far
        self._held = ""  # final text held back because it may be the start of a stop string
        self._stop_string: str | None = None
        self._finished = False

    @property
    def text(self) -> str:
        """The output's text so far: all text returned, plus text held back for a possible stop string
        (after a stop, the text cut at it). A trailing incomplete character appears only after
        `flush()`."""
        if len(self._streamed) > 1:
            self._streamed[:] = ["".join(self._streamed)]  # amortise repeated reads
        return (self._streamed[0] if self._streamed else "") + self._held

    @property
    def token_ids(self) -> list[int]:
        """The output's token ids so far (after a stop, up to and including the stop token)."""
        return self._ids[self._num_context:]

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, if one did."""
        return self._stop_string

    @property
    def uses_decode_stream(self) -> bool:
        """Whether the next token goes through `tokenizers.decoders.DecodeStream` (else through window
        decodes from Python: a slow tokenizer, `decode_stream=False`, or a stream left for a window the
        stream would have decoded differently)."""
        return self._stream is not None

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Append generated tokens; returns the text now safe to stream and whether a stop string matched.

        Raises:
            RuntimeError: the output already ended (a stop string matched, or `flush()` was called).
        """
        if self._finished:
            reason = f"stop string {self._stop_string!r} matched" if self._stop_string else "flush() called"
            raise RuntimeError(f"add_tokens after the output ended: {reason}")
        if not self._stops:
            # One token per call is the common case (a streamed step): no list to build and join.
            if len(token_ids) == 1:
                text = self._append_token(token_ids[0])
            else:
                text = "".join([self._append_token(token_id) for token_id in token_ids])
            self._streamed.append(text)
            return DetokenizerUpdate(text)
        out: list[str] = []
        for index, token_id in enumerate(token_ids):
            piece = self._append_token(token_id)
            if not piece:
                continue
            pending = self._held + piece
            match = self._find_stop(pending, len(self._held))
            if match is not None:
                start, stop = match
                out.append(pending[: start + len(stop) if self._include_stop else start])
                self._held = ""
                self._stop_string = stop
                self._finished = True
                return self._emit(out, stop, index)
            keep = len(pending) - self._hold_back_len(pending)
            out.append(pending[:keep])
            self._held = pending[keep:]
        return self._emit(out, None, None)

    def flush(self) -> str:
        """End the output for a reason other than a stop string (length, EOS) and return the rest of its
        text: text held back for a possible stop string, then a trailing incomplete character as
        `decode` shows it (U+FFFD). Returns "" after a stop string matched, or when called again."""
        if self._finished:
            return ""
        self._finished = True
        window = self._decode(self._ids[self._prefix_offset:])
        rest = self._held + window[len(self._prefix()) + self._window_emitted:]
        self._held = ""
        self._streamed.append(rest)
        return rest

    def _emit(self, out: list[str], stop: str | None, index: int | None) -> DetokenizerUpdate:
        text = "".join(out)
        self._streamed.append(text)
        return DetokenizerUpdate(text, stop, index)

    def _append_token(self, token_id: int) -> str:
        """Append one token; the text it makes final (possibly "")."""
        self._ids.append(token_id)
        stream = self._stream
        if stream is None:
            return self._window_piece(self._decode(self._ids[self._prefix_offset:]))
        try:
            chunk: str | None = stream.step(self._backend, token_id)
        except Exception:  # tokenizers raises a bare Exception (its InvalidPrefix)
            # The decoder rewrote text already emitted; the window decoding emits past it regardless.
            self._stream = None
            return self._window_piece(self._decode(self._ids[self._prefix_offset:]))
        if chunk is None:
            return self._held_piece()
        # The chunk is all that the window adds to its prefix, including what was emitted before it
        # while the window ended in an incomplete character.
        if self._window_emitted:
            chunk = chunk[self._window_emitted:]
        self._advance()
        return chunk

    def _held_piece(self) -> str:
        """The text of a token the DecodeStream held back: the window ends in an incomplete character
        (then the text before it is final) or adds nothing to its prefix.

        The offsets here are always those of the window decoding. The stream's may start later by a
        few tokens that have no text (while its prefix has none, it moves its read offset past them),
        which changes neither what a window adds to its prefix nor when it emits."""
        window = self._decode(self._ids[self._prefix_offset:])
        if not window.endswith(_REPLACEMENT) and len(window) > len(self._prefix()):
            # The stream compares UTF-8 lengths, this side characters: they differ only where the
            # decoder rewrote the prefix's text. Follow the window decoding from here on.
            self._stream = None
        return self._window_piece(window)

    def _window_piece(self, window: str) -> str:
        """The text the newest token makes final, given the decode of the window that ends with it."""
        prefix = self._prefix()
        start = len(prefix) + self._window_emitted
        if window.endswith(_REPLACEMENT):
            # The last character may still be completed (or replaced) by the next token: emit only
            # what comes before the trailing replacement characters, and keep the offsets.
            stable = window.rstrip(_REPLACEMENT)
            piece = stable[start:]
            self._window_emitted += len(piece)
            return piece
        if len(window) <= len(prefix):
            # Nothing visible yet (e.g. a skipped special token). Moving the window now could leave it
            # starting at a "▁" token, whose space the decoder would then drop.
            return ""
        piece = window[start:]
        self._advance()
        return piece

    def _advance(self) -> None:
        """Move the window past the text just emitted: its new prefix is the tokens read so far."""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None
        self._window_emitted = 0

    def _prefix(self) -> str:
        """The text of `_ids[_prefix_offset:_read_offset]` (decoded on first use)."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        return self._prefix_text

    def _new_stream(self) -> Any | None:
        """A DecodeStream primed with the prompt context, or None where its steps would differ from the
        window decoding's: a slow tokenizer, tokenizers older than 0.22 (no `ids=`), or a context whose
        text ends in an incomplete character (the stream would then stream the context's text too)."""
        assert self._prefix_text is not None
        if self._backend is None or self._prefix_text.endswith(_REPLACEMENT):
            return None
        try:
            from tokenizers.decoders import DecodeStream
        except ImportError:                      # tokenizers before 0.21
            return None
        try:
            return DecodeStream(ids=list(self._ids), skip_special_tokens=self._skip_special_tokens)
        except TypeError:                        # tokenizers 0.21: no prompt prefill
            return None

    def _find_stop(self, pending: str, num_checked: int) -> tuple[int, str] | None:
        """The (start, stop string) of the match ending first in `pending`, among matches that end past
        its first `num_checked` characters (earlier text was checked before)."""
        best: tuple[int, int, str] | None = None  # (end, start, stop): first end, then longest
        for stop in self._stops:
            start = pending.find(stop, max(0, num_checked - len(stop) + 1))
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        return None if best is None else (best[1], best[2])

    def _hold_back_len(self, pending: str) -> int:
        """The length of the longest suffix of `pending` that is a proper prefix of a stop string."""
        if not pending.endswith(self._stop_prefix_tuple):
            return 0  # most text ends in no stop string's prefix: one call instead of a slice per length
        for length in range(min(len(pending), self._max_stop_len - 1), 0, -1):
            if pending[-length:] in self._stop_prefixes:
                return length
        return 0

    def _context_start(self, prompt_token_ids: Sequence[int]) -> int:
        """Where the prompt context begins: `CONTEXT_TOKENS` before the end, moved to the start of a
        character if it falls inside one (a ByteFallback decoder turns a whole run of byte tokens into
        U+FFFD when it begins with a stray continuation byte, including the output's first bytes)."""
        start = max(0, len(prompt_token_ids) - CONTEXT_TOKENS)
        for _ in range(_MAX_CONTINUATION_BYTES):
            if start >= len(prompt_token_ids) - 1:
                break
            if not self._decode(list(prompt_token_ids[start:])).startswith(_REPLACEMENT):
                break
            start += 1
        return start

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            text: str = self._backend_decode(ids, skip_special_tokens=self._skip_special_tokens)
            return text
        # decode() is typed str | list[str] (a batch gives a list); one sequence of ids gives a str.
        return cast(str, self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        ))


def backend_tokenizer(tokenizer: PreTrainedTokenizerBase) -> Tokenizer | None:
    """The Rust `tokenizers.Tokenizer` behind a fast tokenizer, or None to go through transformers.

    For a tokenizer whose `_decode` is transformers' own TokenizersBackend one, `decode(ids,
    skip_special_tokens=s, clean_up_tokenization_spaces=False)` is exactly the backend's `decode(ids,
    skip_special_tokens=s)`, after argument conversions (`to_py_obj` over the ids) that cost more than the
    decode itself for the few-token windows detokenizing a step needs. A subclass that overrides
    `_decode` keeps the slow path.
    """
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:                          # another transformers layout: always the slow path
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    stock = getattr(type(tokenizer), "_decode", None) is TokenizersBackend._decode
    if not stock or not hasattr(backend, "decode"):
        return None
    return backend


def backend_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[..., str] | None:
    """The `decode` of `backend_tokenizer(tokenizer)`, or None when there is no backend to use."""
    backend = backend_tokenizer(tokenizer)
    return None if backend is None else backend.decode


def decode_whole(
    tokenizer: PreTrainedTokenizerBase,
    prompt_token_ids: Sequence[int],
    output_token_ids: Sequence[int],
    skip_special_tokens: bool = True,
    stop: Sequence[str] = (),
    include_stop_str_in_output: bool = False,
) -> tuple[str, str | None]:
    """The text of an output that arrives whole (beam search), cut at its first stop string, and that
    stop string (None when none matched). Uses `IncrementalDetokenizer`, so the rules are the same as
    for streamed outputs."""
    detokenizer = IncrementalDetokenizer(
        tokenizer, prompt_token_ids, skip_special_tokens, stop, include_stop_str_in_output
    )
    update = detokenizer.add_tokens(output_token_ids)
    detokenizer.flush()
    return detokenizer.text, update.stop_string
