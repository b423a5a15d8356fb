"""Finding the external tools some tests drive (prometheus, promtool, docker-compose, hadolint)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def require_tool(name: str, install_hint: str, require_env: str) -> str:
    """The path of tool `name` (on PATH or beside this interpreter, as a venv installs it).

    Skips the calling test where the tool is missing, or fails it when the environment variable
    `require_env` is 1 (CI sets it, so a missing install step cannot hide behind a skip).
    """
    beside = Path(sys.executable).parent / name
    path = shutil.which(name) or (str(beside) if beside.is_file() else None)
    if path is None:
        message = f"{name} is not installed ({install_hint})"
        if os.environ.get(require_env) == "1":
            pytest.fail(f"{message}, and {require_env}=1 requires it")
        pytest.skip(message)
    return path
