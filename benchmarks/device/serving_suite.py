"""The serving benchmark suite on one GPU: PagedServe, its reservation modes and ablations, and the
Hugging Face peers on the same model shape in the same call (issue 6, DESIGN.md §7).

One executor process (dummy weights) serves every PagedServe phase; each configuration gets a fresh
scheduler on it (InitCache re-sizes the KV cache for the new block size or memory budget). The HF peers
run after it, as subprocesses of `benchmarks/hf_peers.py`, so the memory is theirs alone. Everything
lands in one JSON file (a list of bench_report results, each tagged with its phase), one markdown
table per phase, and the latency-vs-rate plot.

    python benchmarks/device/serving_suite.py --out results/ --phases main,peers
    python benchmarks/device/serving_suite.py --phases reservation,blocksize,preemption,sharing,online

Phases: main (ShareGPT-like offline), http (the main trace through gRPC, then through the
OpenAI-compatible HTTP API, on one scheduler), async (one step at a time vs planned ahead), chunked (chunked
prefill at two budgets), prefix (a shared system prompt, prefix caching off and on), profile (torch
profiler of decode steps, in process), peers (HF continuous and static batching offline), reservation
(paged vs reserve-max/pow2/oracle), blocksize (8-128), preemption (swap vs recompute under memory
pressure), sharing (parallel sampling and beam search), online (normalized latency vs request rate for
us and both peers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "protos")]

from clients import bench_report  # noqa: E402
from clients.bench_command import Endpoint, benchmark  # noqa: E402
from clients.loadgen import WorkloadSpec  # noqa: E402
from clients.stack import LocalStack, ServiceSpec, config_environment, free_port  # noqa: E402
from executor_svc.config import ENV_PREFIX as EXECUTOR_ENV_PREFIX  # noqa: E402
from executor_svc.config import ExecutorConfig  # noqa: E402
from pagedserve.default_model import default_model_dir  # noqa: E402
from scheduler_svc.config import ENV_PREFIX, PreemptionPolicy, ReservationMode, SchedulerServiceConfig  # noqa: E402

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096}
LLAMA2_13B = {**LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PHASES = ("main", "http", "async", "chunked", "prefix", "profile", "peers", "reservation", "blocksize",
          "preemption", "sharing", "online")
READY_TIMEOUT_S = 900.0
CHUNKED_PREFILL_BUDGETS = (2048, 4096)
SHARED_PREFIX_LEN = 1024            # a long system prompt in front of every Alpaca-like request


@dataclasses.dataclass(frozen=True, slots=True)
class SuiteOptions:
    """The suite's sizes: how many requests each phase sends (the paper's runs are larger)."""

    model_dir: Path
    load_format: str                # dummy for a config-only directory, auto for real weights
    device: str
    dtype: str
    max_model_len: int
    num_requests: int               # main phase
    ablation_requests: int          # reservation, block size, preemption
    peer_continuous_requests: int
    peer_static_requests: int
    static_batch_size: int
    max_num_seqs: int               # main phase
    cuda_graph_max_batch: int       # decode batches up to this size replay CUDA graphs
    overlap_steps: bool             # the executor launches step N+1 before step N is answered
    sharing_requests: int
    online_requests: int
    online_rates: dict[str, list[float]]
    gpu_memory_utilization: float
    pressure_memory_utilization: float
    out: Path


def write_model_config(directory: Path, shape: dict[str, int] = LLAMA2_7B) -> Path:
    """A Llama-shaped model directory (Llama-2-7B by default): config.json (the executor uses dummy
    weights) and the embedded model's tokenizer for the scheduler (ids past its 4,096 tokens detokenize
    as unknown)."""
    import transformers

    config = transformers.LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(default_model_dir()) / name, directory / name)
    return directory


class Suite:
    """Runs the phases, collecting bench_report results tagged with their phase."""

    def __init__(self, options: SuiteOptions) -> None:
        self.o = options
        self.results: list[dict[str, Any]] = []
        self.executor: LocalStack | None = None
        self.executor_address = ""

    # ---- our stack ----------------------------------------------------------------------------------

    def start_executor(self) -> None:
        """One executor process for every PagedServe phase."""
        config = ExecutorConfig(model=str(self.o.model_dir), load_format=self.o.load_format,
                                device=self.o.device, dtype=self.o.dtype, port=free_port("127.0.0.1"),
                                metrics_port=-1, max_model_len=self.o.max_model_len,
                                cuda_graph_max_batch=self.o.cuda_graph_max_batch,
                                overlap_steps=self.o.overlap_steps)
        spec = ServiceSpec("executor-0", (sys.executable, "-m", "executor_svc"),
                           config_environment(config, EXECUTOR_ENV_PREFIX))
        self.executor = LocalStack([spec], restart_executors=False)
        self.executor.start()
        self.executor_address = self.executor.wait_listening("executor-0", timeout=READY_TIMEOUT_S)

    def stop_executor(self) -> None:
        """Free the GPU for the peers."""
        if self.executor is not None:
            self.executor.stop()
            self.executor = None

    @contextmanager
    def scheduler(self, **fields: Any) -> Iterator[Endpoint]:
        """A scheduler with these SchedulerServiceConfig fields (flat names) on the running executor."""
        if self.executor is None:
            self.start_executor()
        config = SchedulerServiceConfig.of(executor_addresses=self.executor_address,
                                           port=free_port("127.0.0.1"), http_port=free_port("127.0.0.1"),
                                           metrics_port=0, model=str(self.o.model_dir),
                                           max_model_len=self.o.max_model_len,
                                           gpu_memory_utilization=fields.pop("gpu_memory_utilization",
                                                                             self.o.gpu_memory_utilization),
                                           **fields)
        spec = ServiceSpec("scheduler", (sys.executable, "-m", "scheduler_svc"),
                           config_environment(config, ENV_PREFIX))
        stack = LocalStack([spec], restart_executors=False)
        stack.start()
        try:
            address = stack.wait_listening("scheduler", timeout=120.0)
            stack.wait_ready(READY_TIMEOUT_S)
            metrics = stack.processes["scheduler"].metrics_address
            http = stack.processes["scheduler"].http_address
            yield Endpoint(address, f"http://{metrics}/metrics", http_url=f"http://{http}" if http else None)
        finally:
            stack.stop()

    def bench(self, phase: str, label: str, specs: list[WorkloadSpec], warmup: int = 8,
              **scheduler_fields: Any) -> dict[str, Any]:
        """Benchmark our stack in one configuration; records and returns the result."""
        with self.scheduler(**scheduler_fields) as endpoint:
            config = {k: (v.value if hasattr(v, "value") else v) for k, v in scheduler_fields.items()}
            result = benchmark(endpoint, specs, label, warmup_requests=warmup, config=config)
        return self.add(phase, result)

    def add(self, phase: str, result: dict[str, Any]) -> dict[str, Any]:
        """Tag a result with its phase, keep it, and save everything so far."""
        result["phase"] = phase
        self.results.append(result)
        self.save()
        return result

    def save(self) -> None:
        """Write the JSON and the markdown tables (after every result: a cut-off run keeps what it had)."""
        (self.o.out / "serving_suite.json").write_text(bench_report.dumps(self.results))
        sections = []
        for phase in PHASES:
            mine = [r for r in self.results if r.get("phase") == phase]
            if mine:
                sections.append(f"## {phase}\n\n{bench_report.markdown(mine)}\n")
        (self.o.out / "serving_suite.md").write_text("\n".join(sections))

    # ---- phases --------------------------------------------------------------------------------------

    def sharegpt(self, num_requests: int, **fields: Any) -> WorkloadSpec:
        """The ShareGPT-like offline workload."""
        return WorkloadSpec(trace="sharegpt", num_requests=num_requests, **fields)

    def main(self) -> None:
        """The headline run: ShareGPT-like, offline, PagedAttention with block 16."""
        self.bench("main", "pagedserve", [self.sharegpt(self.o.num_requests)],
                   max_num_seqs=self.o.max_num_seqs)

    def frontends(self) -> None:
        """The main trace through each API on one scheduler, gRPC first: the HTTP API's cost (issue 19)."""
        fields = {"max_num_seqs": self.o.max_num_seqs}
        with self.scheduler(**fields) as endpoint:
            for api in ("grpc", "openai"):
                result = benchmark(endpoint, [self.sharegpt(self.o.num_requests)], f"pagedserve over {api}",
                                   warmup_requests=8, config=dict(fields), api=api)
                self.add("http", result)

    def scheduling(self) -> None:
        """The main trace one step at a time, then with the next plan made while a step runs."""
        for planned_ahead in (False, True):
            self.bench("async", f"pagedserve {'async' if planned_ahead else 'sync'} scheduling",
                       [self.sharegpt(self.o.num_requests)], max_num_seqs=self.o.max_num_seqs,
                       async_scheduling=planned_ahead)

    def chunked_prefill(self) -> None:
        """The main trace with prompts cut into chunks that share each step with the running decodes,
        at two per-step prompt budgets (the main phase is the whole-prompt baseline: budget 8,192)."""
        for budget in CHUNKED_PREFILL_BUDGETS:
            self.bench("chunked", f"pagedserve chunked prefill {budget}",
                       [self.sharegpt(self.o.num_requests)], max_num_seqs=self.o.max_num_seqs,
                       enable_chunked_prefill=True, max_num_batched_tokens=budget)

    def prefix_caching(self) -> None:
        """Alpaca-like requests behind one shared 1,024-token system prompt, with prefix caching off and
        on (the paper's shared-prefix case, §4.4)."""
        spec = WorkloadSpec(trace="alpaca", num_requests=self.o.ablation_requests,
                            shared_prefix_len=SHARED_PREFIX_LEN)
        for caching in (False, True):
            self.bench("prefix", f"pagedserve prefix caching {'on' if caching else 'off'}", [spec],
                       max_num_seqs=self.o.max_num_seqs, enable_prefix_caching=caching)

    def reservation(self) -> None:
        """The paper's memory comparison: paging against contiguous reservation (Orca Max/Pow2/Oracle).

        Memory, not max_num_seqs, must bound the batch for the comparison to mean anything: the KV
        budget is the paper's scale (an A100-40GB serving a 13B model holds ~15k tokens) and the
        sequence cap is out of the way.
        """
        for mode in ReservationMode:
            self.bench("reservation", f"pagedserve {mode.value}", [self.sharegpt(self.o.ablation_requests)],
                       reservation=mode, gpu_memory_utilization=self.o.pressure_memory_utilization,
                       max_num_seqs=1024)

    def blocksize(self) -> None:
        """Block sizes 8 to 128 on the same trace (paper Fig. 18a)."""
        for block_size in (8, 16, 32, 64, 128):
            self.bench("blocksize", f"pagedserve block {block_size}",
                       [self.sharegpt(self.o.ablation_requests)], block_size=block_size)

    def preemption(self) -> None:
        """Swap against recompute with a KV cache small enough to force preemption (paper Fig. 19)."""
        for policy in (PreemptionPolicy.SWAP, PreemptionPolicy.RECOMPUTE):
            self.bench("preemption", f"pagedserve {policy.value}", [self.sharegpt(self.o.ablation_requests)],
                       preemption_mode=policy, gpu_memory_utilization=self.o.pressure_memory_utilization,
                       max_num_seqs=1024)

    def sharing(self) -> None:
        """Memory saved by sharing: parallel sampling and beam search of width 2, 4, 6 (paper Fig. 15)."""
        for width in (2, 4, 6):
            for kind, fields in (("parallel", {"n": width}), ("beam", {"beam_width": width})):
                spec = WorkloadSpec(trace="alpaca", num_requests=self.o.sharing_requests, **fields)
                self.bench("sharing", f"pagedserve {kind} {width}", [spec])

    def online(self) -> None:
        """Normalized latency against request rate, Alpaca-like (paper Fig. 12 style), ours first."""
        specs = [WorkloadSpec(trace="alpaca", num_requests=self.o.online_requests, request_rate=rate)
                 for rate in self.o.online_rates["pagedserve"]]
        self.bench("online", "pagedserve", specs)

    def peers(self, phase: str = "peers") -> None:
        """HF continuous batching and static batching, offline on the ShareGPT-like trace."""
        self.stop_executor()
        self.peer(phase, "hf-continuous", ["--trace", "sharegpt", "--num-requests",
                                           str(self.o.peer_continuous_requests)])
        self.peer(phase, "hf-static", ["--trace", "sharegpt", "--num-requests",
                                       str(self.o.peer_static_requests), "--batch-size",
                                       str(self.o.static_batch_size)])

    def online_peers(self) -> None:
        """Both peers on the online workload, at the rates they can sustain."""
        self.stop_executor()
        for system in ("hf-continuous", "hf-static"):
            rates = ",".join(f"{r:g}" for r in self.o.online_rates[system])
            self.peer("online", system, ["--trace", "alpaca", "--num-requests", str(self.o.online_requests),
                                         "--request-rate", rates, "--batch-size",
                                         str(self.o.static_batch_size)])

    def peer(self, phase: str, system: str, flags: list[str]) -> None:
        """Run one HF peer as a subprocess on the same model shape; add its result."""
        path = self.o.out / f"peer-{phase}-{system}.json"
        command = [sys.executable, str(REPO / "benchmarks" / "hf_peers.py"), "--system", system,
                   "--model", str(self.o.model_dir), "--dtype", self.o.dtype, "--device", self.o.device,
                   "--max-model-len", str(self.o.max_model_len), "--json", str(path), *flags]
        print("+", " ".join(command), file=sys.stderr, flush=True)
        if subprocess.run(command, check=False).returncode != 0 or not path.exists():
            print(f"{system} failed; the suite goes on without it", file=sys.stderr)
            return
        for result in bench_report.load_results([path]):
            self.add(phase, result)
        path.unlink()

    def profile(self) -> None:
        """torch.profiler tables of decode steps at batch 256, in process (printed to the log)."""
        self.stop_executor()
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "executor_throughput.py"), "--preset",
                        "llama2-7b", "--device", "cuda", "--dtype", "bfloat16", "--num-requests", "256",
                        "--prompt-len", "256", "--output-len", "48", "--max-num-seqs", "256",
                        "--max-num-batched-tokens", "8192", "--profile-steps", "5", "--json",
                        str(self.o.out / "profile_decode_llama2_7b.json")], check=False)


def run_phases(suite: Suite, phases: list[str]) -> None:
    """Our phases first (one executor for all), then the ones that need the GPU to themselves."""
    ours: dict[str, Callable[[], None]] = {"main": suite.main, "http": suite.frontends,
                                           "async": suite.scheduling,
                                           "chunked": suite.chunked_prefill, "prefix": suite.prefix_caching,
                                           "reservation": suite.reservation,
                                           "blocksize": suite.blocksize, "preemption": suite.preemption,
                                           "sharing": suite.sharing, "online": suite.online}
    for phase in phases:
        if phase in ours:
            started = time.perf_counter()
            ours[phase]()
            print(f"phase {phase}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    suite.stop_executor()
    if "profile" in phases:
        suite.profile()
    if "peers" in phases:
        suite.peers()
    if "online" in phases:
        suite.online_peers()
        online = [r for r in suite.results if r.get("phase") == "online"]
        bench_report.plot_latency_vs_rate(online, suite.o.out / "online_latency.png",
                                          title="Alpaca-like, Llama-2-7B shape, normalized latency vs rate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The suite's flags."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("serving-out"))
    parser.add_argument("--phases", default="main,peers", help=f"comma-separated, from {','.join(PHASES)}")
    parser.add_argument("--model", type=Path, default=None,
                        help="a model directory with weights (default: Llama-2-7B shape, dummy weights)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--ablation-requests", type=int, default=300)
    parser.add_argument("--peer-continuous-requests", type=int, default=200)
    parser.add_argument("--peer-static-requests", type=int, default=64)
    parser.add_argument("--static-batch-size", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="the main phase's sequence cap")
    parser.add_argument("--cuda-graph-max-batch", type=int, default=256,
                        help="the executor's largest CUDA-graph decode batch (raise with --max-num-seqs)")
    parser.add_argument("--no-overlap-steps", dest="overlap_steps", action="store_false",
                        help="the executor runs steps one by one (the A/B baseline of overlapped steps)")
    parser.add_argument("--sharing-requests", type=int, default=200)
    parser.add_argument("--online-requests", type=int, default=100)
    parser.add_argument("--online-rates", default="pagedserve=8,16,32,64;hf-continuous=2,4,8;hf-static=1,2,4",
                        help="per system: name=r1,r2,...; systems separated by ';'")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--pressure-memory-utilization", type=float, default=0.3,
                        help="the preemption phase's budget: small enough that requests get preempted")
    return parser.parse_args(argv)


def online_rates(text: str) -> dict[str, list[float]]:
    """`name=r1,r2;name=...` as a dict."""
    rates = {}
    for part in text.split(";"):
        name, _, values = part.partition("=")
        rates[name.strip()] = [float(v) for v in values.split(",") if v.strip()]
    return rates


def main(argv: list[str] | None = None) -> int:
    """Run the asked phases and write the results."""
    args = parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise SystemExit(f"unknown phases: {', '.join(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        model_dir = write_model_config(Path(tempfile.mkdtemp(prefix="llama2-7b-shape-")))
        load_format = "dummy"
    else:
        model_dir, load_format = args.model, "auto"
    options = SuiteOptions(
        model_dir=model_dir, load_format=load_format, device=args.device, dtype=args.dtype,
        max_model_len=args.max_model_len, num_requests=args.num_requests,
        ablation_requests=args.ablation_requests, peer_continuous_requests=args.peer_continuous_requests,
        peer_static_requests=args.peer_static_requests, static_batch_size=args.static_batch_size,
        max_num_seqs=args.max_num_seqs, cuda_graph_max_batch=args.cuda_graph_max_batch,
        overlap_steps=args.overlap_steps,
        sharing_requests=args.sharing_requests,
        online_requests=args.online_requests, online_rates=online_rates(args.online_rates),
        gpu_memory_utilization=args.gpu_memory_utilization,
        pressure_memory_utilization=args.pressure_memory_utilization, out=args.out)
    suite = Suite(options)
    try:
        run_phases(suite, phases)
    finally:
        suite.stop_executor()
        suite.save()
    print(json.dumps({"results": len(suite.results)}), file=sys.stderr)
    print((args.out / "serving_suite.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
