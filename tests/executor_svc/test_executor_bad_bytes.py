"""Every bad byte gets INVALID_ARGUMENT: raw request bytes sent to a simulated executor process.

Bytes that do not decode get INVALID_ARGUMENT naming the method, on every RPC; in the Execute stream
the plans before a bad one are answered, the stream ends, and the executor takes a new one. The fuzz
test sends thousands of broken, mutated and extreme requests and plans and checks that each is
answered with OK or a documented code before its deadline, and that the executor then runs a
scheduler's workload to the same outputs as before. PAGEDSERVE_FUZZ_CASES and PAGEDSERVE_FUZZ_SEED run
it longer or elsewhere; a failure names the seed and the case.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import random
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from pagedserve.contract.plan_codec import plan_to_proto, result_from_proto
from pagedserve.v1 import executor_pb2 as pb
from pagedserve.v1 import executor_pb2_grpc
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.outputs import collect
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler
from tests.wire_fuzz import (
    CASES,
    CHECK,
    DEADLINE_S,
    REFLECTION,
    SEED,
    TRUNCATED,
    WATCH,
    FuzzCase,
    MessageFuzzer,
)

FLAGS = ("--backend", "simulated", "--simulated-kv-tokens", "640", "--simulated-vocab-size", "100",
         "--max-model-len", "128")
BLOCK = 4
SERVICE = "/pagedserve.v1.ExecutorService/"
DESCRIBE, INIT_CACHE, EXECUTE = SERVICE + "Describe", SERVICE + "InitCache", SERVICE + "Execute"
CODE = grpc.StatusCode
# The unary calls and reflection, while a scheduler's Execute stream is open: InitCache answers
# FAILED_PRECONDITION to a request that decodes and is otherwise valid.
ALLOWED = {DESCRIBE: {CODE.OK, CODE.INVALID_ARGUMENT},
           INIT_CACHE: {CODE.INVALID_ARGUMENT, CODE.FAILED_PRECONDITION},
           CHECK: {CODE.OK, CODE.INVALID_ARGUMENT, CODE.NOT_FOUND},
           WATCH: {CODE.OK, CODE.INVALID_ARGUMENT},
           REFLECTION: {CODE.OK, CODE.INVALID_ARGUMENT}}
MESSAGES = {DESCRIBE: pb.DescribeRequest, INIT_CACHE: pb.InitCacheRequest,
            CHECK: health_pb2.HealthCheckRequest, WATCH: health_pb2.HealthCheckRequest,
            REFLECTION: reflection_pb2.ServerReflectionRequest}


@pytest.fixture
def executor(start_executor) -> Iterator[tuple[str, collections.deque[str]]]:
    """A simulated executor with its KV cache initialised: its address, and the tail of its log."""
    process = start_executor(*FLAGS)
    # Every rejected plan is logged: keep reading its stderr, or the pipe fills and the executor blocks.
    log: collections.deque[str] = collections.deque(maxlen=200)
    threading.Thread(target=log.extend, args=(process.proc.stderr,), daemon=True).start()
    with grpc.insecure_channel(process.address) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        stub.InitCache(pb.InitCacheRequest(block_size=BLOCK, gpu_memory_utilization=1.0,
                                           swap_space_bytes=64 * BLOCK * 8), timeout=DEADLINE_S)
    yield process.address, log


def run_workload(address: str) -> dict:
    """Drive a small mixed workload through one Execute stream, which then ends cleanly; the outputs."""
    with grpc.insecure_channel(address) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        described = stub.Describe(pb.DescribeRequest(), timeout=DEADLINE_S)
        scheduler = Scheduler(SchedulerConfig(block_size=BLOCK, max_num_batched_tokens=128, watermark=0.0),
                              160, 64, described.max_model_len, eos_token_ids=described.eos_token_ids,
                              vocab_size=described.vocab_size, seed=1)
        for i, params in enumerate([SamplingParams(max_tokens=20, seed=1), SamplingParams(n=2, max_tokens=12),
                                    SamplingParams(beam_width=2, temperature=0.0, max_tokens=8)]):
            scheduler.add_request(f"r{i}", [3 + (i * 7 + j) % 90 for j in range(5 + 3 * i)], params)
        plans: queue.Queue[pb.StepPlan | None] = queue.Queue()
        results = stub.Execute(iter(plans.get, None), timeout=60)
        done: dict = {}
        while scheduler.has_unfinished:
            plan = scheduler.schedule()
            outputs = scheduler.pop_outputs()
            if not plan.is_empty:
                plans.put(plan_to_proto(plan))
                outputs += scheduler.process_result(result_from_proto(next(results)))
            collect(outputs, done)
        plans.put(None)
        assert list(results) == []              # ended by the executor once it saw the end of the plans
    return {k: (v.token_ids, v.finish_reasons) for k, v in done.items()}


async def unary(channel: grpc.aio.Channel, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    """Send `data` as the request of a unary method, Watch (its first answer) or reflection (one message)."""
    try:
        if method == WATCH:
            stream = channel.unary_stream(method)(data, timeout=DEADLINE_S)
            await stream.read()
            stream.cancel()
        elif method == REFLECTION:
            async for _ in channel.stream_stream(method)(iter([data]), timeout=DEADLINE_S):
                pass
        else:
            await channel.unary_unary(method)(data, timeout=DEADLINE_S)
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return CODE.OK, ""


async def execute(channel: grpc.aio.Channel, plans: list[bytes]) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """One Execute stream of `plans`, each sent once the previous one's result came (as the scheduler
    does): how the stream ended, and the results that came before.

    Lockstep also keeps clear of a grpc.aio client bug: a write racing the server's end of the call
    replaces the server's status with INTERNAL "Internal error from Core" (grpc/grpc#36066).
    """
    call = channel.stream_stream(EXECUTE)(timeout=DEADLINE_S)
    results: list[bytes] = []
    try:
        for plan in plans:
            await call.write(plan)
            results.append(await call.read())       # raises once the executor ended the stream
        await call.done_writing()
        extra = await call.read()
        if extra is not grpc.aio.EOF:
            results.append(extra)
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or "", results
    return await call.code(), await call.details(), results


@pytest.mark.parametrize("method", [DESCRIBE, INIT_CACHE, CHECK, WATCH])
def test_undecodable_bytes_get_invalid_argument(executor, method):
    async def run() -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(executor[0]) as channel:
            return await unary(channel, method, TRUNCATED)

    code, details = asyncio.run(run())
    assert code is CODE.INVALID_ARGUMENT, (code, details)
    assert details.startswith(f"{method}: cannot decode the request: Error parsing message"), details


def test_a_bad_plan_ends_its_stream_after_the_good_ones_and_a_new_stream_is_taken(executor):
    scheduler = Scheduler(SchedulerConfig(block_size=BLOCK), 16, 0, 64, seed=0)
    scheduler.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3))
    good = plan_to_proto(scheduler.schedule()).SerializeToString()
    with grpc.insecure_channel(executor[0]) as channel:       # the blocking client, as the scheduler's
        results = []
        with pytest.raises(grpc.RpcError) as err:
            for result in channel.stream_stream(EXECUTE)(iter([good, TRUNCATED, good]), timeout=DEADLINE_S):
                results.append(result)
        reflection = channel.stream_stream(REFLECTION)
        with pytest.raises(grpc.RpcError) as reflection_err:
            list(reflection(iter([TRUNCATED]), timeout=DEADLINE_S))
    assert err.value.code() is CODE.INVALID_ARGUMENT, err.value
    assert err.value.details().startswith(f"{EXECUTE}: cannot decode message 1 of the request stream: Error "
                                          "parsing message with type 'pagedserve.v1.StepPlan'"), err.value
    assert len(results) == 1 and not pb.StepResult.FromString(results[0]).error
    assert reflection_err.value.code() is CODE.INVALID_ARGUMENT
    assert reflection_err.value.details().startswith(f"{REFLECTION}: cannot decode message 0 of the request")
    outputs = run_workload(executor[0])                   # a new stream, from a new scheduler
    assert outputs == run_workload(executor[0])


def fuzz_unary_cases(rng: random.Random, count: int) -> list[tuple[str, FuzzCase]]:
    """`count` (method, case) pairs over the unary methods, Watch and reflection."""
    fuzzers = {method: MessageFuzzer(rng, message, max_repeated=2_000)
               for method, message in MESSAGES.items()}
    methods = rng.choices(list(MESSAGES), [20, 40, 15, 10, 15], k=count)
    return [(method, fuzzers[method].case()) for method in methods]


def fuzz_streams(rng: random.Random, count: int) -> list[list[FuzzCase]]:
    """Execute streams of one to five fuzzed plans, `count` plans in all."""
    fuzzer = MessageFuzzer(rng, pb.StepPlan, max_repeated=5_000)
    streams: list[list[FuzzCase]] = []
    while count > 0:
        size = min(count, rng.randrange(1, 6))
        streams.append([fuzzer.case() for _ in range(size)])
        count -= size
    return streams


def check_unary(method: str, case: FuzzCase, code: grpc.StatusCode, details: str) -> str | None:
    """What is wrong with the answer to a unary case, or None."""
    undecodable = details.startswith(f"{method}: cannot decode")
    if code not in ALLOWED[method]:
        return f"answered {code.name}: {details[:300]}"
    if case.decodes == undecodable or (undecodable and code is not CODE.INVALID_ARGUMENT):
        return f"decodes={case.decodes} but answered {code.name}: {details[:300]}"
    return None


def check_stream(plans: list[FuzzCase], code: grpc.StatusCode, details: str,
                 results: list[bytes]) -> str | None:
    """What is wrong with how a fuzzed Execute stream went, or None.

    Each plan that decodes is answered with one result of its step id (an error result when the plan
    is malformed); the first that does not decode ends the stream with INVALID_ARGUMENT.
    """
    first_bad = next((i for i, plan in enumerate(plans) if not plan.decodes), None)
    expected = len(plans) if first_bad is None else first_bad
    if first_bad is None and code is not CODE.OK:
        return f"answered {code.name}: {details[:300]}"
    if first_bad is not None and not (code is CODE.INVALID_ARGUMENT and details.startswith(
            f"{EXECUTE}: cannot decode message {first_bad} of the request stream")):
        return f"plan {first_bad} does not decode, but the stream ended {code.name}: {details[:300]}"
    if len(results) != expected:
        return f"{len(results)} results to {expected} plans that decode"
    steps = [pb.StepPlan.FromString(plan.data).step_id for plan in plans[:expected]]
    if [pb.StepResult.FromString(r).step_id for r in results] != steps:
        return "results out of order or of other steps"
    return None


def test_fuzzed_requests_and_plans_get_documented_codes_and_leave_the_executor_sound(executor):
    address, log = executor
    reference = run_workload(address)
    rng = random.Random(SEED)
    unary_cases = fuzz_unary_cases(rng, CASES * 2 // 5)
    streams = fuzz_streams(rng, CASES - len(unary_cases))
    failures: list[str] = []
    tally: collections.Counter[str] = collections.Counter()

    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            # A scheduler's stream stays open meanwhile, so an InitCache that decodes cannot resize the
            # cache (FAILED_PRECONDITION): the servers' sizes are the scheduler's business.
            holder = channel.stream_stream(EXECUTE)()
            await holder.write(pb.StepPlan(step_id=1).SerializeToString())
            await holder.read()
            limit = asyncio.Semaphore(16)

            async def one(index: int, method: str, case: FuzzCase) -> None:
                async with limit:
                    code, details = await unary(channel, method, case.data)
                tally[f"{method.rsplit('/', 1)[1]} {code.name}"] += 1
                problem = check_unary(method, case, code, details)
                if problem:
                    failures.append(f"seed {SEED} unary case {index} ({method}, {case.kind}, "
                                    f"{case.data[:40]!r}): {problem}")

            await asyncio.gather(*(one(i, m, c) for i, (m, c) in enumerate(unary_cases)))
            await holder.done_writing()
            assert await holder.code() is CODE.OK
            for index, plans in enumerate(streams):     # one scheduler at a time: one stream after another
                code, details, results = await execute(channel, [plan.data for plan in plans])
                tally[f"Execute {code.name}"] += 1
                tally["plans run"] += sum(not pb.StepResult.FromString(r).error for r in results)
                tally["plans refused"] += sum(bool(pb.StepResult.FromString(r).error) for r in results)
                problem = check_stream(plans, code, details, results)
                if problem:
                    failures.append(f"seed {SEED} stream {index} ({[p.kind for p in plans]}): {problem}")

    asyncio.run(run())
    print(f"{len(unary_cases)} requests and {len(streams)} Execute streams: {sorted(tally.items())}")
    assert not failures, (f"{len(failures)} wrong answers:\n" + "\n".join(failures[:20])
                          + "\nexecutor log:\n" + "".join(list(log)[-20:]))
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=DEADLINE_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert run_workload(address) == reference
    # Each kind of answer came up: plans run and refused, streams ended by a bad plan, InitCache
    # refused for its values and for the open stream.
    assert all(tally[kind] > 0 for kind in ("plans run", "plans refused", "Execute INVALID_ARGUMENT",
                                            "InitCache INVALID_ARGUMENT", "InitCache FAILED_PRECONDITION"))
