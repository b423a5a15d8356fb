"""The load generator: a seeded synthetic workload sent over the real gRPC API, timed per token.

Offline runs send every request at t=0; online runs send each at its arrival time (Poisson, or gamma
with a burstiness factor, as `vllm bench serve` does). Every request sets ignore_eos and max_tokens to
its trace length, so every system produces exactly the same tokens. Each request becomes a
RequestRecord (clients/bench_records.py) timed on the client's clock. The prompts are seeded random
tokens, or a dataset's real conversations (clients/datasets.py) for the "dataset" trace.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from clients.bench_records import RequestRecord
from clients.client import AsyncPagedServeClient, PagedServeError
from clients.datasets import DatasetSample
from clients.request_builder import build_generate_request
from clients.traces import (
    TRACES,
    TraceRequest,
    fixed_trace,
    shared_prefix_prompt,
    with_poisson_arrivals,
    with_sharing,
)
from pagedserve.errors import InvalidArgumentError

TRACE_NAMES = (*TRACES, "fixed")
DATASET_TRACE = "dataset"       # the requests of a dataset file (--dataset-path), not a synthetic trace


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """What to send: the trace, its sharing shape, and when requests arrive.

    `request_rate` is requests per second; infinity sends everything at t=0 (offline). `burstiness` is
    the gamma shape of the gaps (1 is Poisson; lower is burstier). `shared_prefix_len` gives every prompt
    the same first tokens (a system prompt). Synthetic traces are drawn to fit the served model's
    context; fixed lengths that do not fit it are an error. Trace "dataset" takes its requests from the
    file at `dataset_path`.
    """

    trace: str = "sharegpt"
    num_requests: int = 100
    prompt_len: int = 128           # with trace "fixed"
    output_len: int = 128           # with trace "fixed"
    n: int = 1
    beam_width: int = 0
    shared_prefix_len: int = 0
    request_rate: float = math.inf
    burstiness: float = 1.0
    seed: int = 0
    dataset_path: str = ""

    def __post_init__(self) -> None:
        _check(self.trace in (*TRACE_NAMES, DATASET_TRACE), "trace",
               f"must be one of {', '.join(TRACE_NAMES)}, got {self.trace!r}")
        _check((self.trace == DATASET_TRACE) == bool(self.dataset_path), "dataset_path",
               f"the {DATASET_TRACE} trace, and only it, reads a dataset file")
        _check(self.num_requests >= 1, "num_requests", f"must be at least 1, got {self.num_requests}")
        _check(self.prompt_len >= 1, "prompt_len", f"must be at least 1, got {self.prompt_len}")
        _check(self.output_len >= 1, "output_len", f"must be at least 1, got {self.output_len}")
        _check(self.n >= 1, "n", f"must be at least 1, got {self.n}")
        _check(self.beam_width >= 0, "beam_width", f"must be >= 0, got {self.beam_width}")
        _check(not (self.n > 1 and self.beam_width), "n", "parallel sampling and beam search are exclusive")
        _check(self.shared_prefix_len >= 0, "shared_prefix_len", "must be >= 0")
        _check(self.request_rate > 0, "request_rate",
               f"must be > 0 (inf for offline), got {self.request_rate}")
        _check(self.burstiness > 0, "burstiness", f"must be > 0, got {self.burstiness}")

    @property
    def offline(self) -> bool:
        """Whether every request arrives at t=0."""
        return math.isinf(self.request_rate)

    @property
    def num_outputs(self) -> int:
        """Outputs each request returns: n samples or beam_width beams."""
        return self.beam_width or self.n


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """One request of a run: its prompt, how many tokens each output gets, and when it arrives."""

    index: int
    prompt_token_ids: tuple[int, ...]
    output_len: int
    n: int = 1
    beam_width: int = 0
    arrival_time: float = 0.0


def trace_of(spec: WorkloadSpec, max_model_len: int | None = None,
             dataset: Sequence[DatasetSample] | None = None) -> list[TraceRequest]:
    """The spec's lengths, sharing and arrival times; synthetic lengths drawn to fit `max_model_len`
    with the shared prefix in front, and a dataset's lengths its samples'."""
    if spec.trace == DATASET_TRACE:
        _check(dataset is not None, "dataset_path", "the dataset trace needs the dataset's samples")
        assert dataset is not None
        trace = [TraceRequest(len(d.prompt_token_ids), d.output_len) for d in dataset[:spec.num_requests]]
    elif spec.trace == "fixed":
        trace = fixed_trace(spec.num_requests, spec.prompt_len, spec.output_len)
    else:
        room = None if max_model_len is None else max_model_len - spec.shared_prefix_len
        _check(room is None or room >= 2, "shared_prefix_len",
               f"{spec.shared_prefix_len} tokens leave no room for a prompt and an output in the model's "
               f"context of {max_model_len}")
        trace = TRACES[spec.trace](spec.num_requests, seed=spec.seed, max_total_len=room)
    trace = with_sharing(trace, n=spec.n, beam_width=spec.beam_width)
    if not spec.offline:
        trace = with_poisson_arrivals(trace, spec.request_rate, spec.burstiness, seed=spec.seed)
    return trace


def build_load_requests(spec: WorkloadSpec, vocab_size: int, max_model_len: int,
                        dataset: Sequence[DatasetSample] | None = None) -> list[LoadRequest]:
    """The spec as token-id prompts: a shared prefix in front of the trace's (or dataset's) prompt.

    Every request must fit the model, prompt < max_model_len and prompt + output <= it, as the server
    requires. One that does not (fixed lengths, or a shared prefix, too long) is an InvalidArgumentError
    rather than clipped: a benchmark of other lengths than asked for would mislead.
    """
    requests = []
    for i, r in enumerate(trace_of(spec, max_model_len, dataset)):
        prompt_len = r.prompt_len + spec.shared_prefix_len
        _check_fits(spec, prompt_len, r.output_len, max_model_len)
        if dataset is not None:
            prefix = shared_prefix_prompt(i, spec.shared_prefix_len, spec.shared_prefix_len, vocab_size,
                                          spec.seed)
            prompt = (*prefix, *dataset[i].prompt_token_ids)
        else:
            prompt = tuple(shared_prefix_prompt(i, prompt_len, spec.shared_prefix_len, vocab_size, spec.seed))
        requests.append(LoadRequest(i, prompt, r.output_len, r.n, r.beam_width, r.arrival_time))
    return requests


def _check_fits(spec: WorkloadSpec, prompt_len: int, output_len: int, max_model_len: int) -> None:
    """Refuse lengths the model cannot serve, naming the flag to change."""
    prefix = f" ({spec.shared_prefix_len} of them the shared prefix)" if spec.shared_prefix_len else ""
    _check(prompt_len < max_model_len, "shared_prefix_len" if spec.shared_prefix_len else "prompt_len",
           f"a prompt of {prompt_len} tokens{prefix} leaves no room for output in the model's context of "
           f"{max_model_len} tokens")
    _check(prompt_len + output_len <= max_model_len, "output_len",
           f"{prompt_len} prompt{prefix} + {output_len} output tokens exceed the model's context of "
           f"{max_model_len} tokens; at most {max_model_len - prompt_len} output tokens fit")


def sampling_arguments(request: LoadRequest, seed: int) -> dict[str, object]:
    """The request's sampling fields: exact lengths; random sampling (greedy for beams), seeded."""
    args: dict[str, object] = {"max_tokens": request.output_len, "ignore_eos": True,
                               "seed": seed * 1_000_003 + request.index}
    if request.beam_width:
        args.update(beam_width=request.beam_width, n=request.beam_width, temperature=0.0)   # every beam
    else:
        args.update(n=request.n, temperature=1.0)
    return args


class LoadGenerator:
    """Sends a workload through AsyncPagedServeClients and records every request's timeline.

    `client` may be one client or several (request i goes through client i mod their number), so that
    a run can come from many connections as from many users. Subclasses send through another API by
    overriding `_deliver` (clients/openai_loadgen.py: the OpenAI-compatible HTTP API).
    """

    def __init__(self, client: Any, requests: Sequence[LoadRequest], seed: int = 0,
                 progress: tqdm | None = None) -> None:
        self.clients = list(client) if isinstance(client, list | tuple) else [client]
        self.requests = list(requests)
        self.seed = seed
        self.progress = progress
        self.records = [RequestRecord(r.index, len(r.prompt_token_ids), r.output_len, r.beam_width or r.n,
                                      r.arrival_time) for r in self.requests]
        self._finished = 0
        self._start = 0.0

    async def run(self) -> tuple[list[RequestRecord], float]:
        """Send everything at its arrival time; returns the records and the run's duration (s)."""
        self._start = time.perf_counter()
        pairs = zip(self.requests, self.records, strict=True)
        await asyncio.gather(*(self._send(request, record) for request, record in pairs))
        ends = [r.finished for r in self.records if r.finished is not None]
        duration = max(ends) if ends else time.perf_counter() - self._start
        if self.progress is not None:
            self.progress.set_postfix_str(f"{sum(not r.ok for r in self.records)} failed", refresh=True)
            self.progress.close()
        return self.records, duration

    def _now(self) -> float:
        return time.perf_counter() - self._start

    async def _send(self, request: LoadRequest, record: RequestRecord) -> None:
        delay = request.arrival_time - self._now()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await self._deliver(request, record, self.clients[request.index % len(self.clients)])
        except PagedServeError as err:
            record.error_code, record.error = err.code.name, err.message
        except Exception as err:        # one failed request must not end the run: record it
            record.error = f"{type(err).__name__}: {err}"
        if record.finished is None and not record.error:
            record.error = "the stream ended without its usage message"
        self._finished += 1
        if self.progress is not None:
            self.progress.update(1)

    async def _deliver(self, request: LoadRequest, record: RequestRecord, client: Any) -> None:
        """Send one request through `client` and record its stream."""
        message = build_generate_request(list(request.prompt_token_ids), f"bench-{request.index}",
                                         skip_special_tokens=True, **sampling_arguments(request, self.seed))
        async for response in client.stream_responses(message):
            self._record_response(record, response)

    def _record_tokens(self, record: RequestRecord, index: int, num_tokens: int) -> None:
        """`num_tokens` new tokens of output `index` reached the client now."""
        if not num_tokens:
            return
        now = self._now()
        if record.first_token is None:
            record.first_token = now
        if index == 0:
            record.token_times.extend([now] * num_tokens)

    def _record_response(self, record: RequestRecord, response: object) -> None:
        for chunk in response.choices:  # type: ignore[attr-defined]
            self._record_tokens(record, chunk.index, len(chunk.token_ids))
        if response.HasField("usage"):  # type: ignore[attr-defined]
            now = self._now()
            usage = response.usage  # type: ignore[attr-defined]
            record.finished = now
            record.output_tokens = usage.completion_tokens
            record.num_preemptions = usage.num_preemptions
            record.cached_prompt_tokens = usage.cached_prompt_tokens


async def run_workload(target: str, requests: Sequence[LoadRequest], *, seed: int = 0,
                       token: str | None = None, root_certificates: bytes | None = None,
                       show_progress: bool = True, label: str = "bench",
                       num_clients: int = 1) -> tuple[list[RequestRecord], float]:
    """Open `num_clients` clients to `target` (each its own connection), run the requests spread over
    them, close them; returns the records and the duration."""
    _check(num_clients >= 1, "num_clients", f"must be at least 1, got {num_clients}")
    progress = progress_bar(label, len(requests)) if show_progress else None
    # gRPC shares one connection between channels to the same target unless told otherwise.
    options = [("grpc.use_local_subchannel_pool", 1)] if num_clients > 1 else []
    clients = [AsyncPagedServeClient(target, token=token, root_certificates=root_certificates,
                                     channel_options=options) for _ in range(num_clients)]
    try:
        for client in clients:
            await client.wait_until_serving(60.0)
        return await LoadGenerator(clients, requests, seed, progress).run()
    finally:
        for client in clients:
            await client.close()


def progress_bar(label: str, total: int) -> tqdm:
    """A tqdm bar on stderr counting finished requests (redrawn in place on a terminal)."""
    return tqdm(total=total, desc=label, unit="req", dynamic_ncols=True, leave=True)


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise InvalidArgumentError(name, message)
