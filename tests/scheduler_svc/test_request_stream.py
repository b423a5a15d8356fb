"""RequestStream with the embedded model's tokenizer: updates queued while the client lags come as one
message equal to the separate ones joined, and an error is never merged away."""

from __future__ import annotations

import asyncio

import pytest

from pagedserve.default_model import default_model_dir
from pagedserve.errors import RequestErrorKind
from scheduler_svc.outputs import CompletionOutput, RequestOutput
from scheduler_svc.request_stream import RequestStream, StreamUpdate
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.sequence import FinishReason
from scheduler_svc.tokenizer import TokenTexts, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_dir())


def make_stream(tokenizer, n: int = 1) -> RequestStream:
    prompt = tokenizer.encode("def fibonacci(n):")
    return RequestStream("r", prompt, SamplingParams(n=n, max_tokens=32), tokenizer, TokenTexts(tokenizer),
                         skip_special_tokens=True, stop_sequence=lambda *_: None)


def token_reports(tokenizer, n: int = 1) -> list[RequestOutput]:
    """One report per token of a short output, for each of `n` indexes; the last one finishes."""
    ids = tokenizer.encode("\n    return n if n < 2 else fib(n - 1)")
    reports = [RequestOutput("r", [CompletionOutput(i, [t], cumulative_logprob=-0.5 * (k + 1))
                                   for i in range(n)])
               for k, t in enumerate(ids)]
    reports.append(RequestOutput("r", [CompletionOutput(i, [], cumulative_logprob=-0.5 * len(ids),
                                                        finish_reason=FinishReason.LENGTH) for i in range(n)],
                                 finished=True, num_prompt_tokens=5, num_generated_tokens=n * len(ids)))
    return reports


def read_all(stream: RequestStream) -> list[StreamUpdate]:
    async def go() -> list[StreamUpdate]:
        updates = [await stream.next_update()]
        while not updates[-1].is_last:
            updates.append(await stream.next_update())
        return updates
    return asyncio.run(go())


def joined(updates: list[StreamUpdate], index: int) -> tuple[str, list[int]]:
    text, ids = "", []
    for update in updates:
        for choice in update.choices:
            if choice.index == index:
                text += choice.text
                ids += choice.token_ids
    return text, ids


@pytest.mark.parametrize("n", [1, 2])
def test_updates_queued_while_the_client_lags_arrive_as_one_message(tokenizer, n):
    reports = token_reports(tokenizer, n)
    paced = make_stream(tokenizer, n)              # a client that keeps up: one message per report

    async def paced_reads() -> list[StreamUpdate]:
        updates = []
        for report in reports:
            paced.apply(report)
            updates.append(await paced.next_update())
        return updates
    separate = asyncio.run(paced_reads())

    lagging = make_stream(tokenizer, n)
    for report in reports:
        lagging.apply(report)
    (merged,) = read_all(lagging)

    assert len(separate) == len(reports)
    assert merged.is_last and merged.usage == separate[-1].usage
    for index in range(n):
        assert joined([merged], index) == joined(separate, index)
        choice = next(c for c in merged.choices if c.index == index)
        assert choice.finish_reason is FinishReason.LENGTH
        assert choice.cumulative_logprob == separate[-1].choices[index].cumulative_logprob


def test_an_error_is_sent_after_the_tokens_before_it_and_not_merged(tokenizer):
    stream = make_stream(tokenizer)
    for report in token_reports(tokenizer)[:3]:
        stream.apply(report)
    stream.fail(RequestErrorKind.UNAVAILABLE, "executor lost")
    first, second = read_all(stream)
    assert first.error is None and len(joined([first], 0)[1]) == 3
    assert second.error == (RequestErrorKind.UNAVAILABLE, "executor lost") and second.is_last
