"""GPT-2: learned positions, pre-LN blocks, GELU (tanh approximation) MLP, LM head tied to the embedding.

GPT-2 checkpoints store their projections as `Conv1D` weights, [in, out], the transpose of a linear
layer's [out, in], and the query/key/value projection as one fused `c_attn` tensor.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from executor_svc.attention import ForwardContext
from executor_svc.distributed import SINGLE_RANK, TensorParallel
from executor_svc.models.base import CausalLM, resolve_max_model_len
from executor_svc.models.errors import UnsupportedModelError
from executor_svc.models.layers import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    ShardId,
    VocabParallelEmbedding,
    get_act_fn,
)
from executor_svc.models.loading import Route

# Projections stored as Conv1D, [in, out].
CONV1D_LAYERS = (".attn.c_attn.", ".attn.c_proj.", ".mlp.c_fc.", ".mlp.c_proj.")
# Causal-mask buffers older checkpoints saved; attention masks itself.
SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class GPT2Attention(nn.Module):
    """Multi-head self-attention with the fused c_attn projection."""

    def __init__(self, config: Any, layer_idx: int, tp: TensorParallel) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        hidden, num_heads = config.hidden_size, config.num_attention_heads
        head_size = hidden // num_heads
        self.c_attn = QKVParallelLinear(hidden, head_size, num_heads, num_heads, True, tp.rank, tp.size)
        self.c_proj = RowParallelLinear(hidden, hidden, True, tp.rank, tp.size, tp.reduce)
        self.scale = attention_scale(config, head_size, layer_idx)

    def forward(self, hidden: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]."""
        q, k, v = self.c_attn.split(self.c_attn(hidden))   # [T, H, D] each
        out = context.attend(self.layer_idx, q, k, v, self.scale)   # [T, H, D]
        return self.c_proj(out.flatten(1))


def attention_scale(config: Any, head_size: int, layer_idx: int) -> float:
    """1/sqrt(head_size) unless `scale_attn_weights` is false; divided by layer_idx + 1 when the config
    sets `scale_attn_by_inverse_layer_idx`."""
    scale = head_size**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer_idx + 1)
    return scale


class GPT2MLP(nn.Module):
    """c_proj(act(c_fc(x)))."""

    def __init__(self, config: Any, tp: TensorParallel) -> None:
        super().__init__()
        inner = getattr(config, "n_inner", None) or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, True, tp.rank, tp.size)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, True, tp.rank, tp.size, tp.reduce)
        self.act = get_act_fn(config.activation_function, "activation_function")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]."""
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: Any, layer_idx: int, tp: TensorParallel) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attn = GPT2Attention(config, layer_idx, tp)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = GPT2MLP(config, tp)

    def forward(self, hidden: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]."""
        hidden = hidden + self.attn(self.ln_1(hidden), context)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    """Token and position embeddings, blocks, final norm (HF's `transformer.` prefix)."""

    def __init__(self, config: Any, tp: TensorParallel) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp.rank, tp.size, tp.reduce)
        # Every rank needs every position row: a one-rank embedding is the whole table.
        self.wpe = VocabParallelEmbedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i, tp)
                               for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                context: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] -> [T, hidden]."""
        hidden = self.wte(input_ids) + self.wpe(positions)   # [T, hidden]
        for block in self.h:
            hidden = block(hidden, context)
        return self.ln_f(hidden)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with its LM head (tied to `wte` unless `tie_word_embeddings` is false)."""

    def __init__(self, config: Any, max_model_len: int | None = None,
                 tp: TensorParallel = SINGLE_RANK) -> None:
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise UnsupportedModelError("config add_cross_attention=True (an encoder-decoder GPT-2) is not "
                                        "supported")
        self.max_model_len = resolve_max_model_len(config.max_position_embeddings, max_model_len,
                                                   "n_positions")
        self.transformer = GPT2Model(config, tp)
        tie = bool(getattr(config, "tie_word_embeddings", True))
        self._attach_lm_head(config, config.hidden_size, self.transformer.wte,
                             cast(GPT2Block, self.transformer.h[0]).attn.c_attn, tie, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                context: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] -> [T, hidden]."""
        return self.transformer(input_ids, positions, context)

    def route_weight(self, name: str, tensor: torch.Tensor) -> list[Route]:
        """Conv1D weights are transposed and c_attn fills q, k and v at once. OpenAI-converted checkpoints
        lack the `transformer.` prefix."""
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith(SKIPPED_SUFFIXES) or (self.tie_word_embeddings and name == "lm_head.weight"):
            return []
        if name.endswith(".weight") and any(layer in name for layer in CONV1D_LAYERS):
            tensor = tensor.t()   # [in, out] -> [out, in]
        return [Route(name, None, tensor)]

    def checkpoint_name(self, param: str, shard_id: ShardId) -> str:
        """Parameters keep their checkpoint names."""
        return param
