"""Time from the README's run command to the first streamed token, over several runs.

Starts `pagedserve serve --demo-prompt TEXT` (the README's run command) as a fresh process for each run,
reads its stdout until the first character of the completion after the prompt arrives, then stops the
stack with SIGINT. Each run's stack log lines are timestamped relative to the launch, so a slow run
shows where its time went (the executor's "loaded", "KV cache" and the engine's "serving" lines).

    .venv/bin/python benchmarks/first_token.py --runs 5 --json benchmarks/results/first_token_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):"
# Stack log lines worth a timestamp in the report: where startup time goes.
MILESTONES = {"scheduler listening": "pagedserve-scheduler listening on",
              "executor loaded": "pagedserve.executor: loaded",
              "executor listening": "pagedserve-executor listening on",
              "kv cache sized": "pagedserve.executor: KV cache:",
              "engine serving": "pagedserve.engine: serving"}


def one_run(command: list[str], timeout: float) -> dict[str, object]:
    """Launch `command`, wait for the first completion character, stop it; the run's timings."""
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    marks: dict[str, float] = {}
    threading.Thread(target=_watch_log, args=(proc, start, marks), daemon=True).start()
    first = _first_token(proc, start, timeout)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"first_token_s": first, "milestones_s": marks}


def _watch_log(proc: subprocess.Popen, start: float, marks: dict[str, float]) -> None:
    assert proc.stderr is not None
    for raw in proc.stderr:
        line = raw.decode(errors="replace")
        for name, text in MILESTONES.items():
            if text in line and name not in marks:
                marks[name] = round(time.monotonic() - start, 3)


def _first_token(proc: subprocess.Popen, start: float, timeout: float) -> float | None:
    """Seconds until stdout holds a character after the demo's `---` header and the echoed prompt."""
    assert proc.stdout is not None
    marker = ("---\n" + PROMPT).encode()
    seen = b""
    deadline = start + timeout
    while time.monotonic() < deadline:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            return None                         # the stack exited before streaming
        seen += chunk
        at = seen.find(marker)
        if at >= 0 and len(seen) > at + len(marker):
            return round(time.monotonic() - start, 3)
    return None


def main() -> int:
    """Run the command several times; print and optionally write the median and every run."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take")
    parser.add_argument("--json", type=Path, default=None, help="write the runs here")
    parser.add_argument("command", nargs="*", help="the command (default: the README's run command)")
    args = parser.parse_args()
    command = args.command or [str(REPO / ".venv" / "bin" / "pagedserve"), "serve", "--demo-prompt", PROMPT]
    runs = []
    for i in range(args.runs):
        run = one_run(command, args.timeout)
        print(f"run {i + 1}: first token after {run['first_token_s']} s  {run['milestones_s']}", flush=True)
        runs.append(run)
    times = [r["first_token_s"] for r in runs if r["first_token_s"] is not None]
    result = {"command": " ".join(command), "runs": runs,
              "median_first_token_s": statistics.median(times) if times else None,
              "failed_runs": args.runs - len(times), "machine": _machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"median {result['median_first_token_s']} s over {len(times)} runs", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if len(times) == args.runs else 1


def _machine() -> dict[str, object]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
            "processor": platform.processor() or platform.machine(),
            "load_average_at_end": os.getloadavg()}


if __name__ == "__main__":
    sys.exit(main())
