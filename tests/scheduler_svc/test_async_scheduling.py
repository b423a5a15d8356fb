"""Async scheduling: the plan for step N+1 is made while step N runs and feeds its samples back.

The random-workload property test runs the same workloads ahead and one step at a time and holds
their outputs equal; these tests pin the individual rules.
"""

import pytest
from sim_harness import EOS, Harness

from pagedserve.contract.plan import (
    MalformedPlanError,
    Sample,
    SequenceResult,
    SequenceStart,
    SequenceWork,
    StepPlan,
    StepResult,
)
from pagedserve.contract.plan_codec import plan_from_proto, plan_to_proto
from pagedserve.contract.sequence_registry import SequenceRegistry
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import FinishReason


def answer(plan: StepPlan, token: int = 7) -> StepResult:
    """A result giving every sampled sequence `token`."""
    return StepResult(plan.step_id, tuple(
        SequenceResult(w.seq_id, tuple(Sample(token, -1.0) for _ in range(w.num_samples)))
        for w in plan.sequences if w.num_samples))


def scheduler(num_gpu_blocks: int = 64, max_model_len: int = 128, **config: object) -> Scheduler:
    config.setdefault("max_num_batched_tokens", 256)
    return Scheduler(SchedulerConfig(block_size=4, **config), num_gpu_blocks, 16, max_model_len,
                     eos_token_ids=[EOS], vocab_size=100, seed=3)


def test_a_plan_made_ahead_feeds_the_sample_in_flight_back():
    s = scheduler()
    s.add_request("r", [10, 11, 12, 13, 14], SamplingParams(max_tokens=8))
    prefill = s.schedule()
    ahead = s.schedule_ahead()
    assert ahead is not None and s.num_steps_in_flight == 2
    (work,) = ahead.sequences
    # Position 5 is the token step 1 is sampling: the executor supplies it.
    assert work.token_ids == [] and work.feeds_last_sample and work.num_tokens == 1
    assert work.start_position == 5 and work.num_samples == 1
    seq = s.groups["r"].seqs[0]
    assert len(seq.block_table) * 4 > 5                 # its slot is allocated before the sample exists
    assert s.schedule_ahead() is None                   # never more than one step ahead
    s.process_result(answer(prefill, 20))
    assert seq.token_ids[5:] == [20] and seq.num_computed_tokens == 5
    (work,) = s.schedule_ahead().sequences              # planned while step 2 runs: position 6
    assert work.start_position == 6 and work.feeds_last_sample
    s.process_result(answer(ahead, 21))
    assert seq.token_ids[5:] == [20, 21] and seq.num_computed_tokens == 6


def test_results_are_taken_oldest_first():
    s = scheduler()
    s.add_request("r", [10, 11, 12], SamplingParams(max_tokens=8))
    first = s.schedule()
    ahead = s.schedule_ahead()
    with pytest.raises(Exception, match="oldest in flight"):
        s.process_result(answer(ahead))
    s.process_result(answer(first))
    s.process_result(answer(ahead))
    assert s.num_steps_in_flight == 0


@pytest.mark.parametrize("params", [SamplingParams(n=2, max_tokens=4, seed=1),
                                    SamplingParams(beam_width=2, temperature=0.0, max_tokens=4)],
                         ids=["parallel-sampling prompt", "beam search"])
def test_no_plan_ahead_when_the_next_step_depends_on_the_samples(params):
    s = scheduler()
    s.add_request("r", [10, 11, 12], params)
    s.schedule()
    assert s.schedule_ahead() is None


def test_parallel_samples_run_ahead_once_forked():
    h = Harness(async_scheduling=True)
    h.scheduler.add_request("r", [10, 11, 12], SamplingParams(n=3, max_tokens=6, seed=1))
    h.run()
    assert h.planned_ahead >= 3 and len(h.done["r"].token_ids) == 3
    reference = Harness()
    reference.scheduler.add_request("r", [10, 11, 12], SamplingParams(n=3, max_tokens=6, seed=1))
    assert reference.run()["r"].token_ids == h.done["r"].token_ids


def test_no_plan_ahead_that_would_need_a_preemption():
    s = scheduler(num_gpu_blocks=2, watermark=0.0)
    s.add_request("r", [10, 11, 12, 13, 14, 15, 16, 17], SamplingParams(max_tokens=8))
    s.schedule()                                # 8 tokens fill 2 blocks; the sample opens a third
    assert s.schedule_ahead() is None
    assert len(s.groups["r"].seqs[0].block_table) == 2     # nothing taken by the refusal


def test_a_sequence_its_step_in_flight_ends_by_length_is_not_planned_ahead():
    s = scheduler()
    s.add_request("short", [10, 11, 12], SamplingParams(max_tokens=1))
    s.add_request("long", [20, 21, 22], SamplingParams(max_tokens=5))
    s.schedule()
    ahead = s.schedule_ahead()
    assert [w.seq_id for w in ahead.sequences] == [s.groups["long"].seqs[0].seq_id]


def test_an_eos_in_flight_costs_one_discarded_step_then_the_executor_forgets_it():
    s = scheduler()
    s.add_request("r", [10, 11, 12], SamplingParams(max_tokens=8))
    s.add_request("other", [30, 31], SamplingParams(max_tokens=8))
    first = s.schedule()
    ahead = s.schedule_ahead()
    seq = s.groups["r"].seqs[0]
    result = StepResult(first.step_id, tuple(
        SequenceResult(w.seq_id, (Sample(EOS if w.seq_id == seq.seq_id else 40, -1.0),))
        for w in first.sequences))
    outputs = s.process_result(result)
    assert seq.finish_reason is FinishReason.EOS and not seq.block_table
    assert [o.request_id for o in outputs if o.finished] == ["r"]
    later = s.schedule_ahead()                  # planned while the discarded step runs
    assert seq.seq_id in later.forget_seq_ids
    assert seq.seq_id not in [w.seq_id for w in later.sequences]
    assert not [o for o in s.process_result(answer(ahead)) if o.request_id == "r"]
    assert seq.token_ids == [10, 11, 12, EOS]       # the discarded step's sample went nowhere


def test_async_and_one_step_at_a_time_give_the_same_outputs_under_memory_pressure():
    results = {}
    for mode in (False, True):
        h = Harness(num_gpu_blocks=12, async_scheduling=mode, eos_probability=0.05)
        for i in range(8):
            h.scheduler.add_request(f"r{i}", [3 + i] * (5 + i), SamplingParams(max_tokens=20 + i, seed=i))
        h.scheduler.add_request("p", [5] * 6, SamplingParams(n=3, max_tokens=10, seed=1))
        results[mode] = ({k: (v.token_ids, v.finish_reasons) for k, v in h.run().items()}, h)
    assert results[True][0] == results[False][0]
    ahead = results[True][1]
    assert ahead.planned_ahead > 10 and ahead.scheduler.stats().num_preemptions_recompute > 0


def _start() -> SequenceStart:
    return SequenceStart(request_id="r", num_prompt_tokens=2, seed=0, sample_index=0)


def test_the_executor_feeds_back_only_a_sample_it_holds():
    registry = SequenceRegistry()
    prefill = StepPlan(1, sequences=[SequenceWork(1, [10, 11], 0, 0, [0], 1, 0, _start())])
    registry.validate(prefill, 4, 8, 0)
    registry.begin_work(prefill.sequences[0])
    ahead = StepPlan(2, sequences=[SequenceWork(1, [], 2, 1, [], 1, 0, feeds_last_sample=True)])
    with pytest.raises(MalformedPlanError, match="sampled nothing"):
        registry.validate(ahead, 4, 8, 0)       # the prefill's sample was never recorded
    registry.record_sample(1, 42)
    registry.validate(ahead, 4, 8, 0)
    state = registry.begin_work(ahead.sequences[0])
    assert state.token_ids == [10, 11, 42] and state.last_sample is None


def test_a_plan_made_ahead_crosses_the_wire_unchanged():
    s = scheduler()
    s.add_request("r", [10, 11, 12], SamplingParams(max_tokens=8))
    s.schedule()
    ahead = s.schedule_ahead()
    assert ahead.sequences[0].feeds_last_sample
    assert plan_from_proto(plan_to_proto(ahead)) == ahead


def test_a_stop_string_ends_one_sample_while_two_steps_are_in_flight():
    params = SamplingParams(n=2, max_tokens=12, seed=4)
    reference = Harness()
    reference.scheduler.add_request("r", [10, 11, 12], params)
    expected = reference.run()["r"].token_ids
    h = Harness(async_scheduling=True)
    h.scheduler.add_request("r", [10, 11, 12], params)
    while h.planned_ahead < 2:                          # past the fork, into steps planned ahead
        h.step()
    h.send(h.scheduler.schedule_ahead())               # as the engine does before handing out reports
    assert h.scheduler.num_steps_in_flight == 2
    group = h.scheduler.groups["r"]
    stopped = group.seqs[1]
    kept = len(stopped.output_token_ids)
    h.scheduler.finish_sequence(stopped, FinishReason.STOP, "stop")      # as the detokenizer does
    done = h.run()["r"]
    assert done.finish_reasons == {0: "length", 1: "stop"}
    assert done.token_ids[0] == expected[0]
    assert done.token_ids[1] == expected[1][:kept]      # nothing from the steps still in flight
