"""One executor rank's Prometheus metrics: steps, forward and swap time, tokens and block movements.

The gRPC servicer records each step after the backend ran it; `pagedserve.metrics_http` serves the
registry. Torch-free: it reads only the plan and result dataclasses.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from pagedserve.contract.plan import StepPlan, StepResult

# No `_created` series: no dashboard reads them, and each counter and histogram would add one per label set.
disable_created_metrics()

# Seconds. A forward pass ranges from sub-millisecond (tiny models, the simulated backend) to seconds
# (big prefills); a step's swaps and copies are usually far shorter.
FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0)
SWAP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ExecutorMetrics:
    """One executor rank's metrics, in a CollectorRegistry of their own (`self.registry`).

    Every series carries the label `rank` (this rank's place in its tensor-parallel group): each rank is
    scraped as its own target, but its `instance` (host:port) changes with ephemeral ports, while the
    rank says which shard of the model a series belongs to. And `model_name`, as the scheduler's
    (pagedserve.model_label), so that a dashboard selects one model's ranks.

    Histograms (seconds):
      pagedserve_executor_forward_seconds   forward pass + sampling, per step with a forward batch
      pagedserve_executor_swap_seconds      swaps and copy-on-write copies, per step that moved blocks
    Counters:
      pagedserve_executor_steps_total                   plans answered, failed ones included
      pagedserve_executor_step_errors_total             plans answered with an error (malformed, failed)
      pagedserve_executor_tokens_total                  tokens whose K/V the forward passes computed
      pagedserve_executor_blocks_swapped_total{direction="out"|"in"}   GPU -> CPU, CPU -> GPU
      pagedserve_executor_blocks_copied_total           copy-on-write block copies
    Gauges:
      pagedserve_executor_gpu_kv_blocks     GPU KV blocks allocated (0 before InitCache)
      pagedserve_executor_cpu_kv_blocks     CPU swap blocks allocated

    A failed step counts only in the two step counters: it moved no blocks and computed no tokens
    (backends check a plan whole before changing anything).
    """

    def __init__(self, rank: int = 0, registry: CollectorRegistry | None = None,
                 model_name: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        self._labels = {"model_name": model_name, "rank": str(rank)}
        self.forward_seconds = self._add(Histogram, "pagedserve_executor_forward_seconds",
                                         "Forward pass and sampling time per step.", buckets=FORWARD_BUCKETS)
        self.swap_seconds = self._add(Histogram, "pagedserve_executor_swap_seconds",
                                      "Swap and copy-on-write time per step that moved blocks.",
                                      buckets=SWAP_BUCKETS)
        self.steps = self._add(Counter, "pagedserve_executor_steps_total",
                               "Step plans answered, failed ones included.")
        self.step_errors = self._add(Counter, "pagedserve_executor_step_errors_total",
                                     "Step plans answered with an error.")
        self.tokens = self._add(Counter, "pagedserve_executor_tokens_total",
                                "Tokens computed by forward passes.")
        swapped = Counter("pagedserve_executor_blocks_swapped_total",
                          "KV blocks swapped between GPU and CPU, by direction.",
                          [*self._labels, "direction"], registry=self.registry)
        self.blocks_swapped_out = swapped.labels(direction="out", **self._labels)
        self.blocks_swapped_in = swapped.labels(direction="in", **self._labels)
        self.blocks_copied = self._add(Counter, "pagedserve_executor_blocks_copied_total",
                                       "KV blocks copied for copy-on-write.")
        self.gpu_kv_blocks = self._add(Gauge, "pagedserve_executor_gpu_kv_blocks",
                                       "GPU KV blocks allocated.")
        self.cpu_kv_blocks = self._add(Gauge, "pagedserve_executor_cpu_kv_blocks",
                                       "CPU swap blocks allocated.")

    def _add(self, kind: Any, name: str, documentation: str, **kwargs: Any) -> Any:
        """A metric labelled `model_name` and `rank`, returned as this rank's one child series."""
        return kind(name, documentation, list(self._labels), registry=self.registry, **kwargs).labels(
            **self._labels)

    def record_step(self, plan: StepPlan, result: StepResult) -> None:
        """A step the backend ran: its timings, the tokens it computed and the blocks it moved."""
        self.steps.inc()
        if plan.sequences:
            self.forward_seconds.observe(result.forward_seconds)
            self.tokens.inc(plan.num_batched_tokens)
        if plan.swap_out or plan.swap_in or plan.copy:
            self.swap_seconds.observe(result.swap_seconds)
            self.blocks_swapped_out.inc(len(plan.swap_out))
            self.blocks_swapped_in.inc(len(plan.swap_in))
            self.blocks_copied.inc(len(plan.copy))

    def record_step_error(self) -> None:
        """A step answered with an error (a plan that did not decode, was malformed, or failed)."""
        self.steps.inc()
        self.step_errors.inc()

    def record_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        """The KV cache InitCache allocated."""
        self.gpu_kv_blocks.set(num_gpu_blocks)
        self.cpu_kv_blocks.set(num_cpu_blocks)
