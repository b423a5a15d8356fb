"""On the CPU the KV cache is the fixed `cpu_kv_cache_bytes` budget, sized without a profiling pass."""

from __future__ import annotations

import pytest

from executor_svc.config import ExecutorConfig
from executor_svc.model_backend import ModelBackend
from pagedserve.default_model import default_model_dir


def test_the_cpu_cache_is_sized_without_a_worst_case_profiling_pass(monkeypatch):
    """The pass sized nothing on the CPU and was a third of `pagedserve serve`'s time to first token."""
    budget = 2**24
    backend = ModelBackend(ExecutorConfig(model=default_model_dir(), device="cpu", dtype="float32",
                                          cpu_kv_cache_bytes=budget))
    monkeypatch.setattr(ModelBackend, "_profile_step",
                        lambda *args: pytest.fail("a profiling pass ran on the CPU"))
    cache = backend.init_cache(block_size=16, gpu_memory_utilization=0.9, swap_space_bytes=budget,
                               max_num_batched_tokens=8448)
    assert cache.num_gpu_blocks == budget // cache.block_bytes
    assert cache.num_cpu_blocks == budget // cache.block_bytes
    assert backend.cache_ready
