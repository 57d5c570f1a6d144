"""Several models on the bus (topics.pools, edge.routing), on the real stack: the session serves the tiny
model twice, as ``chatbus-tiny-random`` (primary) and ``chatbus-tiny-small`` (an extra pool with its own
worker, topic and consumer group, falling back to the primary). Output is noise; what is tested is which
pool answers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest

from chatbus.stack import Stack
from core.config import Settings
from schemas.events import TurnCompleted
from tests.conftest import eventually, read_topic
from topics.pools import pool_named

pytestmark = pytest.mark.stack

PRIMARY, SMALL = "chatbus-tiny-random", "chatbus-tiny-small"
QUESTIONS = [  # plain requests the input screen lets through ("Client 0 asks question 3" reads as an injection to it)
    "What is a good name for a pet cat?",
    "Any tips for a relaxing weekend?",
    "Which fruit has the most vitamin C?",
    "Tell me a fun fact about octopuses.",
    "What should I cook for dinner tonight?",
    "How many legs does a spider have?",
]


async def listed(http: httpx.AsyncClient) -> list[str]:
    return [m["id"] for m in (await http.get("/v1/models")).json()["data"]]


async def ask(http: httpx.AsyncClient, model: str, content: str) -> httpx.Response:
    return await http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4})


async def test_each_model_is_listed_and_answered_by_its_own_pool(edge_url: str, settings: Settings) -> None:
    async with httpx.AsyncClient(base_url=edge_url, timeout=60) as http:
        models = await eventually(lambda: _when(listed(http), lambda ids: SMALL in ids), 60, "the small pool listed")
        assert models[:2] == [PRIMARY, SMALL] and "auto" in models
        assert any("MiniLM" in m for m in models)  # the embedding model (POST /v1/embeddings)
        r = await ask(http, SMALL, "Hello there, small model!")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == SMALL and "route" not in body and "x-chatbus-route" not in r.headers
    pool = pool_named(settings, SMALL)
    assert pool is not None
    grounded = await read_topic(settings, pool.grounded(), body["id"])  # it crossed the small pool's own topic
    assert len(grounded) == 1 and grounded[0].request.model == SMALL
    assert not await read_topic(settings, "chat.grounded", body["id"])


async def test_auto_routes_by_the_request_and_says_why(edge_url: str, mongo: Any) -> None:
    async with httpx.AsyncClient(base_url=edge_url, timeout=60) as http:
        await eventually(lambda: _when(listed(http), lambda ids: SMALL in ids), 60, "the small pool listed")
        code = await ask(http, "auto", "Write a Python function that merges two sorted lists.")
        assert code.status_code == 200, code.text
        assert code.json()["model"] == PRIMARY and code.json()["route"] == {
            "requested": "auto",
            "reason": "auto: code",
            "fallback_from": None,
            "continued_after": None,
        }
        assert code.headers["x-chatbus-route"].startswith(f"model={PRIMARY}; requested=auto; reason=auto: code")
        chat = await ask(http, "auto", "Good evening! How are you?")
        assert chat.json()["model"] == SMALL and chat.json()["route"]["reason"].startswith("auto: classifier 0.")  # P(primary) < 0.5
        bad = await ask(http, "no-such-model", "hi")
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
    recorded = await eventually(lambda: mongo.turns.find_one({"_id": code.json()["id"], "route": {"$exists": True}}), 30, "the route recorded")
    assert recorded["model"] == PRIMARY and recorded["route"]["requested"] == "auto"


async def test_a_stopped_pool_falls_back_with_nothing_lost_and_comes_back(edge_url: str, stack: Stack) -> None:
    """Two clients keep asking the small model while its only worker stops: every turn is answered (by the
    small pool before the stop or after its return, by the primary as a fallback meanwhile), none hangs,
    none gets a 503 (a 429 is retried after its Retry-After, as clients do)."""
    service = next(name for name in stack.services if name.startswith("inference.chatbus-tiny-small"))
    answers: list[dict[str, Any]] = []
    refused: list[str] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=edge_url, timeout=120) as http:
        await eventually(lambda: _when(listed(http), lambda ids: SMALL in ids), 60, "the small pool listed")

        async def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                started = time.monotonic()
                r = await ask(http, SMALL, QUESTIONS[(n + 2 * i) % len(QUESTIONS)])
                if r.status_code == 429:  # backpressure, as any client: wait as told and ask again
                    refused.append(r.json()["error"]["message"])
                    await asyncio.sleep(float(r.headers["Retry-After"]))
                    continue
                assert r.status_code == 200, r.text  # never a 503: the fallback takes over
                answers.append({**r.json(), "seconds": time.monotonic() - started})
                i += 1

        clients = [asyncio.create_task(client(n)) for n in range(2)]
        try:
            await asyncio.sleep(2)
            await asyncio.to_thread(stack.stop, service)
            await eventually(lambda: _when(listed(http), lambda ids: SMALL not in ids), 30, "the stopped pool unlisted")
            fallen = len(answers)
            await eventually(lambda: asyncio.sleep(0, sum(a["model"] == PRIMARY for a in answers[fallen:]) >= 3), 60, "fallback answers")
            await asyncio.to_thread(stack.start, service)
            await eventually(lambda: _when(listed(http), lambda ids: SMALL in ids), 120, "the pool back")
            back = len(answers)
            await eventually(lambda: asyncio.sleep(0, any(a["model"] == SMALL for a in answers[back:])), 60, "the small pool answering again")
        finally:
            stop.set()
            await asyncio.gather(*clients)
    fallbacks = [a for a in answers if a["model"] == PRIMARY]
    assert fallbacks and all(a.get("route", {}).get("fallback_from") == SMALL and a["route"]["reason"] == "fallback: no live worker" for a in fallbacks), [
        (a["model"], a.get("route")) for a in fallbacks
    ]
    assert all(a["choices"][0]["finish_reason"] in ("stop", "length") for a in answers), [
        (a["model"], a["choices"][0]["finish_reason"], a.get("route")) for a in answers
    ]
    assert any(a["model"] == SMALL for a in answers[back:])
    assert len(refused) < len(answers), refused


async def test_a_pool_killed_mid_answer_is_continued_by_the_fallback(edge_url: str, stack: Stack, settings: Settings) -> None:
    """SIGKILL the small pool's only worker while it streams an answer: once its consumer group drops the
    member, the edge publishes the turn again to the fallback with the text streamed so far, the primary's
    model continues it, and the client's one stream goes on — nothing lost or repeated, one finish. The
    pool, restarted, skips the first turn (cancelled)."""
    service = next(name for name in stack.services if name.startswith("inference.chatbus-tiny-small"))
    text, ids, finish, at_kill = "", [], None, None
    body = {"model": SMALL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 600, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(base_url=edge_url, timeout=120) as http:
        await eventually(lambda: _when(listed(http), lambda ids: SMALL in ids), 60, "the small pool listed")
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("id:"):
                        ids.append(line[3:].strip())
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = orjson.loads(line[5:])
                    for choice in chunk.get("choices", []):
                        text += choice["delta"].get("content") or ""
                        if at_kill is None and text:
                            await asyncio.to_thread(stack.kill, service)
                            at_kill = len(text)
                        if choice.get("finish_reason"):
                            finish, route, first = choice["finish_reason"], chunk.get("route"), chunk["id"]
        finally:
            await asyncio.to_thread(stack.start, service)
        assert at_kill is not None and finish in ("stop", "length"), finish
        assert route is not None and route["fallback_from"] == SMALL and route["reason"] == "fallback: no live worker", route
        assert at_kill <= route["continued_after"] < len(text)  # the fallback wrote the rest
        assert ids and all(i.split(":")[0] == first for i in ids)  # the client resumes it by the id it knows
        conversation = (await read_topic(settings, "chat.replies", first))[0].conversation_id
        replies = [e for e in await read_topic(settings, "chat.replies") if getattr(e, "conversation_id", None) == conversation]
        done = [e for e in replies if isinstance(e, TurnCompleted) and e.correlation_id != first]  # the turn published again
        assert len(done) == 1 and done[0].model == PRIMARY and done[0].text == text  # no character lost or repeated
        assert done[0].usage.completion_tokens <= 600
        await eventually(lambda: _when(listed(http), lambda ids: SMALL in ids), 120, "the pool back")

    async def skipped() -> list[TurnCompleted]:
        return [e for e in await read_topic(settings, "chat.replies", first) if isinstance(e, TurnCompleted)]

    ends = await eventually(skipped, 60, "the restarted pool skipping the first turn")
    assert [e.finish_reason for e in ends] == ["cancelled"]


async def _when(values: Any, ok: Any) -> Any:
    result = await values
    return result if ok(result) else None
