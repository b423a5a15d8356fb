"""The worker thread's loop over one Execute stream: step N+1 is launched before step N is answered.

A step is launched (plan decoded and checked, block operations and the forward pass queued on the
GPU) and later finished (the host waits for its sampled tokens and encodes the result). With
`max_in_flight` 2, the plan of step N+1 is launched as soon as it has arrived, while the GPU still
computes step N; its forward pass is queued behind step N's sampling, and takes step N's sampled
tokens as input on the device. The host work between two steps (result encode, plan decode, batch
preparation, graph inputs) then overlaps the GPU instead of leaving it idle.

The next plan is waited for only while the oldest step still computes. A scheduler that plans the
next step only after it has this step's result (beam search, a drained queue) therefore gets the
result as soon as it is ready, and the loop never waits for a plan that will not come first.
Answers go out strictly in step order. The loop runs on the executor's `WorkerThread`, a daemon.
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

# How long one wait for a plan lasts before the oldest step is asked again whether it is done.
POLL_SECONDS = 0.0005

Answer = TypeVar("Answer")
Answer_co = TypeVar("Answer_co", covariant=True)


class StepHandle(Protocol[Answer_co]):
    """A launched step."""

    def ready(self) -> bool:
        """Whether finishing it now would not wait for the device."""
        ...

    def finish(self) -> Answer_co:
        """Its answer (waits for the device if needed); never raises."""
        ...


class StepClock(Protocol):
    """What watches the oldest step's age (StepWatchdog)."""

    def step_started(self, at: float | None = None) -> None:
        """The oldest step in flight was launched at `at` (monotonic seconds; now when None)."""
        ...

    def step_ended(self) -> None:
        """No step is in flight."""
        ...


class _Stop:
    """The end of the stream: the steps in flight are answered, then the loop returns."""


STOP = _Stop()


class PlanInbox(Generic[Answer]):
    """Plans from the event loop (`put`, any thread) to the worker thread (`get`), in arrival order."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()

    def put(self, plan: object) -> None:
        """Hand over the next plan, or STOP."""
        self._queue.put(plan)

    def get(self, timeout: float | None = None) -> object | None:
        """The next plan or STOP; None if nothing came within `timeout` (0: do not wait; None: forever)."""
        try:
            if timeout == 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


class WorkerThread(concurrent.futures.Executor):
    """One daemon thread that runs the calls submitted to it in order (an executor for run_in_executor).

    The executor's backend calls all run on it. A daemon, unlike a pool thread, is not joined when the
    interpreter exits: a step stuck in a device call, or a stream whose end never reached the worker,
    must not keep a stopped executor process alive (its scheduler recovers the requests either way).
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[..., Any],
                                             tuple[Any, ...]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Queue `fn(*args, **kwargs)`; its future resolves when the thread has run it."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((future, functools.partial(fn, **kwargs) if kwargs else fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as err:        # handed to the awaiting coroutine, as a pool would
                future.set_exception(err)


@dataclass(slots=True)
class _InFlight(Generic[Answer]):
    handle: StepHandle[Answer]
    launched_at: float = field(default_factory=time.monotonic)


class StepPipeline(Generic[Answer]):
    """Launch every plan of an inbox and emit the answers in order, with up to `max_in_flight` steps
    launched and unanswered (1: each step is answered before the next plan is read)."""

    def __init__(self, launch: Callable[[object], StepHandle[Answer]], emit: Callable[[Answer], None],
                 clock: StepClock, max_in_flight: int = 2) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be at least 1, got {max_in_flight}")
        self._launch = launch
        self._emit = emit
        self._clock = clock
        self._max_in_flight = max_in_flight
        self._in_flight: deque[_InFlight[Answer]] = deque()

    def run(self, inbox: PlanInbox[Answer]) -> None:
        """Serve the inbox until STOP; every step launched is answered before this returns."""
        try:
            while True:
                if len(self._in_flight) >= self._max_in_flight:
                    self._answer_oldest()
                    continue
                plan = self._next_plan(inbox)
                if plan is None:                    # the oldest step is done and no plan is here
                    self._answer_oldest()
                elif plan is STOP:
                    break
                else:
                    self._start(plan)
        finally:
            while self._in_flight:
                self._answer_oldest()

    def _next_plan(self, inbox: PlanInbox[Answer]) -> object | None:
        """The next plan; None as soon as the oldest step is done while none has arrived."""
        if not self._in_flight:
            return inbox.get()
        oldest = self._in_flight[0].handle
        while True:
            plan = inbox.get(timeout=0)
            if plan is not None:
                return plan
            if oldest.ready():
                return None
            plan = inbox.get(timeout=POLL_SECONDS)
            if plan is not None:
                return plan

    def _start(self, plan: object) -> None:
        if not self._in_flight:
            self._clock.step_started()
        self._in_flight.append(_InFlight(self._launch(plan)))

    def _answer_oldest(self) -> None:
        oldest = self._in_flight.popleft()
        answer = oldest.handle.finish()
        if self._in_flight:
            self._clock.step_started(self._in_flight[0].launched_at)
        else:
            self._clock.step_ended()
        self._emit(answer)
