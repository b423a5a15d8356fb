"""The paged gather that feeds the library prefill kernel, against the reference's per-sequence reads.

Runs on the CPU: the gather is plain torch indexing, the same on every device.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from paged_cache_helpers import shuffled_tables  # noqa: E402

from executor_svc.attention import AttentionMetadata, gather_context  # noqa: E402
from executor_svc.flash_prefill import flash_available, flash_supported, gather_paged_kv  # noqa: E402

NUM_LAYERS = 3


def random_lengths(rng: random.Random, batch: int, block_size: int) -> list[int]:
    """Context lengths around block boundaries and in between, never all multiples of the block size."""
    edge = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5]
    lengths = [max(1, rng.choice(edge)) if rng.random() < 0.4 else rng.randint(1, 300) for _ in range(batch)]
    lengths[0] = rng.randrange(block_size) + block_size * rng.randint(0, 6) + 1   # a partial last block
    return lengths


def expected_kv(kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated per-sequence reads of attention.gather_context: k, v [sum(lengths), Hkv, D]."""
    parts = [gather_context(kv_cache[:, layer], block_tables[i], n) for i, n in enumerate(lengths)]
    return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])


CASES = [(seed, block_size, heads) for seed in range(4) for block_size in (1, 5, 8, 16, 32)
         for heads in ((1, 64), (2, 16), (4, 8))]


@pytest.mark.parametrize("seed,block_size,heads", CASES)
def test_gather_matches_per_sequence_context(seed: int, block_size: int, heads: tuple[int, int]) -> None:
    num_kv_heads, head_size = heads
    rng = random.Random(f"{seed} {block_size} {heads}")
    torch.manual_seed(seed)
    lengths = random_lengths(rng, rng.randint(1, 8), block_size)
    num_blocks, tables = shuffled_tables(rng, lengths, block_size, spare=5)
    kv_cache = torch.randn(num_blocks, NUM_LAYERS, 2, num_kv_heads, block_size, head_size)
    # Padded [S, max_blocks] int32 tables, as the executor builds them.
    meta = AttentionMetadata.build([0] * len(lengths), lengths, tables, block_size)
    layer = rng.randrange(NUM_LAYERS)

    key, value, cu_seq_k = gather_paged_kv(kv_cache, layer, meta.block_tables, meta.seq_lens_list)

    exp_k, exp_v = expected_kv(kv_cache, layer, meta.block_tables, lengths)
    assert key.shape == value.shape == (sum(lengths), num_kv_heads, head_size)
    assert key.is_contiguous() and value.is_contiguous()
    assert torch.equal(key, exp_k)
    assert torch.equal(value, exp_v)
    assert cu_seq_k.dtype == torch.int32
    assert cu_seq_k.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]


def test_gather_takes_device_lengths_and_reduced_precision() -> None:
    """seq_lens passed as a tensor gives the same result; half-precision caches are copied exactly."""
    rng = random.Random(7)
    lengths = [17, 1, 64, 33]
    num_blocks, tables = shuffled_tables(rng, lengths, 16, spare=5)
    kv_cache = torch.randn(num_blocks, NUM_LAYERS, 2, 2, 16, 32).to(torch.bfloat16)
    meta = AttentionMetadata.build([n - 3 if n > 3 else 0 for n in lengths],
                                   [3 if n > 3 else n for n in lengths], tables, 16)
    from_list = gather_paged_kv(kv_cache, 2, meta.block_tables, meta.seq_lens_list)
    from_tensor = gather_paged_kv(kv_cache, 2, meta.block_tables, meta.seq_lens_list, meta.seq_lens)
    exp_k, exp_v = expected_kv(kv_cache, 2, meta.block_tables, lengths)
    for key, value, _ in (from_list, from_tensor):
        assert key.dtype == torch.bfloat16
        assert torch.equal(key, exp_k) and torch.equal(value, exp_v)


def test_gather_reads_only_the_context_slots() -> None:
    """With every slot outside the sequences' context NaN, the gathered K/V hold no NaN."""
    rng = random.Random(11)
    block_size, lengths = 8, [13, 8, 1, 30]
    num_blocks, tables = shuffled_tables(rng, lengths, block_size, spare=5)
    kv_cache = torch.full((num_blocks, NUM_LAYERS, 2, 2, block_size, 16), float("nan"))
    meta = AttentionMetadata.build([0] * len(lengths), lengths, tables, block_size)
    for layer in range(NUM_LAYERS):
        blocks, offsets = meta.slot_mapping // block_size, meta.slot_mapping % block_size
        kv_cache[blocks, layer, :, :, offsets] = torch.randn(meta.num_tokens, 2, 2, 16)
    for layer in range(NUM_LAYERS):
        key, value, _ = gather_paged_kv(kv_cache, layer, meta.block_tables, meta.seq_lens_list)
        assert not key.isnan().any() and not value.isnan().any()


def test_gather_rejects_a_strided_cache_and_a_bad_layer() -> None:
    kv_cache = torch.zeros(4, 2, 2, 1, 8, 16)
    tables = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        gather_paged_kv(kv_cache.transpose(4, 5), 0, tables, [3])
    with pytest.raises(ValueError, match="layer 2 out of range"):
        gather_paged_kv(kv_cache, 2, tables, [3])


def test_flash_is_never_picked_on_the_cpu() -> None:
    query = torch.zeros(4, 8, 64, dtype=torch.float16)
    kv_cache = torch.zeros(4, 1, 2, 2, 16, 64, dtype=torch.float16)
    assert not flash_available("cpu")
    assert not flash_supported(query, kv_cache)
