"""The CUDA kernel switches: read from PAGEDSERVE_CUDA_KERNELS / _FUSED_LAYERS / _KERNEL_CACHE as the
executor's config reads them, and fixed once by `pagedserve-executor` at start (in-process users keep
following the environment)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from executor_svc import ops  # noqa: E402
from executor_svc.__main__ import configure_kernels  # noqa: E402
from executor_svc.config import ExecutorConfig  # noqa: E402

VARIABLES = ("PAGEDSERVE_CUDA_KERNELS", "PAGEDSERVE_FUSED_LAYERS", "PAGEDSERVE_KERNEL_CACHE")


@pytest.fixture(autouse=True)
def unconfigured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a process that was never configured, with none of the variables set."""
    monkeypatch.setattr(ops, "_configured", None)
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_on_with_the_home_cache() -> None:
    assert ops.settings() == ops.KernelSettings(True, True, "")
    assert ops.build_directory() == Path.home() / ".cache" / "pagedserve" / "kernels"


@pytest.mark.parametrize(("value", "on"), [("0", False), ("false", False), ("off", False), ("1", True),
                                           ("true", True)])
def test_the_environment_is_parsed_as_the_config_parses_it(monkeypatch, value, on) -> None:
    monkeypatch.setenv("PAGEDSERVE_CUDA_KERNELS", value)
    monkeypatch.setenv("PAGEDSERVE_FUSED_LAYERS", value)
    assert ops.settings() == ops.KernelSettings(on, on, "")
    config = ExecutorConfig.from_sources(None, {"PAGEDSERVE_CUDA_KERNELS": value})
    assert config.cuda_kernels is on


def test_in_process_users_follow_the_environment_at_each_call(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(tmp_path))
    assert ops.build_directory() == tmp_path
    monkeypatch.setenv("PAGEDSERVE_CUDA_KERNELS", "0")
    assert not ops.kernels_enabled()
    assert ops.describe_attention(torch.device("cuda")) == (
        "torch reference PagedAttention (PAGEDSERVE_CUDA_KERNELS=0)")


def test_the_executor_fixes_its_config_once_for_the_process(monkeypatch, tmp_path) -> None:
    config = ExecutorConfig(cuda_kernels=False, fused_layers=False, kernel_cache=str(tmp_path))
    configure_kernels(config)
    monkeypatch.setenv("PAGEDSERVE_CUDA_KERNELS", "1")           # read no more once configured
    assert ops.settings() == ops.KernelSettings(False, False, str(tmp_path))
    assert ops.build_directory() == tmp_path
    assert not ops.kernels_enabled()
    assert not ops.fused_layers_enabled(torch.zeros(1, dtype=torch.float16))


def test_the_simulated_backend_leaves_the_kernels_alone() -> None:
    configure_kernels(ExecutorConfig(backend="simulated", cuda_kernels=False))
    assert ops._configured is None
