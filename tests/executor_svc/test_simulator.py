"""The simulated executor catches the mistakes the scheduler tests rely on it to catch."""

import pytest

from executor_svc.simulator import SimulatedExecutor, SimulationError
from pagedserve.contract.plan import MalformedPlanError, SequenceStart, SequenceWork, StepPlan

START = SequenceStart("r", num_prompt_tokens=5, seed=1, sample_index=0)


def prefill(executor: SimulatedExecutor, table: list[int]) -> None:
    work = SequenceWork(1, [10, 11, 12, 13, 14], 0, 0, table, 1, 0, START)
    executor.execute(StepPlan(1, sequences=[work]))


def test_a_block_table_pointing_at_another_sequences_block_is_caught():
    executor = SimulatedExecutor(8, 0, 4)
    prefill(executor, [0, 1])
    other = SequenceWork(2, [20, 21, 22, 23, 24], 0, 0, [2, 3], 1, 0, SequenceStart("o", 5, 2, 0))
    executor.execute(StepPlan(2, sequences=[other]))
    wrong = SequenceWork(1, [15], 5, 1, [3], 1, 0)        # the tail block of sequence 2, not its own
    with pytest.raises(SimulationError, match="KV slot"):
        executor.execute(StepPlan(3, sequences=[wrong]))


def test_reading_a_swapped_out_block_is_caught():
    executor = SimulatedExecutor(8, 8, 4)
    prefill(executor, [0, 1])
    executor.execute(StepPlan(2, swap_out=[(0, 5), (1, 6)]))
    stale = SequenceWork(1, [15], 5, 0, [0, 1], 1, 0)    # should have been swapped in first
    with pytest.raises(SimulationError, match="KV slot"):
        executor.execute(StepPlan(3, sequences=[stale]))


def test_malformed_plans_are_rejected():
    executor = SimulatedExecutor(4, 2, 4)
    with pytest.raises(MalformedPlanError, match="unknown sequence"):
        executor.execute(StepPlan(1, sequences=[SequenceWork(9, [1], 3, 0, [], 1, 0)]))
    with pytest.raises(MalformedPlanError, match="out of range"):
        executor.execute(StepPlan(2, copy=[(0, 4)]))
    with pytest.raises(MalformedPlanError, match="no block"):
        executor.execute(StepPlan(3, sequences=[SequenceWork(1, [1] * 5, 0, 0, [0], 1, 0, START)]))


def test_samples_are_a_function_of_seed_stream_and_context():
    a, b = SimulatedExecutor(8, 0, 4), SimulatedExecutor(8, 0, 4)
    prefill(a, [0, 1])
    prefill(b, [6, 3])                                   # other physical blocks, same logical content
    step = StepPlan(2, sequences=[SequenceWork(1, [15], 5, 2, [], 3, 4)])
    assert a.execute(step) == b.execute(step)
    samples = a.execute(StepPlan(3, sequences=[SequenceWork(1, [16], 6, 2, [], 3, 4)])).sequences[0].samples
    assert len({s.token_id for s in samples}) == 3        # three streams, three draws
    assert all(len(s.top_logprobs) == 4 and s.top_logprobs[0][0] == s.token_id for s in samples)


def test_a_rejected_plan_changes_nothing():
    executor = SimulatedExecutor(8, 4, 4)
    prefill(executor, [0, 1])
    histories = {k: v.token_ids.copy() for k, v in executor.seqs.items()}
    before = (executor.gpu.copy(), executor.cpu.copy(), histories)
    bad = StepPlan(2, swap_out=[(0, 1)], copy=[(1, 2)],
                   sequences=[SequenceWork(1, [15], 5, 2, [], 1, 0), SequenceWork(7, [1], 0, 0, [3], 1, 0)])
    with pytest.raises(MalformedPlanError, match="unknown sequence 7"):
        executor.execute(bad)
    after = (executor.gpu, executor.cpu, {k: v.token_ids for k, v in executor.seqs.items()})
    assert after == before


def test_a_huge_swap_space_holds_only_what_was_swapped_out():
    """The default 4 GiB swap space is 33.5M simulated blocks: none is built until a swap-out writes it."""
    executor = SimulatedExecutor(8, 2**25, 4)
    assert len(executor.cpu) == 0
    prefill(executor, [0, 1])
    executor.execute(StepPlan(2, swap_out=[(0, 2**25 - 1), (1, 7)]))
    assert sorted(executor.cpu) == [7, 2**25 - 1]
    executor.execute(StepPlan(3, swap_in=[(2**25 - 1, 4), (7, 5)]))
    decode = SequenceWork(1, [15], 5, 0, [4, 5], 1, 0)     # reads the context back from the swapped-in blocks
    assert executor.execute(StepPlan(4, sequences=[decode])).sequences[0].samples
