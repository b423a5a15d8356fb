"""Paged KV caches for kernel tests: shuffled block tables, and caches poisoned with NaN outside the context.

A kernel that reads one slot too far -- another sequence's block, another layer, a position past a
sequence's length in its last block -- meets NaN and fails its comparison loudly.
"""

from __future__ import annotations

import random

import torch

from executor_svc.attention import AttentionMetadata, write_kv_reference


def shuffled_tables(rng: random.Random, lengths: list[int], block_size: int,
                    spare: int) -> tuple[int, list[list[int]]]:
    """Disjoint block tables covering each length, drawn from a shuffled pool with `spare` blocks unused.

    returns the pool size and the tables
    """
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + spare
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, start = [], 0
    for n in needed:
        tables.append(ids[start:start + n])
        start += n
    return num_blocks, tables


def poisoned_cache(rng: random.Random, lengths: list[int], num_layers: int, num_kv_heads: int, head_size: int,
                   block_size: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, list[list[int]]]:
    """A NaN-filled cache with random K/V at exactly the slots of each sequence's context, every layer.

    lengths are whole context lengths (cached plus new tokens: a step's K/V are written before attention)
    returns kv_cache [num_blocks, num_layers, 2, Hkv, B, D] and each sequence's shuffled block table
    """
    num_blocks, tables = shuffled_tables(rng, lengths, block_size, spare=7)   # a few blocks nobody owns
    cache = torch.full((num_blocks, num_layers, 2, num_kv_heads, block_size, head_size), float("nan"),
                       dtype=dtype, device=device)
    meta = AttentionMetadata.build([0] * len(lengths), lengths, tables, block_size, device)
    for layer in range(num_layers):
        k = torch.randn(meta.num_tokens, num_kv_heads, head_size, device=device)   # [L, Hkv, D]
        v = torch.randn(meta.num_tokens, num_kv_heads, head_size, device=device)
        write_kv_reference(cache[:, layer], k, v, meta.slot_mapping)
    return cache, tables
