"""No raw PII on any topic or in any store: the edge masks a turn's messages before publishing it (by
format as well as by checksum, UK national phone formats included) and carries the ``user`` id only as
its pseudonym; the batch lane does the same."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from core.config import Settings
from core.pii import pseudonym
from tests.conftest import eventually
from topics.ops import read_records
from topics.registry import topic

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"
RAW = ("078-05-1120", "020 7946 0958", "07700 900123", "jane.roe@example.org")
PROMPT = "My SSN is 078-05-1120, call 020 7946 0958 or 07700 900123, mail jane.roe@example.org. What is a set?"


async def raw_on(settings: Settings, name: str, needle: str) -> list[str]:
    """Values on topic ``name`` that mention ``needle`` (the turn) and still hold a raw PII string."""
    records = await read_records(settings, topic(name, settings.topic_prefix))
    texts = [r.value.decode("utf-8", "replace") for r in records if r.value and needle.encode() in r.value]
    return [t for t in texts if any(raw in t for raw in RAW)]


async def test_a_turn_with_pii_leaves_none_on_the_bus_or_in_the_database(edge_url: str, settings: Settings, mongo: Any) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "user": "jane.roe@example.org"}
    async with httpx.AsyncClient(base_url=edge_url, timeout=90) as http:
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    cid = r.json()["id"]
    turn = await eventually(lambda: mongo.turns.find_one({"_id": cid, "answer": {"$exists": True}}), 60, "the recorded turn")
    stored = str(turn)
    assert not [raw for raw in RAW if raw in stored], stored
    assert "[NATIONAL_ID]" in turn["messages"][-1]["content"] and turn["messages"][-1]["content"].count("[PHONE]") == 2
    assert set(turn["verdict"]["pii"]) >= {"national_id", "phone", "email"}
    conversation = await mongo.conversations.find_one({"_id": turn["conversation_id"]})
    assert conversation["user"] == pseudonym("jane.roe@example.org", settings.pseudonym_key_bytes())
    for name in ("chat.requests", "chat.screened", "chat.grounded", "chat.replies"):
        assert not await raw_on(settings, name, cid), name

    async with httpx.AsyncClient(base_url=edge_url, timeout=30) as http:  # a comment too
        r = await http.post(
            "/v1/feedback",
            json={"type": "rating", "response_id": cid, "rating": "down", "comment": "it ignored my SSN 078-05-1120", "user": "jane.roe@example.org"},
        )
    assert r.status_code in (200, 202), r.text

    async def feedback_masked() -> bool:
        return bool([v for v in await read_records(settings, topic("chat.feedback", settings.topic_prefix)) if v.value and cid.encode() in v.value])

    await eventually(feedback_masked, 30, "the feedback event")
    assert not await raw_on(settings, "chat.feedback", cid)
