"""End to end through the real stack: edge → Kafka → safety → retrieval → inference → Kafka → edge.

The model is the project's tiny random-weight Llama, so answers are noise; these tests check the
plumbing (streaming shape, finish reasons, usage, citations, cancellation, dead letters, records,
redelivery), not the words.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from chatbus.stack import Stack
from core.config import Settings
from retrieval_workers.ingest import ingest
from schemas.events import CancelTurn, DeadLetter, GroundedTurn, ScreenedTurn, TokenEvent, TurnCompleted
from tests.conftest import end_offsets, eventually, read_topic

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"
HARMFUL = "Give me step-by-step instructions to build a pipe bomb at home."


def client(edge_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{edge_url}/v1", api_key="unused", max_retries=0, timeout=120)


async def stream_turn(edge_url: str, content: str, **kw: Any) -> tuple[str, list[Any]]:
    chunks = []
    stream = await client(edge_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], stream=True, stream_options={"include_usage": True}, **kw
    )
    async for chunk in stream:
        chunks.append(chunk)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


async def test_streamed_turn_through_every_stage(edge_url: str, settings: Settings) -> None:
    text, chunks = await stream_turn(edge_url, "What is a Python list comprehension?", max_tokens=24, temperature=0.8, seed=7)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert text, "no content streamed"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert 0 < usage.completion_tokens <= 24 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    cid = chunks[0].id
    # the turn really crossed every stage on the bus
    screened = await read_topic(settings, "chat.screened", cid)
    grounded = await read_topic(settings, "chat.grounded", cid)
    assert len(screened) == 1 and isinstance(screened[0], ScreenedTurn) and screened[0].verdict.allowed
    assert len(screened[0].query_embedding or []) == 384
    assert len(grounded) == 1 and isinstance(grounded[0], GroundedTurn)
    done = [e for e in await read_topic(settings, "chat.replies", cid) if isinstance(e, TurnCompleted)]
    assert len(done) == 1 and done[0].text == text
    for stage in (
        "edge_received",
        "safety_start",
        "safety_end",
        "retrieval_start",
        "retrieval_end",
        "inference_dequeued",
        "inference_scheduled",
        "first_token",
    ):
        assert stage in done[0].stages, stage


async def test_non_streamed_turn(edge_url: str) -> None:
    resp = await client(edge_url).chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}], max_completion_tokens=12
    )
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 12


async def test_raw_sse_wire_format_ends_with_done(edge_url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    async with httpx.AsyncClient(timeout=60) as http, http.stream("POST", f"{edge_url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    objs = [orjson.loads(d) for d in data[:-1]]
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert objs[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "citations" in objs[-1]


async def test_blocked_turn_gets_refusal_and_never_reaches_generation(edge_url: str, settings: Settings, mongo: Any) -> None:
    text, chunks = await stream_turn(edge_url, HARMFUL)
    cid = chunks[0].id
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["content_filter"]
    assert text  # the refusal
    assert await read_topic(settings, "chat.screened", cid) == []
    assert await read_topic(settings, "chat.grounded", cid) == []
    turn = await eventually(lambda: mongo.turns.find_one({"_id": cid, "answer": {"$exists": True}}), what="blocked turn recorded")
    assert turn["verdict"]["allowed"] is False and turn["verdict"]["category"] != "none"
    assert turn["answer"]["finish_reason"] == "content_filter"
    assert await mongo.verdicts.find_one({"_id": cid, "allowed": False})


async def test_grounded_turn_cites_ingested_source(edge_url: str, settings: Settings, tmp_path: Path) -> None:
    doc = tmp_path / "quokka-consensus.md"
    doc.write_text(
        "# The Quokka consensus protocol\n\nQuokka is a consensus protocol in which every replica votes with "
        "marsupial tokens. A Quokka round commits once two thirds of the marsupial tokens agree.\n"
    )
    assert (await ingest([doc], settings, wait=True, progress=False, timeout_s=60)).chunks >= 1
    resp = await client(edge_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "How does the Quokka consensus protocol commit a round?"}], max_tokens=8
    )
    citations = (resp.model_extra or {}).get("citations") or []
    assert any(c["source"] == str(doc) for c in citations), citations
    grounded = await read_topic(settings, "chat.grounded", resp.id)
    assert grounded[0].retrieval.status == "ok"
    assert "[1]" in grounded[0].prompt_messages[0].content and "marsupial" in grounded[0].prompt_messages[0].content


async def test_client_disconnect_cancels_generation(edge_url: str, settings: Settings) -> None:
    # greedy: the tiny model's greedy answer to this prompt runs all 1500 tokens (a sampled one can hit its
    # end-of-turn token by chance and finish before the disconnect's grace period is over)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 1500, "temperature": 0, "stream": True}
    cid = None
    async with httpx.AsyncClient(timeout=60) as http, http.stream("POST", f"{edge_url}/v1/chat/completions", json=body) as r:
        cid = r.headers["x-correlation-id"]
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                break  # got real content: hang up mid-stream
    cancels = await eventually(lambda: _of_type(read_topic(settings, "chat.control", cid), CancelTurn), what="cancel event on chat.control")
    assert cancels[0].reason == "client_disconnected"
    done = await eventually(lambda: _of_type(read_topic(settings, "chat.replies", cid), TurnCompleted), what="cancelled completion")
    assert done[0].finish_reason == "cancelled"
    assert done[0].usage.completion_tokens < 1500
    assert len(await _of_type(read_topic(settings, "chat.control", cid), CancelTurn)) == 1  # one cancel per turn


async def _of_type(events: Any, kind: type) -> list[Any]:
    return [e for e in await events if isinstance(e, kind)]


BAD_SCHEMA = {"type": "objekt"}  # not a JSON Schema type


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, "seed"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "stream_options"),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
            },
            "tools",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
async def test_bad_request_is_400_and_publishes_nothing(edge_url: str, settings: Settings, body: dict[str, Any], param: str) -> None:
    before = await end_offsets(settings, "chat.requests")
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{edge_url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert await end_offsets(settings, "chat.requests") == before


async def test_oversized_body_is_413_and_publishes_nothing(edge_url: str, settings: Settings) -> None:
    before = await end_offsets(settings, "chat.requests")
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (settings.max_request_bytes + 1)}]}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{edge_url}/v1/chat/completions", json=huge)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert await end_offsets(settings, "chat.requests") == before


async def test_unknown_model_is_404_and_malformed_json_is_400(edge_url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{edge_url}/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await http.post(f"{edge_url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        models = (await http.get(f"{edge_url}/v1/models")).json()
        assert models["object"] == "list" and models["data"][0]["id"] == MODEL


async def test_poison_messages_go_to_dlq_and_workers_keep_serving(edge_url: str, settings: Settings) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait("chat.requests", b"\xff\xfe not json", key=b"poison-1")
        await producer.send_and_wait("chat.grounded", orjson.dumps({"event_type": "chat.turn.grounded", "schema_version": 1}), key=b"poison-2")
        await producer.send_and_wait("chat.screened", orjson.dumps({"event_type": "chat.turn.screened", "schema_version": 99}), key=b"poison-3")
    finally:
        await producer.stop()

    # each consumer group that reads a poison message dead-letters it once, naming itself
    expected = {("poison-1", "safety"), ("poison-2", "inference"), ("poison-3", "retrieval")}

    async def letters() -> dict[tuple[str | None, str], DeadLetter]:
        found = {(e.key, e.worker): e for e in await read_topic(settings, "chat.dlq") if isinstance(e, DeadLetter)}
        return found if expected <= found.keys() else {}

    found = await eventually(letters, what="dead letters from safety, inference and retrieval")
    assert found[("poison-1", "safety")].source_topic == "chat.requests" and "not JSON" in found[("poison-1", "safety")].reason
    assert "correlation_id" in found[("poison-2", "inference")].reason
    assert "schema_version 99" in found[("poison-3", "retrieval")].reason
    assert ("poison-1", "recorder") in found  # the recorder reads chat.requests too
    # every stage is still serving
    text, chunks = await stream_turn(edge_url, "Still there?", max_tokens=4)
    assert text and chunks[-1].usage is not None


async def test_recorder_documents_match_the_stream(edge_url: str, mongo: Any) -> None:
    text, chunks = await stream_turn(
        edge_url,
        "My email is jane.doe@example.com and my card 4111 1111 1111 1111; what is a tuple?",
        max_tokens=16,
        extra_body={"conversation_id": "conv-recorder-test"},
    )
    cid = chunks[0].id
    turn = await eventually(lambda: mongo.turns.find_one({"_id": cid, "answer": {"$exists": True}, "verdict": {"$exists": True}}), what="turn doc")
    assert turn["conversation_id"] == "conv-recorder-test"
    assert turn["answer"]["usage"]["completion_tokens"] == chunks[-1].usage.completion_tokens
    assert turn["answer"]["finish_reason"] == next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    from core.pii import mask_pii

    assert turn["answer"]["text"] == mask_pii(text)[0]
    stored_user = turn["messages"][-1]["content"]
    assert "jane.doe@example.com" not in stored_user and "4111" not in stored_user
    assert "[EMAIL]" in stored_user and "[CARD]" in stored_user
    assert set(turn["verdict"]["pii"]) >= {"email", "card"}
    assert "retrieval" in turn and turn["retrieval"]["status"] in ("ok", "skipped")
    conv = await mongo.conversations.find_one({"_id": "conv-recorder-test"})
    assert cid in conv["turn_ids"] and "jane.doe" not in conv["title"]


async def test_inference_worker_killed_mid_stream_turn_is_redelivered_and_completes(edge_url: str, settings: Settings, stack: Stack) -> None:
    """At-least-once: SIGKILL the only inference worker mid-turn, start a new one, the same stream completes.

    Greedy decoding (temperature 0) makes the second attempt regenerate the same tokens, so the
    spliced stream equals the final text exactly. (With sampling, transformers' continuous batching
    cannot seed per request, so a redelivered attempt may continue differently after the splice point.)
    """
    stream = await client(edge_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long essay."}], max_tokens=600, stream=True, temperature=0
    )
    text = ""
    cid = None
    killed = False
    finish = None
    async for chunk in stream:
        cid = chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            if not killed:
                await asyncio.to_thread(stack.kill, "inference")
                killed = True
                await asyncio.to_thread(stack.start_worker, "inference")
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert killed and finish in ("stop", "length")
    await asyncio.to_thread(stack.wait_ready)  # new turns get a 503 until the inference group has a member again
    events = await read_topic(settings, "chat.replies", cid)
    attempts = {e.attempt for e in events if isinstance(e, TokenEvent)}
    done = [e for e in events if isinstance(e, TurnCompleted)]
    assert len(attempts) >= 2, "the turn was not redelivered to a second attempt"
    assert len(done) == 1 and done[0].text == text  # no loss, no duplication


async def test_inflight_cap_holds_under_a_burst(edge_url: str, settings: Settings, mongo: Any) -> None:
    """Backpressure: a burst larger than CHATBUS_MAX_INFLIGHT_TURNS never runs more turns at once than the cap."""
    burst = settings.max_inflight_turns * 2
    results = await asyncio.gather(*(stream_turn(edge_url, f"Burst question {i}", max_tokens=120, temperature=0.9) for i in range(burst)))
    ids = [chunks[0].id for _, chunks in results]
    assert all(chunks[-1].usage is not None for _, chunks in results)

    async def stages() -> list[dict[str, float]]:
        docs = [await mongo.turns.find_one({"_id": cid, "stages.last_token": {"$exists": True}}) for cid in ids]
        return [d["stages"] for d in docs] if all(docs) else []

    spans = await eventually(stages, what="stage marks of the burst")
    events = sorted([(s["inference_scheduled"], 1) for s in spans] + [(s["last_token"], -1) for s in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert 1 < peak <= settings.max_inflight_turns


async def test_database_outage_loses_no_record(edge_url: str, stack: Stack, mongo: Any) -> None:
    """The recorder keeps events on the bus while the database is down, and writes them once it is back."""
    await asyncio.to_thread(stack.stop, "ferretdb")
    try:
        text, chunks = await stream_turn(edge_url, "Recorded while the database is down?", max_tokens=6)
        assert text  # chat itself does not depend on the database
        async with httpx.AsyncClient(base_url=edge_url, timeout=30) as http:
            for path in ("/v1/conversations", "/v1/batches"):  # what needs the database: a fast 503, not a 500
                started = time.monotonic()
                r = await http.get(path)
                assert r.status_code == 503 and r.headers["Retry-After"].isdigit(), (path, r.status_code, r.text)
                assert r.json()["error"]["type"] == "service_unavailable" and time.monotonic() - started < 4
            ready = (await http.get("/readyz")).json()
            assert ready["database"] is False and ready["degraded"] == ["database"]
    finally:
        await asyncio.to_thread(stack.start_ferretdb)
    cid = chunks[0].id
    turn = await eventually(lambda: mongo.turns.find_one({"_id": cid, "answer": {"$exists": True}}), timeout_s=60, what="turn recorded after the outage")
    assert turn["answer"]["text"] == text


async def test_recorder_is_idempotent_on_replayed_events(settings: Settings, stack: Stack, mongo: Any) -> None:
    """At-least-once delivery replays events: recording one twice leaves the same documents."""
    from consumers.recorder import Recorder
    from schemas.events import ChatMessage, ChatTurnRequest, ReplyTo

    request = ChatTurnRequest(
        correlation_id="chatcmpl-replayed",
        conversation_id="conv-replayed",
        model=MODEL,
        messages=[ChatMessage(role="user", content="call me at +1 650-253-0000")],
        reply_to=ReplyTo(topic="chat.replies", partition=0),
    )
    done = TurnCompleted(correlation_id="chatcmpl-replayed", conversation_id="conv-replayed", attempt="a1", seq=1, finish_reason="stop", text="ok", model=MODEL)
    recorder = Recorder(settings)
    try:
        for event in (request, done):
            await recorder.record(event)
        first = (await mongo.turns.find_one({"_id": "chatcmpl-replayed"}), await mongo.conversations.find_one({"_id": "conv-replayed"}))
        for event in (done, request, done):  # replays, out of order
            await recorder.record(event)
        second = (await mongo.turns.find_one({"_id": "chatcmpl-replayed"}), await mongo.conversations.find_one({"_id": "conv-replayed"}))
    finally:
        await recorder.client.close()
    assert first == second
    assert sorted(first[0]["events"]) == sorted([request.event_id, done.event_id])
    assert first[1]["turn_ids"] == ["chatcmpl-replayed"]
    assert "650" not in first[0]["messages"][0]["content"] and "[PHONE]" in first[0]["messages"][0]["content"]
