"""Prometheus and Grafana for the compose stack: the scrape config is valid and reaches every PagedServe
service of every layout; the dashboard is valid JSON whose queries parse as PromQL and name only metrics
the scheduler and executors export, and it covers throughput, latency, KV cache, preemption and queues."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from executor_svc.metrics import ExecutorMetrics
from scheduler_svc.metrics import SchedulerMetrics
from tests.docker.deployment_files import (
    DOCKER,
    LAYOUTS,
    environment_mapping,
    load_compose,
    pagedserve_services,
)
from tests.prometheus_server import require_promtool

PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "pagedserve.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "pagedserve.yml"
# Grafana's variables; Prometheus never sees them (Grafana substitutes a duration or a regex first).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$model_name": ".*"}
# The dashboard's data source is a variable, so that it imports into a Grafana whose Prometheus has any uid.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What the dashboard must show (the deployment's brief): throughput, latency percentiles, KV cache,
# preemptions, swapping, and the queues.
REQUIRED_METRICS = {
    "pagedserve_generation_tokens_total", "pagedserve_requests_finished_total",
    "pagedserve_time_to_first_token_seconds_bucket", "pagedserve_inter_token_latency_seconds_bucket",
    "pagedserve_e2e_request_latency_seconds_bucket", "pagedserve_gpu_kv_usage_ratio",
    "pagedserve_preemptions_total", "pagedserve_executor_blocks_swapped_total",
    "pagedserve_requests_running", "pagedserve_requests_waiting",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                   "unless", "offset", "inf", "nan"}


def exported_metric_names() -> set[str]:
    """Every sample name the scheduler and an executor rank expose (histogram buckets, counters' _total)."""
    names = set()
    for registry in (SchedulerMetrics().registry, ExecutorMetrics(rank=0).registry):
        assert isinstance(registry, CollectorRegistry)
        names |= {sample.name for family in registry.collect() for sample in family.samples}
    return names


def prometheus_expression(expr: str) -> str:
    """A panel's query as Prometheus receives it, with Grafana's variables substituted."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, aggregations,
    keywords, label names (in `{...}` or `by (...)`) or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", prometheus_expression(expr))     # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)                                   # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                                  # range selectors
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if not call and name.lower() not in PROMQL_KEYWORDS:
            names.add(name)
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def query_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def expressions() -> list[str]:
    return [target["expr"] for panel in query_panels() for target in panel["targets"]]


# ---------------------------------------------------------------- Prometheus

def test_promtool_accepts_the_scrape_config() -> None:
    result = subprocess.run([require_promtool(), "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def scrape_targets() -> dict[tuple[str, int], str]:
    """(DNS name, port) -> job, for every target the config can discover."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return {(name, sd["port"]): job["job_name"] for job in config["scrape_configs"]
            for sd in job.get("dns_sd_configs", []) for name in sd["names"]}


def test_every_pagedserve_service_of_every_layout_is_scraped() -> None:
    targets = scrape_targets()
    services = {}
    for layout in LAYOUTS:
        services.update(pagedserve_services(layout))
    for name, service in services.items():
        job = targets.get((name, service.config.metrics_port))
        assert job is not None, f"{name}'s /metrics on port {service.config.metrics_port} is not scraped"
        assert service.kind in job
    # ... and the config names nothing that no layout runs.
    assert {name for name, _ in targets} == set(services)


def test_grafana_reads_the_compose_prometheus() -> None:
    compose = load_compose(LAYOUTS[0].files)
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert any(str(port).endswith(":9090") for port in compose["prometheus"]["ports"])
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in compose["prometheus"]["volumes"]
    scrape_interval = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape_interval


# ---------------------------------------------------------------- Grafana

def test_grafana_provisions_the_dashboard_from_its_mount() -> None:
    grafana = load_compose(LAYOUTS[0].files)["grafana"]
    mounts = {PurePosixPath(v.split(":")[1]): Path(DOCKER / v.split(":")[0]).resolve()
              for v in grafana["volumes"] if v.startswith(".")}
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    dashboards_dir = PurePosixPath(provider["options"]["path"])
    assert mounts[dashboards_dir] == DASHBOARD.parent.resolve()
    assert mounts[PurePosixPath("/etc/grafana/provisioning")] == DATASOURCES.parents[1].resolve()
    home = environment_mapping(grafana["environment"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home) == dashboards_dir / DASHBOARD.name


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["panels"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in query_panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == DATASOURCE, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


def test_the_dashboard_imports_into_any_grafana() -> None:
    """No data source uid of ours: a `datasource` variable picks any Prometheus (the provisioned one is
    the default), and a `model_name` variable (multi-value, All by default) filters every query."""
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    model = variables["model_name"]
    assert model["type"] == "query" and model["datasource"] == DATASOURCE
    assert model["includeAll"] and model["multi"] and model["allValue"] == ".*"
    assert "label_values(" in model["query"]["query"] and "model_name" in model["query"]["query"]
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    assert f'"uid": "{provisioned}"' not in DASHBOARD.read_text()
    assert "id" not in board          # an id would clash with a dashboard of the importing Grafana


def test_every_dashboard_query_filters_by_model_name() -> None:
    for expr in expressions():
        selectors = re.findall(r"\b(pagedserve_\w+)(\{[^}]*\})?", expr)
        assert selectors, expr
        for name, matchers in selectors:
            assert 'model_name=~"$model_name"' in matchers, f"{name} in {expr!r}"


def test_the_dashboard_queries_only_exported_metrics() -> None:
    exported = exported_metric_names()
    for expr in expressions():
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r} queries metrics nobody exports: {sorted(names - exported)}"


def test_the_dashboard_covers_what_an_operator_needs() -> None:
    used = set().union(*(metric_names(expr) for expr in expressions()))
    assert used >= REQUIRED_METRICS, sorted(REQUIRED_METRICS - used)
    quantiles = [e for e in expressions() if "histogram_quantile" in e]
    assert len(quantiles) >= 9
    # A quantile over several series must keep `le`, and reads the cumulative buckets.
    assert all(re.search(r"by \((?:[\w, ]*\b)?le\b", e) and re.search(r"_bucket(\{[^}]*\})?\[", e)
               for e in quantiles)


def test_the_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression (it has no other offline parser)."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": prometheus_expression(expr)}
        for i, expr in enumerate(expressions())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([require_promtool(), "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("expr", "names"), [
    ("histogram_quantile(0.5, sum by (le) (rate(a_seconds_bucket[$__rate_interval])))", {"a_seconds_bucket"}),
    ('sum by (mode) (rate(b_total{rank="0", mode=~"s.*"}[5m])) / on (mode) c', {"b_total", "c"}),
    ("sum(rate(x_sum[1m])) / sum(rate(x_count[1m])) > bool 0.5", {"x_sum", "x_count"}),
    ("max(gauge_ratio) or vector(0)", {"gauge_ratio"}),
])
def test_metric_names_finds_the_selected_metrics(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
