"""Scheduler rules: FCFS, budgets, plans, preemption, stopping, aborts, failures."""

import pytest
from sim_harness import EOS, Harness

from pagedserve.contract.plan import Sample, SequenceResult, StepPlan, StepResult
from pagedserve.errors import InvalidArgumentError, PlanResultMismatchError
from scheduler_svc.config import PreemptionPolicy, SchedulerConfig
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import FinishReason, SequenceStatus


def answer(plan: StepPlan, token: int = 7, logprob: float = -1.0) -> StepResult:
    """A result giving every sampled sequence the same token."""
    return StepResult(plan.step_id, tuple(
        SequenceResult(w.seq_id, tuple(Sample(token, logprob) for _ in range(w.num_samples)))
        for w in plan.sequences if w.num_samples))


def scheduler(num_gpu_blocks=64, num_cpu_blocks=64, max_model_len=128, **config) -> Scheduler:
    config.setdefault("max_num_batched_tokens", 256)
    return Scheduler(SchedulerConfig(block_size=4, **config), num_gpu_blocks, num_cpu_blocks, max_model_len,
                     eos_token_ids=[EOS], vocab_size=100, seed=3)


def prompt(n: int, first: int = 10) -> list[int]:
    return [first + i % 80 for i in range(n)]


def running_ids(s: Scheduler) -> list[str]:
    return [g.request_id for g in s.running if not g.is_finished]


# ---- admission and budgets ----------------------------------------------------------------------

def test_admission_is_first_come_first_served_within_max_num_seqs():
    s = scheduler(max_num_seqs=2)
    for i in range(4):
        s.add_request(f"r{i}", prompt(5), SamplingParams(max_tokens=3))
    plan = s.schedule()
    assert [w.token_ids for w in plan.sequences] == [prompt(5)] * 2
    assert running_ids(s) == ["r0", "r1"]
    assert [g.request_id for g in s.waiting] == ["r2", "r3"]


def test_parallel_sampling_counts_every_sequence_against_max_num_seqs():
    s = scheduler(max_num_seqs=4)
    s.add_request("wide", prompt(5), SamplingParams(n=3, max_tokens=3))
    s.add_request("second", prompt(5), SamplingParams(n=2, max_tokens=3))
    s.schedule()
    assert running_ids(s) == ["wide"]


def test_prompt_token_budget_defers_the_next_prompt_but_admits_a_first_large_one():
    s = scheduler(max_num_batched_tokens=128, max_model_len=128)
    s.add_request("big", prompt(100), SamplingParams(max_tokens=2))
    s.add_request("next", prompt(40), SamplingParams(max_tokens=2))
    plan = s.schedule()
    assert [len(w.token_ids) for w in plan.sequences] == [100]
    s.process_result(answer(plan))
    plan = s.schedule()                 # big decodes (not charged); next's prompt fits the budget now
    assert sorted(len(w.token_ids) for w in plan.sequences) == [1, 40]


def test_chunked_prefill_splits_a_prompt_and_samples_only_after_the_last_chunk():
    s = scheduler(max_num_batched_tokens=16, max_model_len=128, max_num_seqs=4, enable_chunked_prefill=True)
    s.add_request("long", prompt(40), SamplingParams(max_tokens=2))
    chunks = []
    for _ in range(3):
        plan = s.schedule()
        (work,) = plan.sequences
        chunks.append((work.start_position, len(work.token_ids), work.num_samples))
        s.process_result(answer(plan))
    assert chunks == [(0, 16, 0), (16, 16, 0), (32, 8, 1)]
    plan = s.schedule()
    assert plan.sequences[0].token_ids == [7] and plan.sequences[0].start_position == 40


def test_plans_send_the_block_table_in_full_once_then_only_new_blocks():
    s = scheduler()
    s.add_request("r", prompt(7), SamplingParams(max_tokens=10))
    plan = s.schedule()
    (work,) = plan.sequences
    table = s.groups["r"].seqs[0].block_table
    assert work.start is not None and work.block_table_start == 0 and work.block_ids == table
    assert work.start.num_prompt_tokens == 7
    s.process_result(answer(plan))          # 8 tokens: the new one goes in slot 7 of block 1
    plan = s.schedule()
    (work,) = plan.sequences
    assert work.start is None and work.block_ids == [] and work.token_ids == [7]
    s.process_result(answer(plan))          # 9 tokens: slot 8 opens block 2
    (work,) = s.schedule().sequences
    assert work.block_table_start == 2 and work.block_ids == [table[2]]


# ---- preemption ---------------------------------------------------------------------------------

def fill_pool_then_grow():
    """Two single-sequence requests on 4 blocks of 4 tokens: the second is preempted as they grow."""
    s = scheduler(num_gpu_blocks=4, num_cpu_blocks=8, watermark=0.0)
    s.add_request("first", prompt(8), SamplingParams(max_tokens=8))
    s.add_request("second", prompt(8), SamplingParams(max_tokens=8))
    plan = s.schedule()
    assert len(plan.sequences) == 2
    s.process_result(answer(plan))          # 9 tokens each: both need a third block, one is left
    return s


def test_the_latest_arrival_is_preempted_and_recomputed_with_its_generated_tokens():
    s = fill_pool_then_grow()
    plan = s.schedule()
    second = s.groups["second"]
    assert second.status is SequenceStatus.WAITING and s.waiting == [second]
    assert plan.forget_seq_ids == [second.seqs[0].seq_id]
    assert [w.seq_id for w in plan.sequences] == [s.groups["first"].seqs[0].seq_id]
    assert s.stats().num_preemptions_recompute == 1
    while second.status is SequenceStatus.WAITING:
        s.process_result(answer(plan))
        plan = s.schedule()
    (work,) = [w for w in plan.sequences if w.seq_id == second.seqs[0].seq_id]
    assert work.start_position == 0 and work.start is not None
    assert work.token_ids == [*prompt(8), 7]          # prompt plus the token it had generated


def test_multi_sequence_groups_are_swapped_whole_and_come_back_before_waiting_ones():
    s = scheduler(num_gpu_blocks=8, num_cpu_blocks=16, watermark=0.0)
    s.add_request("solo", prompt(8), SamplingParams(max_tokens=20))
    s.add_request("pair", prompt(8), SamplingParams(n=2, max_tokens=20))
    plan = s.schedule()
    swapped_at = None
    for step in range(12):
        s.process_result(answer(plan))
        if step == 0:
            s.add_request("late", prompt(4), SamplingParams(max_tokens=2))
        plan = s.schedule()
        if plan.swap_out:
            swapped_at = step
            pair = s.groups["pair"]
            assert pair.status is SequenceStatus.SWAPPED
            assert all(seq.status is SequenceStatus.SWAPPED for seq in pair.seqs)
            assert s.stats().num_preemptions_swap == 1
        pair = s.groups.get("pair")
        if pair is not None and pair.status is SequenceStatus.SWAPPED:
            assert "late" not in running_ids(s)          # nothing waiting is admitted past a swapped group
    assert swapped_at is not None


def test_preemption_policy_can_force_swap_or_recompute():
    for policy, counter in [(PreemptionPolicy.SWAP, "num_preemptions_swap"),
                            (PreemptionPolicy.RECOMPUTE, "num_preemptions_recompute")]:
        s = scheduler(num_gpu_blocks=4, num_cpu_blocks=8, watermark=0.0, preemption_mode=policy)
        s.add_request("first", prompt(8), SamplingParams(max_tokens=8))
        s.add_request("second", prompt(8), SamplingParams(max_tokens=8))
        s.process_result(answer(s.schedule()))
        s.schedule()
        assert getattr(s.stats(), counter) == 1


def test_swap_falls_back_to_recompute_when_swap_space_is_full():
    s = scheduler(num_gpu_blocks=4, num_cpu_blocks=1, watermark=0.0, preemption_mode=PreemptionPolicy.SWAP)
    s.add_request("first", prompt(8), SamplingParams(max_tokens=8))
    s.add_request("second", prompt(8), SamplingParams(max_tokens=8))
    s.process_result(answer(s.schedule()))
    plan = s.schedule()
    assert not plan.swap_out and s.stats().num_preemptions_recompute == 1


def test_fcfs_order_survives_preemption():
    h = Harness(num_gpu_blocks=12, num_cpu_blocks=32, watermark=0.0)
    for i in range(6):
        h.scheduler.add_request(f"r{i}", prompt(6, 10 + i), SamplingParams(max_tokens=12, seed=i))
    finish_order = []
    while h.scheduler.has_unfinished:
        _, outputs = h.step()
        finish_order += [o.request_id for o in outputs if o.finished]
        keys = [g.sort_key for g in h.scheduler.waiting]
        assert keys == sorted(keys)
    assert h.scheduler.stats().num_preemptions_recompute > 0
    assert finish_order == [f"r{i}" for i in range(6)]   # equal lengths: first in, first out


# ---- failures and validation --------------------------------------------------------------------

def test_a_group_that_can_never_fit_fails_with_a_clear_error_and_others_run():
    s = scheduler(num_gpu_blocks=6, watermark=0.0)
    s.add_request("huge", prompt(40), SamplingParams(max_tokens=4))
    s.add_request("ok", prompt(4), SamplingParams(max_tokens=2))
    plan = s.schedule()
    (failed,) = s.pop_outputs()
    assert failed.request_id == "huge" and failed.finished
    assert "KV blocks" in failed.error and "lower max_tokens" in failed.error
    assert running_ids(s) == ["ok"] and len(plan.sequences) == 1


def test_a_sequence_that_outgrows_the_whole_pool_fails_instead_of_hanging():
    h = Harness(num_gpu_blocks=4, num_cpu_blocks=0, watermark=0.0)
    h.scheduler.add_request("grows", prompt(10), SamplingParams(max_tokens=30, ignore_eos=True))
    done = h.run(max_steps=100)
    assert done["grows"].finish_reasons == {0: "error"} and "KV blocks" in done["grows"].error


@pytest.mark.parametrize(("tokens", "field"), [([], "prompt"), (prompt(128), "prompt"),
                                               ([5, 100], "prompt.token_ids"), ([-1], "prompt.token_ids")])
def test_bad_prompts_name_the_field(tokens, field):
    with pytest.raises(InvalidArgumentError) as err:
        scheduler().add_request("r", tokens, SamplingParams())
    assert err.value.field == field


def test_request_ids_are_unique_among_live_requests():
    s = scheduler()
    s.add_request("r", prompt(3), SamplingParams())
    with pytest.raises(InvalidArgumentError, match="request_id"):
        s.add_request("r", prompt(3), SamplingParams())


def test_results_must_answer_the_plan_in_flight():
    s = scheduler()
    s.add_request("r", prompt(3), SamplingParams())
    plan = s.schedule()
    with pytest.raises(PlanResultMismatchError):
        s.process_result(StepResult(plan.step_id + 1))
    with pytest.raises(PlanResultMismatchError):
        s.process_result(StepResult(plan.step_id))                     # no samples
    with pytest.raises(RuntimeError):
        s.schedule()
    s.process_result(answer(plan))                                      # the right one still applies


# ---- stopping -----------------------------------------------------------------------------------

def run_with_tokens(params: SamplingParams, tokens: list[int], max_model_len: int = 128):
    s = scheduler(max_model_len=max_model_len)
    s.add_request("r", prompt(4), params)
    outputs = []
    for token in tokens:
        plan = s.schedule()
        if plan.is_empty:
            break
        outputs += s.process_result(answer(plan, token))
    final = [o for o in outputs if o.finished]
    assert len(final) == 1
    generated = [t for o in outputs for c in o.outputs for t in c.token_ids]
    return generated, final[0].outputs[-1].finish_reason, final[0]


def test_max_tokens_stops_with_length():
    assert run_with_tokens(SamplingParams(max_tokens=3), [5] * 10)[:2] == ([5, 5, 5], FinishReason.LENGTH)


def test_eos_stops_unless_ignored():
    assert run_with_tokens(SamplingParams(max_tokens=9), [5, EOS, 5])[:2] == ([5, EOS], FinishReason.EOS)
    generated, reason, _ = run_with_tokens(SamplingParams(max_tokens=3, ignore_eos=True), [EOS] * 5)
    assert (generated, reason) == ([EOS] * 3, FinishReason.LENGTH)


def test_stop_token_ids_and_min_tokens():
    params = SamplingParams(max_tokens=9, stop_token_ids=frozenset({9}))
    generated, reason, final = run_with_tokens(params, [5, 9, 5])
    assert (generated, reason, final.outputs[-1].stop_reason) == ([5, 9], FinishReason.STOP, 9)
    params = SamplingParams(max_tokens=9, min_tokens=2, stop_token_ids=frozenset({9}))
    assert run_with_tokens(params, [9, 9, 9, 5])[:2] == ([9, 9, 9], FinishReason.STOP)


def test_max_model_len_stops_with_length():
    generated, reason, _ = run_with_tokens(SamplingParams(max_tokens=50), [5] * 50, max_model_len=8)
    assert (len(generated), reason) == (4, FinishReason.LENGTH)


def test_min_tokens_suppression_reaches_the_executor():
    s = scheduler()
    s.add_request("r", prompt(4), SamplingParams(min_tokens=2, stop_token_ids=frozenset({9})))
    (work,) = s.schedule().sequences
    assert work.start.min_tokens == 2 and work.start.suppressed_token_ids == (EOS, 9)


# ---- aborts -------------------------------------------------------------------------------------

def test_abort_frees_every_block_and_ends_with_one_terminal_report():
    s = scheduler()
    s.add_request("r", prompt(9), SamplingParams(n=2, max_tokens=20))
    s.process_result(answer(s.schedule()))
    s.process_result(answer(s.schedule()))
    seq_ids = [seq.seq_id for seq in s.groups["r"].seqs]
    assert s.abort("r") and not s.abort("r")
    assert s.block_manager.gpu.num_used == 0
    (final,) = s.pop_outputs()
    assert final.finished and {c.finish_reason for c in final.outputs} == {FinishReason.ABORTED}
    assert sorted(s.schedule().forget_seq_ids) == seq_ids
    s.check_integrity()


def test_abort_while_a_step_is_in_flight_discards_its_result():
    s = scheduler()
    s.add_request("r", prompt(5), SamplingParams(max_tokens=20))
    s.add_request("other", prompt(5), SamplingParams(max_tokens=20))
    plan = s.schedule()
    s.abort("r")
    outputs = s.pop_outputs() + s.process_result(answer(plan))
    assert [o.request_id for o in outputs if o.finished] == ["r"]
    assert [o.request_id for o in outputs if not o.finished] == ["other"]
    s.check_integrity()


def test_abort_of_waiting_and_swapped_requests():
    s = scheduler(max_num_seqs=1)
    s.add_request("a", prompt(5), SamplingParams())
    s.add_request("b", prompt(5), SamplingParams())
    s.schedule()
    assert s.abort("b") and s.waiting == []
    s.check_integrity()


# ---- stats --------------------------------------------------------------------------------------

def test_stats_report_queues_blocks_and_utilization():
    s = scheduler(max_num_seqs=1)
    s.add_request("a", prompt(6), SamplingParams())
    s.add_request("b", prompt(5), SamplingParams())
    s.schedule()
    stats = s.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_swapped) == (1, 1, 0)
    assert stats.gpu_blocks_used == 2 and stats.gpu_blocks_total == 64
    assert stats.kv_utilization == pytest.approx(6 / 8)


# ---- executor loss ------------------------------------------------------------------------------

def _loss_workload(h: Harness) -> None:
    h.scheduler.add_request("single", prompt(7), SamplingParams(max_tokens=30, ignore_eos=True, seed=1))
    h.scheduler.add_request("pair", prompt(9, 20), SamplingParams(n=2, max_tokens=25, ignore_eos=True,
                                                                  temperature=1.0, seed=2))
    h.scheduler.add_request("beams", prompt(6, 30), SamplingParams(beam_width=3, n=2, temperature=0.0,
                                                                   max_tokens=12, seed=3))
    h.scheduler.add_request("late", prompt(5, 40), SamplingParams(max_tokens=20, ignore_eos=True, seed=4))


@pytest.mark.parametrize("lost_at_step", [1, 3, 8, 15])
def test_executor_loss_requeues_everything_and_outputs_do_not_change(lost_at_step):
    reference = Harness(num_gpu_blocks=24, num_cpu_blocks=32)
    _loss_workload(reference)
    expected = reference.run()

    h = Harness(num_gpu_blocks=24, num_cpu_blocks=32)
    _loss_workload(h)
    for _ in range(lost_at_step):
        h.step()
    plan = h.scheduler.schedule()         # this step is in flight when the executor dies
    assert not plan.is_empty
    requeued = h.scheduler.requeue_after_executor_loss()
    assert requeued >= 1 and not h.scheduler.running and not h.scheduler.swapped
    assert h.scheduler.block_manager.gpu.num_used == 0 and h.scheduler.block_manager.cpu.num_used == 0
    h.scheduler.check_integrity()
    h.executor = type(h.executor)(24, 32, 4, vocab_size=100, eos_token_id=EOS)   # restarted, empty
    done = h.run()
    def outputs(requests):
        return {k: (v.token_ids, v.finish_reasons, v.error) for k, v in requests.items()}
    assert outputs(done) == outputs(expected)


def test_fail_requests_ends_them_with_an_error_kind_and_frees_their_blocks():
    from pagedserve.errors import RequestErrorKind

    s = scheduler(max_num_seqs=1)
    s.add_request("a", prompt(6), SamplingParams())
    s.add_request("b", prompt(5), SamplingParams())
    plan = s.schedule()
    assert s.in_flight_request_ids() == ["a"]
    s.requeue_after_executor_loss()
    s.fail_requests(["a", "b", "unknown"], RequestErrorKind.UNAVAILABLE, "no executor")
    outputs = s.pop_outputs()
    assert [(o.request_id, o.error_kind) for o in outputs] == [("a", RequestErrorKind.UNAVAILABLE),
                                                               ("b", RequestErrorKind.UNAVAILABLE)]
    assert all(o.finished and o.error == "no executor" for o in outputs)
    assert s.block_manager.gpu.num_used == 0 and not s.has_unfinished
    assert plan.step_id < s.schedule().step_id
    s.check_integrity()
