"""`pagedserve bench`: serving throughput and latency on a synthetic workload, over the gRPC API or
(`--api openai`) the OpenAI-compatible HTTP API, with the same requests and the same report.

Without --target it starts a scheduler and executors here first (every `pagedserve serve` flag
applies; ports default to free ones) and benchmarks them; with --target it benchmarks a running
server (give --metrics-url to add the server's batch, KV and timing statistics). Requests set
ignore_eos, so lengths are exact. --dataset-path takes the prompts and output lengths of real
conversations from a ShareGPT file instead of a synthetic trace. Several --request-rate values run one
after another on the same server; --plot draws normalized latency against the rate. Each run's
summary is printed as `vllm bench serve` prints it; --markdown writes the wide table of every run.

    pagedserve bench --trace sharegpt --num-requests 200                  # offline, embedded model
    pagedserve bench --request-rate 1,2,4 --plot latency.png --json out.json
    pagedserve bench --dataset-path ShareGPT_V3_unfiltered_cleaned_split.json --num-requests 500
    pagedserve bench --api openai --backend simulated --num-requests 256   # through /v1/completions
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from clients import bench_report
from clients.bench_records import summarize
from clients.client import ModelInfo, PagedServeClient, PagedServeError
from clients.connection_args import TOKEN_ENV, read_root_certificates
from clients.datasets import DatasetSample, Encode, read_conversations, sample, tokenizer_encoder
from clients.loadgen import (
    DATASET_TRACE,
    TRACE_NAMES,
    LoadRequest,
    WorkloadSpec,
    build_load_requests,
    run_workload,
)
from clients.openai_loadgen import run_openai_workload
from clients.serve_command import READY_TIMEOUT_SECONDS, add_stack_arguments, build_configs
from clients.server_metrics import ServerStats, scrape
from clients.stack import LocalStack, stack_specs
from pagedserve.default_model import default_model_dir
from pagedserve.errors import InvalidArgumentError
from pagedserve.logs import REQUESTS_ENV
from pagedserve.model_source import TOKENIZER_FILES, resolve_model
from pagedserve.settings import config_file_from_args
from scheduler_svc.config import ENV_PREFIX, ServingConfig

API_NAMES = ("grpc", "openai")
# A server that does not answer at all within this long is not there: say so rather than wait. One
# that answers but is not serving yet (still loading its model) is waited for up to SERVING_TIMEOUT_S.
CONNECT_TIMEOUT_S = 5.0
SERVING_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the benchmark sends requests and reads metrics, and how it authenticates."""

    target: str
    metrics_url: str | None
    token: str | None = None
    root_certificates: bytes | None = None
    http_url: str | None = None         # the OpenAI-compatible API's base URL (for --api openai)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Workload, output and target flags, then the local stack's flags."""
    work = parser.add_argument_group("workload")
    work.add_argument("--trace", choices=TRACE_NAMES, default="sharegpt",
                      help="sharegpt (161 in / 338 out on average), alpaca (19 / 58) or fixed")
    work.add_argument("--num-requests", type=int, default=100, help="requests per run (per request rate)")
    work.add_argument("--prompt-len", type=int, default=128, help="with --trace fixed")
    work.add_argument("--output-len", type=int, default=128, help="with --trace fixed")
    work.add_argument("--n", type=int, default=1, help="parallel samples per request")
    work.add_argument("--beam-width", type=int, default=0, help="beam search of this width (0: off)")
    work.add_argument("--dataset-path", type=Path, metavar="FILE",
                      help="a ShareGPT JSON or JSONL file: real prompts and output lengths, not --trace")
    # --tokenizer is the stack's (below): with --dataset-path, the served model's tokenizer (default: the
    # model served here, or the embedded model's).
    work.add_argument("--shared-prefix-len", type=int, default=0,
                      help="tokens every prompt starts with (a shared system prompt)")
    work.add_argument("--request-rate", default="inf", metavar="R[,R...]",
                      help="requests/s of Poisson arrivals; inf sends all at once (default); "
                           "a comma-separated list runs each in turn")
    work.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of arrival gaps: 1 is Poisson, lower is burstier")
    work.add_argument("--trace-seed", type=int, default=0, help="seed of lengths, prompts and arrivals")
    work.add_argument("--warmup-requests", type=int, default=0,
                      help="short requests sent before measuring (compilation, allocator warm-up)")
    work.add_argument("--num-clients", type=int, default=1,
                      help="clients the requests are spread over, each with its own connection "
                           "(default 1)")
    out = parser.add_argument_group("output")
    out.add_argument("--label", default="pagedserve", help="the system's name in tables and plots")
    out.add_argument("--json", type=Path, help="write the result here")
    out.add_argument("--plot", type=Path, help="draw normalized latency vs request rate here (PNG)")
    out.add_argument("--markdown", type=Path, metavar="FILE", help="write the wide table of every run here")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="leave out the progress bar on stderr")
    work.add_argument("--api", choices=API_NAMES, default="grpc",
                      help="send the requests over gRPC (default) or the OpenAI-compatible HTTP API "
                           "(streamed /v1/completions); the workload and the report are the same")
    remote = parser.add_argument_group("running server")
    remote.add_argument("--target", default=None, metavar="HOST:PORT",
                        help="benchmark this server instead of starting one")
    remote.add_argument("--http-url", default=None, metavar="URL",
                        help="with --api openai and --target: its HTTP API (default http://HOST:8000)")
    remote.add_argument("--metrics-url", default=None, help="its Prometheus page, for server statistics")
    remote.add_argument("--token", default=None, help="its access token (default $PAGEDSERVE_TOKEN)")
    remote.add_argument("--tls-ca", type=Path, metavar="FILE", help="connect with TLS trusting FILE")
    add_stack_arguments(parser)


def parse_rates(text: str) -> list[float]:
    """`inf` or comma-separated positive request rates."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgumentError("request-rate", f"expected numbers or inf, got {text!r}") from None
    if not rates or any(r <= 0 or math.isnan(r) for r in rates):
        raise InvalidArgumentError("request-rate", f"rates must be > 0 (inf for offline), got {text!r}")
    return rates


def workload(args: argparse.Namespace, rate: float) -> WorkloadSpec:
    """The workload flags at one request rate (validated)."""
    dataset = str(args.dataset_path) if args.dataset_path is not None else ""
    return WorkloadSpec(trace=DATASET_TRACE if dataset else args.trace, num_requests=args.num_requests,
                        prompt_len=args.prompt_len, output_len=args.output_len, n=args.n,
                        beam_width=args.beam_width, shared_prefix_len=args.shared_prefix_len,
                        request_rate=rate, burstiness=args.burstiness, seed=args.trace_seed,
                        dataset_path=dataset)


@dataclasses.dataclass(frozen=True, slots=True)
class DatasetSource:
    """The conversations of --dataset-path and the tokenizer they are measured with.

    `tokenizer_chosen` says the tokenizer was named (--tokenizer, or the model this command serves);
    otherwise it is the embedded model's, and a server of another model is refused.
    """

    path: Path
    conversations: list[tuple[str, str]]
    encode: Encode
    tokenizer_dir: str
    tokenizer_chosen: bool

    def samples(self, spec: WorkloadSpec, info: ModelInfo) -> tuple[DatasetSample, ...]:
        """The spec's requests for this model; says on stderr how many conversations were skipped."""
        if not self.tokenizer_chosen and info.model_name != Path(self.tokenizer_dir).name:
            raise InvalidArgumentError("tokenizer", f"the server serves {info.model_name!r}: give "
                                       "--tokenizer DIR, its tokenizer's directory, to tokenize the dataset")
        taken = sample(self.conversations, self.encode, spec.num_requests, info.max_model_len, spec.seed,
                       spec.shared_prefix_len)
        print(f"dataset {self.path}: {len(taken.samples)} requests from {taken.examined} of "
              f"{taken.available} conversations ({taken.skipped} too short or too long)", file=sys.stderr)
        return taken.samples


def dataset_source(args: argparse.Namespace, served: ServingConfig | None) -> DatasetSource | None:
    """--dataset-path read and its tokenizer loaded (before anything starts), or None without one.

    The tokenizer is --tokenizer, else that of the model `served` here (its --tokenizer or --model),
    else the embedded model's; a directory or a repo id in the hub cache, as the scheduler finds it.
    """
    if args.dataset_path is None:
        return None
    conversations = read_conversations(args.dataset_path)
    chosen = args.tokenizer or (served.tokenizer or served.model if served is not None else "")
    source = chosen or default_model_dir()
    revision = (served.revision if served is not None else args.revision) or ""
    try:
        tokenizer_dir = str(resolve_model(source, revision, TOKENIZER_FILES))
    except OSError as err:
        raise InvalidArgumentError("tokenizer", f"cannot find the tokenizer {source}: {err}") from None
    return DatasetSource(args.dataset_path, conversations, tokenizer_encoder(tokenizer_dir), tokenizer_dir,
                         tokenizer_chosen=bool(chosen) or served is not None)


def check_plot(args: argparse.Namespace, rates: list[float]) -> None:
    """--plot draws latency against the request rate: an offline-only run has nothing to draw."""
    if args.plot is not None and all(math.isinf(rate) for rate in rates):
        raise InvalidArgumentError("plot", "draws latency against the request rate, and an offline run "
                                   "(--request-rate inf) has none: give rates, e.g. --request-rate 1,2,4")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark at every rate; print each run's summary; write JSON, markdown and the plot."""
    rates = parse_rates(args.request_rate)
    if args.num_clients < 1:
        raise InvalidArgumentError("num-clients", f"must be at least 1, got {args.num_clients}")
    specs = [workload(args, rate) for rate in rates]        # validate before starting anything
    check_plot(args, rates)
    if args.target is not None:
        return _benchmark(args, specs, _remote_endpoint(args), dataset=dataset_source(args, None))
    config_file = config_file_from_args(args)
    in_file = set(config_file.values) if config_file is not None else set()
    for name in ("port", "metrics_port"):
        # Free ports, never colliding with a server, unless the port was chosen somewhere.
        chosen = ENV_PREFIX + name.upper() in os.environ or name in in_file
        if getattr(args, name) is None and not chosen:
            setattr(args, name, 0)
    scheduler, executors = build_configs(args)
    dataset = dataset_source(args, scheduler.serving)
    serving = scheduler.serving
    # The benchmark measures every request itself: a log line per request would only bury the bar.
    environment = {REQUESTS_ENV: "false", **os.environ}
    stack = LocalStack(stack_specs(scheduler, executors), restart_executors=args.restart_executors,
                       liveness_timeout=serving.executor_health_timeout_seconds, base_environment=environment)
    stack.start()
    try:
        address = stack.wait_listening("scheduler", timeout=120.0)
        stack.wait_ready(READY_TIMEOUT_SECONDS)
        metrics = stack.processes["scheduler"].metrics_address
        roots = Path(serving.tls_cert_file).read_bytes() if serving.tls_cert_file else None
        http = stack.processes["scheduler"].http_address
        endpoint = Endpoint(address, f"http://{metrics}/metrics" if metrics else None,
                            serving.auth_token or None, roots,
                            _http_url(http, serving.tls_cert_file) if http else None)
        # One flat mapping of every setting, as results recorded before the config was split.
        config = dataclasses.asdict(scheduler.scheduling) | dataclasses.asdict(scheduler.serving)
        return _benchmark(args, specs, endpoint, config=config, dataset=dataset)
    finally:
        stack.stop()


def _remote_endpoint(args: argparse.Namespace) -> Endpoint:
    token = args.token or os.environ.get(TOKEN_ENV)
    http_url = args.http_url or _http_url(f"{args.target.rpartition(':')[0]}:8000", args.tls_ca)
    return Endpoint(args.target, args.metrics_url, token, read_root_certificates(args.tls_ca), http_url)


def _http_url(address: str, tls: object) -> str:
    return f"{'https' if tls else 'http'}://{address}"


def _benchmark(args: argparse.Namespace, specs: list[WorkloadSpec], endpoint: Endpoint,
               config: dict[str, Any] | None = None, dataset: DatasetSource | None = None) -> int:
    if args.api == "openai" and endpoint.http_url is None:
        raise InvalidArgumentError("api", "the server runs no HTTP API (http_port 0)")

    def print_summary(run: dict[str, Any]) -> None:
        print(bench_report.summary(args.label, run, args.api), flush=True)

    result = benchmark(endpoint, specs, args.label, warmup_requests=args.warmup_requests,
                       progress=args.progress, config=config, num_clients=args.num_clients, api=args.api,
                       dataset=dataset, on_run=print_summary)
    if args.markdown is not None:
        args.markdown.write_text(bench_report.markdown([result]) + "\n")
    for run in result["runs"]:
        for line in bench_report.failure_lines(run["client"]):
            print(line, file=sys.stderr)
    if args.json is not None:
        args.json.write_text(bench_report.dumps(result))
    if args.plot is not None:
        bench_report.plot_latency_vs_rate([result], args.plot)
    return 0 if all(run["client"]["failed"] == 0 for run in result["runs"]) else 1


def benchmark(endpoint: Endpoint, specs: list[WorkloadSpec], label: str, *, warmup_requests: int = 0,
              progress: bool = True, config: dict[str, Any] | None = None,
              num_clients: int = 1, api: str = "grpc", dataset: DatasetSource | None = None,
              on_run: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run each workload in turn against a serving endpoint; returns the result (bench_report's format).

    The requests of each run are spread over `num_clients` clients, each with its own connection; `api`
    says which API they are sent through ("grpc" or "openai"; model info always comes over gRPC).
    `dataset` supplies the requests of a "dataset" workload. `on_run` gets each run as it ends (by
    default its summary goes to stderr).
    """
    info = connect(endpoint)
    if warmup_requests > 0:
        warmup = WorkloadSpec(trace="fixed", num_requests=warmup_requests, prompt_len=16, output_len=8,
                              seed=specs[0].seed + 1)
        _run_once(endpoint, build_load_requests(warmup, info.vocab_size, info.max_model_len), warmup,
                  "warm-up", progress, num_clients, api, info.model_name)
    runs = []
    for spec in specs:
        samples = dataset.samples(spec, info) if dataset is not None else None
        requests = build_load_requests(spec, info.vocab_size, info.max_model_len, samples)
        metrics_url = endpoint.metrics_url
        before = scrape(metrics_url) if metrics_url else None
        records, duration = _run_once(endpoint, requests, spec, f"{label} rate {spec.request_rate:g}",
                                      progress, num_clients, api, info.model_name)
        server = (ServerStats.between(before, scrape(metrics_url))
                  if metrics_url and before is not None else None)
        runs.append(bench_report.run_entry(spec.request_rate, summarize(records, duration), server))
        if on_run is not None:
            on_run(runs[-1])
        else:
            print(bench_report.summary(label, runs[-1], api), file=sys.stderr)
    workload_fields = dataclasses.asdict(specs[0]) | {"request_rates": [s.request_rate for s in specs],
                                                      "num_clients": num_clients, "api": api}
    return {"system": label, "workload": workload_fields, "runs": runs, "model": dataclasses.asdict(info),
            "config": config, "environment": {"python": platform.python_version(),
                                              "machine": platform.machine()}}


def connect(endpoint: Endpoint) -> ModelInfo:
    """The served model's description, once the server answers SERVING.

    A target that does not answer within CONNECT_TIMEOUT_S is a PagedServeError naming it (a wrong
    --target would otherwise wait out the whole serving timeout); one that answers is given
    SERVING_TIMEOUT_S to be ready.
    """
    with PagedServeClient(endpoint.target, token=endpoint.token, root_certificates=endpoint.root_certificates,
                          timeout=CONNECT_TIMEOUT_S) as client:
        _reach(client)
        client.wait_until_serving(SERVING_TIMEOUT_S)
        return client.model_info()


def _reach(client: PagedServeClient) -> None:
    """Return once the server answers a health check at all; raise after CONNECT_TIMEOUT_S."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            client.health()
            return
        except PagedServeError as err:
            if err.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return          # it answered (a refusal, say): the calls that follow report it
            if time.monotonic() >= deadline:
                raise PagedServeError(grpc.StatusCode.UNAVAILABLE, (
                    f"cannot connect to {client.target} within {CONNECT_TIMEOUT_S:g} s ({err.message}); "
                    "check --target (the scheduler's gRPC HOST:PORT) and that the server is up")) from None
        time.sleep(0.25)


def _run_once(endpoint: Endpoint, requests: list[LoadRequest], spec: WorkloadSpec, label: str,
              progress: bool, num_clients: int, api: str = "grpc", model: str = "") -> tuple[list, float]:
    if api == "openai":
        assert endpoint.http_url is not None
        return asyncio.run(run_openai_workload(
            endpoint.http_url, requests, model, seed=spec.seed, token=endpoint.token,
            root_certificates=endpoint.root_certificates, show_progress=progress, label=label,
            num_clients=num_clients))
    return asyncio.run(run_workload(endpoint.target, requests, seed=spec.seed, token=endpoint.token,
                                    root_certificates=endpoint.root_certificates, show_progress=progress,
                                    label=label, num_clients=num_clients))
