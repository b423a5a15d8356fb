"""BlockAllocator: a pool's ids are handed out lazily, in the order of one stack of every id."""

from __future__ import annotations

import pytest

from scheduler_svc.block_allocator import BlockAllocator, OutOfBlocksError


def test_a_huge_pool_costs_nothing_until_used():
    """The simulated executor's default swap space is 33.5M blocks: none is listed or counted up front."""
    pool = BlockAllocator("cpu", 2**25, 16)
    assert pool.num_free == 2**25 and pool.num_used == 0
    assert len(pool.ref_counts) == 0 and len(pool.fill) == 0 and not pool.free_ids
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert len(pool.ref_counts) == 3 and pool.num_free == 2**25 - 3
    pool.check_integrity({0: 1, 1: 1, 2: 1})


def test_freed_ids_are_reused_latest_first_before_fresh_ones():
    pool = BlockAllocator("gpu", 8, 4)
    blocks = [pool.allocate() for _ in range(4)]
    pool.decref(blocks[1])
    pool.decref(blocks[3])
    assert pool.num_free == 6
    assert [pool.allocate(), pool.allocate(), pool.allocate()] == [3, 1, 4]
    pool.check_integrity({0: 1, 1: 1, 2: 1, 3: 1, 4: 1})


def test_an_exhausted_pool_raises():
    pool = BlockAllocator("gpu", 2, 4)
    pool.allocate()
    pool.allocate()
    assert pool.num_free == 0
    with pytest.raises(OutOfBlocksError):
        pool.allocate()


def test_integrity_catches_a_table_entry_never_handed_out():
    pool = BlockAllocator("gpu", 8, 4)
    pool.allocate()
    with pytest.raises(AssertionError, match="never handed out"):
        pool.check_integrity({0: 1, 5: 1})
