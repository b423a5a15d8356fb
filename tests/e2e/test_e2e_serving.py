"""End to end on loopback: the embedded model served by real scheduler and executor processes."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
import transformers
from e2e_stack import MODEL_DIR
from grpc_health.v1 import health_pb2

from clients.client import PagedServeError
from scheduler_svc.tokenizer import load_tokenizer

PROMPTS = ["def fibonacci(n):", "import os\n\n\nclass Config:", "    for i in range(", "# Copyright"]


@pytest.fixture(scope="module")
def hf_model() -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL_DIR)


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_streamed_greedy_output_equals_hf_transformers(stack, hf_model, tokenizer):
    with stack.client() as client:
        for prompt in PROMPTS:
            events = list(client.stream(prompt, max_tokens=40, temperature=0.0, ignore_eos=True))
            token_ids = [t for e in events for c in e.choices for t in c.token_ids]
            text = "".join(c.text for e in events for c in e.choices)
            assert token_ids == hf_greedy(hf_model, tokenizer, prompt, 40), prompt
            assert text == tokenizer.decode(token_ids, skip_special_tokens=True)
            assert len(events) > 5                          # streamed, not sent at the end
            assert events[-1].usage is not None and events[-1].usage.completion_tokens == 40
            assert events[-1].choices[-1].finish_reason == "length"


def test_parallel_sampling_best_of_and_beam_search(stack):
    with stack.client() as client:
        sampled = client.generate("def parse(", n=3, max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
        again = client.generate("def parse(", n=3, max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
        assert [o.token_ids for o in sampled.outputs] == [o.token_ids for o in again.outputs]
        assert len({tuple(o.token_ids) for o in sampled.outputs}) > 1
        assert sampled.usage.completion_tokens == 36

        best = client.generate("def parse(", n=2, best_of=4, max_tokens=10, temperature=1.0, seed=5)
        assert [o.index for o in best.outputs] == [0, 1]
        assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob

        beams = client.generate("def parse(", n=2, beam_width=3, max_tokens=10)
        assert len(beams.outputs) == 2 and all(o.token_ids for o in beams.outputs)
        assert beams.outputs[0].text == client.generate("def parse(", n=2, beam_width=3,
                                                        max_tokens=10).outputs[0].text
        for mode in (True, "never"):
            ended = client.generate("def parse(", n=2, beam_width=3, max_tokens=10, early_stopping=mode)
            assert len(ended.outputs) == 2 and all(o.finish_reason for o in ended.outputs)


def test_stop_strings_are_trimmed_or_included(stack, tokenizer):
    with stack.client() as client:
        full = client.generate("def fibonacci(n):", max_tokens=40, temperature=0.0, ignore_eos=True).text
        stop = full[len(full) // 2:len(full) // 2 + 3]
        cut = client.generate("def fibonacci(n):", max_tokens=40, temperature=0.0, stop=[stop])
        assert cut.text == full[:full.index(stop)]
        assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
        kept = client.generate("def fibonacci(n):", max_tokens=40, temperature=0.0, stop=stop,
                               include_stop_str_in_output=True)
        assert kept.text == full[:full.index(stop) + len(stop)]
        assert kept.usage.completion_tokens < 40


def _wait_idle(stack, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (stack.metric("pagedserve_requests_running") == 0
                and stack.metric("pagedserve_gpu_kv_usage_ratio") == 0):
            return
        time.sleep(0.05)
    raise AssertionError("blocks still in use: " + str(stack.metric("pagedserve_gpu_kv_usage_ratio")))


def test_abort_and_client_cancel_free_every_block(stack):
    with stack.client() as client:
        stream = client.stream("class Parser:", max_tokens=600, ignore_eos=True, request_id="to-abort")
        next(stream), next(stream)
        assert stack.metric("pagedserve_gpu_kv_usage_ratio") > 0
        assert client.abort("to-abort") is True
        # Freed by the abort itself, before any further step.
        assert stack.metric("pagedserve_gpu_kv_usage_ratio") == 0
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "aborted"
        assert client.abort("to-abort") is False

        stream = client.stream("class Lexer:", max_tokens=600, ignore_eos=True)
        next(stream), next(stream)
        stream.close()                                  # the client cancels the call
        _wait_idle(stack, timeout=2.0)
    assert stack.metric('pagedserve_requests_finished_total{finish_reason="aborted"}') >= 2


BAD_REQUESTS = [
    ("", {}, "prompt"),
    ("x " * 3000, {}, "prompt"),
    ("hi", {"temperature": -1.0}, "temperature"),
    ("hi", {"top_p": 1.5}, "top_p"),
    ("hi", {"top_p": 0.0}, "top_p"),
    ("hi", {"n": 0}, "n"),
    ("hi", {"n": 3, "best_of": 2}, "best_of"),
    ("hi", {"max_tokens": 0}, "max_tokens"),
    ([1, 2, 999999], {}, "prompt.token_ids"),
    ([], {}, "prompt.token_ids"),
    ("hi", {"max_tokens": 2000}, "max_tokens"),
    ("hi", {"early_stopping": True}, "early_stopping"),      # without beam search
]


@pytest.mark.parametrize(("prompt", "sampling", "field"), BAD_REQUESTS)
def test_bad_inputs_are_invalid_argument_naming_the_field(stack, prompt, sampling, field):
    with stack.client() as client:
        with pytest.raises(PagedServeError) as err:
            client.generate(prompt, **sampling)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.message.startswith(field), err.value.message
        assert client.generate("def ok():", max_tokens=2).usage.completion_tokens >= 1


def test_oversized_messages_are_invalid_argument(stack):
    with stack.client() as client:
        with pytest.raises(PagedServeError) as err:
            client.generate("a" * (5 * 2**20), max_tokens=1)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "request" in err.value.message
        assert client.health() == "SERVING"


def test_model_info_and_health(stack):
    with stack.client() as client:
        info = client.model_info()
        assert info.block_size == 16 and info.world_size == 1
        assert info.kv_capacity_tokens == info.num_gpu_blocks * 16 and info.max_model_len == 1024
        assert client.health() == "SERVING"
    assert stack.health() == health_pb2.HealthCheckResponse.SERVING


def _run_concurrently(stack, requests: list[dict]) -> list[list[int]]:
    """Send every request at once from threads; returns each one's output tokens."""
    results: list[list[int] | None] = [None] * len(requests)
    errors: list[BaseException] = []

    def worker(i: int, request: dict) -> None:
        try:
            with stack.client() as client:
                results[i] = client.generate(**request).outputs[0].token_ids
        except BaseException as err:          # reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i, r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    return results  # type: ignore[return-value]


def _hundred_requests() -> list[dict]:
    return [{"prompt": f"def function_{i}(x):", "max_tokens": 24 + i % 17, "temperature": 0.8,
             "seed": i, "ignore_eos": True} for i in range(100)]


def _block_bytes(block_size: int = 16) -> int:
    """Bytes of one float32 KV block of the embedded model (every layer's keys and values)."""
    config = transformers.AutoConfig.from_pretrained(MODEL_DIR)
    head_size = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * block_size * head_size * 4


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_hundred_streams_under_preemption_match_a_large_pool(stack, start_stack, mode):
    requests = _hundred_requests()
    expected = _run_concurrently(stack, requests)
    # 48 blocks of 16 tokens: far less than 100 requests of ~40 tokens need at once.
    small = start_stack("--cpu-kv-cache-bytes", str(48 * _block_bytes()), "--preemption-mode", mode)
    assert small.metric("pagedserve_gpu_kv_blocks") == 48
    assert _run_concurrently(small, requests) == expected
    assert small.metric(f'pagedserve_preemptions_total{{mode="{mode}"}}') > 0
    assert small.metric("pagedserve_gpu_kv_usage_ratio") == 0


def test_server_reflection_lists_the_services(stack):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(stack.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"pagedserve.v1.GenerationService", "grpc.health.v1.Health"} <= services


def test_two_tensor_parallel_ranks_serve_what_one_rank_serves(stack, start_stack):
    from scheduler_svc.executor_client import ExecutorClient

    prompts = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n"]
    with stack.client() as client:
        expected = [client.generate(p, max_tokens=24, temperature=0.0, ignore_eos=True).outputs[0].token_ids
                    for p in prompts]
        one_rank_blocks = client.model_info().num_gpu_blocks
    two = start_stack("--executors", "2")
    with two.client() as client:
        info = client.model_info()
        got = [client.generate(p, max_tokens=24, temperature=0.0, ignore_eos=True).outputs[0].token_ids
               for p in prompts]
    assert info.world_size == 2
    assert got == expected
    # Each rank holds half of the KV heads, so the same cache budget holds twice the blocks.
    assert info.num_gpu_blocks == 2 * one_rank_blocks
    for rank in range(2):
        executor = ExecutorClient(two.stack.processes[f"executor-{rank}"].address)
        described = executor.describe()
        executor.close()
        assert (described.rank, described.world_size, described.num_kv_heads) == (rank, 2, 2)
    assert two.metric('pagedserve_executor_steps_total{rank="1"}', "executor-1") >= 24


def test_asyncio_client_streams_and_cancels(stack):
    import asyncio

    from clients.client import AsyncPagedServeClient

    async def scenario() -> tuple[str, str]:
        async with AsyncPagedServeClient(stack.target) as client:
            texts = []
            async for event in client.stream("def fibonacci(n):", max_tokens=12, temperature=0.0):
                texts.extend(c.text for c in event.choices)
            stream = client.stream("class Tree:", max_tokens=500, ignore_eos=True)
            await stream.__anext__()
            await stream.aclose()                     # cancels the call: the server aborts the request
            whole = await client.generate("def fibonacci(n):", max_tokens=12, temperature=0.0)
            return "".join(texts), whole.text

    streamed, whole = asyncio.run(scenario())
    assert streamed == whole
    _wait_idle(stack)


def test_prefix_caching_shares_a_system_prompt_and_changes_no_output(stack, start_stack):
    system = "# A helper module for parsing configuration files.\nimport os\nimport sys\n\n\n"
    prompts = [system + tail for tail in ("def load(path):", "class Parser:", "def main():")]

    def serve(running) -> list[tuple[list[int], int]]:
        with running.client() as client:
            results = []
            for prompt in prompts:       # one after another: each finds the system prompt cached
                out = client.generate(prompt, max_tokens=16, temperature=0.0, ignore_eos=True)
                results.append((out.outputs[0].token_ids, out.usage.cached_prompt_tokens))
            return results

    plain = serve(stack)
    cached = start_stack("--enable-prefix-caching")
    shared = serve(cached)
    assert [tokens for tokens, _ in shared] == [tokens for tokens, _ in plain]
    assert [n for _, n in plain] == [0, 0, 0]
    assert shared[0][1] == 0 and all(n >= 16 and n % 16 == 0 for _, n in shared[1:])   # whole blocks
    assert cached.metric("pagedserve_prefix_cache_hits_total") == sum(n for _, n in shared)
