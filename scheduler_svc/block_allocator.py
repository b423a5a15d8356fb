"""A pool of physical KV blocks on one device, with reference counts and per-block fill."""

from __future__ import annotations

from scheduler_svc.prefix_cache import PrefixCache


class OutOfBlocksError(RuntimeError):
    """Raised when a block is requested from an empty pool; callers check `num_free` first."""


class BlockAllocator:
    """Hands out block ids 0..num_blocks-1 of one device (GPU or CPU swap space).

    A block is free exactly when its reference count is 0. Shared blocks (parallel sampling, beams,
    copy-on-write) carry one reference per block-table entry that points at them. `fill[b]` counts the
    token slots of block b that hold a token, so KV utilization is O(1) to report.

    With a prefix cache, a cached block that loses its last reference is parked there instead of
    joining the free list: it still counts as free, and is evicted (its contents forgotten) only when
    no plain free block is left.

    Ids from `fresh` up have never been handed out: they are free without being listed, and
    `ref_counts` and `fill` cover only the ids below it, so a pool of millions of blocks (the simulated
    executor's swap space holds 33.5M at the default 4 GiB) costs nothing until it is used.
    """

    __slots__ = ("block_size", "device", "fill", "filled_slots", "free_ids", "fresh", "num_blocks",
                 "prefix_cache", "ref_counts", "total_refs")

    def __init__(self, device: str, num_blocks: int, block_size: int,
                 prefix_cache: PrefixCache | None = None) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.device = device
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Ids handed back, a stack reused before any fresh id; fresh ids go out lowest first. Together
        # that is the order of one stack of every id from the lowest, which keeps runs readable in tests.
        self.free_ids: list[int] = []
        self.fresh = 0
        self.ref_counts: list[int] = []
        self.fill: list[int] = []
        self.filled_slots = 0
        self.total_refs = 0     # block-table entries pointing into the pool: the blocks used without sharing
        self.prefix_cache = prefix_cache

    @property
    def num_free(self) -> int:
        """Blocks with no reference (cached ones included: they are evicted on demand)."""
        cache = self.prefix_cache
        fresh = self.num_blocks - self.fresh
        return len(self.free_ids) + fresh + (len(cache.evictable) if cache is not None else 0)

    @property
    def num_used(self) -> int:
        """Blocks with at least one reference."""
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        """Take a free block with one reference: a plain free one, else the least recently parked
        cached block (whose contents are then forgotten)."""
        if self.free_ids:
            block = self.free_ids.pop()
        elif self.fresh < self.num_blocks:
            block = self.fresh
            self.fresh += 1
            self.ref_counts.append(0)
            self.fill.append(0)
        elif self.prefix_cache is not None and self.prefix_cache.evictable:
            block = self.prefix_cache.evict()
        else:
            raise OutOfBlocksError(f"no free {self.device} block (all {self.num_blocks} in use)")
        self.ref_counts[block] = 1
        self.total_refs += 1
        return block

    def take_cached(self, block: int) -> None:
        """Add a reference to a cached block found by a prefix lookup (parked or in use); it is full."""
        if self.ref_counts[block] == 0:
            assert self.prefix_cache is not None
            self.prefix_cache.unpark(block)
        self.ref_counts[block] += 1
        self.total_refs += 1
        self.set_fill(block, self.block_size)

    def clear_prefix_cache(self) -> None:
        """Forget every cached block's contents; parked ones join the free list."""
        if self.prefix_cache is not None:
            self.free_ids.extend(self.prefix_cache.clear())

    def incref(self, block: int) -> None:
        """Add a reference to a block already in use (sharing)."""
        assert self.ref_counts[block] > 0, f"{self.device} block {block} is free"
        self.ref_counts[block] += 1
        self.total_refs += 1

    def decref(self, block: int) -> None:
        """Drop a reference; the block returns to the pool when the last one goes."""
        count = self.ref_counts[block] - 1
        assert count >= 0, f"{self.device} block {block} freed twice"
        self.ref_counts[block] = count
        self.total_refs -= 1
        if count == 0:
            self.filled_slots -= self.fill[block]
            self.fill[block] = 0
            if self.prefix_cache is not None and self.prefix_cache.holds(block):
                self.prefix_cache.park(block)
            else:
                self.free_ids.append(block)

    def set_fill(self, block: int, slots: int) -> None:
        """Record that `slots` leading token slots of `block` hold tokens (never decreases it)."""
        old = self.fill[block]
        if slots > old:
            self.fill[block] = slots
            self.filled_slots += slots - old

    def clear_fill(self, block: int) -> None:
        """Mark a block as holding no token (a reserved block handed back unused)."""
        self.filled_slots -= self.fill[block]
        self.fill[block] = 0

    def check_integrity(self, expected_refs: dict[int, int]) -> None:
        """Assert the pool's invariants against the references block tables actually hold.

        free + used = total; no free id twice; a block is free iff it has no reference; every
        reference count equals the number of table entries pointing at the block; fill is in range.
        """
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), f"{self.device}: a block id is free twice"
        assert len(self.ref_counts) == len(self.fill) == self.fresh <= self.num_blocks, (
            f"{self.device}: {self.fresh} ids handed out, but {len(self.ref_counts)} counted")
        never = [block for block in expected_refs if block >= self.fresh]
        assert not never, f"{self.device} blocks {never[:5]} are in tables but were never handed out"
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity(self.ref_counts)
            assert not free & set(self.prefix_cache.evictable), f"{self.device}: a parked block is free too"
            free |= set(self.prefix_cache.evictable)
        used = sum(1 for c in self.ref_counts if c > 0)
        fresh = self.num_blocks - self.fresh
        assert len(free) + fresh + used == self.num_blocks, (
            f"{self.device}: free {len(free)} + never used {fresh} + used {used} != total {self.num_blocks}")
        for block, count in enumerate(self.ref_counts):
            want = expected_refs.get(block, 0)
            assert count == want, f"{self.device} block {block}: ref count {count}, tables hold {want}"
            assert (count == 0) == (block in free), f"{self.device} block {block}: free-list mismatch"
            assert 0 <= self.fill[block] <= self.block_size, f"{self.device} block {block}: bad fill"
            assert count > 0 or self.fill[block] == 0, f"{self.device} free block {block} has fill"
        assert self.filled_slots == sum(self.fill), f"{self.device}: filled-slot total drifted"
        assert self.total_refs == sum(self.ref_counts), f"{self.device}: reference total drifted"
