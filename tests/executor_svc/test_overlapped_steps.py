"""Steps launched before the step ahead of them has finished give exactly the results of steps run one by
one: the real scheduler plans ahead as the engine does, and the model runner (the embedded model on the
CPU) launches each plan as soon as it is made, so a plan that feeds back a sample takes it from the
previous step's token tensor while that step is unfinished. Every step's samples, logprobs and top
logprobs, and every request's output, must match the runs with one step at a time, across greedy,
seeded, filtered, penalised and suppressed sampling, parallel sampling, preemption and sequence
failures."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

torch = pytest.importorskip("torch")

from executor_svc.backend import FinishedStep  # noqa: E402
from executor_svc.config import ExecutorConfig  # noqa: E402
from executor_svc.model_backend import ModelBackend  # noqa: E402
from executor_svc.runner import ModelRunner  # noqa: E402
from executor_svc.step_pipeline import StepHandle  # noqa: E402
from pagedserve.contract.plan import StepPlan, StepResult  # noqa: E402
from pagedserve.default_model import default_model_dir  # noqa: E402
from scheduler_svc.config import PreemptionPolicy, SchedulerConfig  # noqa: E402
from scheduler_svc.outputs import FinishedRequest, collect  # noqa: E402
from scheduler_svc.sampling_params import SamplingParams  # noqa: E402
from scheduler_svc.scheduler import Scheduler  # noqa: E402

BLOCK = 16


ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module", params=[
    ("cpu", "float32"),
    # On a GPU the samples fed back really are read from the device while the step before computes;
    # in bfloat16 the decode steps replay CUDA graphs, whose static inputs take them.
    pytest.param(("cuda", "float32"), marks=ON_GPU),
    pytest.param(("cuda", "bfloat16"), marks=ON_GPU),
], ids=lambda p: "-".join(p))
def backend(request: pytest.FixtureRequest) -> ModelBackend:
    """The embedded model with a small KV pool."""
    device, dtype = request.param
    model = ModelBackend(ExecutorConfig(model=default_model_dir(), device=device, dtype=dtype,
                                        cpu_kv_cache_bytes=1 << 24, cuda_graph_max_batch=16))
    model.init_cache(BLOCK, 0.2, 1 << 24)
    return model


def mixed_requests() -> dict[str, tuple[list[int], SamplingParams]]:
    """Requests exercising every sampling setting a row carries to the executor."""
    settings = {
        "greedy": SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        "seeded": SamplingParams(temperature=0.9, seed=11, max_tokens=14, ignore_eos=True),
        "filtered": SamplingParams(temperature=0.8, seed=12, top_k=20, top_p=0.9, min_p=0.02, max_tokens=10,
                                   ignore_eos=True),
        "penalised": SamplingParams(temperature=0.7, seed=13, repetition_penalty=1.3, presence_penalty=0.4,
                                    frequency_penalty=0.3, max_tokens=16, ignore_eos=True),
        "logprobs": SamplingParams(temperature=1.0, seed=14, logprobs=3, max_tokens=9, ignore_eos=True),
        "min_tokens": SamplingParams(temperature=1.0, seed=15, min_tokens=6, max_tokens=12),
        "parallel": SamplingParams(n=2, temperature=0.9, seed=16, max_tokens=8, ignore_eos=True),
        "unseeded_greedy_late": SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
    }
    return {name: ([5 + 3 * i + j for j in range(4 + 5 * i)], params)
            for i, (name, params) in enumerate(settings.items())}


@dataclass
class Served:
    """One run: every request's output and every step's result, in step order."""

    done: dict[str, FinishedRequest] = field(default_factory=dict)
    results: list[StepResult] = field(default_factory=list)
    overlapped: int = 0             # steps launched while the step before was unfinished
    preemptions: int = 0


def serve(backend: ModelBackend, made: dict[str, tuple[list[int], SamplingParams]], overlap: bool,
          num_gpu_blocks: int = 256, **config: object) -> Served:
    """The scheduler plans ahead as the engine does; each plan is launched as soon as it is made (with
    `overlap`), or run whole (without), and results are processed in order."""
    backend.reset_sequences()
    runner = backend.runner
    assert runner is not None
    describe = backend.describe()
    scheduler = Scheduler(SchedulerConfig(block_size=BLOCK, max_num_batched_tokens=1024, **config),
                          num_gpu_blocks, 64, describe.max_model_len, eos_token_ids=describe.eos_token_ids,
                          vocab_size=describe.vocab_size, seed=0)
    for request_id, (prompt, params) in made.items():
        scheduler.add_request(request_id, prompt, params)
    served = Served()
    in_flight: deque[StepHandle[StepResult]] = deque()

    def launch(plan: StepPlan) -> None:
        if overlap:
            in_flight.append(backend.launch(plan))
            served.overlapped += runner.steps_in_flight == 2
        else:
            in_flight.append(FinishedStep(backend.execute(plan)))

    while scheduler.has_unfinished or in_flight:
        if not in_flight:
            plan = scheduler.schedule()
            collect(scheduler.pop_outputs(), served.done)
            if plan.is_empty:
                continue
            launch(plan)
        ahead = scheduler.schedule_ahead()
        if ahead is not None:
            launch(ahead)
        result = in_flight.popleft().finish()
        served.results.append(result)
        collect(scheduler.process_result(result), served.done)
        scheduler.check_integrity()
    stats = scheduler.stats()
    served.preemptions = stats.num_preemptions_swap + stats.num_preemptions_recompute
    return served


def assert_same(overlapped: Served, one_by_one: Served) -> None:
    """Identical step results (ids, samples, logprobs, top logprobs, sequence errors) and request outputs."""
    def samples(results: list[StepResult]) -> list[object]:
        return [(r.step_id, r.sequences) for r in results]

    assert samples(overlapped.results) == samples(one_by_one.results)
    assert overlapped.done == one_by_one.done


def test_overlapped_steps_give_the_results_of_steps_run_one_by_one(backend) -> None:
    made = mixed_requests()
    one_by_one = serve(backend, made, overlap=False)
    overlapped = serve(backend, made, overlap=True)
    assert_same(overlapped, one_by_one)
    assert all(d.error is None and d.finished for d in overlapped.done.values())
    # Most steps really were launched behind an unfinished one (forks and the first step were not).
    steps = len(overlapped.results)
    assert overlapped.overlapped >= steps // 2, (overlapped.overlapped, steps)


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_overlap_through_preemption(backend, preemption_mode: str) -> None:
    made = {f"r{i}": ([7 + i + j for j in range(30 + 9 * i)],
                      SamplingParams(temperature=0.8, seed=100 + i, max_tokens=40, ignore_eos=True,
                                     repetition_penalty=1.1))
            for i in range(6)}
    policy = PreemptionPolicy(preemption_mode)
    one_by_one = serve(backend, made, overlap=False, num_gpu_blocks=18, preemption_mode=policy)
    overlapped = serve(backend, made, overlap=True, num_gpu_blocks=18, preemption_mode=policy)
    assert one_by_one.preemptions > 0, "the pool must be small enough to preempt"
    assert_same(overlapped, one_by_one)
    assert overlapped.overlapped > 0


def test_a_sequence_failing_as_its_next_step_is_launched_ends_only_its_request(backend, monkeypatch) -> None:
    """The victim's rows fail in a step whose successor is already planned to feed its sample back: that
    successor skips the victim's work and answers its error; every other request is unchanged."""
    made = mixed_requests()
    reference = serve(backend, made, overlap=False)
    real: Callable = ModelRunner._sampling_row

    def row(state, sample: int, num_logprobs: int):
        if state.start.request_id == "seeded" and len(state.token_ids) > len(made["seeded"][0]) + 3:
            raise ValueError("forced bad row")
        return real(state, sample, num_logprobs)

    monkeypatch.setattr(ModelRunner, "_sampling_row", staticmethod(row))
    one_by_one = serve(backend, made, overlap=False)
    overlapped = serve(backend, made, overlap=True)
    assert_same(overlapped, one_by_one)
    assert "forced bad row" in (overlapped.done["seeded"].error or "")
    for request_id, done in reference.done.items():
        if request_id != "seeded":
            assert overlapped.done[request_id] == done, request_id
