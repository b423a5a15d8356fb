"""The step plan the scheduler emits each iteration and the result it consumes.

Plain dataclasses mirroring `pagedserve.v1.StepPlan` / `StepResult` in protos/pagedserve/v1/executor.proto;
the engine converts them to protobuf at the gRPC boundary so the scheduler stays free of I/O.
The executor applies a plan in this order: forks (a child clones its parent's state), swap out, swap in,
copy, the forward batch, then forget. A sequence id never appears both in the batch and in forget.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class MalformedPlanError(ValueError):
    """A plan names an unknown sequence, a block out of range, or positions that do not line up.

    Executors check a whole plan before applying any of it, reject it with this error, and keep
    serving with their state unchanged.
    """


@dataclass(frozen=True, slots=True)
class SequenceStart:
    """What the executor needs when it meets a sequence id for the first time.

    A sequence is new to the executor when it is admitted or re-admitted for recomputation; its
    history is then `cached_token_ids` followed by the tokens this step computes. Forked sequences
    arrive through `StepPlan.forks` instead.
    """

    request_id: str
    num_prompt_tokens: int          # tokens of the history that are prompt (penalties treat them apart)
    seed: int                       # randomness is a function of (seed, sample_index, output index)
    sample_index: int               # index of this sequence within its request (parallel sampling)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0             # suppress `suppressed_token_ids` until this many tokens are generated
    suppressed_token_ids: tuple[int, ...] = ()   # EOS (unless ignore_eos) and stop token ids
    # A cached prefix (prefix caching): leading prompt tokens whose K/V other sequences already wrote
    # into blocks this sequence's table starts with; its first step computes from the position after.
    cached_token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class SequenceWork:
    """One sequence's share of the forward batch in a step.

    `token_ids` are the tokens whose K/V this step computes, at positions
    `start_position .. start_position + num_tokens - 1`: a whole prompt, a prompt chunk, a prompt
    plus generated tokens being recomputed, or the one token sampled last step. With
    `feeds_last_sample` the last of those tokens is the one the executor itself sampled for this
    sequence in its previous step, which the scheduler has not seen yet (async scheduling plans step
    N+1 while step N runs); `token_ids` then holds only the tokens before it (none, when decoding).
    The executor's copy of the block table is updated as `table[block_table_start:] = block_ids`:
    the full table when the executor has not seen the sequence or it was swapped back in, only the
    appended ids in steady state, and the last id again after a copy-on-write replaced it.
    """

    seq_id: int
    token_ids: list[int]
    start_position: int
    block_table_start: int
    block_ids: list[int]
    num_samples: int                # 0: mid-prompt chunk, sample nothing; >1: parallel samples
    num_logprobs: int               # top-k logprobs to return with each sample
    start: SequenceStart | None = None
    feeds_last_sample: bool = False

    @property
    def num_tokens(self) -> int:
        """Tokens this step computes for the sequence, the fed-back sample included."""
        return len(self.token_ids) + self.feeds_last_sample


@dataclass(frozen=True, slots=True)
class SequenceFork:
    """A child sequence that starts as a copy of its parent (parallel sampling, beam search).

    The child takes the parent's token history, sampling settings and block table as they stand
    when the plan arrives, and its own `sample_index` for its random stream.
    """

    parent_seq_id: int
    child_seq_id: int
    sample_index: int


@dataclass(slots=True)
class StepPlan:
    """Everything the executors do in one iteration, in order of execution."""

    step_id: int
    forks: list[SequenceFork] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)    # (gpu block, cpu block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)     # (cpu block, gpu block)
    copy: list[tuple[int, int]] = field(default_factory=list)        # (src gpu block, dst gpu block)
    forget_seq_ids: list[int] = field(default_factory=list)
    sequences: list[SequenceWork] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """True when the plan asks the executor for nothing at all."""
        return not (self.forks or self.swap_out or self.swap_in or self.copy or self.forget_seq_ids
                    or self.sequences)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens in the forward batch."""
        return sum(w.num_tokens for w in self.sequences)


@dataclass(frozen=True, slots=True)
class Sample:
    """One sampled token with its logprob and, when asked for, the top-k alternatives."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()   # (token id, logprob), best first


@dataclass(frozen=True, slots=True)
class SequenceResult:
    """The samples one sequence produced in a step (`num_samples` of them, in sample order), or why it
    produced none.

    `error` is set (and `samples` empty) when the sequence's own work failed after the forward pass:
    only its request ends, and the executor answers its later work with the same error until the
    sequence is forgotten.
    """

    seq_id: int
    samples: tuple[Sample, ...]
    error: str = ""


@dataclass(frozen=True, slots=True)
class StepResult:
    """What an executor sends back for one plan."""

    step_id: int
    sequences: tuple[SequenceResult, ...] = ()
    forward_seconds: float = 0.0
    swap_seconds: float = 0.0
    roofline_seconds: float = 0.0       # decode-only steps: the memory-roofline time of the forward pass
