"""Logical-to-physical block tables for every sequence: allocation, copy-on-write, fork, swap.

Each `can_*` check is paired with its action and the scheduler calls the check first; the actions
assume it passed. All block ids here are the executors' ids: they hold K/V exactly where this says.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Iterator

from scheduler_svc.block_allocator import BlockAllocator
from scheduler_svc.config import ReservationMode
from scheduler_svc.prefix_cache import ROOT, PrefixCache
from scheduler_svc.reservation import reserved_tokens
from scheduler_svc.sequence import Sequence, SequenceGroup, SequenceStatus


class AllocStatus(enum.Enum):
    """Whether a group can get the blocks it asks for."""

    OK = "ok"
    LATER = "later"          # not now: wait for blocks to be freed
    NEVER = "never"          # more blocks than the pool holds: the group must fail


class BlockManager:
    """Owns the GPU and CPU block pools and the block table of every live sequence.

    In PAGED mode blocks are taken on demand and shared with reference counts; in the reserving modes
    (Orca emulation) each sequence takes its whole reservation at admission and nothing is shared.
    A watermark of free GPU blocks is kept back from admission and swap-in so that running sequences
    can keep appending without an immediate preemption. With `prefix_caching` (PAGED mode), full
    prompt blocks are cached by content and an admitted prompt starts with the longest cached prefix.
    """

    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int, watermark: float = 0.01,
                 reservation: ReservationMode = ReservationMode.PAGED, max_model_len: int = 1 << 30,
                 prefix_caching: bool = False) -> None:
        self.block_size = block_size
        self.prefix_cache = PrefixCache(block_size) if prefix_caching else None
        self.gpu = BlockAllocator("gpu", num_gpu_blocks, block_size, self.prefix_cache)
        self.cpu = BlockAllocator("cpu", num_cpu_blocks, block_size)
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self.reservation = reservation
        self.max_model_len = max_model_len

    @property
    def reserving(self) -> bool:
        """Whether a baseline reservation mode is active."""
        return self.reservation is not ReservationMode.PAGED

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` token slots."""
        return -(-num_tokens // self.block_size)

    # ---- admission -------------------------------------------------------------------------------

    def _table_blocks(self, group: SequenceGroup, seq: Sequence) -> int:
        tokens = seq.num_tokens
        if self.reserving:
            p = group.params
            tokens = max(tokens, reserved_tokens(self.reservation, group.prompt_len, p.max_tokens,
                                                 self.max_model_len))
        return self.num_blocks_for(tokens)

    def blocks_to_admit(self, group: SequenceGroup) -> int:
        """GPU blocks admitting a waiting group takes (its whole reservation in reserving modes)."""
        seqs = group.unfinished_seqs()
        total = sum(self._table_blocks(group, s) for s in seqs)
        if self.reserving and group.needs_fork:
            total += (group.params.num_sequences - len(seqs)) * self._table_blocks(group, seqs[0])
        return total

    def cached_prefixes(self, group: SequenceGroup) -> list[list[int]]:
        """`cached_prefix` of each unfinished sequence of a waiting group, looked up once for the
        `tokens_to_compute`, `can_allocate` and `allocate` calls of one admission (nothing changes the
        cache between them)."""
        return [self.cached_prefix(s) for s in group.unfinished_seqs()]

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a waiting sequence would start with: its longest cached run of full prompt
        blocks, leaving at least its last token to compute (a step must produce its next logits)."""
        if self.prefix_cache is None:
            return []
        max_blocks = min(seq.prompt_len, seq.num_tokens - 1) // self.block_size
        return self.prefix_cache.match(seq.token_ids, max_blocks) if max_blocks > 0 else []

    def tokens_to_compute(self, group: SequenceGroup, cached: list[list[int]] | None = None) -> int:
        """Tokens admitting a waiting group computes: all of its sequences' tokens but cached prefixes
        (`cached`: the group's `cached_prefixes`, looked up when not given)."""
        cached = self.cached_prefixes(group) if cached is None else cached
        seqs = group.unfinished_seqs()
        return sum(s.num_tokens - len(hits) * self.block_size for s, hits in zip(seqs, cached, strict=True))

    def can_allocate(self, group: SequenceGroup, cached: list[list[int]] | None = None) -> AllocStatus:
        """Whether a waiting group's blocks fit now, later, or never (`cached` as for tokens_to_compute)."""
        need = self.blocks_to_admit(group)
        if need > self.gpu.num_blocks - self.watermark_blocks:
            return AllocStatus.NEVER
        if self.prefix_cache is not None:
            need -= self._cached_saving(self.cached_prefixes(group) if cached is None else cached)
        if self.gpu.num_free - need < self.watermark_blocks:
            return AllocStatus.LATER
        return AllocStatus.OK

    def _cached_saving(self, cached: list[list[int]]) -> int:
        """Free blocks a group's cached prefixes save it: hits on blocks in use cost none, while a hit on
        a parked block takes that block out of the free count (once, however many sequences share it)."""
        hits = [block for seq_hits in cached for block in seq_hits]
        parked = {block for block in hits if self.gpu.ref_counts[block] == 0}
        return len(hits) - len(parked)

    def allocate(self, group: SequenceGroup, cached: list[list[int]] | None = None) -> None:
        """Give each unfinished sequence of a waiting group blocks for all its tokens.

        A fresh group has one sequence (the prompt); a group re-admitted for recomputation has one
        table per sequence. With prefix caching each table starts with the sequence's cached prefix,
        shared, and those tokens count as computed. Reserving modes also set aside the tables its
        future forks will use.
        """
        seqs = group.unfinished_seqs()
        cached = self.cached_prefixes(group) if cached is None else cached
        for hits in cached:         # every hit first: a new block taken below may not evict one of them
            for block in hits:
                self.gpu.take_cached(block)
        for seq, hits in zip(seqs, cached, strict=True):
            assert not seq.block_table, f"seq {seq.seq_id} already holds blocks"
            cached_tokens = len(hits) * self.block_size
            seq.block_table = hits + self._new_table(self._table_blocks(group, seq) - len(hits),
                                                     seq.num_tokens - cached_tokens)
            seq.num_computed_tokens = cached_tokens
            seq.num_cached_blocks = len(hits)
            seq.prefix_content_id = (self.prefix_cache.content_id(hits[-1])
                                     if hits and self.prefix_cache is not None else ROOT)
        if self.prefix_cache is not None:
            first = seqs[0]
            self.prefix_cache.record_lookup(first.prompt_len, first.num_computed_tokens)
            if group.first_scheduled_time is None:
                group.num_cached_prompt_tokens = first.num_computed_tokens
        if self.reserving and group.needs_fork:
            per_seq = self._table_blocks(group, seqs[0])
            for _ in range(group.params.num_sequences - len(seqs)):
                group.reserved_tables.append(self._new_table(per_seq, 0))

    def _new_table(self, num_blocks: int, num_tokens: int) -> list[int]:
        table = [self.gpu.allocate() for _ in range(num_blocks)]
        bs = self.block_size
        for i, block in enumerate(table):
            filled = min(bs, num_tokens - i * bs)
            if filled <= 0:
                break
            self.gpu.set_fill(block, filled)
        return table

    def cache_computed_blocks(self, seq: Sequence, end: int) -> None:
        """Cache the sequence's full prompt blocks below position `end` (a step computing them is
        planned: any later step, or a later sequence of the same step, finds their K/V written)."""
        cache = self.prefix_cache
        if cache is None:
            return
        bs = self.block_size
        last = min(end, seq.prompt_len) // bs
        for i in range(seq.num_cached_blocks, last):
            block = seq.block_table[i]
            if cache.holds(block):      # shared with a sequence that cached it (its prefix, other ids)
                seq.prefix_content_id = cache.content_id(block)
                continue
            seq.prefix_content_id = cache.register(seq.prefix_content_id, seq.token_ids[i * bs:(i + 1) * bs],
                                                   block)
        seq.num_cached_blocks = max(seq.num_cached_blocks, last)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (the executors' KV contents are gone)."""
        self.gpu.clear_prefix_cache()

    # ---- decoding --------------------------------------------------------------------------------

    def advancing_seqs(self, group: SequenceGroup) -> list[Sequence]:
        """The group's sequences that run a next step: running, and not ended by a sample in flight."""
        running, limit = SequenceStatus.RUNNING, self.max_model_len
        # The pending-sample test first: one step at a time no sequence has one (this runs every step).
        return [s for s in group.seqs if s.status is running
                and (not s.num_pending_samples or not s.length_ends_in_flight(limit))]

    def _needs_new_block(self, seq: Sequence) -> bool:
        """Whether writing the sequence's last token needs a block: a new one, or a private copy.

        The last token is the one a step in flight will sample, when there is one.
        """
        index = (len(seq.token_ids) + seq.num_pending_samples - 1) // self.block_size
        table = seq.block_table
        return index >= len(table) or self.gpu.ref_counts[table[index]] > 1

    def blocks_to_append(self, seqs: list[Sequence]) -> int:
        """GPU blocks `append_slots(seqs)` takes now (new blocks and private copies)."""
        need = 0
        for seq in seqs:
            need += self._needs_new_block(seq)
        return need

    def can_append_slots(self, seqs: list[Sequence]) -> bool:
        """Whether each of these advancing sequences can get a slot for its next token now."""
        return self.blocks_to_append(seqs) <= self.gpu.num_free

    def append_slots(self, seqs: list[Sequence], copies: list[tuple[int, int]]) -> None:
        """Make each advancing sequence's table cover its last token; collect copy-on-write pairs.

        `seqs` are a group's `advancing_seqs`. When the last block is shared (after a fork) the sequence
        gets a private copy first and `(shared block, new block)` goes to `copies` for the executor's
        batched copy kernel.
        """
        gpu = self.gpu
        bs = self.block_size
        for seq in seqs:
            position = len(seq.token_ids) + seq.num_pending_samples - 1
            index = position // bs
            table = seq.block_table
            if index == len(table):
                block = gpu.allocate()
                table.append(block)
            else:
                block = table[index]
                if gpu.ref_counts[block] > 1:
                    copy = gpu.allocate()
                    gpu.set_fill(copy, gpu.fill[block])
                    gpu.decref(block)
                    copies.append((block, copy))
                    table[index] = copy
                    block = copy
                    if seq.executor_table_len > index:
                        seq.executor_table_len = index
            gpu.set_fill(block, position % bs + 1)

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """Give `child` the parent's blocks: shared by reference in PAGED mode, else copied.

        Returns the copy pairs the executor must run before the child's first step (empty when
        paged: copy-on-write defers any copy until a shared block is written).
        """
        if not self.reserving:
            for block in parent.block_table:
                self.gpu.incref(block)
            child.block_table = parent.block_table.copy()
            child.num_cached_blocks = parent.num_cached_blocks          # its prompt blocks are the parent's
            child.prefix_content_id = parent.prefix_content_id
            return []
        table = child.group.reserved_tables.pop()
        copies = []
        for i in range(self.num_blocks_for(parent.num_computed_tokens)):
            src, dst = parent.block_table[i], table[i]
            copies.append((src, dst))
            self.gpu.set_fill(dst, self.gpu.fill[src])
        child.block_table = table
        return copies

    # ---- freeing ---------------------------------------------------------------------------------

    def _allocator_of(self, status: SequenceStatus) -> BlockAllocator:
        return self.cpu if status is SequenceStatus.SWAPPED else self.gpu

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks (call before marking it finished).

        In reserving modes a sequence that ends before its group hands its reservation back to the
        group, as a contiguous allocator would keep it until the request ends.
        """
        allocator = self._allocator_of(seq.status)
        if self.reserving and not seq.group.is_finished and seq.block_table:
            for block in seq.block_table:
                allocator.clear_fill(block)
            seq.group.reserved_tables.append(seq.block_table)
        else:
            for block in seq.block_table:
                allocator.decref(block)
        seq.block_table = []

    def free_group(self, group: SequenceGroup) -> None:
        """Release every block a group holds, its reservations included."""
        allocator = self._allocator_of(group.status)
        for seq in group.seqs:
            for block in seq.block_table:
                allocator.decref(block)
            seq.block_table = []
        for table in group.reserved_tables:
            for block in table:
                allocator.decref(block)
        group.reserved_tables = []

    # ---- swapping --------------------------------------------------------------------------------

    def _group_tables(self, group: SequenceGroup) -> Iterator[list[int]]:
        for seq in group.seqs:
            if seq.block_table:
                yield seq.block_table
        yield from group.reserved_tables

    def _unique_blocks(self, group: SequenceGroup) -> int:
        return len({b for table in self._group_tables(group) for b in table})

    def can_swap_out(self, group: SequenceGroup) -> bool:
        """Whether CPU swap space holds the whole group (shared blocks once)."""
        return self._unique_blocks(group) <= self.cpu.num_free

    def swap_out(self, group: SequenceGroup) -> list[tuple[int, int]]:
        """Move a running group's blocks to CPU; returns (gpu block, cpu block) pairs to copy."""
        return self._move(group, self.gpu, self.cpu)

    def can_swap_in(self, group: SequenceGroup) -> AllocStatus:
        """Whether a swapped group fits back on the GPU, with a slot per sequence to append."""
        need = self._unique_blocks(group) + len(group.unfinished_seqs())
        if need > self.gpu.num_blocks - self.watermark_blocks:
            return AllocStatus.NEVER
        if self.gpu.num_free - need < self.watermark_blocks:
            return AllocStatus.LATER
        return AllocStatus.OK

    def swap_in(self, group: SequenceGroup) -> list[tuple[int, int]]:
        """Move a swapped group's blocks back to the GPU; returns (cpu block, gpu block) pairs."""
        return self._move(group, self.cpu, self.gpu)

    def _move(self, group: SequenceGroup, src: BlockAllocator, dst: BlockAllocator) -> list[tuple[int, int]]:
        """Remap every table of the group from `src` to `dst`, keeping shared blocks shared."""
        mapping: dict[int, int] = {}
        for table in self._group_tables(group):
            for i, block in enumerate(table):
                moved = mapping.get(block)
                if moved is None:
                    moved = dst.allocate()
                    dst.set_fill(moved, src.fill[block])
                    mapping[block] = moved
                else:
                    dst.incref(moved)
                src.decref(block)
                table[i] = moved
        for seq in group.seqs:
            if seq.executor_table_len > 0:
                seq.executor_table_len = 0      # the executor's table is stale: resend it whole
        return list(mapping.items())

    # ---- accounting ------------------------------------------------------------------------------

    def gpu_sharing_saved(self) -> float:
        """Fraction of GPU blocks sharing saves: 1 - blocks in use / block-table entries (0 when none)."""
        refs = self.gpu.total_refs
        return 1.0 - self.gpu.num_used / refs if refs else 0.0

    def gpu_utilization(self) -> float:
        """Token slots holding tokens / token slots in allocated GPU blocks (0.0 when none used).

        An idle server holds no blocks and so holds no tokens: 0, as the gauge and a dashboard read it.
        """
        used = self.gpu.num_used
        return self.gpu.filled_slots / (used * self.block_size) if used else 0.0

    def check_integrity(self, live_groups: Iterable[SequenceGroup]) -> None:
        """Assert exact block accounting against every live group's tables (raises AssertionError)."""
        refs: dict[str, Counter[int]] = {"gpu": Counter(), "cpu": Counter()}
        for group in live_groups:
            device = self._allocator_of(group.status).device
            for seq in group.seqs:
                if seq.status is SequenceStatus.FINISHED or group.status is SequenceStatus.WAITING:
                    assert not seq.block_table, f"seq {seq.seq_id} ({seq.status.value}) holds blocks"
                else:
                    assert seq.status is group.status, (
                        f"seq {seq.seq_id} is {seq.status.value} in a {group.status.value} group")
                    assert len(seq.block_table) >= self.num_blocks_for(seq.num_tokens - 1), (
                        f"seq {seq.seq_id}: table of {len(seq.block_table)} blocks for {seq.num_tokens}")
            for table in self._group_tables(group):
                refs[device].update(table)
        self.gpu.check_integrity(refs["gpu"])
        self.cpu.check_integrity(refs["cpu"])
