"""PagedServe's own CUDA kernels (csrc/), built once per process on first use.

The extension is compiled with `torch.utils.cpp_extension.load` into a cache directory
($PAGEDSERVE_KERNEL_CACHE, else ~/.cache/pagedserve/kernels), so only the first process after a source
change pays for the build. Without CUDA, or when the build fails, `kernels_available()` returns False
(the reason is logged once) and callers use the torch reference in attention.py.

Shapes: S sequences, T tokens, H query heads, Hkv kv heads, D head size, B block size.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("pagedserve.executor")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("bindings.cpp", "paged_attention.cu", "cache_kernels.cu")
EXTRA_CUDA_CFLAGS = ["-O3", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a",
                     "-gencode=arch=compute_80,code=sm_80"]
# What the decode kernel instantiates (csrc/paged_attention.cu); anything else uses the torch reference.
DECODE_HEAD_SIZES = (64, 80, 96, 128, 256)
DECODE_BLOCK_SIZES = (8, 16, 32)
DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False


def build_directory() -> Path:
    """Where the compiled extension is cached."""
    configured = os.environ.get("PAGEDSERVE_KERNEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "pagedserve" / "kernels"


def _load() -> ModuleType | None:
    """Build (or load the cached build of) the extension; None, with the reason logged, if impossible."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if not torch.cuda.is_available():
            log.info("CUDA kernels unavailable: no CUDA device; using the torch reference attention")
            return None
        try:
            from torch.utils.cpp_extension import load

            directory = build_directory()
            directory.mkdir(parents=True, exist_ok=True)
            _module = load(name="pagedserve_kernels", sources=[str(CSRC / s) for s in SOURCES],
                           extra_cuda_cflags=EXTRA_CUDA_CFLAGS, extra_include_paths=[str(CSRC)],
                           build_directory=str(directory), verbose=False)
        except Exception as exc:      # compiler missing, compile error, ABI mismatch: fall back, loudly
            log.warning("CUDA kernels unavailable: building csrc/ failed (%s: %s); using the torch "
                        "reference attention", type(exc).__name__, exc)
            _module = None
        return _module


def kernels_available() -> bool:
    """True when the extension is built and loaded (builds it on the first call when CUDA is present)."""
    return _load() is not None


def kernels_enabled() -> bool:
    """Whether attention should use the kernels: built, and opted in with PAGEDSERVE_CUDA_KERNELS=1.

    Opt-in for now: the decode kernel matches the reference on an H200 over the whole test grid, but
    the cache kernels and the end-to-end path still await their GPU run, and an error raised inside
    the extension crashed the process on the device image (under investigation).
    """
    return os.environ.get("PAGEDSERVE_CUDA_KERNELS", "0") == "1" and kernels_available()


def _kernels() -> ModuleType:
    module = _load()
    if module is None:
        raise RuntimeError("PagedServe CUDA kernels are not available (see the log for why)")
    return module


def decode_supported(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether the decode kernel has an instantiation for this dtype, head size and block size.

    query: [S, H, D]; kv_cache: [num_blocks, num_layers, 2, Hkv, B, D]
    """
    return (query.dtype in DECODE_DTYPES and kv_cache.dtype == query.dtype
            and kv_cache.shape[5] in DECODE_HEAD_SIZES and kv_cache.shape[4] in DECODE_BLOCK_SIZES)


def paged_attention_decode(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int, partition_mode: int = -1) -> torch.Tensor:
    """Decode attention of one query token per sequence over its paged context; writes and returns `out`.

    out:          [S, H, D], contiguous, the query's dtype
    query:        [S, H, D] (heads contiguous; rows may be strided)
    kv_cache:     [num_blocks, num_layers, 2, Hkv, B, D], contiguous, already holding this step's K/V
    block_tables: [S, max_blocks] int32 (converted if another integer dtype)
    seq_lens:     [S] int32 (converted if another integer dtype); every entry <= max_seq_len
    partition_mode: -1 chooses split-K by the kernel's heuristic, 0 never, 1 always (for tests).
    """
    if query.stride(2) != 1 or query.stride(1) != query.shape[2]:
        query = query.contiguous()
    _kernels().paged_attention_decode(out, query, kv_cache, layer, block_tables.to(torch.int32).contiguous(),
                                      seq_lens.to(torch.int32).contiguous(), float(scale), int(max_seq_len),
                                      int(partition_mode))
    return out


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                      slot_mapping: torch.Tensor) -> None:
    """Write new keys and values of `layer` into their slots (slot = block * B + offset; < 0 skips).

    key, value:   [T, Hkv, D] (last dim contiguous), cast to the cache's dtype if needed
    kv_cache:     [num_blocks, num_layers, 2, Hkv, B, D], contiguous
    slot_mapping: [T] int64
    """
    if key.stride(-1) != 1 or key.dtype != kv_cache.dtype:
        key = key.to(kv_cache.dtype).contiguous()
    if value.stride(-1) != 1 or value.dtype != kv_cache.dtype:
        value = value.to(kv_cache.dtype).contiguous()
    _kernels().reshape_and_cache(key, value, kv_cache, layer, slot_mapping.to(torch.int64).contiguous())


def copy_blocks(kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
    """Copy whole blocks (all layers, K and V) src -> dst in one launch, for copy-on-write.

    kv_cache: [num_blocks, num_layers, 2, Hkv, B, D], contiguous
    pairs:    [P, 2] int64 of (src, dst) block ids, on the cache's device
    """
    _kernels().copy_blocks(kv_cache, pairs.to(device=kv_cache.device, dtype=torch.int64).contiguous())
