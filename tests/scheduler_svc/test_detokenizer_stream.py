"""The detokenizer's DecodeStream path (tokenizers' Rust incremental decoding, taken for fast tokenizers)
streams exactly what its window decoding from Python streams: every update of every call, the flushed
rest, the text and the token ids, for random token streams with stop strings, special tokens and broken
UTF-8, on the tokenizers trained in the test and on the embedded model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import SAMPLE_TEXTS

from pagedserve.default_model import default_model_dir
from scheduler_svc.detokenizer import CONTEXT_TOKENS, DetokenizerUpdate, IncrementalDetokenizer
from scheduler_svc.tokenizer import encode_prompt, load_tokenizer

FFFD = "\ufffd"
COMPARE_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def embedded():
    return load_tokenizer(default_model_dir())


@pytest.fixture(scope="module", params=["byte_level", "metaspace", "embedded"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Run:
    """Everything one detokenizer showed for one token stream."""

    updates: tuple[DetokenizerUpdate, ...]
    rest: str
    text: str
    token_ids: tuple[int, ...]


def run(tok, prompt: Sequence[int], output: Sequence[int], chunks: Sequence[int], decode_stream: bool,
        **kwargs) -> tuple[Run, IncrementalDetokenizer]:
    """Feed `output` in calls of `chunks` tokens (then one each), stop at a stop string, flush."""
    det = IncrementalDetokenizer(tok, prompt, decode_stream=decode_stream, **kwargs)
    updates, pos, sizes = [], 0, iter(chunks)
    while pos < len(output):
        size = next(sizes, 1)
        updates.append(det.add_tokens(output[pos:pos + size]))
        pos += size
        if updates[-1].stop_string is not None:
            break
    rest = det.flush()
    return Run(tuple(updates), rest, det.text, tuple(det.token_ids)), det


def assert_same_both_ways(tok, prompt, output, chunks=(), **kwargs) -> IncrementalDetokenizer:
    """Both paths show the same; returns the DecodeStream path's detokenizer."""
    streamed, det = run(tok, prompt, output, chunks, True, **kwargs)
    windowed, _ = run(tok, prompt, output, chunks, False, **kwargs)
    assert streamed == windowed
    return det


def decode(tok, ids: Sequence[int], skip: bool = True) -> str:
    return tok.decode(list(ids), skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def content_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@st.composite
def token_streams(draw, tok, vocab: st.SearchStrategy[int]):
    """A prompt, an output, call sizes, skip_special_tokens, and stop strings cut from the output's
    text (so that they match, often across token and call boundaries)."""
    prompt = draw(st.lists(vocab, max_size=8), label="prompt")
    output = draw(st.lists(vocab, max_size=40), label="output")
    chunks = draw(st.lists(st.integers(1, 5), max_size=40), label="chunks")
    skip = draw(st.booleans(), label="skip")
    text = decode(tok, output, skip).replace(FFFD, "")
    stops = []
    if text:
        for _ in range(draw(st.integers(0, 2), label="num_stops")):
            start = draw(st.integers(0, len(text) - 1))
            stops.append(text[start:start + draw(st.integers(1, 4))])
    include = draw(st.booleans(), label="include")
    return prompt, output, chunks, {"skip_special_tokens": skip, "stop": stops,
                                    "include_stop_str_in_output": include}


# --------------------------------------------------------------------------------- which path


def test_fast_tokenizers_take_the_decode_stream(tokenizer):
    det = IncrementalDetokenizer(tokenizer, encode_prompt(tokenizer, "Hello"))
    assert det.uses_decode_stream
    det.add_tokens(content_ids(tokenizer, " world, café 🎉"))
    assert det.uses_decode_stream
    assert not IncrementalDetokenizer(tokenizer, [], decode_stream=False).uses_decode_stream


class SlowTokenizer:
    """A tokenizer with only transformers' `decode` (no Rust backend to stream with)."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def decode(self, ids, **kwargs):
        return self.tok.decode(ids, **kwargs)


def test_slow_tokenizers_decode_windows(byte_level):
    output = content_ids(byte_level, "Hello café")
    det = IncrementalDetokenizer(SlowTokenizer(byte_level), [])
    assert not det.uses_decode_stream
    assert det.add_tokens(output).text + det.flush() == "Hello café"


def test_a_context_ending_inside_a_character_decodes_windows(byte_level):
    # The stream would take such a context's text for output text; the window decoding never does.
    prompt = content_ids(byte_level, "x🎉")[:-1]
    assert decode(byte_level, prompt[-CONTEXT_TOKENS:]).endswith(FFFD)
    det = assert_same_both_ways(byte_level, prompt, content_ids(byte_level, " ok"))
    assert not det.uses_decode_stream


# ---------------------------------------------------------------------------- same chunks both ways


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_sample_texts_stream_the_same_chunks(tokenizer, text):
    prompt = encode_prompt(tokenizer, "Q: café 中文?")
    det = assert_same_both_ways(tokenizer, prompt, content_ids(tokenizer, text))
    assert det.uses_decode_stream


@given(data=st.data())
@COMPARE_SETTINGS
def test_random_ids_stream_the_same_chunks_both_ways(tokenizer, data):
    # Any ids: special tokens, lone and stray UTF-8 bytes, ByteFallback runs it rewrites retroactively.
    prompt, output, chunks, kwargs = data.draw(token_streams(tokenizer, st.integers(0, len(tokenizer) - 1)))
    assert_same_both_ways(tokenizer, prompt, output, chunks, **kwargs)


@given(data=st.data())
@COMPARE_SETTINGS
def test_random_text_streams_the_same_chunks_both_ways(tokenizer, data):
    pieces = st.sampled_from([*SAMPLE_TEXTS, " ", "\n", "é", "🎉", "中", "def f(x):", "    return"])
    specials = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None]
    unit = st.one_of(pieces.map(lambda t: content_ids(tokenizer, t)),
                     st.sampled_from(specials).map(lambda i: [i]))
    ids = st.lists(unit, max_size=8).map(lambda units: [i for u in units for i in u])
    prompt, output = data.draw(ids, label="prompt"), data.draw(ids, label="output")
    _, _, chunks, kwargs = data.draw(token_streams(tokenizer, st.just(0)))
    text = decode(tokenizer, output, kwargs["skip_special_tokens"])
    kwargs["stop"] = [text[k:k + 3] for k in data.draw(st.lists(st.integers(0, max(0, len(text) - 1)),
                                                                 max_size=2)) if text[k:k + 3]]
    det = assert_same_both_ways(tokenizer, prompt, output, chunks, **kwargs)
    # Whole characters only: the stream never has to give way to the window decoding.
    assert det.uses_decode_stream or decode(tokenizer, prompt[-CONTEXT_TOKENS:]).endswith(FFFD)


def test_text_before_an_incomplete_character_streams_at_once(byte_level):
    # The token "rÃ" is "r" and the first byte of "û": the stream holds it whole, the detokenizer
    # streams "r" with it all the same, as the window decoding does.
    output = content_ids(byte_level, "brûlée")
    token_texts = [decode(byte_level, [t]) for t in output]
    assert any(t.endswith(FFFD) and t.rstrip(FFFD) for t in token_texts)
    det = IncrementalDetokenizer(byte_level, [])
    texts = [det.add_tokens([t]).text for t in output]
    assert texts == ["b", "r", "û", "l", "é", "e"]
    assert det.uses_decode_stream
    assert_same_both_ways(byte_level, [], output, [1] * len(output))


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_stream_the_same_chunks(tokenizer, skip):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    output = [eos, *content_ids(tokenizer, "one"), eos, eos, *content_ids(tokenizer, " two 🎉"), bos, eos]
    for prompt in ([], [bos], encode_prompt(tokenizer, "count")):
        det = assert_same_both_ways(tokenizer, prompt, output, skip_special_tokens=skip)
        assert det.uses_decode_stream


def test_stop_strings_across_calls_stream_the_same_chunks(tokenizer):
    output = content_ids(tokenizer, "Hello world, café 🎉 über alles")
    for stop in (["world"], ["lo w"], ["é 🎉 ü"], ["🎉", "xyz"], ["never"], ["alles"]):
        for chunks in ([1] * len(output), [2, 3] * len(output), [len(output)]):
            for include in (True, False):
                det = assert_same_both_ways(tokenizer, [], output, chunks, stop=stop,
                                            include_stop_str_in_output=include)
                assert det.uses_decode_stream


def test_a_trailing_incomplete_character_flushes_the_same(tokenizer):
    output = content_ids(tokenizer, "a🎉")[:-1]
    det = assert_same_both_ways(tokenizer, encode_prompt(tokenizer, "Q"), output)
    assert det.text.endswith(FFFD)


def test_parallel_samples_of_one_prompt_stream_independently(tokenizer):
    # n > 1: the scheduler forks the sequences before their first token, and each output index gets a
    # detokenizer of its own from the prompt; interleaved, neither sees the other's tokens.
    prompt = encode_prompt(tokenizer, "Once upon")
    outputs = [content_ids(tokenizer, t) for t in (" a time 🎉 über", " a tiny café", "")]
    dets = [IncrementalDetokenizer(tokenizer, prompt, stop=["ny c"]) for _ in outputs]
    texts = ["" for _ in outputs]
    for step in range(max(map(len, outputs))):
        for k, (det, output) in enumerate(zip(dets, outputs, strict=True)):
            if step < len(output) and det.stop_string is None:
                texts[k] += det.add_tokens(output[step:step + 1]).text
    for k, (det, output) in enumerate(zip(dets, outputs, strict=True)):
        texts[k] += det.flush()
        alone, _ = run(tokenizer, prompt, output, (), False, stop=["ny c"])
        assert texts[k] == alone.text == det.text
    assert texts[:2] == [" a time 🎉 über", " a ti"]


# ------------------------------------------------------------------ where the stream gives way


class RaisingStream:
    """A DecodeStream that fails as tokenizers' does when the decoder rewrote emitted text."""

    def step(self, tokenizer, token_id):
        raise Exception("Invalid prefix encountered while decoding stream")


class HoldingStream:
    """A DecodeStream that holds every token back, as the real one does when it measures a rewritten
    prefix's text longer than the window's."""

    def step(self, tokenizer, token_id):
        return None


@pytest.mark.parametrize("stream", [RaisingStream(), HoldingStream()])
def test_a_stream_that_parts_from_the_window_decoding_is_left(byte_level, stream):
    prompt = encode_prompt(byte_level, "Q:")
    output = content_ids(byte_level, "Hello world, café 🎉 more")
    kwargs = {"stop": ["🎉"], "include_stop_str_in_output": True}
    expected, _ = run(byte_level, prompt, output, (3, len(output)), False, **kwargs)
    det = IncrementalDetokenizer(byte_level, prompt, **kwargs)
    first = det.add_tokens(output[:3])
    det._stream = stream  # from the fourth token on the stream goes wrong
    later = det.add_tokens(output[3:])
    assert not det.uses_decode_stream
    assert (first, later) == expected.updates
    assert det.text == expected.text == "Hello world, café 🎉"


def test_byte_fallback_rewriting_emitted_text_leaves_the_stream(metaspace):
    # C3 B8 is "ø", streamed at once. A stray E4 after it makes ByteFallback turn the whole run of byte
    # tokens into one U+FFFD per byte, "ø" included: the stream refuses the rewritten prefix, the
    # window decoding streams past it (the documented caveat), and the detokenizer goes on with that.
    byte = {b: metaspace.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    output = [byte[0xC3], byte[0xB8], byte[0xE4], *content_ids(metaspace, " a")]
    assert decode(metaspace, output[:2]) == "ø" and decode(metaspace, output[:3]) == FFFD * 3
    det = assert_same_both_ways(metaspace, [], output, [1] * len(output))
    assert not det.uses_decode_stream
