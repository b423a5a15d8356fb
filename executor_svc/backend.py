"""What the executor server needs from whatever runs the plans."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from executor_svc.step_pipeline import StepHandle
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

    A backend may also offer `launch(plan) -> StepHandle[StepResult]`, which checks the plan and queues
    its work without waiting for it, so that the next plan can be launched before this step's result is
    read (the model backend does; see `launcher_of`). Launches and finishes then go in step order.
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


# Starts one step and hands back what finishes it.
StepLauncher = Callable[[StepPlan], StepHandle[StepResult]]


@dataclass(frozen=True, slots=True)
class FinishedStep:
    """A step that ran to completion when it was launched."""

    result: StepResult

    def ready(self) -> bool:
        """Always: nothing is left to wait for."""
        return True

    def finish(self) -> StepResult:
        """The result."""
        return self.result


def launcher_of(backend: ExecutorBackend) -> StepLauncher:
    """The backend's own `launch` when it has one; otherwise each step runs whole (`execute`) on launch."""
    launch: StepLauncher | None = getattr(backend, "launch", None)
    if launch is not None:
        return launch
    return lambda plan: FinishedStep(backend.execute(plan))
