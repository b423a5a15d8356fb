"""OPT (Meta's Open Pre-trained Transformers): learned positions, LayerNorm, ReLU MLP, tied LM head.

Variants this covers: pre-LN (125m, 1.3b and up) and post-LN (350m, `do_layer_norm_before` false),
`word_embed_proj_dim` smaller than hidden_size (350m) with project_in/project_out, and the final layer
norm kept only for pre-LN checkpoints that do not set `_remove_final_layer_norm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from executor_svc.attention import ForwardContext
from executor_svc.distributed import SINGLE_RANK, TensorParallel
from executor_svc.models.base import CausalLM, config_value, resolve_max_model_len
from executor_svc.models.layers import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    ShardId,
    VocabParallelEmbedding,
    get_act_fn,
)
from executor_svc.models.loading import Route, StackedParam, from_fused, to_fused

# OPT's learned position table starts two rows in (a fairseq leftover for padding), so position p
# reads row p + 2.
POSITION_OFFSET = 2

STACKED_PARAMS = (
    StackedParam("qkv_proj", "q_proj", "q"),
    StackedParam("qkv_proj", "k_proj", "k"),
    StackedParam("qkv_proj", "v_proj", "v"),
)


def word_embed_dim(config: Any) -> int:
    """The width of the token embeddings and LM head: `word_embed_proj_dim`, by default hidden_size."""
    return config_value(config, "word_embed_proj_dim", default=config.hidden_size)


def layer_norm(config: Any) -> nn.LayerNorm:
    """OPT's LayerNorm (default eps 1e-5; no weight or bias when `layer_norm_elementwise_affine` is false)."""
    affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
    return nn.LayerNorm(config.hidden_size, elementwise_affine=affine)


class OPTAttention(nn.Module):
    """Multi-head self-attention; the query is scaled right after its projection, as OPT does."""

    def __init__(self, config: Any, layer_idx: int, tp: TensorParallel) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        num_heads = config.num_attention_heads
        head_size = config.hidden_size // num_heads
        bias = bool(getattr(config, "enable_bias", True))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_size, num_heads, num_heads, bias,
                                          tp.rank, tp.size)
        self.out_proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias, tp.rank, tp.size,
                                          tp.reduce)
        self.scaling = head_size**-0.5

    def forward(self, hidden: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]."""
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))   # [T, H, D] each
        # Scaling q before the product (not the scores after) rounds exactly as HF's OPT does.
        out = context.attend(self.layer_idx, q * self.scaling, k, v, 1.0)   # [T, H, D]
        return self.out_proj(out.flatten(1))


class OPTDecoderLayer(nn.Module):
    """Attention and MLP blocks with the norm before each (pre-LN) or after each residual add (post-LN)."""

    def __init__(self, config: Any, layer_idx: int, tp: TensorParallel) -> None:
        super().__init__()
        self.pre_norm = bool(config.do_layer_norm_before)
        bias = bool(getattr(config, "enable_bias", True))
        self.self_attn = OPTAttention(config, layer_idx, tp)
        self.self_attn_layer_norm = layer_norm(config)
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_dim, bias, tp.rank, tp.size)
        self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, bias, tp.rank, tp.size, tp.reduce)
        self.final_layer_norm = layer_norm(config)
        self.activation_fn = get_act_fn(config.activation_function, "activation_function")

    def forward(self, hidden: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]."""
        hidden = self._residual(hidden, self.self_attn_layer_norm, lambda h: self.self_attn(h, context))
        return self._residual(hidden, self.final_layer_norm,
                              lambda h: self.fc2(self.activation_fn(self.fc1(h))))

    def _residual(self, hidden: torch.Tensor, norm: nn.LayerNorm,
                  block: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x + block(norm(x)) when pre-LN, norm(x + block(x)) when post-LN."""
        if self.pre_norm:
            return hidden + block(norm(hidden))
        return norm(hidden + block(hidden))


class OPTDecoder(nn.Module):
    """Embeddings, decoder layers, optional final norm and output projection (HF's `model.decoder.`)."""

    def __init__(self, config: Any, tp: TensorParallel) -> None:
        super().__init__()
        embed_dim = word_embed_dim(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, embed_dim, tp.rank, tp.size,
                                                   tp.reduce)
        # Position rows are few and every rank needs all of them: a one-rank embedding is the whole table.
        self.embed_positions = VocabParallelEmbedding(config.max_position_embeddings + POSITION_OFFSET,
                                                      config.hidden_size)
        self.project_in: ReplicatedLinear | None = None
        self.project_out: ReplicatedLinear | None = None
        if embed_dim != config.hidden_size:
            self.project_in = ReplicatedLinear(embed_dim, config.hidden_size, bias=False)
            self.project_out = ReplicatedLinear(config.hidden_size, embed_dim, bias=False)
        self.final_layer_norm: nn.LayerNorm | None = None
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            self.final_layer_norm = layer_norm(config)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i, tp)
                                    for i in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                context: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] -> [T, word_embed_proj_dim]."""
        embeds = self.embed_tokens(input_ids)                        # [T, word_embed_proj_dim]
        if self.project_in is not None:
            embeds = self.project_in(embeds)                         # [T, hidden]
        hidden = embeds + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            hidden = layer(hidden, context)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)                        # [T, word_embed_proj_dim]
        return hidden


class OPTModel(nn.Module):
    """HF's `model.` level, which only holds the decoder."""

    def __init__(self, config: Any, tp: TensorParallel) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config, tp)


class OPTForCausalLM(CausalLM):
    """OPT with its LM head (tied to the token embedding unless `tie_word_embeddings` is false).

    `forward` returns the states after project_out, [T, word_embed_proj_dim], which the LM head reads.
    """

    def __init__(self, config: Any, max_model_len: int | None = None,
                 tp: TensorParallel = SINGLE_RANK) -> None:
        super().__init__()
        self.max_model_len = resolve_max_model_len(config.max_position_embeddings, max_model_len,
                                                   "max_position_embeddings")
        self.model = OPTModel(config, tp)
        decoder = self.model.decoder
        tie = bool(getattr(config, "tie_word_embeddings", True))
        self._attach_lm_head(config, word_embed_dim(config), decoder.embed_tokens,
                             cast(OPTDecoderLayer, decoder.layers[0]).self_attn.qkv_proj, tie, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                context: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] -> [T, word_embed_proj_dim]."""
        return self.model.decoder(input_ids, positions, context)

    def route_weight(self, name: str, tensor: torch.Tensor) -> list[Route]:
        """HF names map one to one except q/k/v; metaseq-converted checkpoints lack the `model.` prefix."""
        if name.startswith("decoder."):
            name = "model." + name
        if self.tie_word_embeddings and name == "lm_head.weight":
            return []
        param, shard_id = to_fused(name, STACKED_PARAMS)
        return [Route(param, shard_id, tensor)]

    def checkpoint_name(self, param: str, shard_id: ShardId) -> str:
        """The inverse of route_weight."""
        return from_fused(param, shard_id, STACKED_PARAMS)
