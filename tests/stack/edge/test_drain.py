"""SIGTERM on an edge drains it: open streams end at once with an ``edge_draining`` error chunk naming the
resume id, then ``[DONE]``; the turn is not cancelled, and resuming it on another edge with that id gives
exactly the rest of the answer."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import orjson
import pytest

from chatbus.stack import Stack
from schemas.events import TurnCompleted
from tests.conftest import edge_process, read_topic

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"


async def test_sigterm_ends_open_streams_with_a_resume_id_and_the_turn_resumes_elsewhere(stack: Stack, edge_url: str) -> None:
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Write a long essay."}], "max_tokens": 600, "temperature": 0}
    events: list[tuple[str | None, str]] = []  # (SSE id, data)
    with edge_process(stack, 1) as (url, proc):
        async with httpx.AsyncClient(timeout=60) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            sse_id: str | None = None
            sigterm_at = 0.0
            async for line in r.aiter_lines():
                if line.startswith("id:"):
                    sse_id = line[3:].strip()
                elif line.startswith("data:"):
                    events.append((sse_id, line[5:].strip()))
                    sse_id = None
                    if len(events) == 3:
                        proc.send_signal(signal.SIGTERM)
                        sigterm_at = time.monotonic()
            ended_s = time.monotonic() - sigterm_at
        assert await asyncio.to_thread(proc.wait, 20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful exit
    assert events[-1][1] == "[DONE]"
    farewell_id, farewell = events[-2]
    error = orjson.loads(farewell)
    assert error["error"]["code"] == "edge_draining" and error["resume_id"] == farewell_id, error
    assert ended_s < 5, f"the stream took {ended_s:.1f} s to end after SIGTERM"
    chunks: list[dict[str, Any]] = [orjson.loads(d) for _, d in events[:-2]]
    shown = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
    assert not any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks), "the turn ended before the drain"

    cid = farewell_id.split(":")[0]
    rest = ""
    finish = None
    async with httpx.AsyncClient(timeout=120) as http:  # the other edge: the session's
        async with http.stream("GET", f"{edge_url}/v1/chat/completions/{cid}/events", headers={"Last-Event-ID": farewell_id}) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    chunk = orjson.loads(line[5:])
                    if chunk.get("choices"):
                        rest += chunk["choices"][0]["delta"].get("content") or ""
                        finish = chunk["choices"][0].get("finish_reason") or finish
    assert finish in ("stop", "length")  # not cancelled: the turn went on while no client was attached
    done = [e for e in await read_topic(stack.settings, "chat.replies", cid) if isinstance(e, TurnCompleted)]
    assert done and done[-1].text == shown + rest  # the shown part and the resumed rest: each character once
