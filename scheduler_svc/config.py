"""The scheduler service's frozen configuration, by concern, validated once.

SchedulerConfig is the scheduling policy and its budgets (all the pure scheduler and `pagedserve
simulate` need); ServingConfig is how the service serves (listening, executors, limits, timeouts,
TLS); SchedulerServiceConfig composes the two. Every field is also a flag and a `PAGEDSERVE_<FIELD>`
environment variable, described once by its `setting()` (pagedserve.settings).
"""

from __future__ import annotations

import argparse
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pagedserve.default_model import default_model_dir
from pagedserve.errors import InvalidArgumentError
from pagedserve.settings import (
    BYTES,
    SECONDS,
    ConfigFile,
    add_arguments,
    build,
    env_names,
    is_executor_variable,
    resolve,
    section,
    setting,
)

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

    block_size: int = setting(16, "tokens per KV block (a power of two up to 256)")
    max_num_seqs: int = setting(256, "sequences running at once")
    max_num_batched_tokens: int = setting(
        8192, "prompt tokens per step (each running sequence adds its decode token)")
    max_model_len: int | None = setting(None, "longest sequence, prompt plus output",
                                        default_text="the model's")
    enable_chunked_prefill: bool = setting(
        False, "split long prompts over steps (with --max-num-batched-tokens 2048: lower tail latency, "
               "higher median TTFT; serving_mixed_split_h200.md)")
    # Cache full prompt blocks by content; a prompt that starts like an earlier one reuses its blocks.
    enable_prefix_caching: bool = setting(
        False, "cache full prompt blocks by content: a prompt that starts like an earlier one (a system "
               "prompt, few-shot examples, a conversation so far) shares its blocks and computes only the "
               "rest; unreferenced cached blocks are evicted least recently used first, only when no free "
               "block is left; usage reports cached_prompt_tokens")
    preemption_mode: PreemptionPolicy = setting(
        PreemptionPolicy.AUTO, "how a running group is evicted when blocks run out: auto recomputes single "
                               "sequences and swaps groups of several")
    reservation: ReservationMode = setting(
        ReservationMode.PAGED, "KV memory reserved at admission: paged (blocks on demand) or one of the "
                               "paper's contiguous-reservation baselines")
    watermark: float = setting(0.01, "fraction of GPU blocks kept free at admission and swap-in")
    gpu_memory_utilization: float = setting(0.9, "passed to executors when they size their KV cache")
    swap_space_bytes: int = setting(4 * 2**30, "CPU swap space per executor", unit=BYTES)

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

    def check_model_len(self, max_model_len: int) -> None:
        """Check that a prompt of `max_model_len` tokens can be scheduled under these budgets."""
        _check(self.enable_chunked_prefill or self.max_num_batched_tokens >= max_model_len,
               "max_num_batched_tokens",
               f"must be at least max_model_len ({max_model_len}) unless chunked prefill is enabled, "
               f"got {self.max_num_batched_tokens}")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one `--flag` per scheduling field; each defaults to `PAGEDSERVE_<FIELD>`."""
        add_arguments(parser, cls, ENV_PREFIX, "scheduling")

    @classmethod
    def from_sources(cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None,
                     config_file: ConfigFile | None = None) -> SchedulerConfig:
        """Build the policy: a CLI flag wins over `PAGEDSERVE_*` environment, then the file, then defaults."""
        return resolve(cls, ENV_PREFIX, args, _environ(environ), config_file)


@dataclass(frozen=True, slots=True)
class ServingConfig:
    """How the scheduler service serves: its APIs, its executors, request limits, timeouts and TLS.

    The frontend and the engine read it; the pure scheduler and `simulate` never do.
    """

    host: str = setting("127.0.0.1", "address the gRPC, HTTP and metrics servers listen on")
    port: int = setting(50051, "the gRPC API's port (0 picks a free one)")
    # The OpenAI-compatible HTTP API, on `host` beside the gRPC API (0 turns it off).
    http_port: int = setting(8000, "the OpenAI-compatible HTTP API's port on --host; 0 turns it off "
                                   "(serve --port 0 gives it a free port)")
    # A Jinja chat template file for /v1/chat/completions, instead of the model's tokenizer_config.json one.
    chat_template: str = setting("", "a Jinja chat template file for /v1/chat/completions instead of the one "
                                     "in the model's tokenizer_config.json", default_text="the model's",
                                 metavar="FILE")
    executor_addresses: str = setting("127.0.0.1:50061", "the executor ranks, host:port comma-separated in "
                                                         "rank order (serve sets it)",
                                  metavar="HOST:PORT[,...]")
    model: str = setting("", "model directory or Hugging Face repo id (from the local hub cache, HF_HOME) "
                             "whose tokenizer the scheduler uses (serve also gives it to the executors)",
                         default_text="the embedded model", metavar="DIR|REPO")
    tokenizer: str = setting("", "tokenizer directory or repo id, when it is not --model's",
                             default_text="--model", metavar="DIR|REPO")
    revision: str = setting("", "branch, tag or commit of the --model and --tokenizer repo ids (serve also "
                                "gives it to the executors)", default_text="main", metavar="REV")
    served_model_name: str = setting("", "name reported by GetModelInfo", default_text="the executor's",
                                     metavar="NAME")
    max_waiting_requests: int = setting(16384, "waiting queue bound; beyond it RESOURCE_EXHAUSTED")
    max_request_bytes: int = setting(4 * 2**20, "largest GenerateRequest; beyond it INVALID_ARGUMENT",
                                     unit=BYTES)
    executor_grace_seconds: float = setting(
        60.0, "how long live requests wait for a lost executor before UNAVAILABLE", unit=SECONDS)
    # A rank whose step result is this late is hung (a wedged kernel or collective): the engine
    # recovers as for a crash, the rank reads NOT_SERVING, and `pagedserve serve` restarts it. The
    # slowest legitimate step measured is 19 s (an 8,160-token prefill step of a small model on the
    # 2-core CPU); the 7B serving runs on an H200 average 25-55 ms a step. Raise it for big models on
    # a CPU.
    executor_step_timeout_seconds: float = setting(
        120.0, "a rank whose step result is this late is hung (a wedged kernel or collective): "
               "NOT_SERVING, its requests are kept and recomputed as after a crash, and serve restarts it; "
               "the slowest legitimate step measured is 19 s (an 8,160-token prefill of a small model on "
               "the 2-core CPU), so raise it for big models on a CPU", unit=SECONDS)
    # A rank that has not answered its health check with SERVING for this long is hung (a stopped or
    # frozen process) and is treated the same way. Health answers take milliseconds even mid-step.
    executor_health_timeout_seconds: float = setting(
        10.0, "a rank that has not answered its gRPC health check with SERVING for this long (a stopped or "
              "frozen process) is hung in the same way; serve kills and restarts it", unit=SECONDS)
    startup_timeout_seconds: float = setting(600.0, "how long to wait for the executors at start",
                                             unit=SECONDS)
    shutdown_grace_seconds: float = setting(30.0, "how long SIGTERM lets live requests finish", unit=SECONDS)
    tls_cert_file: str = setting("", "serve TLS with this PEM certificate chain (with --tls-key-file)",
                                  metavar="FILE")
    tls_key_file: str = setting("", "the PEM private key of --tls-cert-file", metavar="FILE")
    auth_token: str = setting("", "require 'authorization: Bearer <token>' (prefer the environment variable "
                                  "to the flag)", metavar="TOKEN")
    metrics_port: int = setting(9400, "Prometheus /metrics on --host; 0 a free port, -1 none")
    async_scheduling: bool = setting(True, "plan the next step while one runs (--no-async-scheduling: one "
                                           "step at a time)")

    def __post_init__(self) -> None:
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


@dataclass(frozen=True, slots=True)
class SchedulerServiceConfig:
    """What `pagedserve-scheduler` runs with: the scheduling policy and the serving settings."""

    scheduling: SchedulerConfig = section(SchedulerConfig, "scheduling")
    serving: ServingConfig = section(ServingConfig, "serving")

    @classmethod
    def of(cls, **fields: Any) -> SchedulerServiceConfig:
        """The config with these fields (flat names: `port=0, block_size=32`), each in its part."""
        return build(cls, **fields)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One `--flag` per field of both parts, grouped by part; each defaults to `PAGEDSERVE_<FIELD>`."""
        add_arguments(parser, cls, ENV_PREFIX)

    @classmethod
    def from_sources(cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None,
                     config_file: ConfigFile | None = None) -> SchedulerServiceConfig:
        """Build the config: a flag wins over `PAGEDSERVE_*` environment, then the file, then defaults."""
        return resolve(cls, ENV_PREFIX, args, _environ(environ), config_file)


def known_environment(environ: Mapping[str, str] | None = None) -> set[str]:
    """The environment variables the scheduler takes as known: its own, and the executor's in `environ`
    (the executor checks those itself; under `pagedserve serve` and in compose files both services see
    one environment)."""
    executor_names = {name for name in _environ(environ) if is_executor_variable(name)}
    return env_names(SchedulerServiceConfig, ENV_PREFIX) | executor_names


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise InvalidArgumentError(name, message)
