"""Per-sequence KV reservations of the contiguous-allocation baselines the paper compares against."""

from __future__ import annotations

from scheduler_svc.config import ReservationMode


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def reserved_tokens(mode: ReservationMode, prompt_len: int, max_tokens: int, max_model_len: int) -> int:
    """Token slots a reserving mode holds for one sequence from admission to finish.

    Orca (Max) reserves the model's whole context; Orca (Pow2) over-reserves the output by at most 2x,
    rounding it up to a power of two; Orca (Oracle) knows the output length, which with max_tokens
    (and ignore_eos, as the benchmarks use) is exact. PAGED reserves nothing ahead: 0.
    """
    if mode is ReservationMode.PAGED:
        return 0
    if mode is ReservationMode.RESERVE_MAX:
        return max_model_len
    if mode is ReservationMode.RESERVE_POW2:
        return min(prompt_len + next_power_of_two(max_tokens), max_model_len)
    return min(prompt_len + max_tokens, max_model_len)
