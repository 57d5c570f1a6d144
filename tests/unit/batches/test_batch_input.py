"""Unit tests of batch input validation and batch line ids (no stack needed)."""

from __future__ import annotations

import orjson
import pytest

from batches.input import BatchFileError, parse_batch
from batches.store import parse_request_id, request_id
from core.config import Settings

SETTINGS = Settings(served_model_name="chatbus-tiny-random", max_batch_lines=10)


def openai_line(custom_id: str, **body: object) -> bytes:
    request = {"model": "chatbus-tiny-random", "messages": [{"role": "user", "content": "hi"}], **body}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": request})


def test_each_bad_line_is_reported_with_its_number_and_the_rest_is_kept() -> None:
    data = b"\n".join(
        [
            openai_line("a", max_tokens=5),
            b"",  # blank lines are skipped, but still counted for line numbers
            b"[1, 2]",
            orjson.dumps({"custom_id": "short", "messages": [{"role": "user", "content": "x"}], "temperature": 0}),
            openai_line("a"),
            openai_line("c", max_tokens=0),
            openai_line("d", tools=[{"type": "function"}]),
            orjson.dumps({"custom_id": "e", "method": "GET", "url": "/v1/chat/completions", "body": {}}),
            orjson.dumps({"custom_id": "", "messages": []}),
        ]
    )
    parsed = parse_batch(data, SETTINGS)
    assert [(x.line, x.custom_id) for x in parsed.lines] == [(1, "a"), (4, "short")]
    assert parsed.lines[0].request.max_tokens == 5 and parsed.lines[1].request.model == "chatbus-tiny-random"
    codes = {e.line: (e.custom_id, e.code) for e in parsed.invalid}
    assert codes == {
        3: (None, "invalid_json"),
        5: ("a", "duplicate_custom_id"),
        6: ("c", "invalid_request_error"),
        7: ("d", "invalid_request_error"),
        8: ("e", "invalid_method"),
        9: ("", "missing_custom_id"),
    }
    assert all(e.message.startswith(f"line {e.line}: ") for e in parsed.invalid)
    assert "max_tokens" in next(e.message for e in parsed.invalid if e.line == 6)
    assert parsed.total == 8


def test_a_line_naming_a_model_the_key_may_not_use_is_invalid() -> None:
    settings = Settings(served_model_name="chatbus-tiny-random", extra_models="chatbus-tiny-small=/nowhere", auto_small_model="chatbus-tiny-small")
    data = b"\n".join([openai_line("ok"), openai_line("other", model="chatbus-tiny-small"), openai_line("ok")])
    parsed = parse_batch(data, settings, allowed_models=["chatbus-tiny-random"])
    assert [x.custom_id for x in parsed.lines] == ["ok"]
    assert [(e.line, e.code) for e in parsed.invalid] == [(2, "model_not_allowed"), (3, "duplicate_custom_id")]
    assert "may not use the model 'chatbus-tiny-small'" in parsed.invalid[0].message
    assert len(parse_batch(data, settings).lines) == 2  # no list: every served model


def test_a_file_that_cannot_be_a_batch_is_refused_as_a_whole() -> None:
    with pytest.raises(BatchFileError, match="no requests"):
        parse_batch(b"\n\n", SETTINGS)
    with pytest.raises(BatchFileError, match="more than 10"):
        parse_batch(b"\n".join(openai_line(str(i)) for i in range(11)), SETTINGS)


def test_request_ids_round_trip_and_other_ids_are_not_batch_lines() -> None:
    cid = request_id("batch_0123abcd", 42)
    assert cid == "batch_req_0123abcd_42"
    assert parse_request_id(cid) == ("batch_0123abcd", 42)
    assert parse_request_id("chatcmpl-0123") is None
    assert parse_request_id("batch_req_x_") is None
