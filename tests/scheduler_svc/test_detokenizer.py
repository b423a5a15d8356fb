"""Streaming detokenization equals whole-output decoding, with multi-byte characters, sentencepiece
leading spaces, special tokens and stop strings, on tokenizers trained in the test."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import (
    BYTE_LEVEL_EOS,
    METASPACE_EOS,
    SAMPLE_TEXTS,
)

from scheduler_svc.detokenizer import CONTEXT_TOKENS, DetokenizerUpdate, IncrementalDetokenizer, decode_whole
from scheduler_svc.tokenizer import encode_prompt

FFFD = "\ufffd"
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------- helpers


def decode(tok, ids: Sequence[int], skip: bool = True) -> str:
    return tok.decode(list(ids), skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def expected_text(tok, prompt: Sequence[int], output: Sequence[int], skip: bool = True) -> str:
    """What the output adds to the prompt's text: the documented guarantee of the detokenizer."""
    head = decode(tok, prompt, skip)
    whole = decode(tok, [*prompt, *output], skip)
    assert whole.startswith(head)
    return whole[len(head):]


def content_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@dataclass
class Streamed:
    """The result of streaming one output: each update with the index of its call's first token."""

    updates: list[DetokenizerUpdate] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    rest: str = ""  # what flush() returned

    @property
    def texts(self) -> list[str]:
        return [u.text for u in self.updates]

    @property
    def text(self) -> str:
        return "".join(self.texts) + self.rest

    @property
    def stop(self) -> tuple[str | None, int | None]:
        """The stop string and the index, within the whole output, of the token that completed it."""
        last = self.updates[-1] if self.updates else DetokenizerUpdate("")
        if last.stop_token_index is None:
            return last.stop_string, None
        return last.stop_string, self.starts[-1] + last.stop_token_index


def stream(tok, prompt, output, chunk_sizes=None, **kwargs) -> Streamed:
    """Feed `output` in chunks of the given sizes (then one token each) and flush."""
    det = IncrementalDetokenizer(tok, prompt, **kwargs)
    result = Streamed()
    sizes = iter(chunk_sizes or [])
    pos = 0
    while pos < len(output):
        size = next(sizes, 1)
        result.starts.append(pos)
        result.updates.append(det.add_tokens(output[pos:pos + size]))
        pos += size
        if result.updates[-1].stop_string is not None:
            break
    result.rest = det.flush()
    return result


def streamed_text(tok, prompt, output, chunk_sizes=None, **kwargs) -> str:
    return stream(tok, prompt, output, chunk_sizes, **kwargs).text


def byte_tokens(tok) -> list[int]:
    """The ids whose text alone is only part of a character."""
    return [i for i in range(len(tok)) if decode(tok, [i], skip=False) == FFFD]


def reference_stop(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Cut `text` at the first position where it ends with a stop string (longest on a tie)."""
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return (text[:end] if include else text[:end - len(stop)]), stop
    return text, None


# ---------------------------------------------------------------------------- whole-text equality


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
@pytest.mark.parametrize("prompt_text", ["", "Hi there, café 中文", "x"])
def test_streaming_real_encodings_equals_whole_decode(tokenizer, text, prompt_text):
    prompt = encode_prompt(tokenizer, prompt_text) if prompt_text else []
    output = content_ids(tokenizer, text)
    assert streamed_text(tokenizer, prompt, output) == expected_text(tokenizer, prompt, output)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_byte_level_output_text_is_its_own_decode(byte_level, text):
    prompt = encode_prompt(byte_level, "Some prompt 🙂")
    output = content_ids(byte_level, text)
    assert streamed_text(byte_level, prompt, output) == decode(byte_level, output) == text


def test_metaspace_first_output_token_keeps_its_leading_space(metaspace):
    prompt = encode_prompt(metaspace, "Hello")
    output = content_ids(metaspace, "world")  # "▁world..." as the first token of a new encoding
    assert metaspace.convert_ids_to_tokens(output[0]).startswith("▁")
    # decode() of the output alone drops the space; after the prompt it belongs in the text.
    assert decode(metaspace, output) == "world"
    result = stream(metaspace, prompt, output)
    assert result.texts[0].startswith(" ")
    assert result.text == " world" == expected_text(metaspace, prompt, output)


def test_metaspace_output_without_a_prompt_decodes_like_decode(metaspace):
    output = content_ids(metaspace, "world peace")
    assert streamed_text(metaspace, [], output) == decode(metaspace, output) == "world peace"


# Both ways of decoding the windows (tokenizers' DecodeStream, the default for these fast tokenizers, and
# decodes from Python) must give transformers' text.
BOTH_PATHS = pytest.mark.parametrize("decode_stream", [True, False], ids=["decode_stream", "window"])


@BOTH_PATHS
@given(data=st.data())
@PROPERTY_SETTINGS
def test_random_byte_level_ids_stream_to_whole_decode(byte_level, decode_stream, data):
    vocab = st.integers(0, len(byte_level) - 1)
    prompt = data.draw(st.lists(vocab, max_size=8), label="prompt")
    # The guarantee is for prompts whose text does not end inside a character.
    if decode(byte_level, prompt).endswith(FFFD):
        prompt = [*prompt, *content_ids(byte_level, "x")]
    output = data.draw(st.lists(vocab, max_size=40), label="output")
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=40), label="chunks")
    skip = data.draw(st.booleans(), label="skip")
    got = streamed_text(byte_level, prompt, output, chunks, skip_special_tokens=skip,
                        decode_stream=decode_stream)
    assert got == expected_text(byte_level, prompt, output, skip)
    assert got == decode(byte_level, output, skip)


@BOTH_PATHS
@given(data=st.data())
@PROPERTY_SETTINGS
def test_random_metaspace_ids_stream_to_whole_decode(metaspace, decode_stream, data):
    # ByteFallback replaces a whole invalid run of byte tokens retroactively (documented caveat), so
    # byte tokens are drawn as the complete UTF-8 encodings of characters.
    byte_pieces = {f"<0x{b:02X}>" for b in range(256)}
    plain = [i for i, t in enumerate(metaspace.convert_ids_to_tokens(range(len(metaspace))))
             if t not in byte_pieces]

    def char_bytes(char: str) -> list[int]:
        return metaspace.convert_tokens_to_ids([f"<0x{b:02X}>" for b in char.encode()])

    unit = st.one_of(
        st.sampled_from(plain).map(lambda i: [i]),
        st.characters(codec="utf-8", exclude_categories=["Cs"]).map(char_bytes),
    )
    prompt = list(chain.from_iterable(data.draw(st.lists(unit, max_size=6), label="prompt")))
    output = list(chain.from_iterable(data.draw(st.lists(unit, max_size=30), label="output")))
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=40), label="chunks")
    skip = data.draw(st.booleans(), label="skip")
    got = streamed_text(metaspace, prompt, output, chunks, skip_special_tokens=skip,
                        decode_stream=decode_stream)
    assert got == expected_text(metaspace, prompt, output, skip)


# ------------------------------------------------------------------------------ multi-byte text


@pytest.mark.parametrize("text", ["party 🎉 über 日本語", "mixé 中🙂x🎉ü!"])
def test_split_characters_never_stream_a_replacement_character(tokenizer, text):
    output = content_ids(tokenizer, text)
    partial = set(byte_tokens(tokenizer))
    assert partial & set(output), "the text should contain characters split over several tokens"
    result = stream(tokenizer, encode_prompt(tokenizer, "Q:"), output)
    assert not any(FFFD in t for t in result.texts)
    assert result.rest == ""
    assert result.text.strip() == text


def test_prompt_context_does_not_start_inside_a_character(metaspace):
    # The last CONTEXT_TOKENS prompt tokens begin with continuation bytes of 🎉. ByteFallback would
    # decode that whole run of byte tokens, output bytes included, as U+FFFD.
    prompt = [*encode_prompt(metaspace, "a🎉"), *content_ids(metaspace, "ü")[-2:]]
    window = prompt[-CONTEXT_TOKENS:]
    assert decode(metaspace, window).startswith(FFFD)
    for text in ("ü", "🎉x", "é!"):
        output = [t for t in content_ids(metaspace, text) if metaspace.convert_ids_to_tokens(t) != "▁"]
        assert streamed_text(metaspace, prompt, output) == expected_text(metaspace, prompt, output) == text


def test_text_before_an_incomplete_character_streams_at_once(byte_level):
    # "x" then the first byte of 🎉: "x" is final and need not wait for the character to complete.
    output = content_ids(byte_level, "x🎉")
    det = IncrementalDetokenizer(byte_level, [])
    texts = [det.add_tokens([t]).text for t in output]
    assert texts[0] == "x" and "".join(texts) == "x🎉"


def test_flush_shows_a_trailing_incomplete_character(tokenizer):
    emoji = content_ids(tokenizer, "a🎉")
    output = emoji[:-1]  # the emoji's last byte never arrives
    det = IncrementalDetokenizer(tokenizer, [])
    streamed = "".join(det.add_tokens([t]).text for t in output)
    assert FFFD not in streamed
    rest = det.flush()
    assert rest and set(rest) == {FFFD}
    assert streamed + rest == decode(tokenizer, output)
    assert det.text == streamed + rest


# --------------------------------------------------------------------------------- special tokens


@pytest.mark.parametrize(("fixture", "eos"), [("byte_level", BYTE_LEVEL_EOS), ("metaspace", METASPACE_EOS)])
@pytest.mark.parametrize("skip", [True, False])
def test_eos_in_the_output_follows_skip_special_tokens(request, fixture, eos, skip):
    tok = request.getfixturevalue(fixture)
    prompt = encode_prompt(tok, "Say hi")  # starts with BOS
    output = [*content_ids(tok, " Hello"), tok.convert_tokens_to_ids(eos)]
    got = streamed_text(tok, prompt, output, skip_special_tokens=skip)
    assert got == expected_text(tok, prompt, output, skip)
    assert got.endswith(eos) != skip
    assert got.removesuffix(eos).endswith("Hello")


def test_skipped_special_token_inside_the_output(tokenizer):
    eos = tokenizer.eos_token_id
    output = [*content_ids(tokenizer, "one"), eos, *content_ids(tokenizer, " two 🎉"), eos]
    for skip in (True, False):
        prompt = encode_prompt(tokenizer, "count")
        assert streamed_text(tokenizer, prompt, output, skip_special_tokens=skip) == expected_text(
            tokenizer, prompt, output, skip)


# ----------------------------------------------------------------------------------- stop strings


def test_stop_string_is_trimmed(tokenizer):
    output = content_ids(tokenizer, "Hello world, café")
    result = stream(tokenizer, [], output, stop=["world"])
    assert result.text == "Hello "
    assert result.updates[-1].stop_string == "world"
    assert result.rest == ""


def test_stop_string_is_included(tokenizer):
    output = content_ids(tokenizer, "Hello world, café")
    text = streamed_text(tokenizer, [], output, stop=["world"], include_stop_str_in_output=True)
    assert text == "Hello world"


def test_stop_string_split_over_several_tokens_names_the_completing_token(tokenizer):
    output = content_ids(tokenizer, "Hello world, café")
    token_texts = [decode(tokenizer, [t]) for t in output]
    assert not any("world" in t for t in token_texts), "the stop string should span several tokens"
    det = IncrementalDetokenizer(tokenizer, [], stop=["world"])
    update = det.add_tokens(output)  # all at once: the index is within this call
    completing = next(k for k in range(len(output)) if "world" in decode(tokenizer, output[:k + 1]))
    assert update == DetokenizerUpdate("Hello ", "world", completing)
    assert det.token_ids == output[:completing + 1]
    assert det.text == "Hello "
    assert det.stop_string == "world"


def test_stop_token_index_counts_within_the_call(tokenizer):
    output = content_ids(tokenizer, "abc Hello world, café")
    completing = next(k for k in range(len(output)) if "world" in decode(tokenizer, output[:k + 1]))
    det = IncrementalDetokenizer(tokenizer, [], stop=["world"])
    first = det.add_tokens(output[:2])
    assert first.stop_string is None and first.stop_token_index is None
    update = det.add_tokens(output[2:])
    assert update.stop_token_index == completing - 2


def test_stop_string_spanning_a_multibyte_character(tokenizer):
    output = content_ids(tokenizer, "party 🎉 über alles")
    stop = "🎉 ü"
    det = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    update = det.add_tokens(output)
    # The match completes with the token that carries the last byte of "ü".
    completing = next(k for k in range(len(output)) if stop in decode(tokenizer, output[:k + 1]))
    assert decode(tokenizer, [output[completing]], skip=False) == FFFD  # a byte token, not a whole char
    assert update.stop_token_index == completing
    assert update.text == "party "
    assert FFFD not in update.text


def test_stop_string_ending_inside_a_character_streamed_byte_by_byte(tokenizer):
    output = content_ids(tokenizer, "über")
    result = stream(tokenizer, [], output, stop=["ü"], include_stop_str_in_output=True)
    assert result.text == "ü"
    completing = next(k for k in range(len(output)) if "ü" in decode(tokenizer, output[:k + 1]))
    assert completing > 0  # "ü" is split over two byte tokens
    assert result.stop == ("ü", completing)


def test_partial_stop_prefix_is_held_back_then_released(byte_level):
    tok = byte_level
    output = content_ids(tok, "Hello world, café")
    det = IncrementalDetokenizer(tok, [], stop=["world peace"])
    streamed = ""
    for k, token in enumerate(output):
        streamed += det.add_tokens([token]).text
        so_far = decode(tok, output[:k + 1])
        # Exactly the longest suffix that could begin "world peace" is held back, no more.
        held = next((so_far[-n:] for n in range(min(len(so_far), 10), 0, -1)
                     if "world peace".startswith(so_far[-n:])), "")
        assert streamed == so_far[:len(so_far) - len(held)], (k, so_far)
        assert det.text == so_far
    assert "world," in streamed  # released once "," showed it is not the stop string
    assert streamed + det.flush() == "Hello world, café"


def test_held_back_prefix_is_released_by_flush(tokenizer):
    output = content_ids(tokenizer, "Hello wor")
    result = stream(tokenizer, [], output, stop=["world"])
    assert "".join(result.texts) == "Hello "
    assert result.rest == "wor"
    assert result.stop == (None, None)


def test_the_stop_string_that_ends_first_wins(tokenizer):
    output = content_ids(tokenizer, "Hello world, café")
    for stops in (["café", "world"], ["world", "café"]):
        assert streamed_text(tokenizer, [], output, stop=stops) == "Hello "
    # "lo" ends before "Hello world" does, though the latter starts earlier: a character-by-character
    # scan stops at "lo", and so does the detokenizer, however the text is split into tokens.
    for chunks in ([1] * len(output), [len(output)]):
        result = stream(tokenizer, [], output, chunks, stop=["Hello world", "lo"])
        assert result.text == "Hel" and result.stop[0] == "lo"
    # Matches ending at the same place: the longest.
    result = stream(tokenizer, [], output, stop=["ld", "world"])
    assert result.text == "Hello " and result.stop[0] == "world"


def test_no_tokens_after_a_stop(tokenizer):
    output = content_ids(tokenizer, "Hello world, café")
    det = IncrementalDetokenizer(tokenizer, [], stop=["world"])
    det.add_tokens(output)
    assert det.flush() == ""
    with pytest.raises(RuntimeError, match="world"):
        det.add_tokens(output[:1])


def test_no_tokens_after_flush(tokenizer):
    det = IncrementalDetokenizer(tokenizer, [])
    det.add_tokens(content_ids(tokenizer, "Hi"))
    assert det.flush() == ""
    assert det.flush() == ""
    with pytest.raises(RuntimeError):
        det.add_tokens([1])


def test_empty_stop_string_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        IncrementalDetokenizer(tokenizer, [], stop=["x", ""])


STOP_ALPHABET = "ab üé中🎉\n"


@BOTH_PATHS
@given(data=st.data())
@PROPERTY_SETTINGS
def test_random_text_with_stop_strings_matches_a_character_scan(tokenizer, decode_stream, data):
    tok = tokenizer
    text = data.draw(st.text(STOP_ALPHABET, max_size=30), label="text")
    stops = data.draw(st.lists(st.text(STOP_ALPHABET, min_size=1, max_size=4), max_size=3), label="stops")
    include = data.draw(st.booleans(), label="include")
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=40), label="chunks")
    output = content_ids(tok, text)
    text = decode(tok, output)  # the output's text (no prompt: no leading-space question)
    want, want_stop = reference_stop(text, stops, include)
    result = stream(tok, [], output, chunks, stop=stops, include_stop_str_in_output=include,
                    decode_stream=decode_stream)
    assert result.text == want
    assert decode_whole(tok, [], output, stop=stops, include_stop_str_in_output=include) == (want, want_stop)
    completing = None
    if want_stop is not None:
        # The first token whose text (less a trailing incomplete character) holds a match.
        completing = next(k for k in range(len(output))
                          if reference_stop(decode(tok, output[:k + 1]).rstrip(FFFD), stops, True)[1])
    assert result.stop == (want_stop, completing)


# ------------------------------------------------------------------------------------ decode_whole


def test_decode_whole_matches_streaming(tokenizer):
    prompt = encode_prompt(tokenizer, "Q: café?")
    output = content_ids(tokenizer, "Hello world, café 🎉 done")
    assert decode_whole(tokenizer, prompt, output) == (expected_text(tokenizer, prompt, output), None)
    assert decode_whole(tokenizer, prompt, output, stop=["🎉", "xyz"]) == (
        streamed_text(tokenizer, prompt, output, stop=["🎉", "xyz"]), "🎉")
    text, stop = decode_whole(tokenizer, prompt, output, stop=["café"], include_stop_str_in_output=True)
    assert stop == "café" and text.endswith("world, café") and "🎉" not in text


# ------------------------------------------------------------------------------------------- cost


class CountingTokenizer:
    """Records the longest id list passed to decode()."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.longest = 0
        self.calls = 0

    def decode(self, ids, **kwargs):
        self.longest = max(self.longest, len(ids))
        self.calls += 1
        return self.tok.decode(ids, **kwargs)


def test_each_token_decodes_a_short_window_only(tokenizer):
    counting = CountingTokenizer(tokenizer)
    prompt = encode_prompt(tokenizer, "a long prompt " * 20)
    output = content_ids(tokenizer, "café 中文 🎉 über, hello world. " * 40)
    det = IncrementalDetokenizer(counting, prompt, stop=["never appears"])
    text = "".join(det.add_tokens([t]).text for t in output) + det.flush()
    assert text == expected_text(tokenizer, prompt, output)
    assert len(output) > 500
    # The window is the prompt context plus the few tokens of one (possibly multi-byte) character.
    assert counting.longest <= CONTEXT_TOKENS + 8
    assert counting.calls <= 2 * len(output) + 2


# ------------------------------------------------------------------------ the backend's decode


@PROPERTY_SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_the_backend_decode_equals_transformers_decode(tokenizer, data, skip):
    """The fast path the detokenizer takes gives transformers' text for any ids, special ones included."""
    from scheduler_svc.detokenizer import backend_decoder

    fast = backend_decoder(tokenizer)
    assert fast is not None, "a fast tokenizer should decode through its backend"
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=12))
    assert fast(ids, skip_special_tokens=skip) == decode(tokenizer, ids, skip)
