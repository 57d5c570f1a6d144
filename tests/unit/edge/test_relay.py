"""The edge's view of a turn's reply events (edge.relay.TurnStream): splicing attempts, pieces, heartbeats."""

from __future__ import annotations

import pytest

from edge.relay import TurnStream, TurnTimeout
from schemas.events import TokenEvent, TurnCompleted


def tok(attempt: str, seq: int, delta: str, offset: int) -> TokenEvent:
    return TokenEvent(correlation_id="c", conversation_id="v", attempt=attempt, seq=seq, delta=delta, text_offset=offset)


def test_splice_skips_text_a_redelivered_attempt_repeats() -> None:
    s = TurnStream("c")
    assert s.splice(tok("a1", 0, "Hello", 0)) == "Hello"
    assert s.splice(tok("a1", 1, " wor", 5)) == " wor"
    # the worker died; attempt 2 starts over
    assert s.splice(tok("a2", 0, "Hel", 0)) == ""
    assert s.splice(tok("a2", 1, "lo world", 3)) == "ld"
    assert s.splice(tok("a2", 2, "!", 11)) == "!"


async def test_pieces_finish_with_what_the_completion_adds() -> None:
    s = TurnStream("c")
    s.put(tok("a", 0, "Hi", 0))
    s.put(TurnCompleted(correlation_id="c", conversation_id="v", attempt="a", seq=2, finish_reason="stop", text="Hi there", model="m"))
    assert [p async for p in s.pieces(1)] == ["Hi there"]  # events already waiting are joined into one piece
    assert s.done is not None and s.done.finish_reason == "stop"
    # arriving one at a time, each is its own piece
    s = TurnStream("c")
    pieces = s.pieces(1)
    s.put(tok("a", 0, "Hi", 0))
    assert await anext(pieces) == "Hi"
    s.put(TurnCompleted(correlation_id="c", conversation_id="v", attempt="a", seq=2, finish_reason="stop", text="Hi there", model="m"))
    assert [p async for p in pieces] == [" there"]
    assert s.first_relayed is not None


async def test_pieces_send_heartbeats_while_waiting_and_time_out_without_events() -> None:
    s = TurnStream("c")
    pieces = s.pieces(timeout_s=1.0, heartbeat_s=0.05)
    assert await anext(pieces) is None  # a heartbeat: nothing arrived for 50 ms
    s.put(tok("a", 0, "Hi", 0))
    assert await anext(pieces) == "Hi"
    silent = TurnStream("d")
    with pytest.raises(TurnTimeout):
        async for piece in silent.pieces(timeout_s=0.2, heartbeat_s=0.05):
            assert piece is None  # heartbeats until the turn's own timeout


async def test_a_continued_answer_goes_on_where_the_dead_attempt_stopped() -> None:
    """``received`` keeps what arrived (each character once, across attempts); a continuation's events
    count their offsets from its start, so the client gets the rest and nothing twice."""
    s = TurnStream("c")
    s.received = ""
    s.put(tok("a1", 0, "Once upon", 0))
    s.put(tok("a2", 0, "Once", 0))  # a redelivered attempt repeats the start
    s.put(tok("a2", 1, " upon a", 4))
    assert s.received == "Once upon a"
    # the pool died: the fallback continues from "Once upon a" (its first event at offset 11)
    s.put(tok("f", 0, " time", len(s.received)))
    s.put(TurnCompleted(correlation_id="c", conversation_id="v", attempt="f", seq=1, finish_reason="stop", text="Once upon a time", model="m"))
    assert "".join([p async for p in s.pieces(1) if p]) == "Once upon a time"
    assert TurnStream("d").received is None  # not kept unless asked for
