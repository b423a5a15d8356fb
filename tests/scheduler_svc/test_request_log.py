"""The per-request log line (finished, aborted, refused), the scheduler's model_name label, and an idle
scheduler's KV gauges, on a real scheduler over the simulated executor in this process."""

from __future__ import annotations

import asyncio
import logging

import pytest

from clients.client import AsyncPagedServeClient, PagedServeError
from executor_svc.config import ExecutorConfig
from executor_svc.server import start_server
from executor_svc.simulated_backend import SimulatedBackend
from scheduler_svc.config import SchedulerServiceConfig
from scheduler_svc.request_log import RequestSummary, format_summary
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.server import SchedulerServer


def test_the_summary_line_names_every_field_as_key_value():
    line = format_summary(RequestSummary("r-1", "stop", 12, 34, 0.0123, 1.5, 2))
    assert line == ("request r-1 finished: finish_reason=stop prompt_tokens=12 output_tokens=34 "
                    "ttft_s=0.012 e2e_s=1.500 preemptions=2")
    assert format_summary(RequestSummary("r-2", "aborted", 3, 0, None, 0.2, 0)).startswith(
        "request r-2 aborted: finish_reason=aborted")
    assert "ttft_s=- " in format_summary(RequestSummary("r-3", "error", 3, 0, None, 0.2, 0))


def gauge(scheduler: SchedulerServer, name: str) -> float | None:
    return scheduler.metrics.registry.get_sample_value(name, {"model_name": "tiny-sim"})


async def _serve_and_send() -> SchedulerServer:
    executor_config = ExecutorConfig(backend="simulated", port=0, metrics_port=-1, simulated_vocab_size=256)
    executor, port = await start_server(executor_config, SimulatedBackend(executor_config))
    config = SchedulerServiceConfig.of(port=0, http_port=0, metrics_port=-1, served_model_name="tiny-sim",
                                       executor_addresses=f"127.0.0.1:{port}", startup_timeout_seconds=30,
                                       swap_space_bytes=2**20)
    scheduler = SchedulerServer(config)
    await scheduler.start()
    await scheduler.engine.start()
    try:
        assert gauge(scheduler, "pagedserve_kv_utilization_ratio") == 0.0      # idle: nothing held
        async with AsyncPagedServeClient(f"127.0.0.1:{scheduler.port}") as client:
            await client.generate([5, 6, 7], max_tokens=4, ignore_eos=True, request_id="done-1")
            with pytest.raises(PagedServeError):
                await client.generate([5, 6], max_tokens=4, temperature=-1.0, request_id="bad-1")
        scheduler.engine.submit("gone-1", [5, 6, 7, 8], SamplingParams(max_tokens=50, ignore_eos=True))
        assert scheduler.engine.abort("gone-1")
        await asyncio.sleep(0.1)        # the engine's loop records the freed blocks
        assert gauge(scheduler, "pagedserve_kv_utilization_ratio") == 0.0
        return scheduler
    finally:
        await scheduler.engine.stop()
        await scheduler.server.stop(grace=0)
        await executor.stop(grace=0)


def test_each_request_that_ends_logs_one_info_line_and_metrics_carry_the_model_name(caplog):
    caplog.set_level(logging.INFO, logger="pagedserve.requests")
    scheduler = asyncio.run(_serve_and_send())
    lines = {r.request_id: r for r in caplog.records if r.name == "pagedserve.requests"}
    assert sorted(lines) == ["bad-1", "done-1", "gone-1"]
    assert all(r.levelno == logging.INFO for r in lines.values())
    done = lines["done-1"].getMessage()
    assert done.startswith("request done-1 finished: finish_reason=length prompt_tokens=3 output_tokens=4 ")
    assert "ttft_s=0." in done and "preemptions=0" in done
    assert lines["gone-1"].getMessage().startswith("request gone-1 aborted: finish_reason=aborted")
    assert "refused: INVALID_ARGUMENT: temperature" in lines["bad-1"].getMessage()
    assert scheduler.metrics.registry.get_sample_value(
        "pagedserve_requests_finished_total", {"model_name": "tiny-sim", "finish_reason": "length"}) == 1
