"""The tensor-parallel group watchdog over a real TCPStore: a silent peer or a vanished store is
reported, a whole group is not, and leaving waits for every rank."""

from __future__ import annotations

import datetime
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

dist = pytest.importorskip("torch.distributed")

from clients.stack import free_port  # noqa: E402
from executor_svc.group_watchdog import GroupWatchdog  # noqa: E402

TIMEOUT = 1.5
INTERVAL = 0.05


class Losses:
    """Collects what the watchdogs report, by rank."""

    def __init__(self) -> None:
        self.reasons: dict[int, str] = {}
        self.event = threading.Event()

    def for_rank(self, rank: int):
        def on_lost(reason: str) -> None:
            self.reasons[rank] = reason
            self.event.set()
        return on_lost


def host_store(port: int, world_size: int):
    """The store rank 0's process hosts for the group."""
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=True,
                         timeout=datetime.timedelta(seconds=10), wait_for_workers=False)


def watchdogs(port: int, world_size: int, losses: Losses) -> list[GroupWatchdog]:
    return [GroupWatchdog(f"127.0.0.1:{port}", rank, world_size, TIMEOUT, losses.for_rank(rank),
                          interval_seconds=INTERVAL).start() for rank in range(world_size)]


@contextmanager
def running_group(world_size: int) -> Iterator[tuple[list[GroupWatchdog], Losses]]:
    """A store as rank 0 hosts it and a started watchdog per rank; all stopped afterwards."""
    port, losses = free_port("127.0.0.1"), Losses()
    store = host_store(port, world_size)
    group = watchdogs(port, world_size, losses)
    try:
        yield group, losses
    finally:
        for watchdog in group:
            watchdog.stop()
        del store


def test_a_whole_group_is_left_alone():
    with running_group(3) as (_, losses):
        assert not losses.event.wait(TIMEOUT * 2)


def test_a_rank_that_stops_beating_is_reported_by_its_peers():
    with running_group(3) as (group, losses):
        time.sleep(0.3)
        started = time.monotonic()
        group[2].stop()                  # as if rank 2's process had died
        deadline = started + TIMEOUT * 4
        while len(losses.reasons) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(losses.reasons) == [0, 1]
        assert all("rank 2 has not been heard from" in r for r in losses.reasons.values()), losses.reasons
        assert time.monotonic() - started >= TIMEOUT


def test_the_store_vanishing_with_rank_0_is_reported():
    port, losses = free_port("127.0.0.1"), Losses()
    store = host_store(port, 2)
    group = watchdogs(port, 2, losses)
    group[0].stop()
    del store                            # rank 0's process, and the store server with it, are gone
    gc.collect()
    assert losses.event.wait(TIMEOUT * 4)
    assert "store at rank 0 is unreachable" in losses.reasons[1]
    group[1].stop()


def test_rank_0_leaves_only_after_every_rank_has():
    port, losses = free_port("127.0.0.1"), Losses()
    store = host_store(port, 2)
    group = watchdogs(port, 2, losses)
    left: list[float] = []
    leaving = threading.Thread(target=lambda: (group[0].leave(), left.append(time.monotonic())))
    leaving.start()
    time.sleep(0.5)
    assert not left, "rank 0 left while rank 1 was still watching the store it hosts"
    group[1].leave()
    leaving.join(5)
    assert left and not losses.reasons
    del store
