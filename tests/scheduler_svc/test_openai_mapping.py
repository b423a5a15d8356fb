"""The OpenAI-compatible API's mapping: the same SamplingParams as over gRPC, OpenAI's response shapes."""

from __future__ import annotations

import pytest

from clients.request_builder import build_generate_request
from pagedserve.errors import InvalidArgumentError
from pagedserve.v1 import generation_pb2 as pb
from scheduler_svc.api_codec import parse_request
from scheduler_svc.openai_errors import OpenAIError, from_submit_error
from scheduler_svc.openai_mapping import (
    CompletionLogprobsWriter,
    chat_logprobs,
    chat_sampling_fields,
    completion_sampling_fields,
    finish_reason,
    stop_reason,
    template_messages,
    usage_info,
)
from scheduler_svc.openai_schemas import ChatCompletionRequest, CompletionRequest
from scheduler_svc.request_stream import ChoiceUpdate, TokenLogprobs, Usage
from scheduler_svc.sampling_params import SamplingParams, sampling_params_from_fields
from scheduler_svc.sequence import FinishReason


def completion_params(**fields: object) -> SamplingParams:
    values, _ = completion_sampling_fields(CompletionRequest(prompt="x", **fields))
    return sampling_params_from_fields(values)


def grpc_params(**sampling: object) -> SamplingParams:
    sent = build_generate_request([5, 6], **sampling).SerializeToString()
    return parse_request(pb.GenerateRequest.FromString(sent), encode=lambda text: []).params


@pytest.mark.parametrize("fields", [
    {},
    {"temperature": 0.0, "max_tokens": 7},
    {"n": 3, "best_of": 5, "seed": 11, "top_p": 0.75, "top_k": 40, "min_p": 0.0625},  # exact in float32
    {"presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.25, "min_tokens": 2,
     "max_tokens": 9, "ignore_eos": True, "include_stop_str_in_output": True},
    {"stop": ["\n\n", "def"], "stop_token_ids": [2, 7], "priority": 3},
])
def test_an_openai_request_means_what_the_same_grpc_request_means(fields):
    assert completion_params(**fields) == grpc_params(**fields)


def test_beam_search_takes_best_of_or_n_as_its_width_and_is_greedy():
    assert completion_params(use_beam_search=True, n=2, best_of=4) == grpc_params(beam_width=4, n=2)
    assert completion_params(use_beam_search=True, n=3) == grpc_params(beam_width=3, n=3)
    assert completion_params(use_beam_search=True, n=2, length_penalty=0.5, early_stopping="never") == \
        grpc_params(beam_width=2, n=2, length_penalty=0.5, early_stopping="never")


def test_a_lone_stop_string_is_one_stop_string_and_top_k_minus_one_is_off():
    params = completion_params(stop="\n", top_k=-1)
    assert params.stop == ("\n",) and params.top_k == 0


def test_completion_logprobs_zero_still_returns_the_chosen_tokens_logprob():
    assert completion_params(logprobs=0).logprobs == 1
    assert completion_params(logprobs=3).logprobs == 3
    assert completion_params().logprobs == 0


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1}, "temperature"),
    ({"logprobs": 50}, "logprobs"),
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"use_beam_search": True, "n": 2, "best_of": 100}, "best_of"),
    ({"use_beam_search": True, "n": 100}, "n"),
    ({"stop": [""]}, "stop"),
    ({"seed": -1}, "seed"),
])
def test_bad_values_are_refused_by_sampling_params_naming_the_request_field(fields, param):
    values, names = completion_sampling_fields(CompletionRequest(prompt="x", **fields))
    with pytest.raises(InvalidArgumentError) as caught:
        sampling_params_from_fields(values)
    error = from_submit_error(caught.value, names)
    assert (error.status, error.param) == (400, param)
    assert error.message.startswith(f"{param}: ")
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error",
                                      "param": param, "code": None}}


@pytest.mark.parametrize(("fields", "param"), [
    ({"suffix": "x"}, "suffix"), ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"echo": True, "logprobs": 1}, "echo"),
])
def test_unsupported_completion_fields_are_refused_by_name(fields, param):
    with pytest.raises(InvalidArgumentError) as caught:
        completion_sampling_fields(CompletionRequest(prompt="x", **fields))
    assert caught.value.field == param


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_chat_runs_to_the_end_of_the_context_without_a_limit():
    values, _ = chat_sampling_fields(chat(), prompt_len=10, max_model_len=100)
    assert values["max_tokens"] == 90


def test_chat_prefers_max_completion_tokens_and_names_it_in_errors():
    values, names = chat_sampling_fields(chat(max_tokens=5, max_completion_tokens=7), 10, 100)
    assert values["max_tokens"] == 7 and names["max_tokens"] == "max_completion_tokens"
    values, names = chat_sampling_fields(chat(max_tokens=5), 10, 100)
    assert values["max_tokens"] == 5 and "max_tokens" not in names


def test_chat_logprobs_ask_for_top_logprobs_and_name_them_in_errors():
    values, names = chat_sampling_fields(chat(logprobs=True, top_logprobs=3), 1, 100)
    assert values["logprobs"] == 3 and names["logprobs"] == "top_logprobs"
    values, _ = chat_sampling_fields(chat(logprobs=True), 1, 100)
    assert values["logprobs"] == 1
    with pytest.raises(InvalidArgumentError) as caught:
        chat_sampling_fields(chat(top_logprobs=2), 1, 100)
    assert caught.value.field == "top_logprobs"


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_unsupported_chat_fields_are_refused_by_name(fields, param):
    with pytest.raises(InvalidArgumentError) as caught:
        chat_sampling_fields(chat(**fields), 1, 100)
    assert caught.value.field == param


def test_template_messages_join_text_parts_and_refuse_others():
    request = ChatCompletionRequest(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ])
    assert template_messages(request.messages) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""}]
    image = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(InvalidArgumentError) as caught:
        template_messages(image.messages)
    assert caught.value.field == "messages[0].content"


def test_finish_reasons_are_openais():
    assert [finish_reason(r) for r in (None, FinishReason.LENGTH, FinishReason.STOP, FinishReason.EOS)] == \
        [None, "length", "stop", "stop"]


def test_stop_reason_is_the_stop_token_id_or_the_stop_string():
    eos = ChoiceUpdate(0, finish_reason=FinishReason.EOS, stop_reason="</s>", stop_token_id=2)
    assert stop_reason(eos) == 2
    assert stop_reason(ChoiceUpdate(0, finish_reason=FinishReason.STOP, stop_reason="\n")) == "\n"
    assert stop_reason(ChoiceUpdate(0, finish_reason=FinishReason.LENGTH)) is None


def test_usage_sums_every_prompt_and_reports_cached_tokens():
    usage = usage_info([Usage(3, 5, 1, 0), Usage(4, 6, 0, 2)])
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 11, 18)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 1


LOGPROBS = [TokenLogprobs((5, "ab", -0.5), ((5, "ab", -0.5), (6, "c", -1.5), (7, "d", -2.0))),
            TokenLogprobs((8, "xyz", -0.1), ((8, "xyz", -0.1), (9, "q", -3.0), (1, "r", -4.0)))]


def test_completion_logprobs_are_parallel_lists_with_offsets_across_chunks():
    writer = CompletionLogprobsWriter(top_n=2)
    first = writer.write(LOGPROBS[:1])
    second = writer.write(LOGPROBS[1:])
    assert (first.tokens, first.token_logprobs, first.text_offset) == (["ab"], [-0.5], [0])
    assert first.top_logprobs == [{"ab": -0.5, "c": -1.5}]
    assert (second.tokens, second.text_offset) == (["xyz"], [2])


def test_chat_logprobs_carry_bytes_and_top_alternatives():
    (first, second) = chat_logprobs(LOGPROBS, top_n=1).content or []
    assert (first.token, first.logprob, first.bytes) == ("ab", -0.5, [97, 98])
    assert [t.token for t in first.top_logprobs] == ["ab"] and len(second.top_logprobs) == 1


def test_openai_errors_carry_their_rejection_code():
    error = OpenAIError(429, "full", "rate_limit_error", code="rate_limit_exceeded",
                        grpc_code="RESOURCE_EXHAUSTED")
    assert error.body()["error"]["code"] == "rate_limit_exceeded" and error.grpc_code == "RESOURCE_EXHAUSTED"
