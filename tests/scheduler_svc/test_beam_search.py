"""Beam search conventions: the scored length, the three early_stopping modes and the length limit.

The pure rules are checked on numbers; the scheduler-level tests run beam search over a scripted
model whose candidates are chosen so that True, False and "never" each return something different.
"""

import pytest
from sim_harness import EOS, VOCAB, Harness

from executor_svc.simulator import SimulatedExecutor
from pagedserve.contract.plan import Sample
from scheduler_svc.beam_search import beam_score, best_attainable_score, scored_length, search_is_done
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.sequence import FinishReason

# ---- the pure rules ------------------------------------------------------------------------------


def test_the_ending_token_is_not_scored_but_a_length_cut_counts_every_token():
    assert scored_length(5, FinishReason.EOS) == 4
    assert scored_length(5, FinishReason.STOP) == 4
    assert scored_length(5, FinishReason.LENGTH) == 5
    assert beam_score(-3.0, 0, 1.0) == -3.0            # an EOS as the first token divides by 1


@pytest.mark.parametrize(("mode", "length_penalty", "expected"), [
    (False, 1.0, -2.0 / 4), ("never", 1.0, -2.0 / 10),      # never: the longest length helps most
    (False, 2.0, -2.0 / 16), ("never", 2.0, -2.0 / 100),
    (False, 0.0, -2.0), ("never", 0.0, -2.0),                # no length effect: current length
    (False, -1.0, -2.0 * 4), ("never", -1.0, -2.0 * 4),      # shorter is better: current length
])
def test_best_attainable_score(mode, length_penalty, expected):
    assert best_attainable_score(-2.0, 4, 10, length_penalty, mode) == pytest.approx(expected)


def test_no_mode_stops_before_width_hypotheses_are_finished():
    for mode in (True, False, "never"):
        assert not search_is_done([-0.1], 2, -50.0, 4, 10, 1.0, mode)


def test_true_stops_once_width_hypotheses_are_finished():
    assert search_is_done([-5.0, -6.0], 2, -0.1, 4, 10, 1.0, True)
    assert not search_is_done([-5.0, -6.0], 2, -0.1, 4, 10, 1.0, False)


def test_false_and_never_compare_the_best_running_beam_with_the_worst_hypothesis():
    # The running beam scores -2/4 = -0.5 now and could reach -2/10 = -0.2 at the maximum length.
    finished = [-0.3, -0.4]
    assert search_is_done(finished, 2, -2.0, 4, 10, 1.0, False)          # -0.4 >= -0.5
    assert not search_is_done(finished, 2, -2.0, 4, 10, 1.0, "never")    # -0.4 < -0.2
    assert search_is_done([-0.1, -0.2], 2, -2.0, 4, 10, 1.0, "never")    # even -0.2 cannot beat them
    assert search_is_done([-0.5, -0.5], 2, -2.0, 4, 10, 1.0, False)      # a tie cannot improve either


# ---- the scheduler, over a scripted model --------------------------------------------------------

PROMPT = [90, 91, 92]
A, B, C, D, E, F, G, X, Y = range(10, 19)
FILLER = tuple((60 + i, -20.0 - i) for i in range(8))     # far too unlikely to ever be chosen

# Output so far -> the next token's candidates, most likely first. With width 1 and length_penalty 1:
# after A, (A, EOS) scores -1.0 / 1 and True stops there; the running (A, C) scores -1.1 / 2, so False
# and "never" go on. (A, C, EOS) scores -1.2 / 2 = -0.6, and the running (A, C, D) scores -1.9 / 3
# = -0.63 now, so False stops; "never" credits it -1.9 / 6 and goes on to (A, C, D, E, EOS), which
# scores -2.0 / 4 = -0.5. The limit cut (A, C, D, E, F, G) scores -3.45 / 6 = -0.575 and loses.
THREE_WAY = {
    (): [(A, -0.1), (B, -3.0)],
    (A,): [(EOS, -0.9), (C, -1.0)],
    (A, C): [(EOS, -0.1), (D, -0.8)],
    (A, C, D): [(E, -0.05), (EOS, -0.5)],
    (A, C, D, E): [(EOS, -0.05), (F, -0.5)],
    (A, C, D, E, F): [(G, -1.0), (EOS, -1.5)],
}
EXPECTED = {True: [A, EOS], False: [A, C, EOS], "never": [A, C, D, E, EOS]}

# Width 2, at the length limit (2 tokens): the top two candidates are (A, EOS) and (A, X); (B, Y),
# third, would outscore (A, EOS) by length (-1.25 / 2 against -1.1 / 1) but was never in the top two.
AT_LIMIT = {
    (): [(A, -0.1), (B, -0.2)],
    (A,): [(EOS, -1.0), (X, -1.1)],
    (B,): [(Y, -1.05), (X, -3.0)],
}


class ScriptedExecutor(SimulatedExecutor):
    """The simulated executor with candidates read from a script keyed by the output so far."""

    def __init__(self, script: dict[tuple[int, ...], list[tuple[int, float]]], harness: Harness) -> None:
        pool = harness.scheduler.block_manager
        super().__init__(pool.gpu.num_blocks, pool.cpu.num_blocks, harness.config.block_size,
                         vocab_size=VOCAB, eos_token_id=EOS)
        self.script = script

    def _sample(self, seq, stream, context, num_logprobs):
        output = tuple(seq.token_ids[seq.start.num_prompt_tokens:])
        candidates = (*self.script.get(output, ()), *FILLER)[:max(num_logprobs, 1)]
        return Sample(candidates[0][0], candidates[0][1], tuple(candidates))


def run_scripted(script, **params: object) -> tuple[list[list[int]], list[str], int]:
    """The outputs, their finish reasons and how many steps a beam request ran over `script`."""
    h = Harness()
    h.executor = ScriptedExecutor(script, h)
    h.scheduler.add_request("beam", PROMPT, SamplingParams(temperature=0.0, seed=1, **params))
    done = h.run()["beam"]
    assert done.error is None
    order = sorted(done.token_ids)
    return [done.token_ids[i] for i in order], [done.finish_reasons[i] for i in order], len(h.plans)


@pytest.mark.parametrize("mode", [True, False, "never"])
def test_each_early_stopping_mode_ends_the_search_where_it_should(mode):
    outputs, reasons, steps = run_scripted(THREE_WAY, beam_width=1, max_tokens=6, length_penalty=1.0,
                                           early_stopping=mode)
    assert outputs == [EXPECTED[mode]] and reasons == ["eos"]
    assert steps == {True: 2, False: 3, "never": 6}[mode]       # "never" runs to the length limit


def test_without_a_length_penalty_never_stops_where_false_does():
    # With length_penalty 0 scores only fall as beams grow: the running (A, C) at -1.1 cannot beat
    # (A, EOS) at -1.0, so every mode stops after two steps.
    for mode in (True, False, "never"):
        outputs, _, steps = run_scripted(THREE_WAY, beam_width=1, max_tokens=6, length_penalty=0.0,
                                         early_stopping=mode)
        assert outputs == [[A, EOS]] and steps == 2, mode


# EOS is the most likely token at every step; min_tokens 2 keeps it out until the third token.
EOS_FIRST = {(): [(EOS, -0.1), (A, -0.5)], (A,): [(EOS, -0.1), (B, -0.2)], (A, B): [(EOS, -0.1), (C, -0.3)]}


def test_before_min_tokens_an_eos_candidate_is_dropped_not_continued():
    outputs, reasons, _ = run_scripted(EOS_FIRST, beam_width=1, max_tokens=3, min_tokens=2)
    assert outputs == [[A, B, EOS]] and reasons == ["eos"]
    outputs, reasons, _ = run_scripted(EOS_FIRST, beam_width=1, max_tokens=3, min_tokens=2, ignore_eos=True)
    assert outputs[0][0] == EOS and reasons == ["length"]       # with ignore_eos it is a token like any


def test_at_the_length_limit_only_the_top_width_candidates_become_hypotheses():
    outputs, reasons, _ = run_scripted(AT_LIMIT, beam_width=2, n=2, max_tokens=2, length_penalty=1.0)
    assert outputs == [[A, X], [A, EOS]]            # (A, X) scores -1.2 / 2; (A, EOS) -1.1 / 1
    assert reasons == ["length", "eos"]
