"""The interface every model family implements, and the weight loading they share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from executor_svc.attention import ForwardContext
from executor_svc.distributed import TensorParallel
from executor_svc.models.errors import CheckpointError
from executor_svc.models.layers import ParallelLMHead, QKVParallelLinear, ShardId, VocabParallelEmbedding
from executor_svc.models.loading import ParameterLoader, Route
from pagedserve.errors import InvalidArgumentError

# Missing tensors listed by name in the error before the rest are only counted.
MAX_LISTED_MISSING = 10


class CausalLM(nn.Module):
    """A decoder-only language model that reads and writes its KV cache only through `ForwardContext`.

    The executor sizes the KV cache from these attributes (this rank's share under tensor parallelism):
    `num_layers`, `num_kv_heads`, `head_size`; `vocab_size` is the logits width, and `max_model_len`
    the longest sequence (prompt + output) the model serves.

    Families build their layers, call `_attach_lm_head`, and implement `forward` and the two naming
    hooks `route_weight` and `checkpoint_name`; `compute_logits` and `load_weights` here do the rest.
    """

    num_layers: int
    num_kv_heads: int
    head_size: int
    vocab_size: int
    max_model_len: int

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                context: ForwardContext) -> torch.Tensor:
        """One step over a flat batch.

        input_ids: [T] int64; positions: [T] int64 (each token's position in its sequence)
        returns [T, hidden], the final hidden states that `compute_logits` reads
        """
        raise NotImplementedError

    def _attach_lm_head(self, config: Any, input_size: int, embedding: VocabParallelEmbedding,
                        qkv_proj: QKVParallelLinear, tie: bool, tp: TensorParallel) -> None:
        """Add the LM head (tied to `embedding` when `tie`) and the sizes the executor reads.

        Under tensor parallelism the head computes this rank's vocabulary slice of the logits and
        all-gathers the rest, so every rank holds the whole [N, vocab] logits and samples alike.
        """
        self.tie_word_embeddings = tie
        self.tp = tp
        self.lm_head = ParallelLMHead(config.vocab_size, input_size, tp_rank=tp.rank, tp_size=tp.size,
                                      gather=tp.gather)
        if tie:
            self.lm_head.tie_to(embedding)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = qkv_proj.num_kv_heads
        self.head_size = qkv_proj.head_size
        self.vocab_size = config.vocab_size

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32."""
        return self.lm_head(hidden).float()

    def route_weight(self, name: str, tensor: torch.Tensor) -> list[Route]:
        """Where checkpoint tensor `name` goes: one or more routes, or none for a tensor to skip."""
        raise NotImplementedError

    def checkpoint_name(self, param: str, shard_id: ShardId) -> str:
        """The checkpoint name that fills shard `shard_id` of parameter `param` (for error messages)."""
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (name, tensor) pairs named as in the HF checkpoint.

        Raises CheckpointError naming the tensor when a name matches no parameter or a shape is wrong,
        and naming every tensor the checkpoint lacks once all were read.
        """
        loader = ParameterLoader(self)
        with torch.no_grad():
            for name, tensor in weights:
                for route in self.route_weight(name, tensor):
                    loader.load(name, route)
        missing = [self.checkpoint_name(param, shard) for param, shard in loader.missing()]
        if missing:
            listed = ", ".join(dict.fromkeys(missing[:MAX_LISTED_MISSING]))
            unlisted = len(missing) - MAX_LISTED_MISSING
            more = f" and {unlisted} more" if unlisted > 0 else ""
            raise CheckpointError(f"the checkpoint lacks tensors {type(self).__name__} needs: {listed}{more}")


def resolve_max_model_len(limit: int, requested: int | None, field: str) -> int:
    """The model length to serve: `requested`, or the model's own `limit` (config field `field`)."""
    if requested is None:
        return limit
    if not 1 <= requested <= limit:
        # Named as the setting, so the executor's one startup error line says which flag to change.
        raise InvalidArgumentError("max_model_len",
                                   f"{requested} must be in [1, {limit}], the model's {field}")
    return requested


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` the config sets to something other than None, else `default`."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default
