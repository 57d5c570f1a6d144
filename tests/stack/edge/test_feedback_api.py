"""The chat page's HTTP API on the real stack: POST /v1/feedback (validation, 404, the event on
chat.feedback, a repeated vote keeps its id), Stop over the bus, conversations from the database, and
the dashboard's data."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

from core.config import Settings
from core.pii import pseudonym
from schemas.events import CancelTurn
from schemas.feedback import FeedbackEvent, decode_feedback, feedback_id
from tests.conftest import eventually, read_topic
from topics.ops import read_records
from topics.registry import topic

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"


async def ask(http: httpx.AsyncClient, edge_url: str, conversation: str, text: str, user: str = "tester", max_tokens: int = 8) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "conversation_id": conversation, "user": user, "max_tokens": max_tokens}
    r = await http.post(f"{edge_url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def feedback_events(settings: Settings, fid: str) -> list[FeedbackEvent]:
    out = []
    for r in await read_records(settings, topic("chat.feedback", settings.topic_prefix)):
        try:
            ev = decode_feedback(r.value)
        except ValueError:
            continue
        if ev.feedback_id == fid:
            out.append(ev)
    return out


async def test_feedback_is_validated_published_and_updated(edge_url: str, settings: Settings) -> None:
    conv = f"conv-fb-{uuid.uuid4().hex[:8]}"
    prompt = "Which port does Kafka use? Reach me at jane.doe@example.com"
    async with httpx.AsyncClient(timeout=60) as http:
        a = await ask(http, edge_url, conv, prompt)
        b = await ask(http, edge_url, conv, prompt)  # a regenerate: a sibling of a
        other = await ask(http, edge_url, conv, "And what is a partition?")

        url = f"{edge_url}/v1/feedback"
        bad: list[Any] = [
            [1, 2],
            {"type": "rating", "response_id": a["id"]},  # no rating
            {"type": "rating", "response_id": a["id"], "rating": "meh"},
            {"type": "rating", "response_id": a["id"], "rating": "down", "reason": "because"},
            {"type": "rating", "response_id": a["id"], "rating": "up", "comment": "x" * 2001},
            {"type": "preference", "chosen_id": a["id"], "rejected_ids": [a["id"]]},
            {"type": "preference", "chosen_id": a["id"]},
            {"type": "vote", "response_id": a["id"]},
            {"type": "rating", "response_id": a["id"], "rating": "up", "surprise": 1},
        ]
        for body in bad:
            r = await http.post(url, json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = await http.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = await http.post(url, json={"type": "rating", "response_id": "chatcmpl-doesnotexist", "rating": "up"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
        r = await http.post(url, json={"type": "preference", "chosen_id": a["id"], "rejected_ids": ["chatcmpl-doesnotexist"]})
        assert r.status_code == 404
        r = await http.post(url, json={"type": "preference", "chosen_id": a["id"], "rejected_ids": [other["id"]]})
        assert r.status_code == 400 and "siblings" in r.json()["error"]["message"]

        vote = {
            "type": "rating",
            "response_id": b["id"],
            "rating": "down",
            "reason": "not_factual",
            "comment": "wrong; call me at +1 415 555 0100",
            "user": "tester",
        }
        first = await http.post(url, json=vote)
        assert first.status_code == 200, first.text
        again = await http.post(url, json={**vote, "rating": "up", "reason": None, "comment": None})
        assert again.status_code == 200
        fid = first.json()["id"]
        assert again.json()["id"] == fid == feedback_id("rating", pseudonym("tester", None), b["id"])  # a repeated vote keeps its id
        pref = await http.post(url, json={"type": "preference", "chosen_id": b["id"], "rejected_id": a["id"], "user": "tester"})
        assert pref.status_code == 200, pref.text

    events = await eventually(lambda: _at_least(feedback_events(settings, fid), 2), what="both votes on chat.feedback")
    down, up = sorted(events, key=lambda e: e.created_at)
    assert (down.rating, down.reason, up.rating, up.reason) == ("down", "not_factual", "up", None)
    assert down.conversation_id == conv and down.response_id == b["id"] and down.model == MODEL
    assert "555" not in (down.comment or "") and down.comment is not None  # PII masked before it leaves the edge
    [p] = await eventually(lambda: feedback_events(settings, pref.json()["id"]), what="the preference on chat.feedback")
    assert (p.kind, p.chosen_id, p.rejected_ids, p.prompt_group) == ("preference", b["id"], [a["id"]], down.prompt_group)


async def _at_least(coro: Any, n: int) -> Any:
    items = await coro
    return items if len(items) >= n else None


async def test_conversations_list_and_detail(edge_url: str, mongo: Any) -> None:
    user = f"user-{uuid.uuid4().hex[:8]}"
    conv = f"conv-list-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(timeout=60) as http:
        a = await ask(http, edge_url, conv, "Tell me about consumer groups <script>alert(1)</script>", user=user)
        b = await ask(http, edge_url, conv, "Tell me about consumer groups <script>alert(1)</script>", user=user)

        async def listed() -> list[dict[str, Any]] | None:
            r = await http.get(f"{edge_url}/v1/conversations", params={"user": user})
            data = r.json()["data"]
            return data if data and data[0]["turns"] == 2 else None

        [item] = await eventually(listed, what="the conversation in the list")
        assert item["id"] == conv and item["title"].startswith("Tell me about consumer groups")

        async def detail() -> dict[str, Any] | None:
            body = (await http.get(f"{edge_url}/v1/conversations/{conv}")).json()
            return body if all(t["answer"] for t in body["turns"]) and len(body["turns"]) == 2 else None

        body = await eventually(detail, what="both answers stored")
        assert [t["id"] for t in body["turns"]] == [a["id"], b["id"]]
        assert body["turns"][0]["prompt_group"] == body["turns"][1]["prompt_group"]  # siblings
        assert body["turns"][0]["answer"]["text"] == a["choices"][0]["message"]["content"]
        assert body["turns"][0]["verdict"]["allowed"] is True
        assert (await http.get(f"{edge_url}/v1/conversations/conv-nope-{uuid.uuid4().hex}")).status_code == 404
        assert (await http.get(f"{edge_url}/v1/conversations", params={"limit": "0"})).status_code == 400


async def test_stop_cancels_over_the_bus(edge_url: str, settings: Settings) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 400, "stream": True, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as http:
        text, finish, cid, stopped = "", None, "", False
        async with http.stream("POST", f"{edge_url}/v1/chat/completions", json=body) as r:
            cid = r.headers["x-correlation-id"]
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = orjson.loads(line[6:])
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                text += (choice.get("delta") or {}).get("content") or ""
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                if text and not stopped:
                    stop = await http.post(f"{edge_url}/v1/chat/completions/{cid}/cancel")  # Stop, while reading on
                    assert stop.status_code == 200 and stop.json()["cancelled"] is True, stop.text
                    stopped = True
        assert finish == "stop"  # the stream ends normally, with the text generated so far
        cancels = await eventually(lambda: _of(read_topic(settings, "chat.control", cid), CancelTurn), what="the cancel on chat.control")
        assert cancels[0].reason == "stopped_by_user"
        again = await http.post(f"{edge_url}/v1/chat/completions/{cid}/cancel")
        assert again.status_code == 200 and again.json()["cancelled"] is False  # already finished
        missing = await http.post(f"{edge_url}/v1/chat/completions/chatcmpl-{uuid.uuid4().hex}/cancel")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"


async def _of(coro: Any, kind: type) -> list[Any]:
    return [e for e in await coro if isinstance(e, kind)]


async def test_dashboard_data(edge_url: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        await ask(http, edge_url, f"conv-dash-{uuid.uuid4().hex[:8]}", "What is an offset?")
        r = await http.get(f"{edge_url}/dashboard.json", params={"hours": "1"})
        assert r.status_code == 200, r.text
        data = r.json()
        n = len(data["outcomes"]["t"])
        assert n >= 60 and all(len(data["outcomes"][k]) == n for k in ("answered", "refused", "cancelled", "error"))
        assert sum(data["outcomes"]["answered"]) >= 1 and data["totals"]["turns"] >= 1
        assert set(data["thumbs"]) == {"up", "down"} and len(data["records"]["dpo"]) == len(data["records"]["t"])
        assert (await http.get(f"{edge_url}/dashboard.json", params={"hours": "x"})).status_code == 400
