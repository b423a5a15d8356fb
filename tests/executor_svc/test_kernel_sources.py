"""The CUDA sources compile (nvcc, no GPU needed) and every tensor argument carries a shape comment."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "csrc").glob("*.cu")) + sorted((REPO / "csrc").glob("*.cpp"))
# A kernel or host-function parameter that is a tensor: an at::Tensor / torch::Tensor (by value or
# reference) or a raw `__restrict__` pointer, ending the parameter with `,` or `)`.
TENSOR_PARAM = re.compile(r"(?:(?:at|torch)::Tensor\s*&?|__restrict__)\s+\w+\s*[,)]")
SHAPE_COMMENT = re.compile(r"//\s*\[")


def test_sources_exist() -> None:
    names = {p.name for p in SOURCES}
    assert {"paged_attention.cu", "cache_kernels.cu", "bindings.cpp"} <= names


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_every_tensor_argument_has_a_shape_comment(source: Path) -> None:
    missing = [f"{source.name}:{n}: {line.strip()}"
               for n, line in enumerate(source.read_text().splitlines(), 1)
               if TENSOR_PARAM.search(line.split("//")[0]) and not SHAPE_COMMENT.search(line)]
    assert not missing, "tensor arguments without a `// [shape]` comment:\n" + "\n".join(missing)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="nvcc not installed")
def test_kernels_compile_with_nvcc() -> None:
    pytest.importorskip("torch")
    result = subprocess.run([str(REPO / ".ci" / "compile_kernels"), sys.executable], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert "all kernels compile" in result.stdout
