"""Execute step plans with a model: block operations, one flat forward pass, batched sampling.

The runner keeps, per sequence, its sampling settings, its token history (the tokens whose K/V are
cached, for penalties and the sampler's token index) and its block table, so plans only carry what
changed. Everything a plan names is checked before anything is applied (plan_validation).

A step is launched, then finished (`launch`, `RunningStep.finish`; `execute` does both). Launching
queues the block operations and the forward pass on the GPU; sampling is queued after the step before
it has finished; finishing waits for the sampled tokens. So step N+1 can be launched while step N still
computes: its forward pass is queued behind step N's sampling, and takes the samples it feeds back
from step N's token tensor on the device, whose values the host learns only when step N finishes
(their place in the token history is filled in then, before step N+1 samples). Launches and finishes
go in step order, with at most two steps unfinished.

Fault isolation: the forward pass is the whole batch's, and its failure fails the step. What follows it
belongs to one sequence at a time: a sequence whose sampling rows cannot be built, or whose rows the
sampler cannot sample, gets an error in its SequenceResult and every other sequence its samples. The
batch is sampled in one call; only if that raises is it sampled again sequence by sequence, to find
the sequences at fault. A failed sequence's later work (in plans made before the scheduler knew) is
skipped and answered with the same error until a plan forgets it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from executor_svc.attention import AttentionMetadata, ForwardContext
from executor_svc.cuda_graphs import DecodeGraphs
from executor_svc.kv_cache import KVCache
from executor_svc.models.base import CausalLM
from executor_svc.roofline import DecodeRoofline
from executor_svc.sampler import PendingSamplerOutput, Sampler, SamplerOutput, SamplingRow
from executor_svc.transfer import to_device
from pagedserve.contract.plan import Sample, SequenceResult, SequenceWork, StepPlan, StepResult
from pagedserve.contract.sequence_registry import PendingSample, SequenceRegistry, SequenceState

log = logging.getLogger("pagedserve.executor")
# A sequence's samples, or why it has none.
_Outcome = tuple[Sample, ...] | str


@dataclass(frozen=True, slots=True)
class StepBatch:
    """One step's flat forward batch."""

    input_ids: torch.Tensor         # [T] int64
    meta: AttentionMetadata
    last_token: list[int]           # per scheduled sequence: index of its last token in the batch


def prepare_batch(seqs: SequenceRegistry, works: list[SequenceWork], block_size: int,
                  device: torch.device, sampled_tokens: torch.Tensor | None = None) -> StepBatch:
    """Apply each work item to its sequence's state and lay the step's new tokens out in one flat batch.

    A fed-back sample still on the device (the previous step is unfinished) is taken from
    `sampled_tokens` [R] int64, that step's sampler rows, by a copy queued on the device.
    Host work that runs on every step before the GPU can start (`benchmarks/executor_host_path.py`
    times it).
    """
    input_ids: list[int] = []
    starts, lengths, tables, last_token = [], [], [], []
    unread_positions: list[int] = []        # batch positions of fed-back samples still on the device
    unread_rows: list[int] = []             # ... and their rows in sampled_tokens
    for work in works:
        pending = seqs.pending_feedback(work)
        state = seqs.begin_work(work)
        input_ids.extend(state.token_ids[-work.num_tokens:])    # a fed-back sample included
        starts.append(work.start_position)
        lengths.append(work.num_tokens)
        tables.append(state.block_table)
        last_token.append(len(input_ids) - 1)
        if pending is not None:
            unread_positions.append(len(input_ids) - 1)
            unread_rows.append(pending.row)
    meta = AttentionMetadata.build(starts, lengths, tables, block_size, device)
    ids = to_device(input_ids, torch.int64, device)                                    # [T]
    if unread_positions:
        assert sampled_tokens is not None, "a sample on the device needs the step that drew it"
        rows = to_device(unread_rows, torch.int64, device)                             # [F]
        ids.index_copy_(0, to_device(unread_positions, torch.int64, device), sampled_tokens[rows])
    return StepBatch(ids, meta, last_token)


class StepTimer:
    """The device time of a step's forward pass and sampling: CUDA events on a GPU (they time the
    step's own work even while it queues behind the step before), host time on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self._events = device.type == "cuda"
        self._start: torch.cuda.Event | float | None = None
        self._end: torch.cuda.Event | float | None = None

    def start(self) -> None:
        """The step's first kernel is about to be queued."""
        self._start = self._mark()

    def stop(self) -> None:
        """The step's last kernel has been queued (on the CPU: has run)."""
        self._end = self._mark()

    def done(self) -> bool:
        """Whether the work up to stop has run (waiting for it would not block)."""
        return not isinstance(self._end, torch.cuda.Event) or self._end.query()

    def seconds(self) -> float:
        """Elapsed seconds between start and stop, waiting for the work up to stop if it still runs."""
        if self._start is None or self._end is None:
            return 0.0
        if isinstance(self._start, torch.cuda.Event) and isinstance(self._end, torch.cuda.Event):
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        assert isinstance(self._start, float) and isinstance(self._end, float)
        return self._end - self._start

    def _mark(self) -> torch.cuda.Event | float:
        if not self._events:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


@dataclass(eq=False, slots=True)
class RunningStep:
    """A launched step: forward pass queued, sampling queued or still to queue, result when finished."""

    runner: ModelRunner
    plan: StepPlan
    works: list[SequenceWork]                    # the work the forward pass runs
    skipped: list[SequenceWork]                  # work of sequences that failed before: answered, not run
    timer: StepTimer
    swap_seconds: float
    batch: StepBatch | None = None
    hidden: torch.Tensor | None = None           # [T, hidden], until sampled
    sampled: bool = False
    sampling: PendingSamplerOutput | None = None
    spans: list[tuple[int, int, int]] = field(default_factory=list)   # (seq_id, first row, rows)
    outcomes: dict[int, _Outcome] = field(default_factory=dict)       # decided before the tokens are read
    failure: Exception | None = None             # why queueing its sampling failed: finishing raises it
    result: StepResult | None = None

    def ready(self) -> bool:
        """Whether finishing would not wait for the device (an unsampled step is never ready).

        The timer's stop is queued after the sampled tokens' copy to the host, so it covers both.
        """
        return self.result is not None or (self.sampled and self.timer.done())

    def finish(self) -> StepResult:
        """Wait for the step's samples and return its result (the steps before it finish first)."""
        return self.runner.finish(self)

    @property
    def sampled_tokens(self) -> torch.Tensor | None:
        """[R] int64 on the device: the step's drawn tokens, one per sampler row (None if none were)."""
        return None if self.sampling is None else self.sampling.tokens


class ModelRunner:
    """Runs plans against one model and its KV cache; calls come from one thread."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, sampler: Sampler | None = None,
                 roofline: DecodeRoofline | None = None, graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.roofline = roofline
        self.graphs = graphs
        self.kv_cache = kv_cache
        self.sampler = sampler or Sampler()
        self.device = kv_cache.device
        self.block_size = kv_cache.shape.block_size
        self.seqs = SequenceRegistry()
        self._unfinished: deque[RunningStep] = deque()     # launched, oldest first; at most two

    @property
    def steps_in_flight(self) -> int:
        """Steps launched and not finished yet (0, 1 or 2)."""
        return len(self._unfinished)

    def reset(self) -> None:
        """Forget every sequence (and any step in flight, unanswered)."""
        self._unfinished.clear()
        self.seqs.clear()

    def execute(self, plan: StepPlan) -> StepResult:
        """Apply one plan: forks, swap out, swap in, copy, forward and sample, forget."""
        return self.launch(plan).finish()

    def launch(self, plan: StepPlan) -> RunningStep:
        """Check the plan and queue its work; raises MalformedPlanError, changing nothing, if it does not
        fit. The step before it may still be unfinished; an earlier one, or one whose forgotten
        sequences this plan names again, is finished first."""
        while self._unfinished and (len(self._unfinished) > 1
                                    or not _can_follow_unfinished(self._unfinished[-1].plan, plan)):
            self.finish(self._unfinished[0])
        previous = self._unfinished[-1] if self._unfinished else None
        step = self._begin(plan, previous)
        self._unfinished.append(step)
        if previous is None:
            self._sample(step)
        return step

    def finish(self, step: RunningStep) -> StepResult:
        """Wait for the step's samples and build its result; the next step launched is sampled then."""
        while step.result is None:
            oldest = self._unfinished.popleft()
            self._complete(oldest)
            if self._unfinished and not self._unfinished[0].sampled:
                self._sample_or_fail(self._unfinished[0])
        return step.result

    def _sample_or_fail(self, step: RunningStep) -> None:
        """Queue the step's sampling while finishing the step before it; a failure belongs to this step
        (it raises when this step finishes), not to the one being finished."""
        try:
            self._sample(step)
        except Exception as err:
            step.sampled = True
            step.failure = err

    def _begin(self, plan: StepPlan, previous: RunningStep | None) -> RunningStep:
        """Validate and apply the plan's block operations, then queue its forward pass."""
        cache = self.kv_cache
        self.seqs.validate(plan, self.block_size, cache.num_gpu_blocks, cache.num_cpu_blocks)
        self.seqs.apply_forks(plan.forks)
        swap_start = time.perf_counter()
        cache.swap_out(plan.swap_out)
        cache.swap_in(plan.swap_in)
        cache.copy_blocks(plan.copy)
        swap_seconds = time.perf_counter() - swap_start
        works = [w for w in plan.sequences if not self.seqs.is_failed(w)]
        skipped = [w for w in plan.sequences if self.seqs.is_failed(w)]
        step = RunningStep(self, plan, works, skipped, StepTimer(self.device), swap_seconds)
        if works:
            step.timer.start()
            with torch.inference_mode():
                step.batch = prepare_batch(self.seqs, works, self.block_size, self.device,
                                           previous.sampled_tokens if previous is not None else None)
                step.hidden = self._forward(step.batch)
        return step

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        """The step's hidden states [T, hidden]: a captured graph for decode steps it covers."""
        if self.graphs is not None and self.graphs.can_run(batch.meta):
            return self.graphs.run(batch.input_ids, batch.meta)
        context = ForwardContext(self.kv_cache.gpu, batch.meta)
        return self.model(batch.input_ids, batch.meta.positions, context)

    @torch.inference_mode()
    def _sample(self, step: RunningStep) -> None:
        """Queue the step's logits and sampling, once the histories it reads are complete.

        Failures of one sequence's rows are recorded now, so that a step launched next skips that
        sequence's work; a sampled sequence's sample 0 is expected as its next input.
        """
        step.sampled = True
        if step.batch is None or step.hidden is None:
            return
        token_rows: list[int] = []
        rows: list[SamplingRow] = []
        for work, last in zip(step.works, step.batch.last_token, strict=True):
            if not work.num_samples:
                continue
            try:
                state = self.seqs[work.seq_id]
                seq_rows = [self._sampling_row(state, j, work.num_logprobs) for j in range(work.num_samples)]
            except Exception as err:        # this sequence's settings; the others are unaffected
                self._fail(step, work.seq_id, f"bad sampling settings: {err!r}")
                continue
            step.spans.append((work.seq_id, len(rows), len(seq_rows)))
            token_rows.extend([last] * len(seq_rows))
            rows.extend(seq_rows)
        if rows:
            logits = self.model.compute_logits(self._sampled_hidden(step.hidden, token_rows))   # [N, V]
            self._launch_sampling(step, logits, rows)
        step.hidden = None
        step.timer.stop()

    def _launch_sampling(self, step: RunningStep, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """The whole batch in one launch; if that raises, sequence by sequence (and waited for), so that a
        failure is charged only to the sequences whose rows cause it."""
        try:
            step.sampling = self.sampler.launch(logits, rows)
        except Exception:
            log.warning("sampling the batch of %d rows failed; sampling it sequence by sequence", len(rows),
                        exc_info=True)
        else:
            for seq_id, first, _ in step.spans:
                self.seqs.expect_sample(seq_id, PendingSample(first))
            return
        for seq_id, first, count in step.spans:
            try:
                alone = self.sampler(logits[first:first + count], rows[first:first + count])
            except Exception as err:
                self._fail(step, seq_id, f"sampling failed: {err!r}")
                continue
            samples = _samples(alone, 0, count)
            step.outcomes[seq_id] = samples
            self.seqs.expect_sample(seq_id, PendingSample(first))
            self.seqs.record_sample(seq_id, samples[0].token_id)
        step.spans.clear()

    def _fail(self, step: RunningStep, seq_id: int, error: str) -> None:
        """One sequence's own work failed this step; its request ends, the others go on."""
        self.seqs.record_failure(seq_id, error)
        step.outcomes[seq_id] = error
        log.error("request %s, sequence %d: %s", self.seqs[seq_id].start.request_id, seq_id, error)

    def _complete(self, step: RunningStep) -> None:
        """Read the step's samples (waiting for the device), record them, and build its result."""
        if step.failure is not None:
            raise step.failure
        if step.sampling is not None:
            out = step.sampling.result()
            for seq_id, first, count in step.spans:
                samples = _samples(out, first, count)
                step.outcomes[seq_id] = samples
                self.seqs.record_sample(seq_id, samples[0].token_id)
        for work in step.skipped:
            if work.num_samples:
                step.outcomes[work.seq_id] = self.seqs[work.seq_id].error
        results = tuple(_result(work.seq_id, step.outcomes[work.seq_id]) for work in step.plan.sequences
                        if work.num_samples and work.seq_id in step.outcomes)
        self.seqs.forget(step.plan.forget_seq_ids)
        step.sampling = None
        step.result = StepResult(step.plan.step_id, results, forward_seconds=step.timer.seconds(),
                                 swap_seconds=step.swap_seconds,
                                 roofline_seconds=self._roofline_seconds(step.plan.sequences))

    def _roofline_seconds(self, works: list[SequenceWork]) -> float:
        """The memory-roofline time of a step of decode tokens only (0 for any other step)."""
        if self.roofline is None or not works or any(w.num_tokens != 1 for w in works):
            return 0.0
        return self.roofline.seconds([w.start_position + 1 for w in works])

    def _sampled_hidden(self, hidden: torch.Tensor, token_rows: list[int]) -> torch.Tensor:
        """The hidden states [N, hidden] of the rows to sample, from the step's hidden [T, hidden].

        Queued behind the forward pass, never waited for: the host goes on to launch the logits and
        the sampler while the GPU still runs the model. A decode step that samples every token once
        needs no gather at all.
        """
        if len(token_rows) == hidden.shape[0] and token_rows == list(range(len(token_rows))):
            return hidden
        return hidden[to_device(token_rows, torch.int64, self.device)]

    @staticmethod
    def _sampling_row(state: SequenceState, sample: int, num_logprobs: int) -> SamplingRow:
        """The sampler's view of one draw: sample j of a prompt pass uses stream sample_index + j."""
        s = state.start
        prompt_len = s.num_prompt_tokens
        token_index = len(state.token_ids) - prompt_len
        # Histories only matter to penalties; copying them for every row each step would cost O(length).
        penalised = s.repetition_penalty != 1.0 or s.presence_penalty != 0.0 or s.frequency_penalty != 0.0
        history = state.token_ids if penalised else ()
        return SamplingRow(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                           repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
                           frequency_penalty=s.frequency_penalty, seed=s.seed,
                           stream=state.sample_index + sample, token_index=token_index,
                           prompt_token_ids=history[:prompt_len], output_token_ids=history[prompt_len:],
                           suppressed_token_ids=s.suppressed_token_ids if token_index < s.min_tokens else (),
                           num_logprobs=num_logprobs)


def _can_follow_unfinished(previous: StepPlan, plan: StepPlan) -> bool:
    """Whether `plan` may be launched before `previous` finishes: it must not name a sequence that
    `previous` forgets (a recomputed sequence starts again under its id) or fork one."""
    if plan.forks:
        return False
    forgotten = set(previous.forget_seq_ids)
    return not forgotten or not any(w.seq_id in forgotten for w in plan.sequences)


def _result(seq_id: int, outcome: _Outcome) -> SequenceResult:
    """A sequence's samples, or its error, as the step reports them."""
    if isinstance(outcome, str):
        return SequenceResult(seq_id, (), outcome)
    return SequenceResult(seq_id, outcome)


def _samples(out: SamplerOutput, first: int, count: int) -> tuple[Sample, ...]:
    """Rows first .. first + count - 1 of a sampler's output as Samples."""
    return tuple(Sample(out.token_ids[r], out.logprobs[r], out.top_logprobs[r])
                 for r in range(first, first + count))
