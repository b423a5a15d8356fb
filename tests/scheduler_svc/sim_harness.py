"""A scheduler and the token-level simulated executor, stepped together by the scheduler tests."""

from __future__ import annotations

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.outputs import RequestOutput
from scheduler_svc.plan import StepPlan
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.simulator import FinishedRequest, SimulatedExecutor, collect

EOS = 2
VOCAB = 100


class Harness:
    """A scheduler and a simulated executor with matching pools, stepped together."""

    def __init__(self, num_gpu_blocks: int = 64, num_cpu_blocks: int = 64, block_size: int = 4,
                 max_model_len: int = 256, eos_probability: float = 0.0, **config: object) -> None:
        config.setdefault("max_num_batched_tokens", max(256, max_model_len))
        self.config = SchedulerConfig(block_size=block_size, max_model_len=None, **config)
        self.scheduler = Scheduler(self.config, num_gpu_blocks, num_cpu_blocks, max_model_len,
                                   eos_token_ids=[EOS], vocab_size=VOCAB, seed=7)
        self.executor = SimulatedExecutor(num_gpu_blocks, num_cpu_blocks, block_size, vocab_size=VOCAB,
                                          eos_token_id=EOS, eos_probability=eos_probability)
        self.done: dict[str, FinishedRequest] = {}
        self.plans: list[StepPlan] = []

    def step(self) -> tuple[StepPlan, list[RequestOutput]]:
        """One iteration: schedule, execute, process; integrity is checked after it."""
        plan = self.scheduler.schedule()
        outputs = self.scheduler.pop_outputs()
        if not plan.is_empty:
            self.plans.append(plan)
            outputs += self.scheduler.process_result(self.executor.execute(plan))
        collect(outputs, self.done)
        self.scheduler.check_integrity()
        return plan, outputs

    def run(self, max_steps: int = 5000) -> dict[str, FinishedRequest]:
        """Step until every request has ended; fails if that takes more than `max_steps`."""
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished:
                break
            self.step()
        assert not self.scheduler.has_unfinished, "requests still live after max_steps: a hang"
        bm = self.scheduler.block_manager
        assert bm.gpu.num_free == bm.gpu.num_blocks and bm.cpu.num_free == bm.cpu.num_blocks
        return self.done
