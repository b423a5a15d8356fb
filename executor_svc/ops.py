"""PagedServe's own CUDA kernels (csrc/), built once per process on first use.

The extension is compiled with `torch.utils.cpp_extension.load` into a cache directory
(the executor's --kernel-cache, $PAGEDSERVE_KERNEL_CACHE, else ~/.cache/pagedserve/kernels), so only the
first process after a source change pays for the build. Without CUDA, or when the build fails,
`kernels_available()` returns False (the reason is logged once) and callers use the torch reference in
attention.py.

Shapes: S sequences, T tokens, H query heads, Hkv kv heads, D head size, B block size; R sampling rows,
K token ids.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

from pagedserve.settings import parse_bool

log = logging.getLogger("pagedserve.executor")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("bindings.cpp", "paged_attention.cu", "cache_kernels.cu", "layer_kernels.cu",
           "sampling_kernels.cu")
EXTRA_CUDA_CFLAGS = ["-O3", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a",
                     "-gencode=arch=compute_80,code=sm_80"]
# What the attention kernel instantiates (csrc/paged_attention.cu): any block size; anything else uses the
# torch reference.
HEAD_SIZES = (64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False


@dataclasses.dataclass(frozen=True, slots=True)
class KernelSettings:
    """Which kernels run and where they are built: the executor's cuda_kernels, fused_layers and
    kernel_cache settings (PAGEDSERVE_CUDA_KERNELS, PAGEDSERVE_FUSED_LAYERS, PAGEDSERVE_KERNEL_CACHE)."""

    cuda_kernels: bool = True
    fused_layers: bool = True
    kernel_cache: str = ""

    @classmethod
    def from_environment(cls) -> KernelSettings:
        """The settings the environment variables give, parsed as the executor's config parses them."""
        return cls(parse_bool(os.environ.get("PAGEDSERVE_CUDA_KERNELS", "1")),
                   parse_bool(os.environ.get("PAGEDSERVE_FUSED_LAYERS", "1")),
                   os.environ.get("PAGEDSERVE_KERNEL_CACHE", ""))


_configured: KernelSettings | None = None


def configure(kernel_settings: KernelSettings) -> None:
    """Fix the settings for this process; `pagedserve-executor` calls it once at start, from its config.

    Until then (tests, benchmarks, tools that drive the model in process) they are read from the
    environment variables at each call, so a test can switch them.
    """
    global _configured
    _configured = kernel_settings


def settings() -> KernelSettings:
    """The settings in force: the configured ones, else the environment's."""
    return _configured if _configured is not None else KernelSettings.from_environment()


def build_directory() -> Path:
    """Where the compiled extension is cached."""
    configured = settings().kernel_cache
    return Path(configured) if configured else Path.home() / ".cache" / "pagedserve" / "kernels"


def _load() -> ModuleType | None:
    """Build (or load the cached build of) the extension; None, with the reason logged, if impossible."""
    global _module, _tried
    if _tried:                          # every layer of every eager forward pass asks: no lock once settled
        return _module
    with _lock:
        if _tried:
            return _module
        _module = _build()
        _tried = True
        return _module


def _build() -> ModuleType | None:
    """Compile or load the extension; None, with the reason logged, when it cannot be had."""
    if not torch.cuda.is_available():
        log.info("CUDA kernels unavailable: no CUDA device; using the torch reference attention")
        return None
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        return load(name="pagedserve_kernels", sources=[str(CSRC / s) for s in SOURCES],
                    extra_cuda_cflags=EXTRA_CUDA_CFLAGS, extra_include_paths=[str(CSRC)],
                    build_directory=str(directory), verbose=False)
    except Exception as exc:      # compiler missing, compile error, ABI mismatch: fall back, loudly
        log.warning("CUDA kernels unavailable: building csrc/ failed (%s: %s); using the torch "
                    "reference attention", type(exc).__name__, exc)
        return None


def kernels_available() -> bool:
    """True when the extension is built and loaded (builds it on the first call when CUDA is present)."""
    return _load() is not None


def kernels_enabled() -> bool:
    """Whether attention and the cache should use the kernels: built (on a CUDA device), and not turned
    off with cuda_kernels (PAGEDSERVE_CUDA_KERNELS=0, which selects the torch reference, for comparisons)."""
    return settings().cuda_kernels and kernels_available()


def fused_layers_enabled(x: torch.Tensor) -> bool:
    """Whether the fused layer kernels (RMSNorm, SwiGLU, rotary) serve activation `x`: fp16/bf16 on CUDA
    with the kernels enabled, unless fused_layers is off (PAGEDSERVE_FUSED_LAYERS=0) and keeps the torch
    reference layers (for A/B measurements; attention is unaffected)."""
    return x.is_cuda and x.dtype in DTYPES and settings().fused_layers and kernels_enabled()


def describe_attention(device: torch.device) -> str:
    """One line for the executor's start-up log: which attention implementation serves `device`.

    On CUDA this builds (or loads the cached build of) the extension, so the first request does not.
    """
    if device.type != "cuda":
        return f"torch reference PagedAttention (no CUDA kernels on {device.type})"
    if not settings().cuda_kernels:
        return "torch reference PagedAttention (PAGEDSERVE_CUDA_KERNELS=0)"
    if not kernels_available():
        return "torch reference PagedAttention (the CUDA kernels did not build; see the warning above)"
    return "PagedServe CUDA kernels (fp16/bf16; other dtypes use the torch reference)"


def _launch(function: str, *args: object) -> None:
    """Call the extension's `function`; its argument problems come back as text and raise here.

    The extension reports a bad argument instead of throwing (see csrc/bindings.cpp for why).
    """
    problem = getattr(_kernels(), function)(*args)
    if problem:
        raise ValueError(problem)


def _kernels() -> ModuleType:
    module = _load()
    if module is None:
        raise RuntimeError("PagedServe CUDA kernels are not available (see the log for why)")
    return module


def attention_supported(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether the attention kernel has an instantiation for this dtype and head size.

    query: [T, H, D]; kv_cache: [num_blocks, num_layers, 2, Hkv, B, D]
    """
    return (query.dtype in DTYPES and kv_cache.dtype == query.dtype and kv_cache.shape[5] in HEAD_SIZES
            and query.shape[1] % kv_cache.shape[3] == 0)


def _aligned_rows(query: torch.Tensor) -> torch.Tensor:
    """`query` itself when the kernel can read it (contiguous heads, 16-byte rows), else a contiguous copy."""
    aligned = query.data_ptr() % 16 == 0 and query.stride(0) % 8 == 0
    if query.stride(2) != 1 or query.stride(1) != query.shape[2] or not aligned:
        return query.contiguous()
    return query


def paged_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor | None,
                    scale: float, max_seq_len: int, max_query_len: int,
                    partition_mode: int = -1) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context; writes and returns `out`.

    Query token j of sequence i sits at position seq_lens[i] - q_len_i + j and sees keys up to there.

    out:             [T, H, D], contiguous, the query's dtype
    query:           [T, H, D] (heads contiguous; rows may be strided)
    kv_cache:        [num_blocks, num_layers, 2, Hkv, B, D], contiguous, already holding this step's K/V
    block_tables:    [S, max_blocks] int32 (converted if another integer dtype)
    seq_lens:        [S] int32 (converted): context length including the new tokens, each <= max_seq_len
    query_start_loc: [S + 1] int32 (converted) token offsets of the sequences in `query`; None for decode
                     (one token per sequence, T == S)
    partition_mode:  -1 chooses split-K by the kernel's heuristic, 0 never, 1 always, >= 2 that many
                     partitions (tests and sweeps).
    """
    starts = None if query_start_loc is None else query_start_loc.to(torch.int32).contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    _launch("paged_attention", out, _aligned_rows(query), kv_cache, layer, tables, lens, starts, float(scale),
            int(max_seq_len), int(max_query_len), int(partition_mode))
    return out


def paged_attention_decode(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int, partition_mode: int = -1) -> torch.Tensor:
    """Decode attention: one query token per sequence (`paged_attention` with T == S).

    out, query: [S, H, D]; the other arguments as for `paged_attention`.
    """
    return paged_attention(out, query, kv_cache, layer, block_tables, seq_lens, None, scale, max_seq_len, 1,
                           partition_mode)


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
    _launch("reshape_and_cache", key, value, kv_cache, layer, slot_mapping.to(torch.int64).contiguous())


def copy_blocks(kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
    """Copy whole blocks (all layers, K and V) src -> dst in one launch, for copy-on-write.

    kv_cache: [num_blocks, num_layers, 2, Hkv, B, D], contiguous
    pairs:    [P, 2] int64 of (src, dst) block ids, on the cache's device
    """
    _launch("copy_blocks", kv_cache, pairs.to(device=kv_cache.device, dtype=torch.int64).contiguous())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row, scaled by `weight`, rounded as the torch reference rounds (layers.RMSNorm).

    x: [N, H] (last dim contiguous); weight: [H]; returns [N, H] in x's dtype
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch("rms_norm", out, x, weight, float(eps))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """residual <- x + residual in place, then return RMSNorm(residual) * weight (one pass).

    x: [N, H] (last dim contiguous); residual: [N, H] contiguous, updated; weight: [H]; returns [N, H]
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch("fused_add_rms_norm", out, x, residual, weight, float(eps))
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up for x = [gate | up].

    x: [N, 2 * I] (last dim contiguous); returns [N, I] in x's dtype
    """
    out = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype, device=x.device)
    _launch("silu_and_mul", out, x)
    return out


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin: torch.Tensor,
                     rotary_dim: int) -> None:
    """Rotate query and key in place by their positions, neox style (layers.RotaryEmbedding).

    positions: [N] int64; query: [N, H, D] and key: [N, Hkv, D], heads contiguous (rows may be strided);
    cos_sin:   [P, rotary_dim] float32, cos of the rotary_dim / 2 frequencies then sin, per position
    """
    _launch("rotary_embedding", positions, query, key, cos_sin, int(rotary_dim))


def race_uniform_noise(ids: torch.Tensor, key_lo: torch.Tensor, key_hi: torch.Tensor) -> torch.Tensor:
    """The sampler's race noise, bit for bit `sampler.uniform_noise`, in one launch: [R, K] float32.

    ids:    [R, K] or [1, K] int64 token ids in [0, 2**32) (one row is shared by every row)
    key_lo: [R] int64, the low 32 bits of each row's draw key
    key_hi: [R] int64, the high 32 bits
    """
    ids = ids if ids.stride(-1) == 1 else ids.contiguous()
    out = torch.empty(key_lo.shape[0], ids.shape[1], dtype=torch.float32, device=key_lo.device)
    _launch("race_uniform_noise", out, ids, key_lo.contiguous(), key_hi.contiguous())
    return out

