"""The scheduler's one frozen configuration, validated once; CLI flags and environment map onto it."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scheduler_svc.errors import InvalidArgumentError

ENV_PREFIX = "PAGEDSERVE_"
MAX_BLOCK_SIZE = 256


class PreemptionPolicy(enum.Enum):
    """How a running group is evicted when the GPU runs out of blocks.

    AUTO recomputes single-sequence groups (cheap to re-prefill, paper §4.5) and swaps groups of
    several sequences, whose shared blocks recomputation would duplicate.
    """

    AUTO = "auto"
    SWAP = "swap"
    RECOMPUTE = "recompute"


class ReservationMode(enum.Enum):
    """How much KV memory a request reserves at admission.

    PAGED is PagedAttention: blocks on demand. The others emulate the paper's contiguous-reservation
    baselines (Orca) on the same scheduler so its memory comparison (Fig. 2 and 13) can be reproduced:
    RESERVE_MAX reserves max_model_len tokens per sequence, RESERVE_POW2 the prompt plus max_tokens
    rounded up to a power of two, RESERVE_ORACLE exactly prompt + max_tokens. Reserving modes share no
    block between sequences, as the baselines cannot.
    """

    PAGED = "paged"
    RESERVE_MAX = "reserve-max"
    RESERVE_POW2 = "reserve-pow2"
    RESERVE_ORACLE = "reserve-oracle"


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Scheduling policy and budgets. Block counts come from the executors at startup, not from here.

    `max_num_batched_tokens` caps the prompt (prefill and recomputation) tokens of one step; every
    running sequence adds its one decode token on top, so a step computes at most
    max_num_batched_tokens + max_num_seqs tokens. Without chunked prefill a whole prompt must fit in
    one step, so it must be at least `max_model_len`. `max_model_len = None` takes the model's limit
    from the executors.
    """

    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_chunked_prefill: bool = False
    preemption_mode: PreemptionPolicy = PreemptionPolicy.AUTO
    reservation: ReservationMode = ReservationMode.PAGED
    watermark: float = 0.01
    gpu_memory_utilization: float = 0.9
    swap_space_bytes: int = 4 * 2**30

    def __post_init__(self) -> None:
        # Any power of two works for scheduling; the executor checks what its kernels support.
        _check(0 < self.block_size <= MAX_BLOCK_SIZE and self.block_size & (self.block_size - 1) == 0,
               "block_size", f"must be a power of two up to {MAX_BLOCK_SIZE}, got {self.block_size}")
        _check(self.max_num_seqs >= 1, "max_num_seqs", f"must be at least 1, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
               f"must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None:
            _check(self.max_model_len >= 2, "max_model_len", f"must be at least 2, got {self.max_model_len}")
            self.check_model_len(self.max_model_len)
        _check(0.0 <= self.watermark < 0.5, "watermark", f"must be in [0, 0.5), got {self.watermark}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
               f"must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.swap_space_bytes >= 0, "swap_space_bytes", "must be >= 0")

    def check_model_len(self, max_model_len: int) -> None:
        """Check that a prompt of `max_model_len` tokens can be scheduled under these budgets."""
        _check(self.enable_chunked_prefill or self.max_num_batched_tokens >= max_model_len,
               "max_num_batched_tokens",
               f"must be at least max_model_len ({max_model_len}) unless chunked prefill is enabled, "
               f"got {self.max_num_batched_tokens}")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one `--flag` per field; each defaults to `PAGEDSERVE_<FIELD>` from the environment."""
        group = parser.add_argument_group("scheduling")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                   help=f"(env {ENV_PREFIX}{f.name.upper()}; default {f.default})")
            else:
                group.add_argument(flag, default=None,
                                   help=f"(env {ENV_PREFIX}{f.name.upper()}; default {_show(f.default)})")

    @classmethod
    def from_sources(cls, args: argparse.Namespace | None = None,
                     environ: Mapping[str, str] | None = None) -> SchedulerConfig:
        """Build the config: a CLI flag wins over `PAGEDSERVE_*` environment, which wins over defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = getattr(args, f.name, None) if args is not None else None
            if raw is None:
                raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, raw, f.default)
        return cls(**values)


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise InvalidArgumentError(name, message)


def _show(value: object) -> str:
    return value.value if isinstance(value, enum.Enum) else str(value)


def _parse(name: str, raw: object, default: object) -> object:
    """Convert a flag or environment string to the type of the field's default."""
    if not isinstance(raw, str):
        return raw
    try:
        if isinstance(default, enum.Enum):
            return type(default)(raw.lower())
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int) or (default is None and name == "max_model_len"):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise InvalidArgumentError(name, f"cannot parse {raw!r}") from None
    return raw
