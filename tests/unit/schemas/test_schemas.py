"""Event contracts: round trips, JSON Schema files current and valid, clear decode errors."""

from __future__ import annotations

import orjson
import pytest
from jsonschema import Draft202012Validator

from schemas.events import (
    CancelTurn,
    ChatMessage,
    ChatTurnRequest,
    DecodeError,
    ReplyTo,
    SafetyVerdict,
    ScreenedTurn,
    TokenEvent,
    TurnCompleted,
    decode,
    decode_as,
)
from schemas.jsonschema import OUT, render


def request() -> ChatTurnRequest:
    return ChatTurnRequest(
        correlation_id="chatcmpl-1",
        conversation_id="conv-1",
        model="m",
        messages=[ChatMessage(role="user", content="hi")],
        reply_to=ReplyTo(topic="chat.replies", partition=3),
    )


def samples() -> list[object]:
    req = request()
    verdict = SafetyVerdict(allowed=True, policy_version="v", latency_ms=1.0)
    return [
        req,
        ScreenedTurn(correlation_id="chatcmpl-1", conversation_id="conv-1", request=req, verdict=verdict, query_embedding=[0.1] * 384),
        TokenEvent(correlation_id="chatcmpl-1", conversation_id="conv-1", attempt="a", seq=0, delta="Hel", text_offset=0),
        TurnCompleted(correlation_id="chatcmpl-1", conversation_id="conv-1", attempt="a", seq=1, finish_reason="stop", text="Hello", model="m"),
        CancelTurn(correlation_id="chatcmpl-1", conversation_id="conv-1"),
    ]


@pytest.mark.parametrize("event", samples(), ids=lambda e: type(e).__name__)
def test_round_trip_and_schema(event: object) -> None:
    raw = event.to_bytes()  # type: ignore[attr-defined]
    back = decode(raw)
    assert back == event
    data = orjson.loads(raw)
    assert data["schema_version"] == 1 and data["event_id"] and data["correlation_id"] == "chatcmpl-1"
    schema = orjson.loads((OUT / f"{data['event_type']}.v1.json").read_bytes())
    Draft202012Validator(schema).validate(data)


def test_committed_json_schemas_are_current() -> None:
    for name, data in render().items():
        assert (OUT / name).read_bytes() == data, f"{name} is stale: run python -m schemas.jsonschema"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "tombstone"),
        (b"\xff", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (b'{"event_type":"chat.token","schema_version":7}', "newer than"),
        (b'{"event_type":"nope"}', "invalid"),
        (b'{"event_type":"chat.token","correlation_id":"c","conversation_id":"v","attempt":"a","seq":-1,"delta":"","text_offset":0}', "seq"),
    ],
)
def test_decode_errors_name_the_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode(raw)


def test_decode_as_checks_the_type() -> None:
    with pytest.raises(DecodeError, match="expected TokenEvent"):
        decode_as(request().to_bytes(), TokenEvent)
    assert decode_as(request().to_bytes(), ChatTurnRequest).reply_to.partition == 3


def test_additive_fields_are_ignored_by_older_readers() -> None:
    data = orjson.loads(request().to_bytes())
    data["a_field_from_the_future"] = 1
    assert isinstance(decode(orjson.dumps(data)), ChatTurnRequest)
