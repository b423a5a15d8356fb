"""Prefill over paged context with a library kernel: a paged gather feeding FlashAttention-2 varlen.

A prompt chunk that follows cached tokens attends over context scattered across KV blocks. Instead of a
paged kernel of our own, this path copies each sequence's context out of the block pool into one packed
[sum(seq_lens), num_kv_heads, head_size] K and V (a single batched index_select for all sequences), then
runs the FlashAttention-2 variable-length kernel that PyTorch ships (`aten::_flash_attention_forward`)
on the packed tensors. FA2 varlen handles GQA itself (num_kv_heads divides num_heads) and aligns its
causal mask to the bottom right when a sequence has fewer queries than keys, which is our semantics:
query token j of a sequence with q_len new tokens and seq_len context sits at position
seq_len - q_len + j and sees keys 0..that position.

The cost over a paged kernel is the gather: one extra read and write of every context token's K and V
per layer per step. See executor_svc/attention.py for the cache layout and the batch description.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from executor_svc.attention import AttentionMetadata

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_SIZE = 256
FLASH_MIN_CAPABILITY = (8, 0)      # FA2 kernels are built for sm80 and run on later GPUs


def flash_available(device: torch.device | str) -> bool:
    """True when PyTorch's FlashAttention-2 varlen kernel can run on `device` (a CUDA GPU of sm80+).

    The answer is cached per device.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _flash_available_on(index)


@functools.cache
def _flash_available_on(index: int) -> bool:
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    # A build without flash attention (some wheels, ROCm without it) still registers the op name.
    built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
    return bool(built) and torch.cuda.get_device_capability(index) >= FLASH_MIN_CAPABILITY


def flash_supported(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """True when `paged_flash_attention` can serve this query and cache.

    query:    [T, num_heads, head_size]
    kv_cache: [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
    Needs fp16 or bf16 (both tensors alike), a head size FA2 instantiates (a multiple of 8 up to 256),
    num_kv_heads dividing num_heads, a contiguous cache, and `flash_available` on the query's device.
    """
    if query.dim() != 3 or kv_cache.dim() != 6:
        return False
    head_size, num_heads, num_kv_heads = query.shape[2], query.shape[1], kv_cache.shape[3]
    return (query.dtype in FLASH_DTYPES and kv_cache.dtype == query.dtype
            and kv_cache.shape[5] == head_size and head_size % 8 == 0 and head_size <= FLASH_MAX_HEAD_SIZE
            and num_heads % num_kv_heads == 0
            and kv_cache.is_contiguous() and kv_cache.device == query.device
            and flash_available(query.device))


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    """[S] int64 lengths -> [S + 1] int64 offsets starting at 0."""
    return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))


def _context_slots(block_tables: torch.Tensor, seq_lens: torch.Tensor, starts: torch.Tensor, total: int,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block id and in-block offset of every context token of every sequence, sequence after sequence.

    block_tables: [S, max_blocks] int; seq_lens: [S] int64; starts: [S] int64 offsets of each sequence
    returns blocks, offsets: [total] int64
    """
    seq_ids = torch.arange(seq_lens.shape[0], device=seq_lens.device)                      # [S]
    # output_size keeps repeat_interleave from reading the lengths back to the host (a sync).
    token_seq = torch.repeat_interleave(seq_ids, seq_lens, output_size=total)             # [total]
    positions = torch.arange(total, device=seq_lens.device) - starts[token_seq]            # [total]
    blocks = block_tables[token_seq, positions // block_size].long()                      # [total]
    return blocks, positions % block_size


@dataclass(frozen=True, slots=True)
class GatherRows:
    """Where a step's context K/V sit in the cache, for every layer: computed once per forward pass.

    rows of layer l are `layer0_rows + l * layer_rows`, in the cache viewed as [rows, D].
    """

    layer0_rows: torch.Tensor   # [2 * total * Hkv] int64: K then V rows of every context token, layer 0
    layer_rows: int             # rows between one layer's vectors and the next's
    total: int                  # context tokens of all sequences
    cu_seq_k: torch.Tensor      # [S + 1] int32


def gather_paged_kv(kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                    seq_lens_list: Sequence[int], seq_lens: torch.Tensor | None = None,
                    rows: GatherRows | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack every sequence's cached keys and values of `layer` into contiguous K and V.

    kv_cache:      [num_blocks, num_layers, 2, Hkv, block_size, D], contiguous
    block_tables:  [S, max_blocks] int32, rows padded past each sequence's blocks
    seq_lens_list: the S context lengths on the host (sizes the output without a device sync)
    seq_lens:      [S] int64, the same lengths already on the cache's device (optional, saves a copy)
    rows:          `gather_rows` of these arguments (optional: a forward pass computes it once, not per
                   layer, which saves a dozen kernel launches a layer)
    returns key, value: [sum(seq_lens), Hkv, D] contiguous, sequence i's tokens in order at
            cu_seq_k[i]:cu_seq_k[i + 1]; cu_seq_k: [S + 1] int32
    """
    if not kv_cache.is_contiguous():
        raise ValueError("gather_paged_kv needs a contiguous kv_cache")
    _, num_layers, _, num_kv_heads, _, head_size = kv_cache.shape
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range for a cache of {num_layers} layers")
    if rows is None:
        rows = gather_rows(kv_cache, block_tables, seq_lens_list, seq_lens)
    # One index_select copies whole D-wide rows for K and V of all sequences at once; its output is a
    # fresh contiguous [2 * total * Hkv, D], so K and V are contiguous halves of it.
    packed = kv_cache.view(-1, head_size).index_select(0, rows.layer0_rows + layer * rows.layer_rows)
    packed = packed.view(2, rows.total, num_kv_heads, head_size)             # [2, total, Hkv, D]
    return packed[0], packed[1], rows.cu_seq_k


def gather_rows(kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens_list: Sequence[int],
                seq_lens: torch.Tensor | None = None) -> GatherRows:
    """The cache rows `gather_paged_kv` copies, for every layer (arguments as there)."""
    _, _, _, num_kv_heads, block_size, head_size = kv_cache.shape
    device = kv_cache.device
    if seq_lens is None:
        seq_lens = torch.tensor(seq_lens_list, dtype=torch.int64, device=device)             # [S]
    seq_lens = seq_lens.to(device=device, dtype=torch.int64)
    total = int(sum(seq_lens_list))
    offsets = _cumulative(seq_lens)                                                          # [S + 1]
    blocks, in_block = _context_slots(block_tables.to(device), seq_lens, offsets[:-1], total, block_size)

    # Row r of the cache viewed as [rows, D] is one (block, layer, K|V, kv head, offset) vector; with
    # the cache contiguous, its row stride per dimension is the element stride divided by D.
    block_rows, layer_rows, kv_rows, head_rows, offset_rows = (s // head_size for s in kv_cache.stride()[:5])
    token_rows = blocks * block_rows + in_block * offset_rows                                 # [total]
    heads = torch.arange(num_kv_heads, device=device) * head_rows                             # [Hkv]
    kv = torch.arange(2, device=device) * kv_rows                                            # [2]
    rows = kv[:, None, None] + token_rows[None, :, None] + heads[None, None, :]              # [2, total, Hkv]
    return GatherRows(rows.flatten(), layer_rows, total, offsets.to(torch.int32))


def paged_flash_attention(query: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata,
                          scale: float, rows: GatherRows | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context, by FA2 varlen.

    query:    [T, num_heads, head_size] fp16/bf16, all new tokens of all sequences (flat, as in `meta`)
    kv_cache: [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size], already holding this
              step's K/V of `layer`
    returns   [T, num_heads, head_size] in the query's dtype
    rows:     `gather_rows` of `meta` over this cache, shared by the layers of a forward pass (optional)
    Call only where `flash_supported(query, kv_cache)` holds.
    """
    key, value, cu_seq_k = gather_paged_kv(kv_cache, layer, meta.block_tables, meta.seq_lens_list,
                                           meta.seq_lens, rows)                            # [L, Hkv, D]
    cu_seq_q = meta.query_start_loc.to(torch.int32)                                         # [S + 1]
    if query.stride(-1) != 1:
        query = query.contiguous()       # FA2 takes strided rows and heads but needs unit-stride D
    # Positional arguments up to return_debug_mask plus the `scale` keyword: the part of the schema
    # that every PyTorch release since 2.2 shares (later ones append optional keywords).
    outputs = torch.ops.aten._flash_attention_forward(
        query, key, value, cu_seq_q, cu_seq_k, meta.max_query_len, meta.max_seq_len,
        0.0,        # dropout_p
        True,       # is_causal: bottom-right aligned when a sequence's q_len < seq_len
        False,      # return_debug_mask
        scale=scale,
    )
    return outputs[0]                                                                       # [T, H, D]
