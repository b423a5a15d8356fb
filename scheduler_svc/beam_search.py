"""Beam search selection: which beams continue, which hypotheses finish, and when the search ends.

Pure decisions over the beams' top candidates; the scheduler carries them out (fork, free, append).
Follows HF transformers' beam search: rank all 2 x width candidates by cumulative logprob; an EOS or
stop-token candidate among the top `width` becomes a finished hypothesis; the first `width` other
candidates become the next beams. At the length limit every candidate ends, and the top `width` become
hypotheses. The `width` best hypotheses by score are kept and the best `n` returned. Before min_tokens
tokens, EOS and stop-token candidates are dropped, as HF's min_new_tokens sets their logprobs to -inf
(the executor's candidates are logprobs of the raw logits, so they include them).

Scoring: a finished hypothesis scores cumulative_logprob / length ** length_penalty, where `length`
counts its generated tokens without the EOS or stop token that ended it (a hypothesis cut off by the
length limit counts all of its tokens); the prompt never counts. This is vLLM's rule for the ending
token, while HF transformers counts it (length + 1 for an EOS hypothesis); vLLM also counts the
prompt. So with length_penalty != 0 an EOS hypothesis can rank differently here than in HF.

When the search ends (`early_stopping`, HF's three modes): at the length limit, or once `width`
hypotheses are finished and
- True: at once;
- False: the best running beam, scored at its current length, is no better than the worst finished
  hypothesis (HF's heuristic: with length_penalty > 0 a beam could still gain by growing longer);
- "never": no running beam can beat the worst finished hypothesis at any length it may reach; with
  length_penalty > 0 its best possible score is at the maximum length, otherwise at its current one.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from pagedserve.contract.plan import Sample
from scheduler_svc.outputs import TokenLogprobs
from scheduler_svc.sampling_params import EarlyStopping
from scheduler_svc.sequence import BeamHypothesis, FinishReason, Sequence, SequenceGroup

# Finish reasons whose last token (EOS or a stop token id) ended the hypothesis: not scored.
_ENDED_BY_TOKEN = (FinishReason.EOS, FinishReason.STOP)


def beam_score(cumulative_logprob: float, length: int, length_penalty: float) -> float:
    """Length-penalised score: cumulative logprob / length ** length_penalty (length >= 1)."""
    penalty: float = max(length, 1) ** length_penalty  # int ** float is typed Any (it may be complex)
    return cumulative_logprob / penalty


def scored_length(num_output_tokens: int, finish_reason: FinishReason) -> int:
    """The length a finished hypothesis is scored by: its output tokens without the ending EOS or stop
    token; a hypothesis cut off by the length limit counts all `num_output_tokens`."""
    return num_output_tokens - (finish_reason in _ENDED_BY_TOKEN)


def best_attainable_score(cumulative_logprob: float, length: int, max_length: int, length_penalty: float,
                          early_stopping: EarlyStopping) -> float:
    """The score a running beam (`length` tokens, at most `max_length`) is credited with when deciding
    whether the search may end.

    False: its score at its current length (HF's heuristic). "never": the best score any hypothesis
    grown from it can reach, since its cumulative logprob can only fall: at `max_length` when
    length_penalty > 0 (the largest divisor), at its current length otherwise.
    """
    if early_stopping == "never" and length_penalty > 0.0:
        length = max_length
    return beam_score(cumulative_logprob, length, length_penalty)


def search_is_done(finished_scores: Seq[float], width: int, best_running_logprob: float, length: int,
                   max_length: int, length_penalty: float, early_stopping: EarlyStopping) -> bool:
    """Whether the search ends while beams still run.

    `finished_scores` are the kept hypotheses' scores (at most `width`), `best_running_logprob` the
    highest cumulative logprob among the running beams, which are all `length` tokens long.
    """
    if len(finished_scores) < width:
        return False
    if early_stopping is True:
        return True
    best = best_attainable_score(best_running_logprob, length, max_length, length_penalty, early_stopping)
    return min(finished_scores) >= best


@dataclass(frozen=True, slots=True)
class BeamContinuation:
    """A beam of the next step: `parent` extended by `token_id`."""

    parent: Sequence
    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]


@dataclass(slots=True)
class BeamStep:
    """The outcome of one beam-search step."""

    continuing: list[BeamContinuation] = field(default_factory=list)
    done: bool = False


@dataclass(frozen=True, slots=True)
class _Candidate:
    """`seq` extended by `token_id`, with the extended beam's cumulative logprob."""

    cumulative: float
    seq: Sequence
    token_id: int
    logprob: float
    sample: Sample


def _ranked_candidates(beams: list[tuple[Sequence, Sample]], width: int) -> list[_Candidate]:
    """Every beam's top 2 x width extensions, best cumulative logprob first."""
    candidates = [_Candidate(seq.cumulative_logprob + logprob, seq, token_id, logprob, sample)
                  for seq, sample in beams for token_id, logprob in sample.top_logprobs[: 2 * width]]
    candidates.sort(key=lambda c: c.cumulative, reverse=True)
    return candidates


def _ending(group: SequenceGroup, c: _Candidate) -> FinishReason | None:
    """Whether the candidate's token would end its beam: EOS (unless ignore_eos) or a stop token id."""
    p = group.params
    if not p.ignore_eos and c.token_id in group.eos_token_ids:
        return FinishReason.EOS
    if c.token_id in p.stop_token_ids:
        return FinishReason.STOP
    return None


def _hypothesis(c: _Candidate, reason: FinishReason, entry: TokenLogprobs | None,
                length_penalty: float) -> BeamHypothesis:
    logprobs = list(c.seq.output_logprobs)
    if entry is not None:
        logprobs.append(entry)
    score = beam_score(c.cumulative, scored_length(c.seq.output_len + 1, reason), length_penalty)
    return BeamHypothesis(output_token_ids=[*c.seq.output_token_ids, c.token_id],
                          cumulative_logprob=c.cumulative, score=score, finish_reason=reason,
                          output_logprobs=logprobs)


def select_beams(group: SequenceGroup, beams: list[tuple[Sequence, Sample]], max_model_len: int) -> BeamStep:
    """Choose the next beams from each running beam's candidates and update `group.hypotheses`."""
    p = group.params
    width = p.beam_width
    length = beams[0][0].output_len + 1 if beams else 0        # every beam's length after this step
    max_length = min(p.max_tokens, max_model_len - group.prompt_len)
    at_limit = length >= max_length
    candidates = _ranked_candidates(beams, width)
    if length <= p.min_tokens:          # too early to end: drop the endings, as HF does
        candidates = [c for c in candidates if _ending(group, c) is None]
    if at_limit:
        candidates = candidates[:width]     # every candidate ends here; only the top `width` are kept
    step = BeamStep()
    finished: list[BeamHypothesis] = []
    for rank, c in enumerate(candidates):
        entry = (c.logprob, c.sample.top_logprobs[: p.logprobs]) if p.logprobs > 0 else None
        reason = _ending(group, c) or (FinishReason.LENGTH if at_limit else None)
        if reason is not None:
            if rank < width:   # an ending outside the top `width` would never have been kept
                finished.append(_hypothesis(c, reason, entry, p.length_penalty))
            continue
        step.continuing.append(BeamContinuation(c.seq, c.token_id, c.logprob, entry[1] if entry else ()))
        if len(step.continuing) == width:
            break

    group.hypotheses.extend(finished)
    group.hypotheses.sort(key=lambda h: h.score, reverse=True)
    del group.hypotheses[width:]
    step.done = not step.continuing or search_is_done(
        [h.score for h in group.hypotheses], width,
        max(c.parent.cumulative_logprob + c.logprob for c in step.continuing), length, max_length,
        p.length_penalty, p.early_stopping)
    return step
