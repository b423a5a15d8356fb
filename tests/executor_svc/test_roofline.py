"""The decode roofline: which bytes a decode step must read, and the time they take at a bandwidth."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from executor_svc.kv_cache import CacheShape  # noqa: E402
from executor_svc.models.layers import ParallelLMHead, VocabParallelEmbedding  # noqa: E402
from executor_svc.roofline import DecodeRoofline, measure_copy_bandwidth, weight_bytes_read  # noqa: E402


class _TinyLM(torch.nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.embed = VocabParallelEmbedding(100, 8, 0, 1)                # 800 params, gathered per token
        self.positions = torch.nn.Embedding(16, 8)                        # learned positions: gathered too
        self.proj = torch.nn.Linear(8, 8, bias=False)                     # 64 params, read whole
        self.head = ParallelLMHead(100, 8, tp_rank=0, tp_size=1)          # 800 params, read whole
        if tie:
            self.head.tie_to(self.embed)


def test_untied_embeddings_are_not_read_but_the_head_is():
    model = _TinyLM(tie=False).to(torch.float16)
    assert weight_bytes_read(model) == (64 + 800) * 2


def test_a_table_tied_to_the_head_counts_once():
    model = _TinyLM(tie=True).to(torch.float16)
    assert weight_bytes_read(model) == (64 + 800) * 2


def test_roofline_seconds_reads_weights_once_and_each_context_token_once():
    shape = CacheShape(num_layers=2, num_kv_heads=4, block_size=16, head_size=8, dtype=torch.float16)
    roofline = DecodeRoofline.for_model(_TinyLM(tie=False).to(torch.float16), shape, bandwidth=1e6)
    kv_per_token = 2 * 2 * 4 * 8 * 2                                      # layers x K/V x heads x D x bytes
    assert roofline.kv_bytes_per_token == kv_per_token
    assert roofline.seconds([10, 30]) == pytest.approx((864 * 2 + 40 * kv_per_token) / 1e6)


def test_copy_bandwidth_is_positive_on_the_cpu():
    assert measure_copy_bandwidth(torch.device("cpu"), nbytes=1 << 20) > 0
