"""Convert step plans and results between the scheduler's dataclasses and `pagedserve.v1` protobuf."""

from __future__ import annotations

from pagedserve.contract.plan import (
    Sample,
    SequenceFork,
    SequenceResult,
    SequenceStart,
    SequenceWork,
    StepPlan,
    StepResult,
)
from pagedserve.v1 import executor_pb2 as pb

_START_FIELDS = ("request_id", "num_prompt_tokens", "seed", "sample_index", "temperature", "top_p", "top_k",
                 "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens")

_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_TINY = 2.0**-126           # the smallest normal float32
_UINT32_MAX = 2**32 - 1
# SequenceStart fields whose valid values the wire's float32 / uint32 cannot all hold, and the range
# each is saturated into when encoded. Every value SamplingParams accepts then arrives meaning what it
# meant: a temperature or repetition penalty beyond float32 would read as inf, a top_p below it as 0
# (both invalid), and a top_k past uint32 could not be encoded at all (top_k >= the vocabulary is off).
_START_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, _FLOAT32_MAX),                 # a positive value that rounds to 0 is greedy
    "top_p": (_FLOAT32_TINY, 1.0),
    "repetition_penalty": (_FLOAT32_TINY, _FLOAT32_MAX),
    "top_k": (0, _UINT32_MAX),
}


class ExecutorStepError(RuntimeError):
    """The executor rejected or failed a step; its message says why."""


def _mapping_to_proto(pairs: list[tuple[int, int]], out: pb.BlockMapping) -> None:
    if pairs:
        src, dst = zip(*pairs, strict=True)
        out.src.extend(src)
        out.dst.extend(dst)


def _mapping_from_proto(mapping: pb.BlockMapping) -> list[tuple[int, int]]:
    if len(mapping.src) != len(mapping.dst):
        raise ValueError(f"block mapping has {len(mapping.src)} sources but {len(mapping.dst)} targets")
    return list(zip(mapping.src, mapping.dst, strict=True))


def plan_to_proto(plan: StepPlan) -> pb.StepPlan:
    """Encode a plan for the wire."""
    msg = pb.StepPlan(step_id=plan.step_id, forget_seq_ids=plan.forget_seq_ids)
    for fork in plan.forks:
        msg.forks.add(parent_seq_id=fork.parent_seq_id, child_seq_id=fork.child_seq_id,
                      sample_index=fork.sample_index)
    _mapping_to_proto(plan.swap_out, msg.swap_out)
    _mapping_to_proto(plan.swap_in, msg.swap_in)
    _mapping_to_proto(plan.copy, msg.copy)
    for work in plan.sequences:
        item = msg.sequences.add(seq_id=work.seq_id, token_ids=work.token_ids,
                                 start_position=work.start_position, block_table_start=work.block_table_start,
                                 block_ids=work.block_ids, num_samples=work.num_samples,
                                 num_logprobs=work.num_logprobs, feeds_last_sample=work.feeds_last_sample)
        if work.start is not None:
            start = item.start
            for name in _START_FIELDS:
                setattr(start, name, _wire_value(name, getattr(work.start, name)))
            start.suppressed_token_ids.extend(work.start.suppressed_token_ids)
            start.cached_token_ids.extend(work.start.cached_token_ids)
    return msg


def _wire_value(name: str, value: str | float) -> str | float:
    """A SequenceStart field as encoded: saturated into _START_RANGES where the field has a range."""
    bounds = _START_RANGES.get(name)
    if bounds is None or isinstance(value, str):
        return value
    low, high = bounds
    return min(max(value, low), high)


def plan_from_proto(msg: pb.StepPlan) -> StepPlan:
    """Decode a plan; raises ValueError when its block mappings are malformed."""
    sequences = []
    for item in msg.sequences:
        start = None
        if item.HasField("start"):
            s = item.start
            start = SequenceStart(**{name: getattr(s, name) for name in _START_FIELDS},
                                  suppressed_token_ids=tuple(s.suppressed_token_ids),
                                  cached_token_ids=tuple(s.cached_token_ids))
        sequences.append(SequenceWork(item.seq_id, list(item.token_ids), item.start_position,
                                      item.block_table_start, list(item.block_ids), item.num_samples,
                                      item.num_logprobs, start, item.feeds_last_sample))
    return StepPlan(step_id=msg.step_id,
                    forks=[SequenceFork(f.parent_seq_id, f.child_seq_id, f.sample_index) for f in msg.forks],
                    swap_out=_mapping_from_proto(msg.swap_out), swap_in=_mapping_from_proto(msg.swap_in),
                    copy=_mapping_from_proto(msg.copy), forget_seq_ids=list(msg.forget_seq_ids),
                    sequences=sequences)


def result_to_proto(result: StepResult) -> pb.StepResult:
    """Encode a step result for the wire."""
    msg = pb.StepResult(step_id=result.step_id, forward_seconds=result.forward_seconds,
                        swap_seconds=result.swap_seconds, roofline_seconds=result.roofline_seconds)
    for seq in result.sequences:
        item = msg.sequences.add(seq_id=seq.seq_id, error=seq.error)
        for sample in seq.samples:
            out = item.samples.add(token_id=sample.token_id, logprob=sample.logprob)
            for token_id, logprob in sample.top_logprobs:
                out.top_logprobs.add(token_id=token_id, logprob=logprob)
    return msg


def error_result(step_id: int, message: str) -> pb.StepResult:
    """The answer to a plan the executor could not run."""
    return pb.StepResult(step_id=step_id, error=message)


def result_from_proto(msg: pb.StepResult) -> StepResult:
    """Decode a step result; raises ExecutorStepError when the executor reported an error."""
    if msg.error:
        raise ExecutorStepError(f"step {msg.step_id}: {msg.error}")
    return StepResult(
        step_id=msg.step_id,
        sequences=tuple(SequenceResult(item.seq_id, tuple(
            Sample(s.token_id, s.logprob, tuple((t.token_id, t.logprob) for t in s.top_logprobs))
            for s in item.samples), item.error) for item in msg.sequences),
        forward_seconds=msg.forward_seconds, swap_seconds=msg.swap_seconds,
        roofline_seconds=msg.roofline_seconds)
