"""One live request as its client sees it: scheduler reports turned into text deltas and updates.

The engine owns one RequestStream per request. It feeds the scheduler's RequestOutputs in, and the
stream detokenizes each output incrementally, watches for stop strings (asking the engine to stop the
sequence when one matches), times the tokens for metrics, and queues `StreamUpdate`s that the gRPC
frontend turns into GenerateResponse messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedserve.errors import RequestErrorKind
from scheduler_svc.detokenizer import IncrementalDetokenizer, decode_whole
from scheduler_svc.outputs import CompletionOutput, RequestOutput
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.sequence import FinishReason
from scheduler_svc.tokenizer import TokenTexts

# (token id, its text, logprob)
Candidate = tuple[int, str, float]


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The chosen token at one position and the most likely alternatives, best first."""

    chosen: Candidate
    top: tuple[Candidate, ...]


@dataclass(slots=True)
class ChoiceUpdate:
    """New data of one output index (maps onto pagedserve.v1.CompletionChunk)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str = ""
    stop_token_id: int | None = None
    cumulative_logprob: float = 0.0


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    num_preemptions: int


@dataclass(slots=True)
class StreamUpdate:
    """One message for the client: new chunks, and on the last one usage or an error."""

    choices: list[ChoiceUpdate]
    usage: Usage | None = None
    error: tuple[RequestErrorKind, str] | None = None

    @property
    def is_last(self) -> bool:
        """Whether the request ended with this update."""
        return self.usage is not None or self.error is not None

    def absorb(self, later: StreamUpdate) -> None:
        """Append a later (error-free) update to this one, as if one message had carried both."""
        by_index = {choice.index: choice for choice in self.choices}
        for choice in later.choices:
            earlier = by_index.get(choice.index)
            if earlier is None:
                self.choices.append(choice)
                by_index[choice.index] = choice
                continue
            earlier.text += choice.text
            earlier.token_ids += choice.token_ids
            earlier.logprobs += choice.logprobs
            earlier.cumulative_logprob = choice.cumulative_logprob
            if choice.finish_reason is not None:
                earlier.finish_reason = choice.finish_reason
                earlier.stop_reason, earlier.stop_token_id = choice.stop_reason, choice.stop_token_id
        self.usage = later.usage


# What a stream needs from the engine: stop sequence `index` of `request_id` on a stop string.
StopSequence = Callable[[str, int, str], None]


class RequestStream:
    """Client-facing state of one request; the frontend consumes its updates with `next_update`."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer: Any, token_texts: TokenTexts, skip_special_tokens: bool,
                 stop_sequence: StopSequence, clock: Callable[[], float] = time.monotonic) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.skip_special_tokens = skip_special_tokens
        self._tokenizer = tokenizer
        self._token_texts = token_texts
        self._stop_sequence = stop_sequence
        self._clock = clock
        self._updates: asyncio.Queue[StreamUpdate] = asyncio.Queue()
        self._held: StreamUpdate | None = None     # an error update taken while merging, sent next
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._stopped: set[int] = set()      # indexes a stop string ended, awaiting the scheduler's close
        self._num_tokens: dict[int, int] = {}
        self.arrival_time = clock()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self._inter_token_latencies: list[float] = []
        self._first_token_reported = False
        self.finished = False

    # ---- consumer side ---------------------------------------------------------------------------

    async def next_update(self) -> StreamUpdate:
        """Wait for the next update; the updates queued meanwhile come merged into it.

        A client that reads slower than the engine steps (or a frontend busy with many streams) would
        otherwise get one message per step, each costing a gRPC write; merged, it gets what is ready in
        one. An error update is never merged: the tokens before it go first, then the error.
        """
        update = self._held or await self._updates.get()
        self._held = None
        while not update.is_last and not self._updates.empty():
            later = self._updates.get_nowait()
            if later.error is not None:
                self._held = later
                break
            update.absorb(later)
        return update

    def fail(self, kind: RequestErrorKind, message: str) -> None:
        """End the stream with an error (the request is already gone from the scheduler)."""
        if not self.finished:
            self.finished = True
            self._updates.put_nowait(StreamUpdate([], error=(kind, message)))

    def take_latencies(self) -> tuple[float | None, list[float]]:
        """Latencies not yet reported: time to first token (once) and inter-token gaps, in seconds."""
        first = None
        if self.first_token_time is not None and not self._first_token_reported:
            first = self.first_token_time - self.arrival_time
            self._first_token_reported = True
        gaps, self._inter_token_latencies = self._inter_token_latencies, []
        return first, gaps

    # ---- producer side (the engine) --------------------------------------------------------------

    def apply(self, output: RequestOutput) -> None:
        """Turn one scheduler report into an update for the client (nothing when it carries nothing)."""
        if self.finished:
            return
        now = self._clock()
        choices = [c for c in (self._choice(out, now) for out in output.outputs) if c is not None]
        if output.finished:
            self.finished = True
            if output.error is not None:
                kind = output.error_kind or RequestErrorKind.INTERNAL
                self._updates.put_nowait(StreamUpdate(choices, error=(kind, output.error)))
                return
            usage = Usage(prompt_tokens=output.num_prompt_tokens,
                          completion_tokens=sum(self._num_tokens.values()),
                          cached_prompt_tokens=output.num_cached_prompt_tokens,
                          num_preemptions=output.num_preemptions)
            self._updates.put_nowait(StreamUpdate(choices, usage=usage))
        elif choices:
            self._updates.put_nowait(StreamUpdate(choices))

    def _choice(self, out: CompletionOutput, now: float) -> ChoiceUpdate | None:
        if out.index in self._stopped:          # the scheduler's close of a stop-string match we sent
            return None
        if out.token_ids:
            self._note_tokens(now)
            self._num_tokens[out.index] = self._num_tokens.get(out.index, 0) + len(out.token_ids)
        if self.params.streams_incrementally:
            return self._streamed_choice(out)
        return self._whole_choice(out)

    def _note_tokens(self, now: float) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
        elif self.last_token_time is not None:
            self._inter_token_latencies.append(now - self.last_token_time)
        self.last_token_time = now

    def _streamed_choice(self, out: CompletionOutput) -> ChoiceUpdate:
        detok = self._detokenizers.get(out.index)
        if detok is None:
            detok = self._detokenizers[out.index] = IncrementalDetokenizer(
                self._tokenizer, self.prompt_token_ids, self.skip_special_tokens, self.params.stop,
                self.params.include_stop_str_in_output)
        choice = ChoiceUpdate(index=out.index, token_ids=list(out.token_ids),
                              logprobs=self._logprobs(out), cumulative_logprob=out.cumulative_logprob)
        if out.token_ids:
            update = detok.add_tokens(out.token_ids)
            choice.text = update.text
            if update.stop_string is not None and update.stop_token_index is not None:  # set together
                kept = update.stop_token_index + 1
                choice.token_ids = choice.token_ids[:kept]
                choice.logprobs = choice.logprobs[:kept]
                self._num_tokens[out.index] -= len(out.token_ids) - kept
                choice.finish_reason, choice.stop_reason = FinishReason.STOP, update.stop_string
                if out.finish_reason is None:
                    self._stopped.add(out.index)
                    self._stop_sequence(self.request_id, out.index, update.stop_string)
                return choice
        if out.finish_reason is not None:
            choice.text += detok.flush()
            self._set_finish(choice, out)
        return choice

    def _whole_choice(self, out: CompletionOutput) -> ChoiceUpdate:
        """Beam search and best_of > n send each output whole, once, when the request ends."""
        choice = ChoiceUpdate(index=out.index, token_ids=list(out.token_ids), logprobs=self._logprobs(out),
                              cumulative_logprob=out.cumulative_logprob)
        text, stop_string = decode_whole(self._tokenizer, self.prompt_token_ids, out.token_ids,
                                         self.skip_special_tokens, self.params.stop,
                                         self.params.include_stop_str_in_output)
        choice.text = text
        self._set_finish(choice, out)
        if stop_string is not None and out.finish_reason is not FinishReason.ABORTED:
            choice.finish_reason, choice.stop_reason = FinishReason.STOP, stop_string
            choice.stop_token_id = None
        return choice

    def _set_finish(self, choice: ChoiceUpdate, out: CompletionOutput) -> None:
        choice.finish_reason = out.finish_reason
        if isinstance(out.stop_reason, int):
            choice.stop_token_id = out.stop_reason
            choice.stop_reason = self._token_texts.text(out.stop_reason)
        elif out.stop_reason is not None:
            choice.stop_reason = out.stop_reason

    def _logprobs(self, out: CompletionOutput) -> list[TokenLogprobs]:
        text = self._token_texts.text
        return [TokenLogprobs(chosen=(token_id, text(token_id), chosen),
                              top=tuple((t, text(t), lp) for t, lp in top))
                for token_id, (chosen, top) in zip(out.token_ids, out.logprobs, strict=False)]
