"""Matching checkpoint tensors to a model's parameters, accounting exactly for what was loaded.

A family says where each Hugging Face tensor goes (a `Route`: parameter name, shard id, tensor); the
`ParameterLoader` hands it to the owning module's `weight_loader`, which cuts out this rank's part, and
remembers which (parameter, shard) pairs are still unfilled, so that a checkpoint lacking a tensor
fails loudly instead of leaving uninitialised memory in the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from executor_svc.models.errors import CheckpointError
from executor_svc.models.layers import ShardId, default_weight_loader


@dataclass(frozen=True, slots=True)
class Route:
    """Where one checkpoint tensor (or one part of it) goes."""

    param: str              # the model's parameter name
    shard_id: ShardId       # which part of a fused parameter; None for the whole parameter
    tensor: torch.Tensor


@dataclass(frozen=True, slots=True)
class StackedParam:
    """A HF tensor that fills one part of a fused parameter, e.g. `.q_proj.` -> `.qkv_proj.` shard "q"."""

    fused: str
    part: str
    shard_id: ShardId


def to_fused(name: str, stacked: Sequence[StackedParam]) -> tuple[str, ShardId]:
    """The fused parameter name and shard id for checkpoint name `name` (itself and None if not stacked)."""
    for entry in stacked:
        token = f".{entry.part}."
        if token in name:
            return name.replace(token, f".{entry.fused}."), entry.shard_id
    return name, None


def from_fused(param: str, shard_id: ShardId, stacked: Sequence[StackedParam]) -> str:
    """The checkpoint name that fills shard `shard_id` of parameter `param` (the inverse of to_fused)."""
    for entry in stacked:
        token = f".{entry.fused}."
        if token in param and entry.shard_id == shard_id:
            return param.replace(token, f".{entry.part}.")
    return param


class ParameterLoader:
    """Loads routed tensors into a model and tracks the (parameter, shard) pairs not yet filled."""

    def __init__(self, model: nn.Module) -> None:
        self.model_name = type(model).__name__
        self._targets: dict[str, tuple[nn.Module, nn.Parameter]] = {}
        self._pending: set[tuple[str, ShardId]] = set()
        seen: set[int] = set()
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                # A tied parameter is loaded once, under the name it was first registered with.
                if id(param) in seen:
                    continue
                seen.add(id(param))
                full_name = f"{module_name}.{name}" if module_name else name
                self._targets[full_name] = (module, param)
                self._pending.update((full_name, shard) for shard in getattr(module, "shard_ids", (None,)))

    def load(self, source: str, route: Route) -> None:
        """Load `route.tensor`, which came from checkpoint tensor `source`."""
        target = self._targets.get(route.param)
        if target is None:
            raise CheckpointError(f"checkpoint tensor {source!r} matches no parameter of {self.model_name} "
                                  f"(looked for {route.param!r})")
        module, param = target
        weight_loader = getattr(module, "weight_loader", default_weight_loader)
        try:
            weight_loader(param, route.tensor, route.shard_id)
        except ValueError as error:
            raise CheckpointError(f"checkpoint tensor {source!r} does not fit {route.param!r}: "
                                  f"{error}") from error
        shards = getattr(module, "shard_ids", (None,)) if route.shard_id is None else (route.shard_id,)
        self._pending.difference_update((route.param, shard) for shard in shards)

    def missing(self) -> list[tuple[str, ShardId]]:
        """The (parameter, shard) pairs no checkpoint tensor has filled, in name order."""
        return sorted(self._pending, key=lambda pair: (pair[0], str(pair[1])))
