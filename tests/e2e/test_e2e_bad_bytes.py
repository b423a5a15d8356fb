"""Every bad byte gets INVALID_ARGUMENT: raw request bytes sent to a whole stack on loopback (the scheduler
and a simulated executor, as processes).

Bytes that do not decode get INVALID_ARGUMENT naming the method, on every RPC; the fuzz test sends
thousands of broken, mutated and extreme requests and checks that each is answered with OK or a
documented code before its deadline, and that the server then serves the same greedy completion as
before with every KV block free. PAGEDSERVE_FUZZ_CASES and PAGEDSERVE_FUZZ_SEED run it longer or
elsewhere; a failure names the seed and the case.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from e2e_stack import RunningStack, require_model
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from pagedserve.v1 import generation_pb2 as pb
from tests.wire_fuzz import (
    CASES,
    CHECK,
    DEADLINE_S,
    REFLECTION,
    SEED,
    TRUNCATED,
    WATCH,
    WIRE_I32,
    FuzzCase,
    MessageFuzzer,
    key,
    length_delimited,
    varint,
)

# The simulated executor is fast and needs no model; its vocabulary is the embedded tokenizer's.
VOCAB_SIZE = 4096
SIMULATED_STACK = ("--backend", "simulated", "--simulated-vocab-size", str(VOCAB_SIZE),
                   "--max-model-len", "96", "--simulated-kv-tokens", "8192", "--swap-space-bytes", str(2**20))
SERVICE = "/pagedserve.v1.GenerationService/"
GENERATE, ABORT, MODEL_INFO = SERVICE + "Generate", SERVICE + "Abort", SERVICE + "GetModelInfo"
CONCURRENCY = 16
PROMPT = "def parse(text):"
CODE = grpc.StatusCode
# What each method may answer: OK or a documented code, never UNKNOWN, INTERNAL or DEADLINE_EXCEEDED.
ALLOWED = {
    GENERATE: {CODE.OK, CODE.INVALID_ARGUMENT, CODE.RESOURCE_EXHAUSTED, CODE.UNAVAILABLE},
    ABORT: {CODE.OK, CODE.INVALID_ARGUMENT},
    MODEL_INFO: {CODE.OK, CODE.INVALID_ARGUMENT, CODE.UNAVAILABLE},
    CHECK: {CODE.OK, CODE.INVALID_ARGUMENT, CODE.NOT_FOUND},     # NOT_FOUND: a service health doesn't know
    WATCH: {CODE.OK, CODE.INVALID_ARGUMENT},
    REFLECTION: {CODE.OK, CODE.INVALID_ARGUMENT},
}
MESSAGES = {GENERATE: pb.GenerateRequest, ABORT: pb.AbortRequest, MODEL_INFO: pb.GetModelInfoRequest,
            CHECK: health_pb2.HealthCheckRequest, WATCH: health_pb2.HealthCheckRequest,
            REFLECTION: reflection_pb2.ServerReflectionRequest}
WEIGHTS = {GENERATE: 60, ABORT: 10, MODEL_INFO: 8, CHECK: 8, WATCH: 7, REFLECTION: 7}


@pytest.fixture(scope="module")
def simulated() -> Iterator[RunningStack]:
    """A stack on the simulated executor, shared by this module's tests."""
    require_model()                             # for its tokenizer
    running = RunningStack(*SIMULATED_STACK)
    yield running
    running.stop()


@dataclass(frozen=True, slots=True)
class Answer:
    """How a call ended: its status, its details and the response messages that came first."""

    code: grpc.StatusCode
    details: str
    responses: list[bytes]


async def call(channel: grpc.aio.Channel, method: str, data: bytes, metadata: tuple = ()) -> Answer:
    """Send `data` as the request of `method` (no serializer: the bytes go as they are) and wait for the end.

    Watch streams until cancelled: its first message (or error) is its answer. Reflection gets the
    bytes as the only message of its request stream.
    """
    responses: list[bytes] = []
    try:
        if method in (GENERATE, WATCH):
            stream = channel.unary_stream(method)(data, timeout=DEADLINE_S, metadata=metadata)
            async for response in stream:
                responses.append(response)
                if method == WATCH:
                    stream.cancel()
                    break
        elif method == REFLECTION:
            async for response in channel.stream_stream(method)(iter([data]), timeout=DEADLINE_S):
                responses.append(response)
        else:
            responses.append(await channel.unary_unary(method)(data, timeout=DEADLINE_S, metadata=metadata))
    except grpc.aio.AioRpcError as err:
        return Answer(err.code(), err.details() or "", responses)
    return Answer(CODE.OK, "", responses)


def check_answer(method: str, case: FuzzCase, answer: Answer) -> str | None:
    """What is wrong with `answer` to `case`, or None."""
    if answer.code not in ALLOWED[method]:
        return f"answered {answer.code.name}: {answer.details[:300]}"
    undecodable = answer.details.startswith(f"{method}: cannot decode")
    if case.decodes and undecodable:
        return f"bytes that decode were refused as undecodable: {answer.details[:300]}"
    if not case.decodes and not (answer.code is CODE.INVALID_ARGUMENT and undecodable):
        return f"bytes that do not decode answered {answer.code.name}: {answer.details[:300]}"
    return None


def expect_undecodable(answer: Answer, method: str) -> None:
    assert answer.code is CODE.INVALID_ARGUMENT, (answer.code, answer.details)
    assert answer.details.startswith(f"{method}: cannot decode the request: Error parsing message"), \
        answer.details


def greedy_token_ids(stack: RunningStack) -> tuple[int, ...]:
    """The greedy completion of PROMPT through the client library (seeded: the simulated executor's
    "model" draws every token from the context and the seed)."""
    with stack.client() as client:
        return client.generate(PROMPT, max_tokens=24, temperature=0.0, ignore_eos=True,
                               seed=SEED).outputs[0].token_ids


def wait_idle(stack: RunningStack, timeout: float = 20.0) -> None:
    """Wait until no request is queued or running and every GPU KV block is free."""
    samples = ("pagedserve_requests_running", "pagedserve_requests_waiting", "pagedserve_requests_swapped",
               "pagedserve_gpu_kv_usage_ratio", "pagedserve_cpu_kv_usage_ratio")
    deadline = time.monotonic() + timeout
    while True:
        values = {name: stack.metric(name) for name in samples}
        if not any(values.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the stack did not go idle: {values}")
        time.sleep(0.05)


@pytest.mark.parametrize("method", list(ALLOWED))
def test_undecodable_bytes_get_invalid_argument(simulated, method):
    async def run() -> Answer:
        async with grpc.aio.insecure_channel(simulated.target) as channel:
            return await call(channel, method, TRUNCATED)

    rejected = 'pagedserve_requests_rejected_total{code="INVALID_ARGUMENT"}'
    before = simulated.metric(rejected)
    answer = asyncio.run(run())
    if method == REFLECTION:                    # a message of a stream, not "the request"
        assert answer.code is CODE.INVALID_ARGUMENT
        assert answer.details.startswith(f"{method}: cannot decode message 0 of the request stream: Error")
    else:
        expect_undecodable(answer, method)
    # Counted as a rejected request on the GenerationService only.
    assert simulated.metric(rejected) - before == (1 if method.startswith(SERVICE) else 0)


def test_a_valid_request_with_unknown_fields_is_served_as_without_them(simulated):
    request = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParameters(
        max_tokens=24, temperature=0.0, ignore_eos=True, seed=SEED)).SerializeToString()
    # Fields 900 and 901 are not in the schema; proto3 keeps them and the server ignores them.
    extended = request + key(900, 0) + varint(2**64 - 1) + length_delimited(901, "ünknown".encode())
    # `ignore_eos` (field 16 of `sampling`) sent as a fixed32: protobuf keeps it as an unknown field
    # too, so the request decodes and runs with ignore_eos unset.
    plain = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParameters(
        max_tokens=24, temperature=0.0, seed=SEED)).SerializeToString()
    mismatched = plain + length_delimited(4, key(16, WIRE_I32) + b"\1\0\0\0")

    async def run() -> list[Answer]:
        async with grpc.aio.insecure_channel(simulated.target) as channel:
            return [await call(channel, GENERATE, data) for data in (extended, mismatched, plain)]

    answers = asyncio.run(run())
    assert [a.code for a in answers] == [CODE.OK] * 3
    extended_ids, mismatched_ids, plain_ids = map(token_ids, answers)
    assert extended_ids == greedy_token_ids(simulated)
    assert mismatched_ids == plain_ids


def token_ids(answer: Answer) -> tuple[int, ...]:
    """The token ids of a Generate stream's responses (one output)."""
    return tuple(t for r in answer.responses for c in pb.GenerateResponse.FromString(r).choices
                 for t in c.token_ids)


def test_an_unauthenticated_call_is_refused_as_such_whatever_its_bytes(start_stack):
    stack = start_stack(*SIMULATED_STACK, "--auth-token", "s3cret")
    token = (("authorization", "Bearer s3cret"),)

    async def run() -> list[Answer]:
        async with grpc.aio.insecure_channel(stack.target) as channel:
            return [await call(channel, GENERATE, TRUNCATED), await call(channel, GENERATE, TRUNCATED, token),
                    await call(channel, ABORT, pb.AbortRequest(request_id="x").SerializeToString()),
                    await call(channel, CHECK, TRUNCATED)]       # health needs no token

    no_token, with_token, valid_no_token, health = asyncio.run(run())
    assert no_token.code is CODE.UNAUTHENTICATED and valid_no_token.code is CODE.UNAUTHENTICATED
    expect_undecodable(with_token, GENERATE)
    expect_undecodable(health, CHECK)
    assert stack.metric('pagedserve_requests_rejected_total{code="UNAUTHENTICATED"}') == 2
    assert stack.metric('pagedserve_requests_rejected_total{code="INVALID_ARGUMENT"}') == 1


def tune_generate(message: pb.GenerateRequest, rng: random.Random) -> None:
    """Make every other request one that may run: a short prompt of known tokens, max_tokens below 48.

    Left as drawn, nearly every request has a prompt the server refuses (none, too long, or token ids
    outside the vocabulary) and never reaches the engine.
    """
    if rng.random() < 0.5:
        return
    if message.WhichOneof("prompt") == "text" and message.text:
        message.text = message.text[:200]
    else:
        ids = [t % VOCAB_SIZE for t in message.token_ids.ids[:32]] or [rng.randrange(VOCAB_SIZE)]
        message.token_ids.ClearField("ids")
        message.token_ids.ids.extend(ids)
    if message.sampling.HasField("max_tokens") and message.sampling.max_tokens > 48:
        message.sampling.max_tokens = rng.randrange(1, 48)


def fuzz_cases(rng: random.Random, count: int) -> list[tuple[str, FuzzCase]]:
    """`count` (method, case) pairs, methods drawn by WEIGHTS."""
    fuzzers: dict[str, MessageFuzzer] = {
        method: MessageFuzzer(rng, message, max_repeated=100_000 if method == GENERATE else 2_000,
                              tune=tune_generate if method == GENERATE else None)
        for method, message in MESSAGES.items()}
    methods = rng.choices(list(WEIGHTS), list(WEIGHTS.values()), k=count)
    return [(method, fuzzers[method].case()) for method in methods]


async def send_all(target: str, cases: list[tuple[str, FuzzCase]],
                   checked: Callable[[int, str, FuzzCase, Answer], None]) -> None:
    """Send every case, CONCURRENCY at a time, and hand each answer to `checked`."""
    limit = asyncio.Semaphore(CONCURRENCY)
    options = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        async def one(index: int, method: str, case: FuzzCase) -> None:
            async with limit:
                checked(index, method, case, await call(channel, method, case.data))

        await asyncio.gather(*(one(i, method, case) for i, (method, case) in enumerate(cases)))


def test_fuzzed_requests_get_documented_codes_and_leave_the_server_sound(simulated):
    reference = greedy_token_ids(simulated)
    cases = fuzz_cases(random.Random(SEED), CASES)
    failures: list[str] = []
    codes: dict[tuple[str, str], int] = {}

    def checked(index: int, method: str, case: FuzzCase, answer: Answer) -> None:
        label = (method.rsplit("/", 1)[1], answer.code.name)
        codes[label] = codes.get(label, 0) + 1
        problem = check_answer(method, case, answer)
        if problem is not None:
            failures.append(f"seed {SEED} case {index} ({method}, {case.kind}, {len(case.data)} bytes "
                            f"{case.data[:40]!r}): {problem}")

    started = time.monotonic()
    asyncio.run(send_all(simulated.target, cases, checked))
    elapsed = time.monotonic() - started
    assert not failures, f"{len(failures)} of {len(cases)} answers were wrong:\n" + "\n".join(failures[:20])
    print(f"{len(cases)} cases in {elapsed:.1f} s: {sorted(codes.items())}")
    # Some decodable requests ran to the end, and some bytes did not decode, on each method.
    assert codes.get(("Generate", "OK"), 0) >= CASES // 100
    assert all(codes.get((m.rsplit("/", 1)[1], "INVALID_ARGUMENT"), 0) > 0 for m in ALLOWED)
    wait_idle(simulated)
    assert greedy_token_ids(simulated) == reference
    wait_idle(simulated)
