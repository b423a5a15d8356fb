"""Paged attention: the per-step batch description, the KV write, and the torch reference kernels.

KV cache layout (block-major, chosen for the kernels and for swapping): one tensor for all layers,

    kv_cache: [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]

so one block id names one contiguous chunk holding that block's keys and values for every layer. A
swap or copy-on-write of a block is a single contiguous copy, and a run of consecutive block ids is
one large transfer. Inside a block, each (layer, K|V, kv head) tile is a contiguous
[block_size, head_size] matrix: a decode kernel working on one KV head loads whole tiles with
vectorised reads and shares them across the query heads of its GQA group. A layer's view is
`kv_cache[:, layer]`: [num_blocks, 2, num_kv_heads, block_size, head_size].

The forward batch is flat: all tokens of all scheduled sequences, sequence after sequence. Sequence i
computes `query_lens[i]` new tokens that sit at the end of its `seq_lens[i]` tokens of context.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from executor_svc import flash_prefill, ops
from executor_svc.transfer import to_device

# Sequences whose new chunk has at least this many tokens attend through the paged gather +
# FlashAttention-2 path (executor_svc/flash_prefill.py); shorter chunks and decode use our kernel. A step
# that mixes both is split, so the gather copies only the long chunks' context, never that of the
# hundreds of decoding sequences that share their step. Measured on an H200
# (benchmarks/results/paged_attention_h200.md, prefill table): our kernel wins every 16-token chunk and
# most 128-token ones (the gather costs more than it saves), FA2 wins from 512 on (up to 4.8x at 2048:
# our mma.sync kernel re-reads K/V per 16 query rows).
FLASH_PREFILL_MIN_QUERY_LEN = 256


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where a step's tokens go in the KV cache and what each one attends to.

    T = tokens in the step, S = sequences in the step.
    """

    slot_mapping: torch.Tensor      # [T] int64: block_id * block_size + offset for each new token
    positions: torch.Tensor         # [T] int64: position of each new token in its sequence
    query_start_loc: torch.Tensor   # [S + 1] int64: token range of sequence i is [start[i], start[i+1])
    seq_lens: torch.Tensor          # [S] int64: context length of each sequence including this step
    block_tables: torch.Tensor      # [S, max_blocks] int32: physical blocks, padded with 0
    block_size: int
    max_query_len: int
    max_seq_len: int
    query_lens_list: tuple[int, ...]   # the same lengths on the host, for loops that need them
    seq_lens_list: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        """T."""
        return int(self.slot_mapping.shape[0])

    @property
    def num_seqs(self) -> int:
        """S."""
        return len(self.seq_lens_list)

    @property
    def is_decode_only(self) -> bool:
        """Every sequence computes exactly one token (the decode kernel's case)."""
        return self.max_query_len == 1

    def select(self, seqs: Sequence[int]) -> tuple[AttentionMetadata, torch.Tensor]:
        """The metadata of a subset of this step's sequences, as if they were a step of their own, and
        where their tokens sit among this step's tokens.

        seqs: indices of the chosen sequences, in step order
        returns the subset's metadata and token_index: [T_sub] int64, its tokens' rows in this step
        """
        device = self.seq_lens.device
        starts = np.zeros(len(self.query_lens_list) + 1, np.int64)                       # [S + 1]
        np.cumsum(self.query_lens_list, out=starts[1:])
        query_lens = [self.query_lens_list[i] for i in seqs]
        seq_lens = [self.seq_lens_list[i] for i in seqs]
        token_rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in seqs]) if seqs else \
            np.zeros(0, np.int64)
        token_index = to_device(token_rows, torch.int64, device)                           # [T_sub]
        seq_index = to_device(list(seqs), torch.int64, device)                             # [S_sub]
        sub_starts = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum(query_lens, out=sub_starts[1:])
        meta = AttentionMetadata(slot_mapping=self.slot_mapping.index_select(0, token_index),
                                 positions=self.positions.index_select(0, token_index),
                                 query_start_loc=to_device(sub_starts, torch.int64, device),
                                 seq_lens=self.seq_lens.index_select(0, seq_index),
                                 block_tables=self.block_tables.index_select(0, seq_index),
                                 block_size=self.block_size, max_query_len=max(query_lens, default=0),
                                 max_seq_len=max(seq_lens, default=0), query_lens_list=tuple(query_lens),
                                 seq_lens_list=tuple(seq_lens))
        return meta, token_index

    @classmethod
    def build(cls, start_positions: Sequence[int], query_lens: Sequence[int],
              block_tables: Sequence[Sequence[int]], block_size: int,
              device: torch.device | str = "cpu") -> AttentionMetadata:
        """From each sequence's first new position, new-token count and full block table."""
        positions, slots = [], []
        for start, n, table in zip(start_positions, query_lens, block_tables, strict=True):
            for p in range(start, start + n):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
        seq_lens = [s + n for s, n in zip(start_positions, query_lens, strict=True)]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, device)     # queued, not waited for: a forward may be running

        tables = to_device(_padded_tables(block_tables), torch.int32, device)
        return cls(slot_mapping=tensor(slots, torch.int64), positions=tensor(positions, torch.int64),
                   query_start_loc=tensor(starts, torch.int64), seq_lens=tensor(seq_lens, torch.int64),
                   block_tables=tables,
                   block_size=block_size, max_query_len=max(query_lens, default=0),
                   max_seq_len=max(seq_lens, default=0), query_lens_list=tuple(query_lens),
                   seq_lens_list=tuple(seq_lens))


def _padded_tables(block_tables: Sequence[Sequence[int]]) -> np.ndarray:
    """The tables as one [S, longest] int32 array padded with 0.

    Built with one flat copy and a mask rather than per-element Python: this runs on every step, for
    every sequence, before the GPU can start.
    """
    lengths = np.fromiter(map(len, block_tables), np.int64, len(block_tables))       # [S]
    width = int(lengths.max()) if len(lengths) else 0
    flat = np.fromiter(itertools.chain.from_iterable(block_tables), np.int32, int(lengths.sum()))
    tables = np.zeros((len(block_tables), width), np.int32)                          # [S, width]
    tables[np.arange(width) < lengths[:, None]] = flat          # row-major: each row's ids in order
    return tables


def write_kv_reference(layer_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Store new keys and values in their slots (what the fused reshape-and-cache kernel does).

    layer_cache:  [num_blocks, 2, num_kv_heads, block_size, head_size]
    key, value:   [T, num_kv_heads, head_size]
    slot_mapping: [T] int64
    """
    block_size = layer_cache.shape[3]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    # Advanced indices split by a slice put the indexed dimension first: [T, num_kv_heads, head_size].
    layer_cache[blocks, 0, :, offsets] = key.to(layer_cache.dtype)
    layer_cache[blocks, 1, :, offsets] = value.to(layer_cache.dtype)


def gather_context(layer_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values read through its block table.

    layer_cache: [num_blocks, 2, num_kv_heads, block_size, head_size]
    block_table: [>= ceil(seq_len / block_size)] int
    returns k, v: [seq_len, num_kv_heads, head_size]
    """
    block_size = layer_cache.shape[3]
    blocks = block_table[: -(-seq_len // block_size)].long()
    kv = layer_cache[blocks]                                   # [nb, 2, Hkv, B, D]
    kv = kv.permute(1, 0, 3, 2, 4).flatten(1, 2)[:, :seq_len]  # [2, nb * B, Hkv, D] -> [2, L, Hkv, D]
    return kv[0], kv[1]


def paged_attention_reference(query: torch.Tensor, layer_cache: torch.Tensor, meta: AttentionMetadata,
                              scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached context, in float32.

    query:       [T, num_heads, head_size]; num_heads a multiple of num_kv_heads (GQA)
    layer_cache: [num_blocks, 2, num_kv_heads, block_size, head_size], already holding this step's K/V
    returns      [T, num_heads, head_size] in the query's dtype
    """
    out = torch.empty_like(query)
    num_heads, num_kv_heads = query.shape[1], layer_cache.shape[2]
    group = num_heads // num_kv_heads
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list, strict=True)):
        q = query[start:start + q_len].float()                # [Lq, H, D]
        k, v = gather_context(layer_cache, meta.block_tables[i], seq_len)
        k = k.float().repeat_interleave(group, dim=1)         # [L, H, D]
        v = v.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale   # [H, Lq, L]
        # Query j sits at position seq_len - q_len + j and sees keys up to that position.
        query_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        key_pos = torch.arange(seq_len, device=query.device)
        scores = scores.masked_fill(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(query.dtype)
        start += q_len
    return out


@dataclass(frozen=True, slots=True)
class SequenceSubset:
    """Some of a step's sequences attended together: their metadata and their token rows in the step."""

    meta: AttentionMetadata
    token_index: torch.Tensor       # [T_sub] int64


def split_by_chunk_length(query_lens: Sequence[int], threshold: int) -> tuple[list[int], list[int]]:
    """Indices of the sequences with at least `threshold` new tokens, and of the others."""
    long = [i for i, n in enumerate(query_lens) if n >= threshold]
    short = [i for i, n in enumerate(query_lens) if n < threshold]
    return long, short


@dataclass(slots=True)
class ForwardContext:
    """What every attention layer of a model needs during one forward pass."""

    kv_cache: torch.Tensor          # [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
    meta: AttentionMetadata
    # Built on first use and shared by every layer: the int32 kernel arguments of each metadata the
    # context owns (its own and its split's, keyed by id: they live as long as the context), and the
    # split of a step that mixes long chunks with decodes.
    _kernel_args: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # Likewise the cache rows the FA2 path gathers, per metadata: a layer only adds its offset.
    _gather_rows: dict[int, flash_prefill.GatherRows] = field(default_factory=dict)
    _split: tuple[SequenceSubset, SequenceSubset] | None = None
    _split_decided: bool = False

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Write this step's K/V of `layer` into the cache, then attend over the cached context.

        query: [T, num_heads, head_size]; key, value: [T, num_kv_heads, head_size]
        returns [T, num_heads, head_size]
        """
        if self.kv_cache.is_cuda and ops.kernels_enabled():
            ops.reshape_and_cache(key, value, self.kv_cache, layer, self.meta.slot_mapping)
            if ops.attention_supported(query, self.kv_cache):
                return self._attend_with_kernel(layer, query, scale)
            return paged_attention_reference(query, self.kv_cache[:, layer], self.meta, scale)
        layer_cache = self.kv_cache[:, layer]
        write_kv_reference(layer_cache, key, value, self.meta.slot_mapping)
        return paged_attention_reference(query, layer_cache, self.meta, scale)

    def _attend_with_kernel(self, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode or prefill over paged context on the GPU: our kernel, or gather + FA2 for long chunks.

        query: [T, H, D]; returns [T, H, D]
        """
        meta = self.meta
        if meta.max_query_len < FLASH_PREFILL_MIN_QUERY_LEN or not flash_prefill.flash_supported(
                query, self.kv_cache):
            return self._paged_kernel(layer, query, scale, meta)
        split = self._split_step()
        if split is None:                   # every sequence has a long chunk
            return self._flash(layer, query, scale, meta)
        long, short = split
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)             # [T, H, D]
        out.index_copy_(0, long.token_index, self._flash(
            layer, query.index_select(0, long.token_index), scale, long.meta))
        out.index_copy_(0, short.token_index, self._paged_kernel(
            layer, query.index_select(0, short.token_index), scale, short.meta))
        return out

    def _split_step(self) -> tuple[SequenceSubset, SequenceSubset] | None:
        """The step's long-chunk and short (decode) sequences as two groups; None when none is short.
        Decided by the first layer that asks, for all of them."""
        if not self._split_decided:
            self._split_decided = True
            long, short = split_by_chunk_length(self.meta.query_lens_list, FLASH_PREFILL_MIN_QUERY_LEN)
            if short:
                self._split = (SequenceSubset(*self.meta.select(long)),
                               SequenceSubset(*self.meta.select(short)))
        return self._split

    def _flash(self, layer: int, query: torch.Tensor, scale: float, meta: AttentionMetadata) -> torch.Tensor:
        """Gather + FA2 over `meta`'s sequences, their cache rows worked out by the first layer that asks.
        query: [T, H, D]; returns [T, H, D]."""
        rows = self._gather_rows.get(id(meta))
        if rows is None:
            rows = self._gather_rows[id(meta)] = flash_prefill.gather_rows(
                self.kv_cache, meta.block_tables, meta.seq_lens_list, meta.seq_lens)
        return flash_prefill.paged_flash_attention(query, self.kv_cache, layer, meta, scale, rows)

    def _paged_kernel(self, layer: int, query: torch.Tensor, scale: float,
                      meta: AttentionMetadata) -> torch.Tensor:
        """Our paged attention kernel over `meta`'s sequences. query: [T, H, D]; returns [T, H, D]."""
        args = self._kernel_args.get(id(meta))
        if args is None:
            # int32 copies made once per forward pass, not once per layer. Decode passes no token
            # offsets: the kernel then maps sequence i to query row i.
            seq_lens = meta.seq_lens.to(torch.int32)                                           # [S]
            starts = None if meta.is_decode_only else meta.query_start_loc.to(torch.int32)     # [S+1]
            args = self._kernel_args[id(meta)] = (seq_lens, starts)
        seq_lens, starts = args
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)              # [T, H, D]
        return ops.paged_attention(out, query, self.kv_cache, layer, meta.block_tables, seq_lens, starts,
                                   scale, meta.max_seq_len, meta.max_query_len)
