"""The executor's batched sampler: one vectorised pass turns a step's logits into tokens and logprobs.

Every row of a step carries its own parameters, and all rows are processed together, in float32 on the
logits' device:

1. Penalties on the logits. Repetition (HF semantics): a token seen in the prompt or the output has a
   positive logit divided by the penalty and a negative one multiplied by it. Presence and frequency
   (OpenAI semantics): a token seen in the output loses `presence` once and `frequency` per occurrence.
   Then suppressed ids (the caller passes them while fewer than min_tokens were generated) become -inf.
2. Greedy rows (temperature 0) take the argmax of the penalised logits; ties go to the lowest id.
3. Sampled rows divide by their temperature and take the softmax. Filters then zero tokens: top-k keeps
   the k most likely; top-p keeps the smallest most-likely set whose mass reaches top_p of what top-k
   kept; min-p drops tokens below min_p times the top probability. The top token always survives.
   Every filter is a threshold on the probability value, so a token tied with the last one kept is kept
   too: which of two equal tokens survives never depends on a sort's tie order, hence on the batch.
4. The draw is an exponential race. With independent E[v] ~ Exp(1), E[v] / p[v] ~ Exp(rate p[v]), and
   the smallest of independent exponentials is v with probability p[v] / sum(p). So

       token = argmax over v of p[v] / E[v],   E[v] = -log(1 - x[v]),   x[v] uniform in (0, 1)

   is an exact categorical draw (Gumbel-max in another guise). Filtered tokens have p = 0 and never
   win, and scaling p changes no argmax, so the filtered distribution needs no renormalisation.

Reproducible randomness (invariant 5). No torch.Generator and no global RNG is involved: x[v] is a
counter-based hash. On the host, a 64-bit key is derived from (seed, stream, token_index) with chained
splitmix64; on the device, with vectorised integer ops,

       h[v] = fmix32(fmix32(v XOR key_lo) XOR key_hi),   x[v] = (h[v] + 0.5) / 2**32

where fmix32 is murmur3's finaliser, a bijection of 32-bit words with full avalanche. The 32-bit words
live in int64 tensors; each multiply uses the constant's representative in [-2**31, 0), so the product
stays inside int64, and is masked back to 32 bits. A row's draw is therefore a pure function of its
(seed, stream, token_index) and its probabilities: independent of batch size, row order, other rows,
device RNG state, and whether the sequence was preempted, swapped or recomputed in between.

Logprobs follow the service's contract: the chosen token's logprob and the top alternatives are
log_softmax of the RAW logits, before penalties, suppression, temperature and filters (beam search
scores candidates with them).

Fast paths, none of which changes a result: rows without penalties, suppression or filters skip those
steps; greedy rows only take an argmax; top-p looks for its cut among the 256 most likely tokens before
sorting the whole row; a row whose filters kept few tokens hashes only those ids. On the CPU the work
goes through blocks of rows sized to stay in cache (several times faster than whole-batch elementwise
passes on a [256, 32000] batch); rows never interact, so blocking changes nothing either.

On a GPU the sampler never reads a value back before its result (`_without_host_checks`): a read-back
makes the host wait for the forward pass queued ahead of the logits, and the host is then idle while
the GPU is, instead of launching the sampler behind the model. Rows are sanitised and rescaled
unconditionally (an ordinary row comes out bit for bit unchanged), rows without filters race over the
whole vocabulary with the kept-ids race's choice made per row on the device, parameters go up through
pinned memory without waiting, and tokens and logprobs come back in one copy. Rows with top-k or top-p
still read their cut back (`_rank_thresholds`).

Numerical safety. Every parameter a SamplingRow accepts and every logits row give a valid token and
logprobs that are never NaN; a row whose numbers are ordinary is computed exactly as described above,
and the checks below cost a reduction per block, not a pass that changes values.

- Logits as read: NaN is -inf (never drawn); in a row with +inf logits, those tokens share all the
  probability (the limit of a logit growing without bound: they read as 0, every other logit as -inf);
  a row with no finite logit at all carries no information and reads as all zeros (uniform). Logprobs
  are those of the row as read: finite for every token that has probability, -inf for one that has none.
- Parameters enter float32 saturated at a range where the arithmetic stays finite: temperature,
  repetition_penalty and top_p at least 2**-126 (float32's smallest normal number: a smaller value means
  the same, and a subnormal divisor may be flushed to zero), temperature and repetition_penalty at most
  float32's largest value, presence and frequency penalties within +-2**64.
- A repetition penalty that lifts a positive logit past float32's range saturates there (the token stays
  ahead of every other); one that pushes a negative logit past it makes it -inf (the token becomes
  impossible, the limit of an ever larger penalty).
- Temperature: where logits / T overflows (a tiny T, or logits a tiny repetition penalty made huge) the row
  is scaled as (logits - max) / T instead, which has the same softmax and cannot overflow. So T -> 0 tends
  to a uniform draw among the tokens tied for the top logit: the greedy token when it is unique.
- A sampled row whose penalties and suppressed ids leave no finite logit has nothing to draw from: it
  takes what greedy takes on such a row, the lowest id (0).
"""

from __future__ import annotations

import array
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from executor_svc import ops
from executor_svc.transfer import HostCopy, to_device

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_MAX_SEED = 2**63

# Elements per block of rows: ~2 MiB of int64 on the CPU (cache-sized); on a GPU only a memory bound.
_CPU_BLOCK_ELEMENTS = 2**18
_GPU_BLOCK_ELEMENTS = 2**26

# Top-p first looks for its cut among this many most likely tokens (cheap top-k); rows whose kept mass
# lies beyond it (flat distributions) fall back to a full sort. Both paths give the same threshold.
_TOP_P_PROBE = 256

# A row whose filters keep at most V / _NARROW_FACTOR tokens races among those alone.
_NARROW_FACTOR = 8

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)     # 2**-126, the smallest normal float32
# |presence| and |frequency| beyond this change no choice, and below it a penalty times any count of
# output tokens (< 2**31) stays far below half a unit in the last place of float32's largest value, so
# subtracting it from a logit can neither overflow nor turn -inf into NaN.
_PENALTY_LIMIT = 2.0**64
# The range each float parameter is saturated into when it enters float32 (module docstring).
_COLUMN_RANGES = {
    "temperature": (_FLOAT32_TINY, _FLOAT32_MAX),
    "repetition_penalty": (_FLOAT32_TINY, _FLOAT32_MAX),
    "top_p": (_FLOAT32_TINY, 1.0),
    "min_p": (0.0, 1.0),
    "presence_penalty": (-_PENALTY_LIMIT, _PENALTY_LIMIT),
    "frequency_penalty": (-_PENALTY_LIMIT, _PENALTY_LIMIT),
}


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """How to draw one token for one row of the logits."""

    temperature: float          # 0 = greedy
    top_p: float                # 1 disables
    top_k: int                  # 0 disables
    min_p: float                # 0 disables
    repetition_penalty: float   # 1 disables (HF: seen in prompt or output: positive / p, negative * p)
    presence_penalty: float     # 0 disables (OpenAI: subtract p once for every token seen in the output)
    frequency_penalty: float    # 0 disables (OpenAI: subtract p * count of the token in the output)
    seed: int                   # 0 <= seed < 2**63
    stream: int                 # the sequence's sample index within its request (0..n-1)
    token_index: int            # index of the token being drawn among the generated tokens (0 = first)
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    suppressed_token_ids: tuple[int, ...] = ()   # -inf for this row (while fewer than min_tokens)
    num_logprobs: int = 0       # how many top alternatives to return

    def __post_init__(self) -> None:
        # One expression on the hot path (a row per sequence per step); the messages only on failure.
        valid = (0 <= self.temperature < math.inf and 0 < self.top_p <= 1 and self.top_k >= 0
                 and 0 <= self.min_p <= 1 and 0 < self.repetition_penalty < math.inf
                 and math.isfinite(self.presence_penalty) and math.isfinite(self.frequency_penalty)
                 and 0 <= self.seed < _MAX_SEED and 0 <= self.stream < _MAX_SEED
                 and 0 <= self.token_index < _MAX_SEED and self.num_logprobs >= 0)
        if not valid:
            self._raise_invalid()

    def _raise_invalid(self) -> None:
        """Raise ValueError naming the first field out of range."""
        _require(math.isfinite(self.temperature) and self.temperature >= 0,
                 f"temperature must be finite and >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= 0, f"top_k must be >= 0 (0 disables), got {self.top_k}")
        _require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _require(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                 f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        _require(math.isfinite(self.presence_penalty), "presence_penalty must be finite")
        _require(math.isfinite(self.frequency_penalty), "frequency_penalty must be finite")
        _require(0 <= self.seed < _MAX_SEED, f"seed must be in [0, 2**63), got {self.seed}")
        _require(0 <= self.stream < _MAX_SEED, f"stream must be in [0, 2**63), got {self.stream}")
        _require(0 <= self.token_index < _MAX_SEED,
                 f"token_index must be in [0, 2**63), got {self.token_index}")
        _require(self.num_logprobs >= 0, f"num_logprobs must be >= 0, got {self.num_logprobs}")

    @property
    def is_greedy(self) -> bool:
        """Temperature 0: the argmax of the penalised logits."""
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        """Any of repetition, presence or frequency penalty is active."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)

    @property
    def ranks_tokens(self) -> bool:
        """Top-k or top-p is active (both need the most likely tokens in order)."""
        return self.top_k > 0 or self.top_p < 1


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """One drawn token per row, with raw logprobs."""

    token_ids: list[int]                                  # [N]
    logprobs: list[float]                                 # [N] raw logprob of the chosen token
    top_logprobs: list[tuple[tuple[int, float], ...]]     # per row, num_logprobs (token, logprob), best first


class Sampler:
    """Draws one token per row of a step's logits, all rows in one vectorised pass."""

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """Sample from `logits` [N, V] (any float dtype, CPU or CUDA) with one SamplingRow per row."""
        return self.launch(logits, rows).result()

    def launch(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> PendingSamplerOutput:
        """Queue the sampling of `logits` [N, V] and the copy of its result to the host, without waiting.

        Errors in the rows or the logits' shape raise here, before anything is queued. On a GPU the
        drawn tokens stay on the device (`PendingSamplerOutput.tokens`) for a step launched before the
        result is read to take as input.
        """
        _check_batch(logits, rows)
        raw = logits.float()                                             # [N, V]
        if not rows:
            return PendingSamplerOutput(torch.empty(0, dtype=torch.int64, device=logits.device), rows)
        block = _rows_per_block(raw)
        blocks = [raw[i:i + block] for i in range(0, len(rows), block)]
        parts = [_process_block(part, rows[i * block:(i + 1) * block]) for i, part in enumerate(blocks)]
        if len(parts) == 1:
            raw, tokens, normaliser = parts[0]
            return _with_logprobs(raw, normaliser, tokens, rows)
        if any(read is not part for (read, _, _), part in zip(parts, blocks, strict=True)):
            raw = torch.cat([read for read, _, _ in parts])              # some rows were sanitised
        tokens = torch.cat([t for _, t, _ in parts])                     # [N]
        normaliser = torch.cat([n for _, _, n in parts])                 # [N, 1]
        return _with_logprobs(raw, normaliser, tokens, rows)


class PendingSamplerOutput:
    """A launched sampling pass: its tokens on the device now, its SamplerOutput once copied back."""

    def __init__(self, tokens: torch.Tensor, rows: Sequence[SamplingRow], chosen: torch.Tensor | None = None,
                 top_values: torch.Tensor | None = None, top_ids: torch.Tensor | None = None) -> None:
        self.tokens = tokens                    # [N] int64 on the logits' device
        self._rows = rows
        self._has_top = top_values is not None
        host = [tokens] if chosen is None else [tokens, chosen]
        if top_values is not None and top_ids is not None:
            host += [top_values, top_ids]
        self._copy = HostCopy(host)

    def ready(self) -> bool:
        """Whether the result has reached the host (result() would not wait)."""
        return self._copy.ready()

    def result(self) -> SamplerOutput:
        """The drawn tokens and logprobs, waiting for the device if they are still on their way."""
        if not self._rows:
            return SamplerOutput(token_ids=[], logprobs=[], top_logprobs=[])
        copies = self._copy.wait()
        tokens, chosen = copies[0], copies[1]
        top: list[tuple[tuple[int, float], ...]] = [() for _ in self._rows]
        if self._has_top:
            values_list, ids_list = copies[2].tolist(), copies[3].tolist()
            top = [tuple(zip(ids_list[i][:r.num_logprobs], values_list[i][:r.num_logprobs], strict=True))
                   for i, r in enumerate(self._rows)]
        return SamplerOutput(token_ids=tokens.tolist(), logprobs=chosen.tolist(), top_logprobs=top)


def draw_key(seed: int, stream: int, token_index: int) -> int:
    """The 64-bit key of one draw: a function of (seed, stream, token_index) alone."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ stream) ^ token_index)


def draw_keys(rows: Sequence[SamplingRow]) -> np.ndarray:
    """`draw_key` of every row at once: [R] uint64, computed with numpy's wrapping uint64 arithmetic
    (a Python loop over the rows costs ~2 µs a row, on every step)."""
    def column(name: str) -> np.ndarray:
        return np.fromiter((getattr(r, name) for r in rows), np.uint64, len(rows))

    return _splitmix64_array(_splitmix64_array(_splitmix64_array(column("seed")) ^ column("stream"))
                             ^ column("token_index"))


def uniform_noise(keys: Sequence[int] | np.ndarray, token_ids: torch.Tensor) -> torch.Tensor:
    """x in (0, 1) for each row's 64-bit draw key and each token id.

    keys: [R] 64-bit draw keys (ints, or a uint64 array from `draw_keys`).
    token_ids: [R, K] or [1, K] int64 vocab ids (the noise of an id does not depend on where it sits).
    returns [R, K] float32 on token_ids' device. On a GPU with the kernels this is one launch
    (`ops.race_uniform_noise`), bit for bit `uniform_noise_reference`.
    """
    device = token_ids.device
    keys = np.asarray(keys, dtype=np.uint64)
    key_lo = to_device((keys & _MASK32_U64).astype(np.int64), torch.int64, device)                # [R]
    key_hi = to_device((keys >> np.uint64(32)).astype(np.int64), torch.int64, device)             # [R]
    fits = token_ids.dim() == 2 and len(keys) <= _MAX_NOISE_ROWS
    if token_ids.is_cuda and fits and ops.kernels_enabled():
        return ops.race_uniform_noise(token_ids, key_lo, key_hi)
    return uniform_noise_reference(key_lo, key_hi, token_ids)


def uniform_noise_reference(key_lo: torch.Tensor, key_hi: torch.Tensor,
                            token_ids: torch.Tensor) -> torch.Tensor:
    """`uniform_noise` in torch ops: key_lo, key_hi [R] int64 (each key's 32-bit halves), token_ids
    [R or 1, K] int64 -> [R, K] float32 (32-bit words held in int64 tensors)."""
    h = _fmix32_(token_ids ^ key_lo[:, None])                                                       # [R, K]
    h ^= key_hi[:, None]
    h = _fmix32_(h)
    # float32 keeps x near 0 exact, which is where E = -log(1 - x) is small and decides low-p tokens.
    # Near 1 it may round x to 1.0: E = inf, that token loses the race (probability < 2**-25).
    return h.float().add_(0.5).mul_(2.0**-32)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition, presence and frequency penalties, then suppression: [N, V] float32.

    logits: [N, V] float32 with no NaN or +inf (as the sampler reads them). It is never modified: the
    result is a new tensor, or logits itself when no row has a penalty or a suppressed id. The result has
    no NaN or +inf either: a penalised logit saturates at float32's largest value, or becomes -inf.
    """
    logits = _penalise(logits, rows)
    return _suppress(logits, rows)


def filtered_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Temperature, softmax and the top-k / top-p / min-p filters of sampled rows: [N, V] float32.

    logits: [N, V] float32, already penalised, with no NaN or +inf; every row must have temperature > 0.
    The result is not renormalised (the race does not need it); every row has a non-zero maximum.
    """
    temperature = _column(rows, "temperature", logits)                  # [N, 1]
    scaled = logits / temperature                                       # [N, V]
    peak = scaled.amax(dim=-1)                                          # [N]
    if _without_host_checks(logits):
        # Rescaling unconditionally replaces only the rows the check would have caught, and asking the
        # GPU whether any row needs it would make the host wait out the forward pass.
        scaled = _rescaled(logits, temperature, scaled, torch.isfinite(peak))
    elif not bool(torch.isfinite(peak).all()):                          # overflowed, or all -inf
        scaled = _rescaled(logits, temperature, scaled, torch.isfinite(peak))
    probs = torch.softmax(scaled, dim=-1)                               # [N, V]
    threshold = _thresholds(probs, rows)                                # [N] or None
    if threshold is None:
        return probs
    return probs.masked_fill(probs < threshold[:, None], 0.0)


def _process_block(raw: torch.Tensor,
                   rows: Sequence[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of rows, raw: [B, V] float32: the logits as read [B, V] (raw itself unless a row needed
    sanitising), the tokens [B], and the logsumexp of the logits as read [B, 1]."""
    if _without_host_checks(raw):
        # Sanitising leaves an ordinary row bit for bit as it is, so doing it always gives the same
        # result as checking first, without the host waiting for the logits to ask.
        raw = _sanitised(raw)
        return raw, _draw(raw, rows), raw.logsumexp(dim=-1, keepdim=True)
    normaliser = raw.logsumexp(dim=-1, keepdim=True)                    # [B, 1]
    # The logsumexp is finite exactly when a row has no NaN, no +inf and some finite logit: checking it
    # costs no pass over the logits on the usual path.
    if not bool(torch.isfinite(normaliser).all()):
        raw = _sanitised(raw)
        normaliser = raw.logsumexp(dim=-1, keepdim=True)
    return raw, _draw(raw, rows), normaliser


def _sanitised(raw: torch.Tensor) -> torch.Tensor:
    """Logits as the sampler reads them, a new [B, V] tensor: NaN -> -inf; in a row with +inf, those
    tokens share all the probability (0, and -inf elsewhere); a row with no finite logit -> all zeros."""
    clean = raw.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    certain = clean == math.inf                                          # [B, V]
    # The limit of a logit growing without bound: its token takes all the mass (shared when tied).
    clean = torch.where(certain.any(dim=-1, keepdim=True), torch.where(certain, 0.0, -math.inf), clean)
    empty = ~(clean > -math.inf).any(dim=-1, keepdim=True)               # [B, 1]
    return clean.masked_fill(empty, 0.0)


def _rescaled(logits: torch.Tensor, temperature: torch.Tensor, scaled: torch.Tensor,
              finite: torch.Tensor) -> torch.Tensor:
    """scaled = logits / temperature [N, V], with every row whose maximum is not finite (`finite` [N] is
    False) replaced so that its softmax is defined.

    Such a row becomes (logits - max) / temperature: the same softmax, its largest entry exactly 0, and no
    overflow towards +inf (nothing is above 0) nor NaN (logits hold no +inf). A row with no finite logit
    becomes 0 at id 0 and -inf elsewhere: nothing else can be drawn, and greedy takes id 0 there too.
    """
    top = logits.amax(dim=-1, keepdim=True)                             # [N, 1]
    alive = top > -math.inf                                             # [N, 1]
    shifted = (logits - torch.where(alive, top, 0.0)) / temperature     # [N, V]; dead rows stay -inf
    shifted[:, 0] = torch.where(alive.squeeze(1), shifted[:, 0], 0.0)
    return torch.where(finite[:, None], scaled, shifted)


def _draw(raw: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Tokens [B] for one block of rows; raw: [B, V] float32."""
    logits = apply_penalties(raw, rows)                                 # [B, V]
    return _by_group([r.is_greedy for r in rows], logits, rows,
                     lambda x, _: x.argmax(dim=-1),
                     lambda x, group: _race(filtered_probs(x, group), group))


def _race(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The exponential race over probs [S, V] (zeros never win): tokens [S] int64.

    A row whose filters kept few tokens races among those alone, hashing a handful of ids instead of the
    vocabulary. The winner is the same: each id's noise depends on the id, not on where it sits.
    """
    if _without_host_checks(probs) and not any(r.ranks_tokens or r.min_p > 0 for r in rows):
        return _race_unfiltered(probs, rows)
    kept = (probs > 0).sum(dim=-1).tolist()                             # [S] on the host
    return _by_group([k * _NARROW_FACTOR <= probs.shape[1] for k in kept], probs, rows,
                     _race_among_kept, _race_over_vocabulary)


def _race_unfiltered(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The race of rows without filters, probs [S, V] -> tokens [S], decided on the device.

    No filter means most rows keep most of the vocabulary, so every row races over all V ids, and the
    host never waits to learn how many ids each row kept. The winner is the one `_race` picks: a
    positive best score belongs to a kept id, the lowest of those tied, as in the race among the kept
    ids. Only when every kept id of a row drew E = inf (score 0; each id's chance is below 2**-25) do
    the races differ: the race among the kept ids takes its first candidate, the race over the
    vocabulary id 0. A row `_race` would have raced among its kept ids takes its lowest kept id here,
    any other row id 0.
    """
    ids = torch.arange(probs.shape[1], dtype=torch.int64, device=probs.device)[None, :]  # [1, V]
    exponential = uniform_noise(draw_keys(rows), ids).neg_().log1p_().neg_()          # [S, V]
    scores = probs / exponential                                                       # [S, V]
    winner = scores.argmax(dim=-1)                                                     # [S] first max
    best = scores.gather(1, winner[:, None]).squeeze(1)                                # [S]
    kept = probs > 0                                                                   # [S, V]
    narrow = kept.sum(dim=-1) * _NARROW_FACTOR <= probs.shape[1]                       # [S]
    lowest_kept = kept.int().argmax(dim=-1)                                            # [S] first True
    fallback = torch.where(narrow, lowest_kept, torch.zeros_like(lowest_kept))         # [S]
    return torch.where(best > 0, winner, fallback)


def _race_over_vocabulary(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Race among all V ids: probs [S, V] -> tokens [S]."""
    ids = torch.arange(probs.shape[1], dtype=torch.int64, device=probs.device)[None, :]  # [1, V]
    return _race_winner(probs, ids, rows)


def _race_among_kept(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Race among the kept (non-zero) ids only: probs [S, V] -> tokens [S]."""
    width = int((probs > 0).sum(dim=-1).max())
    # Ascending ids, so equal scores go to the lowest id, as in the race over the vocabulary.
    ids = probs.topk(width, dim=-1).indices.sort(dim=-1).values         # [S, K]
    winner = _race_winner(probs.gather(1, ids), ids, rows)              # [S] position in ids
    return ids.gather(1, winner[:, None]).squeeze(1)


def _race_winner(probs: torch.Tensor, ids: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """argmax of p / E: probs [S, K] of the token ids [S or 1, K] -> positions [S] in K."""
    exponential = uniform_noise(draw_keys(rows), ids).neg_().log1p_().neg_()      # [S, K] E = -log(1 - x) > 0
    return (probs / exponential).argmax(dim=-1)


def _by_group(flags: Sequence[bool], data: torch.Tensor, rows: Sequence[SamplingRow],
              when_true: Callable[[torch.Tensor, Sequence[SamplingRow]], torch.Tensor],
              when_false: Callable[[torch.Tensor, Sequence[SamplingRow]], torch.Tensor]) -> torch.Tensor:
    """Tokens [B]: when_true on the flagged rows of data [B, V], when_false on the others.

    Each callable takes its rows of data and their SamplingRows and returns int64 [rows]. A group that
    holds every row gets data itself, with no gather or scatter.
    """
    if all(flags):
        return when_true(data, rows)
    if not any(flags):
        return when_false(data, rows)
    tokens = torch.empty(len(rows), dtype=torch.int64, device=data.device)  # [B]
    for flag, handle in ((True, when_true), (False, when_false)):
        positions = [i for i, f in enumerate(flags) if f == flag]
        idx = _index(positions, data)
        tokens[idx] = handle(data[idx], [rows[i] for i in positions])
    return tokens


def _penalise(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Rows with penalties get them applied; the others are passed through. [N, V] float32."""
    chosen = [i for i, r in enumerate(rows) if r.uses_penalties]
    if not chosen:
        return logits
    penalised_rows = [rows[i] for i in chosen]
    if len(chosen) == len(rows):
        return _penalise_all(logits, penalised_rows)
    idx = _index(chosen, logits)
    return logits.index_copy(0, idx, _penalise_all(logits[idx], penalised_rows))


def _penalise_all(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Every row of logits [P, V] gets its penalties: a new tensor."""
    counts = _token_counts([r.output_token_ids for r in rows], logits)  # [P, V] output occurrences
    if any(r.repetition_penalty != 1 for r in rows):
        seen = (counts > 0) | (_token_counts([r.prompt_token_ids for r in rows], logits) > 0)  # [P, V]
        penalty = _column(rows, "repetition_penalty", logits)           # [P, 1]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        logits = logits.clamp_(max=_FLOAT32_MAX)       # a tiny penalty lifts a positive logit past float32
    if any(r.presence_penalty != 0 or r.frequency_penalty != 0 for r in rows):
        presence = _column(rows, "presence_penalty", logits)            # [P, 1]
        frequency = _column(rows, "frequency_penalty", logits)          # [P, 1]
        logits = logits - presence * (counts > 0) - frequency * counts
    return logits


def _token_counts(token_lists: Sequence[Sequence[int]], like: torch.Tensor) -> torch.Tensor:
    """How often each id occurs in each row's list: [P, V] float32 on like's device."""
    vocab_size = like.shape[1]
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.int64)           # [P]
    ids = _flat_ids(token_lists)                                                       # [sum]
    _check_ids(ids, vocab_size, "prompt/output token ids")
    row_of = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)         # [sum]
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.float32, device=like.device)
    ones = torch.ones(ids.numel(), dtype=torch.float32, device=like.device)
    index = (to_device(row_of, torch.int64, like.device), to_device(ids, torch.int64, like.device))
    return counts.index_put_(index, ones, accumulate=True)


def _flat_ids(token_lists: Sequence[Sequence[int]]) -> torch.Tensor:
    """Every list's ids one after another: [sum of lengths] int64 on the host.

    Through array('q'), which converts each list in C: several times faster than torch.tensor on one
    long Python list, and prompts make these lists long.
    """
    flat = array.array("q")
    for tokens in token_lists:
        flat.extend(array.array("q", tokens))
    if not flat:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(flat, dtype=torch.int64).clone()   # clone: own the memory, not the array's


def _suppress(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Suppressed ids set to -inf in a new tensor (logits itself when no row suppresses)."""
    if not any(r.suppressed_token_ids for r in rows):
        return logits
    row_of = [i for i, r in enumerate(rows) for _ in r.suppressed_token_ids]
    ids = torch.tensor([t for r in rows for t in r.suppressed_token_ids], dtype=torch.int64)
    _check_ids(ids, logits.shape[1], "suppressed_token_ids")
    minus_inf = to_device(float("-inf"), torch.float32, logits.device)
    return logits.index_put((_index(row_of, logits), to_device(ids, torch.int64, logits.device)), minus_inf)


def _thresholds(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor | None:
    """Per row, the smallest probability the filters keep: [N] float32, or None when no row filters."""
    ranked = [i for i, r in enumerate(rows) if r.ranks_tokens]
    if not ranked and not any(r.min_p > 0 for r in rows):
        return None
    # min-p: keep p >= min_p * max p (min_p = 0 keeps everything).
    threshold = _column(rows, "min_p", probs).squeeze(1) * probs.amax(dim=-1)      # [N]
    if ranked:
        idx = _index(ranked, probs)
        rank_threshold = _rank_thresholds(probs[idx], [rows[i] for i in ranked])  # [Q]
        threshold = threshold.index_copy(0, idx, torch.maximum(threshold[idx], rank_threshold))
    return threshold


def _rank_thresholds(probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Top-k and top-p thresholds of probs [Q, V]: the last kept probability value per row, [Q]."""
    vocab_size = probs.shape[1]
    k = to_device([min(r.top_k, vocab_size) if r.top_k > 0 else vocab_size for r in rows],
                  torch.int64, probs.device)                                      # [Q]
    has_top_k = to_device([r.top_k > 0 for r in rows], torch.bool, probs.device)  # [Q]
    top_p = _column(rows, "top_p", probs).squeeze(1)                               # [Q]
    probe = _TOP_P_PROBE if any(r.top_p < 1 for r in rows) else 1
    width = min(vocab_size, max(probe, *(r.top_k for r in rows)))
    values = probs.topk(width, dim=-1).values                                       # [Q, W] descending
    threshold, found = _cut(values, k, top_p, has_top_k)                            # [Q], [Q]
    if bool(found.all()):
        return threshold
    missing = (~found).nonzero().squeeze(1)                                         # [M]
    full = probs[missing].sort(dim=-1, descending=True).values                      # [M, V]
    full_threshold, _ = _cut(full, k[missing], top_p[missing], has_top_k[missing])
    return threshold.index_copy(0, missing, full_threshold)


def _cut(values: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor,
         has_top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where top-k and top-p cut the W most likely probabilities `values` [Q, W] (descending).

    k: [Q] int64 (V where top-k is off), top_p: [Q], has_top_k: [Q] bool. Returns the last kept value
    [Q], and whether these W values decide the cut [Q] (they do not when all W are kept and more could
    be). Rows with top-k always have k <= W.
    """
    width = values.shape[1]
    in_top_k = torch.arange(width, device=values.device)[None, :] < k[:, None]     # [Q, W]
    kept_values = values.masked_fill(~in_top_k, 0.0)                               # [Q, W]
    # A prefix sum is built position by position, so its first W entries do not depend on how many
    # values follow: the probe and the full sort agree on every row.
    cumulative = kept_values.cumsum(dim=-1)                                         # [Q, W]
    mass_before = torch.nn.functional.pad(cumulative[:, :-1], (1, 0))               # [Q, W] exclusive
    # Top-p is relative to what top-k kept (HF and vLLM renormalise after top-k), else to 1.
    last = (k.clamp(max=width) - 1)[:, None]                                        # [Q, 1]
    mass = torch.where(has_top_k[:, None], cumulative.gather(1, last), 1.0)          # [Q, 1]
    within_top_p = (mass_before < top_p[:, None] * mass) | (top_p[:, None] >= 1)    # [Q, W]
    num_kept = (in_top_k & within_top_p).sum(dim=-1)                               # [Q] >= 1
    threshold = values.gather(1, (num_kept - 1)[:, None]).squeeze(1)                # [Q]
    return threshold, (num_kept < width) | (k <= width)


def _with_logprobs(raw: torch.Tensor, normaliser: torch.Tensor, tokens: torch.Tensor,
                   rows: Sequence[SamplingRow]) -> PendingSamplerOutput:
    """Raw logprobs of the chosen tokens and the top alternatives asked for, on their way to the host.

    raw: [N, V] float32, normaliser: [N, 1] its logsumexp, tokens: [N] int64.
    """
    chosen = (raw.gather(1, tokens[:, None]) - normaliser).squeeze(1)               # [N]
    num_top = max((r.num_logprobs for r in rows), default=0)
    if num_top == 0:
        return PendingSamplerOutput(tokens, rows, chosen)
    top_values, top_ids = raw.topk(num_top, dim=-1)                                 # [N, K], [N, K]
    return PendingSamplerOutput(tokens, rows, chosen, top_values - normaliser, top_ids)


def _check_batch(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Shapes and per-row limits that depend on the logits."""
    _require(logits.dim() == 2, f"logits must be [N, V], got shape {tuple(logits.shape)}")
    _require(logits.is_floating_point(), f"logits must be floating point, got {logits.dtype}")
    num_rows, vocab_size = logits.shape
    _require(len(rows) == num_rows, f"got {len(rows)} sampling rows for {num_rows} rows of logits")
    _require(vocab_size > 0, "logits have an empty vocabulary")
    if max((r.num_logprobs for r in rows), default=0) > vocab_size:     # messages only on failure
        i, r = next((i, r) for i, r in enumerate(rows) if r.num_logprobs > vocab_size)
        raise ValueError(f"row {i}: num_logprobs {r.num_logprobs} exceeds the vocabulary size {vocab_size}")


def _check_ids(ids: torch.Tensor, vocab_size: int, what: str) -> None:
    """Token ids (a host tensor) must lie in [0, vocab_size)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{what} must lie in [0, {vocab_size}), got ids from {int(ids.min())} "
                         f"to {int(ids.max())}")


def _without_host_checks(t: torch.Tensor) -> bool:
    """Whether the sampler takes the paths that never ask the device about values (tensor t's device is
    a GPU). They give the same tokens as the paths that check first; on a GPU a check makes the host wait
    for the forward pass. On the CPU checking first is cheaper: the checks skip whole passes."""
    return t.device.type != "cpu"


def _rows_per_block(raw: torch.Tensor) -> int:
    """How many rows one pass handles: cache-sized on the CPU, memory-bounded on a GPU."""
    elements = _CPU_BLOCK_ELEMENTS if raw.device.type == "cpu" else _GPU_BLOCK_ELEMENTS
    return max(1, elements // raw.shape[1])


def _column(rows: Sequence[SamplingRow], field: str, like: torch.Tensor) -> torch.Tensor:
    """One float parameter of every row as a [N, 1] float32 column on like's device, each value saturated
    into the field's range in _COLUMN_RANGES (values inside it are unchanged)."""
    low, high = _COLUMN_RANGES[field]
    values = [min(max(getattr(r, field), low), high) for r in rows]
    return to_device(values, torch.float32, like.device)[:, None]


def _index(positions: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Row positions as an int64 index tensor on like's device."""
    return to_device(positions, torch.int64, like.device)


def _splitmix64(x: int) -> int:
    """splitmix64's output step: a bijective 64-bit mixer (Steele, Lea and Flood, 2014)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


_MASK32_U64 = np.uint64(_MASK32)
# The noise kernel's grid has one row of blocks per sampling row (CUDA's grid y limit).
_MAX_NOISE_ROWS = 65535
_SPLITMIX = tuple(np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """`_splitmix64` on a uint64 array (numpy's uint64 arithmetic wraps modulo 2**64)."""
    z = x + _SPLITMIX[0]
    z = (z ^ (z >> np.uint64(30))) * _SPLITMIX[1]
    z = (z ^ (z >> np.uint64(27))) * _SPLITMIX[2]
    return z ^ (z >> np.uint64(31))


def _as_signed32(constant: int) -> int:
    """constant's representative in [-2**31, 2**31): the same low 32 bits of every product, and
    |value * representative| < 2**63 for any 32-bit value, so int64 never overflows."""
    return constant - 2**32 if constant >= 2**31 else constant


_FMIX_C1 = _as_signed32(0x85EBCA6B)
_FMIX_C2 = _as_signed32(0xC2B2AE35)


def _fmix32_(h: torch.Tensor) -> torch.Tensor:
    """murmur3's fmix32, in place, on 32-bit words held in an int64 tensor (values in [0, 2**32))."""
    h ^= h >> 16
    h.mul_(_FMIX_C1).bitwise_and_(_MASK32)
    h ^= h >> 13
    h.mul_(_FMIX_C2).bitwise_and_(_MASK32)
    h ^= h >> 16
    return h


def _require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds."""
    if not condition:
        raise ValueError(message)
