"""The scheduler's one frozen configuration, validated once; CLI flags and environment map onto it."""

from __future__ import annotations

import argparse
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from pagedserve.config_sources import add_config_arguments, config_from_sources
from pagedserve.default_model import default_model_dir
from pagedserve.errors import InvalidArgumentError

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
    # Cache full prompt blocks by content; a prompt that starts like an earlier one reuses its blocks.
    enable_prefix_caching: bool = False
    preemption_mode: PreemptionPolicy = PreemptionPolicy.AUTO
    reservation: ReservationMode = ReservationMode.PAGED
    watermark: float = 0.01
    gpu_memory_utilization: float = 0.9
    swap_space_bytes: int = 4 * 2**30
    # ---- serving (the frontend and the engine; unused by the pure scheduler and `simulate`) ----
    host: str = "127.0.0.1"
    port: int = 50051
    # The OpenAI-compatible HTTP API, on `host` beside the gRPC API (0 turns it off).
    http_port: int = 8000
    # A Jinja chat template file for /v1/chat/completions, instead of the model's tokenizer_config.json one.
    chat_template: str = ""
    executor_addresses: str = "127.0.0.1:50061"
    model: str = ""
    served_model_name: str = ""
    max_waiting_requests: int = 16384
    max_request_bytes: int = 4 * 2**20
    executor_grace_seconds: float = 60.0
    # A rank whose step result is this late is hung (a wedged kernel or collective): the engine
    # recovers as for a crash, the rank reads NOT_SERVING, and `pagedserve serve` restarts it. The
    # slowest legitimate step measured is 19 s (an 8,160-token prefill step of a small model on the
    # 2-core CPU); the 7B serving runs on an H200 average 25-55 ms a step. Raise it for big models on
    # a CPU.
    executor_step_timeout_seconds: float = 120.0
    # A rank that has not answered its health check with SERVING for this long is hung (a stopped or
    # frozen process) and is treated the same way. Health answers take milliseconds even mid-step.
    executor_health_timeout_seconds: float = 10.0
    startup_timeout_seconds: float = 600.0
    shutdown_grace_seconds: float = 30.0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    auth_token: str = ""
    metrics_port: int = 9400
    async_scheduling: bool = True

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
        _check(not self.enable_prefix_caching or self.reservation is ReservationMode.PAGED,
               "enable_prefix_caching", f"needs reservation 'paged' (blocks shared by reference), got "
               f"{self.reservation.value!r}")
        self._check_serving()

    def _check_serving(self) -> None:
        if not self.model:
            object.__setattr__(self, "model", default_model_dir())    # the embedded default model
        _check(0 <= self.port < 65536, "port", f"must be in [0, 65535], got {self.port}")
        _check(0 <= self.http_port < 65536, "http_port",
               f"must be in [1, 65535], or 0 for no HTTP API, got {self.http_port}")
        _check(self.http_port == 0 or self.http_port not in (self.port, self.metrics_port), "http_port",
               f"must differ from port and metrics_port, got {self.http_port}")
        _check(-1 <= self.metrics_port < 65536, "metrics_port",
               f"must be in [0, 65535], or -1 for no metrics server, got {self.metrics_port}")
        _check(bool(self.executor_list), "executor_addresses", "give at least one executor as host:port")
        for address in self.executor_list:
            host, _, port = address.rpartition(":")
            _check(bool(host) and port.isdigit(), "executor_addresses",
                   f"each executor must be host:port, got {address!r}")
        _check(self.max_waiting_requests >= 1, "max_waiting_requests", "must be at least 1")
        _check(self.max_request_bytes >= 1024, "max_request_bytes", "must be at least 1024")
        for name in ("executor_grace_seconds", "startup_timeout_seconds", "shutdown_grace_seconds"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("executor_step_timeout_seconds", "executor_health_timeout_seconds"):
            _check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        _check(bool(self.tls_cert_file) == bool(self.tls_key_file), "tls_cert_file",
               "TLS needs both tls_cert_file and tls_key_file")

    @property
    def executor_list(self) -> tuple[str, ...]:
        """The executor ranks' host:port addresses, in rank order (`executor_addresses` split at commas)."""
        return tuple(a.strip() for a in self.executor_addresses.split(",") if a.strip())

    @property
    def address(self) -> str:
        """host:port the frontend listens on."""
        return f"{self.host}:{self.port}"

    def check_model_len(self, max_model_len: int) -> None:
        """Check that a prompt of `max_model_len` tokens can be scheduled under these budgets."""
        _check(self.enable_chunked_prefill or self.max_num_batched_tokens >= max_model_len,
               "max_num_batched_tokens",
               f"must be at least max_model_len ({max_model_len}) unless chunked prefill is enabled, "
               f"got {self.max_num_batched_tokens}")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, serving: bool = True) -> None:
        """Add one `--flag` per field; each defaults to `PAGEDSERVE_<FIELD>` from the environment.

        `serving=False` leaves out the frontend and engine fields (for the offline simulation).
        """
        add_config_arguments(parser, cls, ENV_PREFIX, "scheduling",
                             exclude=() if serving else SERVING_FIELDS)

    @classmethod
    def from_sources(cls, args: argparse.Namespace | None = None,
                     environ: Mapping[str, str] | None = None) -> SchedulerConfig:
        """Build the config: a CLI flag wins over `PAGEDSERVE_*` environment, which wins over defaults."""
        return config_from_sources(cls, args, environ, ENV_PREFIX, int_fields=("max_model_len",))


SERVING_FIELDS = ("host", "port", "http_port", "chat_template", "executor_addresses", "model",
                  "served_model_name", "max_waiting_requests", "max_request_bytes", "executor_grace_seconds",
                  "executor_step_timeout_seconds", "executor_health_timeout_seconds",
                  "startup_timeout_seconds", "shutdown_grace_seconds", "tls_cert_file", "tls_key_file",
                  "auth_token", "metrics_port", "async_scheduling")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise InvalidArgumentError(name, message)
