"""Block manager: allocation, copy-on-write, fork, free, swap and exact accounting."""

import pytest

from scheduler_svc.block_manager import AllocStatus, BlockManager
from scheduler_svc.config import ReservationMode
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.sequence import Sequence, SequenceGroup, SequenceStatus

BS = 4


def make_group(prompt_len: int, params: SamplingParams | None = None, request_id: str = "r") -> SequenceGroup:
    prompt = tuple(range(10, 10 + prompt_len))
    group = SequenceGroup(request_id=request_id, arrival_index=0, arrival_time=0.0, prompt_token_ids=prompt,
                          params=params or SamplingParams(max_tokens=64), seed=1, eos_token_ids=frozenset())
    group.seqs.append(Sequence(1, group, list(prompt), prompt_len))
    return group


def admit(bm: BlockManager, group: SequenceGroup) -> None:
    assert bm.can_allocate(group) is AllocStatus.OK
    bm.allocate(group)
    group.status = SequenceStatus.RUNNING
    for seq in group.seqs:
        seq.status = SequenceStatus.RUNNING


def generate(seq: Sequence, token: int = 99) -> None:
    """What a step does to a sequence: its pending token is computed, a new one is sampled."""
    seq.num_computed_tokens = seq.num_tokens
    seq.token_ids.append(token)


def fork(bm: BlockManager, parent: Sequence, seq_id: int) -> Sequence:
    child = Sequence(seq_id, parent.group, parent.token_ids.copy(), parent.prompt_len, seq_id - 1)
    child.status = parent.status
    child.num_computed_tokens = parent.num_computed_tokens
    copies = bm.fork(parent, child)
    parent.group.seqs.append(child)
    assert copies == [] or bm.reserving
    return child


def test_prompt_gets_ceil_blocks_and_exact_fill():
    bm = BlockManager(BS, 10, 4, watermark=0.0)
    group = make_group(9)
    admit(bm, group)
    assert len(group.seqs[0].block_table) == 3          # ceil(9 / 4)
    assert bm.gpu.num_free == 7
    assert bm.gpu.filled_slots == 9
    assert bm.gpu_utilization() == pytest.approx(9 / 12)
    bm.check_integrity([group])


def test_append_takes_a_new_block_only_at_a_boundary():
    bm = BlockManager(BS, 10, 4, watermark=0.0)
    group = make_group(7)
    admit(bm, group)
    seq = group.seqs[0]
    generate(seq)                                        # token 8 fills slot 7 of block 1
    copies = []
    bm.append_slots(bm.advancing_seqs(group), copies)
    assert len(seq.block_table) == 2 and not copies
    generate(seq)                                        # token 9 needs block 2
    bm.append_slots(bm.advancing_seqs(group), copies)
    assert len(seq.block_table) == 3 and not copies
    assert bm.gpu.filled_slots == 9
    bm.check_integrity([group])


def test_fork_shares_blocks_and_copy_on_write_copies_only_the_shared_last_block():
    bm = BlockManager(BS, 20, 4, watermark=0.0)
    group = make_group(6, SamplingParams(n=3, max_tokens=8))
    admit(bm, group)
    parent = group.seqs[0]
    parent.num_computed_tokens = 6
    children = [fork(bm, parent, 2), fork(bm, parent, 3)]
    full, partial = parent.block_table
    assert bm.gpu.ref_counts[full] == 3 and bm.gpu.ref_counts[partial] == 3
    assert bm.gpu.num_used == 2
    bm.check_integrity([group])

    for i, seq in enumerate([parent, *children]):
        seq.token_ids.append(50 + i)                     # each writes its own token into slot 6
    copies = []
    bm.append_slots(bm.advancing_seqs(group), copies)
    # Two of the three writers copy the shared partial block; the last one writes in place.
    assert len(copies) == 2
    assert all(src == partial for src, _ in copies)
    assert bm.gpu.ref_counts[full] == 3
    assert bm.gpu.ref_counts[partial] == 1
    assert len({seq.block_table[1] for seq in group.seqs}) == 3
    assert {seq.block_table[0] for seq in group.seqs} == {full}
    bm.check_integrity([group])


def test_fork_at_a_block_boundary_needs_no_copy():
    bm = BlockManager(BS, 20, 4, watermark=0.0)
    group = make_group(8, SamplingParams(n=2, max_tokens=8))
    admit(bm, group)
    parent = group.seqs[0]
    parent.num_computed_tokens = 8
    child = fork(bm, parent, 2)
    parent.token_ids.append(1)
    child.token_ids.append(2)
    copies = []
    bm.append_slots(bm.advancing_seqs(group), copies)
    assert copies == []
    assert parent.block_table[:2] == child.block_table[:2]
    assert parent.block_table[2] != child.block_table[2]
    bm.check_integrity([group])


def test_freeing_a_sharer_keeps_the_block_for_the_others():
    bm = BlockManager(BS, 20, 4, watermark=0.0)
    group = make_group(6, SamplingParams(n=2, max_tokens=8))
    admit(bm, group)
    parent = group.seqs[0]
    parent.num_computed_tokens = 6
    child = fork(bm, parent, 2)
    bm.free_seq(child)
    child.status = SequenceStatus.FINISHED
    assert all(bm.gpu.ref_counts[b] == 1 for b in parent.block_table)
    bm.check_integrity([group])
    bm.free_group(group)
    assert bm.gpu.num_free == 20 and bm.gpu.filled_slots == 0


def test_watermark_and_never_fitting_groups():
    bm = BlockManager(BS, 10, 4, watermark=0.2)          # 2 blocks held back
    assert bm.can_allocate(make_group(4 * 8)) is AllocStatus.OK
    assert bm.can_allocate(make_group(4 * 8 + 1)) is AllocStatus.NEVER
    admit(bm, make_group(4 * 5))
    assert bm.can_allocate(make_group(4 * 3 + 1)) is AllocStatus.LATER
    assert bm.can_allocate(make_group(4 * 3)) is AllocStatus.OK


def test_swap_out_and_in_restores_the_logical_mapping_and_sharing():
    bm = BlockManager(BS, 20, 20, watermark=0.0)
    group = make_group(6, SamplingParams(n=2, max_tokens=8))
    admit(bm, group)
    parent = group.seqs[0]
    parent.num_computed_tokens = 6
    child = fork(bm, parent, 2)
    parent.token_ids.append(1)
    child.token_ids.append(2)
    bm.append_slots(bm.advancing_seqs(group), [])        # child and parent now differ in block 1
    before = [seq.block_table.copy() for seq in group.seqs]

    assert bm.can_swap_out(group)
    out = bm.swap_out(group)
    assert len(out) == 3                                 # the shared block moves once
    group.status = SequenceStatus.SWAPPED
    for seq in group.seqs:
        seq.status = SequenceStatus.SWAPPED
    assert bm.gpu.num_used == 0 and bm.cpu.num_used == 3
    gpu_to_cpu = dict(out)
    for seq, table in zip(group.seqs, before, strict=True):
        assert seq.block_table == [gpu_to_cpu[b] for b in table]
    bm.check_integrity([group])

    assert bm.can_swap_in(group) is AllocStatus.OK
    back = dict(bm.swap_in(group))
    group.status = SequenceStatus.RUNNING
    for seq in group.seqs:
        seq.status = SequenceStatus.RUNNING
    for seq, table in zip(group.seqs, before, strict=True):
        assert seq.block_table == [back[gpu_to_cpu[b]] for b in table]
    assert parent.block_table[0] == child.block_table[0]          # still shared
    assert bm.gpu.ref_counts[parent.block_table[0]] == 2
    assert bm.cpu.num_used == 0
    assert bm.gpu.filled_slots == 4 + 3 + 3     # fill travelled: shared block, two private tails
    bm.check_integrity([group])


def test_swap_space_limits_are_checked():
    bm = BlockManager(BS, 20, 2, watermark=0.0)
    group = make_group(12)
    admit(bm, group)
    assert not bm.can_swap_out(group)                    # 3 blocks, 2 CPU blocks
    small = BlockManager(BS, 3, 10, watermark=0.0)
    group = make_group(12)
    admit(small, group)
    small.swap_out(group)
    group.status = SequenceStatus.SWAPPED
    group.seqs[0].status = SequenceStatus.SWAPPED
    # Coming back needs its 3 blocks plus one to append: more than the 3 the GPU has.
    assert small.can_swap_in(group) is AllocStatus.NEVER


def test_integrity_check_catches_a_leak_and_a_wrong_refcount():
    bm = BlockManager(BS, 10, 4, watermark=0.0)
    group = make_group(5)
    admit(bm, group)
    bm.gpu.allocate()                                    # a block no table holds
    with pytest.raises(AssertionError, match="ref count"):
        bm.check_integrity([group])
    bm = BlockManager(BS, 10, 4, watermark=0.0)
    group = make_group(5)
    admit(bm, group)
    bm.gpu.ref_counts[group.seqs[0].block_table[0]] += 1
    with pytest.raises(AssertionError, match="ref count"):
        bm.check_integrity([group])


@pytest.mark.parametrize(("mode", "blocks_per_seq"), [
    (ReservationMode.RESERVE_MAX, 64 // BS),             # max_model_len = 64
    (ReservationMode.RESERVE_POW2, (5 + 16) // BS + 1),  # prompt 5 + next_pow2(9) = 21 tokens
    (ReservationMode.RESERVE_ORACLE, (5 + 9) // BS + 1),  # prompt 5 + max_tokens 9 = 14 tokens
])
def test_reserving_modes_take_the_whole_reservation_up_front(mode, blocks_per_seq):
    bm = BlockManager(BS, 100, 0, watermark=0.0, reservation=mode, max_model_len=64)
    group = make_group(5, SamplingParams(n=2, max_tokens=9))
    assert bm.blocks_to_admit(group) == 2 * blocks_per_seq
    admit(bm, group)
    parent = group.seqs[0]
    assert len(parent.block_table) == blocks_per_seq
    assert len(group.reserved_tables) == 1
    parent.num_computed_tokens = 5
    child = Sequence(2, group, parent.token_ids.copy(), 5, 1)
    child.status = SequenceStatus.RUNNING
    copies = bm.fork(parent, child)
    group.seqs.append(child)
    # No sharing: the child copies the prompt's blocks into its own reservation.
    assert copies == list(zip(parent.block_table[:2], child.block_table[:2], strict=True))
    assert not set(parent.block_table) & set(child.block_table)
    used = bm.gpu.num_used
    for _ in range(9):                                   # decoding never takes another block
        for seq in group.seqs:
            generate(seq)
        bm.append_slots(bm.advancing_seqs(group), [])
    assert bm.gpu.num_used == used
    bm.check_integrity([group])


def test_utilization_is_zero_when_no_block_is_used():
    """An idle server's KV utilization reads 0 (no tokens held), not 1."""
    bm = BlockManager(BS, 10, 4, watermark=0.0)
    assert bm.gpu_utilization() == 0.0
    group = make_group(9)
    admit(bm, group)
    assert bm.gpu_utilization() > 0
    bm.free_group(group)
    assert bm.gpu_utilization() == 0.0
