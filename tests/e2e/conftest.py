"""Fixtures that start the whole stack on the embedded model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_stack import RunningStack, require_model


@pytest.fixture(scope="module")
def stack() -> Iterator[RunningStack]:
    """One stack on the embedded model with a roomy KV pool, shared by a test module."""
    require_model()
    running = RunningStack()
    yield running
    running.stop()


@pytest.fixture
def start_stack() -> Iterator:
    """Start stacks with given `pagedserve serve` flags; all are stopped after the test."""
    require_model()
    started: list[RunningStack] = []

    def start(*flags: str, restart_executors: bool = True) -> RunningStack:
        running = RunningStack(*flags, restart_executors=restart_executors)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
