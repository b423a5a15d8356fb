"""Iteration-level FCFS scheduling with all-or-nothing preemption (the paper's §4.2 and §4.5).

Plain synchronous Python with no I/O: the engine calls `schedule()` for a StepPlan, sends it to the
executors, and feeds their StepResult to `process_result()`; tests drive it the same way.

Async scheduling: while one step runs, `schedule_ahead()` plans the next from what that step will
leave (each decoding sequence one token longer) and the executors feed their own samples back as its
inputs, so the scheduler's work overlaps the GPU's. Where the next step depends on the samples
themselves (beam search, the fork of a parallel-sampling prompt) or would need a preemption, it
declines and the engine falls back to one step at a time.
"""

from __future__ import annotations

import bisect
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pagedserve.contract.plan import (
    Sample,
    SequenceFork,
    SequenceResult,
    SequenceStart,
    SequenceWork,
    StepPlan,
    StepResult,
)
from pagedserve.errors import InvalidArgumentError, PlanResultMismatchError, RequestErrorKind
from scheduler_svc.beam_search import BeamContinuation, select_beams
from scheduler_svc.block_manager import AllocStatus, BlockManager
from scheduler_svc.config import PreemptionPolicy, SchedulerConfig
from scheduler_svc.outputs import CompletionOutput, RequestOutput
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.sequence import FinishReason, Sequence, SequenceGroup, SequenceStatus
from scheduler_svc.stats import SchedulerStats
from scheduler_svc.stop_checker import check_stop

_SeqSamples = tuple[Sequence, tuple[Sample, ...]]


@dataclass(frozen=True, slots=True)
class _StepInFlight:
    """A plan sent to the executors and not yet answered, with the sequence behind each work item."""

    plan: StepPlan
    seqs: list[Sequence]            # seqs[i] is the sequence of plan.sequences[i]


@dataclass(slots=True)
class _Budget:
    """What is left of one step's budgets."""

    prompt_tokens_left: int
    seqs_left: int


class Scheduler:
    """Decides every step which groups run, which are preempted, and where every block goes.

    Order of business each step (all in `sort_key` order: priority, then arrival):
    1. running groups get a slot for their next token; when the GPU has no block for one, the
       latest-arriving running groups are preempted, all-or-nothing, until it fits;
    2. unless something was preempted this step, swapped groups come back in;
    3. unless a swapped group is still out, waiting groups are admitted while blocks and budgets last.
    """

    def __init__(self, config: SchedulerConfig, num_gpu_blocks: int, num_cpu_blocks: int, max_model_len: int,
                 eos_token_ids: Iterable[int] = (), vocab_size: int | None = None,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None) -> None:
        config.check_model_len(max_model_len)
        self.config = config
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size = vocab_size
        self.block_manager = BlockManager(config.block_size, num_gpu_blocks, num_cpu_blocks, config.watermark,
                                          config.reservation, max_model_len, config.enable_prefix_caching)
        self.waiting: list[SequenceGroup] = []   # each queue kept sorted by sort_key
        self.running: list[SequenceGroup] = []
        self.swapped: list[SequenceGroup] = []
        self.groups: dict[str, SequenceGroup] = {}
        self._clock = clock
        self._rng = random.Random(seed)
        self._next_seq_id = 1
        self._next_arrival = 0
        self._step_id = 0
        self._in_flight: deque[_StepInFlight] = deque()     # oldest first; at most two
        self._planning: list[Sequence] = []                   # the sequences of the plan being built
        self._pending_forks: list[SequenceFork] = []
        self._pending_forget: list[int] = []
        self._outputs: list[RequestOutput] = []
        self.num_preemptions = {PreemptionPolicy.SWAP: 0, PreemptionPolicy.RECOMPUTE: 0}
        self.num_finished = 0

    # ---- requests --------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> SequenceGroup:
        """Queue a request; raises InvalidArgumentError naming the field when it can never run."""
        if request_id in self.groups:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already in use by a live request")
        if not prompt_token_ids:
            raise InvalidArgumentError("prompt", "must not be empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidArgumentError(
                "prompt", f"has {len(prompt_token_ids)} tokens; this model takes at most "
                f"{self.max_model_len - 1} so that at least one token can be generated")
        if self.vocab_size is not None:
            bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidArgumentError("prompt.token_ids",
                                           f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        group = SequenceGroup(request_id=request_id, arrival_index=self._next_arrival,
                              arrival_time=self._clock() if arrival_time is None else arrival_time,
                              prompt_token_ids=tuple(prompt_token_ids), params=params, seed=seed,
                              eos_token_ids=self.eos_token_ids)
        self._next_arrival += 1
        group.seqs.append(self._new_sequence(group, list(prompt_token_ids), 0))
        self.groups[request_id] = group
        bisect.insort(self.waiting, group, key=_sort_key)
        return group

    def abort(self, request_id: str) -> bool:
        """End a live request now: its blocks are free before the next plan. False if unknown."""
        group = self.groups.get(request_id)
        if group is None:
            return False
        self._dequeue(group)
        self._end_group(group, FinishReason.ABORTED)
        return True

    def _dequeue(self, group: SequenceGroup) -> None:
        """Take a group out of the waiting or swapped queue (running groups leave at the next step)."""
        queues = {SequenceStatus.WAITING: self.waiting, SequenceStatus.SWAPPED: self.swapped}
        queue = queues.get(group.status)
        if queue is not None:
            queue.remove(group)

    def finish_sequence(self, seq: Sequence, reason: FinishReason, stop_reason: str | None = None) -> None:
        """Stop one sequence from outside (a stop string matched in the frontend's detokenizer)."""
        if seq.is_finished:
            return
        self._finish_seq(seq, reason, stop_reason)
        group = seq.group
        closing = [self._closing_output(seq)]
        if not group.unfinished_seqs():
            self._complete_group(group, closing)
        elif group.params.streams_incrementally:
            self._report(group, closing, finished=False)

    def pop_outputs(self) -> list[RequestOutput]:
        """Reports produced since the last call (results, aborts, failures), in order."""
        outputs, self._outputs = self._outputs, []
        return outputs

    @property
    def has_unfinished(self) -> bool:
        """Whether any request is still live."""
        return bool(self.groups)

    # ---- scheduling ------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Decide the next step once every step sent has been processed. An empty plan means there is
        nothing to run."""
        if self._in_flight:
            raise RuntimeError("schedule() called before the previous step's result was processed")
        return self._plan()

    def schedule_ahead(self) -> StepPlan | None:
        """Plan the step after the one in flight before its result arrives (async scheduling).

        Each sequence of the step in flight that samples is planned one token longer, its input being
        that sample, which the executor feeds back itself. None when that cannot be done safely: a
        beam search or a parallel-sampling prompt is running (the next step depends on which tokens
        were drawn), or the running sequences' next slots need a preemption. None also when there is
        nothing to run ahead. The engine then waits for the result and calls `schedule()`.
        """
        if len(self._in_flight) != 1 or not self._can_plan_ahead():
            return None
        plan = self._plan()
        return None if plan.is_empty else plan

    @property
    def num_steps_in_flight(self) -> int:
        """Plans handed out whose results have not been processed."""
        return len(self._in_flight)

    def _can_plan_ahead(self) -> bool:
        """Whether the next step's plan can be made before the step in flight reports."""
        if self._pending_forks:
            return False
        running = [g for g in self.running if not g.is_finished]
        if any(g.params.use_beam_search or (g.needs_fork and g.params.num_sequences > 1) for g in running):
            return False
        # No running group may be preempted by a plan made ahead. Each sequence takes at most one
        # block, so counting the exact need is only worth it when free blocks are that scarce.
        bm = self.block_manager
        if bm.gpu.num_free >= sum(g.num_unfinished for g in running):
            return True
        return sum(bm.blocks_to_append(bm.advancing_seqs(g)) for g in running) <= bm.gpu.num_free

    def _plan(self) -> StepPlan:
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id, forks=self._pending_forks, forget_seq_ids=self._pending_forget)
        self._pending_forks, self._pending_forget = [], []
        self._planning = []
        budget = _Budget(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        preempted = self._schedule_running(plan, budget)
        if not preempted:
            self._schedule_swapped(plan, budget)
            if not self.swapped:
                self._schedule_waiting(plan, budget)
        if not plan.is_empty:
            self._in_flight.append(_StepInFlight(plan, self._planning))
        self._planning = []
        return plan

    def _schedule_running(self, plan: StepPlan, budget: _Budget) -> bool:
        """Give every running group its next slots, preempting from the back when blocks run out."""
        bm = self.block_manager
        queue = deque(g for g in self.running if not g.is_finished)
        self.running = kept = []
        preempted = False
        while queue:
            group = queue.popleft()
            advancing = bm.advancing_seqs(group)
            while not bm.can_append_slots(advancing):
                preempted = True
                if not queue:          # none left behind it to preempt: the group itself goes
                    self._preempt(group, plan)
                    return preempted
                self._preempt(queue.pop(), plan)
            self._take_pending_copies(group, plan)
            bm.append_slots(advancing, plan.copy)
            kept.append(group)
            budget.seqs_left -= self._emit_group(plan, group, budget)
        return preempted

    def _schedule_swapped(self, plan: StepPlan, budget: _Budget) -> None:
        """Bring swapped groups back, oldest first, while they fit."""
        bm = self.block_manager
        while self.swapped:
            group = self.swapped[0]
            status = bm.can_swap_in(group)
            if status is AllocStatus.NEVER:
                self.swapped.pop(0)
                self._fail(group, self._too_big_message(group))
                continue
            seqs = group.unfinished_seqs()
            if status is AllocStatus.LATER or len(seqs) > budget.seqs_left:
                break
            self.swapped.pop(0)
            plan.swap_in.extend(bm.swap_in(group))
            group.status = SequenceStatus.RUNNING
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            self._take_pending_copies(group, plan)
            bm.append_slots(bm.advancing_seqs(group), plan.copy)
            bisect.insort(self.running, group, key=_sort_key)
            budget.seqs_left -= self._emit_group(plan, group, budget)

    def _schedule_waiting(self, plan: StepPlan, budget: _Budget) -> None:
        """Admit waiting groups in order while blocks and budgets last; never skip one (FCFS)."""
        bm = self.block_manager
        chunked = self.config.enable_chunked_prefill
        while self.waiting:
            group = self.waiting[0]
            cached = bm.cached_prefixes(group)     # one prefix-cache lookup for this admission
            status = bm.can_allocate(group, cached)
            if status is AllocStatus.NEVER:
                self.waiting.pop(0)
                self._fail(group, self._too_big_message(group))
                continue
            if status is AllocStatus.LATER or group.max_running_seqs() > budget.seqs_left:
                break
            prompt_tokens = bm.tokens_to_compute(group, cached)
            first_prompt = budget.prompt_tokens_left == self.config.max_num_batched_tokens
            if budget.prompt_tokens_left <= 0 or (
                    not chunked and prompt_tokens > budget.prompt_tokens_left and not first_prompt):
                break
            self.waiting.pop(0)
            bm.allocate(group, cached)
            group.status = SequenceStatus.RUNNING
            for seq in group.unfinished_seqs():
                seq.status = SequenceStatus.RUNNING
            if group.first_scheduled_time is None:
                group.first_scheduled_time = self._clock()
            bisect.insort(self.running, group, key=_sort_key)
            budget.seqs_left -= group.max_running_seqs()
            self._emit_group(plan, group, budget, whole=not chunked)

    def _emit_group(self, plan: StepPlan, group: SequenceGroup, budget: _Budget, whole: bool = False) -> int:
        """Schedule each running sequence's uncomputed tokens; returns how many sequences run.

        A decoding sequence computes its one new token and is not charged to the prompt budget; a
        prompt (or recomputation) is charged, and cut into a chunk when the budget is short unless
        `whole` (no chunked prefill: a new prompt runs whole, the first of a step even over budget).
        """
        # Beams must sample in the same step: unless every recomputed beam completes its prompt now,
        # each stops one token short and they all sample together once only that token is left.
        hold_back = (group.params.use_beam_search and not whole
                     and self._prefill_tokens(group) > budget.prompt_tokens_left)
        num_running = 0
        for seq in group.seqs:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            num_running += 1
            if seq.num_pending_samples and seq.length_ends_in_flight(self.max_model_len):
                continue                    # its last token is being sampled now
            remaining = seq.num_unscheduled_tokens
            if remaining <= 0:
                continue
            if remaining == 1:
                if hold_back:
                    continue
                chunk = 1
            else:
                chunk = remaining if whole else min(remaining - hold_back, budget.prompt_tokens_left)
                if chunk <= 0:
                    continue
                budget.prompt_tokens_left -= chunk
            if chunk < remaining:
                num_samples = 0
            elif group.needs_fork and not group.params.use_beam_search:
                num_samples = group.params.num_sequences
            else:
                num_samples = 1
            self._emit(plan, seq, chunk, num_samples)
        return num_running

    @staticmethod
    def _prefill_tokens(group: SequenceGroup) -> int:
        """Prompt tokens the group's running sequences still have to compute (decodes excluded)."""
        total = 0
        for seq in group.seqs:
            remaining = seq.num_unscheduled_tokens
            if seq.status is SequenceStatus.RUNNING and remaining > 1:
                total += remaining
        return total

    def _emit(self, plan: StepPlan, seq: Sequence, num_tokens: int, num_samples: int) -> None:
        """Add one sequence's work to the plan, sending only the block-table entries the executor lacks.

        A token past the ones the scheduler holds is the sample of the step in flight: the executor
        feeds it back.
        """
        start = seq.num_computed_tokens + seq.num_in_flight_tokens
        end = start + num_tokens
        known = seq.executor_table_len
        table_start = known if known > 0 else 0
        work = SequenceWork(seq_id=seq.seq_id, token_ids=seq.token_ids[start:end],
                            start_position=start, block_table_start=table_start,
                            block_ids=seq.block_table[table_start:], num_samples=num_samples,
                            num_logprobs=seq.group.params.num_top_logprobs_needed,
                            start=self._sequence_start(seq) if known < 0 else None,
                            feeds_last_sample=end > len(seq.token_ids))
        seq.executor_table_len = len(seq.block_table)
        self.block_manager.cache_computed_blocks(seq, end)
        seq.num_in_flight_tokens += num_tokens
        seq.num_pending_samples += num_samples > 0
        plan.sequences.append(work)
        self._planning.append(seq)

    def _sequence_start(self, seq: Sequence) -> SequenceStart:
        group = seq.group
        p = group.params
        suppressed: tuple[int, ...] = ()
        if p.min_tokens:
            eos = () if p.ignore_eos else tuple(group.eos_token_ids)
            # A stop token id outside the vocabulary can never be sampled: suppressing it is a no-op,
            # and the executor would refuse it.
            vocab = self.vocab_size
            suppressed = tuple(sorted(t for t in {*eos, *p.stop_token_ids} if vocab is None or t < vocab))
        return SequenceStart(request_id=group.request_id, num_prompt_tokens=seq.prompt_len, seed=group.seed,
                             sample_index=seq.sample_index, temperature=p.temperature, top_p=p.top_p,
                             top_k=p.top_k, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
                             presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                             min_tokens=p.min_tokens, suppressed_token_ids=suppressed,
                             cached_token_ids=tuple(seq.token_ids[:seq.num_computed_tokens]))

    def _take_pending_copies(self, group: SequenceGroup, plan: StepPlan) -> None:
        if group.pending_copies:
            plan.copy.extend(group.pending_copies)
            group.pending_copies = []

    # ---- preemption ------------------------------------------------------------------------------

    def _preemption_mode(self, group: SequenceGroup) -> PreemptionPolicy:
        policy = self.config.preemption_mode
        if policy is PreemptionPolicy.AUTO:
            policy = PreemptionPolicy.RECOMPUTE if group.max_running_seqs() == 1 else PreemptionPolicy.SWAP
        if policy is PreemptionPolicy.SWAP and (group.pending_copies
                                                or not self.block_manager.can_swap_out(group)):
            policy = PreemptionPolicy.RECOMPUTE     # no room in swap space: recomputing loses nothing
        return policy

    def _preempt(self, group: SequenceGroup, plan: StepPlan) -> None:
        """Evict a whole running group, by swapping or by dropping its blocks for recomputation."""
        mode = self._preemption_mode(group)
        self.num_preemptions[mode] += 1
        group.num_preemptions += 1
        seqs = group.unfinished_seqs()
        if mode is PreemptionPolicy.SWAP:
            plan.swap_out.extend(self.block_manager.swap_out(group))
            group.status = SequenceStatus.SWAPPED
            for seq in seqs:
                seq.status = SequenceStatus.SWAPPED
            bisect.insort(self.swapped, group, key=_sort_key)
            return
        self._drop_for_recompute(group, plan.forget_seq_ids)

    def _drop_for_recompute(self, group: SequenceGroup, forget: list[int] | None) -> None:
        """Free every block of a group and queue it to recompute its prompt and outputs.

        Sequences the executors hold are added to `forget`; None when the executors hold nothing.
        """
        self.block_manager.free_group(group)
        group.pending_copies = []
        group.status = SequenceStatus.WAITING
        for seq in group.unfinished_seqs():
            seq.status = SequenceStatus.WAITING
            seq.num_computed_tokens = 0
            # A budget-starved chunk may never have been sent.
            if forget is not None and seq.executor_table_len >= 0:
                forget.append(seq.seq_id)
            seq.executor_table_len = -1
        bisect.insort(self.waiting, group, key=_sort_key)

    # ---- executor loss ---------------------------------------------------------------------------

    def requeue_after_executor_loss(self) -> int:
        """The executors lost their state (one died; all restart their streams empty).

        The plan in flight is dropped unanswered, and every running and swapped group goes back to
        the waiting queue to recompute what it had: no token a request already has is lost, and
        reproducible sampling (seed, token index) gives the same outputs again. Returns how many
        groups were requeued.
        """
        for step in self._in_flight:
            for seq in step.seqs:
                seq.num_in_flight_tokens = seq.num_pending_samples = 0
        self._in_flight.clear()
        self._pending_forks, self._pending_forget = [], []   # the executors start with no sequences
        groups = [g for g in self.running if not g.is_finished] + self.swapped
        self.running, self.swapped = [], []
        for group in groups:
            self._drop_for_recompute(group, None)
        self.block_manager.clear_prefix_cache()     # a restarted executor's cache holds nothing
        return len(groups)

    def in_flight_request_ids(self) -> list[str]:
        """Requests with a sequence in the oldest plan in flight (the step whose result is awaited)."""
        if not self._in_flight:
            return []
        return list(dict.fromkeys(seq.group.request_id for seq in self._in_flight[0].seqs))

    def fail_requests(self, request_ids: Iterable[str], kind: RequestErrorKind, message: str) -> None:
        """End these live requests with an error report (unknown ids are skipped)."""
        for request_id in list(request_ids):
            group = self.groups.get(request_id)
            if group is None:
                continue
            self._dequeue(group)
            self._end_group(group, FinishReason.ERROR, message, kind)

    def _too_big_message(self, group: SequenceGroup) -> str:
        bm = self.block_manager
        need = bm.blocks_to_admit(group) if group.status is SequenceStatus.WAITING else None
        tokens = sum(s.num_tokens for s in group.unfinished_seqs())
        return (f"request needs {need or 'more'} KV blocks ({tokens} tokens over "
                f"{len(group.unfinished_seqs())} sequences, block size {bm.block_size}) but the GPU holds "
                f"{bm.gpu.num_blocks} (watermark {bm.watermark_blocks}); lower max_tokens, n, best_of or "
                f"beam_width, or give the executors more memory")

    # ---- results ---------------------------------------------------------------------------------

    def process_result(self, result: StepResult) -> list[RequestOutput]:
        """Apply an executor's result to the oldest plan in flight; returns the reports to stream."""
        step = self._in_flight[0] if self._in_flight else None
        if step is None or result.step_id != step.plan.step_id:
            raise PlanResultMismatchError(f"result for step {result.step_id} but step "
                                          f"{step.plan.step_id if step else None} is the oldest in flight")
        plan = step.plan
        by_seq = {r.seq_id: r for r in result.sequences}
        _check_answers(plan, by_seq)
        self._in_flight.popleft()
        touched: dict[SequenceGroup, list[_SeqSamples]] = {}
        failed: dict[SequenceGroup, SequenceResult] = {}
        finished = SequenceStatus.FINISHED
        for work, seq in zip(plan.sequences, step.seqs, strict=True):
            computed = len(work.token_ids) + work.feeds_last_sample     # work.num_tokens, inlined
            seq.num_in_flight_tokens -= computed
            seq.num_pending_samples -= work.num_samples > 0
            if seq.status is finished:      # ended (abort, stop string, EOS, failure) while the step ran
                continue
            seq.num_computed_tokens += computed
            if work.num_samples:
                answer = by_seq[work.seq_id]
                if answer.error:
                    failed.setdefault(seq.group, answer)
                else:
                    touched.setdefault(seq.group, []).append((seq, answer.samples))
        for group, answer in failed.items():
            self._fail_on_executor(group, answer)
        for group, items in touched.items():
            if not group.is_finished:
                self._apply_samples(group, items)
        return self.pop_outputs()

    def _fail_on_executor(self, group: SequenceGroup, answer: SequenceResult) -> None:
        """End a request one of whose sequences the executor could not sample (INTERNAL); its blocks are
        free at once and the executors forget its sequences with the next plan."""
        message = (f"request {group.request_id!r}: the executor failed on its sequence {answer.seq_id}: "
                   f"{answer.error}")
        self.fail_requests([group.request_id], RequestErrorKind.INTERNAL, message)

    def _apply_samples(self, group: SequenceGroup, items: list[_SeqSamples]) -> None:
        if group.params.use_beam_search:
            self._apply_beam_step(group, items)
            return
        report: list[CompletionOutput] = []
        if group.needs_fork:
            seq, samples = items[0]
            group.needs_fork = False
            for sample in samples[1:]:     # sample i of the first pass seeds sequence i
                child = self._fork(seq, len(group.seqs))
                self._append(child, sample, report)
            self._append(seq, samples[0], report)
        else:
            for seq, samples in items:
                self._append(seq, samples[0], report)
        if not group.num_unfinished:
            self._complete_group(group, report)
        elif group.params.streams_incrementally:
            self._report(group, report, finished=False)

    def _append(self, seq: Sequence, sample: Sample, report: list[CompletionOutput]) -> None:
        """Add a sampled token to a sequence and stop it if a rule says so."""
        p = seq.group.params
        token_id = sample.token_id
        seq.token_ids.append(token_id)
        seq.cumulative_logprob += sample.logprob
        logprobs = []
        if p.logprobs:
            logprobs.append((sample.logprob, sample.top_logprobs[:p.logprobs]))
            seq.output_logprobs.extend(logprobs)
        stop = check_stop(seq, token_id, self.max_model_len)
        if stop is not None:
            self._finish_seq(seq, *stop)
        if p.streams_incrementally:
            report.append(CompletionOutput(seq.sample_index, [token_id], logprobs, seq.cumulative_logprob,
                                           seq.finish_reason, seq.stop_reason))

    def _apply_beam_step(self, group: SequenceGroup, items: list[_SeqSamples]) -> None:
        group.needs_fork = False
        step = select_beams(group, [(seq, samples[0]) for seq, samples in items], self.max_model_len)
        if step.done:
            for seq in group.unfinished_seqs():
                self._finish_seq(seq, FinishReason.LENGTH, None)
            self._complete_group(group, [])
            return
        picks: dict[Sequence, list[BeamContinuation]] = {}
        for c in step.continuing:
            picks.setdefault(c.parent, []).append(c)
        for seq in group.unfinished_seqs():
            if seq not in picks:           # a dropped beam: never reported, so forgotten entirely
                self._finish_seq(seq, FinishReason.LENGTH, None)
                group.seqs.remove(seq)
        targets = []
        for parent, chosen in picks.items():    # fork before extending: children copy the parent as is
            targets.append((parent, chosen[0]))
            targets.extend((self._fork(parent, parent.sample_index), c) for c in chosen[1:])
        for seq, c in targets:
            seq.token_ids.append(c.token_id)
            seq.cumulative_logprob += c.logprob
            if group.params.logprobs:
                seq.output_logprobs.append((c.logprob, c.top_logprobs))

    def _fork(self, parent: Sequence, sample_index: int) -> Sequence:
        """A new sequence that shares the parent's blocks and copies its tokens and scores."""
        group = parent.group
        child = self._new_sequence(group, parent.token_ids.copy(), sample_index)
        child.status = parent.status
        child.num_computed_tokens = parent.num_computed_tokens
        child.cumulative_logprob = parent.cumulative_logprob
        child.output_logprobs = parent.output_logprobs.copy()
        group.pending_copies.extend(self.block_manager.fork(parent, child))
        # The executor clones the parent's table when the fork arrives; in reserving modes the child
        # has blocks of its own, sent in full.
        child.executor_table_len = 0 if self.block_manager.reserving else parent.executor_table_len
        group.seqs.append(child)
        self._pending_forks.append(SequenceFork(parent.seq_id, child.seq_id, sample_index))
        return child

    # ---- ending ----------------------------------------------------------------------------------

    def _new_sequence(self, group: SequenceGroup, token_ids: list[int], sample_index: int) -> Sequence:
        seq = Sequence(self._next_seq_id, group, token_ids, group.prompt_len, sample_index)
        self._next_seq_id += 1
        group.num_unfinished += 1
        return seq

    def _finish_seq(self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None) -> None:
        """Stop a sequence and free its blocks; the executor forgets it after the next step."""
        self.block_manager.free_seq(seq)
        if seq.executor_table_len >= 0 and not self._drop_unsent_fork(seq):
            self._pending_forget.append(seq.seq_id)
        seq.executor_table_len = -1
        seq.status = SequenceStatus.FINISHED
        seq.group.num_unfinished -= 1
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def _drop_unsent_fork(self, seq: Sequence) -> bool:
        """Cancel the fork that would create `seq` if no plan has carried it yet."""
        for i, fork in enumerate(self._pending_forks):
            if fork.child_seq_id == seq.seq_id:
                del self._pending_forks[i]
                return True
        return False

    def _end_group(self, group: SequenceGroup, reason: FinishReason, error: str | None = None,
                   error_kind: RequestErrorKind | None = None) -> None:
        """End every unfinished sequence of a group with `reason` (abort, failure) and report it."""
        closing = []
        for seq in group.unfinished_seqs():
            self._finish_seq(seq, reason, None)
            closing.append(self._closing_output(seq))
        group.error, group.error_kind = error, error_kind
        self._complete_group(group, closing, reason)

    def _fail(self, group: SequenceGroup, message: str) -> None:
        self._end_group(group, FinishReason.ERROR, message, RequestErrorKind.TOO_LARGE)

    @staticmethod
    def _closing_output(seq: Sequence) -> CompletionOutput:
        return CompletionOutput(index=seq.sample_index, token_ids=[], finish_reason=seq.finish_reason,
                                stop_reason=seq.stop_reason, cumulative_logprob=seq.cumulative_logprob)

    def _complete_group(self, group: SequenceGroup, streamed: list[CompletionOutput],
                        ended_by: FinishReason | None = None) -> None:
        """Release what the group still holds and send its one terminal report.

        Streaming requests end with this step's last deltas (`streamed`); beam search and best_of > n
        send their chosen outputs whole, every one marked `ended_by` when an abort or a failure cut
        the request short.
        """
        self.block_manager.free_group(group)
        group.status = SequenceStatus.FINISHED
        del self.groups[group.request_id]
        self.num_finished += 1
        outputs = streamed
        if not group.params.streams_incrementally:
            outputs = self._chosen_outputs(group)
            for output in outputs if ended_by is not None else ():
                output.finish_reason, output.stop_reason = ended_by, None
        self._report(group, outputs, finished=True)

    @staticmethod
    def _chosen_outputs(group: SequenceGroup) -> list[CompletionOutput]:
        """The n best: finished beams by length-penalised score, else sequences by cumulative logprob."""
        n = group.params.n
        if group.params.use_beam_search and group.hypotheses:
            return [CompletionOutput(index=i, token_ids=h.output_token_ids, logprobs=h.output_logprobs,
                                     cumulative_logprob=h.cumulative_logprob, finish_reason=h.finish_reason)
                    for i, h in enumerate(group.hypotheses[:n])]
        best = sorted(group.seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:n]
        return [CompletionOutput(index=i, token_ids=s.output_token_ids, logprobs=s.output_logprobs,
                                 cumulative_logprob=s.cumulative_logprob, finish_reason=s.finish_reason,
                                 stop_reason=s.stop_reason) for i, s in enumerate(best)]

    def _report(self, group: SequenceGroup, outputs: list[CompletionOutput], finished: bool) -> None:
        generated = sum(s.output_len for s in group.seqs) if finished else 0
        self._outputs.append(RequestOutput(request_id=group.request_id, outputs=outputs, finished=finished,
                                           num_prompt_tokens=group.prompt_len,
                                           num_generated_tokens=generated, error=group.error,
                                           error_kind=group.error_kind,
                                           num_preemptions=group.num_preemptions,
                                           num_cached_prompt_tokens=group.num_cached_prompt_tokens,
                                           queue_seconds=_queue_seconds(group) if finished else None))

    # ---- introspection ---------------------------------------------------------------------------

    def stats(self) -> SchedulerStats:
        """A snapshot of queue lengths, block usage, preemptions and KV utilization."""
        bm = self.block_manager
        return SchedulerStats(
            num_running=sum(1 for g in self.running if not g.is_finished), num_waiting=len(self.waiting),
            num_swapped=len(self.swapped),
            num_running_seqs=sum(g.num_unfinished for g in self.running if not g.is_finished),
            gpu_blocks_used=bm.gpu.num_used, gpu_blocks_total=bm.gpu.num_blocks,
            cpu_blocks_used=bm.cpu.num_used, cpu_blocks_total=bm.cpu.num_blocks,
            num_preemptions_swap=self.num_preemptions[PreemptionPolicy.SWAP],
            num_preemptions_recompute=self.num_preemptions[PreemptionPolicy.RECOMPUTE],
            kv_utilization=bm.gpu_utilization(), num_finished=self.num_finished,
            kv_sharing_saved=bm.gpu_sharing_saved(),
            prefix_cache_queried_tokens=bm.prefix_cache.queried_tokens if bm.prefix_cache else 0,
            prefix_cache_hit_tokens=bm.prefix_cache.hit_tokens if bm.prefix_cache else 0)

    def check_integrity(self) -> None:
        """Assert every invariant: exact block accounting, one state per group, queues consistent."""
        live = list(self.groups.values())
        self.block_manager.check_integrity(live)
        queues = {SequenceStatus.WAITING: self.waiting, SequenceStatus.SWAPPED: self.swapped,
                  SequenceStatus.RUNNING: [g for g in self.running if not g.is_finished]}
        for status, queue in queues.items():
            assert all(g.status is status for g in queue), f"{status.value} queue holds another state"
            keys = [g.sort_key for g in queue]
            assert keys == sorted(keys), f"{status.value} queue out of order"
        assert sum(len(q) for q in queues.values()) == len(live), "a live group is in no queue, or in two"
        for group in live:
            assert group.num_unfinished == len(group.unfinished_seqs()), f"{group.request_id}: count drifted"


def _check_answers(plan: StepPlan, by_seq: dict[int, SequenceResult]) -> None:
    """Raise PlanResultMismatchError unless exactly the work items that sample are answered, each with
    its num_samples samples or with an error."""
    answered = 0
    for work in plan.sequences:
        answer = by_seq.get(work.seq_id)
        if answer is None:
            got = 0
        elif answer.error and work.num_samples and not answer.samples:
            answered += 1
            continue
        else:
            got = len(answer.samples)
        if got != work.num_samples:
            raise PlanResultMismatchError(f"step {plan.step_id}: sequence {work.seq_id} asked for "
                                          f"{work.num_samples} samples, got {got}")
        answered += got > 0
    if answered != len(by_seq):
        raise PlanResultMismatchError(
            f"step {plan.step_id}: the result names sequences the plan did not sample")


def _queue_seconds(group: SequenceGroup) -> float | None:
    if group.first_scheduled_time is None:
        return None
    return group.first_scheduled_time - group.arrival_time


def _sort_key(group: SequenceGroup) -> tuple[int, int]:
    return group.sort_key
