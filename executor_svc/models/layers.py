"""Building blocks shared by the model families: norms, rotary embedding, activations, sharded linears.

The linear and embedding layers follow Megatron-style tensor parallelism (as the paper's distributed
execution does): each holds only its rank's shard of the full weight and knows how to cut that shard
out of the full Hugging Face tensor in `weight_loader(param, loaded_weight, shard_id)`.

- ColumnParallelLinear splits the output features: rank r computes output columns [r*n, (r+1)*n).
- RowParallelLinear splits the input features: each rank computes a partial sum of the full output,
  and the ranks' partial sums must be added together (`reduce`, an all-reduce under tensor parallelism).
- VocabParallelEmbedding / ParallelLMHead split the vocabulary rows.

With tp_size=1 every layer is an ordinary linear or embedding. Parameters are allocated with
`torch.empty` (no initialisation), on the default device and dtype in effect when the model is built,
because every value is overwritten by the checkpoint or the dummy filler right after.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from executor_svc import ops
from executor_svc.models.errors import UnsupportedModelError

ShardId = str | int | None
Reduce = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, which must divide exactly (`what` names the quantity in the error)."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by tp_size ({denominator})")
    return numerator // denominator


def check_tp(tp_rank: int, tp_size: int) -> None:
    """Raise unless 0 <= tp_rank < tp_size."""
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, tp_size), got tp_rank={tp_rank}, tp_size={tp_size}")


def check_shape(loaded: torch.Tensor, expected: Sequence[int]) -> None:
    """Raise ValueError unless the checkpoint tensor `loaded` has shape `expected`."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"it has shape {tuple(loaded.shape)}, expected {tuple(expected)}")


def copy_checked(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy `source` into `target` (casting dtype and device) after checking the shapes agree."""
    check_shape(source, target.shape)
    target.copy_(source)


def full_shape(param: nn.Parameter, dim: int, full_size: int) -> tuple[int, ...]:
    """The shape of the unsplit tensor: `param`'s shape with dimension `dim` at its full size."""
    shape = list(param.shape)
    shape[dim] = full_size
    return tuple(shape)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: ShardId = None) -> None:
    """Load a replicated parameter: the checkpoint tensor is the whole parameter."""
    if shard_id is not None:
        raise ValueError(f"a replicated parameter takes no shard id, got {shard_id!r}")
    copy_checked(param.data, loaded_weight)


def empty_parameter(*shape: int) -> nn.Parameter:
    """An uninitialised, frozen parameter on the current default device and dtype."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


# ---------------------------------------------------------------------------------------------------------
# Norms and activations


class RMSNorm(nn.Module):
    """Root-mean-square layer norm as Llama uses it: normalise in float32, scale in the input dtype.

    fp16/bf16 activations on CUDA go through one fused kernel (ops.rms_norm), which rounds as this
    reference does; everything else runs the reference.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = empty_parameter(hidden_size)   # [hidden]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> [T, hidden]."""
        if ops.fused_layers_enabled(x):
            return ops.rms_norm(x, self.weight, self.eps)
        return self._reference(x)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add before a pre-norm: returns (norm(x + residual), x + residual).

        x, residual: [T, hidden]. The fused kernel writes the sum into `residual` itself, so the caller
        must own it (every decoder layer's running residual is its own tensor).
        """
        if ops.fused_layers_enabled(x) and residual.is_contiguous():
            return ops.fused_add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = x + residual
        return self._reference(residual), residual

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        # The cast back happens before the weight multiply, as in HF, so half precision rounds the same.
        return self.weight * h.to(dtype)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU written out as OpenAI GPT-2 computes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """torch's fused tanh-approximated GELU (HF's "gelu_pytorch_tanh")."""
    return functional.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": functional.relu,
    "silu": functional.silu,
    "swish": functional.silu,
    "gelu": functional.gelu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_tanh,
}


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gated activation: silu(gate) * up for x = [gate | up]. [T, 2 * I] -> [T, I].

    fp16/bf16 on CUDA: one fused kernel (rounding silu to the dtype first, as the reference does).
    """
    if ops.fused_layers_enabled(x):
        return ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return functional.silu(gate) * up


def get_act_fn(name: str, field: str = "hidden_act") -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation HF names `name`; `field` names the config field in the error."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(f"config {field}={name!r} is not supported; supported: "
                                    f"{', '.join(sorted(ACTIVATIONS))}") from None


# ---------------------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_parameters(config: Any) -> tuple[dict[str, Any], str]:
    """The config's RoPE settings as one dict with `rope_type` and `rope_theta`, and the field they came from.

    transformers 5 keeps them in `rope_parameters`; configs written for transformers 4 keep the scaling
    in `rope_scaling` (type under `rope_type` or the older `type`) and the base in `rope_theta`.
    """
    params = getattr(config, "rope_parameters", None)
    field = "rope_parameters"
    if not params:
        field = "rope_scaling"
        params = getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", None) or "default")
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return params, field


def default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """Inverse frequencies of plain RoPE: base ** (-2i / rotary_dim). Returns [rotary_dim / 2] float32."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position: int) -> torch.Tensor:
    """Llama 3.1 frequency scaling: slow long-wavelength components, keep short ones, blend in between.

    inv_freq: [rotary_dim / 2] float32 -> [rotary_dim / 2] float32
    """
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


SUPPORTED_ROPE_TYPES = ("default", "llama3")


def rope_inv_freq(params: dict[str, Any], field: str, rotary_dim: int) -> torch.Tensor:
    """Inverse frequencies for the RoPE settings `params` read from config field `field`. [rotary_dim / 2]."""
    rope_type = params["rope_type"]
    inv_freq = default_inv_freq(rotary_dim, float(params["rope_theta"]))
    if rope_type == "default":
        return inv_freq
    if rope_type == "llama3":
        try:
            return llama3_inv_freq(inv_freq, float(params["factor"]), float(params["low_freq_factor"]),
                                   float(params["high_freq_factor"]),
                                   int(params["original_max_position_embeddings"]))
        except KeyError as missing:
            raise UnsupportedModelError(f"config {field} of rope_type 'llama3' lacks {missing}") from None
    raise UnsupportedModelError(f"config {field}.rope_type={rope_type!r} is not supported; supported: "
                                f"{', '.join(SUPPORTED_ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (Llama's `rotate_half`): the two halves of each head form the pairs.

    cos and sin are precomputed in float32 for positions [0, max_position) and cast to the query dtype
    when applied, exactly as HF computes them, so float32 results agree to the last bit.
    """

    cos_sin_cache: torch.Tensor     # a buffer (register_buffer), [max_position, rotary_dim]

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, inv_freq: torch.Tensor) -> None:
        super().__init__()
        if rotary_dim % 2 or rotary_dim > head_size:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and at most head_size {head_size}")
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        positions = torch.arange(max_position, dtype=torch.float32)            # [P]
        freqs = positions[:, None] * inv_freq.to(positions.device)[None, :]    # [P, rotary_dim / 2]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)                  # [P, rotary_dim]
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    @classmethod
    def from_config(cls, config: Any, head_size: int, max_position: int) -> RotaryEmbedding:
        """The rotary embedding a Llama-style config asks for (plain or llama3-scaled)."""
        params, field = rope_parameters(config)
        rotary_dim = int(head_size * params.get("partial_rotary_factor", 1.0))
        return cls(head_size, rotary_dim, max_position, rope_inv_freq(params, field, rotary_dim))

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate queries and keys by their positions.

        positions: [T] int64; query: [T, num_heads, head_size]; key: [T, num_kv_heads, head_size]
        returns query, key of the same shapes (fp16/bf16 on CUDA: the inputs themselves, rotated in place
        by one fused kernel; heads must be contiguous, as QKVParallelLinear.split gives them)
        """
        if ops.fused_layers_enabled(query) and self.cos_sin_cache.dtype == torch.float32:
            ops.rotary_embedding(positions, query, key, self.cos_sin_cache, self.rotary_dim)   # in place
            return query, key
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)   # [T, rotary_dim / 2] each
        cos = cos[:, None, :].to(query.dtype)                        # [T, 1, rotary_dim / 2]
        sin = sin[:, None, :].to(query.dtype)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, H, head_size]; the first rotary_dim features rotate, the rest pass through."""
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        x1, x2 = rot.chunk(2, dim=-1)                                # [T, H, rotary_dim / 2] each
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


# ---------------------------------------------------------------------------------------------------------
# Linear layers


class LinearBase(nn.Module):
    """weight [output_per_rank, input_per_rank] and an optional bias [output_per_rank]; y = x W^T + b.

    `shard_ids` lists the checkpoint tensors that together fill the parameters: (None,) when one tensor
    fills a parameter, the part names when several HF tensors are fused into one (q/k/v, gate/up).
    """

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.weight = empty_parameter(output_size, input_size)      # [out_per_rank, in_per_rank]
        if bias:
            self.bias: nn.Parameter | None = empty_parameter(output_size)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in_per_rank] -> [T, out_per_rank]."""
        return functional.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None) -> None:
        """Copy this rank's part of the full HF tensor `loaded_weight` into `param`."""
        raise NotImplementedError


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole (small projections that are not worth splitting)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True) -> None:
        super().__init__(input_size, output_size, bias, tp_rank=0, tp_size=1)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None) -> None:
        """The checkpoint tensor is the whole parameter."""
        default_weight_loader(param, loaded_weight, shard_id)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank's output is its slice of the full output."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        super().__init__(input_size, divide(output_size, tp_size, "output size"), bias, tp_rank, tp_size)
        self.output_size_per_rank = self.weight.shape[0]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None) -> None:
        """Rows [rank*n, (rank+1)*n) of the full [output_size, ...] weight or bias."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard id, got {shard_id!r}")
        n = self.output_size_per_rank
        check_shape(loaded_weight, full_shape(param, 0, n * self.tp_size))
        copy_checked(param.data, loaded_weight.narrow(0, self.tp_rank * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul, e.g. Llama's gate_proj and up_proj.

    Each rank holds its slice of every part, concatenated: [gate_r; up_r]. Shard id i is part i.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = True, tp_rank: int = 0,
                 tp_size: int = 1) -> None:
        sizes_per_rank = [divide(size, tp_size, f"output size {i}") for i, size in enumerate(output_sizes)]
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)
        self.output_sizes_per_rank = sizes_per_rank
        self.shard_ids = tuple(range(len(output_sizes)))

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None) -> None:
        """Part `shard_id` of the fused parameter; None means the checkpoint stores all parts fused."""
        if shard_id is None:
            full_sizes = [n * self.tp_size for n in self.output_sizes_per_rank]
            check_shape(loaded_weight, full_shape(param, 0, sum(full_sizes)))
            for i, part in enumerate(loaded_weight.split(full_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        if shard_id not in self.shard_ids:
            raise ValueError(f"{type(self).__name__} shard id must be one of {self.shard_ids}, "
                             f"got {shard_id!r}")
        assert isinstance(shard_id, int)
        n = self.output_sizes_per_rank[shard_id]
        offset = sum(self.output_sizes_per_rank[:shard_id])
        check_shape(loaded_weight, full_shape(param, 0, n * self.tp_size))
        copy_checked(param.data.narrow(0, offset, n), loaded_weight.narrow(0, self.tp_rank * n, n))


class QKVParallelLinear(LinearBase):
    """The query, key and value projections fused into one column-parallel matmul, GQA-aware.

    Query heads split evenly across ranks. KV heads split too when there are at least tp_size of them;
    otherwise each KV head is replicated on tp_size / num_kv_heads consecutive ranks, so each rank keeps
    exactly one. Per rank the output is [q (num_heads * head_size); k; v (num_kv_heads * head_size each)].
    """

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = True, tp_rank: int = 0, tp_size: int = 1) -> None:
        check_tp(tp_rank, tp_size)
        num_heads = divide(total_num_heads, tp_size, "num_attention_heads")
        if total_num_kv_heads >= tp_size:
            num_kv_heads, kv_replicas = divide(total_num_kv_heads, tp_size, "num_key_value_heads"), 1
        elif tp_size % total_num_kv_heads == 0:
            num_kv_heads, kv_replicas = 1, tp_size // total_num_kv_heads
        else:
            raise ValueError(f"tp_size ({tp_size}) must divide or be a multiple of num_key_value_heads "
                             f"({total_num_kv_heads})")
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_size, bias, tp_rank, tp_size)
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.kv_replicas = kv_replicas
        self.q_size = num_heads * head_size
        self.kv_size = num_kv_heads * head_size

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, q_size + 2 kv_size] -> q [T, num_heads, head_size], k and v [T, num_kv_heads, head_size]."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (q.unflatten(-1, (self.num_heads, self.head_size)),
                k.unflatten(-1, (self.num_kv_heads, self.head_size)),
                v.unflatten(-1, (self.num_kv_heads, self.head_size)))

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None) -> None:
        """Shard "q", "k" or "v" of the full HF tensor; None means q, k, v fused in that order (GPT-2)."""
        if shard_id is None:
            sizes = [self.total_num_heads * self.head_size] + [self.total_num_kv_heads * self.head_size] * 2
            check_shape(loaded_weight, full_shape(param, 0, sum(sizes)))
            for part_id, part in zip(self.shard_ids, loaded_weight.split(sizes, dim=0), strict=True):
                self.weight_loader(param, part, part_id)
            return
        if shard_id == "q":
            offset, size, source_start = 0, self.q_size, self.tp_rank * self.q_size
            total_heads = self.total_num_heads
        elif shard_id in ("k", "v"):
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, source_start = self.kv_size, (self.tp_rank // self.kv_replicas) * self.kv_size
            total_heads = self.total_num_kv_heads
        else:
            raise ValueError(f"{type(self).__name__} shard id must be one of {self.shard_ids}, "
                             f"got {shard_id!r}")
        check_shape(loaded_weight, full_shape(param, 0, total_heads * self.head_size))
        copy_checked(param.data.narrow(0, offset, size), loaded_weight.narrow(0, source_start, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; each rank computes a partial sum of the full output.

    `reduce` adds the partial sums of all ranks (an all-reduce under tensor parallelism). The bias is
    added once: after `reduce` when there is one, else only by rank 0, so that summing the ranks'
    outputs elsewhere still counts it once.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, tp_rank: int = 0,
                 tp_size: int = 1, reduce: Reduce | None = None) -> None:
        super().__init__(divide(input_size, tp_size, "input size"), output_size, bias, tp_rank, tp_size)
        self.input_size_per_rank = self.weight.shape[1]
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in_per_rank] -> [T, output_size]."""
        if self.reduce is None:
            return functional.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        out = self.reduce(functional.linear(x, self.weight))
        return out if self.bias is None else out + self.bias

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None) -> None:
        """Columns [rank*n, (rank+1)*n) of the weight; the bias is whole on every rank."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard id, got {shard_id!r}")
        if param is self.bias:
            copy_checked(param.data, loaded_weight)
            return
        n = self.input_size_per_rank
        check_shape(loaded_weight, full_shape(param, 1, n * self.tp_size))
        copy_checked(param.data, loaded_weight.narrow(1, self.tp_rank * n, n))


# ---------------------------------------------------------------------------------------------------------
# Embeddings and the LM head


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary rows split across ranks.

    Rank r holds rows [r*n, r*n + n) with n = ceil(vocab / tp_size); rows past the vocabulary (on the last
    rank) are zero. A token outside the rank's rows embeds to zeros there, so `reduce` (an all-reduce
    under tensor parallelism) over the ranks yields the full embedding.
    """

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1,
                 reduce: Reduce | None = None) -> None:
        super().__init__()
        check_tp(tp_rank, tp_size)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.rows_per_rank = -(-num_embeddings // tp_size)
        self.vocab_start = min(tp_rank * self.rows_per_rank, num_embeddings)
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = empty_parameter(self.rows_per_rank, embedding_dim)   # [rows_per_rank, dim]
        self.reduce = reduce

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] int64 -> [T, embedding_dim]."""
        if self.tp_size == 1:
            return functional.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)        # [T] bool
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = functional.embedding(local, self.weight).masked_fill(outside[:, None], 0.0)
        return out if self.reduce is None else self.reduce(out)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None) -> None:
        """Rows [vocab_start, vocab_end) of the full [vocab, ...] tensor; padding rows become zero."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard id, got {shard_id!r}")
        check_shape(loaded_weight, full_shape(param, 0, self.num_embeddings))
        rows = self.vocab_end - self.vocab_start
        copy_checked(param.data[:rows], loaded_weight.narrow(0, self.vocab_start, rows))
        param.data[rows:].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits, split by vocabulary rows like the embedding.

    Calling it gives logits [N, vocab]: each rank computes its rows' logits, `gather` (an all-gather
    along the vocabulary under tensor parallelism) joins them, and padding columns are cut off.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False, tp_rank: int = 0,
                 tp_size: int = 1, gather: Reduce | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, tp_rank, tp_size)
        if bias:
            self.bias: nn.Parameter | None = empty_parameter(self.rows_per_rank)
        else:
            self.register_parameter("bias", None)
        self.gather = gather

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the input embedding's weight (tied word embeddings); it then loads through the embedding."""
        if embedding.weight.shape != self.weight.shape:
            raise ValueError(f"cannot tie an LM head of shape {tuple(self.weight.shape)} to an embedding of "
                             f"shape {tuple(embedding.weight.shape)}")
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, embedding_dim] -> [N, vocab] logits in the hidden dtype."""
        logits = functional.linear(hidden, self.weight, self.bias)   # [N, rows_per_rank]
        if self.gather is not None:
            logits = self.gather(logits)                    # [N, rows_per_rank * tp_size]
        return logits[:, : self.num_embeddings]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None) -> None:
        """Rows of the weight or entries of the bias for this rank's part of the vocabulary."""
        super().weight_loader(param, loaded_weight, shard_id)
