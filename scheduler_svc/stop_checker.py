"""When a sequence stops: EOS, stop token ids, max_tokens, max_model_len (stop strings need text and
are checked by the frontend's detokenizer, which then calls `Scheduler.finish_sequence`)."""

from __future__ import annotations

from scheduler_svc.sequence import FinishReason, Sequence


def check_stop(seq: Sequence, token_id: int, max_model_len: int) -> tuple[FinishReason, int | None] | None:
    """The finish reason (and stop token) after `token_id` was appended to `seq`, or None to go on.

    EOS and stop token ids count only once `min_tokens` tokens came before them, matching the
    executor, which suppresses them until then.
    """
    group = seq.group
    p = group.params
    num_tokens = len(seq.token_ids)
    output_len = num_tokens - seq.prompt_len
    if output_len > p.min_tokens:
        if not p.ignore_eos and token_id in group.eos_token_ids:
            return FinishReason.EOS, token_id
        if token_id in p.stop_token_ids:
            return FinishReason.STOP, token_id
    if output_len >= p.max_tokens or num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None
