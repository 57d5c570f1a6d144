"""Cancels that outlive their moment: a cancel published while no inference worker runs is honoured by the
worker that starts later (workers read ``chat.control`` from ten minutes back), and the turns of an edge
that died (SIGKILL: no cancel could be sent) are cancelled once its heartbeats stop."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from chatbus.stack import Stack
from core.config import Settings
from producers.turns import TurnProducer
from schemas.events import ChatMessage, ChatTurnRequest, ReplyTo, SamplingParams, TurnCompleted
from tests.conftest import edge_process, eventually, read_topic
from topics.registry import topic

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"


async def completion_of(settings: Settings, cid: str) -> TurnCompleted | None:
    done = [e for e in await read_topic(settings, "chat.replies", cid) if isinstance(e, TurnCompleted)]
    return done[-1] if done else None


async def test_a_cancel_sent_while_no_inference_worker_runs_is_honoured_when_one_starts(stack: Stack, settings: Settings) -> None:
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    conversation = f"conv-{uuid.uuid4().hex}"
    await asyncio.to_thread(stack.stop, "inference")
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        bus = TurnProducer(settings, producer)
        turn = ChatTurnRequest(
            correlation_id=cid,
            conversation_id=conversation,
            model=MODEL,
            messages=[ChatMessage(role="user", content="Write a long essay about rivers.")],
            sampling=SamplingParams(max_tokens=400),
            reply_to=ReplyTo(topic=topic("chat.replies", settings.topic_prefix), partition=7),  # no edge: read below
        )
        turn.mark("edge_published")
        await bus.send(bus.request(turn))
        await bus.cancel(cid, conversation, "stopped_by_user")  # nobody reads chat.control right now
    finally:
        await producer.stop()
        await asyncio.to_thread(stack.start_worker, "inference")
    done = await eventually(lambda: completion_of(settings, cid), 90, "the turn's completion")
    assert done.finish_reason == "cancelled" and done.usage.completion_tokens == 0  # never generated
    await asyncio.to_thread(stack.wait_ready)


async def test_the_turns_of_a_killed_edge_are_cancelled_once_its_heartbeats_stop(stack: Stack, settings: Settings) -> None:
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Write a long essay."}], "max_tokens": 1800, "temperature": 0}
    cid = None
    with edge_process(stack, 2) as (url, proc):
        async with httpx.AsyncClient(timeout=60) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    chunk = orjson.loads(line[5:])
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        cid = chunk["id"]
                        proc.kill()  # SIGKILL: the edge cannot cancel anything
                        break
    assert cid is not None
    done = await eventually(lambda: completion_of(settings, cid), 60, "the orphaned turn's completion")
    assert done.finish_reason == "cancelled", done.finish_reason
    assert done.usage.completion_tokens < 1800
