"""Execute step plans with a model: block operations, one flat forward pass, batched sampling.

The runner keeps, per sequence, its sampling settings, its token history (the tokens whose K/V are
cached, for penalties and the sampler's token index) and its block table, so plans only carry what
changed. Everything a plan names is checked before anything is applied (plan_validation).

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
from dataclasses import dataclass

import torch

from executor_svc.attention import AttentionMetadata, ForwardContext
from executor_svc.cuda_graphs import DecodeGraphs
from executor_svc.kv_cache import KVCache
from executor_svc.models.base import CausalLM
from executor_svc.roofline import DecodeRoofline
from executor_svc.sampler import Sampler, SamplerOutput, SamplingRow
from executor_svc.transfer import to_device
from pagedserve.contract.plan import Sample, SequenceResult, SequenceWork, StepPlan, StepResult
from pagedserve.contract.sequence_registry import SequenceRegistry, SequenceState

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
                  device: torch.device) -> StepBatch:
    """Apply each work item to its sequence's state and lay the step's new tokens out in one flat batch.

    Host work that runs on every step before the GPU can start (`benchmarks/executor_host_path.py`
    times it).
    """
    input_ids: list[int] = []
    starts, lengths, tables, last_token = [], [], [], []
    for work in works:
        state = seqs.begin_work(work)
        input_ids.extend(state.token_ids[-work.num_tokens:])    # a fed-back sample included
        starts.append(work.start_position)
        lengths.append(work.num_tokens)
        tables.append(state.block_table)
        last_token.append(len(input_ids) - 1)
    meta = AttentionMetadata.build(starts, lengths, tables, block_size, device)
    return StepBatch(to_device(input_ids, torch.int64, device), meta, last_token)


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

    def reset(self) -> None:
        """Forget every sequence."""
        self.seqs.clear()

    def execute(self, plan: StepPlan) -> StepResult:
        """Apply one plan: forks, swap out, swap in, copy, forward and sample, forget."""
        cache = self.kv_cache
        self.seqs.validate(plan, self.block_size, cache.num_gpu_blocks, cache.num_cpu_blocks)
        self.seqs.apply_forks(plan.forks)
        swap_start = time.perf_counter()
        self.kv_cache.swap_out(plan.swap_out)
        self.kv_cache.swap_in(plan.swap_in)
        self.kv_cache.copy_blocks(plan.copy)
        swap_seconds = time.perf_counter() - swap_start
        forward_start = time.perf_counter()
        results = self._run_batch(plan.sequences) if plan.sequences else ()
        forward_seconds = time.perf_counter() - forward_start
        self.seqs.forget(plan.forget_seq_ids)
        return StepResult(plan.step_id, results, forward_seconds=forward_seconds, swap_seconds=swap_seconds,
                          roofline_seconds=self._roofline_seconds(plan.sequences))

    def _roofline_seconds(self, works: list[SequenceWork]) -> float:
        """The memory-roofline time of a step of decode tokens only (0 for any other step)."""
        if self.roofline is None or not works or any(w.num_tokens != 1 for w in works):
            return 0.0
        return self.roofline.seconds([w.start_position + 1 for w in works])

    def _run_batch(self, works: list[SequenceWork]) -> tuple[SequenceResult, ...]:
        """Forward and sample the step's work; work of a sequence that failed before only gets its error."""
        failed = [w for w in works if self.seqs.is_failed(w)]
        if not failed:
            return self._forward(works)
        live = [w for w in works if not self.seqs.is_failed(w)]
        results = {r.seq_id: r for r in (self._forward(live) if live else ())}
        for work in failed:
            if work.num_samples:
                results[work.seq_id] = SequenceResult(work.seq_id, (), self.seqs[work.seq_id].error)
        return tuple(results[w.seq_id] for w in works if w.seq_id in results)

    @torch.inference_mode()
    def _forward(self, works: list[SequenceWork]) -> tuple[SequenceResult, ...]:
        batch = prepare_batch(self.seqs, works, self.block_size, self.device)
        if self.graphs is not None and self.graphs.can_run(batch.meta):
            hidden = self.graphs.run(batch.input_ids, batch.meta)                # [T, hidden]
        else:
            context = ForwardContext(self.kv_cache.gpu, batch.meta)
            hidden = self.model(batch.input_ids, batch.meta.positions, context)  # [T, hidden]
        outcomes: dict[int, _Outcome] = {}
        token_rows: list[int] = []
        rows: list[SamplingRow] = []
        spans: list[tuple[int, int, int]] = []          # (seq_id, first row, rows) of each sampled sequence
        for work, last in zip(works, batch.last_token, strict=True):
            if not work.num_samples:
                continue
            try:
                state = self.seqs[work.seq_id]
                seq_rows = [self._sampling_row(state, j, work.num_logprobs) for j in range(work.num_samples)]
            except Exception as err:        # this sequence's settings; the others are unaffected
                outcomes[work.seq_id] = f"bad sampling settings: {err!r}"
                continue
            spans.append((work.seq_id, len(rows), len(seq_rows)))
            token_rows.extend([last] * len(seq_rows))
            rows.extend(seq_rows)
        if rows:
            logits = self.model.compute_logits(self._sampled_hidden(hidden, token_rows))   # [N, V]
            outcomes.update(self._sample(logits, rows, spans))
        return tuple(self._result(work.seq_id, outcomes[work.seq_id]) for work in works if work.num_samples)

    def _sampled_hidden(self, hidden: torch.Tensor, token_rows: list[int]) -> torch.Tensor:
        """The hidden states [N, hidden] of the rows to sample, from the step's hidden [T, hidden].

        Queued behind the forward pass, never waited for: the host goes on to launch the logits and
        the sampler while the GPU still runs the model. A decode step that samples every token once
        needs no gather at all.
        """
        if len(token_rows) == hidden.shape[0] and token_rows == list(range(len(token_rows))):
            return hidden
        return hidden[to_device(token_rows, torch.int64, self.device)]

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow],
                spans: list[tuple[int, int, int]]) -> dict[int, _Outcome]:
        """Each sampled sequence's samples: the whole batch in one call, or, if that raises, sequence by
        sequence, so that a failure is charged only to the sequences whose rows cause it."""
        try:
            out = self.sampler(logits, rows)
            return {seq_id: _samples(out, first, count) for seq_id, first, count in spans}
        except Exception:
            log.warning("sampling the batch of %d rows failed; sampling it sequence by sequence", len(rows),
                        exc_info=True)
        outcomes: dict[int, _Outcome] = {}
        for seq_id, first, count in spans:
            try:
                alone = self.sampler(logits[first:first + count], rows[first:first + count])
                outcomes[seq_id] = _samples(alone, 0, count)
            except Exception as err:
                outcomes[seq_id] = f"sampling failed: {err!r}"
        return outcomes

    def _result(self, seq_id: int, outcome: _Outcome) -> SequenceResult:
        """Record a sequence's outcome (its sample to feed back, or its failure) and report it."""
        if isinstance(outcome, str):
            self.seqs.record_failure(seq_id, outcome)
            log.error("request %s, sequence %d: %s", self.seqs[seq_id].start.request_id, seq_id, outcome)
            return SequenceResult(seq_id, (), outcome)
        self.seqs.record_sample(seq_id, outcome[0].token_id)
        return SequenceResult(seq_id, outcome)

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


def _samples(out: SamplerOutput, first: int, count: int) -> tuple[Sample, ...]:
    """Rows first .. first + count - 1 of a sampler's output as Samples."""
    return tuple(Sample(out.token_ids[r], out.logprobs[r], out.top_logprobs[r])
                 for r in range(first, first + count))
