"""The executor's one frozen configuration; flags and PAGEDSERVE_EXECUTOR_* environment map onto it.

Every field is described once by its `setting()` (pagedserve.settings): its flag, its environment
variable, its config-file key and its row in docs/configuration.md come from there. The CUDA kernel
switches keep the environment variables they have always had (PAGEDSERVE_CUDA_KERNELS,
PAGEDSERVE_FUSED_LAYERS, PAGEDSERVE_KERNEL_CACHE); they are read once at start and passed to the model
code.
"""

from __future__ import annotations

import argparse
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pagedserve.default_model import default_model_dir
from pagedserve.errors import InvalidArgumentError
from pagedserve.settings import (
    BYTES,
    EXECUTOR_ENV_PREFIX,
    SECONDS,
    ConfigFile,
    add_arguments,
    env_names,
    is_executor_variable,
    resolve,
    setting,
)

ENV_PREFIX = EXECUTOR_ENV_PREFIX
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "dummy")
DISTRIBUTED_BACKENDS = ("auto", "nccl", "gloo")


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

    host: str = setting("127.0.0.1", "address the executor API and metrics listen on")
    port: int = setting(50061, "the executor API's port (0 picks a free one)")
    metrics_port: int = setting(0, "Prometheus /metrics; 0 a free port, -1 none")
    backend: Backend = setting(Backend.MODEL, "what runs the plans: a model, or the simulated executor (no "
                                              "model, no GPU)")
    model: str = setting("", "Hugging Face model directory, or a repo id resolved from the local hub cache "
                             "(HF_HOME)", default_text="the embedded model", metavar="DIR|REPO")
    revision: str = setting("", "branch, tag or commit of a --model repo id", default_text="main",
                            metavar="REV")
    served_model_name: str = setting("", "name reported by Describe", default_text="the directory's name",
                                     metavar="NAME")
    dtype: str = setting("auto", "weights and activations; auto is bfloat16 on CUDA, float32 on the CPU",
                         choices=DTYPES)
    device: str = setting("auto", "where the model runs; auto is CUDA if present (rank r on GPU r)",
                          choices=("auto", "cpu", "cuda[:N]"))
    load_format: str = setting("auto", "auto loads the checkpoint's weights, dummy random ones of the real "
                                       "sizes", choices=LOAD_FORMATS)
    seed: int = setting(0, "seed for dummy weights")
    cpu_kv_cache_bytes: int = setting(2**30, "KV cache size when running on the CPU", unit=BYTES)
    rank: int = setting(0, "this rank's place in its tensor-parallel group")
    world_size: int = setting(1, "tensor-parallel ranks; the model's heads and MLP are split over them")
    # host:port where rank 0 hosts the group's rendezvous (a torch.distributed TCPStore); every rank of
    # the group gives the same address, reachable from all their hosts. Unused when world_size is 1.
    distributed_init_address: str = setting(
        "127.0.0.1:29500", "host:port where rank 0 hosts the group's rendezvous (the same on every rank)",
        metavar="HOST:PORT")
    distributed_backend: str = setting("auto", "collectives between ranks; auto is NCCL on CUDA, gloo on "
                                               "the CPU", choices=DISTRIBUTED_BACKENDS)
    distributed_timeout_seconds: float = setting(
        600.0, "how long joining the group and each collective may take", unit=SECONDS)
    # A rank that has not heard a peer's heartbeat for this long exits (code 3) so the group restarts.
    distributed_heartbeat_timeout_seconds: float = setting(
        30.0, "a rank that has not heard a peer for this long exits with code 3 so the group restarts",
        unit=SECONDS)
    max_model_len: int = setting(0, "longest sequence the executor accepts (0: the model's)")
    max_message_bytes: int = setting(256 * 2**20, "gRPC message limit both ways", unit=BYTES)
    cuda_graphs: bool = setting(True, "replay decode steps as CUDA graphs (fp16/bf16 on CUDA with the "
                                      "kernels); off runs every step eagerly")
    cuda_graph_max_batch: int = setting(256, "decode batches up to this many sequences replay a graph; "
                                             "larger ones run eagerly")
    overlap_steps: bool = setting(True, "launch the next step while the last one still computes, so "
                                        "host work between steps overlaps the GPU; off runs steps one by one")
    # The kernel switches keep their historical variable names; they were once read on every layer call.
    cuda_kernels: bool = setting(True, "PagedServe's CUDA kernels for attention and the KV cache on CUDA; "
                                       "off selects the torch reference (for comparisons)",
                                 env="PAGEDSERVE_CUDA_KERNELS")
    fused_layers: bool = setting(True, "the fused RMSNorm, SwiGLU and rotary kernels (with --cuda-kernels); "
                                       "off keeps the torch reference layers (for A/B measurements)",
                                 env="PAGEDSERVE_FUSED_LAYERS")
    kernel_cache: str = setting("", "directory the CUDA kernels are built into and loaded from",
                                env="PAGEDSERVE_KERNEL_CACHE", default_text="~/.cache/pagedserve/kernels",
                                metavar="DIR")
    simulated_kv_tokens: int = setting(65536, "the simulated backend's KV cache, in tokens")
    simulated_vocab_size: int = setting(32000, "the simulated backend's vocabulary size")
    simulated_eos_token_id: int = setting(2, "the simulated backend's EOS token id")

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, "port", f"must be in [0, 65535], got {self.port}")
        _check(-1 <= self.metrics_port < 65536, "metrics_port",
               f"must be in [0, 65535], or -1 for no metrics server, got {self.metrics_port}")
        _check(0 <= self.rank < self.world_size, "rank", f"must be in [0, world_size={self.world_size})")
        host, _, port = self.distributed_init_address.rpartition(":")
        _check(bool(host) and port.isdigit() and 0 < int(port) < 65536, "distributed_init_address",
               f"must be host:port, got {self.distributed_init_address!r}")
        _check(self.distributed_backend in DISTRIBUTED_BACKENDS, "distributed_backend",
               f"must be auto, nccl or gloo, got {self.distributed_backend!r}")
        _check(self.distributed_timeout_seconds > 0, "distributed_timeout_seconds", "must be > 0")
        _check(self.distributed_heartbeat_timeout_seconds > 0, "distributed_heartbeat_timeout_seconds",
               "must be > 0")
        _check(self.max_model_len == 0 or self.max_model_len >= 2, "max_model_len",
               "must be at least 2 (0 takes the model's own limit)")
        if self.backend is Backend.MODEL and not self.model:
            object.__setattr__(self, "model", default_model_dir())    # the embedded default model
        _check(self.dtype in DTYPES, "dtype",
               f"must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
               f"must be auto, cpu or cuda[:N], got {self.device!r}")
        _check(self.load_format in LOAD_FORMATS, "load_format",
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
    def add_arguments(cls, parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
        """Add one `--flag` per field (but `exclude`); each defaults to its environment variable."""
        add_arguments(parser, cls, ENV_PREFIX, "executor", exclude=exclude)

    @classmethod
    def from_sources(cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None,
                     config_file: ConfigFile | None = None) -> ExecutorConfig:
        """Flags win over environment, which wins over the config file, which wins over defaults."""
        return resolve(cls, ENV_PREFIX, args, os.environ if environ is None else environ, config_file)


def known_environment(environ: Mapping[str, str] | None = None) -> set[str]:
    """The environment variables the executor takes as known: its own, and every other PAGEDSERVE_* one in
    `environ`, which is the scheduler's (or the launcher's) to check."""
    others = {name for name in (os.environ if environ is None else environ) if not is_executor_variable(name)}
    return env_names(ExecutorConfig, ENV_PREFIX) | others


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise InvalidArgumentError(name, message)
