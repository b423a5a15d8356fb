"""A small stack on the embedded model for the benchmark tests: a short profiling step and small KV
pools, so it starts in a few seconds on the CPU."""

from __future__ import annotations

from collections.abc import Iterator

from tests.e2e.e2e_stack import RunningStack, require_model

SMALL_STACK = ("--max-num-batched-tokens", "1024", "--swap-space-bytes", str(16 * 2**20),
               "--cpu-kv-cache-bytes", str(32 * 2**20))


def running_small_stack() -> Iterator[RunningStack]:
    """Yields a running small stack and stops it afterwards (wrap it as a module-scoped fixture)."""
    require_model()
    running = RunningStack(*SMALL_STACK)
    yield running
    running.stop()
