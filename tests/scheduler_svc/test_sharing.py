"""Parallel sampling and beam search: shared blocks, copy-on-write, forks, and the outputs chosen."""

import pytest
from sim_harness import EOS, Harness

from pagedserve.contract.plan import SequenceStart
from scheduler_svc.beam_search import beam_score
from scheduler_svc.config import ReservationMode
from scheduler_svc.sampling_params import SamplingParams

PROMPT = [11, 12, 13, 14, 15, 16]       # 6 tokens: one full block of 4 and a shared partial one


def test_parallel_sampling_forks_after_the_prompt_and_copies_the_shared_tail_on_write():
    h = Harness(num_gpu_blocks=32)
    h.scheduler.add_request("p", PROMPT, SamplingParams(n=3, max_tokens=6, seed=5))
    plan, _ = h.step()
    assert plan.sequences[0].num_samples == 3            # one prompt pass samples all three
    group = h.scheduler.groups["p"]
    assert len(group.seqs) == 3
    full, tail = group.seqs[0].block_table
    assert h.scheduler.block_manager.gpu.ref_counts[full] == 3
    assert h.scheduler.block_manager.gpu.ref_counts[tail] == 3
    plan, _ = h.step()
    assert [(f.parent_seq_id, f.sample_index) for f in plan.forks] == [(group.seqs[0].seq_id, 1),
                                                                       (group.seqs[0].seq_id, 2)]
    assert len(plan.copy) == 2 and {src for src, _ in plan.copy} == {tail}
    assert h.scheduler.block_manager.gpu.ref_counts[full] == 3      # the full block stays shared
    done = h.run()
    outputs = done["p"].token_ids
    assert sorted(outputs) == [0, 1, 2] and all(len(t) == 6 for t in outputs.values())
    assert len({tuple(t) for t in outputs.values()}) == 3            # three different random streams


def test_parallel_sampling_shares_the_prompt_memory():
    prompt = list(range(10, 50))                                     # 10 blocks of prompt
    used = {}
    for mode in (ReservationMode.PAGED, ReservationMode.RESERVE_ORACLE):
        h = Harness(num_gpu_blocks=200, reservation=mode)
        h.scheduler.add_request("p", prompt, SamplingParams(n=4, max_tokens=4, seed=1))
        h.step()
        h.step()
        used[mode] = h.scheduler.block_manager.gpu.num_used
    assert used[ReservationMode.PAGED] == 10 + 4                     # shared prompt + one block each
    assert used[ReservationMode.RESERVE_ORACLE] == 4 * 11            # 44 tokens reserved per sample


def test_best_of_returns_the_n_best_by_cumulative_logprob_at_the_end():
    h = Harness()
    h.scheduler.add_request("b", PROMPT, SamplingParams(n=2, best_of=4, max_tokens=5, seed=9))
    reports = []
    while h.scheduler.has_unfinished:
        plan = h.scheduler.schedule()
        reports += h.scheduler.process_result(h.executor.execute(plan))
    (final,) = reports                                               # nothing streamed before the end
    group_seqs = sorted(((s.cumulative_logprob, s.output_token_ids) for s in final_group_seqs(h, final)),
                        reverse=True)
    assert [c.token_ids for c in final.outputs] == [tokens for _, tokens in group_seqs[:2]]
    assert final.outputs[0].cumulative_logprob >= final.outputs[1].cumulative_logprob


def final_group_seqs(h: Harness, final):
    """All best_of sequences of the finished request, rebuilt from the executor's deterministic streams."""
    start = SequenceStart("b", len(PROMPT), 9, 0)
    seqs = []
    for stream in range(4):
        tokens, cum = list(PROMPT), 0.0
        for _ in range(5):
            sample = h.executor.next_token(tokens, len(tokens), start, stream, 0)
            tokens.append(sample.token_id)
            cum += sample.logprob
        seqs.append(_Seq(cum, tokens[len(PROMPT):]))
    return seqs


class _Seq:
    def __init__(self, cumulative_logprob, output_token_ids):
        self.cumulative_logprob = cumulative_logprob
        self.output_token_ids = output_token_ids


def reference_beam_search(h: Harness, prompt, width, n, max_tokens, length_penalty, seed, early_stopping):
    """Beam search over the executor's distribution with plain token lists (no blocks, no forks)."""
    start = SequenceStart("ref", len(prompt), seed, 0)
    beams, hyps = [([], 0.0)], []
    for step in range(max_tokens):
        candidates = []
        for out, cum in beams:
            context = prompt + out
            sample = h.executor.next_token(context, len(context), start, 0, 2 * width)
            candidates += [(cum + lp, out, token) for token, lp in sample.top_logprobs]
        candidates.sort(key=lambda c: c[0], reverse=True)
        at_limit = step + 1 >= max_tokens
        new = []
        for rank, (cum, out, token) in enumerate(candidates[:width] if at_limit else candidates):
            if token == EOS or at_limit:        # at the limit the top `width` all end
                if rank < width:                # scored without the EOS, with a limit-cut last token
                    length = len(out) + (token != EOS)
                    hyps.append((beam_score(cum, length, length_penalty), [*out, token]))
                continue
            new.append(([*out, token], cum))
            if len(new) == width:
                break
        hyps = sorted(hyps, key=lambda x: x[0], reverse=True)[:width]
        if not new:
            break
        if len(hyps) >= width:
            if early_stopping is True:
                break
            length = max_tokens if early_stopping == "never" and length_penalty > 0 else step + 1
            if hyps[-1][0] >= beam_score(max(cum for _, cum in new), length, length_penalty):
                break
        beams = new
    return [tokens for _, tokens in hyps[:n]]


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_search_matches_a_reference_without_paging_and_keeps_exact_ref_counts(early_stopping):
    for width, n, lp, seed in [(2, 1, 1.0, 3), (3, 2, 0.5, 4), (4, 4, 1.0, 5), (4, 2, 2.0, 6)]:
        h = Harness(num_gpu_blocks=64, eos_probability=0.15)
        params = SamplingParams(n=n, beam_width=width, temperature=0.0, max_tokens=12, length_penalty=lp,
                                seed=seed, early_stopping=early_stopping)
        h.scheduler.add_request("beam", PROMPT, params)
        shared_seen = False
        while h.scheduler.has_unfinished:
            h.step()                                                 # checks ref counts every step
            shared_seen |= any(c > 1 for c in h.scheduler.block_manager.gpu.ref_counts)
            group = h.scheduler.groups.get("beam")
            if group is not None:
                assert len(group.unfinished_seqs()) <= width
        assert shared_seen                                           # beams did share blocks
        expected = reference_beam_search(h, PROMPT, width, n, 12, lp, seed, early_stopping)
        got = [h.done["beam"].token_ids[i] for i in range(len(expected))]
        assert got == expected, (width, n, lp)
        assert h.scheduler.block_manager.gpu.num_used == 0


def test_beam_search_survives_swapping():
    results = {}
    for blocks in (64, 10):
        h = Harness(num_gpu_blocks=blocks, num_cpu_blocks=64, watermark=0.0)
        for i in range(3):
            h.scheduler.add_request(f"b{i}", [20 + i] * 5, SamplingParams(
                n=2, beam_width=3, temperature=0.0, max_tokens=10, seed=i, ignore_eos=True))
        results[blocks] = {k: v.token_ids for k, v in h.run().items()}
        if blocks == 10:
            assert h.scheduler.stats().num_preemptions_swap > 0
    assert results[10] == results[64]
