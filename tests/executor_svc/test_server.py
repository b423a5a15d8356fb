"""The executor API over real gRPC with the simulated backend: handshake, steps, errors, health."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from executor_svc.simulator import SimulatedExecutor
from pagedserve.contract.plan_codec import (
    ExecutorStepError,
    plan_from_proto,
    plan_to_proto,
    result_from_proto,
    result_to_proto,
)
from pagedserve.v1 import executor_pb2 as pb
from pagedserve.v1 import executor_pb2_grpc
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.executor_client import ExecutorClient
from scheduler_svc.outputs import collect
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler

BLOCK = 4


def workload(scheduler: Scheduler) -> None:
    for i in range(12):
        params = [SamplingParams(max_tokens=20, seed=i), SamplingParams(n=2, max_tokens=15, seed=i),
                  SamplingParams(n=2, best_of=3, max_tokens=10, seed=i),
                  SamplingParams(beam_width=2, temperature=0.0, max_tokens=8, seed=i)][i % 4]
        scheduler.add_request(f"r{i}", [3 + (i * 7 + j) % 90 for j in range(5 + i)], params)


def drive(scheduler: Scheduler, step) -> dict:
    done = {}
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        outputs = scheduler.pop_outputs()
        if not plan.is_empty:
            outputs += scheduler.process_result(step(plan))
        collect(outputs, done)
        scheduler.check_integrity()
    return {k: (v.token_ids, v.finish_reasons) for k, v in done.items()}


def test_a_scheduler_drives_a_real_executor_process_to_the_same_outputs(start_executor):
    executor = start_executor("--backend", "simulated", "--simulated-kv-tokens", "160",
                              "--simulated-vocab-size", "100", "--max-model-len", "128")
    client = ExecutorClient(executor.address)
    client.wait_ready(10)
    described = client.describe()
    assert (described.architecture, described.vocab_size, list(described.eos_token_ids)) == (
        "SimulatedExecutor", 100, [2])
    cache = client.init_cache(BLOCK, 1.0, 64 * BLOCK * 8)
    assert (cache.num_gpu_blocks, cache.num_cpu_blocks) == (40, 64)

    def make_scheduler():
        s = Scheduler(SchedulerConfig(block_size=BLOCK, max_num_batched_tokens=128, watermark=0.0),
                      cache.num_gpu_blocks, cache.num_cpu_blocks, described.max_model_len,
                      eos_token_ids=described.eos_token_ids, vocab_size=described.vocab_size, seed=1)
        workload(s)
        return s

    remote_scheduler = make_scheduler()
    remote = drive(remote_scheduler, client.step)
    stats = remote_scheduler.stats()
    assert stats.num_preemptions_swap + stats.num_preemptions_recompute > 0     # the pool was tight
    local_executor = SimulatedExecutor(40, 64, BLOCK, vocab_size=100, eos_token_id=2)

    def local_step(plan):      # the same wire rounding (float32 logprobs) without the process
        local = local_executor.execute(plan_from_proto(plan_to_proto(plan)))
        return result_from_proto(result_to_proto(local))

    assert remote == drive(make_scheduler(), local_step)
    client.close()
    assert executor.stop() == 0                                     # SIGTERM shuts down cleanly


def test_a_malformed_plan_fails_its_step_and_the_stream_goes_on(start_executor):
    executor = start_executor("--backend", "simulated", "--simulated-kv-tokens", "64")
    client = ExecutorClient(executor.address)
    client.init_cache(BLOCK, 1.0, 0)
    scheduler = Scheduler(SchedulerConfig(block_size=BLOCK), 16, 0, 64, seed=0)
    scheduler.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3))
    plan = scheduler.schedule()
    broken = plan_from_proto(plan_to_proto(plan))
    broken.sequences[0].block_ids = [999]
    with pytest.raises(ExecutorStepError, match=r"malformed plan: .*out of range"):
        client.step(broken)
    result = client.step(plan)                                      # the executor kept serving
    assert [r.seq_id for r in result.sequences] == [plan.sequences[0].seq_id]
    client.close()


def test_handshake_errors_and_health(start_executor):
    executor = start_executor("--backend", "simulated")
    channel = grpc.insecure_channel(executor.address)
    stub = executor_pb2_grpc.ExecutorServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(
        service="pagedserve.v1.ExecutorService"), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        next(stub.Execute(iter([pb.StepPlan(step_id=1)]), timeout=10))
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "InitCache" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.InitCache(pb.InitCacheRequest(block_size=12, gpu_memory_utilization=0.9), timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "block_size" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.InitCache(pb.InitCacheRequest(block_size=16, gpu_memory_utilization=1.5), timeout=10)
    assert "gpu_memory_utilization" in err.value.details()
    stub.InitCache(pb.InitCacheRequest(block_size=16, gpu_memory_utilization=0.5), timeout=10)
    channel.close()


def test_one_scheduler_at_a_time(start_executor):
    executor = start_executor("--backend", "simulated")
    first = ExecutorClient(executor.address)
    first.init_cache(BLOCK, 1.0, 0)
    first.step(Scheduler(SchedulerConfig(block_size=BLOCK), 8, 0, 64).schedule())   # opens the stream
    second = ExecutorClient(executor.address)
    with pytest.raises(grpc.RpcError) as err:
        second.step(Scheduler(SchedulerConfig(block_size=BLOCK), 8, 0, 64).schedule())
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    first.close()
    second.close()
