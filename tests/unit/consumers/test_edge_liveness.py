"""Edge liveness as the inference worker judges it from heartbeats (one function, no bus)."""

from __future__ import annotations

from consumers.cancellations import EdgeLiveness
from schemas.events import EdgeHeartbeat


def beat(partition: int | None, at: float, watching: list[str] | None = None) -> EdgeHeartbeat:
    return EdgeHeartbeat(
        correlation_id=f"edge:e{partition}",
        conversation_id=f"e{partition}",
        edge_id=f"e{partition}",
        reply_partition=partition,
        watching=watching or [],
        created_at=at,
    )


def flow(edges: EdgeLiveness, start: float, end: float) -> None:
    """The worker's own beats every 2 s from ``start`` to ``end``: the bus flows."""
    t = start
    while t <= end:
        edges.beat(beat(None, t), now=t)
        t += 2.0


def test_an_edge_is_gone_only_after_it_beat_and_then_fell_silent() -> None:
    edges = EdgeLiveness(gap_s=6)
    flow(edges, 980.0, 1000.0)
    assert not edges.gone(0, "chatcmpl-a", 15, now=1000.0)  # never seen beating: not judged
    edges.beat(beat(0, 1000.0), now=1000.0)
    flow(edges, 1000.0, 1016.0)
    assert not edges.gone(0, "chatcmpl-a", 15, now=1014.0)
    assert edges.gone(0, "chatcmpl-a", 15, now=1016.0)
    edges.beat(beat(0, 990.0), now=1016.0)  # a beat replayed from the past does not make it younger
    assert edges.gone(0, "chatcmpl-a", 15, now=1016.0)


def test_silence_during_a_broker_outage_is_not_taken_for_death() -> None:
    edges = EdgeLiveness(gap_s=6)
    flow(edges, 960.0, 1000.0)
    edges.beat(beat(0, 1000.0), now=1000.0)
    assert not edges.gone(0, "chatcmpl-a", 15, now=1030.0)  # nothing arrived for 30 s: the bus, not the edge
    flow(edges, 1040.0, 1050.0)  # the bus is back (the worker sees its own beats), the edge not yet
    assert not edges.gone(0, "chatcmpl-a", 15, now=1050.0)  # it gets a fresh 15 s
    flow(edges, 1050.0, 1058.0)
    assert edges.gone(0, "chatcmpl-a", 15, now=1058.0)


def test_a_turn_another_edge_streams_to_a_resumed_client_is_not_orphaned() -> None:
    edges = EdgeLiveness(gap_s=6)
    flow(edges, 980.0, 1030.0)
    edges.beat(beat(0, 1000.0), now=1000.0)
    edges.beat(beat(1, 1010.0, watching=["chatcmpl-a"]), now=1010.0)
    assert not edges.gone(0, "chatcmpl-a", 15, now=1020.0)  # edge 0 is silent, but edge 1 watches the turn
    assert edges.gone(0, "chatcmpl-b", 15, now=1020.0)
    assert edges.gone(0, "chatcmpl-a", 15, now=1030.0)  # and once edge 1 stops watching, it is
