"""CUDA graphs of the decode forward pass: one per padded batch size, replayed instead of launching.

A decode step of a 7B model launches ~1,300 kernels; from Python that costs more CPU time (~30 ms on
an H100 host at batch 256) than the GPU needs to run them, so eager decode is launch-bound. A graph
replays the whole forward pass with one launch.

A graph bakes in every tensor address and kernel grid, so:
- inputs live in static buffers sized for the largest batch, and a step copies its metadata in;
- a batch of S sequences runs the graph of the smallest captured size B >= S; the B - S padding rows
  have context length 0 (the attention kernel gives them zeros) and slot -1 (reshape_and_cache
  skips them), so they touch no cache block; rows never mix in the model, so they change nothing else;
- attention is captured with max_seq_len = max_model_len, so the kernel's split-K grid covers any
  context; partitions past a sequence's end exit at once.
Only our CUDA attention kernel can be captured (the torch reference loops over host-side lengths),
so graphs serve fp16/bf16 models on CUDA with the kernels enabled; every other step runs eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from executor_svc import ops
from executor_svc.attention import AttentionMetadata, ForwardContext

log = logging.getLogger("pagedserve.executor")

# Padded batch sizes captured: small ones exactly (latency-bound decode), then every 16.
SMALL_BATCH_SIZES = (1, 2, 4, 8)
BATCH_SIZE_STEP = 16

Forward = Callable[[torch.Tensor, torch.Tensor, ForwardContext], torch.Tensor]


def capture_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes to capture for batches of up to `max_batch` sequences, ascending."""
    sizes = [s for s in SMALL_BATCH_SIZES if s < max_batch]
    sizes += range(BATCH_SIZE_STEP, max_batch, BATCH_SIZE_STEP)
    return sorted({*sizes, max_batch})


def graphs_supported(kv_cache: torch.Tensor) -> bool:
    """Whether decode steps over this cache can run as graphs: on CUDA with the kernels enabled and an
    instantiation for its dtype and head size.

    kv_cache: [num_blocks, num_layers, 2, Hkv, B, D]
    """
    return (kv_cache.is_cuda and ops.kernels_enabled() and kv_cache.dtype in ops.DTYPES
            and kv_cache.shape[5] in ops.HEAD_SIZES)


class DecodeGraphs:
    """Captured decode forward passes of one model over one KV cache."""

    def __init__(self, forward: Forward, kv_cache: torch.Tensor, block_size: int, max_model_len: int,
                 max_batch: int) -> None:
        self.forward = forward
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_batch = max_batch
        self.sizes = capture_sizes(max_batch)
        device = kv_cache.device
        width = -(-max_model_len // block_size)
        # Static inputs, sized for the largest graph; graph b reads their first b rows.
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)           # [Bmax]
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)           # [Bmax]
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)  # [Bmax]
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)            # [Bmax]
        self.block_tables = torch.zeros(max_batch, width, dtype=torch.int32, device=device)  # [Bmax, W]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}                                          # b -> [b, hidden]

    def can_run(self, meta: AttentionMetadata) -> bool:
        """Whether this step is a decode step a captured graph covers."""
        return (bool(self.graphs) and meta.is_decode_only and 0 < meta.num_seqs <= self.max_batch
                and meta.max_seq_len <= self.max_model_len)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, sharing one memory pool (as vLLM does)."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            context = ForwardContext(self.kv_cache, self._metadata(size))
            ids, positions = self.input_ids[:size], self.positions[:size]
            stream = torch.cuda.Stream(self.kv_cache.device)
            stream.wait_stream(torch.cuda.current_stream(self.kv_cache.device))
            with torch.cuda.stream(stream):          # warm-up off the capture: lazy init, autotuning
                self.forward(ids, positions, context)
            torch.cuda.current_stream(self.kv_cache.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.forward(ids, positions, context)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.kv_cache.device)
        log.info("captured %d decode CUDA graphs (batch 1 to %d) in %.1fs", len(self.sizes), self.max_batch,
                 time.perf_counter() - start)

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay the graph for this decode step; returns the hidden states [S, hidden] (a view of the
        graph's output, valid until the next replay)."""
        s = meta.num_seqs
        size = next(b for b in self.sizes if b >= s)
        width = meta.block_tables.shape[1]
        self.input_ids[:s].copy_(input_ids)
        self.positions[:s].copy_(meta.positions)
        self.slot_mapping[:s].copy_(meta.slot_mapping)
        self.seq_lens[:s].copy_(meta.seq_lens)
        self.block_tables[:s, :width].copy_(meta.block_tables)
        if size > s:                 # padding rows: no context and no cache write
            self.seq_lens[s:size].zero_()
            self.slot_mapping[s:size].fill_(-1)
        self.graphs[size].replay()
        return self.outputs[size][:s]

    def _metadata(self, size: int) -> AttentionMetadata:
        """Decode metadata over the static buffers' first `size` rows, for any context length."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], positions=self.positions[:size],
            query_start_loc=torch.arange(size + 1, dtype=torch.int64, device=self.kv_cache.device),
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size], block_size=self.block_size,
            max_query_len=1, max_seq_len=self.max_model_len, query_lens_list=(1,) * size,
            seq_lens_list=(self.max_model_len,) * size)
