"""A snapshot of the scheduler's state for metrics, logs and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """Queue lengths (in requests), block usage, cumulative preemptions and KV utilization.

    `kv_utilization` is token slots holding tokens / token slots of allocated GPU blocks: the paper's
    measure of memory waste (96% for vLLM against 20-38% for contiguous reservation).
    """

    num_running: int
    num_waiting: int
    num_swapped: int
    num_running_seqs: int
    gpu_blocks_used: int
    gpu_blocks_total: int
    cpu_blocks_used: int
    cpu_blocks_total: int
    num_preemptions_swap: int
    num_preemptions_recompute: int
    kv_utilization: float
    num_finished: int
    kv_sharing_saved: float = 0.0       # 1 - GPU blocks used / block-table entries (copy-on-write sharing)
    prefix_cache_queried_tokens: int = 0    # prompt tokens looked up in the prefix cache, cumulative
    prefix_cache_hit_tokens: int = 0        # of which found cached (their K/V not computed again)

    @property
    def gpu_usage(self) -> float:
        """Fraction of GPU blocks in use."""
        return self.gpu_blocks_used / self.gpu_blocks_total if self.gpu_blocks_total else 0.0

    @property
    def cpu_usage(self) -> float:
        """Fraction of CPU swap blocks in use."""
        return self.cpu_blocks_used / self.cpu_blocks_total if self.cpu_blocks_total else 0.0
