"""What the executor server needs from whatever runs the plans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pagedserve.contract.plan import StepPlan, StepResult


@dataclass(frozen=True, slots=True)
class ModelDescription:
    """The loaded model shard, as `Describe` reports it."""

    model_name: str
    model_path: str
    architecture: str
    dtype: str
    device: str
    rank: int
    world_size: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_layers: int
    num_kv_heads: int
    head_size: int


@dataclass(frozen=True, slots=True)
class CacheDescription:
    """The KV cache a backend allocated, as `InitCache` reports it."""

    num_gpu_blocks: int
    num_cpu_blocks: int
    block_bytes: int
    profile_seconds: float


class ExecutorBackend(Protocol):
    """Runs plans against a KV cache. Calls come from one thread, one at a time.

    `execute` must check a plan whole before changing anything and raise MalformedPlanError when it
    is malformed, so that a rejected plan leaves the backend as it was.
    """

    def describe(self) -> ModelDescription:
        """The model shard."""
        ...

    def init_cache(self, block_size: int, gpu_memory_utilization: float, swap_space_bytes: int,
                   max_num_batched_tokens: int) -> CacheDescription:
        """Profile a step of `max_num_batched_tokens`, then size and allocate the KV cache.

        May be called again to resize; all sequences are dropped.
        """
        ...

    @property
    def cache_ready(self) -> bool:
        """Whether init_cache has run."""
        ...

    def reset_sequences(self) -> None:
        """Forget every sequence (a new scheduler session starts from nothing)."""
        ...

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one plan."""
        ...

    def begin_shutdown(self) -> None:
        """The process is stopping on purpose: whatever watches for failures may stand down."""
        ...
