"""Serving benchmark results: the JSON a run writes, its markdown table, and the latency-vs-rate plot.

A result is one system on one workload at one or more request rates:

    {"system": "pagedserve", "workload": {...}, "runs": [{"request_rate": r, "client": {...},
     "server": {...} | null}, ...], "config": {...}, "environment": {...}}

`client` is a ClientSummary and `server` a ServerStats as dicts (the Hugging Face peers have no server
stats). Tables and plots take any number of results, so one figure compares several systems.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clients.bench_records import ClientSummary
from clients.server_metrics import ServerStats
from clients.tables import markdown_table
from pagedserve.errors import InvalidArgumentError

Result = Mapping[str, Any]

COLUMNS = ("system", "rate (req/s)", "requests", "failed", "req/s", "output tok/s", "total tok/s",
           "norm. latency (s/tok)", "TTFT p50 (ms)", "TTFT p99 (ms)", "TPOT p50 (ms)", "TPOT p99 (ms)",
           "ITL p50 (ms)", "ITL p99 (ms)", "batched reqs", "KV util",
           "KV saved by sharing", "preemptions", "control plane", "decode roofline")


def run_entry(request_rate: float, client: ClientSummary, server: ServerStats | None) -> dict[str, Any]:
    """One run of a result."""
    return {"request_rate": request_rate, "client": dataclasses.asdict(client),
            "server": dataclasses.asdict(server) if server is not None else None}


def dumps(result: Any) -> str:
    """JSON that strict parsers read: NaN becomes null and infinity the string "inf"."""
    return json.dumps(_strict(result), indent=2) + "\n"


def _strict(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def request_rate(run: Mapping[str, Any]) -> float:
    """A run's request rate (infinity for offline), as written by `dumps` or not."""
    return float(run["request_rate"])


def _or_dash(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def table_row(system: str, run: Mapping[str, Any]) -> list[object]:
    """The table cells of one run."""
    c, s = run["client"], run["server"] or {}
    rate = request_rate(run)
    preemptions = (s["preemptions_swap"] + s["preemptions_recompute"]) if s else None
    return [system, "offline" if math.isinf(rate) else f"{rate:g}", c["completed"], failed_cell(c),
            round(c["requests_per_s"], 2), round(c["output_tokens_per_s"], 1),
            round(c["total_tokens_per_s"], 1),
            _or_dash(c["normalized_latency_s"], ".4f"),
            *(_or_dash(c[m][p], ".1f") for m in ("ttft", "tpot", "itl") for p in ("p50_ms", "p99_ms")),
            _or_dash(s.get("mean_batched_requests"), ".1f"), _or_dash(s.get("mean_kv_utilization"), ".1%"),
            _or_dash(s.get("mean_kv_sharing_saved"), ".1%"),
            _or_dash(preemptions, "d"), _or_dash(s.get("control_plane_fraction"), ".1%"),
            _or_dash(s.get("mean_decode_roofline"), ".2f")]


def failed_cell(client: Mapping[str, Any]) -> str:
    """Failed requests and their codes, as `3 (UNAVAILABLE 2, INTERNAL 1)`; `0` when none failed."""
    if not client["failed"]:
        return "0"
    by_code = client.get("failures_by_code") or {}
    codes = ", ".join(f"{code} {count}" for code, count in sorted(by_code.items(), key=lambda kv: -kv[1]))
    return f"{client['failed']} ({codes})" if codes else str(client["failed"])


def failure_lines(client: Mapping[str, Any], examples: int = 1) -> list[str]:
    """For a run's failed requests: one line per code with its count and the first failures' messages."""
    lines = []
    for code, count in (client.get("failures_by_code") or {}).items():
        first = [f for f in client.get("failures", ()) if f["code"] == code][:examples]
        shown = "; ".join(f"request {f['request']}: {f['message']}" for f in first)
        lines.append(f"failed: {count} x {code} (e.g. {shown})")
    return lines


SUMMARY_WIDTH = 100        # the terminal summary's lines never exceed this
_KEY_WIDTH = 40


def summary(system: str, run: Mapping[str, Any], api: str = "grpc") -> str:
    """One run as `vllm bench serve` prints it: key/value lines under a title, sections per latency.

    Each line fits SUMMARY_WIDTH columns whatever the values; the wide table (`markdown`) is for files.
    """
    c, s = run["client"], run["server"]
    rate = request_rate(run)
    lines = [_title(" Serving Benchmark Result ", "="),
             _pair("System", system), _pair("API", api),
             _pair("Request rate (req/s)", "inf (offline)" if math.isinf(rate) else f"{rate:g}"),
             _pair("Successful requests", c["completed"]), _pair("Failed requests", failed_cell(c)),
             _pair("Benchmark duration (s)", _or_dash(c["duration_s"], ".2f")),
             _pair("Total input tokens", c["prompt_tokens"]),
             _pair("Input tokens from the prefix cache", c.get("cached_prompt_tokens", 0)),
             _pair("Total generated tokens", c["output_tokens"]),
             _pair("Request throughput (req/s)", _or_dash(c["requests_per_s"], ".2f")),
             _pair("Output token throughput (tok/s)", _or_dash(c["output_tokens_per_s"], ".2f")),
             _pair("Total token throughput (tok/s)", _or_dash(c["total_tokens_per_s"], ".2f")),
             _pair("Normalized latency (s/token)", _or_dash(c["normalized_latency_s"], ".4f")),
             _pair("Mean E2E latency (ms)", _or_dash(_ms(c.get("mean_latency_s")), ".2f"))]
    for key, title, name in (("ttft", "Time to First Token", "TTFT"),
                             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                             ("itl", "Inter-token Latency", "ITL")):
        lines += [_title(title, "-"), *(_pair(f"{label} {name} (ms)", _or_dash(c[key][field], ".2f"))
                                        for label, field in (("Mean", "mean_ms"), ("Median", "p50_ms"),
                                                             ("P99", "p99_ms")))]
    if s:
        lines += [_title("Server (scheduler metrics)", "-"), *_server_lines(s)]
    lines.append("=" * len(lines[0]))
    return "\n".join(line[:SUMMARY_WIDTH] for line in lines)


def _server_lines(s: Mapping[str, Any]) -> list[str]:
    return [_pair("Engine iterations", s["iterations"]),
            _pair("Batched requests (mean)", _or_dash(s.get("mean_batched_requests"), ".1f")),
            _pair("KV utilization (mean)", _or_dash(s.get("mean_kv_utilization"), ".1%")),
            _pair("KV blocks saved by sharing (mean)", _or_dash(s.get("mean_kv_sharing_saved"), ".1%")),
            _pair("Preemptions (swap / recompute)",
                  f"{s['preemptions_swap']} / {s['preemptions_recompute']}"),
            _pair("Control plane share of step time", _or_dash(s.get("control_plane_fraction"), ".1%")),
            _pair("Decode roofline ratio (mean)", _or_dash(s.get("mean_decode_roofline"), ".2f"))]


def _title(text: str, fill: str) -> str:
    return text.center(_KEY_WIDTH + 10, fill)


def _pair(key: str, value: object) -> str:
    return f"{key + ':':<{_KEY_WIDTH}} {value}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def markdown(results: Sequence[Result]) -> str:
    """One table row per system and rate."""
    rows = [table_row(r["system"], run) for r in results for run in r["runs"]]
    return markdown_table(COLUMNS, rows)


def load_results(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Results from JSON files; a file may hold one result or a list of them."""
    results: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        results.extend(data if isinstance(data, list) else [data])
    return results


def _latency(run: Mapping[str, Any]) -> float:
    """A run's normalized latency; NaN for a run that finished nothing (null in its JSON)."""
    value = run["client"]["normalized_latency_s"]
    return math.nan if value is None else value


def plot_latency_vs_rate(results: Sequence[Result], path: Path, title: str = "") -> None:
    """Normalized latency against request rate, one line per system (paper Fig. 12 style).

    Offline runs have no rate and are left out; systems with no online run are skipped.
    """
    try:
        import matplotlib
    except ImportError:
        raise InvalidArgumentError("plot", "plots need matplotlib: pip install 'pagedserve[bench]'") from None
    matplotlib.use("Agg")               # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for result in results:
        points = sorted(((request_rate(run), _latency(run)) for run in result["runs"]
                         if not math.isinf(request_rate(run))), key=lambda point: point[0])
        if points:
            rates, latencies = zip(*points, strict=True)
            ax.plot(rates, latencies, marker="o", label=result["system"])
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("normalized latency (s/token)")
    ax.set_title(title or "normalized latency vs request rate")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
