"""A Llama-2-7B-shaped model with dummy weights, served on the GPU by the whole stack.

`pagedserve serve`'s own configuration path (`build_configs`, `stack_specs`, `LocalStack`) starts a
scheduler and one executor on CUDA (`--load-format dummy --device cuda --dtype bfloat16`, our kernels
on), then 32 concurrent streams of a few hundred tokens each run to completion. Every request must
finish with exactly the tokens it asked for, and both processes' Prometheus metrics must add up: tokens
computed, blocks in use during and after the run, no preemption (the KV pool holds every request at
once), no failed step. A decode step of a 7B model over 32 sequences takes tens of milliseconds with
our attention kernel and hundreds with the torch reference (483 ms at 64 sequences on an H200,
benchmarks/results/executor_gpu_h200_llama2_7b.md), so the executor's mean forward time also shows
that the kernels ran.

The tokenizer is the embedded model's (4,096 tokens) while the config keeps Llama-2's 32,000-token
vocabulary, so that the embedding and LM head have their real sizes. That works because the
scheduler bounds prompt token ids by the model's vocabulary, not the tokenizer's, and the tokenizer
decodes an id it lacks as nothing: outputs stream their token ids whole, and their text only for ids
below 4,096. Prompts are token ids, so their lengths are exact.

The same harness runs on the CPU with a tiny model of the same vocabulary, so that everything but the
GPU (the directory, the mismatched tokenizer, the environment, the metrics) is checked in every run.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from e2e_stack import MODEL_DIR, REPO, RunningStack, require_model
from prometheus_client.parser import text_string_to_metric_families

from clients.cli import build_parser
from clients.serve_command import build_configs
from clients.stack import LocalStack, stack_specs

# As benchmarks/device/executor_gpu_start.py: Llama-2-7B's shape (6.7B parameters, 13.5 GB in bfloat16).
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096}
# Small enough to serve on the CPU in seconds; the same vocabulary as the 7B shape.
TINY_32K = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 1024}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# A cold kernel cache compiles csrc/ when the executor first attends (during InitCache's profiling).
START_TIMEOUT = 900.0
METRICS_POLL_SECONDS = 0.1
# A stream that takes longer has stalled (the GPU run serves every stream in well under a minute).
STREAM_TIMEOUT = 300.0
# Mean forward time per step that only our attention kernel reaches for a 7B model at batch 32.
KERNEL_FORWARD_SECONDS = 0.1


def write_model_dir(directory: Path, shape: dict[str, int]) -> Path:
    """A model directory of a Llama of `shape`: config.json, and the embedded model's tokenizer files."""
    config = transformers.LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                                      rms_norm_eps=1e-5)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copyfile(MODEL_DIR / name, directory / name)
    return directory


def stack_environment() -> dict[str, str]:
    """The environment of the stack's processes: ours, with the repository and its generated API package
    first on PYTHONPATH and our CUDA kernels on.

    The caller's PYTHONPATH is kept, and protos/ added, because the GPU machines run from the source
    tree without an install, with extra packages on PYTHONPATH.
    """
    path = os.pathsep.join(filter(None, [str(REPO), str(REPO / "protos"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, PAGEDSERVE_CUDA_KERNELS="1")


class ServingStack(RunningStack):
    """RunningStack started with `stack_environment()`, a longer start-up allowance, and no executor
    restarts (an executor that dies must fail the test, not be replaced quietly)."""

    def __init__(self, *flags: str) -> None:       # RunningStack's start, in another environment
        args = build_parser().parse_args(["serve", "--port", "0", "--metrics-port", "0", *flags])
        self.scheduler_config, self.executor_configs = build_configs(args)
        self.stack = LocalStack(stack_specs(self.scheduler_config, self.executor_configs),
                                restart_executors=False, base_environment=stack_environment())
        self.stack.start()
        try:
            self.target = self.stack.wait_listening("scheduler", timeout=START_TIMEOUT)
            self._wait_ready()
        except BaseException:
            self.stack.stop()
            raise

    def _wait_ready(self) -> None:
        """Wait until the scheduler serves; fail at once when any process exits first (the scheduler
        would otherwise wait out its own start-up timeout for an executor that died)."""
        deadline = time.monotonic() + START_TIMEOUT
        while not self.stack.processes["scheduler"].ready.wait(0.5):
            for name, managed in self.stack.processes.items():
                code = managed.proc.poll()
                if code is not None:
                    raise RuntimeError(f"{name} exited with code {code} during start-up; its log is above")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stack was not serving after {START_TIMEOUT:.0f} s")

    def samples(self, name: str = "scheduler") -> dict[tuple[str, frozenset], float]:
        """Every sample of one process's /metrics page, by (sample name, its labels)."""
        address = self.stack.processes[name].metrics_address
        assert address is not None, f"{name} reported no metrics address"
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        # Without model_name (on every series): one process serves one model.
        return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "model_name")): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """One sample's value (KeyError if the page lacks it)."""
    return samples[(name, frozenset(labels.items()))]


# ---------------------------------------------------------------------------------------------------------
# The workload and what each stream returned


@dataclass(frozen=True)
class Request:
    """One stream to run: token-id prompt, tokens wanted and sampling settings."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    seed: int


@dataclass
class StreamResult:
    """What one stream returned."""

    token_ids: list[int]
    events: int
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    num_preemptions: int


def workload(count: int, prompt_lengths: tuple[int, int], max_tokens: tuple[int, int],
             vocab_size: int) -> list[Request]:
    """`count` requests with prompt lengths and output lengths spread over the given [low, high) ranges;
    every other one samples (temperature 0.8, its own seed), the rest are greedy."""
    requests = []
    for i in range(count):
        length = prompt_lengths[0] + (i * 97) % (prompt_lengths[1] - prompt_lengths[0])
        prompt = [3 + (i * 131 + j * 7) % (vocab_size - 3) for j in range(length)]
        tokens = max_tokens[0] + (i * 37) % (max_tokens[1] - max_tokens[0])
        requests.append(Request(prompt, tokens, temperature=0.8 if i % 2 else 0.0, seed=i))
    return requests


def stream_one(stack: ServingStack, request: Request) -> StreamResult:
    """Stream one request to its end through the client library."""
    token_ids, events, finish_reason, usage = [], 0, None, None
    with stack.client(timeout=STREAM_TIMEOUT) as client:
        for event in client.stream(request.prompt, max_tokens=request.max_tokens, ignore_eos=True,
                                   temperature=request.temperature, seed=request.seed):
            events += 1
            for choice in event.choices:
                token_ids.extend(choice.token_ids)
                finish_reason = choice.finish_reason or finish_reason
            usage = event.usage or usage
    assert usage is not None, "the stream ended without usage"
    return StreamResult(token_ids, events, finish_reason, usage.prompt_tokens, usage.completion_tokens,
                        usage.num_preemptions)


class KvUsageWatch:
    """Polls the scheduler's KV usage and running requests while a workload runs; keeps the peaks."""

    def __init__(self, stack: ServingStack) -> None:
        self.stack = stack
        self.peak_usage = 0.0
        self.peak_running = 0.0
        self.error: BaseException | None = None       # what stopped the polling, if anything did
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="kv-usage-watch", daemon=True)

    def __enter__(self) -> KvUsageWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join(timeout=30)

    def _poll(self) -> None:
        try:
            while not self._done.wait(METRICS_POLL_SECONDS):
                samples = self.stack.samples()
                self.peak_usage = max(self.peak_usage, value(samples, "pagedserve_gpu_kv_usage_ratio"))
                self.peak_running = max(self.peak_running, value(samples, "pagedserve_requests_running"))
        except BaseException as err:          # reported by check_metrics
            self.error = err


def serve_workload(stack: ServingStack, requests: list[Request]) -> tuple[list[StreamResult], KvUsageWatch]:
    """Every request at once, each on its own thread and channel, while watching KV usage."""
    with KvUsageWatch(stack) as watch, ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = list(pool.map(lambda request: stream_one(stack, request), requests))
    return results, watch


# ---------------------------------------------------------------------------------------------------------
# Checks


def check_streams(requests: list[Request], results: list[StreamResult], vocab_size: int) -> None:
    """Every stream ran to its length limit, streamed, and was never preempted."""
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        assert len(result.token_ids) == result.completion_tokens == request.max_tokens, f"request {i}"
        assert result.finish_reason == "length", f"request {i}: {result.finish_reason}"
        assert result.prompt_tokens == len(request.prompt), f"request {i}"
        assert result.num_preemptions == 0, f"request {i}"
        assert result.events > 1, f"request {i} arrived in one message"
        assert all(0 <= t < vocab_size for t in result.token_ids), f"request {i}"


def check_metrics(stack: ServingStack, requests: list[Request], watch: KvUsageWatch) -> float:
    """Both processes' counters add up to the workload, and the KV pool was used and is empty again.

    returns the executor's mean forward seconds per step
    """
    scheduler, executor = stack.samples(), stack.samples("executor-0")
    prompt_tokens = sum(len(r.prompt) for r in requests)
    output_tokens = sum(r.max_tokens for r in requests)
    blocks = value(scheduler, "pagedserve_gpu_kv_blocks")
    block_size = value(scheduler, "pagedserve_kv_block_size_tokens")
    # The pool holds the whole workload at once, so nothing may be preempted.
    assert blocks * block_size >= prompt_tokens + output_tokens + len(requests) * block_size
    assert value(executor, "pagedserve_executor_gpu_kv_blocks", rank="0") == blocks
    for mode in ("swap", "recompute"):
        assert value(scheduler, "pagedserve_preemptions_total", mode=mode) == 0
    assert value(scheduler, "pagedserve_requests_finished_total", finish_reason="length") == len(requests)
    assert value(scheduler, "pagedserve_prompt_tokens_total") == prompt_tokens
    assert value(scheduler, "pagedserve_generation_tokens_total") == output_tokens
    assert value(scheduler, "pagedserve_gpu_kv_usage_ratio") == 0              # every block freed
    assert watch.error is None, f"polling the scheduler's metrics failed: {watch.error!r}"
    assert 0 < watch.peak_usage <= 1 and watch.peak_running > 1, (watch.peak_usage, watch.peak_running)
    # Each request computes its prompt, then one token per step for all but its last output token.
    computed = prompt_tokens + output_tokens - len(requests)
    assert value(executor, "pagedserve_executor_tokens_total", rank="0") == computed
    assert value(executor, "pagedserve_executor_step_errors_total", rank="0") == 0
    for direction in ("out", "in"):
        assert value(executor, "pagedserve_executor_blocks_swapped_total", rank="0", direction=direction) == 0
    steps = value(executor, "pagedserve_executor_forward_seconds_count", rank="0")
    return value(executor, "pagedserve_executor_forward_seconds_sum", rank="0") / steps


# ---------------------------------------------------------------------------------------------------------
# Tests


def test_model_dir_has_the_7b_shape_and_the_embedded_tokenizer(tmp_path) -> None:
    require_model()
    directory = write_model_dir(tmp_path, LLAMA2_7B)
    config = transformers.AutoConfig.from_pretrained(directory)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (4096, 32, 32)
    assert config.vocab_size == 32000 and config.architectures == ["LlamaForCausalLM"]
    assert all((directory / name).read_bytes() == (MODEL_DIR / name).read_bytes() for name in TOKENIZER_FILES)


@pytest.mark.timeout(300)
def test_serving_harness_on_the_cpu(tmp_path) -> None:
    """The GPU test's path with a tiny model of the same vocabulary on the CPU, in seconds."""
    require_model()
    directory = write_model_dir(tmp_path, TINY_32K)
    stack = ServingStack("--model", str(directory), "--load-format", "dummy", "--device", "cpu",
                         "--dtype", "float32", "--cpu-kv-cache-bytes", str(1 << 26),
                         "--swap-space-bytes", str(1 << 26))
    try:
        requests = workload(8, prompt_lengths=(16, 200), max_tokens=(32, 64), vocab_size=32000)
        results, watch = serve_workload(stack, requests)
        check_streams(requests, results, vocab_size=32000)
        check_metrics(stack, requests, watch)
    finally:
        code = stack.stop()
    assert code == 0, f"the scheduler exited with {code}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(1200)
def test_llama2_7b_shaped_dummy_model_serves_32_streams_on_the_gpu(tmp_path) -> None:
    require_model()
    directory = write_model_dir(tmp_path, LLAMA2_7B)
    started = time.monotonic()
    stack = ServingStack("--model", str(directory), "--load-format", "dummy", "--device", "cuda",
                         "--dtype", "bfloat16", "--swap-space-bytes", str(1 << 28))
    try:
        ready = time.monotonic()
        requests = workload(32, prompt_lengths=(16, 500), max_tokens=(192, 320), vocab_size=32000)
        results, watch = serve_workload(stack, requests)
        served = time.monotonic()
        check_streams(requests, results, vocab_size=32000)
        mean_forward = check_metrics(stack, requests, watch)
        print(f"start {ready - started:.1f}s, served {sum(r.max_tokens for r in requests)} tokens in "
              f"{served - ready:.1f}s, mean forward {mean_forward * 1000:.1f} ms, peak KV usage "
              f"{watch.peak_usage:.3f}")
        assert mean_forward < KERNEL_FORWARD_SECONDS, (
            f"mean forward {mean_forward:.3f}s per step: did attention run the torch reference?")
    finally:
        code = stack.stop()
    assert code == 0, f"the scheduler exited with {code}"
