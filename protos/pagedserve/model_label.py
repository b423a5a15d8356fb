"""The `model_name` label every PagedServe metric carries, as vLLM's do: one dashboard, many models."""

from __future__ import annotations

from pathlib import Path

from pagedserve.default_model import default_model_dir


def model_label(served_model_name: str, model: str) -> str:
    """The served model name, else the model directory's name (the embedded model's when none is given).

    The scheduler and its executors compute it from the same two settings, so their series match.
    """
    return served_model_name or Path(model or default_model_dir()).name
