"""Check a step plan against what an executor holds, before any of it is applied.

Shared by every executor backend so that "malformed" means the same everywhere: a rejected plan
raises MalformedPlanError and changes nothing.
"""

from __future__ import annotations

from pagedserve.contract.plan import MalformedPlanError, SequenceWork, StepPlan

# Per known sequence: (tokens whose K/V are cached, entries of its block table, whether it holds a
# sample from its last step that a plan may feed back).
SequenceLengths = dict[int, tuple[int, int, bool]]


def validate_plan(plan: StepPlan, known: SequenceLengths, block_size: int, num_gpu_blocks: int,
                  num_cpu_blocks: int) -> None:
    """Raise MalformedPlanError naming the first problem; `known` is not modified."""
    lengths = dict(known)
    for fork in plan.forks:
        if fork.parent_seq_id not in lengths:
            raise MalformedPlanError(f"fork: unknown parent sequence {fork.parent_seq_id}")
        history, table, _ = lengths[fork.parent_seq_id]
        lengths[fork.child_seq_id] = (history, table, False)     # a child has sampled nothing yet
    for name, pairs, src_blocks, dst_blocks in (
            ("swap_out", plan.swap_out, num_gpu_blocks, num_cpu_blocks),
            ("swap_in", plan.swap_in, num_cpu_blocks, num_gpu_blocks),
            ("copy", plan.copy, num_gpu_blocks, num_gpu_blocks)):
        for src, dst in pairs:
            if not (0 <= src < src_blocks and 0 <= dst < dst_blocks):
                raise MalformedPlanError(f"{name}: block pair ({src}, {dst}) out of range "
                                         f"({src_blocks} source, {dst_blocks} target blocks)")
    for work in plan.sequences:
        _validate_work(work, lengths, block_size, num_gpu_blocks)
    for seq_id in plan.forget_seq_ids:
        if seq_id not in lengths:
            raise MalformedPlanError(f"forget: unknown sequence {seq_id}")


def _validate_work(work: SequenceWork, lengths: SequenceLengths, block_size: int,
                   num_gpu_blocks: int) -> None:
    if work.start is not None:
        history, table, sampled = len(work.start.cached_token_ids), 0, False
        if history > work.start.num_prompt_tokens:
            raise MalformedPlanError(f"seq {work.seq_id}: {history} cached tokens but a prompt of "
                                     f"{work.start.num_prompt_tokens}")
    elif work.seq_id in lengths:
        history, table, sampled = lengths[work.seq_id]
    else:
        raise MalformedPlanError(f"unknown sequence {work.seq_id} (and no start given)")
    if work.block_table_start > table:
        raise MalformedPlanError(f"seq {work.seq_id}: table update at {work.block_table_start} "
                                 f"past its end {table}")
    if work.start_position != history:
        raise MalformedPlanError(f"seq {work.seq_id}: computes from position {work.start_position} "
                                 f"but {history} tokens are cached")
    if work.feeds_last_sample and not sampled:
        raise MalformedPlanError(f"seq {work.seq_id}: feeds back its last sample but sampled nothing "
                                 "in its last step")
    if not work.num_tokens:
        raise MalformedPlanError(f"seq {work.seq_id}: no tokens to compute")
    last = work.start_position + work.num_tokens - 1
    if work.block_table_start + len(work.block_ids) <= last // block_size:
        raise MalformedPlanError(f"seq {work.seq_id}: no block for position {last}")
    if any(not 0 <= b < num_gpu_blocks for b in work.block_ids):
        raise MalformedPlanError(f"seq {work.seq_id}: block id out of range in {work.block_ids}")
    lengths[work.seq_id] = (history + work.num_tokens, work.block_table_start + len(work.block_ids),
                            work.num_samples > 0)
