"""What an executor remembers about each sequence between steps, kept the same way by every backend.

Plans only carry what changed: a sequence's sampling settings arrive once (`SequenceStart`), forks
clone a parent, block tables arrive as deltas and token histories grow by the tokens computed. The
registry applies those parts of a plan, and checks a whole plan against its state before any of it is
applied (plan_validation).

A sample still on the device (its step is launched but not finished) is a `PendingSample`: a plan made
ahead may feed it back already, and the step that does takes it from the device; its place in the
token history is filled in when its step finishes (`record_sample`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.contract.plan import SequenceFork, SequenceStart, SequenceWork, StepPlan
from pagedserve.contract.plan_validation import validate_plan


@dataclass(frozen=True, slots=True)
class PendingSample:
    """Sample 0 of a sequence, drawn in a step not finished yet: row `row` of that step's sampler output."""

    row: int


@dataclass(slots=True)
class SequenceState:
    """One sequence as an executor knows it."""

    start: SequenceStart
    sample_index: int                                     # this sequence's random stream
    token_ids: list[int] = field(default_factory=list)    # tokens whose K/V are cached
    block_table: list[int] = field(default_factory=list)
    # Sample 0 of this sequence's last step, which a plan made ahead may feed back as its next input.
    last_sample: int | PendingSample | None = None
    # Where in token_ids a fed-back sample still on the device sits, until its step finishes.
    unread_sample_index: int | None = None
    # Why this sequence's own work failed (empty while it has not): its request is ending, and its
    # work in plans made before the scheduler knew is skipped until the sequence is forgotten.
    error: str = ""


class SequenceRegistry(dict[int, SequenceState]):
    """Sequence id -> state, with the plan operations that change it."""

    def validate(self, plan: StepPlan, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        """Raise MalformedPlanError if the plan does not fit what is held; changes nothing."""
        # A failed sequence may be fed back: that work is skipped, not run.
        known = {seq_id: (len(s.token_ids), len(s.block_table), s.last_sample is not None or bool(s.error))
                 for seq_id, s in self.items()}
        validate_plan(plan, known, block_size, num_gpu_blocks, num_cpu_blocks)

    def apply_forks(self, forks: list[SequenceFork]) -> None:
        """Each child starts as a copy of its parent, with its own random stream."""
        for fork in forks:
            parent = self[fork.parent_seq_id]
            self[fork.child_seq_id] = SequenceState(parent.start, fork.sample_index, parent.token_ids.copy(),
                                                    parent.block_table.copy())

    def begin_work(self, work: SequenceWork) -> SequenceState:
        """Register or update the sequence for this step: table delta applied, history extended.

        The step's input tokens are the last `work.num_tokens` of the returned state's `token_ids`
        (a fed-back sample included). The sequence's last sample is cleared: this step samples anew
        or, mid-prompt, leaves nothing to feed back.
        """
        if work.start is not None:
            state = self[work.seq_id] = SequenceState(work.start, work.start.sample_index,
                                                      list(work.start.cached_token_ids))
        else:
            state = self[work.seq_id]
        state.block_table[work.block_table_start:] = work.block_ids
        state.token_ids.extend(work.token_ids)
        if work.feeds_last_sample:
            assert state.last_sample is not None, "validate the plan first"
            if isinstance(state.last_sample, PendingSample):
                state.token_ids.append(0)               # filled in by record_sample
                state.unread_sample_index = len(state.token_ids) - 1
            else:
                state.token_ids.append(state.last_sample)
        state.last_sample = None
        return state

    def pending_feedback(self, work: SequenceWork) -> PendingSample | None:
        """The sample still on the device that this work feeds back, if it feeds one (before begin_work)."""
        state = self.get(work.seq_id)
        if not work.feeds_last_sample or state is None or not isinstance(state.last_sample, PendingSample):
            return None
        return state.last_sample

    def expect_sample(self, seq_id: int, pending: PendingSample) -> None:
        """This step draws the sequence's next sample; until the step finishes it is on the device."""
        self[seq_id].last_sample = pending

    def record_sample(self, seq_id: int, token_id: int) -> None:
        """Keep sample 0 of this step: a plan made ahead may feed it back next step.

        If the next step has already taken it as input from the device, its place in the history is
        filled in instead.
        """
        state = self[seq_id]
        if state.unread_sample_index is not None:
            state.token_ids[state.unread_sample_index] = token_id
            state.unread_sample_index = None
        elif state.last_sample is None or isinstance(state.last_sample, PendingSample):
            state.last_sample = token_id

    def record_failure(self, seq_id: int, error: str) -> None:
        """The sequence's own work failed this step; it samples nothing until it is forgotten."""
        state = self[seq_id]
        state.error = error
        state.last_sample = None

    def is_failed(self, work: SequenceWork) -> bool:
        """Whether this work belongs to a sequence whose work failed before (a start begins anew)."""
        state = self.get(work.seq_id)
        return work.start is None and state is not None and bool(state.error)

    def forget(self, seq_ids: list[int]) -> None:
        """Drop finished, aborted and recomputed sequences."""
        for seq_id in seq_ids:
            del self[seq_id]
