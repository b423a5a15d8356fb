"""Beam search selection: which beams continue, which hypotheses finish, and when the search ends.

Pure decisions over the beams' top candidates; the scheduler carries them out (fork, free, append).
Follows the usual rule (HF transformers, vLLM): rank all 2 x width candidates by cumulative logprob;
an end-of-sequence candidate among the top `width` becomes a finished hypothesis; the first `width`
other candidates become the next beams. The search ends when `width` hypotheses are finished and the
best running beam can no longer beat the worst of them, or when the length limit is reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler_svc.plan import Sample
from scheduler_svc.sequence import BeamHypothesis, FinishReason, Sequence, SequenceGroup


def beam_score(cumulative_logprob: float, length: int, length_penalty: float) -> float:
    """Length-penalised score: cumulative logprob / length ** length_penalty (length >= 1)."""
    return cumulative_logprob / (max(length, 1) ** length_penalty)


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


def _hypothesis(seq: Sequence, token_id: int, cumulative: float, length: int, reason: FinishReason,
                logprob_entry: tuple | None, length_penalty: float) -> BeamHypothesis:
    logprobs = list(seq.output_logprobs)
    if logprob_entry is not None:
        logprobs.append(logprob_entry)
    return BeamHypothesis(output_token_ids=[*seq.output_token_ids, token_id], cumulative_logprob=cumulative,
                          score=beam_score(cumulative, length, length_penalty), finish_reason=reason,
                          output_logprobs=logprobs)


def select_beams(group: SequenceGroup, beams: list[tuple[Sequence, Sample]], max_model_len: int) -> BeamStep:
    """Choose the next beams from each running beam's candidates and update `group.hypotheses`."""
    p = group.params
    width = p.beam_width
    keep_logprobs = p.logprobs > 0
    candidates = []
    for seq, sample in beams:
        for token_id, logprob in sample.top_logprobs[: 2 * width]:
            candidates.append((seq.cumulative_logprob + logprob, seq, token_id, logprob, sample))
    candidates.sort(key=lambda c: c[0], reverse=True)

    step = BeamStep()
    finished: list[BeamHypothesis] = []
    for rank, (cumulative, seq, token_id, logprob, sample) in enumerate(candidates):
        entry = (logprob, sample.top_logprobs[: p.logprobs]) if keep_logprobs else None
        may_stop = seq.output_len >= p.min_tokens
        reason = None
        if may_stop and not p.ignore_eos and token_id in group.eos_token_ids:
            reason = FinishReason.EOS
        elif may_stop and token_id in p.stop_token_ids:
            reason = FinishReason.STOP
        if reason is not None:
            if rank < width:   # an ending outside the top `width` would never have been kept
                finished.append(_hypothesis(seq, token_id, cumulative, seq.output_len, reason, entry,
                                            p.length_penalty))
            continue
        step.continuing.append(BeamContinuation(seq, token_id, logprob, entry[1] if entry else ()))
        if len(step.continuing) == width:
            break

    new_len = beams[0][0].output_len + 1 if beams else 0
    at_limit = new_len >= p.max_tokens or (beams and beams[0][0].num_tokens + 1 >= max_model_len)
    if at_limit:
        for c in step.continuing:
            cumulative = c.parent.cumulative_logprob + c.logprob
            entry = (c.logprob, c.top_logprobs) if keep_logprobs else None
            finished.append(_hypothesis(c.parent, c.token_id, cumulative, new_len, FinishReason.LENGTH, entry,
                                        p.length_penalty))
        step.continuing = []

    group.hypotheses.extend(finished)
    group.hypotheses.sort(key=lambda h: h.score, reverse=True)
    del group.hypotheses[width:]
    step.done = not step.continuing or _cannot_improve(group, step, new_len)
    return step


def _cannot_improve(group: SequenceGroup, step: BeamStep, length: int) -> bool:
    """Whether `width` hypotheses are finished and no running beam can beat the worst of them."""
    p = group.params
    if len(group.hypotheses) < p.beam_width:
        return False
    best_running = max(c.parent.cumulative_logprob + c.logprob for c in step.continuing)
    return group.hypotheses[-1].score >= beam_score(best_running, length, p.length_penalty)
