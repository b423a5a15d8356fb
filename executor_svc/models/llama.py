"""Llama (1, 2, 3) and Mistral without sliding window: GQA, RoPE (plain or llama3-scaled), RMSNorm, SwiGLU."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from executor_svc.attention import ForwardContext
from executor_svc.distributed import SINGLE_RANK, TensorParallel
from executor_svc.models.base import CausalLM, config_value, resolve_max_model_len
from executor_svc.models.errors import UnsupportedModelError
from executor_svc.models.layers import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    ShardId,
    VocabParallelEmbedding,
    get_act_fn,
    silu_and_mul,
)
from executor_svc.models.loading import Route, StackedParam, from_fused, to_fused

# HF keeps q/k/v and gate/up as separate tensors; we fuse each group into one matmul.
STACKED_PARAMS = (
    StackedParam("qkv_proj", "q_proj", "q"),
    StackedParam("qkv_proj", "k_proj", "k"),
    StackedParam("qkv_proj", "v_proj", "v"),
    StackedParam("gate_up_proj", "gate_proj", 0),
    StackedParam("gate_up_proj", "up_proj", 1),
)

# Rotary caches some older checkpoints saved; we compute our own.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def head_size_of(config: Any) -> int:
    """`head_dim` when the config sets it (it may differ from hidden_size / heads), else the quotient."""
    return config_value(config, "head_dim", default=config.hidden_size // config.num_attention_heads)


class LlamaAttention(nn.Module):
    """Self-attention with grouped KV heads and rotary positions."""

    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, tp: TensorParallel) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        head_size = head_size_of(config)
        num_heads = config.num_attention_heads
        num_kv_heads = config_value(config, "num_key_value_heads", default=num_heads)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_size, num_heads, num_kv_heads, bias,
                                          tp.rank, tp.size)
        self.o_proj = RowParallelLinear(num_heads * head_size, config.hidden_size, bias, tp.rank, tp.size,
                                        tp.reduce)
        self.rotary_emb = rotary_emb
        self.scale = head_size**-0.5

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        """positions [T], hidden [T, hidden] -> [T, hidden]."""
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))   # [T, H, D], [T, Hkv, D], [T, Hkv, D]
        q, k = self.rotary_emb(positions, q, k)
        out = context.attend(self.layer_idx, q, k, v, self.scale)   # [T, H, D]
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x)), with gate and up in one matmul."""

    def __init__(self, config: Any, tp: TensorParallel) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias, tp.rank,
                                                       tp.size)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias, tp.rank, tp.size, tp.reduce)
        self.act_fn = get_act_fn(config.hidden_act)
        self.is_silu = config.hidden_act in ("silu", "swish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]."""
        gate_up = self.gate_up_proj(x)                     # [T, 2 * inter_per_rank]
        if self.is_silu:
            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)                # [T, inter_per_rank] each
        return self.down_proj(self.act_fn(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    The residual stream is carried separately, so each residual add fuses into the norm after it (the
    next layer's input norm, or the model's final norm, adds this layer's MLP output).
    """

    def __init__(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding, tp: TensorParallel) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, tp)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                context: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; hidden [T, hidden], the previous layer's MLP output (or the embedding, with
        residual None); residual [T, hidden], the stream before it. Returns this layer's (mlp output,
        residual): their sum is the layer's output."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, context)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, config: Any, max_model_len: int, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp.rank, tp.size,
                                                   tp.reduce)
        # One rotary table shared by every layer: positions mean the same thing in all of them.
        rotary_emb = RotaryEmbedding.from_config(config, head_size_of(config), max_model_len)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, rotary_emb, tp)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                context: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] -> [T, hidden]."""
        hidden = self.embed_tokens(input_ids)   # [T, hidden]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, context)
        if residual is None:                    # no layers
            return self.norm(hidden)
        return self.norm.add_and_norm(hidden, residual)[0]


class LlamaForCausalLM(CausalLM):
    """Llama with an LM head, tied to the token embedding when `tie_word_embeddings` is set."""

    def __init__(self, config: Any, max_model_len: int | None = None,
                 tp: TensorParallel = SINGLE_RANK) -> None:
        super().__init__()
        self.max_model_len = resolve_max_model_len(config.max_position_embeddings, max_model_len,
                                                   "max_position_embeddings")
        self.model = LlamaModel(config, self.max_model_len, tp)
        self._attach_lm_head(config, config.hidden_size, self.model.embed_tokens,
                             cast(LlamaDecoderLayer, self.model.layers[0]).self_attn.qkv_proj,
                             bool(getattr(config, "tie_word_embeddings", False)), tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                context: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] -> [T, hidden]."""
        return self.model(input_ids, positions, context)

    def route_weight(self, name: str, tensor: torch.Tensor) -> list[Route]:
        """HF names map one to one, except q/k/v and gate/up, which fill shards of the fused parameters."""
        if name.endswith(SKIPPED_SUFFIXES) or (self.tie_word_embeddings and name == "lm_head.weight"):
            return []
        param, shard_id = to_fused(name, STACKED_PARAMS)
        return [Route(param, shard_id, tensor)]

    def checkpoint_name(self, param: str, shard_id: ShardId) -> str:
        """The inverse of route_weight."""
        return from_fused(param, shard_id, STACKED_PARAMS)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama's architecture; sliding-window attention is not implemented, so it must not matter.

    The window never takes effect when no sequence is longer than it, so a config with a window is
    accepted when max_model_len (by default max_position_embeddings) fits inside the window.
    """

    def __init__(self, config: Any, max_model_len: int | None = None,
                 tp: TensorParallel = SINGLE_RANK) -> None:
        window = getattr(config, "sliding_window", None)
        served = resolve_max_model_len(config.max_position_embeddings, max_model_len,
                                       "max_position_embeddings")
        if window is not None and window < served:
            raise UnsupportedModelError(
                f"config sliding_window={window} is smaller than max_model_len={served}: sliding-window "
                f"attention is not supported; serve with max_model_len <= {window}")
        super().__init__(config, max_model_len, tp)
