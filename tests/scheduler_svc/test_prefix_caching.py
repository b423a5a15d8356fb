"""Automatic prefix caching: full prompt blocks shared across requests by content.

Every run goes through the token-level simulated executor, which reads each sequence's context back
through its block table: a cached block holding other tokens than the sharing prompt's fails there.
Outputs are compared with the same requests served without caching.
"""

from __future__ import annotations

import pytest
from sim_harness import Harness

from pagedserve.contract.plan import SequenceStart, SequenceWork, StepPlan
from pagedserve.contract.plan_codec import plan_from_proto, plan_to_proto
from pagedserve.contract.plan_validation import validate_plan
from pagedserve.errors import InvalidArgumentError
from scheduler_svc.block_manager import BlockManager
from scheduler_svc.config import PreemptionPolicy, ReservationMode, SchedulerConfig
from scheduler_svc.prefix_cache import ROOT, PrefixCache
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.sequence import Sequence

BS = 4
SYSTEM = list(range(10, 30))            # a 20-token "system prompt": five full blocks
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True, seed=3)


def harness(caching: bool = True, **config: object) -> Harness:
    config = {"num_gpu_blocks": 64, "num_cpu_blocks": 32, **config}
    return Harness(block_size=BS, max_model_len=128, enable_prefix_caching=caching, **config)


def add(h: Harness, request_id: str, prompt: list[int], params: SamplingParams = PARAMS) -> None:
    """Queue a request, remembering its first sequence's id for `first_work`."""
    group = h.scheduler.add_request(request_id, prompt, params)
    h.__dict__.setdefault("seq_ids", {})[request_id] = group.seqs[0].seq_id


def first_work(h: Harness, request_id: str) -> SequenceWork:
    """The first work item the executor got for the request's first sequence."""
    seq_id = h.__dict__["seq_ids"][request_id]
    return next(w for plan in h.plans for w in plan.sequences if w.seq_id == seq_id)


def run_pair(caching: bool, second_prompt: list[int], together: bool) -> Harness:
    h = harness(caching)
    add(h, "a", [*SYSTEM, 40, 41, 42], PARAMS)
    if not together:
        h.step()                # a's prompt step is planned (and run) before b arrives
    add(h, "b", second_prompt, PARAMS)
    h.run()
    return h


@pytest.mark.parametrize("together", [False, True], ids=["later", "same-step"])
def test_a_prompt_that_starts_like_an_earlier_one_computes_only_the_rest(together: bool) -> None:
    second = [*SYSTEM, 50, 51, 52, 53, 54]
    cached = run_pair(True, second, together)
    plain = run_pair(False, second, together)
    work = first_work(cached, "b")
    assert work.start_position == 20 and work.token_ids == second[20:]
    assert work.start is not None and list(work.start.cached_token_ids) == SYSTEM
    assert work.block_ids[:5] == first_work(cached, "a").block_ids[:5]        # the same physical blocks
    assert cached.scheduler.groups == {}                                          # all ended
    assert cached.done["b"].token_ids == plain.done["b"].token_ids
    assert cached.done["a"].token_ids == plain.done["a"].token_ids
    assert cached.done["b"].cached_prompt_tokens == 20 and cached.done["a"].cached_prompt_tokens == 0
    cache = cached.scheduler.block_manager.prefix_cache
    assert cache is not None and (cache.queried_tokens, cache.hit_tokens) == (23 + 25, 20)


def test_a_partly_shared_prefix_reuses_the_blocks_that_match() -> None:
    second = [*SYSTEM[:10], *[77] * 12]                        # diverges inside the third block
    h = run_pair(True, second, together=False)
    assert first_work(h, "b").start_position == 8           # two whole blocks match
    assert h.done["b"].token_ids == run_pair(False, second, together=False).done["b"].token_ids


def test_a_whole_cached_prompt_still_computes_its_last_block() -> None:
    h = harness()
    for name in ("a", "b"):
        add(h, name, SYSTEM, PARAMS)       # 20 tokens: exactly five blocks
        h.run()
    work = first_work(h, "b")
    assert work.start_position == 16 and work.token_ids == SYSTEM[16:]   # its logits need a computed token
    assert h.done["a"].token_ids == h.done["b"].token_ids                # same prompt, same seed


def test_blocks_of_finished_requests_stay_cached_until_their_space_is_needed() -> None:
    h = harness(num_gpu_blocks=12)
    add(h, "a", [*SYSTEM, 40], PARAMS)
    h.run()
    bm = h.scheduler.block_manager
    assert bm.gpu.num_free == bm.gpu.num_blocks and len(bm.prefix_cache) == 5    # parked, still free
    add(h, "big", list(range(50, 90)), SamplingParams(max_tokens=2, ignore_eos=True))
    h.run()                                                  # needs 11 of the 12 blocks: evicts
    add(h, "b", [*SYSTEM, 41], PARAMS)
    h.run()
    assert first_work(h, "b").start_position < 20            # what was evicted is computed again


def test_recomputation_after_preemption_finds_its_own_prompt_cached() -> None:
    long = SamplingParams(max_tokens=30, ignore_eos=True, seed=1)
    h = harness(num_gpu_blocks=22, num_cpu_blocks=0, preemption_mode=PreemptionPolicy.RECOMPUTE)
    add(h, "a", [*SYSTEM, 40], long)
    add(h, "b", [*range(60, 80), 41], long)
    h.run()
    assert h.scheduler.num_preemptions[PreemptionPolicy.RECOMPUTE] > 0
    readmitted = [w for plan in h.plans for w in plan.sequences if w.start is not None][2:]
    assert any(w.start_position > 0 for w in readmitted)
    plain = harness(False, num_gpu_blocks=64)
    add(plain, "a", [*SYSTEM, 40], long)
    add(plain, "b", [*range(60, 80), 41], long)
    plain.run()
    assert {k: v.token_ids for k, v in h.done.items()} == {k: v.token_ids for k, v in plain.done.items()}


def test_parallel_sampling_and_beams_share_cached_prefixes() -> None:
    h = harness()
    add(h, "a", [*SYSTEM, 40], PARAMS)
    h.run()
    add(h, "n", [*SYSTEM, 41], SamplingParams(n=3, max_tokens=5, seed=2))
    add(h, "beam", [*SYSTEM, 42], SamplingParams(beam_width=2, max_tokens=4, temperature=0.0))
    h.run()
    assert first_work(h, "n").start_position == 20 and first_work(h, "beam").start_position == 20


def test_losing_the_executors_forgets_the_cache() -> None:
    h = harness()
    add(h, "a", [*SYSTEM, 40], PARAMS)
    h.run()
    assert len(h.scheduler.block_manager.prefix_cache) == 5
    h.scheduler.requeue_after_executor_loss()
    bm = h.scheduler.block_manager
    assert len(bm.prefix_cache) == 0 and bm.gpu.num_free == bm.gpu.num_blocks
    bm.check_integrity([])


def test_prefix_caching_needs_paged_blocks() -> None:
    with pytest.raises(InvalidArgumentError, match="enable_prefix_caching"):
        SchedulerConfig(enable_prefix_caching=True, reservation=ReservationMode.RESERVE_MAX)


def test_keys_name_exact_prefixes() -> None:
    cache = PrefixCache(2)
    first = cache.register(0, (1, 2), block=7)
    cache.register(first, (3, 4), block=8)
    assert cache.match([1, 2, 3, 4, 5], 2) == [7, 8]
    assert cache.match([9, 9, 3, 4], 2) == []                # same block, other prefix: no match
    assert cache.register(0, (1, 2), block=9) == first       # already cached elsewhere: 9 stays out
    assert not cache.holds(9)


def test_cached_tokens_travel_in_the_plan_and_start_the_history() -> None:
    start = SequenceStart(request_id="r", num_prompt_tokens=6, seed=1, sample_index=0,
                          cached_token_ids=(5, 6, 7, 8))
    work = SequenceWork(seq_id=1, token_ids=[9, 10], start_position=4, block_table_start=0,
                        block_ids=[0, 1, 2], num_samples=1, num_logprobs=0, start=start)
    plan = StepPlan(step_id=1, sequences=[work])
    decoded = plan_from_proto(plan_to_proto(plan))
    assert decoded.sequences[0].start.cached_token_ids == (5, 6, 7, 8)
    validate_plan(decoded, {}, 2, 8, 0)
    wrong = StepPlan(step_id=2, sequences=[SequenceWork(1, [9, 10], 0, 0, [0, 1, 2], 1, 0, start)])
    with pytest.raises(ValueError, match="computes from position 0 but 4 tokens are cached"):
        validate_plan(wrong, {}, 2, 8, 0)


def test_a_block_already_cached_along_another_chain_is_adopted_not_cached_twice() -> None:
    """A forked or shared table can hold a block cached under a key chain the sequence's own walk does
    not reproduce (an earlier block of the chain was evicted since): the walk adopts its id."""
    bm = BlockManager(2, 16, 0, prefix_caching=True)
    cache = bm.prefix_cache
    first = cache.register(ROOT, (1, 2), block=5)
    cache.register(first, (3, 4), block=6)
    cache.park(5)
    assert cache.evict() == 5                   # the chain's first block is gone; block 6 is still cached
    seq = Sequence(1, None, [1, 2, 3, 4, 9], prompt_len=5)   # type: ignore[arg-type]
    seq.block_table = [5, 6, 7]
    bm.cache_computed_blocks(seq, end=5)
    assert seq.num_cached_blocks == 2 and seq.prefix_content_id == cache.content_id(6)
    assert cache.match([1, 2, 3, 4], 2) == [5]  # block 5 cached again under a new id; 6 keeps its key
