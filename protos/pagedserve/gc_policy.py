"""Garbage-collector settings for the serving processes (scheduler and executor).

CPython's cyclic collector runs a young-generation pass every 700 net container allocations and, now and
then, a full pass over every tracked object. A serving loop allocates tens of thousands of short-lived
objects per iteration (plan and result messages, samples, stream updates), and a process that imported
transformers, protobuf and grpc holds millions of long-lived ones, so with the defaults the collector
ran hundreds of times a second and its full passes stalled an iteration for hundreds of milliseconds:
measured with `pagedserve bench` on the simulated executor (ShareGPT-like, 400 requests, 256
sequences), 30% of the scheduler's CPU time and 42% of the executor's went to collection, with pauses
up to 0.6 s and 2.3 s.

`settle_heap()` is called once a process has started (and again after the executor sizes its cache):
it collects what startup left behind, freezes every surviving object (moved out of the collector's
view for good: modules, the tokenizer, the model), and raises the thresholds so young passes run every
GEN0_THRESHOLD allocations and full passes rarely. Reference counting still frees everything without a
cycle at once; only cyclic garbage waits longer.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("pagedserve.gc")

GEN0_THRESHOLD = 50_000     # net container allocations between young collections (CPython default 700)
GEN1_THRESHOLD = 20         # young collections per middle one (default 10)
GEN2_THRESHOLD = 100        # middle collections per full one (default 10)


def settle_heap() -> None:
    """Collect, freeze what survives startup, and relax the collector's thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
    log.info("garbage collector: %d startup objects frozen, thresholds %s", gc.get_freeze_count(),
             gc.get_threshold())
