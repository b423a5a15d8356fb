"""Our CUDA kernels (csrc/) against the torch reference of attention.py, on a CUDA device.

Decode attention runs over shuffled block tables in a cache whose every unused slot -- other blocks,
other layers, the positions past each sequence's length in its last block -- holds NaN, so a kernel
that reads one position too far fails loudly. Both the single-pass and the partitioned (split-K)
variants are checked, forced and as the heuristic picks them.
"""

from __future__ import annotations

import random
import zlib

import pytest

torch = pytest.importorskip("torch")

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
HEAD_CONFIGS = ((8, 8), (8, 2), (32, 4))  # (num_heads, num_kv_heads): MHA and two GQA groupings
HEAD_SIZES = (64, 80, 96, 128, 256)
BLOCK_SIZES = (8, 16, 32)
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
    """A NaN-filled cache with random K/V at exactly the slots of each sequence's context.

    returns kv_cache [num_blocks, NUM_LAYERS, 2, Hkv, B, D] and each sequence's shuffled block table
    """
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + 7                       # a few blocks nobody owns
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, start = [], 0
    for n in needed:
        tables.append(ids[start:start + n])
        start += n
    cache = torch.full((num_blocks, NUM_LAYERS, 2, num_kv_heads, block_size, head_size), float("nan"),
                       dtype=dtype, device=DEVICE)
    meta = AttentionMetadata.build([0] * len(lengths), lengths, tables, block_size, DEVICE)
    for layer in range(NUM_LAYERS):
        k = torch.randn(meta.num_tokens, num_kv_heads, head_size, device=DEVICE)
        v = torch.randn(meta.num_tokens, num_kv_heads, head_size, device=DEVICE)
        write_kv_reference(cache[:, layer], k, v, meta.slot_mapping)
    return cache, tables


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
    cases.append((1, (32, 4), 128, 16, torch.float32, True))    # fp32 (the end-to-end test's dtype)
    cases.append((1, (8, 2), 128, 16, torch.float16, False))
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


_REJECTIONS = r"""
import torch
from executor_svc import ops

def rejects(fn, text):
    try:
        fn()
    except RuntimeError as err:
        assert text in str(err), str(err)
    else:
        raise AssertionError("accepted a call that must fail: " + text)

cache = torch.zeros(4, 1, 2, 2, 16, 48, device="cuda", dtype=torch.float16)
query = torch.zeros(1, 2, 48, device="cuda", dtype=torch.float16)
tables = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
lens = torch.ones(1, dtype=torch.int32, device="cuda")
out = torch.empty_like(query)
rejects(lambda: ops.paged_attention_decode(out, query, cache, 0, tables, lens, 1.0, 1),
        "unsupported head size 48")
cache = torch.zeros(4, 1, 2, 2, 4, 64, device="cuda", dtype=torch.float16)
query = torch.zeros(1, 2, 64, device="cuda", dtype=torch.float16)
out = torch.empty_like(query)
rejects(lambda: ops.paged_attention_decode(out, query, cache, 0, tables, lens, 1.0, 1),
        "unsupported block size 4")
rejects(lambda: ops.paged_attention_decode(out, query.cpu(), cache, 0, tables, lens, 1.0, 1),
        "must be a CUDA tensor")
rejects(lambda: ops.paged_attention_decode(out, query, cache, 3, tables, lens, 1.0, 1),
        "layer 3 out of range")
rejects(lambda: ops._kernels().paged_attention_decode(out, query, cache, 0, tables, lens.long(), 1.0, 1, -1),
        "seq_lens must be a contiguous int32")
"""


def test_decode_rejects_unsupported_shapes_clearly() -> None:
    # In a child interpreter: on the H200 image an exception leaving the extension has crashed the
    # process (a known open bug), which must show up as this test failing, not as a dead test run.
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _REJECTIONS], capture_output=True, text=True, timeout=600,
                          cwd=repo, env=env)
    assert done.returncode == 0, f"exit code {done.returncode}: {done.stderr[-3000:]}"


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
# End to end: a tiny Llama (head size 64, GQA) greedy-decodes on CUDA through the kernels like HF on CPU.

MAX_NEW = 12
E2E_BLOCK_SIZE = 16


def test_tiny_llama_greedy_matches_hf_through_the_kernels(tmp_path, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    from tiny_models import LLAMA_COMMON, build_hf_model

    from executor_svc.model_loader import load_model

    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=64, tie_word_embeddings=False, **LLAMA_COMMON)
    config.architectures = ["LlamaForCausalLM"]
    hf = build_hf_model(config, seed=0)
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, torch.float32, DEVICE)

    calls = {"decode": 0}
    real_decode = ops.paged_attention_decode

    def counting_decode(*args, **kwargs):
        calls["decode"] += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(ops, "paged_attention_decode", counting_decode)
    monkeypatch.setenv("PAGEDSERVE_CUDA_KERNELS", "1")

    prompts = [[5], [3 + (7 * j) % 120 for j in range(7)], [3 + (5 * j + 2) % 120 for j in range(21)]]
    expected = []
    hf.generation_config.eos_token_id = None
    gen = transformers.GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for p in prompts:
            expected.append(hf.generate(torch.tensor([p]), generation_config=gen)[0, len(p):].tolist())

    num_blocks = 32
    cache = torch.full((num_blocks, model.num_layers, 2, model.num_kv_heads, E2E_BLOCK_SIZE, model.head_size),
                       float("nan"), device=DEVICE)
    free = random.Random(0).sample(range(num_blocks), num_blocks)
    tables: list[list[int]] = [[] for _ in prompts]
    lengths = [0] * len(prompts)
    tokens = [list(p) for p in prompts]
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
            tokens[i].append(picked[i])
        new = [[t] for t in picked]
    generated = [t[len(p):] for t, p in zip(tokens, prompts, strict=True)]
    assert generated == expected
    assert calls["decode"] == (MAX_NEW - 1) * model.num_layers, "decode steps did not use the kernel"
