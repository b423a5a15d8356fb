"""Execute step plans with a model: block operations, one flat forward pass, batched sampling.

The runner keeps, per sequence, its sampling settings, its token history (the tokens whose K/V are
cached, for penalties and the sampler's token index) and its block table, so plans only carry what
changed. Everything a plan names is checked before anything is applied (plan_validation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from executor_svc.attention import AttentionMetadata, ForwardContext
from executor_svc.cuda_graphs import DecodeGraphs
from executor_svc.kv_cache import KVCache
from executor_svc.models.base import CausalLM
from executor_svc.roofline import DecodeRoofline
from executor_svc.sampler import Sampler, SamplingRow
from scheduler_svc.plan import Sample, SequenceResult, SequenceWork, StepPlan, StepResult
from scheduler_svc.sequence_registry import SequenceRegistry, SequenceState


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
    return StepBatch(torch.tensor(input_ids, dtype=torch.int64, device=device), meta, last_token)


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
        results = self._forward(plan.sequences) if plan.sequences else ()
        forward_seconds = time.perf_counter() - forward_start
        self.seqs.forget(plan.forget_seq_ids)
        return StepResult(plan.step_id, results, forward_seconds=forward_seconds, swap_seconds=swap_seconds,
                          roofline_seconds=self._roofline_seconds(plan.sequences))

    def _roofline_seconds(self, works: list[SequenceWork]) -> float:
        """The memory-roofline time of a step of decode tokens only (0 for any other step)."""
        if self.roofline is None or not works or any(w.num_tokens != 1 for w in works):
            return 0.0
        return self.roofline.seconds([w.start_position + 1 for w in works])

    @torch.inference_mode()
    def _forward(self, works: list[SequenceWork]) -> tuple[SequenceResult, ...]:
        batch = prepare_batch(self.seqs, works, self.block_size, self.device)
        if self.graphs is not None and self.graphs.can_run(batch.meta):
            hidden = self.graphs.run(batch.input_ids, batch.meta)                # [T, hidden]
        else:
            context = ForwardContext(self.kv_cache.gpu, batch.meta)
            hidden = self.model(batch.input_ids, batch.meta.positions, context)  # [T, hidden]
        token_rows, rows = [], []
        for work, last in zip(works, batch.last_token, strict=True):
            state = self.seqs[work.seq_id]
            for j in range(work.num_samples):
                token_rows.append(last)
                rows.append(self._sampling_row(state, j, work.num_logprobs))
        if not rows:
            return ()
        logits = self.model.compute_logits(hidden[torch.tensor(token_rows, device=self.device)])  # [N, V]
        out = self.sampler(logits, rows)
        results, row = [], 0
        for work in works:
            if not work.num_samples:
                continue
            samples = tuple(Sample(out.token_ids[r], out.logprobs[r], out.top_logprobs[r])
                            for r in range(row, row + work.num_samples))
            self.seqs.record_sample(work.seq_id, samples[0].token_id)
            results.append(SequenceResult(work.seq_id, samples))
            row += work.num_samples
        return tuple(results)

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
