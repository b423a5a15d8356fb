"""Bursts of requests sent at once (offline load) through the real stack on the simulated executor.

gRPC core resets calls that queue in the server before the application asks for them once more than
1,000 wait (a growing share, all past 3,000); the frontend sizes that backlog above its own queue limit,
so a burst loses nothing, and what the server must refuse it refuses with RESOURCE_EXHAUSTED, logged.
Full-size runs (10,000 requests, through one and through many clients) are the README's commands.
"""

from __future__ import annotations

import asyncio
import collections
import re

import pytest
from e2e_stack import RunningStack

from clients.bench_records import summarize
from clients.loadgen import WorkloadSpec, build_load_requests, run_workload

# Over the 3,000 calls at which gRPC core's default backlog refused every new one.
BURST = 3200
# A small swap space: the simulated pools are plain Python, and 4 GiB of them take seconds to build.
SIMULATED = ("--backend", "simulated", "--simulated-vocab-size", "512", "--max-num-seqs", "256",
             "--swap-space-bytes", str(16 * 2**20))


@pytest.fixture(scope="module")
def simulated_stack():
    """One stack on the simulated executor for the burst tests of this module."""
    running = RunningStack(*SIMULATED)
    yield running
    running.stop()


def _burst(target: str, count: int, num_clients: int):
    spec = WorkloadSpec(trace="fixed", num_requests=count, prompt_len=8, output_len=2, seed=3)
    requests = build_load_requests(spec, vocab_size=512, max_model_len=4096)
    records, duration = asyncio.run(run_workload(target, requests, seed=3, show_progress=False,
                                                 num_clients=num_clients))
    return summarize(records, duration)


@pytest.mark.slow
@pytest.mark.parametrize("num_clients", [1, 8])
def test_a_burst_over_grpcs_default_backlog_loses_no_request(simulated_stack, num_clients):
    summary = _burst(simulated_stack.target, BURST, num_clients)
    assert summary.failures_by_code == {}, summary.failures[:3]
    assert (summary.completed, summary.output_tokens) == (BURST, 2 * BURST)
    assert simulated_stack.metric("pagedserve_gpu_kv_usage_ratio") == 0


@pytest.mark.slow
def test_a_burst_past_the_waiting_limit_is_refused_with_resource_exhausted_each_logged_once(capsys):
    running = RunningStack(*SIMULATED, "--max-num-seqs", "4", "--max-waiting-requests", "100")
    try:
        summary = _burst(running.target, 1500, num_clients=4)
        rejected = running.metric('pagedserve_requests_rejected_total{code="RESOURCE_EXHAUSTED"}')
    finally:
        running.stop()
    assert set(summary.failures_by_code) == {"RESOURCE_EXHAUSTED"}
    assert summary.completed + summary.failed == 1500 and summary.failed == rejected > 0
    assert all("waiting queue is full" in f.message for f in summary.failures)
    logged = collections.Counter(re.findall(r"request (bench-\d+) refused: RESOURCE_EXHAUSTED",
                                            capsys.readouterr().err))
    assert logged == {f"bench-{f.request}": 1 for f in summary.failures}
