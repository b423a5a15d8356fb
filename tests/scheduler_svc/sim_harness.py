"""A scheduler and the token-level simulated executor, stepped together by the scheduler tests."""

from __future__ import annotations

from collections import deque

from executor_svc.simulator import SimulatedExecutor
from pagedserve.contract.plan import StepPlan, StepResult
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.outputs import FinishedRequest, RequestOutput, collect
from scheduler_svc.scheduler import Scheduler

EOS = 2
VOCAB = 100


class Harness:
    """A scheduler and a simulated executor with matching pools, stepped together.

    With `async_scheduling` it steps like the engine does: the next plan is made ahead while one step
    is in flight, the executor runs each plan as it is sent, and results are processed in order.
    """

    def __init__(self, num_gpu_blocks: int = 64, num_cpu_blocks: int = 64, block_size: int = 4,
                 max_model_len: int = 256, eos_probability: float = 0.0, async_scheduling: bool = False,
                 **config: object) -> None:
        config.setdefault("max_num_batched_tokens", max(256, max_model_len))
        self.config = SchedulerConfig(block_size=block_size, max_model_len=None, **config)
        self.scheduler = Scheduler(self.config, num_gpu_blocks, num_cpu_blocks, max_model_len,
                                   eos_token_ids=[EOS], vocab_size=VOCAB, seed=7)
        self.executor = SimulatedExecutor(num_gpu_blocks, num_cpu_blocks, block_size, vocab_size=VOCAB,
                                          eos_token_id=EOS, eos_probability=eos_probability,
                                          poison_swapped_out=not self.config.enable_prefix_caching)
        self.async_scheduling = async_scheduling
        self.done: dict[str, FinishedRequest] = {}
        self.plans: list[StepPlan] = []
        self.planned_ahead = 0
        self._results: deque[StepResult] = deque()     # answers to the plans in flight, oldest first

    @property
    def idle(self) -> bool:
        """No request is live and no step is in flight."""
        return not self.scheduler.has_unfinished and not self.scheduler.num_steps_in_flight

    def step(self) -> tuple[StepPlan | None, list[RequestOutput]]:
        """One iteration: schedule (and, async, plan ahead), execute, process the oldest result.

        Integrity is checked after it. Returns the plan made by `schedule()` (None when a step was
        already in flight) and the reports.
        """
        scheduler = self.scheduler
        plan = None
        if not scheduler.num_steps_in_flight:
            plan = scheduler.schedule()
            if not plan.is_empty:
                self.send(plan)
        if self.async_scheduling:
            ahead = scheduler.schedule_ahead()
            if ahead is not None:
                self.planned_ahead += 1
                self.send(ahead)
        outputs = scheduler.pop_outputs()
        if self._results:
            outputs += scheduler.process_result(self._results.popleft())
        collect(outputs, self.done)
        scheduler.check_integrity()
        return plan, outputs

    def send(self, plan: StepPlan) -> None:
        """Hand a plan to the executor, which runs it at once; its result waits to be processed in order."""
        self.plans.append(plan)
        self._results.append(self.executor.execute(plan))

    def run(self, max_steps: int = 5000) -> dict[str, FinishedRequest]:
        """Step until every request has ended; fails if that takes more than `max_steps`."""
        for _ in range(max_steps):
            if self.idle:
                break
            self.step()
        assert self.idle, "requests still live after max_steps: a hang"
        bm = self.scheduler.block_manager
        assert bm.gpu.num_free == bm.gpu.num_blocks and bm.cpu.num_free == bm.cpu.num_blocks
        return self.done
