"""Fault isolation by request, with the real scheduler driving a model executor in-process on the embedded
model: a sequence whose own work fails after the forward pass (its sampling rows cannot be built, or the
sampler raises on them) ends only its request, with INTERNAL and a message naming it. The other sequences
of the step keep exactly their outputs, the failed request's blocks are free as soon as its result is
processed, and plans made ahead that feed its sample back are answered rather than refused."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import pytest

torch = pytest.importorskip("torch")

from executor_svc.config import ExecutorConfig  # noqa: E402
from executor_svc.model_backend import ModelBackend  # noqa: E402
from executor_svc.runner import ModelRunner  # noqa: E402
from executor_svc.sampler import PendingSamplerOutput, Sampler, SamplingRow  # noqa: E402
from pagedserve.contract.plan import StepPlan, StepResult  # noqa: E402
from pagedserve.contract.plan_codec import plan_from_proto, plan_to_proto, result_from_proto, result_to_proto  # noqa: E402
from pagedserve.default_model import default_model_dir  # noqa: E402
from pagedserve.errors import RequestErrorKind  # noqa: E402
from scheduler_svc.config import SchedulerConfig  # noqa: E402
from scheduler_svc.outputs import FinishedRequest, RequestOutput, collect  # noqa: E402
from scheduler_svc.sampling_params import SamplingParams  # noqa: E402
from scheduler_svc.scheduler import Scheduler  # noqa: E402

BLOCK = 16
VICTIM = "victim"
VICTIM_SEED = 4242
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def backend() -> Iterator[ModelBackend]:
    """The embedded model on the CPU, in float32, with a small KV pool."""
    model = ModelBackend(ExecutorConfig(model=default_model_dir(), device="cpu", dtype="float32",
                                        cpu_kv_cache_bytes=1 << 24))
    model.init_cache(BLOCK, 0.9, 0)
    yield model


def requests(victim: SamplingParams) -> dict[str, tuple[list[int], SamplingParams]]:
    """Five greedy requests and the victim, all admitted in the first step."""
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    made = {f"g{i}": ([10 + 7 * i + j for j in range(3 + i)], greedy) for i in range(5)}
    made[VICTIM] = ([20, 21, 22, 23], victim)
    return made


class Run:
    """A scheduler driving the backend to completion like the engine: with async scheduling a plan
    made ahead is sent before the result of the step in flight is processed. Plans and results cross
    the wire codec, as they do between processes."""

    def __init__(self, backend: ModelBackend, async_scheduling: bool,
                 made: dict[str, tuple[list[int], SamplingParams]]) -> None:
        backend.reset_sequences()
        describe = backend.describe()
        self.scheduler = Scheduler(SchedulerConfig(block_size=BLOCK, max_num_batched_tokens=1024), 64, 0,
                                   describe.max_model_len, eos_token_ids=describe.eos_token_ids,
                                   vocab_size=describe.vocab_size, seed=0)
        for request_id, (prompt, params) in made.items():
            self.scheduler.add_request(request_id, prompt, params)
        self.backend = backend
        self.async_scheduling = async_scheduling
        self.done: dict[str, FinishedRequest] = {}
        self.terminal: dict[str, RequestOutput] = {}
        self.ahead_fed_back = 0          # plans made ahead that fed back a sample of the victim
        self.victim_seq_ids = {s.seq_id for s in self.scheduler.groups[VICTIM].seqs}

    def execute(self, plan: StepPlan) -> StepResult:
        """One step on the executor, through the wire codec."""
        return result_from_proto(result_to_proto(self.backend.execute(plan_from_proto(plan_to_proto(plan)))))

    def take(self, outputs: list[RequestOutput]) -> None:
        """Fold reports in; the blocks in use are exactly the live requests' (the victim's are free as soon
        as the result that failed it is processed)."""
        collect(outputs, self.done)
        self.terminal.update({o.request_id: o for o in outputs if o.finished})
        self.scheduler.check_integrity()
        assert VICTIM not in self.terminal or VICTIM not in self.scheduler.groups

    def go(self) -> Run:
        """Run every request to its end."""
        in_flight: deque[StepResult] = deque()
        scheduler = self.scheduler
        while scheduler.has_unfinished or in_flight:
            if not in_flight:
                plan = scheduler.schedule()
                self.take(scheduler.pop_outputs())
                if plan.is_empty:
                    continue
                in_flight.append(self.execute(plan))
            ahead = scheduler.schedule_ahead() if self.async_scheduling else None
            if ahead is not None:
                self.ahead_fed_back += any(w.feeds_last_sample and w.seq_id in self.victim_seq_ids
                                           for w in ahead.sequences)
                in_flight.append(self.execute(ahead))
            self.take(scheduler.process_result(in_flight.popleft()))
        return self


def failing_sampler(monkeypatch: pytest.MonkeyPatch, fails: Callable[[SamplingRow], bool]) -> list[int]:
    """Make the sampler raise on any batch holding a row `fails` picks; returns the batch sizes it saw."""
    real = Sampler.launch
    sizes: list[int] = []

    def sampler(self: Sampler, logits: torch.Tensor, rows: list[SamplingRow]) -> PendingSamplerOutput:
        sizes.append(len(rows))
        if any(fails(r) for r in rows):
            raise RuntimeError("forced sampler failure")
        return real(self, logits, rows)

    monkeypatch.setattr(Sampler, "launch", sampler)     # every sampling call, batch or alone, launches
    return sizes


def assert_only_the_victim_failed(run: Run, reference: Run, reason: str) -> None:
    """The victim ended with INTERNAL naming it; every other request has its reference output."""
    victim = run.terminal[VICTIM]
    assert victim.error_kind is RequestErrorKind.INTERNAL
    assert f"request {VICTIM!r}" in victim.error and reason in victim.error
    for request_id, done in reference.done.items():
        if request_id != VICTIM:
            assert run.done[request_id].error is None
            assert run.done[request_id].token_ids == done.token_ids, request_id
    assert not run.scheduler.groups
    bm = run.scheduler.block_manager
    assert bm.gpu.num_free == bm.gpu.num_blocks


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("at_token", [0, 3])
def test_a_sequence_the_sampler_fails_on_ends_only_its_request(backend, monkeypatch, async_scheduling: bool,
                                                              at_token: int) -> None:
    made = requests(SamplingParams(temperature=0.8, seed=VICTIM_SEED, max_tokens=MAX_TOKENS, ignore_eos=True))
    reference = Run(backend, async_scheduling, made).go()
    assert all(d.error is None for d in reference.done.values())
    sizes = failing_sampler(monkeypatch, lambda r: r.seed == VICTIM_SEED and r.token_index == at_token)
    run = Run(backend, async_scheduling, made).go()
    assert_only_the_victim_failed(run, reference, "forced sampler failure")
    assert 6 in sizes and 1 in sizes                # the batch failed, then each sequence alone
    if async_scheduling and at_token:
        assert run.ahead_fed_back                   # a plan made ahead fed back the sample it never got


def test_a_parallel_sampling_request_ends_whole_when_one_of_its_sequences_fails(backend, monkeypatch) -> None:
    made = requests(SamplingParams(n=3, temperature=0.8, seed=VICTIM_SEED, max_tokens=MAX_TOKENS,
                                   ignore_eos=True))
    reference = Run(backend, True, made).go()
    failing_sampler(monkeypatch, lambda r: r.seed == VICTIM_SEED and r.stream == 1 and r.token_index == 2)
    run = Run(backend, True, made).go()
    assert_only_the_victim_failed(run, reference, "forced sampler failure")


def test_a_sequence_whose_sampling_rows_cannot_be_built_ends_only_its_request(backend, monkeypatch) -> None:
    made = requests(SamplingParams(temperature=0.8, seed=VICTIM_SEED, max_tokens=MAX_TOKENS, ignore_eos=True))
    reference = Run(backend, True, made).go()
    real = ModelRunner._sampling_row

    def row(state, sample: int, num_logprobs: int) -> SamplingRow:
        if state.start.request_id == VICTIM and len(state.token_ids) > len(made[VICTIM][0]) + 1:
            raise ValueError("forced bad row")
        return real(state, sample, num_logprobs)

    monkeypatch.setattr(ModelRunner, "_sampling_row", staticmethod(row))
    run = Run(backend, True, made).go()
    assert_only_the_victim_failed(run, reference, "bad sampling settings: ValueError('forced bad row')")


def test_a_forward_pass_failure_still_fails_the_whole_step(backend, monkeypatch) -> None:
    made = requests(SamplingParams(temperature=0.8, seed=VICTIM_SEED, max_tokens=MAX_TOKENS))
    run = Run(backend, False, made)
    plan = run.scheduler.schedule()

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("forced forward failure")

    monkeypatch.setattr(backend.runner.model, "compute_logits", broken)
    with pytest.raises(RuntimeError, match="forced forward failure"):
        backend.execute(plan)
