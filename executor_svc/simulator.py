"""A CPU executor that models KV memory at token level, to drive and check the scheduler without a GPU.

Every KV slot holds the id of the token whose K/V it would hold. The simulator applies plans exactly as
the real executor must (forks, swap out, swap in, copy, forward, forget), writes each computed token
into its slot through the block table, and "attends" by reading the sequence's context back through
the table: any block-table, copy-on-write or swap mistake shows up as a context that differs from the
sequence's history. Sampled tokens are a hash of (seed, sample index, output index, context read), so
they are reproducible across preemption exactly as invariant 5 demands of the real sampler.
Used by the tests, `pagedserve simulate` and the scheduler benchmark.
"""

from __future__ import annotations

from pagedserve.contract.plan import (
    Sample,
    SequenceResult,
    SequenceStart,
    SequenceWork,
    StepPlan,
    StepResult,
)
from pagedserve.contract.sequence_registry import SequenceRegistry, SequenceState

_MASK = (1 << 64) - 1
_EMPTY = -1
_CONTEXT_WINDOW = 4      # the sample depends on the last few tokens read back from the cache


class SimulationError(RuntimeError):
    """The KV contents read back differ from what was written: a scheduler bug."""


def _mix(x: int) -> int:
    """splitmix64: a fast, well-spread 64-bit hash step."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class SimulatedExecutor:
    """Executes step plans on token-level GPU and CPU pools (see the module docstring)."""

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int, vocab_size: int = 32000,
                 eos_token_id: int | None = None, eos_probability: float = 0.0, verify: bool = True,
                 poison_swapped_out: bool = True) -> None:
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.gpu = [_EMPTY] * (num_gpu_blocks * block_size)
        # The swap pool holds only the blocks swapped out so far (a missing one is empty): the default
        # 4 GiB swap space is 33.5M simulated blocks, which took 10 s and 4 GiB to build as a flat list.
        self.cpu: dict[int, list[int]] = {}
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._eos_threshold = int(eos_probability * (1 << 32))
        self.verify = verify
        # Erase a GPU block swapped out, so a table still pointing at it reads garbage. Only sound
        # while nothing else may read the block: prefix caching keeps it cached, or in another
        # request's table, so a stack that caches prefixes runs without it (as a GPU does).
        self.poison_swapped_out = poison_swapped_out
        self.seqs = SequenceRegistry()
        self.steps = 0
        self.blocks_swapped = 0
        self.blocks_copied = 0

    def execute(self, plan: StepPlan) -> StepResult:
        """Check the whole plan, then apply it in the documented order and return its samples."""
        self.validate(plan)
        self.steps += 1
        self.seqs.apply_forks(plan.forks)
        self._swap_out(plan.swap_out)
        self._swap_in(plan.swap_in)
        self._copy(plan.copy)
        self.blocks_swapped += len(plan.swap_out) + len(plan.swap_in)
        self.blocks_copied += len(plan.copy)
        results = tuple(self._run(work) for work in plan.sequences)
        self.seqs.forget(plan.forget_seq_ids)
        return StepResult(step_id=plan.step_id, sequences=tuple(r for r in results if r.samples))

    def validate(self, plan: StepPlan) -> None:
        """Raise MalformedPlanError if any part of the plan is malformed; changes nothing."""
        self.seqs.validate(plan, self.block_size, self.num_gpu_blocks, self.num_cpu_blocks)

    def _swap_out(self, pairs: list[tuple[int, int]]) -> None:
        bs = self.block_size
        for gpu_block, cpu_block in pairs:
            self.cpu[cpu_block] = self.gpu[gpu_block * bs:(gpu_block + 1) * bs]
            if self.poison_swapped_out:
                self.gpu[gpu_block * bs:(gpu_block + 1) * bs] = [_EMPTY] * bs

    def _swap_in(self, pairs: list[tuple[int, int]]) -> None:
        bs = self.block_size
        for cpu_block, gpu_block in pairs:
            self.gpu[gpu_block * bs:(gpu_block + 1) * bs] = self.cpu.get(cpu_block, [_EMPTY] * bs)

    def _copy(self, pairs: list[tuple[int, int]]) -> None:
        bs = self.block_size
        for src, dst in pairs:
            self.gpu[dst * bs:(dst + 1) * bs] = self.gpu[src * bs:(src + 1) * bs]

    def _run(self, work: SequenceWork) -> SequenceResult:
        seq = self.seqs.begin_work(work)
        bs = self.block_size
        table = seq.block_table
        for i, token in enumerate(seq.token_ids[-work.num_tokens:]):     # a fed-back sample included
            position = work.start_position + i
            self.gpu[table[position // bs] * bs + position % bs] = token
        if not work.num_samples:
            return SequenceResult(work.seq_id, ())
        context = self._read_context(work.seq_id, seq)
        samples = tuple(self._sample(seq, seq.sample_index + j, context, work.num_logprobs)
                        for j in range(work.num_samples))
        self.seqs.record_sample(work.seq_id, samples[0].token_id)
        return SequenceResult(work.seq_id, samples)

    def _read_context(self, seq_id: int, seq: SequenceState) -> list[int]:
        """Read the context back through the block table (all of it when verifying, else its tail)."""
        bs = self.block_size
        gpu, table = self.gpu, seq.block_table
        n = len(seq.token_ids)
        first = 0 if self.verify else max(0, n - _CONTEXT_WINDOW)
        read = [gpu[table[p // bs] * bs + p % bs] for p in range(first, n)]
        if read != seq.token_ids[first:]:
            bad = next(i for i, (a, b) in enumerate(zip(read, seq.token_ids[first:], strict=True)) if a != b)
            raise SimulationError(f"seq {seq_id}: KV slot for position {first + bad} holds token "
                                  f"{read[bad]}, expected {seq.token_ids[first + bad]}")
        return read

    def _sample(self, seq: SequenceState, stream: int, context: list[int], num_logprobs: int) -> Sample:
        return self.next_token(context, len(seq.token_ids), seq.start, stream, num_logprobs)

    def next_token(self, context: list[int], num_tokens: int, start: SequenceStart, stream: int,
                   num_logprobs: int) -> Sample:
        """The sample for a sequence of `num_tokens` tokens ending in `context` (its tail suffices).

        Top-1 of `top_logprobs` is the sampled token, as in greedy decoding; the rest are distinct
        alternatives with lower logprobs. Public so tests can compute expected outputs without paging.
        """
        output_index = num_tokens - start.num_prompt_tokens
        h = 0
        for token in context[-_CONTEXT_WINDOW:]:
            h = _mix(h ^ (token & _MASK))
        h = _mix(h ^ _mix(start.seed ^ _mix(stream ^ _mix(output_index))))
        suppress = start.suppressed_token_ids if output_index < start.min_tokens else ()
        token = h % self.vocab_size
        if (self.eos_token_id is not None and (h >> 32) < self._eos_threshold
                and self.eos_token_id not in suppress):
            token = self.eos_token_id
        while token in suppress:
            token = (token + 1) % self.vocab_size
        logprob = -((h >> 40) % 1000) / 500.0 - 0.01
        candidates = [(token, logprob)]
        seen = {token}
        x, lp = h, logprob
        while len(candidates) < num_logprobs:
            x = _mix(x)
            alt = x % self.vocab_size
            if alt in seen or alt in suppress:
                continue
            seen.add(alt)
            lp -= ((x >> 40) % 1000) / 1000.0 + 0.001
            candidates.append((alt, lp))
        return Sample(token, logprob, tuple(candidates[:num_logprobs]))
