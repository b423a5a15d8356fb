"""Where the embedded default model lives: a small Llama trained on the Python standard library.

Both services use it when no model is given, so `pagedserve serve` works on a fresh machine with no
model hub. `models/train_stdlib_llama.py` reproduces it; `PAGEDSERVE_DEFAULT_MODEL` points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "stdlib-llama"
# protos/pagedserve/default_model.py: the repository root is two folders up.
_REPO_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / DEFAULT_MODEL_NAME


def default_model_dir() -> str:
    """The directory of the default model (`PAGEDSERVE_DEFAULT_MODEL` overrides the repo's copy)."""
    return os.environ.get("PAGEDSERVE_DEFAULT_MODEL", str(_REPO_MODEL_DIR))
