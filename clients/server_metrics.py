"""What the server says about a benchmark run: its Prometheus counters before and after, differenced.

The scheduler keeps per-iteration histograms (batched requests, KV utilization, control-plane time,
decode roofline ratio) whose `_sum` / `_count` differences over a run are that run's means, so a
benchmark needs no access to the server beyond its /metrics page.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, float]


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text page as `name{label="v",...}` -> value (labels sorted).

    The `model_name` label is left out of the key: one scheduler serves one model, and a benchmark
    reads the same names whatever that model is called.
    """
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def scrape(url: str, timeout: float = 10.0) -> Samples:
    """The samples of the metrics page at `url` (http://host:port/metrics)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_samples(response.read().decode())


@dataclass(frozen=True, slots=True)
class ServerStats:
    """Means over the run's iterations and totals of the run, from the scheduler's metrics.

    NaN where the run had no such iteration (no decode-only step: no roofline ratio).
    """

    iterations: int
    mean_batched_requests: float
    mean_kv_utilization: float
    mean_kv_sharing_saved: float        # fraction of GPU blocks copy-on-write sharing saved
    preemptions_swap: int
    preemptions_recompute: int
    control_plane_fraction: float       # control-plane seconds / iteration seconds
    mean_iteration_ms: float
    decode_steps: int
    mean_decode_roofline: float         # memory-roofline time / forward time of decode-only steps
    gpu_kv_blocks: int
    block_size: int

    @classmethod
    def between(cls, before: Mapping[str, float], after: Mapping[str, float]) -> ServerStats:
        """The stats of what happened between two scrapes."""
        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        def mean(histogram: str) -> float:
            count = delta(f"{histogram}_count")
            return delta(f"{histogram}_sum") / count if count else math.nan

        iterations = delta("pagedserve_step_duration_seconds_count")
        step_seconds = delta("pagedserve_step_duration_seconds_sum")
        control = delta("pagedserve_step_control_plane_seconds_sum")
        return cls(
            iterations=int(iterations),
            mean_batched_requests=mean("pagedserve_step_batched_requests"),
            mean_kv_utilization=mean("pagedserve_step_kv_utilization_ratio"),
            mean_kv_sharing_saved=mean("pagedserve_step_kv_sharing_saved_ratio"),
            preemptions_swap=int(delta('pagedserve_preemptions_total{mode="swap"}')),
            preemptions_recompute=int(delta('pagedserve_preemptions_total{mode="recompute"}')),
            control_plane_fraction=control / step_seconds if step_seconds else math.nan,
            mean_iteration_ms=1000 * step_seconds / iterations if iterations else math.nan,
            decode_steps=int(delta("pagedserve_decode_roofline_ratio_count")),
            mean_decode_roofline=mean("pagedserve_decode_roofline_ratio"),
            gpu_kv_blocks=int(after.get("pagedserve_gpu_kv_blocks", 0)),
            block_size=int(after.get("pagedserve_kv_block_size_tokens", 0)))
