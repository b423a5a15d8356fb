"""executor_svc.build_kernels, without nvcc: it gives torch's extension loader exactly the arguments
executor_svc.ops gives it (so the image's prebuilt cache is the one ops finds), and it says clearly which
prerequisite is missing. The real compile is exercised by the image build and by the nvcc test of csrc/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from executor_svc import build_kernels, ops  # noqa: E402  (both import torch)


@pytest.fixture
def recorded_load(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace torch's extension loader with a recorder of its keyword arguments."""
    from torch.utils import cpp_extension

    calls: list[dict[str, Any]] = []

    def load(**kwargs: Any) -> object:
        calls.append(kwargs)
        return object()

    monkeypatch.setattr(cpp_extension, "load", load)
    return calls


@pytest.fixture
def cuda_toolchain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Pretend torch is a CUDA build with a toolkit whose nvcc is at the returned path, and ninja exists."""
    from torch.utils import cpp_extension

    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setattr(build_kernels.shutil, "which", lambda name: f"/usr/bin/{name}")
    return nvcc


def test_the_build_passes_load_what_ops_passes(recorded_load: list[dict[str, Any]],
                                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ninja rebuilds when a command line changes: the two calls must be identical, argument for argument."""
    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops, "_tried", False)
    monkeypatch.setattr(ops, "_module", None)
    ops._load()
    (at_run_time,) = recorded_load
    assert at_run_time == build_kernels.load_arguments()
    assert at_run_time["build_directory"] == str(tmp_path / "cache")


def test_the_build_compiles_into_the_kernel_cache(recorded_load: list[dict[str, Any]], cuda_toolchain: Path,
                                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(cache))
    library = build_kernels.build()
    assert library == cache / "pagedserve_kernels.so" and cache.is_dir()
    assert recorded_load == [build_kernels.load_arguments()]
    assert recorded_load[0]["sources"] == [str(ops.CSRC / s) for s in ops.SOURCES]


def test_a_library_built_but_not_importable_without_a_driver_is_a_success(
        cuda_toolchain: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch.utils import cpp_extension

    cache = tmp_path / "cache"
    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(cache))

    def load_without_driver(**kwargs: Any) -> object:
        (cache / "pagedserve_kernels.so").write_bytes(b"\x7fELF")
        raise ImportError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(cpp_extension, "load", load_without_driver)
    assert build_kernels.build() == cache / "pagedserve_kernels.so"


def test_an_import_failure_without_a_built_library_is_an_error(
        cuda_toolchain: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torch.utils import cpp_extension

    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(tmp_path / "cache"))

    def failing_load(**kwargs: Any) -> object:
        raise ImportError("undefined symbol")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.raises(ImportError):
        build_kernels.build()


def test_a_cpu_build_of_torch_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    assert build_kernels.main([]) == 2
    assert "is a CPU build; install a CUDA build of torch" in capsys.readouterr().err


def test_a_missing_nvcc_is_named(cuda_toolchain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cuda_toolchain.unlink()
    assert build_kernels.main([]) == 2
    assert f"nvcc not found at {cuda_toolchain}" in capsys.readouterr().err


def test_a_missing_toolkit_is_named(cuda_toolchain: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(build_kernels.BuildError, match="no CUDA toolkit found"):
        build_kernels.check_prerequisites()


def test_a_missing_ninja_is_named(cuda_toolchain: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_kernels.shutil, "which", lambda name: None)
    with pytest.raises(build_kernels.BuildError, match="ninja is not on PATH"):
        build_kernels.check_prerequisites()


def test_print_arguments_shows_the_build_without_building(recorded_load: list[dict[str, Any]],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert build_kernels.main(["--print-arguments"]) == 0
    out = capsys.readouterr().out
    assert "name: pagedserve_kernels" in out and str(ops.CSRC) in out and "sm_90a" in out
    assert recorded_load == []
