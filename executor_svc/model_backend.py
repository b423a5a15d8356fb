"""The model backend: a Hugging Face model directory run by our own model code and paged KV cache.

On CUDA the KV cache takes what a worst-case step leaves of `gpu_memory_utilization` x total memory:
the backend runs a forward pass of `max_num_batched_tokens` tokens (plus logits for the widest
sampling batch), reads the peak memory, and divides the rest into blocks. On CPU the cache is a
fixed budget, `cpu_kv_cache_bytes`, since the host's memory is shared with everything else: nothing
there is sized by a profiling pass, so none runs (on the 2-core CPU it was a third of the time to the
first token of `pagedserve serve`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from executor_svc import ops
from executor_svc.attention import AttentionMetadata, ForwardContext
from executor_svc.backend import CacheDescription, ModelDescription
from executor_svc.config import ExecutorConfig
from executor_svc.cuda_graphs import DecodeGraphs, graphs_supported
from executor_svc.distributed import join_group, stop_watchdog
from executor_svc.kv_cache import CacheShape, KVCache
from executor_svc.model_loader import dtype_from_name, eos_token_ids, load_model
from executor_svc.models import architecture_of
from executor_svc.roofline import DecodeRoofline, measure_copy_bandwidth
from executor_svc.runner import ModelRunner, RunningStep
from pagedserve.contract.plan import StepPlan, StepResult
from pagedserve.model_source import resolve_model

log = logging.getLogger("pagedserve.executor")

# Sampling rows a profiling pass computes logits for: the widest batch the scheduler runs by default.
PROFILE_SAMPLING_ROWS = 256


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """`auto` is a CUDA device when there is one, else the CPU.

    Rank r of a tensor-parallel group takes GPU r modulo the GPUs it sees: ranks on one host spread
    over its GPUs, and a rank that sees a single GPU (a container given one) takes that one.
    """
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", rank % torch.cuda.device_count())
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_from_name(name)


class ModelBackend:
    """ExecutorBackend that runs a model with the paged KV cache."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        # First, so a model that is not there fails before any device or peer is touched. A repo id
        # resolves to its hub-cache snapshot exactly as the scheduler resolves the tokenizer.
        self.model_dir = resolve_model(config.model, config.revision)
        self.device = resolve_device(config.device, config.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)      # NCCL and the kernels use the current device
        self.dtype = resolve_dtype(config.dtype, self.device)
        # Every rank seeds alike, so unseeded sampling draws the same tokens on all of them.
        torch.manual_seed(config.seed)
        self.tp = join_group(config.rank, config.world_size, config.distributed_init_address,
                             config.distributed_backend, self.device, config.distributed_timeout_seconds,
                             config.distributed_heartbeat_timeout_seconds)
        start = time.perf_counter()
        self.model, self.hf_config = load_model(self.model_dir, self.dtype, self.device, config.load_format,
                                                config.max_model_len or None, self.tp)
        self.model.eval()
        log.info("loaded %s (%s, %s weights) on %s as %s in %.1fs", config.model,
                 architecture_of(self.hf_config), config.load_format, self.device,
                 str(self.dtype).removeprefix("torch."), time.perf_counter() - start)
        log.info("attention: %s", ops.describe_attention(self.device))
        self.runner: ModelRunner | None = None
        self._copy_bandwidth: float | None = None

    def describe(self) -> ModelDescription:
        """The loaded model."""
        m = self.model
        name = self.config.served_model_name or Path(self.config.model).name
        return ModelDescription(model_name=name, model_path=str(self.model_dir.resolve()),
                                architecture=architecture_of(self.hf_config),
                                dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
                                rank=self.config.rank, world_size=self.config.world_size,
                                max_model_len=m.max_model_len, vocab_size=m.vocab_size,
                                eos_token_ids=tuple(eos_token_ids(self.hf_config)), num_layers=m.num_layers,
                                num_kv_heads=m.num_kv_heads, head_size=m.head_size)

    @property
    def cache_ready(self) -> bool:
        """Whether init_cache has run."""
        return self.runner is not None

    def init_cache(self, block_size: int, gpu_memory_utilization: float, swap_space_bytes: int,
                   max_num_batched_tokens: int = 0) -> CacheDescription:
        """Allocate as many blocks as fit: on CUDA what a profiled worst-case step leaves, on the CPU the
        fixed `cpu_kv_cache_bytes` budget."""
        start = time.perf_counter()
        self.runner = None                      # free the old cache before measuring
        bandwidth = self._bandwidth()           # before profiling, which then frees its buffers
        shape = CacheShape(self.model.num_layers, self.model.num_kv_heads, block_size, self.model.head_size,
                           self.dtype)
        max_tokens = max_num_batched_tokens or self.model.max_model_len
        if self.device.type == "cuda":
            num_gpu_blocks = self._cuda_blocks(shape, gpu_memory_utilization, max_tokens)
        else:
            num_gpu_blocks = self.config.cpu_kv_cache_bytes // shape.block_bytes
        if num_gpu_blocks < 1:
            raise RuntimeError("no memory is left for the KV cache after a worst-case step: raise "
                               "gpu_memory_utilization, or lower max_num_batched_tokens or max_model_len")
        num_cpu_blocks = swap_space_bytes // shape.block_bytes
        roofline = DecodeRoofline.for_model(self.model, shape, bandwidth)
        cache = KVCache(shape, num_gpu_blocks, num_cpu_blocks, self.device)
        self.runner = ModelRunner(self.model, cache, roofline=roofline, graphs=self._capture_graphs(cache))
        elapsed = time.perf_counter() - start
        return CacheDescription(num_gpu_blocks, num_cpu_blocks, shape.block_bytes, elapsed)

    def _capture_graphs(self, cache: KVCache) -> DecodeGraphs | None:
        """Decode CUDA graphs over the new cache, when enabled and supported; None runs eagerly."""
        if not self.config.cuda_graphs or not graphs_supported(cache.gpu):
            return None
        graphs = DecodeGraphs(self.model, cache.gpu, cache.shape.block_size, self.model.max_model_len,
                              self.config.cuda_graph_max_batch)
        try:
            graphs.capture()
        except RuntimeError as err:     # serving eagerly is slower, not wrong: keep going, say why
            log.warning("decode CUDA graphs disabled, capture failed: %s", err)
            return None
        return graphs

    def _bandwidth(self) -> float:
        """The device's copy bandwidth, measured on first use (before the cache takes the memory)."""
        if self._copy_bandwidth is None:
            self._copy_bandwidth = measure_copy_bandwidth(self.device)
            log.info("copy bandwidth %.0f GB/s (the decode roofline's reference)", self._copy_bandwidth / 1e9)
        return self._copy_bandwidth

    def _cuda_blocks(self, shape: CacheShape, utilization: float, max_tokens: int) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free_before, total = torch.cuda.mem_get_info(self.device)
        allocated_before = torch.cuda.memory_allocated(self.device)
        self._profile_step(shape, max_tokens)
        torch.cuda.synchronize(self.device)
        # Memory held outside this process's torch allocator (other processes, CUDA context) counts too.
        others = total - free_before - allocated_before
        peak = others + torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        log.info("profiled a %d-token step: peak %.2f GiB of %.2f GiB", max_tokens, peak / 2**30,
                 total / 2**30)
        return int((total * utilization - peak) // shape.block_bytes)

    @torch.inference_mode()
    def _profile_step(self, shape: CacheShape, max_tokens: int) -> None:
        """One forward pass of `max_tokens` prompt tokens, in sequences of at most max_model_len."""
        max_len = self.model.max_model_len
        full, rest = divmod(max_tokens, max_len)
        lengths = [max_len] * full + ([rest] if rest else [])
        blocks_per_seq = [-(-n // shape.block_size) for n in lengths]
        cache = KVCache(shape, sum(blocks_per_seq), 0, self.device)
        tables, next_block = [], 0
        for n in blocks_per_seq:
            tables.append(list(range(next_block, next_block + n)))
            next_block += n
        meta = AttentionMetadata.build([0] * len(lengths), lengths, tables, shape.block_size, self.device)
        input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, meta.positions, ForwardContext(cache.gpu, meta))
        rows = min(PROFILE_SAMPLING_ROWS, max_tokens)
        self.model.compute_logits(hidden[:rows]).softmax(-1)

    def reset_sequences(self) -> None:
        """Forget every sequence; the cache stays."""
        if self.runner is not None:
            self.runner.reset()

    def begin_shutdown(self) -> None:
        """Stop watching the tensor-parallel peers, which are being stopped too (a peer that goes first
        must not look like a failure that ends this process with GROUP_LOST_EXIT_CODE)."""
        stop_watchdog()

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one plan."""
        assert self.runner is not None, "init_cache first"
        return self.runner.execute(plan)

    def launch(self, plan: StepPlan) -> RunningStep:
        """Check one plan and queue its work; the step before may still be computing (runner.launch)."""
        assert self.runner is not None, "init_cache first"
        return self.runner.launch(plan)
