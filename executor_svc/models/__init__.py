"""Model families, looked up by the Hugging Face architecture name in `config.json`."""

from __future__ import annotations

from typing import Any

from executor_svc.models.base import CausalLM
from executor_svc.models.errors import CheckpointError, UnsupportedModelError
from executor_svc.models.gpt2 import GPT2LMHeadModel
from executor_svc.models.llama import LlamaForCausalLM, MistralForCausalLM
from executor_svc.models.opt import OPTForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}

SUPPORTED_ARCHITECTURES = tuple(sorted(MODEL_REGISTRY))


def architecture_of(config: Any) -> str:
    """`architectures[0]` of the config, which names the HF class the checkpoint was saved from."""
    architectures = getattr(config, "architectures", None)
    if not architectures:
        raise UnsupportedModelError("config.json names no `architectures`; supported: "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return architectures[0]


def model_class(architecture: str) -> type[CausalLM]:
    """The family implementing HF architecture `architecture`."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise UnsupportedModelError(f"architecture {architecture!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)}") from None


__all__ = [
    "MODEL_REGISTRY",
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "CheckpointError",
    "UnsupportedModelError",
    "architecture_of",
    "model_class",
]
