"""The executor's one frozen configuration; flags and PAGEDSERVE_EXECUTOR_* environment map onto it."""

from __future__ import annotations

import argparse
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from pagedserve.config_sources import add_config_arguments, config_from_sources
from pagedserve.default_model import default_model_dir
from pagedserve.errors import InvalidArgumentError

ENV_PREFIX = "PAGEDSERVE_EXECUTOR_"


class Backend(enum.Enum):
    """What executes the plans.

    MODEL runs a Hugging Face model directory with our own model code and paged KV cache. SIMULATED is
    the token-level simulated executor: no model and no GPU, for testing the scheduler and the
    control plane end to end.
    """

    MODEL = "model"
    SIMULATED = "simulated"


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """Where the executor listens and what it runs."""

    host: str = "127.0.0.1"
    port: int = 50061
    metrics_port: int = 0           # Prometheus /metrics; 0: a free ephemeral port, -1: no metrics server
    backend: Backend = Backend.MODEL
    model: str = ""
    served_model_name: str = ""
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    cpu_kv_cache_bytes: int = 2**30
    rank: int = 0                   # this executor's place in its tensor-parallel group
    world_size: int = 1             # tensor-parallel ranks; the model's heads and MLP are split over them
    # host:port where rank 0 hosts the group's rendezvous (a torch.distributed TCPStore); every rank of
    # the group gives the same address, reachable from all their hosts. Unused when world_size is 1.
    distributed_init_address: str = "127.0.0.1:29500"
    distributed_backend: str = "auto"   # auto: nccl on CUDA, gloo on the CPU
    distributed_timeout_seconds: float = 600.0
    # A rank that has not heard a peer's heartbeat for this long exits (code 3) so the group restarts.
    distributed_heartbeat_timeout_seconds: float = 30.0
    max_model_len: int = 0
    max_message_bytes: int = 256 * 2**20
    cuda_graphs: bool = True        # replay decode steps as CUDA graphs (fp16/bf16 on CUDA with the kernels)
    cuda_graph_max_batch: int = 256  # decode batches up to this many sequences use graphs; larger run eagerly
    simulated_kv_tokens: int = 65536
    simulated_vocab_size: int = 32000
    simulated_eos_token_id: int = 2

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, "port", f"must be in [0, 65535], got {self.port}")
        _check(-1 <= self.metrics_port < 65536, "metrics_port",
               f"must be in [0, 65535], or -1 for no metrics server, got {self.metrics_port}")
        _check(0 <= self.rank < self.world_size, "rank", f"must be in [0, world_size={self.world_size})")
        host, _, port = self.distributed_init_address.rpartition(":")
        _check(bool(host) and port.isdigit() and 0 < int(port) < 65536, "distributed_init_address",
               f"must be host:port, got {self.distributed_init_address!r}")
        _check(self.distributed_backend in ("auto", "nccl", "gloo"), "distributed_backend",
               f"must be auto, nccl or gloo, got {self.distributed_backend!r}")
        _check(self.distributed_timeout_seconds > 0, "distributed_timeout_seconds", "must be > 0")
        _check(self.distributed_heartbeat_timeout_seconds > 0, "distributed_heartbeat_timeout_seconds",
               "must be > 0")
        _check(self.max_model_len == 0 or self.max_model_len >= 2, "max_model_len",
               "must be at least 2 (0 takes the model's own limit)")
        if self.backend is Backend.MODEL and not self.model:
            object.__setattr__(self, "model", default_model_dir())    # the embedded default model
        _check(self.dtype in ("auto", "float32", "float16", "bfloat16"), "dtype",
               f"must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
               f"must be auto, cpu or cuda[:N], got {self.device!r}")
        _check(self.load_format in ("auto", "dummy"), "load_format",
               f"must be auto (the checkpoint's weights) or dummy (random), got {self.load_format!r}")
        _check(self.cpu_kv_cache_bytes > 0, "cpu_kv_cache_bytes", "must be > 0")
        _check(self.max_message_bytes >= 4 * 2**20, "max_message_bytes", "must be at least 4 MiB")
        _check(1 <= self.cuda_graph_max_batch <= 4096, "cuda_graph_max_batch",
               f"must be in [1, 4096], got {self.cuda_graph_max_batch}")
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
