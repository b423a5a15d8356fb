"""The KV block pools of one rank: the device pool the model attends over and the CPU swap pool.

Both use the block-major layout of attention.py, [num_blocks, num_layers, 2, num_kv_heads,
block_size, head_size], so a block is one contiguous chunk in either pool. Swaps are coalesced: runs
of consecutive source and target ids become one slice copy each, and a scattered set of blocks is
gathered into one staging buffer so it crosses PCIe as a single transfer rather than one per block
(the paper's swap overhead came from many small transfers). Copy-on-write pairs run as one batched
gather and scatter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from executor_svc import ops

# More runs than this and a swap gathers through one staging buffer instead of copying run by run.
MAX_RUN_COPIES = 4


@dataclass(frozen=True, slots=True)
class CacheShape:
    """What one block holds: every layer's keys and values for `block_size` tokens."""

    num_layers: int
    num_kv_heads: int
    block_size: int
    head_size: int
    dtype: torch.dtype

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        """[num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]."""
        return (num_blocks, self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_size)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers."""
        elements = self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_size
        return elements * torch.empty((), dtype=self.dtype).element_size()


def coalesce(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Sort (src, dst) pairs and merge consecutive ones into (src, dst, length) runs."""
    runs: list[tuple[int, int, int]] = []
    for src, dst in sorted(pairs):
        if runs and src == runs[-1][0] + runs[-1][2] and dst == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((src, dst, 1))
    return runs


class KVCache:
    """The device pool (`gpu`, on the model's device) and the pinned CPU swap pool (`cpu`)."""

    def __init__(self, shape: CacheShape, num_gpu_blocks: int, num_cpu_blocks: int,
                 device: torch.device) -> None:
        self.shape = shape
        self.device = device
        # Uninitialised on purpose: attention reads only slots a sequence has written, and on the CPU
        # untouched pages cost nothing, so a large swap space allocates in milliseconds.
        self.gpu = torch.empty(shape.pool_shape(num_gpu_blocks), dtype=shape.dtype, device=device)
        # Pinned host memory lets device<->host copies run asynchronously at full PCIe speed.
        pin = device.type == "cuda"
        self.cpu = torch.empty(shape.pool_shape(num_cpu_blocks), dtype=shape.dtype, device="cpu",
                               pin_memory=pin)
        self.transfers = 0      # copy operations issued by swaps, for tests and metrics

    @property
    def num_gpu_blocks(self) -> int:
        """Blocks in the device pool."""
        return int(self.gpu.shape[0])

    @property
    def num_cpu_blocks(self) -> int:
        """Blocks in the swap pool."""
        return int(self.cpu.shape[0])

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (device block, cpu block) pairs to the swap pool."""
        self._transfer(self.gpu, self.cpu, pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (cpu block, device block) pairs back to the device pool."""
        self._transfer(self.cpu, self.gpu, pairs)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: device block src -> dst for every pair, as one batched gather and scatter.

        A target is always a freshly allocated block, never the source of another pair in the step.
        """
        if not pairs:
            return
        index = torch.tensor(pairs, dtype=torch.int64, device=self.device)   # [P, 2]
        if self.gpu.is_cuda and ops.kernels_enabled():
            ops.copy_blocks(self.gpu, index)        # one launch, 16-byte vectorised block copies
            return
        self.gpu.index_copy_(0, index[:, 1], self.gpu.index_select(0, index[:, 0]))

    def _transfer(self, src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        runs = coalesce(pairs)
        # Host-to-device copies from pinned memory run asynchronously on the compute stream, which
        # orders them before the forward pass. Device-to-host copies block: host code may reuse the
        # swap pool right after.
        non_blocking = dst.device.type != "cpu"
        if len(runs) <= MAX_RUN_COPIES:
            for s, d, n in runs:
                dst[d:d + n].copy_(src[s:s + n], non_blocking=non_blocking)
            self.transfers += len(runs)
            return
        src_index = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=src.device)
        dst_index = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=dst.device)
        staged = src.index_select(0, src_index)           # [P, ...] contiguous on the source device
        dst.index_copy_(0, dst_index, staged.to(dst.device, non_blocking=non_blocking))
        self.transfers += 1
