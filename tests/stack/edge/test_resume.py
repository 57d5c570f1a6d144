"""Resumable streams: a client that drops mid-turn reconnects with Last-Event-ID and gets the rest of the
turn from Kafka — nothing lost, nothing repeated — and the turn is not cancelled."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from core.config import Settings
from schemas.events import CancelTurn, TurnCompleted
from tests.conftest import eventually, read_topic

pytestmark = pytest.mark.stack

BODY = {
    "model": "chatbus-tiny-random",
    "messages": [{"role": "user", "content": "Write a long answer about Python loops."}],
    "max_tokens": 300,
    "temperature": 0,
    "stream": True,
}


async def resume(http: httpx.AsyncClient, edge_url: str, cid: str, last_id: str) -> tuple[str, str | None, list[str]]:
    """(text, finish_reason, ids) of a resumed stream."""
    text, finish, ids = "", None, []
    headers = {"Last-Event-ID": last_id}
    async with http.stream("GET", f"{edge_url}/v1/chat/completions/{cid}/events", headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("id: "):
                ids.append(line[4:])
            if line.startswith("data: {"):
                chunk = orjson.loads(line[6:])
                assert "error" not in chunk, chunk
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                text += delta.get("content") or ""
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                    finish = chunk["choices"][0]["finish_reason"]
    return text, finish, ids


async def test_reconnect_with_last_event_id_gets_the_rest_once(edge_url: str, settings: Settings) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        seen, last_id, cid = "", "", ""
        async with http.stream("POST", f"{edge_url}/v1/chat/completions", json=BODY) as r:
            cid = r.headers["x-correlation-id"]
            pieces = 0
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    last_id = line[4:]
                elif line.startswith("data: {"):
                    chunk = orjson.loads(line[6:])
                    seen += chunk["choices"][0]["delta"].get("content") or ""
                    pieces += 1 if chunk["choices"][0]["delta"].get("content") else 0
                    if pieces == 3:
                        break  # the connection drops mid-turn
        assert last_id.startswith(cid + ":") and last_id.endswith(f":{len(seen)}")
        rest, finish, ids = await resume(http, edge_url, cid, last_id)
        assert finish in ("stop", "length")
        done = await eventually(lambda: _of(read_topic(settings, "chat.replies", cid), TurnCompleted), what="completion")
        assert seen + rest == done[-1].text  # the whole answer, each character once
        assert ids and ids[-1].endswith(f":{len(seen + rest)}")
        # replaying from the same id (e.g. a second reload) gives the same rest again, from the topic
        again, finish2, _ = await resume(http, edge_url, cid, last_id)
        assert (again, finish2) == (rest, finish)
        await asyncio.sleep(settings.resume_grace_s + 1)
        assert not await _of(read_topic(settings, "chat.control", cid), CancelTurn)  # resumed: never cancelled

        bad = await http.get(f"{edge_url}/v1/chat/completions/{cid}/events", headers={"Last-Event-ID": "nonsense"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
        other = await http.get(f"{edge_url}/v1/chat/completions/chatcmpl-0000/events", headers={"Last-Event-ID": last_id})
        assert other.status_code == 400
        missing = await http.get(f"{edge_url}/v1/chat/completions/{cid}/events")
        assert missing.status_code == 400


async def _of(events, kind):  # type: ignore[no-untyped-def]
    return [e for e in await events if isinstance(e, kind)]
