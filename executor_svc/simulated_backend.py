"""The simulated executor behind the executor API: no model and no GPU.

It serves a notional model of `simulated_vocab_size` tokens whose KV cache holds token ids; its KV
capacity is `simulated_kv_tokens` GPU token slots, and its swap space holds one 8-byte slot per token.
"""

from __future__ import annotations

import time

from executor_svc.backend import CacheDescription, ModelDescription
from executor_svc.config import ExecutorConfig
from executor_svc.simulator import SimulatedExecutor
from pagedserve.contract.plan import StepPlan, StepResult

_SLOT_BYTES = 8


class SimulatedBackend:
    """ExecutorBackend over SimulatedExecutor."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self._executor: SimulatedExecutor | None = None

    def describe(self) -> ModelDescription:
        """A model description for the simulated model."""
        c = self.config
        return ModelDescription(model_name="simulated", model_path="", architecture="SimulatedExecutor",
                                dtype="int64", device="cpu", rank=c.rank, world_size=c.world_size,
                                max_model_len=c.max_model_len or 4096, vocab_size=c.simulated_vocab_size,
                                eos_token_ids=(c.simulated_eos_token_id,), num_layers=0, num_kv_heads=0,
                                head_size=0)

    def init_cache(self, block_size: int, gpu_memory_utilization: float, swap_space_bytes: int,
                   max_num_batched_tokens: int = 0) -> CacheDescription:
        """GPU blocks from simulated_kv_tokens scaled by the utilization; CPU blocks from swap bytes."""
        start = time.perf_counter()
        c = self.config
        block_bytes = block_size * _SLOT_BYTES
        num_gpu = int(c.simulated_kv_tokens * gpu_memory_utilization) // block_size
        num_cpu = swap_space_bytes // block_bytes
        # A swapped-out block keeps its contents, as on a GPU: the scheduler may be caching prefixes.
        self._executor = SimulatedExecutor(num_gpu, num_cpu, block_size, vocab_size=c.simulated_vocab_size,
                                           eos_token_id=c.simulated_eos_token_id, poison_swapped_out=False)
        return CacheDescription(num_gpu, num_cpu, block_bytes, time.perf_counter() - start)

    @property
    def cache_ready(self) -> bool:
        """Whether init_cache has run."""
        return self._executor is not None

    def reset_sequences(self) -> None:
        """Drop every sequence's state; the KV pools stay."""
        if self._executor is not None:
            self._executor.seqs.clear()

    def begin_shutdown(self) -> None:
        """Nothing to stand down."""

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one plan on the simulated KV pools."""
        assert self._executor is not None, "init_cache first"
        start = time.perf_counter()
        result = self._executor.execute(plan)
        return StepResult(result.step_id, result.sequences, forward_seconds=time.perf_counter() - start)
