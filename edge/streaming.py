"""The SSE events of a streamed turn, live (:func:`live_events`) or resumed after the last event a client
received (:func:`resumed_events`): both run one loop, :func:`turn_events`.

Events are OpenAI ``chat.completion.chunk`` objects, each with an SSE ``id`` (:func:`edge.relay.sse_event_id`)
that lets a client resume on any edge, ``: ping`` comments every ``sse_ping_s`` while no event arrives,
and ``data: [DONE]`` last. Once a stream has begun, an error becomes one error chunk and the stream still
ends with ``[DONE]`` (as vLLM's server does). When the edge drains (SIGTERM), each open stream ends with an
error chunk ``code: "edge_draining"`` whose ``resume_id`` (also its SSE ``id``) resumes it on another edge,
then ``[DONE]``; the turn is not cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Histogram

from core import metrics
from edge.errors import APIError, error_body, generation_error
from edge.relay import Draining, TurnStream, TurnTimeout, reply_event, sse_event_id
from edge.turns import ChatService, TurnRef, timing_ms
from schemas.events import ChatTurnRequest, TurnCompleted
from schemas.openai import ChunkBuilder
from topics.clients import make_consumer, records_forever

Event = dict[str, str]
# The keep-alive: a comment *line* with no blank line after it. A comment block (": ping" + blank line)
# makes the openai SDK (openai-python, still in 3.52) dispatch an empty event once any event had an
# ``id:`` — every event here has one — and ``json.loads("")`` ends the client's stream
# (openai/openai-python#2722). Spec parsers (browsers' EventSource, chat.js) skip the line either way.
PING = b": ping\n"


def data(obj: dict[str, Any]) -> Event:
    return {"data": orjson.dumps(obj).decode()}


def closing_events(
    chunks: ChunkBuilder, done: TurnCompleted, include_usage: bool, finish_extra: dict[str, Any] | None = None, event_id: str | None = None
) -> list[Event]:
    """The SSE events that end a streamed turn: its finish chunk (plus ``finish_extra`` fields and an SSE
    ``id`` if given) and the usage chunk when asked for — or one error chunk if generation failed."""
    if done.finish_reason == "error":
        return [data(error_body(generation_error(done)))]
    out: list[Event] = [data(chunk) for chunk in chunks.tool_calls(done.tool_calls)]
    if done.retraction is not None:
        # the output rail withdrew the text streamed so far: the safety message follows it (a client that
        # reads ``chatbus_retraction`` on the finish chunk shows the message instead of the text)
        out.append(data(chunks.content(("\n\n" if done.retraction.withdrawn_chars else "") + done.text)))
    finish = data({**chunks.finish(done), **(finish_extra or {})})
    if event_id is not None:
        finish["id"] = event_id
    return [*out, finish, data(chunks.usage(done.usage))] if include_usage else [*out, finish]


async def turn_events(
    service: ChatService,
    stream: TurnStream,
    chunks: ChunkBuilder,
    event_id: Callable[[], str],
    *,
    opening: Callable[[], Awaitable[list[Event]]],
    closing: Callable[[TurnCompleted], list[Event]],
    on_timeout: Callable[[], Awaitable[None]],
    cleanup: Callable[[], Awaitable[None]],
    itl: Histogram | None = None,
) -> AsyncIterator[Event | bytes]:
    """The one streaming loop: ``opening()``'s events, a content chunk per piece of text (observing the
    inter-token latency on ``itl``), ping comments, ``closing(done)``; on a timeout ``on_timeout()`` and an
    error chunk; ``cleanup()`` however it ends (also when the client leaves: the generator is cancelled or
    closed); ``[DONE]`` last."""
    settings = service.settings
    try:
        for event in await opening():
            yield event
        last: float | None = None
        async for piece in stream.pieces(settings.turn_timeout_s, settings.sse_ping_s or None):
            if piece is None:  # keep-alive while waiting (sse-starlette's own ping task is off: ~7 KB a stream)
                yield PING
                continue
            if itl is not None:
                now = time.perf_counter()
                if last is not None:
                    itl.observe(now - last)
                last = now
            yield {**data(chunks.content(piece)), "id": event_id()}
        done = stream.done
        assert done is not None
        for event in closing(done):
            yield event
    except TurnTimeout as exc:
        await on_timeout()
        yield data(error_body(APIError(504, str(exc), type="timeout")))
    except Draining:
        # the edge is shutting down: tell the client where to resume (the turn goes on generating), then [DONE]
        resume_id = event_id()
        message = f"{settings.edge_id} is shutting down: resume this stream on another edge with Last-Event-ID: {resume_id}"
        farewell = {**error_body(APIError(503, message, type="service_unavailable", code="edge_draining")), "resume_id": resume_id}
        yield {**data(farewell), "id": resume_id}
    finally:
        await cleanup()
    yield {"data": "[DONE]"}


def resume_event_id(service: ChatService, turn: ChatTurnRequest, delivered: int = 0) -> str:
    """The SSE id to resume ``turn`` with after ``delivered`` characters (``Last-Event-ID``): its reply
    partition and a time 1 s before the edge published it (margin for clock skew). With ``delivered=0`` it is
    the ``X-Resume-Event-Id`` response header, so a client cut off before its first event can still resume."""
    since_ms = int(turn.stages.get("edge_published", time.time()) * 1000) - 1000
    return sse_event_id(turn.correlation_id, service.reply_to.partition or 0, since_ms, delivered)


def live_events(service: ChatService, turn: ChatTurnRequest, stream: TurnStream, include_usage: bool) -> AsyncIterator[Event | bytes]:
    """The events of a turn this edge published: the role chunk, the text, the finish chunk with the
    ``timing`` split (:func:`schemas.timing.breakdown`)."""
    chunks = ChunkBuilder(turn.correlation_id, turn.model, include_usage)

    def sid() -> str:
        return resume_event_id(service, turn, stream.delivered)

    async def opening() -> list[Event]:
        return [{**data(chunks.role()), "id": sid()}]

    def closing(done: TurnCompleted) -> list[Event]:
        extra: dict[str, Any] = {"timing": timing_ms(service.finished(turn, stream))}
        if turn.route is not None:  # how the model was chosen (edge.routing)
            extra["route"] = turn.route.model_dump()
        if done.cache is not None:  # served from a response cache (inference_workers.response_cache)
            extra["cache"] = done.cache
        return closing_events(chunks, done, include_usage, finish_extra=extra)

    async def on_timeout() -> None:
        await service.cancel(turn, "timeout", stream)

    async def cleanup() -> None:
        service.relay.close(turn.correlation_id)
        if stream.done is None and not stream.interrupted:
            # The client went away mid-turn: sse-starlette cancels the generator (CancelledError) or
            # closes it (GeneratorExit) — stop generation over the bus unless it resumes in time.
            service.cancel_unless_resumed(turn, stream)

    return turn_events(
        service, stream, chunks, sid, opening=opening, closing=closing, on_timeout=on_timeout, cleanup=cleanup, itl=metrics.ITL.labels(turn.model)
    )


def on_client_close(service: ChatService, turn: ChatTurnRequest, stream: TurnStream) -> Callable[[Any], Awaitable[None]]:
    """sse-starlette's close handler: also covers a client gone before the generator's first step."""

    async def handler(message: Any) -> None:
        if stream.done is None:
            service.relay.close(turn.correlation_id)
            # not awaited here: sse-starlette cancels its task group (this handler included) as soon as
            # its heartbeat task sees the stream closed, which lost most cancels when 10,000 clients
            # dropped at once (bench/open_streams.py); a background task outlives the response
            service.cancel_unless_resumed(turn, stream)

    return handler


def resumed_events(service: ChatService, cid: str, partition: int, since_ms: int, delivered: int, include_usage: bool) -> AsyncIterator[Event | bytes]:
    """The rest of a streamed turn after ``delivered`` characters, read back from its reply partition
    (from ``since_ms``) and then live: no character lost or repeated (:meth:`TurnStream.splice`). A turn this
    edge rerouted after the id was handed out is followed as the turn it runs as."""
    cid = service.relay.current(cid)
    stream = TurnStream(cid)
    stream.delivered = delivered
    chunks = ChunkBuilder(cid, service.settings.model_name, include_usage)
    tp = TopicPartition(service.reply_to.topic, partition)
    conversation = {"id": ""}
    consumers: list[AIOKafkaConsumer] = []  # made once the stream starts (a client gone before has none)
    feeder: list[asyncio.Task[None]] = []

    async def feed(consumer: AIOKafkaConsumer) -> None:
        async for record in records_forever(consumer, f"resume {cid}"):
            ev = reply_event(record.value, (cid,))
            if ev is not None:
                conversation["id"] = ev.conversation_id
                stream.put(ev)

    def sid() -> str:
        return sse_event_id(cid, partition, since_ms, stream.delivered)

    async def opening() -> list[Event]:
        service.claim(cid)
        service.resumed.add(stream)
        consumer = make_consumer(service.settings, group_id=None, fetch_max_wait_ms=5)
        consumers.append(consumer)
        await consumer.start()
        consumer.assign([tp])
        found = await consumer.offsets_for_times({tp: since_ms})
        if found.get(tp) is not None:
            consumer.seek(tp, found[tp].offset)
        else:
            await consumer.seek_to_end(tp)
        feeder.append(asyncio.create_task(feed(consumer)))
        return []

    def closing(done: TurnCompleted) -> list[Event]:
        return closing_events(chunks, done, include_usage, event_id=sid())

    async def on_timeout() -> None:
        pass

    async def cleanup() -> None:
        service.resumed.discard(stream)
        for task in feeder:
            task.cancel()
        for consumer in consumers:
            with contextlib.suppress(Exception):
                await consumer.stop()
        if stream.done is None and conversation["id"] and not stream.interrupted:  # this client left too: the same grace applies
            service.cancel_unless_resumed(TurnRef(cid, conversation["id"]), stream)

    return turn_events(service, stream, chunks, sid, opening=opening, closing=closing, on_timeout=on_timeout, cleanup=cleanup)
