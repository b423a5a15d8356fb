"""Decode CUDA graphs: which batches they cover (CPU), and on a GPU that a replayed step computes what
the eager forward pass computes, for batch sizes that need padding, while requests finish around it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from executor_svc.attention import AttentionMetadata, ForwardContext  # noqa: E402
from executor_svc.config import ExecutorConfig  # noqa: E402
from executor_svc.cuda_graphs import DecodeGraphs, capture_sizes, graphs_supported  # noqa: E402
from executor_svc.model_backend import ModelBackend  # noqa: E402
from scheduler_svc.config import SchedulerConfig  # noqa: E402
from scheduler_svc.sampling_params import SamplingParams  # noqa: E402
from scheduler_svc.scheduler import Scheduler  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_capture_sizes_cover_every_batch_up_to_the_maximum():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    sizes = capture_sizes(256)
    assert sizes[-1] == 256 and sizes == sorted(set(sizes))
    assert all(any(b >= s for b in sizes) for s in range(1, 257))
    assert max(b - s for s in range(1, 257) for b in [next(b for b in sizes if b >= s)]) < 16


def test_a_cpu_cache_runs_eagerly():
    assert not graphs_supported(torch.zeros(2, 1, 2, 1, 16, 64, dtype=torch.bfloat16))


def test_graphs_cover_decode_steps_within_their_limits():
    graphs = DecodeGraphs(lambda *a: None, torch.zeros(4, 1, 2, 1, 16, 64), 16, 128, 8)
    graphs.graphs[8] = object()          # as if captured; can_run reads only the metadata

    def meta(query_lens: list[int], start: int = 5) -> AttentionMetadata:
        return AttentionMetadata.build([start] * len(query_lens), query_lens, [[0] * 9] * len(query_lens), 16)

    assert graphs.can_run(meta([1, 1, 1]))
    assert not graphs.can_run(meta([1, 2]))               # a prefill chunk in the step
    assert not graphs.can_run(meta([1] * 9))              # more sequences than the largest graph
    assert not graphs.can_run(meta([1], start=128))       # longer than the captured context


def _write_model(directory):
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def _free_gpu_memory() -> Iterator[None]:
    """Each test sizes its KV cache from the free memory: return what the previous one held."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@needs_cuda
@pytest.mark.gpu
def test_replayed_decode_matches_the_eager_forward_pass(tmp_path):
    backend = ModelBackend(ExecutorConfig(model=str(_write_model(tmp_path)), load_format="dummy",
                                          device="cuda", dtype="bfloat16", cuda_graph_max_batch=8))
    cache = backend.init_cache(16, 0.2, 0, 1024)
    runner = backend.runner
    graphs = runner.graphs
    assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4, 8]
    checked: list[int] = []
    replay = graphs.run

    def replay_and_compare(input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        replayed = replay(input_ids, meta).clone()                                  # [S, hidden]
        eager = backend.model(input_ids, meta.positions, ForwardContext(runner.kv_cache.gpu, meta))
        scale = eager.float().abs().max().item()
        assert (replayed.float() - eager.float()).abs().max().item() <= 0.02 * scale, meta.num_seqs
        checked.append(meta.num_seqs)
        return replayed

    graphs.run = replay_and_compare
    scheduler = Scheduler(SchedulerConfig(block_size=16), cache.num_gpu_blocks, 0, 512, seed=0)
    # Seven requests of different lengths: the decode batch shrinks 7 -> 1 through padded sizes.
    for i in range(7):
        prompt = [3 + (i * 37 + j * 11) % 500 for j in range(5 + 9 * i)]
        scheduler.add_request(f"r{i}", prompt, SamplingParams(max_tokens=3 + 4 * i, ignore_eos=True,
                                                              temperature=0.0))
    while scheduler.has_unfinished:
        scheduler.process_result(backend.execute(scheduler.schedule()))
    assert {7, 6, 5, 3, 1} <= set(checked)
    graphs.run = replay             # drop the closure's hold on the backend so its memory can go


@needs_cuda
@pytest.mark.gpu
def test_graphs_can_be_turned_off(tmp_path):
    backend = ModelBackend(ExecutorConfig(model=str(_write_model(tmp_path)), load_format="dummy",
                                          device="cuda", dtype="bfloat16", cuda_graphs=False))
    backend.init_cache(16, 0.2, 0, 1024)
    assert backend.runner.graphs is None
