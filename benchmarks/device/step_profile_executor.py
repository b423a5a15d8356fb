"""`python -m executor_svc` with per-step timing and an optional torch.profiler window (issue 18).

The executor process of `benchmarks/device/step_breakdown.py`: the unchanged executor, with wrappers
around a few of its functions that time every step on the host and, while profiling, name each step and
its phases in the trace (torch.profiler record_function ranges). Nothing in executor_svc changes; a
wrapper that does not find the function it wraps says so and leaves it alone.

Control, through files in $STEP_BREAKDOWN_DIR:
- `profile.start`: the first step after it appears that has more than 8 sequences (the main workload's
  first step, not the warm-up's) starts torch.profiler (CPU + CUDA activities, no stacks, no shapes) on
  the step thread;
- `profile.stop`: the profiler stops and writes `pagedserve_trace.json` (Chrome trace format); every
  step's host timing so far goes to `pagedserve_steps.json`; then `profile.done` appears, holding how
  long the export took;
- `steps.dump`: every step's host timing so far goes to `pagedserve_steps.json` again; the file is
  removed and `steps.dumped` appears.

Every step record: step id, sequences, tokens, prompt tokens (works of more than one token), whether a
CUDA graph ran it, its start and end on the host clock (perf_counter), the wait since the previous
step ended (the executor idle, waiting for the plan), and the host time of its phases: plan decode,
batch preparation, graph replay call, logits, sampling, result encoding.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "protos")]

import torch  # noqa: E402

log = logging.getLogger("step_breakdown")
OUT = Path(os.environ.get("STEP_BREAKDOWN_DIR", "/tmp/step_breakdown"))
START_FILE, STOP_FILE, DONE_FILE = OUT / "profile.start", OUT / "profile.stop", OUT / "profile.done"
DUMP_FILE, DUMPED_FILE = OUT / "steps.dump", OUT / "steps.dumped"
MIN_PROFILED_SEQS = 9               # the suite's warm-up runs 8 requests


class StepLog:
    """Host timing of every step, and the profiler."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.last_end = 0.0
        self.profiler: torch.profiler.profile | None = None
        self.profiled = False               # whether the profiler has run (it runs once)
        self.servicer: Any = None
        self.stream = 0                     # Execute streams begun (one per scheduler)
        self.lock = threading.Lock()

    def annotate(self, name: str) -> contextlib.AbstractContextManager:
        """A record_function range while profiling, else nothing."""
        if self.profiler is not None:
            return torch.profiler.record_function(name)
        return contextlib.nullcontext()

    def add_time(self, key: str, seconds: float) -> None:
        if self.current is not None:
            self.current[key] = self.current.get(key, 0.0) + seconds

    def maybe_start(self, num_seqs: int) -> None:
        """Start the profiler at the first big step after profile.start appears (on the step thread)."""
        if self.profiled or num_seqs < MIN_PROFILED_SEQS or not START_FILE.exists():
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
        self.profiler.start()
        self.profiled = True
        log.info("step_breakdown: profiler started")

    def stop(self) -> None:
        """Stop the profiler, export the trace and the step log (runs on the step thread)."""
        started = time.perf_counter()
        info: dict[str, Any] = {"profiled": self.profiled}
        if self.profiler is not None:
            prof, self.profiler = self.profiler, None
            prof.stop()
            stopped = time.perf_counter()
            prof.export_chrome_trace(str(OUT / "pagedserve_trace.json"))
            info.update(stop_s=stopped - started, export_s=time.perf_counter() - stopped)
        info["steps"] = self.dump()
        DONE_FILE.write_text(json.dumps(info))
        log.info("step_breakdown: %s", json.dumps(info))

    def dump(self) -> int:
        """Write every step's record so far; returns how many."""
        with self.lock:
            steps = list(self.steps)
        (OUT / "pagedserve_steps.json").write_text(json.dumps({"clock": "perf_counter", "steps": steps}))
        return len(steps)


STATE = StepLog()


def _timed(key: str, annotation: str | None = None):
    """Wrap a function: add its host time to the current step's `key`, in a named range if profiling."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                if annotation is not None:
                    with STATE.annotate(annotation):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            finally:
                STATE.add_time(key, time.perf_counter() - t0)
        return inner
    return wrap


def _patch(owner: Any, name: str, wrapper) -> None:
    original = getattr(owner, name, None)
    if original is None:
        print(f"step_breakdown: {owner.__name__}.{name} not found; not timed", file=sys.stderr)
        return
    setattr(owner, name, wrapper(original))


def install() -> None:
    """Wrap the executor's step path."""
    from executor_svc import cuda_graphs, flash_prefill, model_backend, runner, server
    from executor_svc.models import base

    decode = getattr(server, "plan_from_proto", None)

    def run_step(original):
        @functools.wraps(original)
        def inner(self, msg):
            STATE.servicer = self
            t0 = time.perf_counter()
            record: dict[str, Any] = {"stream": STATE.stream, "step_id": int(msg.step_id), "t_start": t0,
                                      "wait_s": t0 - STATE.last_end if STATE.last_end else None}
            STATE.current = record
            STATE.maybe_start(len(msg.sequences))
            record["profiled"] = STATE.profiler is not None
            try:
                with STATE.annotate(f"ps_step_{int(msg.step_id)}"):
                    return original(self, msg)
            finally:
                t1 = time.perf_counter()
                record["t_end"], record["host_s"] = t1, t1 - t0
                STATE.last_end = t1
                STATE.current = None
                with STATE.lock:
                    STATE.steps.append(record)
        return inner

    def decode_plan(original):
        @functools.wraps(original)
        def inner(msg):
            t0 = time.perf_counter()
            with STATE.annotate("ps:decode_plan"):
                plan = original(msg)
            STATE.add_time("decode_plan_s", time.perf_counter() - t0)
            record = STATE.current
            if record is not None:
                tokens = [w.num_tokens for w in plan.sequences]
                record.update(seqs=len(tokens), tokens=sum(tokens),
                              prompt_tokens=sum(n for n in tokens if n > 1),
                              prompt_seqs=sum(1 for n in tokens if n > 1),
                              context_tokens=sum(w.start_position + w.num_tokens for w in plan.sequences))
            return plan
        return inner

    def graph_run(original):
        @functools.wraps(original)
        def inner(*args, **kwargs):
            if STATE.current is not None:
                STATE.current["graph"] = True
            return original(*args, **kwargs)
        return inner

    _patch(server.ExecutorServicer, "_run_step", run_step)
    if decode is not None:
        server.plan_from_proto = decode_plan(decode)
    _patch(server, "result_to_proto", _timed("encode_s", "ps:encode_result"))
    _patch(runner, "prepare_batch", _timed("prepare_s", "ps:prepare_batch"))
    _patch(cuda_graphs.DecodeGraphs, "run",
           lambda fn: _timed("graph_run_s", "ps:graph_replay")(graph_run(fn)))
    _patch(base.CausalLM, "compute_logits", _timed("logits_s", "ps:logits"))
    _patch(runner.ModelRunner, "_sample", _timed("sample_s", "ps:sample"))
    _patch(flash_prefill, "gather_paged_kv", _timed("kv_gather_s", "ps:kv_gather"))
    _patch(runner.ModelRunner, "execute", _timed("execute_s"))

    def reset(original):
        @functools.wraps(original)
        def inner(*args, **kwargs):
            STATE.stream += 1
            return original(*args, **kwargs)
        return inner

    _patch(model_backend.ModelBackend, "reset_sequences", reset)


def watch() -> None:
    """Run profile.stop on the step thread (the profiler's own thread) when it appears; dump the step
    log whenever steps.dump appears."""
    stopped = False
    while True:
        time.sleep(0.2)
        if not stopped and STOP_FILE.exists():
            stopped = True
            servicer = STATE.servicer
            try:
                if servicer is not None:
                    servicer._worker.submit(STATE.stop).result()
                else:
                    STATE.stop()
            except Exception as err:            # the run goes on; the driver sees no trace
                DONE_FILE.write_text(json.dumps({"error": repr(err)}))
                log.exception("step_breakdown: stop failed")
        if DUMP_FILE.exists():
            DUMP_FILE.unlink()
            DUMPED_FILE.write_text(json.dumps({"steps": STATE.dump()}))


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    install()
    threading.Thread(target=watch, name="step-breakdown-watch", daemon=True).start()
    from executor_svc.__main__ import main as executor_main
    return executor_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
