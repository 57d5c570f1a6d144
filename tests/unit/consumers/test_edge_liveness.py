"""Edge liveness as the inference worker judges it from heartbeats (one function, no bus)."""

from __future__ import annotations

from consumers.cancellations import EdgeLiveness
from schemas.events import EdgeHeartbeat


def beat(partition: int, at: float, watching: list[str] | None = None) -> EdgeHeartbeat:
    return EdgeHeartbeat(
        correlation_id=f"edge:e{partition}",
        conversation_id=f"e{partition}",
        edge_id=f"e{partition}",
        reply_partition=partition,
        watching=watching or [],
        created_at=at,
    )


def test_an_edge_is_gone_only_after_it_beat_and_then_fell_silent() -> None:
    edges = EdgeLiveness()
    assert not edges.gone(0, "chatcmpl-a", 15, now=1000.0)  # never seen beating: not judged
    edges.beat(beat(0, 1000.0))
    assert not edges.gone(0, "chatcmpl-a", 15, now=1014.0)
    assert edges.gone(0, "chatcmpl-a", 15, now=1016.0)
    edges.beat(beat(0, 990.0))  # a beat replayed from the past does not make it younger
    assert edges.gone(0, "chatcmpl-a", 15, now=1016.0)


def test_a_turn_another_edge_streams_to_a_resumed_client_is_not_orphaned() -> None:
    edges = EdgeLiveness()
    edges.beat(beat(0, 1000.0))
    edges.beat(beat(1, 1010.0, watching=["chatcmpl-a"]))
    assert not edges.gone(0, "chatcmpl-a", 15, now=1020.0)  # edge 0 is silent, but edge 1 watches the turn
    assert edges.gone(0, "chatcmpl-b", 15, now=1020.0)
    assert edges.gone(0, "chatcmpl-a", 15, now=1030.0)  # and once edge 1 stops watching, it is
