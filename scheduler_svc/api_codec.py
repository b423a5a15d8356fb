"""Translate the client API (pagedserve.v1) to the scheduler's types and back.

Validation lives in SamplingParams and Scheduler.add_request; this module only maps fields (an unset
optional field takes the SamplingParams default) and names proto fields in its own errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pagedserve.errors import InvalidArgumentError
from pagedserve.v1 import generation_pb2 as pb
from scheduler_svc.request_stream import ChoiceUpdate, StreamUpdate
from scheduler_svc.sampling_params import EarlyStopping, SamplingParams, sampling_params_from_fields
from scheduler_svc.sequence import FinishReason

# Fields copied as they are; optional ones only when set (unset keeps the SamplingParams default).
_PLAIN_FIELDS = ("top_k", "min_p", "presence_penalty", "frequency_penalty", "min_tokens",
                 "include_stop_str_in_output", "ignore_eos", "logprobs", "beam_width", "priority")
_OPTIONAL_FIELDS = ("n", "best_of", "temperature", "top_p", "repetition_penalty", "seed", "max_tokens",
                    "length_penalty")

# The client API's EarlyStopping as SamplingParams takes it (HF's values); UNSPECIFIED keeps the default.
# The Python client sends its keyword values through the inverse of this table.
EARLY_STOPPING_FROM_PROTO: dict[int, EarlyStopping] = {
    pb.EARLY_STOPPING_TRUE: True,
    pb.EARLY_STOPPING_FALSE: False,
    pb.EARLY_STOPPING_NEVER: "never",
}

_FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.ABORTED: pb.FINISH_REASON_ABORTED,
}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A GenerateRequest in the scheduler's terms."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    skip_special_tokens: bool


def sampling_params_from_proto(msg: pb.SamplingParameters) -> SamplingParams:
    """SamplingParams from the proto; raises InvalidArgumentError naming the first bad field."""
    values: dict[str, object] = {name: getattr(msg, name) for name in _PLAIN_FIELDS}
    for name in _OPTIONAL_FIELDS:
        if msg.HasField(name):
            values[name] = getattr(msg, name)
    if msg.early_stopping != pb.EARLY_STOPPING_UNSPECIFIED:
        values["early_stopping"] = _early_stopping(msg.early_stopping)
    values["stop"] = msg.stop
    values["stop_token_ids"] = msg.stop_token_ids
    return sampling_params_from_fields(values)


def _early_stopping(value: int) -> EarlyStopping:
    # proto3 enums are open: a newer client may send a number this server does not know.
    if value not in EARLY_STOPPING_FROM_PROTO:
        raise InvalidArgumentError("early_stopping", f"unknown EarlyStopping value {value}")
    return EARLY_STOPPING_FROM_PROTO[value]


def parse_request(msg: pb.GenerateRequest, encode: Callable[[str], list[int]]) -> ParsedRequest:
    """Map a GenerateRequest; `encode` tokenizes a text prompt."""
    which = msg.WhichOneof("prompt")
    if which is None:
        raise InvalidArgumentError("prompt", "set either text or token_ids")
    if which == "text":
        if not msg.text:
            raise InvalidArgumentError("prompt.text", "must not be empty")
        prompt = encode(msg.text)
    else:
        prompt = list(msg.token_ids.ids)
        if not prompt:
            raise InvalidArgumentError("prompt.token_ids", "must not be empty")
    params = sampling_params_from_proto(msg.sampling)
    skip = msg.skip_special_tokens if msg.HasField("skip_special_tokens") else True
    return ParsedRequest(msg.request_id, prompt, params, skip)


def response_to_proto(request_id: str, update: StreamUpdate) -> pb.GenerateResponse:
    """One GenerateResponse for one stream update (errors are sent as a gRPC status instead)."""
    response = pb.GenerateResponse(request_id=request_id, choices=[_chunk(c) for c in update.choices])
    if update.usage is not None:
        u = update.usage
        response.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                         cached_prompt_tokens=u.cached_prompt_tokens,
                                         num_preemptions=u.num_preemptions))
    return response


def _chunk(choice: ChoiceUpdate) -> pb.CompletionChunk:
    chunk = pb.CompletionChunk(index=choice.index, text=choice.text, token_ids=choice.token_ids,
                               stop_reason=choice.stop_reason, cumulative_logprob=choice.cumulative_logprob)
    if choice.finish_reason is not None:
        chunk.finish_reason = _FINISH_REASONS.get(choice.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
    if choice.stop_token_id is not None:
        chunk.stop_token_id = choice.stop_token_id
    for lp in choice.logprobs:
        entry = chunk.logprobs.add()
        entry.chosen.CopyFrom(_candidate(*lp.chosen))
        entry.top_logprobs.extend(_candidate(*c) for c in lp.top)
    return chunk


def _candidate(token_id: int, text: str, logprob: float) -> pb.LogprobCandidate:
    return pb.LogprobCandidate(token_id=token_id, text=text, logprob=logprob)
