"""The executor's one frozen configuration; flags and PAGEDSERVE_EXECUTOR_* environment map onto it."""

from __future__ import annotations

import argparse
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from scheduler_svc.config_sources import add_config_arguments, config_from_sources
from scheduler_svc.errors import InvalidArgumentError

ENV_PREFIX = "PAGEDSERVE_EXECUTOR_"


class Backend(enum.Enum):
    """What executes the plans.

    SIMULATED is the token-level simulated executor: no model and no GPU, for testing the scheduler
    and the control plane end to end. The model backend (torch models, CUDA kernels) plugs into the
    same server.
    """

    SIMULATED = "simulated"


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """Where the executor listens and what it runs."""

    host: str = "127.0.0.1"
    port: int = 50061
    backend: Backend = Backend.SIMULATED
    rank: int = 0
    world_size: int = 1
    max_model_len: int = 4096
    max_message_bytes: int = 256 * 2**20
    simulated_kv_tokens: int = 65536
    simulated_vocab_size: int = 32000
    simulated_eos_token_id: int = 2

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, "port", f"must be in [0, 65535], got {self.port}")
        _check(0 <= self.rank < self.world_size, "rank", f"must be in [0, world_size={self.world_size})")
        _check(self.max_model_len >= 2, "max_model_len", "must be at least 2")
        _check(self.max_message_bytes >= 4 * 2**20, "max_message_bytes", "must be at least 4 MiB")
        _check(self.simulated_kv_tokens >= 1, "simulated_kv_tokens", "must be at least 1")
        _check(0 <= self.simulated_eos_token_id < self.simulated_vocab_size, "simulated_eos_token_id",
               "must be a token id below simulated_vocab_size")

    @property
    def address(self) -> str:
        """host:port to listen on."""
        return f"{self.host}:{self.port}"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one `--flag` per field; each defaults to `PAGEDSERVE_EXECUTOR_<FIELD>`."""
        add_config_arguments(parser, cls, ENV_PREFIX, "executor")

    @classmethod
    def from_sources(cls, args: argparse.Namespace | None = None,
                     environ: Mapping[str, str] | None = None) -> ExecutorConfig:
        """Flags win over environment, which wins over defaults."""
        return config_from_sources(cls, args, environ, ENV_PREFIX)


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise InvalidArgumentError(name, message)
