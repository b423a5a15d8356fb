"""Our CUDA kernels (csrc/) against the torch reference of attention.py, on a CUDA device.

Attention (decode, and prefill over paged context) runs over shuffled block tables in a cache whose
every unused slot -- other blocks, other layers, the positions past each sequence's length in its last
block -- holds NaN, so a kernel that reads one position too far fails loudly. Both the single-pass and
the partitioned (split-K) variants are checked, forced and as the heuristic picks them.
"""

from __future__ import annotations

import random
import zlib

import pytest

torch = pytest.importorskip("torch")

import paged_cache_helpers  # noqa: E402

from executor_svc import ops  # noqa: E402
from executor_svc.attention import (  # noqa: E402
    AttentionMetadata,
    ForwardContext,
    paged_attention_reference,
    write_kv_reference,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
NUM_LAYERS = 3
LAYER = 1                                 # a middle layer: its view of the cache is not contiguous
# (num_heads, num_kv_heads): MHA, GQA 4:1 and 8:1, a group of 3 (rows do not fill the 16-row tile) and
# a group of 32 (two thread blocks per group).
HEAD_CONFIGS = ((8, 8), (8, 2), (32, 4), (12, 4), (64, 2))
HEAD_SIZES = (64, 80, 96, 128, 256)
BLOCK_SIZES = (8, 16, 32, 64)
DTYPES = (torch.float16, torch.bfloat16)
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    """Build the extension once for the module; a failed build fails every test here."""
    assert ops.kernels_available(), "the CUDA kernels did not build (see the log)"


def context_lengths(rng: random.Random, batch: int, block_size: int, long: bool) -> list[int]:
    """Lengths including 1, block-size neighbours and (when `long`) partitioned-path lengths."""
    edge = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5]
    lengths = [rng.choice(edge) if rng.random() < 0.4 else rng.randint(1, 700) for _ in range(batch)]
    if long:
        lengths[rng.randrange(batch)] = rng.randint(1100, 2600)   # > 2 partitions of 512
    return lengths


def poisoned_cache(rng: random.Random, lengths: list[int], num_kv_heads: int, head_size: int,
                   block_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[list[int]]]:
    """paged_cache_helpers.poisoned_cache with this module's layer count and device."""
    return paged_cache_helpers.poisoned_cache(rng, lengths, NUM_LAYERS, num_kv_heads, head_size, block_size,
                                              dtype, DEVICE)


def decode_cases() -> list[tuple]:
    """Every head size, block size, head config and dtype at least once, plus random mixes."""
    rng = random.Random(1234)
    cases = []
    for i, head_size in enumerate(HEAD_SIZES):
        for j, block_size in enumerate(BLOCK_SIZES):
            heads = HEAD_CONFIGS[(i + j) % len(HEAD_CONFIGS)]
            dtype = DTYPES[(i + j) % len(DTYPES)]
            cases.append((rng.randint(1, 33), heads, head_size, block_size, dtype, (i + j) % 3 == 0))
    for _ in range(12):
        cases.append((rng.randint(1, 33), rng.choice(HEAD_CONFIGS), rng.choice(HEAD_SIZES),
                      rng.choice(BLOCK_SIZES), rng.choice(DTYPES), rng.random() < 0.5))
    cases.append((1, (8, 2), 128, 16, torch.float16, False))
    cases.append((200, (32, 8), 128, 16, torch.bfloat16, True))   # a batch larger than one SM wave
    return cases


@pytest.mark.parametrize("batch,heads,head_size,block_size,dtype,long", decode_cases())
def test_decode_matches_reference(batch: int, heads: tuple[int, int], head_size: int, block_size: int,
                                  dtype: torch.dtype, long: bool) -> None:
    num_heads, num_kv_heads = heads
    rng = random.Random(zlib.crc32(f"{batch} {heads} {head_size} {block_size} {dtype} {long}".encode()))
    torch.manual_seed(rng.randrange(1 << 30))
    lengths = context_lengths(rng, batch, block_size, long)
    cache, tables = poisoned_cache(rng, lengths, num_kv_heads, head_size, block_size, dtype)
    # One query token per sequence, at the last position of its context.
    meta = AttentionMetadata.build([n - 1 for n in lengths], [1] * batch, tables, block_size, DEVICE)
    query = torch.randn(batch, num_heads, head_size, device=DEVICE).to(dtype)   # [S, H, D]
    scale = head_size**-0.5
    expected = paged_attention_reference(query.float(), cache[:, LAYER].float(), meta, scale)   # fp32
    tol = TOLERANCE[dtype]
    for mode in (-1, 0, 1):          # heuristic, single pass, partitioned
        out = torch.empty_like(query)
        ops.paged_attention_decode(out, query, cache, LAYER, meta.block_tables, meta.seq_lens, scale,
                                   meta.max_seq_len, partition_mode=mode)
        assert not out.isnan().any(), f"mode {mode}: NaN in the output (a poisoned slot was read)"
        torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol,
                                   msg=lambda m, mode=mode: f"partition_mode {mode}: {m}")


def test_decode_with_strided_query_rows() -> None:
    """The query as a slice of a fused qkv projection (rows strided) gives the same result."""
    rng = random.Random(5)
    lengths = [1, 17, 600]
    cache, tables = poisoned_cache(rng, lengths, 2, 128, 16, torch.float16)
    meta = AttentionMetadata.build([n - 1 for n in lengths], [1] * 3, tables, 16, DEVICE)
    qkv = torch.randn(3, 8 * 128 + 2 * 2 * 128, device=DEVICE, dtype=torch.float16)
    query = qkv[:, :8 * 128].view(3, 8, 128)
    expected = paged_attention_reference(query.float(), cache[:, LAYER].float(), meta, 128**-0.5)
    out = torch.empty(3, 8, 128, device=DEVICE, dtype=torch.float16)
    ops.paged_attention_decode(out, query, cache, LAYER, meta.block_tables, meta.seq_lens, 128**-0.5,
                               meta.max_seq_len)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


def prefill_cases() -> list[tuple]:
    """(cached, new) token counts per sequence with head configs, sizes, block sizes and dtypes."""
    rng = random.Random(77)
    cases = []
    for i, heads in enumerate(HEAD_CONFIGS):
        for j, head_size in enumerate((64, 128, 80)):
            block_size = BLOCK_SIZES[(i + j) % len(BLOCK_SIZES)]
            batch = rng.randint(1, 6)
            cached = [rng.choice([0, 0, 1, block_size, rng.randint(0, 900)]) for _ in range(batch)]
            new = [rng.choice([1, 2, 15, 16, 17, rng.randint(1, 300)]) for _ in range(batch)]
            cases.append((cached, new, heads, head_size, block_size, DTYPES[(i + j) % 2]))
    cases.append(([0], [1100], (8, 2), 128, 16, torch.bfloat16))             # a long prompt, nothing cached
    cases.append(([1500, 3, 0], [40, 1, 1], (32, 4), 128, 16, torch.float16))   # chunk + decodes, mixed
    cases.append(([0, 700], [513, 1], (8, 8), 256, 32, torch.bfloat16))
    return cases


@pytest.mark.parametrize("cached,new,heads,head_size,block_size,dtype", prefill_cases())
def test_prefill_over_paged_context_matches_reference(cached: list[int], new: list[int],
                                                      heads: tuple[int, int], head_size: int, block_size: int,
                                                      dtype: torch.dtype) -> None:
    num_heads, num_kv_heads = heads
    rng = random.Random(zlib.crc32(f"{cached} {new} {heads} {head_size} {block_size} {dtype}".encode()))
    torch.manual_seed(rng.randrange(1 << 30))
    lengths = [c + n for c, n in zip(cached, new, strict=True)]
    cache, tables = poisoned_cache(rng, lengths, num_kv_heads, head_size, block_size, dtype)
    meta = AttentionMetadata.build(cached, new, tables, block_size, DEVICE)
    query = torch.randn(meta.num_tokens, num_heads, head_size, device=DEVICE).to(dtype)   # [T, H, D]
    scale = head_size**-0.5
    expected = paged_attention_reference(query.float(), cache[:, LAYER].float(), meta, scale)
    tol = TOLERANCE[dtype]
    for mode in (-1, 0, 1):
        out = torch.full_like(query, float("nan"))
        ops.paged_attention(out, query, cache, LAYER, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            scale, meta.max_seq_len, meta.max_query_len, partition_mode=mode)
        assert not out.isnan().any(), f"mode {mode}: NaN in the output (unwritten row or poisoned slot read)"
        torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol,
                                   msg=lambda m, mode=mode: f"partition_mode {mode}: {m}")


def test_float32_cache_falls_back_to_the_reference(monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CUDA_KERNELS", "1")
    rng = random.Random(3)
    cache, tables = poisoned_cache(rng, [5, 40], 2, 64, 16, torch.float32)
    meta = AttentionMetadata.build([4, 39], [1, 1], tables, 16, DEVICE)
    query = torch.randn(2, 4, 64, device=DEVICE)
    key = torch.randn(2, 2, 64, device=DEVICE)
    monkeypatch.setattr(ops, "paged_attention", lambda *a, **k: pytest.fail("no fp32 kernel exists"))
    out = ForwardContext(cache, meta).attend(LAYER, query, key, key, 0.125)
    expected = paged_attention_reference(query, cache[:, LAYER], meta, 0.125)
    torch.testing.assert_close(out, expected)


_REJECTIONS = r"""
import torch
from executor_svc import ops

def rejects(fn, text):
    try:
        fn()
    except ValueError as err:
        assert text in str(err), str(err)
        print("rejected:", text, flush=True)
    else:
        raise AssertionError("accepted a call that must fail: " + text)

cache = torch.zeros(4, 1, 2, 2, 16, 48, device="cuda", dtype=torch.float16)
query = torch.zeros(1, 2, 48, device="cuda", dtype=torch.float16)
tables = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
lens = torch.ones(1, dtype=torch.int32, device="cuda")
out = torch.empty_like(query)
rejects(lambda: ops.paged_attention_decode(out, query, cache, 0, tables, lens, 1.0, 1),
        "unsupported head size 48")
cache = torch.zeros(4, 1, 2, 2, 16, 64, device="cuda", dtype=torch.float32)
query = torch.zeros(1, 2, 64, device="cuda", dtype=torch.float32)
out = torch.empty_like(query)
rejects(lambda: ops.paged_attention_decode(out, query, cache, 0, tables, lens, 1.0, 1),
        "unsupported dtype")
cache, query, out = cache.half(), query.half(), out.half()
rejects(lambda: ops.paged_attention_decode(out, query.cpu(), cache, 0, tables, lens, 1.0, 1),
        "must be a CUDA tensor")
rejects(lambda: ops.paged_attention_decode(out, query, cache, 3, tables, lens, 1.0, 1),
        "layer 3 out of range")
rejects(lambda: ops._launch("paged_attention", out, query, cache, 0, tables, lens.long(), None, 1.0, 1, 1,
                            -1),
        "seq_lens must be a contiguous int32")
starts = torch.zeros(5, device="cuda")
rejects(lambda: ops.paged_attention(out, query, cache, 0, tables, lens, starts, 1.0, 1, 1),
        "query_start_loc must be a contiguous int32")
rejects(lambda: ops.paged_attention_decode(out, query, cache, 0, tables, lens, 1.0, 100),
        "does not fit block_tables")
# The process goes on working after the rejections.
ops.paged_attention_decode(out, query, cache, 0, tables, lens, 1.0, 1)
torch.cuda.synchronize()
print("all rejected cleanly", flush=True)
"""


def test_decode_rejects_unsupported_shapes_clearly() -> None:
    # In a child interpreter, so that an extension whose exceptions crash the process (as a build with a
    # mismatched toolchain can) fails this test instead of ending the whole run.
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _REJECTIONS], capture_output=True,
                          text=True, timeout=600, cwd=repo, env=env)
    assert done.returncode == 0, f"exit code {done.returncode}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("head_size,block_size", ((64, 16), (80, 8), (16, 4)))
def test_reshape_and_cache_matches_reference(dtype: torch.dtype, head_size: int, block_size: int) -> None:
    torch.manual_seed(0)
    num_blocks, num_kv_heads, tokens = 20, 4, 37
    shape = (num_blocks, NUM_LAYERS, 2, num_kv_heads, block_size, head_size)
    cache = torch.randn(shape, device=DEVICE).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    slots[::5] = -1                                                        # padding tokens: skipped
    # K and V as slices of one fused projection, so their rows are strided.
    kv = torch.randn(tokens, 2, num_kv_heads, head_size, device=DEVICE).to(dtype)
    key, value = kv[:, 0], kv[:, 1]
    expected = cache.clone()
    keep = slots >= 0
    write_kv_reference(expected[:, LAYER], key[keep], value[keep], slots[keep])
    ops.reshape_and_cache(key, value, cache, LAYER, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("dtype", (torch.float16, torch.float32))
def test_copy_blocks_copies_whole_blocks(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cache = torch.randn(16, NUM_LAYERS, 2, 2, 8, 64, device=DEVICE).to(dtype)
    pairs = torch.tensor([[0, 5], [3, 9], [3, 10], [15, 1]], device=DEVICE)
    expected = cache.clone()
    expected[pairs[:, 1]] = expected[pairs[:, 0]]
    ops.copy_blocks(cache, pairs)
    assert torch.equal(cache, expected)
    ops.copy_blocks(cache, torch.empty(0, 2, dtype=torch.int64, device=DEVICE))   # no pairs: no launch
    assert torch.equal(cache, expected)


# ---------------------------------------------------------------------------------------------------------
# End to end: a tiny Llama (head size 64, GQA) greedy-decodes in fp16 through the kernels -- prefill and
# decode -- exactly as through the torch reference attention. (tests/executor_svc/test_gpu_generation.py
# compares every model family with HF transformers.)

MAX_NEW = 12
E2E_BLOCK_SIZE = 16


def greedy_tokens(model, prompts: list[list[int]], num_blocks: int = 32) -> list[list[int]]:
    """MAX_NEW greedy tokens per prompt, all prompts batched, on a NaN-poisoned cache."""
    cache = torch.full((num_blocks, model.num_layers, 2, model.num_kv_heads, E2E_BLOCK_SIZE, model.head_size),
                       float("nan"), device=DEVICE, dtype=torch.float16)
    free = random.Random(0).sample(range(num_blocks), num_blocks)
    tables: list[list[int]] = [[] for _ in prompts]
    lengths = [0] * len(prompts)
    generated: list[list[int]] = [[] for _ in prompts]
    new = [list(p) for p in prompts]                 # the first step prefills every prompt at once
    for _ in range(MAX_NEW):
        for i, n in enumerate(new):
            while len(tables[i]) * E2E_BLOCK_SIZE < lengths[i] + len(n):
                tables[i].append(free.pop())
        meta = AttentionMetadata.build(lengths, [len(n) for n in new], tables, E2E_BLOCK_SIZE, DEVICE)
        ids = torch.tensor([t for n in new for t in n], device=DEVICE)
        with torch.no_grad():
            hidden = model(ids, meta.positions, ForwardContext(cache, meta))
            logits = model.compute_logits(hidden)                              # [T, vocab]
        ends = [sum(len(n) for n in new[:i + 1]) - 1 for i in range(len(new))]
        picked = logits[ends].argmax(-1).tolist()
        for i, n in enumerate(new):
            lengths[i] += len(n)
            generated[i].append(picked[i])
        new = [[t] for t in picked]
    return generated


def test_tiny_llama_greedy_through_the_kernels_equals_the_reference(tmp_path, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    from tiny_models import LLAMA_COMMON, build_hf_model

    from executor_svc.model_loader import load_model

    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=64, tie_word_embeddings=False, **LLAMA_COMMON)
    config.architectures = ["LlamaForCausalLM"]
    build_hf_model(config, seed=0).save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, torch.float16, DEVICE)
    prompts = [[5], [3 + (7 * j) % 120 for j in range(7)], [3 + (5 * j + 2) % 120 for j in range(21)]]

    monkeypatch.setenv("PAGEDSERVE_CUDA_KERNELS", "0")
    expected = greedy_tokens(model, prompts)

    calls = {"prefill": 0, "decode": 0}
    real = ops.paged_attention

    def counting(*args, **kwargs):
        calls["decode" if args[6] is None else "prefill"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "paged_attention", counting)
    monkeypatch.setenv("PAGEDSERVE_CUDA_KERNELS", "1")
    assert greedy_tokens(model, prompts) == expected
    assert calls == {"prefill": model.num_layers, "decode": (MAX_NEW - 1) * model.num_layers}
