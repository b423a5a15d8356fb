"""Prefill over paged context through FlashAttention-2 varlen against the torch reference, on a CUDA device.

Each case is a batch of prompt chunks that follow cached tokens (none to 600 of them, across block
boundaries) in a cache whose every unused slot -- other blocks, other layers, the positions past each
sequence's length in its last block -- holds NaN, with shuffled block tables, so a gather that reads one
position too far fails loudly.
"""

from __future__ import annotations

import random
import zlib

import pytest

torch = pytest.importorskip("torch")

import paged_cache_helpers  # noqa: E402

from executor_svc.attention import (  # noqa: E402
    AttentionMetadata,
    paged_attention_reference,
)
from executor_svc.flash_prefill import (  # noqa: E402
    flash_available,
    flash_supported,
    gather_paged_kv,
    paged_flash_attention,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
NUM_LAYERS = 3
LAYER = 1                                 # a middle layer: its view of the cache is not contiguous
HEAD_CONFIGS = ((8, 8), (16, 4))          # (num_heads, num_kv_heads): MHA and GQA 4:1
HEAD_SIZES = (64, 128)
BLOCK_SIZES = (8, 16, 32)
DTYPES = (torch.float16, torch.bfloat16)
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def flash() -> None:
    """FA2 needs sm80+; on an older GPU there is nothing to test here."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("FlashAttention-2 needs an sm80+ GPU")
    assert flash_available(DEVICE), "torch.ops.aten._flash_attention_forward is missing on an sm80+ GPU"


def chunk_lengths(rng: random.Random, batch: int, block_size: int) -> tuple[list[int], list[int]]:
    """Cached tokens (0..600, block-size neighbours included) and new-chunk lengths (1..300) per sequence."""
    edge_cached = [0, 1, block_size - 1, block_size, block_size + 1, 5 * block_size, 600]
    edge_new = [1, 2, block_size - 1, block_size + 1, 300]
    cached = [rng.choice(edge_cached) if rng.random() < 0.4 else rng.randint(0, 600) for _ in range(batch)]
    new = [rng.choice(edge_new) if rng.random() < 0.4 else rng.randint(1, 300) for _ in range(batch)]
    return cached, new


def poisoned_cache(rng: random.Random, lengths: list[int], num_kv_heads: int, head_size: int,
                   block_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[list[int]]]:
    """paged_cache_helpers.poisoned_cache with this module's layer count and device."""
    return paged_cache_helpers.poisoned_cache(rng, lengths, NUM_LAYERS, num_kv_heads, head_size, block_size,
                                              dtype, DEVICE)


def prefill_cases() -> list[tuple]:
    """Every head config, head size, block size and dtype combination, each with a random batch."""
    rng = random.Random(2024)
    return [(rng.randint(1, 8), heads, head_size, block_size, dtype)
            for heads in HEAD_CONFIGS for head_size in HEAD_SIZES
            for block_size in BLOCK_SIZES for dtype in DTYPES]


def check_against_reference(rng: random.Random, cached: list[int], new: list[int], heads: tuple[int, int],
                            head_size: int, block_size: int, dtype: torch.dtype,
                            query_view: bool = False) -> None:
    """Run one batch through paged_flash_attention and compare it with the float32 reference."""
    num_heads, num_kv_heads = heads
    lengths = [c + n for c, n in zip(cached, new, strict=True)]
    cache, tables = poisoned_cache(rng, lengths, num_kv_heads, head_size, block_size, dtype)
    meta = AttentionMetadata.build(cached, new, tables, block_size, DEVICE)
    if query_view:
        # The query as a slice of a fused qkv projection: rows strided, head size contiguous.
        qkv = torch.randn(meta.num_tokens, (num_heads + 2 * num_kv_heads) * head_size, device=DEVICE)
        query = qkv.to(dtype)[:, :num_heads * head_size].view(meta.num_tokens, num_heads, head_size)
    else:
        query = torch.randn(meta.num_tokens, num_heads, head_size, device=DEVICE).to(dtype)   # [T, H, D]
    scale = head_size**-0.5
    assert flash_supported(query, cache)
    expected = paged_attention_reference(query.float(), cache[:, LAYER].float(), meta, scale)   # fp32
    out = paged_flash_attention(query, cache, LAYER, meta, scale)                             # [T, H, D]
    assert out.shape == query.shape and out.dtype == dtype
    assert not out.isnan().any(), "NaN in the output (a poisoned slot was read)"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol,
                               msg=lambda m: f"cached {cached}, new {new}: {m}")


@pytest.mark.parametrize("batch,heads,head_size,block_size,dtype", prefill_cases())
def test_prefill_over_paged_context_matches_reference(batch: int, heads: tuple[int, int], head_size: int,
                                                      block_size: int, dtype: torch.dtype) -> None:
    rng = random.Random(zlib.crc32(f"{batch} {heads} {head_size} {block_size} {dtype}".encode()))
    torch.manual_seed(rng.randrange(1 << 30))
    cached, new = chunk_lengths(rng, batch, block_size)
    check_against_reference(rng, cached, new, heads, head_size, block_size, dtype)


@pytest.mark.parametrize("cached,new", (
    ([0], [1]),                                  # one token, no context
    ([0, 0, 0], [5, 300, 17]),                   # plain prompts (no cached tokens)
    ([599, 16, 1], [1, 1, 1]),                   # one token each: the decode shape
    ([16, 32, 48], [16, 16, 16]),                # chunks that start and end on block boundaries
    ([2000, 7], [300, 3]),                       # a long context beside a short one
))
def test_prefill_edge_shapes(cached: list[int], new: list[int]) -> None:
    rng = random.Random(zlib.crc32(f"{cached} {new}".encode()))
    torch.manual_seed(rng.randrange(1 << 30))
    check_against_reference(rng, cached, new, (16, 4), 128, 16, torch.float16)


def test_prefill_with_strided_query_rows() -> None:
    rng = random.Random(3)
    torch.manual_seed(3)
    check_against_reference(rng, [37, 0, 250], [40, 9, 128], (16, 4), 64, 16, torch.bfloat16, query_view=True)


def test_gather_on_the_gpu_matches_the_cpu() -> None:
    """The device gather (index building included) equals the same gather on the host."""
    rng = random.Random(9)
    lengths = [1, 15, 16, 17, 333]
    cache, tables = poisoned_cache(rng, lengths, 4, 64, 16, torch.float16)
    meta = AttentionMetadata.build([0] * len(lengths), lengths, tables, 16, DEVICE)
    on_gpu = gather_paged_kv(cache, LAYER, meta.block_tables, meta.seq_lens_list, meta.seq_lens)
    on_cpu = gather_paged_kv(cache.cpu(), LAYER, meta.block_tables.cpu(), meta.seq_lens_list)
    for got, want in zip(on_gpu, on_cpu, strict=True):
        assert got.is_cuda
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_step_mixing_decodes_and_long_chunks_gathers_only_the_long_ones(
        dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long prompt chunks go through gather + FA2, every decode and short chunk through our kernel, and the
    step's output equals the reference; the gather copies only the long chunks' context."""
    from executor_svc import flash_prefill, ops
    from executor_svc.attention import ForwardContext

    assert ops.kernels_available(), "the CUDA kernels did not build (see the log)"
    rng = random.Random(11)
    torch.manual_seed(11)
    cached = [700, 0, 33, 1500, 64, 0, 250]
    new = [1, 400, 1, 1, 300, 17, 1]           # decodes, two long chunks, one short chunk
    num_heads, num_kv_heads, head_size, block_size = 16, 4, 128, 16
    lengths = [c + n for c, n in zip(cached, new, strict=True)]
    cache, tables = poisoned_cache(rng, lengths, num_kv_heads, head_size, block_size, dtype)
    meta = AttentionMetadata.build(cached, new, tables, block_size, DEVICE)
    query = torch.randn(meta.num_tokens, num_heads, head_size, device=DEVICE).to(dtype)     # [T, H, D]
    key = torch.randn(meta.num_tokens, num_kv_heads, head_size, device=DEVICE).to(dtype)   # [T, Hkv, D]
    value = torch.randn(meta.num_tokens, num_kv_heads, head_size, device=DEVICE).to(dtype)
    gathered: list[int] = []
    real_gather = flash_prefill.gather_paged_kv

    def counting_gather(*args, **kwargs):
        result = real_gather(*args, **kwargs)
        gathered.append(result[0].shape[0])
        return result

    monkeypatch.setattr(flash_prefill, "gather_paged_kv", counting_gather)
    out = ForwardContext(cache, meta).attend(LAYER, query, key, value, head_size**-0.5)
    # The reference reads the cache the kernel path just wrote this step's K/V into.
    expected = paged_attention_reference(query.float(), cache[:, LAYER].float(), meta, head_size**-0.5)
    assert not out.isnan().any(), "NaN in the output (a poisoned slot was read)"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    assert gathered == [lengths[1] + lengths[4]]          # the two long chunks' context, nothing else
