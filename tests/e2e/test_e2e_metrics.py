"""Both processes' metrics: Prometheus conventions (promtool) and a real Prometheus scrape."""

from __future__ import annotations

from tests.prometheus_server import (
    PrometheusServer,
    promtool_check_metrics,
    require_prometheus,
    require_promtool,
)


def test_both_processes_pass_promtool_check_metrics(stack):
    require_promtool()
    with stack.client() as client:
        client.generate("def f():", max_tokens=4)
    for name in ("scheduler", "executor-0"):
        code, report = promtool_check_metrics(stack.metrics_text(name).encode())
        assert code == 0 and not report.strip(), f"{name}: {report}"


def test_prometheus_scrapes_the_scheduler_and_the_executor(stack, tmp_path):
    require_prometheus()
    with stack.client() as client:
        for i in range(3):
            client.generate(f"def f{i}():", max_tokens=5, ignore_eos=True)
    targets = {"scheduler": [stack.stack.processes["scheduler"].metrics_address],
               "executor": [stack.stack.processes["executor-0"].metrics_address]}
    with PrometheusServer(tmp_path / "prometheus", targets) as prometheus:
        assert len(prometheus.wait_for_targets_up(timeout=60)) == 2
        finished = prometheus.query_until('sum(pagedserve_requests_finished_total{finish_reason="length"})',
                                          lambda r: bool(r) and float(r[0]["value"][1]) >= 3, timeout=30)
        assert float(finished[0]["value"][1]) >= 3
        steps = prometheus.query_until("pagedserve_executor_steps_total", lambda r: bool(r), timeout=30)
        assert float(steps[0]["value"][1]) >= 5
        # Async scheduling is on by default: a decode step is planned while the one before it runs.
        ahead = prometheus.query_until('pagedserve_steps_planned_total{when="ahead"}',
                                       lambda r: bool(r) and float(r[0]["value"][1]) > 0, timeout=30)
        assert float(ahead[0]["value"][1]) > 0
        ttft = prometheus.query_until("pagedserve_time_to_first_token_seconds_count", lambda r: bool(r),
                                      timeout=30)
        assert float(ttft[0]["value"][1]) >= 3
