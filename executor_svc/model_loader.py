"""Build a model family from a local Hugging Face model directory and fill it with weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers

from executor_svc.distributed import SINGLE_RANK, TensorParallel
from executor_svc.models import CausalLM, architecture_of, model_class
from executor_svc.weights import fill_dummy_weights, iterate_weights

# auto: the checkpoint's weights. dummy: real shapes, random values (benchmarks without a checkpoint).
LOAD_FORMATS = ("auto", "dummy")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype called `name` (float32, float16, bfloat16 or a common alias such as bf16)."""
    try:
        return DTYPES[name.lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}") from None


def load_config(model_dir: str | Path) -> transformers.PretrainedConfig:
    """The model's `config.json`, read from the local directory only (never from a hub).

    Raises UnsupportedModelError, listing the supported architectures, for one this server does not
    implement: checked on the raw file first, since transformers refuses a model type it does not know
    with its own message, and before any weight is read.
    """
    directory = Path(model_dir)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {directory}: give the path of a local Hugging Face "
                                "model directory")
    check_architecture(directory / "config.json")
    return transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)


def check_architecture(config_file: Path) -> str:
    """The architecture `config_file` names, when a model family implements it (else raises
    UnsupportedModelError naming the supported ones)."""
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {config_file}: {err}") from err
    architecture = architecture_of(SimpleNamespace(architectures=raw.get("architectures")))
    model_class(architecture)
    return architecture


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating-point tensors in `dtype` inside the block."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
               load_format: str = "auto",
               max_model_len: int | None = None,
               tp: TensorParallel = SINGLE_RANK) -> tuple[CausalLM, transformers.PretrainedConfig]:
    """Build the family `config.json` names directly on `device` in `dtype`, then load its weights.

    Under tensor parallelism (`tp.size` > 1) the model holds only rank `tp.rank`'s shard: every rank
    reads the whole checkpoint and keeps its slice of each tensor.

    Parameters are allocated uninitialised on the device (no random init, no CPU copy) and every one is
    then written by the checkpoint (load_format "auto") or the dummy filler ("dummy"). Returns the model
    in eval mode and the HF config.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported; use one of "
                         f"{', '.join(LOAD_FORMATS)}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    config = load_config(model_dir)
    family = model_class(architecture_of(config))
    with default_dtype(dtype), torch.device(device):
        model = family(config, max_model_len=max_model_len, tp=tp)
    model.requires_grad_(False)
    if load_format == "dummy":
        fill_dummy_weights(model)
    else:
        model.load_weights(iterate_weights(model_dir))
    return model.eval(), config


def eos_token_ids(config: Any, model_dir: str | Path | None = None) -> list[int]:
    """The end-of-sequence token ids: `eos_token_id` of the config (an int or a list), plus those of
    `generation_config.json` in `model_dir` when given (Llama 3 chat models list extra ones there)."""
    ids = _as_ids(getattr(config, "eos_token_id", None))
    if model_dir is not None:
        generation_config = Path(model_dir) / "generation_config.json"
        if generation_config.is_file():
            ids += _as_ids(json.loads(generation_config.read_text()).get("eos_token_id"))
    return list(dict.fromkeys(ids))


def _as_ids(value: int | list[int] | None) -> list[int]:
    """An `eos_token_id` field as a list."""
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]
