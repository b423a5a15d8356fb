"""The memory roofline of a decode step: how fast it could run if it only had to read its bytes once.

A decode step reads every weight once (the batch shares them) and every context token's K/V once per
layer; at small batch that traffic, not arithmetic, bounds it. The executor measures its device's copy
bandwidth at start-up and reports, per decode-only step, the time those bytes take at that bandwidth.
That time over the measured forward time is the step's roofline efficiency (DESIGN.md §7).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from executor_svc.kv_cache import CacheShape
from executor_svc.models.layers import ParallelLMHead, VocabParallelEmbedding

# Bytes copied per bandwidth sample: large enough to stream past every cache level.
CUDA_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = 1 << 27
COPY_REPEATS = 5


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes per second a device-to-device copy moves, reads plus writes (the best of a few)."""
    if nbytes is None:
        nbytes = CUDA_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)                              # warm-up: first-touch page faults, lazy init
    best = float("inf")
    for _ in range(COPY_REPEATS):
        _synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def weight_bytes_read(model: nn.Module) -> int:
    """Bytes of parameters a decode step reads: all of them but untied input embeddings.

    An input embedding is a gather of a few rows, not a read of the table; a table tied to the LM
    head is read whole by the head, and `parameters()` counts a shared tensor once.
    """
    head_weights = {id(m.weight) for m in model.modules() if isinstance(m, ParallelLMHead)}
    gathered = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                   if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
                   and id(m.weight) not in head_weights)
    embeddings = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                     if isinstance(m, nn.Embedding))     # learned positions (OPT, GPT-2): gathered too
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - gathered - embeddings


@dataclass(frozen=True, slots=True)
class DecodeRoofline:
    """Bytes a decode step must read, and the bandwidth to read them at."""

    weight_bytes: int
    kv_bytes_per_token: int         # K and V of one token over all layers
    bandwidth: float                # bytes/s, from measure_copy_bandwidth

    @classmethod
    def for_model(cls, model: nn.Module, shape: CacheShape, bandwidth: float) -> DecodeRoofline:
        """The roofline of `model` with a KV cache of `shape`."""
        return cls(weight_bytes_read(model), shape.block_bytes // shape.block_size, bandwidth)

    def seconds(self, context_lens: Sequence[int]) -> float:
        """Time to read the weights and the K/V of sequences with these context lengths (new token
        included) once at `bandwidth`."""
        return (self.weight_bytes + self.kv_bytes_per_token * sum(context_lens)) / self.bandwidth


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
