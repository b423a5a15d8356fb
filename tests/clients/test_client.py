"""The client library without a server: response conversion, aggregation, and gRPC error mapping."""

import asyncio
import dataclasses
import socket

import grpc
import pytest

from clients.client import (
    AsyncPagedServeClient,
    ChoiceDelta,
    CompletionBuilder,
    LogprobCandidate,
    ModelInfo,
    PagedServeClient,
    PagedServeError,
    TokenLogprobs,
    Usage,
    event_from_proto,
    model_info_from_proto,
)
from pagedserve.v1 import generation_pb2 as pb


def nothing_listening() -> str:
    """host:port of a loopback port that was free a moment ago: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def logprobs(token_id: int, text: str, logprob: float) -> pb.TokenLogprobs:
    candidate = pb.LogprobCandidate(token_id=token_id, text=text, logprob=logprob)
    other = pb.LogprobCandidate(token_id=token_id + 1, text=text + "?", logprob=logprob - 1)
    return pb.TokenLogprobs(chosen=candidate, top_logprobs=[candidate, other])


def expected_logprobs(token_id: int, text: str, logprob: float) -> TokenLogprobs:
    chosen = LogprobCandidate(token_id, text, logprob)
    return TokenLogprobs(chosen, (chosen, LogprobCandidate(token_id + 1, text + "?", logprob - 1)))


def chunk(index: int, text: str, token_id: int, logprob: float, **end: object) -> pb.CompletionChunk:
    return pb.CompletionChunk(index=index, text=text, token_ids=[token_id],
                              logprobs=[logprobs(token_id, text, logprob)], **end)


def test_a_running_chunk_has_no_end_fields():
    event = event_from_proto(pb.GenerateResponse(request_id="r1", choices=[chunk(0, "He", 5, -0.5)]))
    assert event.request_id == "r1" and event.usage is None
    assert event.choices == (ChoiceDelta(index=0, text="He", token_ids=(5,),
                                         logprobs=(expected_logprobs(5, "He", -0.5),), finish_reason=None,
                                         stop_reason=None, stop_token_id=None, cumulative_logprob=None),)


def test_a_final_message_carries_finish_reason_stop_details_and_usage():
    response = pb.GenerateResponse(
        request_id="r2",
        choices=[pb.CompletionChunk(index=1, text="", token_ids=[2], finish_reason=pb.FINISH_REASON_STOP,
                                    stop_reason="</s>", stop_token_id=2, cumulative_logprob=-3.25)],
        usage=pb.Usage(prompt_tokens=7, completion_tokens=9, cached_prompt_tokens=4, num_preemptions=1))
    event = event_from_proto(response)
    (choice,) = event.choices
    assert (choice.index, choice.token_ids, choice.logprobs) == (1, (2,), ())
    assert (choice.finish_reason, choice.stop_reason, choice.stop_token_id) == ("stop", "</s>", 2)
    assert choice.cumulative_logprob == -3.25
    assert event.usage == Usage(prompt_tokens=7, completion_tokens=9, cached_prompt_tokens=4,
                                num_preemptions=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.text = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(("reason", "name"), [(pb.FINISH_REASON_LENGTH, "length"),
                                              (pb.FINISH_REASON_STOP, "stop"), (pb.FINISH_REASON_EOS, "eos"),
                                              (pb.FINISH_REASON_ABORTED, "aborted")])
def test_finish_reasons_read_as_short_names(reason, name):
    response = pb.GenerateResponse(choices=[pb.CompletionChunk(finish_reason=reason, stop_reason="x")])
    (choice,) = event_from_proto(response).choices
    assert choice.finish_reason == name
    # stop_reason only means something with "stop".
    assert choice.stop_reason == ("x" if name == "stop" else None)
    assert choice.cumulative_logprob == 0.0


def test_dataclass_copies_have_every_proto_field():
    copies = [(ModelInfo, pb.ModelInfo), (Usage, pb.Usage), (LogprobCandidate, pb.LogprobCandidate)]
    for cls, message in copies:
        assert [f.name for f in dataclasses.fields(cls)] == [f.name for f in message.DESCRIPTOR.fields], cls


def test_model_info_copy():
    info = model_info_from_proto(pb.ModelInfo(
        model_name="tiny-llama", max_model_len=2048, block_size=16, kv_capacity_tokens=2**33,
        num_gpu_blocks=2**29, num_cpu_blocks=512, vocab_size=32000, eos_token_ids=[2, 32000], world_size=2))
    assert info == ModelInfo(model_name="tiny-llama", max_model_len=2048, block_size=16,
                             kv_capacity_tokens=2**33, num_gpu_blocks=2**29, num_cpu_blocks=512,
                             vocab_size=32000, eos_token_ids=(2, 32000), world_size=2)


def test_events_aggregate_into_a_completion_per_output_index():
    responses = [
        pb.GenerateResponse(request_id="r3",
                            choices=[chunk(0, "Hel", 10, -0.25), chunk(1, "Good", 20, -1.0)]),
        pb.GenerateResponse(request_id="r3", choices=[
            chunk(1, "bye", 21, -0.5, finish_reason=pb.FINISH_REASON_STOP, stop_reason="\n",
                  cumulative_logprob=-1.5)]),
        pb.GenerateResponse(request_id="r3", choices=[chunk(0, "lo", 11, -0.75)]),
        pb.GenerateResponse(request_id="r3", choices=[
            chunk(0, "!", 12, -0.5, finish_reason=pb.FINISH_REASON_LENGTH, cumulative_logprob=-1.5)],
            usage=pb.Usage(prompt_tokens=3, completion_tokens=5)),
    ]
    builder = CompletionBuilder()
    finished = [builder.add(event_from_proto(response)) for response in responses]
    assert finished == [[], [1], [], [0]]
    completion = builder.completion()
    assert completion.request_id == "r3"
    assert completion.usage == Usage(prompt_tokens=3, completion_tokens=5, cached_prompt_tokens=0,
                                     num_preemptions=0)
    first, second = completion.outputs
    assert (first.index, first.text, first.token_ids) == (0, "Hello!", (10, 11, 12))
    assert first.logprobs == (expected_logprobs(10, "Hel", -0.25), expected_logprobs(11, "lo", -0.75),
                              expected_logprobs(12, "!", -0.5))
    assert (first.finish_reason, first.stop_reason, first.cumulative_logprob) == ("length", None, -1.5)
    assert (second.index, second.text, second.token_ids) == (1, "Goodbye", (20, 21))
    assert [lp.chosen.token_id for lp in second.logprobs] == [20, 21]
    assert (second.finish_reason, second.stop_reason, second.stop_token_id) == ("stop", "\n", None)
    assert completion.text == "Hello!"


def test_an_output_still_running_has_no_finish_reason():
    builder = CompletionBuilder()
    builder.add(event_from_proto(pb.GenerateResponse(choices=[chunk(0, "a", 1, -0.5)])))
    output = builder.output(0)
    assert (output.text, output.finish_reason, output.cumulative_logprob) == ("a", None, None)


def test_unknown_sampling_names_fail_before_any_call():
    with PagedServeClient(nothing_listening()) as client, pytest.raises(TypeError, match="'max_new_tokens'"):
        client.stream("Hi", max_new_tokens=4)


def test_sync_calls_to_nothing_raise_unavailable():
    with PagedServeClient(nothing_listening(), token="secret", timeout=5) as client:
        calls = [lambda: client.generate("Hi", max_tokens=2), lambda: next(client.stream([1, 2])),
                 client.model_info, lambda: client.abort("r"), client.health]
        for call in calls:
            with pytest.raises(PagedServeError) as raised:
                call()
            assert raised.value.code == grpc.StatusCode.UNAVAILABLE
            assert str(raised.value).startswith("UNAVAILABLE: ") and raised.value.message


def test_wait_until_serving_gives_up_with_deadline_exceeded():
    with PagedServeClient(nothing_listening()) as client, pytest.raises(PagedServeError) as raised:
        client.wait_until_serving(0.5)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "last answer: UNAVAILABLE" in raised.value.message


def test_async_calls_to_nothing_raise_unavailable():
    async def codes() -> list[grpc.StatusCode]:
        async with AsyncPagedServeClient(nothing_listening(), timeout=5) as client:
            calls = [lambda: client.generate("Hi"), client.model_info, lambda: client.abort("r"),
                     client.health]
            found = []
            for call in calls:
                try:
                    await call()
                except PagedServeError as err:
                    found.append(err.code)
            try:
                async for _ in client.stream("Hi"):
                    pass
            except PagedServeError as err:
                found.append(err.code)
            try:
                await client.wait_until_serving(0.3)
            except PagedServeError as err:
                found.append(err.code)
            return found

    assert asyncio.run(codes()) == [grpc.StatusCode.UNAVAILABLE] * 5 + [grpc.StatusCode.DEADLINE_EXCEEDED]
