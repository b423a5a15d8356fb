"""The rank's own view of a wedged step: health reads NOT_SERVING while one step has run too long.

A step stuck in a kernel, a collective or a driver call leaves the gRPC server answering: only the
worker thread is stuck. The scheduler gives up on such a step after its `executor_step_timeout_seconds`
(sent in InitCache), but it cannot restart a process. This watchdog makes the rank say it is not
serving for as long as that lasts, so that whatever supervises the process (`pagedserve serve`'s
liveness probe, a container health check) restarts it, as it would a rank that stopped answering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("pagedserve.executor")
CHECK_INTERVAL_SECONDS = 0.5


class StepWatchdog:
    """Tracks the step on the worker thread; `run` flips health while one is overdue.

    `step_started` and `step_ended` are called on the worker thread as the oldest step in flight changes
    (a float assignment, safe across threads); `run` is a task on the event loop. `timeout` 0 never flips.
    """

    def __init__(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        self.timeout = 0.0
        self._set_serving = set_serving
        self._started: float | None = None     # monotonic start of the step in progress, if any
        self.overdue = False

    def step_started(self, at: float | None = None) -> None:
        """The oldest step in flight began at `at` (time.monotonic(); now when None)."""
        self._started = time.monotonic() if at is None else at

    def step_ended(self) -> None:
        """No step is in flight."""
        self._started = None

    def running_seconds(self) -> float:
        """How long the step in progress has run (0 when none runs)."""
        started = self._started
        return 0.0 if started is None else time.monotonic() - started

    async def run(self) -> None:
        """Check twice a second; NOT_SERVING once the step in progress is overdue, SERVING when it ends."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL_SECONDS)
            await self.check()

    async def check(self) -> None:
        """One check: flip health when the overdue state changed."""
        running = self.running_seconds()
        overdue = self.timeout > 0 and running > self.timeout
        if overdue == self.overdue:
            return
        self.overdue = overdue
        if overdue:
            log.error("a step has run for %.0f s, past the scheduler's step timeout of %g s: reporting "
                      "NOT_SERVING so that the rank is restarted", running, self.timeout)
        else:
            log.warning("the overdue step ended: reporting SERVING again")
        await self._set_serving(not overdue)
