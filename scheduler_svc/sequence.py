"""Sequences and sequence groups: the scheduler's record of every token of every live request."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pagedserve.errors import RequestErrorKind
from scheduler_svc.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence (and, for its unfinished sequences, its whole group) stands."""

    WAITING = "waiting"      # no KV blocks: not yet admitted, or preempted by recomputation
    RUNNING = "running"      # blocks on the GPU, scheduled every step
    SWAPPED = "swapped"      # blocks in CPU swap space
    FINISHED = "finished"


class FinishReason(enum.Enum):
    """Why a sequence stopped."""

    LENGTH = "length"        # max_tokens or max_model_len reached
    STOP = "stop"            # a stop token id or stop string
    EOS = "eos"
    ABORTED = "aborted"      # the client aborted or cancelled
    ERROR = "error"          # the request can never run (the message says what to change)


class Sequence:
    """One token stream: the prompt, its generated tokens, and the blocks that hold their K/V.

    `num_computed_tokens` counts tokens whose K/V are in the cache; the scheduler computes the rest.
    In steady-state decoding that is the one token sampled last step.

    Steps sent but not yet answered are counted apart: `num_in_flight_tokens` tokens are being
    computed, and `num_pending_samples` tokens (one per sampling step in flight) will be appended when
    they report. With async scheduling the next step is planned from those counts before the answer
    arrives.
    """

    __slots__ = (
        "block_table", "cumulative_logprob", "executor_table_len", "finish_reason", "group",
        "num_cached_blocks", "num_computed_tokens", "num_in_flight_tokens", "num_pending_samples",
        "output_logprobs", "prefix_content_id", "prompt_len", "sample_index", "seq_id", "status",
        "stop_reason", "token_ids",
    )

    def __init__(self, seq_id: int, group: SequenceGroup, token_ids: list[int], prompt_len: int,
                 sample_index: int = 0) -> None:
        self.seq_id = seq_id
        self.group = group
        self.token_ids = token_ids                  # prompt + generated
        self.prompt_len = prompt_len
        self.sample_index = sample_index            # selects this sequence's random stream
        self.num_computed_tokens = 0
        self.num_in_flight_tokens = 0
        self.num_pending_samples = 0
        self.status = SequenceStatus.WAITING
        self.cumulative_logprob = 0.0
        self.output_logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] = []
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.block_table: list[int] = []           # logical block i -> physical block (GPU or CPU)
        # How many leading block-table entries the executor holds correctly; 0 means it must be
        # sent in full. -1 means the executor does not know this sequence at all.
        self.executor_table_len = -1
        # Prefix caching: leading prompt blocks found in or given to the cache, and the content id of
        # the prefix they hold (the next full prompt block is cached under it).
        self.num_cached_blocks = 0
        self.prefix_content_id = 0

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_tokens_ahead(self) -> int:
        """Tokens the sequence will have once the steps in flight report (their samples included)."""
        return len(self.token_ids) + self.num_pending_samples

    @property
    def num_unscheduled_tokens(self) -> int:
        """Tokens known or being sampled whose K/V are neither cached nor being computed: what the next
        step may compute."""
        return (len(self.token_ids) + self.num_pending_samples
                - self.num_computed_tokens - self.num_in_flight_tokens)

    def length_ends_in_flight(self, max_model_len: int) -> bool:
        """Whether the sample in flight will end this sequence by max_tokens or max_model_len.

        Such a sequence needs no further step; only EOS and stop tokens cannot be foreseen.
        """
        if not self.num_pending_samples:
            return False
        ahead = self.num_tokens_ahead
        return ahead - self.prompt_len >= self.group.params.max_tokens or ahead >= max_model_len

    @property
    def output_len(self) -> int:
        """Generated tokens."""
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens (a copy)."""
        return self.token_ids[self.prompt_len:]

    @property
    def is_finished(self) -> bool:
        """Whether the sequence has stopped."""
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")


@dataclass(slots=True)
class BeamHypothesis:
    """A finished beam: its generated tokens and scores, kept until the beam search ends."""

    output_token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: FinishReason
    output_logprobs: list[tuple[float, tuple[tuple[int, float], ...]]]


@dataclass(eq=False, slots=True)
class SequenceGroup:
    """All sequences of one request: 1, best_of (parallel sampling) or beam_width (beam search).

    The group is scheduled all-or-nothing: its unfinished sequences always share `status`.
    Groups are ordered by `sort_key`: priority first, then arrival (FCFS).
    """

    request_id: str
    arrival_index: int
    arrival_time: float
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    seed: int
    eos_token_ids: frozenset[int]
    status: SequenceStatus = SequenceStatus.WAITING
    seqs: list[Sequence] = field(default_factory=list)
    # True until the first prompt pass has produced `params.num_sequences` samples to fork from.
    needs_fork: bool = True
    hypotheses: list[BeamHypothesis] = field(default_factory=list)
    error: str | None = None
    error_kind: RequestErrorKind | None = None
    # Reserving modes: block tables held for sequences to come (forks) or returned by finished ones.
    reserved_tables: list[list[int]] = field(default_factory=list)
    # Copy-on-fork pairs of reserving modes, sent with this group's next scheduled step.
    pending_copies: list[tuple[int, int]] = field(default_factory=list)
    first_scheduled_time: float | None = None
    num_cached_prompt_tokens: int = 0   # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    num_unfinished: int = 0          # kept by the scheduler as sequences are added and finish
    prompt_len: int = field(init=False)
    sort_key: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_token_ids)
        # Scheduling order: lower priority value first, then first come, first served.
        self.sort_key = (self.params.priority, self.arrival_index)

    def unfinished_seqs(self) -> list[Sequence]:
        """Sequences still generating."""
        return [s for s in self.seqs if s.status is not SequenceStatus.FINISHED]

    @property
    def is_finished(self) -> bool:
        """Whether every sequence has stopped."""
        return self.status is SequenceStatus.FINISHED

    def max_running_seqs(self) -> int:
        """Sequences this group will run at once at its widest, for the max_num_seqs budget."""
        if self.needs_fork:
            return self.params.num_sequences
        return sum(1 for s in self.seqs if s.status is not SequenceStatus.FINISHED)
