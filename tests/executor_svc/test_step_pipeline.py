"""The Execute stream's step pipeline, with scripted steps: answers in order, the next plan launched while
the oldest step computes (never more than `max_in_flight`), no wait for a plan once the oldest is done,
and the watchdog's clock on the oldest step in flight."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from executor_svc.step_pipeline import STOP, PlanInbox, StepPipeline, WorkerThread

REPO = Path(__file__).resolve().parents[2]


class ScriptedStep:
    """A step whose device work is done when the test says so (`done.set()`)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.done = threading.Event()
        self._log = log

    def ready(self) -> bool:
        return self.done.is_set()

    def finish(self) -> str:
        self.done.wait(5)
        self._log.append(f"finish {self.name}")
        return self.name


class Clock:
    """Records the watchdog calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None]] = []

    def step_started(self, at: float | None = None) -> None:
        self.calls.append(("started", at))

    def step_ended(self) -> None:
        self.calls.append(("ended", None))


def make_pipeline(max_in_flight: int, done_on_launch: bool = False):
    log: list[str] = []
    steps: dict[str, ScriptedStep] = {}
    answers: list[str] = []

    def launch(plan: object) -> ScriptedStep:
        name = str(plan)
        log.append(f"launch {name}")
        steps[name] = ScriptedStep(name, log)
        if done_on_launch:
            steps[name].done.set()
        return steps[name]

    clock = Clock()
    pipeline = StepPipeline(launch, answers.append, clock, max_in_flight)
    return pipeline, log, steps, answers, clock


def test_the_next_plan_is_launched_before_the_oldest_step_is_finished() -> None:
    pipeline, log, steps, answers, _ = make_pipeline(2)
    inbox: PlanInbox[str] = PlanInbox()
    for plan in ("a", "b", "c"):
        inbox.put(plan)
    inbox.put(STOP)
    worker = threading.Thread(target=pipeline.run, args=(inbox,))
    worker.start()
    time.sleep(0.05)
    assert log == ["launch a", "launch b"]         # b launched while a computes; c waits behind two
    for name in ("a", "b", "c"):
        while name not in steps:
            time.sleep(0.001)
        steps[name].done.set()
    worker.join(5)
    assert log == ["launch a", "launch b", "finish a", "launch c", "finish b", "finish c"]
    assert answers == ["a", "b", "c"]


def test_one_in_flight_answers_each_step_before_reading_the_next_plan() -> None:
    pipeline, log, _, answers, _ = make_pipeline(1, done_on_launch=True)
    inbox: PlanInbox[str] = PlanInbox()
    for plan in ("a", "b"):
        inbox.put(plan)
    inbox.put(STOP)
    pipeline.run(inbox)
    assert log == ["launch a", "finish a", "launch b", "finish b"]
    assert answers == ["a", "b"]


def test_a_done_step_is_answered_without_waiting_for_a_plan_that_may_never_come() -> None:
    """A scheduler that needs this result to make its next plan must get it."""
    pipeline, _, steps, answers, _ = make_pipeline(2)
    inbox: PlanInbox[str] = PlanInbox()
    inbox.put("a")
    worker = threading.Thread(target=pipeline.run, args=(inbox,))
    worker.start()
    while "a" not in steps:
        time.sleep(0.001)
    steps["a"].done.set()
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline:
        time.sleep(0.001)
    assert answers == ["a"]                         # answered with no plan after it in the inbox
    inbox.put("b")
    while "b" not in steps:
        time.sleep(0.001)
    steps["b"].done.set()
    inbox.put(STOP)
    worker.join(5)
    assert answers == ["a", "b"]


def test_stop_answers_every_step_in_flight_first() -> None:
    pipeline, _, steps, answers, clock = make_pipeline(2)
    inbox: PlanInbox[str] = PlanInbox()
    inbox.put("a")
    inbox.put("b")
    inbox.put(STOP)
    worker = threading.Thread(target=pipeline.run, args=(inbox,))
    worker.start()
    while "b" not in steps:
        time.sleep(0.001)
    steps["a"].done.set()
    steps["b"].done.set()
    worker.join(5)
    assert answers == ["a", "b"]
    # The clock starts with the first step, follows the oldest one in flight, and stops with the last.
    assert clock.calls[0] == ("started", None)
    assert clock.calls[1][0] == "started" and isinstance(clock.calls[1][1], float)
    assert clock.calls[-1] == ("ended", None)


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        StepPipeline(lambda plan: None, lambda answer: None, Clock(), 0)   # type: ignore[arg-type, return-value]


def test_a_worker_waiting_for_a_plan_does_not_keep_the_process_alive() -> None:
    """A stream whose end never reached the worker must not hang the process's exit, as it would on a
    pool thread (the interpreter joins those)."""
    code = (
        "from executor_svc.step_pipeline import PlanInbox, StepPipeline, WorkerThread\n"
        "class Clock:\n"
        "    def step_started(self, at=None): pass\n"
        "    def step_ended(self): pass\n"
        "pipeline = StepPipeline(lambda plan: None, print, Clock())\n"
        "WorkerThread('w').submit(pipeline.run, PlanInbox())\n"
        "print('main done')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'protos'}"})
    assert done.returncode == 0 and "main done" in done.stdout, done.stderr


def test_the_worker_thread_runs_calls_in_order_and_hands_back_results_and_errors() -> None:
    worker = WorkerThread("w")
    order: list[int] = []
    futures = [worker.submit(order.append, i) for i in range(5)]
    assert [f.result(5) for f in futures] == [None] * 5 and order == [0, 1, 2, 3, 4]
    assert worker.submit(lambda a, b=0: a + b, 2, b=3).result(5) == 5
    failing = worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
