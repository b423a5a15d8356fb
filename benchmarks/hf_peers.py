"""The Hugging Face transformers peers of the serving benchmark, run in process on one device.

Two systems run the same trace as our server (same prompts, same output lengths, same arrivals):

* `hf-continuous`: transformers' continuous batching with its paged KV cache (the background-thread
  `ContinuousBatchingManager`, fed with `add_request` and drained with `get_result`).
* `hf-static`: static batching, the FasterTransformer-style baseline: `model.generate` over batches of up
  to `--batch-size` left-padded prompts with a padded contiguous KV cache. A batch runs until its longest
  request is done; each request keeps only its own `output_len` tokens.

Both run offline (every request arrives at t=0) or online (arrivals from `--request-rate`, Poisson or
gamma with `--burstiness`; several comma-separated rates run one after another on the same model).
Every request generates exactly its `output_len` tokens (EOS never stops it), and every token is
timestamped, so `clients.bench_records.summarize` computes the same table row as for our server. The
model has dummy weights of the shape in `--model`'s config.json. `--json` writes the result in
`clients.bench_report`'s format (as `pagedserve bench` does), so one report holds every system.

    python benchmarks/hf_peers.py --system hf-continuous --model /path/to/llama2-7b-config \\
        --trace sharegpt --num-requests 1000 --request-rate inf,2,4 --json hf_cb.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import platform
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The repository and its generated API package (protos/pagedserve), for runs without an install.
SOURCE_PATHS = [str(REPO), str(REPO / "protos")]
sys.path[:0] = SOURCE_PATHS

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation import ContinuousBatchingConfig  # noqa: E402
from transformers.generation.continuous_batching.utils import WorkloadHints  # noqa: E402

from clients import bench_report  # noqa: E402
from clients.bench_records import ClientSummary, RequestRecord, summarize  # noqa: E402
from clients.loadgen import WorkloadSpec, build_load_requests, progress_bar  # noqa: E402
from clients.tables import markdown_table  # noqa: E402
from clients.traces import TRACES  # noqa: E402
from executor_svc.weights import fill_dummy_weights  # noqa: E402

log = logging.getLogger("hf_peers")

SYSTEMS = ("hf-continuous", "hf-static")
# An EOS id no token can have: the CB manager drops negative ids, so no request ever stops early.
NO_EOS = -1
# How long the CB consumer waits for an output before it checks arrivals and the manager's health.
POLL_S = 0.05
# A run in which the CB manager yields nothing for this long is declared stalled (no step takes minutes).
STALL_S = 600.0
WARMUP_PROMPT_LEN, WARMUP_OUTPUT_LEN = 8, 2


@dataclass(frozen=True, slots=True)
class PeerRequest:
    """One request of the trace: its prompt, the exact number of tokens to generate, and its arrival (s)."""

    index: int
    prompt_token_ids: tuple[int, ...]
    output_len: int
    arrival_time: float = 0.0

    @property
    def prompt_len(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt_token_ids)


# --- the trace -------------------------------------------------------------------------------------

def build_requests(trace_name: str, num_requests: int, seed: int, vocab_size: int, max_model_len: int,
                   request_rate: float | None = None, burstiness: float = 1.0, prompt_len: int | None = None,
                   output_len: int | None = None) -> list[PeerRequest]:
    """The requests of a trace, built exactly as our load generator builds them.

    `trace_name` is a key of `clients.traces.TRACES` or "fixed" (which needs `prompt_len` and
    `output_len`). Synthetic lengths are drawn so that prompt + output fit in `max_model_len`; fixed ones
    that do not fit raise InvalidArgumentError (a ValueError). A finite `request_rate` spreads arrivals
    (gamma gaps with `burstiness`, 1 is Poisson); None or infinity puts every arrival at 0 (offline).
    """
    fixed = {"prompt_len": prompt_len, "output_len": output_len} if trace_name == "fixed" else {}
    if trace_name == "fixed" and (prompt_len is None or output_len is None):
        raise ValueError("the fixed trace needs prompt_len and output_len")
    rate = math.inf if request_rate is None else request_rate
    spec = WorkloadSpec(trace=trace_name, num_requests=num_requests, request_rate=rate, burstiness=burstiness,
                        seed=seed, **fixed)
    return [PeerRequest(r.index, r.prompt_token_ids, r.output_len, r.arrival_time)
            for r in build_load_requests(spec, vocab_size, max_model_len)]


# --- the model -------------------------------------------------------------------------------------

def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name ("bfloat16", "float16", "float32") or itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def load_dummy_model(model_dir: str | Path, dtype: str | torch.dtype, device: str | torch.device,
                     attn_implementation: str = "sdpa") -> PreTrainedModel:
    """The HF model of `model_dir`/config.json, built on `device` with uniform dummy weights, in eval mode.

    The parameters are created on the device directly (no CPU copy of a 7B model) and filled with our
    executor's dummy values, so activations stay finite at any depth, as in our server's dummy runs.
    """
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype),
                                                 attn_implementation=attn_implementation)
    fill_dummy_weights(model)
    return model.eval()


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work, so a host timestamp marks when a token really exists."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# --- shared bookkeeping ----------------------------------------------------------------------------

def _new_record(request: PeerRequest) -> RequestRecord:
    return RequestRecord(index=request.index, prompt_len=request.prompt_len, output_len=request.output_len,
                         arrival=request.arrival_time)


def _finish_record(record: RequestRecord, times: Sequence[float]) -> None:
    """Completes a record from its tokens' times; a wrong token count is an error, not a result."""
    record.token_times = list(times)
    record.output_tokens = len(times)
    if len(times) != record.output_len:
        record.error = f"generated {len(times)} tokens, expected exactly {record.output_len}"
        return
    record.first_token = times[0]
    record.finished = times[-1]


def run_duration(records: Iterable[RequestRecord], elapsed: float) -> float:
    """First arrival to last token; `elapsed` (since t=0) when no request finished."""
    records = list(records)
    finished = [r.finished for r in records if r.ok and r.finished is not None]
    if not finished:
        return elapsed
    return max(finished) - min(r.arrival for r in records)


def _sleep_until(origin: float, at: float) -> None:
    delay = origin + at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _progress(label: str, total: int, enabled: bool) -> tqdm | None:
    return progress_bar(label, total) if enabled else None


# --- hf-static -------------------------------------------------------------------------------------

def next_static_batch(waiting: Sequence[PeerRequest], now: float,
                      batch_size: int) -> tuple[list[PeerRequest], float]:
    """The static baseline's policy: the next batch and when it starts, once the device is free at `now`.

    `waiting` holds the requests not yet run, in arrival order. The batch is the first `batch_size` of
    them that have arrived by the start; if none has arrived at `now`, the start waits for the next
    arrival (and takes whatever has arrived by then, i.e. that one and any arriving at the same time).
    """
    if not waiting:
        raise ValueError("no waiting requests")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    start = max(now, waiting[0].arrival_time)
    batch = list(itertools.takewhile(lambda r: r.arrival_time <= start, waiting[:batch_size]))
    return batch, start


class StepClock(StoppingCriteria):
    """A stopping criterion that never stops: it notes when each generation step's tokens exist.

    `generate` calls it once per step, after the step's tokens are appended; the device is synchronized
    first, so the time (seconds since `origin`) is when the tokens were computed, not when they were queued.
    """

    def __init__(self, origin: float, synchronize: Callable[[], None]) -> None:
        self.origin = origin
        self.synchronize = synchronize
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        """Record the step's time; never done."""
        self.synchronize()
        self.times.append(time.perf_counter() - self.origin)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of the prompts, padded on the left to the longest (as generate needs)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _pad_token_id(model: PreTrainedModel) -> int:
    # Padded positions are masked out, so any id works when the config names none.
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id
    return int(pad) if isinstance(pad, int) else 0


def _static_generation_config(model: PreTrainedModel, new_tokens: int,
                              cache_implementation: str | None) -> GenerationConfig:
    """Greedy decoding of exactly `new_tokens` tokens per row.

    generate fills unset fields (eos among them) from the model's generation config, so EOS cannot simply
    be switched off; min_new_tokens = max_new_tokens masks it until the length limit stops every row.
    """
    options: dict[str, Any] = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                               "pad_token_id": _pad_token_id(model)}
    if cache_implementation is not None:
        options["cache_implementation"] = cache_implementation
    return GenerationConfig(**options)


def _generate_batch(model: PreTrainedModel, batch: Sequence[PeerRequest], origin: float,
                    cache_implementation: str | None) -> list[float]:
    """Run one static batch to its longest output; returns the time of each step (seconds since origin)."""
    new_tokens = max(r.output_len for r in batch)
    input_ids, attention_mask = left_padded([r.prompt_token_ids for r in batch], _pad_token_id(model),
                                            model.device)
    clock = StepClock(origin, _synchronizer(model.device))
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=attention_mask,
                       generation_config=_static_generation_config(model, new_tokens, cache_implementation),
                       stopping_criteria=StoppingCriteriaList([clock]))
    return clock.times


def _run_static_batch(model: PreTrainedModel, batch: Sequence[PeerRequest], records: dict[int, RequestRecord],
                      origin: float, cache_implementation: str | None) -> None:
    """Run one batch and fill its records; a failed batch fails its requests, not the run."""
    try:
        step_times = _generate_batch(model, batch, origin, cache_implementation)
    except Exception as error:  # an OOM or a kernel error is this batch's result; later batches still run
        log.error("static batch of %d requests failed: %s", len(batch), error, exc_info=True)
        for request in batch:
            records[request.index].error = f"{type(error).__name__}: {error}"
        return
    for request in batch:
        # Every row generates until the longest is done; a request's output is its first output_len steps.
        _finish_record(records[request.index], step_times[:request.output_len])


def _warm_up_static(model: PreTrainedModel, requests: Sequence[PeerRequest],
                    cache_implementation: str | None) -> None:
    """One tiny generate, so kernel selection and allocator growth are not charged to the first batch."""
    prompt = requests[0].prompt_token_ids[:WARMUP_PROMPT_LEN]
    warmup = PeerRequest(-1, prompt, WARMUP_OUTPUT_LEN)
    _generate_batch(model, [warmup], time.perf_counter(), cache_implementation)


def run_hf_static(model: PreTrainedModel, requests: Sequence[PeerRequest], *, batch_size: int = 32,
                  progress: bool = True,
                  cache_implementation: str | None = None) -> tuple[list[RequestRecord], float]:
    """Serve `requests` with static batching; returns their records (in input order) and the run's duration.

    Whenever the device is free, the next batch is formed by `next_static_batch` and run with
    `model.generate` (left-padded prompts, HF's default dynamic KV cache unless `cache_implementation`,
    e.g. "static", says otherwise). Times are seconds from the run's start, when arrival time 0 is.
    """
    if not requests:
        return [], 0.0
    records = {r.index: _new_record(r) for r in requests}
    waiting = sorted(requests, key=lambda r: (r.arrival_time, r.index))
    _warm_up_static(model, waiting, cache_implementation)
    bar = _progress("hf-static", len(requests), progress)
    origin = time.perf_counter()
    done = 0
    while waiting:
        batch, start = next_static_batch(waiting, time.perf_counter() - origin, batch_size)
        _sleep_until(origin, start)
        _run_static_batch(model, batch, records, origin, cache_implementation)
        del waiting[:len(batch)]
        done += len(batch)
        if bar is not None:
            bar.set_postfix_str(f"batch of {len(batch)}", refresh=False)
            bar.update(done - bar.n)
    elapsed = time.perf_counter() - origin
    if bar is not None:
        bar.close()
    ordered = [records[r.index] for r in requests]
    return ordered, run_duration(ordered, elapsed)


# --- hf-continuous ---------------------------------------------------------------------------------

def _page_size_field() -> str:
    # transformers 5.17 calls the KV block size `block_size`; later versions renamed it `page_size`.
    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    return "page_size" if "page_size" in names else "block_size"


def continuous_batching_config(*, max_batch_tokens: int | None = None, num_blocks: int | None = None,
                               block_size: int | None = None,
                               max_memory_percent: float | None = None) -> ContinuousBatchingConfig:
    """HF's CB config with its defaults except where given, and with prefix caching off.

    None leaves a knob to HF: it sizes max_batch_tokens (8192 by default) and num_blocks from the free
    device memory (max_memory_percent of it, 0.9 without logits processors). Prefix caching is off because
    our server has none and the trace's random prompts share no prefixes, so it could only cost time.
    """
    options: dict[str, Any] = {"allow_block_sharing": False, "max_batch_tokens": max_batch_tokens,
                               "num_blocks": num_blocks, "max_memory_percent": max_memory_percent,
                               _page_size_field(): block_size}
    return ContinuousBatchingConfig(**{k: v for k, v in options.items() if v is not None})


class _ContinuousRun:
    """The consumer side of one CB run: submits requests to the manager and turns its outputs into records.

    With streaming, each token's output arrives on its own; HF stamps every token (record_timestamps) in
    its generation thread, so the times are when tokens were produced, not when this thread got them.
    """

    def __init__(self, manager: Any, requests: Sequence[PeerRequest], origin: float, stream: bool,
                 bar: tqdm | None) -> None:
        self.manager = manager
        self.records = {r.index: _new_record(r) for r in requests}
        self.origin = origin
        self.stream = stream
        self.bar = bar
        self.outstanding: dict[str, RequestRecord] = {}
        self.stamps_seen: dict[str, int] = {}
        self.done = 0

    def submit(self, request: PeerRequest) -> None:
        """Hand one request to the manager; a refusal is recorded as the request's error."""
        record = self.records[request.index]
        request_id = f"peer-{request.index}"
        try:
            accepted = self.manager.add_request(list(request.prompt_token_ids), request_id=request_id,
                                                max_new_tokens=request.output_len, streaming=self.stream,
                                                record_timestamps=True, eos_token_id=NO_EOS)
        except Exception as error:  # e.g. the input queue stayed full: this request fails, the run goes on
            self._fail(record, f"add_request failed: {type(error).__name__}: {error}")
            return
        if accepted is None:
            self._fail(record, "the CB manager refused the request (it is stopping or failed)")
            return
        self.outstanding[request_id] = record

    def absorb(self, output: Any) -> None:
        """Take one output of the manager: new tokens' times, and the request's end when it is finished."""
        record = self.outstanding.get(output.request_id)
        if record is None:
            return      # e.g. the warm-up request, or an output after a request already failed
        self._add_token_times(output.request_id, record, output)
        if not output.is_finished():
            return
        del self.outstanding[output.request_id]
        if output.error is not None:
            record.error = f"CB manager failed the request: {output.error}"
            record.output_tokens = len(output.generated_tokens)
        elif len(record.token_times) < len(output.generated_tokens):
            self._finish_without_early_times(record, output)
        else:
            _finish_record(record, record.token_times)
        self._count_done()

    def _add_token_times(self, request_id: str, record: RequestRecord, output: Any) -> None:
        """Append the times of the tokens this output adds (the tail of HF's per-token timestamps).

        HF restarts a request's timestamps when it evicts the request and recomputes it (a "soft reset"),
        so the list can be shorter than the tokens; such a drop is counted as a preemption.
        """
        stamps = output.timestamps or []
        if len(stamps) < self.stamps_seen.get(request_id, 0):
            record.num_preemptions += 1
        self.stamps_seen[request_id] = len(stamps)
        new = len(output.generated_tokens) - len(record.token_times)
        if new <= 0:
            return
        if len(stamps) < new:      # without streaming, a soft reset loses its earlier tokens' times
            record.num_preemptions = max(record.num_preemptions, 1)
            return
        record.token_times.extend(t - self.origin for t in stamps[len(stamps) - new:])

    def _finish_without_early_times(self, record: RequestRecord, output: Any) -> None:
        """A non-streamed request that was soft reset: only the times after its last reset are known.

        Its end and its later tokens' gaps are real; its first token's time is lost, so it has none (it
        counts in throughput and normalized latency, not in TTFT or TPOT).
        """
        stamps = [t - self.origin for t in (output.timestamps or [])]
        record.output_tokens = len(output.generated_tokens)
        record.token_times = stamps
        if record.output_tokens != record.output_len:
            record.error = f"generated {record.output_tokens} tokens, expected exactly {record.output_len}"
        elif stamps:
            record.finished = stamps[-1]
        else:
            record.finished = time.perf_counter() - self.origin

    def fail_outstanding(self, reason: str) -> None:
        """Fail every request still waiting for its end (the manager stopped or stalled)."""
        for record in self.outstanding.values():
            self._fail(record, reason)
        self.outstanding.clear()

    def fail_unsubmitted(self, requests: Iterable[PeerRequest], reason: str) -> None:
        """Fail requests that were never handed to the manager."""
        for request in requests:
            self._fail(self.records[request.index], reason)

    def _fail(self, record: RequestRecord, reason: str) -> None:
        record.error = reason
        self._count_done()

    def _count_done(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{len(self.outstanding)} in flight", refresh=False)
            self.bar.update(1)


def _drive(run: _ContinuousRun, requests: Sequence[PeerRequest]) -> None:
    """Feed requests at their arrival times while consuming outputs, until every request has ended."""
    pending = deque(sorted(requests, key=lambda r: (r.arrival_time, r.index)))
    last_output = time.perf_counter()
    while pending or run.outstanding:
        now = time.perf_counter() - run.origin
        while pending and pending[0].arrival_time <= now:
            run.submit(pending.popleft())
        # Wake up in time for the next arrival, but poll often enough to notice a dead manager.
        timeout = min(POLL_S, max(pending[0].arrival_time - now, 0.0)) if pending else POLL_S
        output = run.manager.get_result(timeout=timeout)
        if output is not None:
            last_output = time.perf_counter()
            run.absorb(output)
            continue
        if not run.manager.is_running():
            run.fail_outstanding("the CB generation thread stopped before the request finished")
            run.fail_unsubmitted(pending, "not submitted: the CB generation thread had stopped")
            return
        if run.outstanding and time.perf_counter() - last_output > STALL_S:
            run.fail_outstanding(f"no output from the CB manager for {STALL_S:.0f} s")


def _warm_up_continuous(manager: Any, requests: Sequence[PeerRequest]) -> None:
    """One tiny request through the started manager, so its first steps' setup is not charged to the run."""
    prompt = list(requests[0].prompt_token_ids[:WARMUP_PROMPT_LEN])
    manager.add_request(prompt, request_id="warmup", max_new_tokens=WARMUP_OUTPUT_LEN, eos_token_id=NO_EOS)
    deadline = time.perf_counter() + STALL_S
    while time.perf_counter() < deadline:
        output = manager.get_result(request_id="warmup", timeout=POLL_S)
        if output is not None and output.is_finished():
            if output.error is not None:
                raise RuntimeError(f"the CB warm-up request failed: {output.error}")
            return
        if not manager.is_running():
            raise RuntimeError("the CB generation thread stopped during warm-up")
    raise RuntimeError("the CB warm-up request did not finish")


def _manager_settings(model: PreTrainedModel, manager: Any) -> dict[str, Any]:
    """What HF resolved for this run: the attention it switched to and the cache and batch sizes."""
    config = manager.continuous_batching_config
    settings = {"attn_implementation": model.config._attn_implementation}
    for name in ("page_size", "block_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch",
                 "max_memory_percent", "use_cuda_graph", "use_async_batching", "allow_block_sharing",
                 "scheduler_type"):
        if hasattr(config, name) and getattr(config, name) is not None:
            value = getattr(config, name)
            settings[name] = list(value) if isinstance(value, tuple) else value
    return settings


def run_hf_continuous(model: PreTrainedModel, requests: Sequence[PeerRequest], *,
                      max_batch_tokens: int | None = None, progress: bool = True,
                      num_blocks: int | None = None, block_size: int | None = None,
                      max_memory_percent: float | None = None, stream: bool = True,
                      settings: dict[str, Any] | None = None) -> tuple[list[RequestRecord], float]:
    """Serve `requests` with HF continuous batching; returns their records (in input order) and the duration.

    The manager runs in its own thread; this thread adds each request at its arrival time and consumes
    the outputs. Every request is greedy with exactly `output_len` new tokens (EOS disabled per request).
    `stream` delivers each token as it is made, like our server's streaming API; without it a request
    arrives whole and HF's own per-token stamps give its times (lost before a soft reset). Cache knobs left
    None are sized by HF (see `continuous_batching_config`). `settings`, when given, receives what HF
    resolved (attention implementation, num_blocks, max_batch_tokens, ...). A request the manager fails
    is recorded with its error.
    """
    if not requests:
        return [], 0.0
    generation_config = GenerationConfig(do_sample=False, eos_token_id=NO_EOS,
                                         max_new_tokens=max(r.output_len for r in requests))
    hints = WorkloadHints(max_prompt_length=max(r.prompt_len for r in requests),
                          max_generated_length=max(r.output_len for r in requests),
                          num_requests=len(requests))
    cb_config = continuous_batching_config(max_batch_tokens=max_batch_tokens, num_blocks=num_blocks,
                                           block_size=block_size, max_memory_percent=max_memory_percent)
    with model.continuous_batching_context_manager(generation_config=generation_config,
                                                   continuous_batching_config=cb_config,
                                                   workload_hints=hints) as manager:
        _warm_up_continuous(manager, requests)
        resolved = _manager_settings(model, manager)
        log.info("HF continuous batching: %s", resolved)
        if settings is not None:
            settings.update(resolved)
        run = _ContinuousRun(manager, requests, time.perf_counter(), stream,
                             _progress("hf-continuous", len(requests), progress))
        try:
            _drive(run, requests)
        except BaseException:
            # Leaving the context would flush every queued request first; on an error or ^C, drop them.
            manager.stop(block=True, timeout=30, hard_stop=True)
            raise
        elapsed = time.perf_counter() - run.origin
    if run.bar is not None:
        run.bar.close()
    ordered = [run.records[r.index] for r in requests]
    _log_failures_and_resets(ordered)
    return ordered, run_duration(ordered, elapsed)


def _log_failures_and_resets(records: Sequence[RequestRecord]) -> None:
    failed = [r for r in records if not r.ok]
    if failed:
        log.warning("%d of %d requests failed; first: #%d %s", len(failed), len(records), failed[0].index,
                    failed[0].error)
    reset = sum(1 for r in records if r.num_preemptions)
    if reset:
        log.info("%d requests were evicted and recomputed (soft reset) by the CB manager", reset)


# --- the command line ------------------------------------------------------------------------------

COLUMNS = ("system", "rate (req/s)", "requests", "output tok/s", "total tok/s", "req/s",
           "norm. latency (s/tok)", "TTFT p50 (ms)", "TTFT p99 (ms)", "TPOT p50 (ms)", "TPOT p99 (ms)",
           "ITL p50 (ms)", "ITL p99 (ms)")


def table_row(system: str, request_rate: float, summary: ClientSummary) -> list[object]:
    """One run's summary as a row under COLUMNS."""
    return [system, "offline" if math.isinf(request_rate) else f"{request_rate:g}",
            f"{summary.completed}/{summary.completed + summary.failed}", summary.output_tokens_per_s,
            summary.total_tokens_per_s, summary.requests_per_s, summary.normalized_latency_s,
            summary.ttft.p50_ms, summary.ttft.p99_ms, summary.tpot.p50_ms, summary.tpot.p99_ms,
            summary.itl.p50_ms, summary.itl.p99_ms]


def request_rates(text: str) -> list[float]:
    """Comma-separated request rates (req/s, > 0); "inf" is offline."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of rates: {text!r}") from None
    if not rates or any(not rate > 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0 (inf for offline): {text!r}")
    return rates


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--model", type=Path, required=True, help="a directory with the model's config.json")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attn-implementation", default="sdpa",
                        help="the model's attention; CB switches it to its paged (or flash) variant itself")
    parser.add_argument("--trace", choices=[*TRACES, "fixed"], default="sharegpt")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--prompt-len", type=int, default=None, help="fixed trace only")
    parser.add_argument("--output-len", type=int, default=None, help="fixed trace only")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output (default: the config's max_position_embeddings)")
    parser.add_argument("--request-rate", type=request_rates, default=[math.inf],
                        help="requests/s, or several comma-separated (one run each); inf = offline")
    parser.add_argument("--burstiness", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="hf-static: requests per batch")
    parser.add_argument("--cache-implementation", default=None,
                        help='hf-static: e.g. "static" (default: dynamic)')
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="hf-continuous (default: HF's)")
    parser.add_argument("--num-blocks", type=int, default=None, help="hf-continuous (default: sized by HF)")
    parser.add_argument("--block-size", type=int, default=None, help="hf-continuous (default: HF's, 256)")
    parser.add_argument("--max-memory-percent", type=float, default=None,
                        help="hf-continuous: share of free device memory for the KV cache (default: HF's)")
    parser.add_argument("--no-stream", dest="stream", action="store_false",
                        help="hf-continuous: results whole instead of per token")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    return parser.parse_args(argv)


def run_system(args: argparse.Namespace, model: PreTrainedModel, requests: Sequence[PeerRequest],
               settings: dict[str, Any]) -> tuple[list[RequestRecord], float]:
    """Run the chosen system over the requests."""
    if args.system == "hf-static":
        return run_hf_static(model, requests, batch_size=args.batch_size, progress=args.progress,
                             cache_implementation=args.cache_implementation)
    return run_hf_continuous(model, requests, max_batch_tokens=args.max_batch_tokens,
                             progress=args.progress, num_blocks=args.num_blocks, block_size=args.block_size,
                             max_memory_percent=args.max_memory_percent, stream=args.stream,
                             settings=settings)


def environment(device: torch.device) -> dict[str, str]:
    """Library versions and the device the run used."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": str(device), "device_name": name}


def workload(args: argparse.Namespace) -> dict[str, Any]:
    """The workload in the fields of our load generator's WorkloadSpec, so results line up."""
    return {"trace": args.trace, "num_requests": args.num_requests, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "n": 1, "beam_width": 0, "shared_prefix_len": 0,
            "request_rate": args.request_rate[0], "burstiness": args.burstiness, "seed": args.seed,
            "request_rates": args.request_rate}


def result(args: argparse.Namespace, model: PreTrainedModel, max_model_len: int, runs: list[dict[str, Any]],
           settings: dict[str, Any]) -> dict[str, Any]:
    """The run in bench_report's result format (what `pagedserve bench` writes), plus `summary`, the
    ClientSummary of a single-rate run, and `engine`, what HF continuous batching resolved."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {"system": args.system, "workload": workload(args), "runs": runs,
              "model": {"model_dir": str(args.model), "architecture": type(model).__name__,
                        "vocab_size": model.config.vocab_size, "max_model_len": max_model_len,
                        "dtype": str(model.dtype).removeprefix("torch.")},
              "config": config | {"max_model_len": max_model_len}, "engine": settings,
              "environment": environment(model.device)}
    if len(runs) == 1:
        report["summary"] = runs[0]["client"]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Build the model once, run the system at each request rate, print the table and maybe write JSON.

    Exits 0 when every run measured something (failed requests are counted in its summary and logged),
    1 when some run completed no request at all.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = AutoConfig.from_pretrained(args.model)
    max_model_len = args.max_model_len or config.max_position_embeddings
    started = time.perf_counter()
    model = load_dummy_model(args.model, args.dtype, args.device, args.attn_implementation)
    log.info("built %s with dummy weights on %s in %.1f s", type(model).__name__, model.device,
             time.perf_counter() - started)
    runs, rows, settings = [], [], {}
    for rate in args.request_rate:
        requests = build_requests(args.trace, args.num_requests, args.seed, config.vocab_size, max_model_len,
                                  request_rate=rate, burstiness=args.burstiness, prompt_len=args.prompt_len,
                                  output_len=args.output_len)
        records, duration = run_system(args, model, requests, settings)
        summary = summarize(records, duration)
        runs.append(bench_report.run_entry(rate, summary, None))
        rows.append(table_row(args.system, rate, summary))
        log.info("rate %g: %d/%d requests in %.1f s", rate, summary.completed, len(records), duration)
    print(markdown_table(COLUMNS, rows))
    if args.json is not None:
        args.json.write_text(bench_report.dumps(result(args, model, max_model_len, runs, settings)))
    return 0 if all(run["client"]["completed"] > 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
