"""Soak: a mixed workload against the whole stack on the simulated executor, for a bounded time.

Requests arrive as a Poisson process at `--rate` per second, each of one kind: plain streams,
parallel samples (n = 2-4), beam search (width 2-4), streams the client cancels after a few tokens,
streams aborted through the Abort RPC, requests with a bad sampling field, and undecodable bytes.
Every `--kill-every` seconds the executor is SIGKILLed and `pagedserve serve`'s launcher restarts it;
the scheduler keeps its requests and recomputes them (DESIGN.md invariant 4).

Each kind has one expected ending (a finish, CANCELLED by the client itself, `aborted`, or
INVALID_ARGUMENT); anything else, or no ending within the request's deadline, is a lost request. At
the end the stack is left to go idle and its KV blocks in use are read from the scheduler's metrics:
a finished, aborted or failed request must hold none (invariant 3). Also reported: requests by kind
and outcome, errors by gRPC code, and the scheduler's RSS at the start and the end.

    python benchmarks/soak.py --minutes 10 --rate 20 --json benchmarks/results/soak_cpu.json

The exit code is 1 when any request was lost or any block leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import platform
import random
import signal
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.cli import build_parser
from clients.client import AsyncPagedServeClient, PagedServeError
from clients.request_builder import build_generate_request
from clients.serve_command import build_configs
from clients.server_metrics import parse_samples
from clients.stack import RESTART_DELAY_SECONDS, LocalStack, RestartPolicy, stack_specs
from clients.tables import markdown_table

# Kind -> weight in the mix.
KINDS = {"stream": 40, "parallel": 12, "beam": 8, "cancel": 12, "abort": 8, "bad_field": 10, "bad_bytes": 10}
# Kind -> the endings it may have. An Abort that finds no live request (found=false) came after the
# request had already finished; it must then have finished normally.
EXPECTED = {"stream": {"finished"}, "parallel": {"finished"}, "beam": {"finished"},
            "cancel": {"cancelled"}, "abort": {"aborted", "finished_before_abort"},
            "bad_field": {"INVALID_ARGUMENT"}, "bad_bytes": {"INVALID_ARGUMENT"}}
GENERATE = "/pagedserve.v1.GenerationService/Generate"
VOCAB = 512
STACK_FLAGS = ("--backend", "simulated", "--simulated-vocab-size", str(VOCAB), "--port", "0",
               "--metrics-port", "0", "--max-num-seqs", "128", "--swap-space-bytes", str(64 * 2**20))


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """How one request ended: its kind, `finished` / `cancelled` / `aborted` or a gRPC code name."""

    kind: str
    ending: str
    message: str = ""
    seconds: float = 0.0        # from sending to the ending

    @property
    def expected(self) -> bool:
        """Whether it ended as its kind must."""
        return self.ending in EXPECTED[self.kind]


class SoakClient:
    """Sends one request of each kind and says how it ended."""

    def __init__(self, target: str, deadline: float, seed: int) -> None:
        self.client = AsyncPagedServeClient(target, timeout=deadline)
        self.raw = grpc.aio.insecure_channel(target)
        self.deadline = deadline
        self.rng = random.Random(seed)

    async def close(self) -> None:
        """Close both channels."""
        await self.client.close()
        await self.raw.close()

    async def send(self, kind: str, index: int) -> Outcome:
        """One request of `kind`, timed; any error it ends with becomes its outcome."""
        start = time.monotonic()
        try:
            outcome = await getattr(self, f"_{kind}")(kind, f"soak-{index}")
        except PagedServeError as err:
            outcome = Outcome(kind, err.code.name, err.message)
        except grpc.RpcError as err:
            outcome = Outcome(kind, err.code().name, err.details() or "")  # type: ignore[attr-defined]
        return dataclasses.replace(outcome, seconds=time.monotonic() - start)

    def _prompt(self) -> list[int]:
        return [self.rng.randrange(3, VOCAB) for _ in range(self.rng.randint(4, 48))]

    async def _finish(self, kind: str, request_id: str, **sampling: object) -> Outcome:
        completion = await self.client.generate(self._prompt(), request_id=request_id, ignore_eos=True,
                                                max_tokens=self.rng.randint(4, 64), **sampling)
        ended = completion.usage is not None and all(o.finish_reason for o in completion.outputs)
        return Outcome(kind, "finished" if ended else "INCOMPLETE")

    async def _stream(self, kind: str, request_id: str) -> Outcome:
        return await self._finish(kind, request_id, temperature=1.0, seed=self.rng.randrange(2**31))

    async def _parallel(self, kind: str, request_id: str) -> Outcome:
        return await self._finish(kind, request_id, n=self.rng.randint(2, 4), temperature=0.8,
                                  seed=self.rng.randrange(2**31))

    async def _beam(self, kind: str, request_id: str) -> Outcome:
        width = self.rng.randint(2, 4)
        return await self._finish(kind, request_id, beam_width=width, n=width, temperature=0.0)

    async def _cancel(self, kind: str, request_id: str) -> Outcome:
        after = self.rng.randint(1, 8)
        async with self.client.stream(self._prompt(), request_id=request_id, max_tokens=200,
                                      ignore_eos=True) as events:
            seen = 0
            async for event in events:
                seen += sum(len(c.token_ids) for c in event.choices)
                if seen >= after:
                    return Outcome(kind, "cancelled")        # leaving the block cancels the call
        return Outcome(kind, "finished", "ended before the client cancelled it")

    async def _abort(self, kind: str, request_id: str) -> Outcome:
        reasons: list[str] = []
        found: bool | None = None
        async with self.client.stream(self._prompt(), request_id=request_id, max_tokens=2000,
                                      ignore_eos=True) as events:
            async for event in events:
                if found is None:
                    found = await self.client.abort(request_id)
                reasons.extend(c.finish_reason for c in event.choices if c.finish_reason)
        message = f"abort found={found}; finish reasons {','.join(reasons)}"
        if "aborted" in reasons:
            return Outcome(kind, "aborted", message)
        # Finished on its own: right only if the Abort came too late to find it live.
        return Outcome(kind, "finished_before_abort" if found is False else "finished", message)

    async def _bad_field(self, kind: str, request_id: str) -> Outcome:
        bad = self.rng.choice([{"temperature": -1.0}, {"top_p": 0.0}, {"max_tokens": 10**7},
                               {"n": 2, "best_of": 1}, {"logprobs": 1000}, {"min_p": 2.0}])
        await self.client.generate(self._prompt(), request_id=request_id, **bad)
        return Outcome(kind, "finished", f"accepted {bad}")

    async def _bad_bytes(self, kind: str, request_id: str) -> Outcome:
        good = build_generate_request(self._prompt(), request_id, max_tokens=4).SerializeToString()
        cut = good[: self.rng.randint(1, len(good) - 1)] + bytes([0xFF, 0xFF, 0xFF])
        call = self.raw.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
        async for _ in call(cut, timeout=self.deadline):
            pass
        return Outcome(kind, "finished", "undecodable bytes were accepted")


def _python_path() -> str:
    """This checkout first on the services' path, so that they run the code the soak was started from."""
    here = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)


class Soak:
    """The stack, the load and the executor kills of one soak run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        parsed = build_parser().parse_args(["serve", *STACK_FLAGS, *args.stack_flags])
        self.scheduler, executors = build_configs(parsed)
        # The soak kills the executor on purpose, every --kill-every seconds: each restart is as quick as
        # the first, and no number of them makes the launcher give up, as it would on a crash loop.
        every_kill = RestartPolicy(max_delay=RESTART_DELAY_SECONDS, burst=sys.maxsize)
        self.stack = LocalStack(stack_specs(self.scheduler, executors),
                                liveness_timeout=self.scheduler.serving.executor_health_timeout_seconds,
                                base_environment=dict(os.environ, PYTHONPATH=_python_path()),
                                restart_policy=every_kill)
        self.kills = 0

    def metric(self, sample: str) -> float:
        """One sample of the scheduler's /metrics page, named without its model_name label."""
        address = self.stack.processes["scheduler"].metrics_address
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            return parse_samples(reply.read().decode())[sample]

    def scheduler_rss_mib(self) -> float:
        """Resident memory of the scheduler process."""
        return psutil.Process(self.stack.processes["scheduler"].proc.pid).memory_info().rss / 2**20

    async def run(self) -> dict[str, object]:
        """Drive the load for the run's duration; returns the report."""
        target = self.stack.wait_listening("scheduler", timeout=120.0)
        self.stack.wait_ready(300.0)
        client = SoakClient(target, self.args.deadline, self.args.seed)
        rss_start = self.scheduler_rss_mib()
        started = time.monotonic()
        killer = asyncio.create_task(self._kill_periodically(started))
        tasks = await self._load(client, started)
        killer.cancel()                             # no kill while the last requests finish
        outcomes = list(await asyncio.gather(*tasks))
        elapsed = time.monotonic() - started
        await client.close()
        idle = await asyncio.to_thread(self._wait_idle)
        blocks = {pool: round(self.metric(f"pagedserve_{pool}_kv_usage_ratio")
                              * self.metric(f"pagedserve_{pool}_kv_blocks")) for pool in ("gpu", "cpu")}
        return report(self.args, outcomes, elapsed, self.kills, rss_start, self.scheduler_rss_mib(), blocks,
                      idle)

    async def _load(self, client: SoakClient, started: float) -> list[asyncio.Task[Outcome]]:
        """Send requests for the run's duration; returns their tasks (some still running)."""
        rng = random.Random(self.args.seed)
        kinds, weights = zip(*KINDS.items(), strict=True)
        tasks, next_at, index = [], started, 0
        end = started + self.args.minutes * 60
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            kind = rng.choices(kinds, weights)[0]
            tasks.append(asyncio.create_task(client.send(kind, index)))
            index += 1
            next_at += rng.expovariate(self.args.rate)
            if index % 500 == 0:
                done = sum(t.done() for t in tasks)
                print(f"soak: {time.monotonic() - started:6.0f} s, {index} sent, {done} ended, "
                      f"{self.kills} kills", file=sys.stderr, flush=True)
        return tasks

    async def _kill_periodically(self, started: float) -> None:
        while True:
            await asyncio.sleep(self.args.kill_every)
            self.stack.processes["executor-0"].proc.send_signal(signal.SIGKILL)
            self.kills += 1
            print(f"soak: {time.monotonic() - started:6.0f} s, executor killed ({self.kills})",
                  file=sys.stderr, flush=True)

    def _wait_idle(self, timeout: float = 120.0) -> bool:
        """Wait until no request runs, waits or is swapped; False if that never happens."""
        deadline = time.monotonic() + timeout
        names = ("pagedserve_requests_running", "pagedserve_requests_waiting", "pagedserve_requests_swapped")
        while time.monotonic() < deadline:
            try:
                if all(self.metric(name) == 0 for name in names):
                    time.sleep(1.0)                  # one more stats update after the last request
                    return True
            except OSError:
                pass
            time.sleep(0.5)
        return False


def report(args: argparse.Namespace, outcomes: list[Outcome], elapsed: float, kills: int, rss_start: float,
           rss_end: float, blocks: dict[str, int], idle: bool) -> dict[str, object]:
    """The run's figures as JSON-ready values."""
    by_kind = collections.Counter((o.kind, o.ending) for o in outcomes)
    errors = collections.Counter(o.ending for o in outcomes if o.ending.isupper())
    lost = [dataclasses.asdict(o) for o in outcomes if not o.expected]
    finished = sorted(o.seconds for o in outcomes if o.ending == "finished")
    return {"benchmark": "soak", "args": {k: v for k, v in vars(args).items() if k != "json"},
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "elapsed_s": round(elapsed, 1), "requests": len(outcomes),
            "completed": sum(o.ending == "finished" for o in outcomes),
            "achieved_rate": round(len(outcomes) / elapsed, 2), "executor_kills": kills,
            # Send to last token of the requests that finished: flat p50 over a run means it kept up.
            "finished_latency_s": {"p50": _percentile(finished, 50), "p99": _percentile(finished, 99),
                                   "max": round(finished[-1], 3) if finished else None},
            "outcomes": {f"{kind}/{ending}": count for (kind, ending), count in sorted(by_kind.items())},
            "errors_by_code": dict(sorted(errors.items())), "lost": len(lost), "lost_examples": lost[:20],
            "scheduler_rss_mib": {"start": round(rss_start, 1), "end": round(rss_end, 1)},
            "went_idle": idle, "leaked_blocks": blocks}


def _percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile of sorted values (nearest rank), rounded to milliseconds."""
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * q / 100))], 3)


def print_report(result: dict[str, object]) -> None:
    """The report as two short tables."""
    rss = result["scheduler_rss_mib"]
    rows = [["elapsed", f"{result['elapsed_s']} s"], ["requests", result["requests"]],
            ["achieved rate", f"{result['achieved_rate']} req/s"], ["finished", result["completed"]],
            ["executor kills", result["executor_kills"]], ["errors by code", result["errors_by_code"]],
            ["finished latency (s)", result["finished_latency_s"]],
            ["lost requests", result["lost"]],
            ["scheduler RSS", f"{rss['start']} MiB at start, {rss['end']} MiB at end"],  # type: ignore[index]
            ["leaked blocks", result["leaked_blocks"]], ["went idle", result["went_idle"]]]
    print(markdown_table(["figure", "value"], rows))
    print()
    print(markdown_table(["kind/outcome", "requests"], list(result["outcomes"].items())))  # type: ignore[attr-defined]


def main() -> int:
    """Run the soak, print its report, write JSON if asked; exit 1 on a lost request or leaked block."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long requests are sent")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (Poisson)")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between executor kills")
    parser.add_argument("--deadline", type=float, default=180.0, help="deadline of every request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("stack_flags", nargs="*", help="more `pagedserve serve` flags (after --)")
    args = parser.parse_args()
    soak = Soak(args)
    soak.stack.start()
    try:
        result = asyncio.run(soak.run())
    finally:
        soak.stack.stop()
    print_report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    leaked = sum(result["leaked_blocks"].values())  # type: ignore[attr-defined]
    return 0 if result["lost"] == 0 and leaked == 0 and result["went_idle"] else 1


if __name__ == "__main__":
    sys.exit(main())
