"""KV pools: swap and copy move exactly the named blocks, in few transfers."""

import pytest

torch = pytest.importorskip("torch")

from executor_svc.kv_cache import CacheShape, KVCache, coalesce  # noqa: E402

SHAPE = CacheShape(num_layers=2, num_kv_heads=2, block_size=4, head_size=8, dtype=torch.float32)


def filled_cache(num_gpu: int = 16, num_cpu: int = 16) -> KVCache:
    cache = KVCache(SHAPE, num_gpu, num_cpu, torch.device("cpu"))
    for b in range(num_gpu):
        cache.gpu[b] = b + 1          # each block holds its own id + 1 everywhere
    cache.cpu.zero_()                 # pools start uninitialised; zero to see which blocks a copy wrote
    return cache


def test_block_bytes_counts_every_layer_keys_and_values():
    assert SHAPE.block_bytes == 2 * 2 * 2 * 4 * 8 * 4
    assert CacheShape(32, 32, 16, 128, torch.bfloat16).block_bytes == 32 * 2 * 32 * 16 * 128 * 2


def test_coalesce_merges_consecutive_pairs():
    assert coalesce([(5, 1), (3, 9), (4, 10), (6, 2), (7, 7)]) == [(3, 9, 2), (5, 1, 2), (7, 7, 1)]


@pytest.mark.parametrize(("pairs", "transfers"), [
    ([(2, 0), (3, 1), (4, 2)], 1),                                   # one run: one slice copy
    ([(2, 0), (3, 1), (8, 6)], 2),                                   # two runs
    ([(9, 0), (1, 5), (12, 3), (7, 11), (0, 2), (15, 8)], 1),         # scattered: gathered once
])
def test_swap_out_and_in_round_trip(pairs, transfers):
    cache = filled_cache()
    cache.swap_out(pairs)
    assert cache.transfers == transfers
    for g, c in pairs:
        assert torch.equal(cache.cpu[c], cache.gpu[g])
    untouched = [c for c in range(16) if c not in {c for _, c in pairs}]
    assert all(cache.cpu[c].abs().sum() == 0 for c in untouched)
    back = [(c, (g + 3) % 16) for g, c in pairs]
    expected = {(g + 3) % 16: g + 1 for g, _ in pairs}
    cache.swap_in(back)
    for block, value in expected.items():
        assert torch.all(cache.gpu[block] == value)


def test_copy_on_write_pairs_copy_whole_blocks_at_once():
    cache = filled_cache()
    cache.copy_blocks([(1, 8), (1, 9), (4, 10)])
    assert torch.all(cache.gpu[8] == 2) and torch.all(cache.gpu[9] == 2) and torch.all(cache.gpu[10] == 5)
    assert torch.all(cache.gpu[1] == 2)
