"""settle_heap: what survives startup is frozen out of the collector's view, thresholds are relaxed."""

from __future__ import annotations

import gc
import weakref

import pytest

from pagedserve.gc_policy import GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD, settle_heap


@pytest.fixture
def restore_gc():
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_startup_objects_are_frozen_and_thresholds_relaxed(restore_gc):
    startup_object = {"long": ["lived"]}
    settle_heap()
    assert gc.get_threshold() == (GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
    assert gc.get_freeze_count() > 0
    assert not any(o is startup_object for o in gc.get_objects())     # frozen: no longer scanned
    later_object = {"short": ["lived"]}
    assert any(o is later_object for o in gc.get_objects())


def test_cyclic_garbage_made_after_settling_is_still_collected_automatically(restore_gc):
    """The collector is relaxed, not off: a young cycle dies once GEN0_THRESHOLD allocations pass."""
    settle_heap()

    class Node:
        pass

    node = Node()
    node.self = node
    alive = weakref.ref(node)
    del node
    assert alive() is not None                       # only a collection frees a cycle
    churn = [[] for _ in range(GEN0_THRESHOLD * 2)]  # containers that trigger young collections
    del churn
    assert alive() is None
