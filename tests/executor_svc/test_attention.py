"""The reference PagedAttention against dense attention, over random shapes and scattered blocks."""

import random

import pytest

torch = pytest.importorskip("torch")

from executor_svc.attention import (  # noqa: E402
    AttentionMetadata,
    ForwardContext,
    gather_context,
    split_by_chunk_length,
    write_kv_reference,
)


def dense_attention(q, k, v, context_len, scale):
    """q [Lq, H, D] at the last Lq positions of k, v [L, Hkv, D]; causal."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1).transpose(0, 1).float()
    v = v.repeat_interleave(group, 1).transpose(0, 1).float()
    q_len = q.shape[0]
    mask = torch.ones(q_len, context_len, dtype=torch.bool).tril(diagonal=context_len - q_len)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1).float(), k, v, attn_mask=mask,
                                                           scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("case", range(40))
def test_paged_attention_matches_dense_attention(case):
    rng = random.Random(case)
    torch.manual_seed(case)
    block_size = rng.choice([1, 4, 8, 16, 32])
    num_kv_heads = rng.choice([1, 2, 4])
    num_heads = num_kv_heads * rng.choice([1, 2, 4])
    head_size = rng.choice([8, 16, 64])
    dtype = rng.choice([torch.float32, torch.bfloat16])
    num_layers, layer = 2, rng.randrange(2)
    seqs = []
    for _ in range(rng.randint(1, 5)):
        cached = rng.choice([0, rng.randint(1, 70)])
        new = 1 if cached and rng.random() < 0.5 else rng.randint(1, 40)
        seqs.append((cached, new))
    need = [-(-(c + n) // block_size) for c, n in seqs]
    spare = rng.randint(0, 8)
    num_blocks = sum(need) + spare
    # Unused slots hold NaN: reading anything outside a sequence's context would poison its output.
    cache = torch.full((num_blocks, num_layers, 2, num_kv_heads, block_size, head_size), float("nan"),
                       dtype=dtype)
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, it = [], iter(ids)
    for n in need:
        tables.append([next(it) for _ in range(n)])
    keys = [torch.randn(c + n, num_kv_heads, head_size).to(dtype) for c, n in seqs]
    values = [torch.randn(c + n, num_kv_heads, head_size).to(dtype) for c, n in seqs]
    for (cached, _), k, v, table in zip(seqs, keys, values, tables, strict=True):
        if cached:
            prior = AttentionMetadata.build([0], [cached], [table], block_size)
            write_kv_reference(cache[:, layer], k[:cached], v[:cached], prior.slot_mapping)
    meta = AttentionMetadata.build([c for c, _ in seqs], [n for _, n in seqs], tables, block_size)
    query = torch.randn(meta.num_tokens, num_heads, head_size).to(dtype)
    new_k = torch.cat([k[c:] for (c, _), k in zip(seqs, keys, strict=True)])
    new_v = torch.cat([v[c:] for (c, _), v in zip(seqs, values, strict=True)])
    scale = head_size**-0.5
    out = ForwardContext(cache, meta).attend(layer, query, new_k, new_v, scale)
    assert out.dtype == dtype and not out.isnan().any()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    start = 0
    for (cached, new), k, v in zip(seqs, keys, values, strict=True):
        expected = dense_attention(query[start:start + new], k, v, cached + new, scale)
        torch.testing.assert_close(out[start:start + new].float(), expected, atol=tolerance, rtol=tolerance)
        start += new
    # Every new key landed in its slot and reads back through the table.
    for i, ((cached, new), k) in enumerate(zip(seqs, keys, strict=True)):
        got_k, _ = gather_context(cache[:, layer], meta.block_tables[i], cached + new)
        assert torch.equal(got_k, k)


def test_metadata_layout():
    meta = AttentionMetadata.build([0, 5], [3, 1], [[7, 2], [4, 9]], block_size=4)
    assert meta.slot_mapping.tolist() == [28, 29, 30, 9 * 4 + 1]
    assert meta.positions.tolist() == [0, 1, 2, 5]
    assert meta.query_start_loc.tolist() == [0, 3, 4]
    assert meta.seq_lens.tolist() == [3, 6]
    assert meta.block_tables.tolist() == [[7, 2], [4, 9]]
    assert (meta.max_query_len, meta.max_seq_len, meta.is_decode_only) == (3, 6, False)


def test_split_by_chunk_length():
    assert split_by_chunk_length([1, 300, 1, 255, 256], 256) == ([1, 4], [0, 2, 3])
    assert split_by_chunk_length([], 256) == ([], [])


@pytest.mark.parametrize("seqs", [[1, 3], [0], [0, 1, 2, 3], [2]])
def test_select_is_the_subset_built_on_its_own(seqs):
    starts, lens = [5, 0, 40, 17], [1, 300, 1, 20]
    tables = [[3, 9], list(range(10, 29)), [1, 2, 4], [30, 31, 32]]
    meta = AttentionMetadata.build(starts, lens, tables, 16)
    sub, token_index = meta.select(seqs)
    own = AttentionMetadata.build([starts[i] for i in seqs], [lens[i] for i in seqs],
                                  [tables[i] for i in seqs], 16)
    for name in ("slot_mapping", "positions", "query_start_loc", "seq_lens"):
        assert torch.equal(getattr(sub, name), getattr(own, name)), name
    # The subset keeps the step's table width (rows padded with 0); the blocks it holds are the same.
    assert torch.equal(sub.block_tables[:, :own.block_tables.shape[1]], own.block_tables)
    assert (sub.max_query_len, sub.max_seq_len, sub.query_lens_list, sub.seq_lens_list) == (
        own.max_query_len, own.max_seq_len, own.query_lens_list, own.seq_lens_list)
    offsets = [0, 1, 301, 302, 322]
    expected_rows = [r for i in seqs for r in range(offsets[i], offsets[i + 1])]
    assert token_index.tolist() == expected_rows
    assert torch.equal(meta.positions[token_index], sub.positions)
