"""In-order commit points for out-of-order completion (consumers.runtime.OffsetTracker)."""

from __future__ import annotations

from aiokafka import TopicPartition

from consumers.runtime import OffsetTracker

TP = TopicPartition("chat.grounded", 0)


def test_offset_tracker_commits_in_order() -> None:
    t = OffsetTracker()
    for off in (10, 11, 12):
        t.start(TP, off)
    assert t.finish(TP, 12) is None  # 10 and 11 still running
    assert t.finish(TP, 10) == 11
    assert t.finish(TP, 11) == 13
    t.start(TP, 13)
    assert t.finish(TP, 13) == 14


def test_offset_tracker_knows_what_it_handled() -> None:
    t = OffsetTracker()
    t.start(TP, 20)
    t.start(TP, 21)
    assert t.finish(TP, 21) is None
    # after a rebalance the consumer refetches from the commit point (20): both are already handled here
    assert t.handled(TP, 20) and t.handled(TP, 21) and not t.handled(TP, 22)
    assert t.finish(TP, 20) == 22
    assert t.handled(TP, 19) and not t.handled(TP, 22)
    t.forget(TP)
    assert not t.handled(TP, 20)
