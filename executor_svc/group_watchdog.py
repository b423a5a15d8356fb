"""Ends an executor whose tensor-parallel group has lost a rank, so that the group can start again.

The ranks of a group meet in collectives inside every forward pass. When one rank dies, the others
block in their next all-reduce until the process group's timeout (minutes), and even then they cannot
rejoin: a torch.distributed group is fixed at creation. The only way back is for every rank to start
again and rendezvous afresh. An orchestrator that watches single processes (Compose's restart policy,
systemd, Kubernetes) restarts only the rank that died, which would then wait for peers that never come.

So each rank runs a watchdog thread that beats a counter in the group's TCPStore (hosted by rank 0)
once a second and watches the other ranks' counters. When a peer's counter has not moved for
`timeout_seconds`, or the store itself is gone (rank 0 died), the watchdog logs why and ends the
process at once with GROUP_LOST_EXIT_CODE: the thread serving RPCs may be stuck inside a collective
that nothing can interrupt, so a clean shutdown is not possible. The orchestrator then restarts every
rank and the scheduler recovers its requests as after any executor loss.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

log = logging.getLogger("pagedserve.executor")

GROUP_LOST_EXIT_CODE = 3
HEARTBEAT_INTERVAL_SECONDS = 1.0
KEY_PREFIX = "pagedserve/heartbeat/"
LEFT_KEY = "pagedserve/left"


def exit_process(reason: str) -> None:
    """End this process now with GROUP_LOST_EXIT_CODE (no cleanup: collectives may hold the main thread)."""
    log.error("%s; exiting (code %d) so that the whole tensor-parallel group restarts", reason,
              GROUP_LOST_EXIT_CODE)
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    os._exit(GROUP_LOST_EXIT_CODE)


class GroupWatchdog:
    """Beats this rank's heartbeat in the group's store and reports a peer that stopped beating.

    `on_lost(reason)` runs once, on the watchdog thread, when the group is broken; by default it ends
    the process. The watchdog talks to the store over a connection of its own, whose timeout is
    `timeout_seconds`, so an unreachable rank 0 is noticed as soon as a stale peer would be.
    """

    def __init__(self, init_address: str, rank: int, world_size: int, timeout_seconds: float,
                 on_lost: Callable[[str], None] = exit_process,
                 interval_seconds: float = HEARTBEAT_INTERVAL_SECONDS) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_seconds = timeout_seconds
        self.interval_seconds = interval_seconds
        self.on_lost = on_lost
        host, _, port = init_address.rpartition(":")
        self._store = dist.TCPStore(host, int(port), world_size, is_master=False,
                                    timeout=datetime.timedelta(seconds=timeout_seconds),
                                    wait_for_workers=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"group-watchdog-{rank}", daemon=True)
        # peer rank -> (its last counter value seen, when it last changed on our monotonic clock)
        self._peers = {peer: (-1, time.monotonic()) for peer in range(world_size) if peer != rank}

    def start(self) -> GroupWatchdog:
        """Start beating and watching on a daemon thread; returns self."""
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (this rank is leaving on purpose): no peer loss ends the process after this."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_seconds * 5)

    def leave(self) -> None:
        """Stop watching and count this rank out of the group; rank 0, whose process hosts the store,
        waits (up to `timeout_seconds`) until every rank has, so none finds the store gone while still
        watching."""
        self.stop()
        try:
            self._store.add(LEFT_KEY, 1)
            deadline = time.monotonic() + self.timeout_seconds
            while self.rank == 0 and self._store.add(LEFT_KEY, 0) < self.world_size:
                if time.monotonic() > deadline:
                    log.warning("rank 0: not every rank left the group within %.0f s", self.timeout_seconds)
                    return
                time.sleep(0.05)
        except Exception as err:              # rank 0 is already gone: nothing left to wait for
            log.debug("rank %d: leaving without the group's store (%s)", self.rank, err)

    def _beat(self) -> None:
        self._store.add(f"{KEY_PREFIX}{self.rank}", 1)

    def check(self, now: float) -> str | None:
        """Beat once and look at the peers; the reason the group is broken, or None while it is whole."""
        try:
            self._beat()
            counters = {peer: self._store.add(f"{KEY_PREFIX}{peer}", 0) for peer in self._peers}
        except Exception as err:             # the store lives in rank 0: it is gone or unreachable
            return f"rank {self.rank}: the group's store at rank 0 is unreachable ({err})"
        for peer, counter in counters.items():
            last_counter, last_change = self._peers[peer]
            if counter != last_counter:
                self._peers[peer] = (counter, now)
            elif now - last_change > self.timeout_seconds:
                return (f"rank {self.rank}: rank {peer} has not been heard from for "
                        f"{now - last_change:.0f} s")
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            reason = self.check(time.monotonic())
            if reason is not None and not self._stop.is_set():
                self.on_lost(reason)
                return
