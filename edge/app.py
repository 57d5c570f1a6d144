"""The SSE edge: an OpenAI-compatible HTTP front for the bus (Starlette + sse-starlette).

Routes: ``POST /v1/chat/completions`` (streaming and not), ``GET /v1/models``, ``GET /healthz``
(process alive), ``GET /readyz`` (broker reachable, reply relay running, and every stage's consumer
group has a live member), and OpenAI's Files and Batch APIs for batch jobs (:mod:`batches.service`):
``POST /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``POST /v1/batches``
(an ``Idempotency-Key`` header makes re-submission return the same batch), ``GET /v1/batches``,
``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``; for the chat page (``GET /``)
``POST /v1/chat/completions/{id}/cancel`` (Stop), ``GET /v1/chat/completions/{id}/events`` (resume a
stream), ``GET /v1/conversations[/{id}]`` (:mod:`edge.conversations`) and ``POST /v1/feedback``
(:mod:`edge.feedback`, published to ``chat.feedback``); for analysts ``GET /dashboard`` (+
``/dashboard.json``); for operators ``GET /metrics`` (Prometheus, :mod:`core.metrics`), ``GET /live``
(a page of live plots) and ``GET /live.json`` (its data, :mod:`edge.live`).

Admission control (:mod:`edge.admission`) runs before anything is published: past its bounds a turn
or a batch submission gets a 429 with ``Retry-After``. Every answer carries its latency split
(:mod:`schemas.timing`): ``timing`` on the last chunk or in the body, and ``Server-Timing`` on a
non-streamed response.

A request is validated and only then published to ``chat.requests`` keyed by conversation id, with
``reply_to`` this instance's reply partition. The response is built from the token events the relay
routes back. A client that disconnects mid-stream causes a ``chat.turn.cancel`` on ``chat.control``, so
generation stops. Once a stream has begun, an error becomes one error chunk and the stream still ends
with ``data: [DONE]`` (as vLLM's server does).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pymongo import AsyncMongoClient
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from batches.service import BatchService
from batches.store import BatchStore
from core import metrics
from core.config import Settings, get_settings
from core.pii import mask_pii
from edge.admission import LoadMonitor, decide, refuse
from edge.conversations import ConversationStore, TurnInfo
from edge.errors import EXCEPTION_HANDLERS, APIError
from edge.feedback import feedback_event, parse_feedback
from edge.live import LiveStats
from edge.relay import (
    ReplyRelay,
    TurnStream,
    TurnTimeout,
    parse_event_id,
    reply_event,
    sse_event_id,
)
from schemas.events import (
    CancelTurn,
    ChatMessage,
    ChatTurnRequest,
    ReplyTo,
    TurnCompleted,
)
from schemas.feedback import prompt_group
from schemas.openai import ChatCompletionRequest, ChunkBuilder, check_supported, completion_body, parse_request
from schemas.timing import breakdown, server_timing
from topics.clients import make_admin, make_consumer, make_producer, records_forever
from topics.compat import describe_groups
from topics.registry import (
    CHAT_CONTROL,
    CHAT_FEEDBACK,
    CHAT_REPLIES,
    CHAT_REQUESTS,
    GROUPS,
    spec,
    topic,
)

log = logging.getLogger(__name__)

STAGE_GROUPS = tuple(g.group_id for g in GROUPS if g.stage)
STATIC = Path(__file__).resolve().parent / "static"
CHAT_REPLIES_PARTITIONS = spec(CHAT_REPLIES).partitions


class TurnKey(Protocol):
    """What a cancel needs of a turn."""

    @property
    def correlation_id(self) -> str: ...

    @property
    def conversation_id(self) -> str: ...


@dataclass(frozen=True)
class _TurnRef:
    correlation_id: str
    conversation_id: str


@dataclass(frozen=True)
class _Finished:
    """A turn this edge finished recently: feedback on it is accepted before the recorder has stored it."""

    conversation_id: str
    messages: list[ChatMessage]
    model: str
    finish_reason: str

    def info(self, correlation_id: str) -> TurnInfo:
        masked = [{"role": m.role, "content": mask_pii(m.content)[0]} for m in self.messages]
        return TurnInfo(correlation_id, self.conversation_id, prompt_group(self.conversation_id, masked), self.model, self.finish_reason)


RECENT_TURNS = 4096  # finished turns remembered per edge (for feedback that outruns the recorder)


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ChatService:
    """Publishes turns and turns their reply events into OpenAI responses."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, relay: ReplyRelay, monitor: LoadMonitor, live: LiveStats) -> None:
        self.settings = settings
        self.producer = producer
        self.relay = relay
        self.monitor = monitor
        self.live = live
        self.requests_topic = topic(CHAT_REQUESTS, settings.topic_prefix)
        self.control_topic = topic(CHAT_CONTROL, settings.topic_prefix)
        self.reply_to = ReplyTo(topic=topic(CHAT_REPLIES, settings.topic_prefix), partition=settings.reply_partition)
        self.feedback_topic = topic(CHAT_FEEDBACK, settings.topic_prefix)
        self._background: set[asyncio.Task[None]] = set()
        self.pending_cancels: dict[str, asyncio.TimerHandle] = {}  # disconnected turns a resume may still claim
        # correlation id -> conversation id of turns this edge published and not yet saw end (for Stop)
        self.open_turns: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.recent: collections.OrderedDict[str, _Finished] = collections.OrderedDict()

    def build_turn(self, req: ChatCompletionRequest, received_at: float) -> ChatTurnRequest:
        if req.model != self.settings.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", type="NotFoundError", param="model", code="model_not_found")
        turn = ChatTurnRequest(
            correlation_id=f"chatcmpl-{uuid.uuid4().hex}",
            conversation_id=req.conversation_id or f"conv-{uuid.uuid4().hex}",
            model=req.model,
            messages=req.chat_messages(),
            sampling=req.sampling(self.settings.default_max_tokens),
            reply_to=self.reply_to,
            user=req.user,
        )
        turn.mark("edge_received", received_at)
        return turn

    def admit(self, turn: ChatTurnRequest) -> dict[str, str]:
        """Admission control (:mod:`edge.admission`): raises a 429, or returns headers for the response
        (``X-Chatbus-Brownout`` when ``max_tokens`` was capped)."""
        load = self.monitor.snapshot(len(self.relay.turns))
        decision = decide(load, self.settings, "interactive", turn.sampling.max_tokens)
        if not decision.admit:
            self.live.rejected("interactive")
            raise refuse(decision, "interactive", load, self.settings)
        self.monitor.admitted()
        if decision.max_tokens is not None and decision.max_tokens < turn.sampling.max_tokens:
            turn.sampling.max_tokens = decision.max_tokens
            metrics.BROWNOUT_CAPPED.inc()
            return {"X-Chatbus-Brownout": f"max_tokens={decision.max_tokens}"}
        return {}

    def finished(self, turn: ChatTurnRequest, stream: TurnStream) -> dict[str, dict[str, float]]:
        """Record a finished turn's metrics; returns its latency split (:func:`schemas.timing.breakdown`)."""
        done = stream.done
        assert done is not None
        stages = {**turn.stages, **done.stages, "last_relayed": time.time()}
        if stream.first_relayed is not None:
            stages["first_relayed"] = stream.first_relayed
        parts = breakdown(stages)
        model = turn.model
        metrics.REQUEST_SUCCESS.labels(model, done.finish_reason).inc()
        metrics.EDGE_GENERATION_TOKENS.labels(model).inc(done.usage.completion_tokens)
        totals = parts["totals"]
        if "ttft" in totals and done.finish_reason in ("stop", "length"):
            metrics.TTFT.labels(model).observe(totals["ttft"])
        if "e2e" in totals:
            metrics.E2E.labels(model).observe(totals["e2e"])
        for name, seconds in parts["stages"].items():
            metrics.TURN_STAGE.labels(name).observe(seconds)
        for name, seconds in parts["hops"].items():
            metrics.TURN_HOP.labels(name).observe(seconds)
        self.live.turn(done.finish_reason, parts, done.usage.completion_tokens)
        self.monitor.turn_finished()
        self.open_turns.pop(turn.correlation_id, None)
        self.recent[turn.correlation_id] = _Finished(turn.conversation_id, turn.messages, done.model or turn.model, done.finish_reason)
        while len(self.recent) > RECENT_TURNS:
            self.recent.popitem(last=False)
        return parts

    async def publish(self, turn: ChatTurnRequest) -> TurnStream:
        turn.mark("edge_published")
        value = turn.to_bytes()  # validated input always serialises; do it before anything is opened
        stream = self.relay.open(turn.correlation_id)
        self.open_turns[turn.correlation_id] = turn.conversation_id
        while len(self.open_turns) > RECENT_TURNS:  # turns abandoned without an end are forgotten, oldest first
            self.open_turns.popitem(last=False)
        try:
            await self.producer.send_and_wait(self.requests_topic, value, key=turn.key)
        except Exception as exc:
            self.relay.close(turn.correlation_id)
            self.open_turns.pop(turn.correlation_id, None)
            log.exception("publishing turn %s failed", turn.correlation_id)
            raise APIError(503, "the message bus is unavailable, try again", type="service_unavailable") from exc
        return stream

    async def cancel(self, turn: TurnKey, reason: str, stream: TurnStream | None = None) -> None:
        """Publish ``chat.turn.cancel`` for the turn (once per stream)."""
        if stream is not None:
            if stream.cancel_sent:
                return
            stream.cancel_sent = True
        ev = CancelTurn(correlation_id=turn.correlation_id, conversation_id=turn.conversation_id, reason=reason)
        try:
            await self.producer.send_and_wait(self.control_topic, ev.to_bytes(), key=ev.key)
            log.info("turn %s cancelled: %s", turn.correlation_id, reason)
        except Exception:
            log.exception("could not publish cancel for %s", turn.correlation_id)

    async def stream_events(self, turn: ChatTurnRequest, stream: TurnStream, include_usage: bool) -> AsyncIterator[dict[str, str]]:
        """The SSE events of a streamed turn (OpenAI chunks, then ``[DONE]``), with ``: ping`` comments
        every ``sse_ping_s`` while no event arrives."""
        chunks = ChunkBuilder(turn.correlation_id, turn.model, include_usage)
        itl = metrics.ITL.labels(turn.model)
        since_ms = int(turn.stages.get("edge_published", time.time()) * 1000) - 1000  # margin for clock skew

        def sid() -> str:
            return sse_event_id(turn.correlation_id, self.reply_to.partition or 0, since_ms, stream.delivered)

        try:
            yield {**_data(chunks.role()), "id": sid()}
            last: float | None = None
            async for piece in stream.pieces(self.settings.turn_timeout_s, self.settings.sse_ping_s or None):
                if piece is None:  # keep-alive while waiting (sse-starlette's own ping task is off: ~7 KB a stream)
                    yield {"comment": "ping"}
                    continue
                now = time.perf_counter()
                if last is not None:
                    itl.observe(now - last)
                last = now
                yield {**_data(chunks.content(piece)), "id": sid()}
            done = stream.done
            assert done is not None
            timing = _timing_ms(self.finished(turn, stream))
            for event in _closing_events(chunks, done, include_usage, finish_extra={"timing": timing}):
                yield event
        except TurnTimeout as exc:
            await self.cancel(turn, "timeout", stream)
            yield _data(APIError(504, str(exc), type="timeout").body())
        finally:
            self.relay.close(turn.correlation_id)
            if stream.done is None:
                # The client went away mid-turn: sse-starlette cancels the generator (CancelledError) or
                # closes it (GeneratorExit) — stop generation over the bus unless it resumes in time.
                self.cancel_unless_resumed(turn, stream)
        yield {"data": "[DONE]"}

    def on_client_close(self, turn: ChatTurnRequest, stream: TurnStream) -> Callable[[Any], Awaitable[None]]:
        """sse-starlette's close handler: also covers a client gone before the generator's first step."""

        async def handler(message: Any) -> None:
            if stream.done is None:
                self.relay.close(turn.correlation_id)
                # not awaited here: sse-starlette cancels its task group (this handler included) as soon as
                # its heartbeat task sees the stream closed, which lost most cancels when 10,000 clients
                # dropped at once (bench/open_streams.py); a background task outlives the response
                self.cancel_unless_resumed(turn, stream)

        return handler

    def cancel_unless_resumed(self, turn: TurnKey, stream: TurnStream) -> None:
        """A client left mid-turn: cancel it after ``resume_grace_s`` unless a client resumes it first
        (:meth:`resume_events`); at once when the grace is 0."""
        cid = turn.correlation_id
        if stream.cancel_sent or cid in self.pending_cancels:
            return
        if self.settings.resume_grace_s <= 0:
            self.cancel_soon(turn, "client_disconnected", stream)
            return

        def fire() -> None:
            if self.pending_cancels.pop(cid, None) is not None:
                self.cancel_soon(turn, "client_disconnected", stream)

        self.pending_cancels[cid] = asyncio.get_running_loop().call_later(self.settings.resume_grace_s, fire)

    async def resume_events(self, cid: str, partition: int, since_ms: int, delivered: int, include_usage: bool) -> AsyncIterator[dict[str, str]]:
        """The rest of a streamed turn after ``delivered`` characters, read back from its reply partition
        (from ``since_ms``) and then live: no character lost or repeated (:meth:`TurnStream.splice`)."""
        pending = self.pending_cancels.pop(cid, None)
        if pending is not None:
            pending.cancel()
        stream = TurnStream(cid)
        stream.delivered = delivered
        chunks = ChunkBuilder(cid, self.settings.model_name, include_usage)
        consumer = make_consumer(self.settings, group_id=None, fetch_max_wait_ms=5)
        tp = TopicPartition(self.reply_to.topic, partition)
        conversation = {"id": ""}

        async def feed() -> None:
            async for record in records_forever(consumer, f"resume {cid}"):
                ev = reply_event(record.value, (cid,))
                if ev is not None:
                    conversation["id"] = ev.conversation_id
                    stream.put(ev)

        def sid() -> str:
            return sse_event_id(cid, partition, since_ms, stream.delivered)

        feeder: asyncio.Task[None] | None = None
        try:
            await consumer.start()
            consumer.assign([tp])
            found = await consumer.offsets_for_times({tp: since_ms})
            if found.get(tp) is not None:
                consumer.seek(tp, found[tp].offset)
            else:
                await consumer.seek_to_end(tp)
            feeder = asyncio.create_task(feed())
            async for piece in stream.pieces(self.settings.turn_timeout_s, self.settings.sse_ping_s or None):
                if piece is None:
                    yield {"comment": "ping"}
                    continue
                yield {**_data(chunks.content(piece)), "id": sid()}
            done = stream.done
            assert done is not None
            for event in _closing_events(chunks, done, include_usage, event_id=sid()):
                yield event
        except TurnTimeout as exc:
            yield _data(APIError(504, str(exc), type="timeout").body())
        finally:
            if feeder is not None:
                feeder.cancel()
            with contextlib.suppress(Exception):
                await consumer.stop()
            if stream.done is None and conversation["id"]:  # this client left too: the same grace applies
                self.cancel_unless_resumed(_TurnRef(cid, conversation["id"]), stream)
        yield {"data": "[DONE]"}

    async def stop(self, cid: str, conversations: ConversationStore) -> dict[str, Any]:
        """The chat page's Stop: publish ``chat.turn.cancel`` now (no resume grace). The turn may be relayed
        by any edge; its conversation id (the cancel's key) comes from this edge or the database.
        404 if the turn is unknown; ``cancelled: false`` if it had already finished."""
        pending = self.pending_cancels.pop(cid, None)
        if pending is not None:
            pending.cancel()
        conversation = self.open_turns.get(cid)
        if conversation is None:
            if cid in self.recent:
                return {"id": cid, "object": "chat.completion.cancel", "cancelled": False}
            doc = await conversations.db.turns.find_one({"_id": cid}, {"conversation_id": 1, "answer.finish_reason": 1})
            if doc is None or not doc.get("conversation_id"):
                raise APIError(404, f"No chat completion found with id '{cid}'.", type="NotFoundError", param="completion_id")
            if doc.get("answer"):
                return {"id": cid, "object": "chat.completion.cancel", "cancelled": False}
            conversation = doc["conversation_id"]
        await self.cancel(_TurnRef(cid, conversation), "stopped_by_user", self.relay.turns.get(cid))
        return {"id": cid, "object": "chat.completion.cancel", "cancelled": True}

    async def turn_info(self, cid: str, conversations: ConversationStore) -> TurnInfo | None:
        """A completed turn: one this edge finished, else one the recorder stored."""
        recent = self.recent.get(cid)
        return recent.info(cid) if recent is not None else await conversations.turn(cid)

    def cancel_soon(self, turn: TurnKey, reason: str, stream: TurnStream) -> None:
        """Publish a cancel from a context that cannot await (a closing generator); the task is kept alive."""
        task = asyncio.get_running_loop().create_task(self.cancel(turn, reason, stream))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def complete(self, turn: ChatTurnRequest, stream: TurnStream, request: Request) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
        """Wait for the whole answer; a client that disconnects meanwhile cancels the turn.

        Returns the response body and the turn's latency split (seconds, :func:`schemas.timing.breakdown`)."""
        waiter = asyncio.ensure_future(self._drain_pieces(stream))
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=0.5)
                if not waiter.done() and await request.is_disconnected():
                    waiter.cancel()
                    await self.cancel(turn, "client_disconnected", stream)
                    raise APIError(499, "client closed the request", type="client_closed")
            waiter.result()
        except TurnTimeout as exc:
            await self.cancel(turn, "timeout", stream)
            raise APIError(504, str(exc), type="timeout") from None
        finally:
            waiter.cancel()
            self.relay.close(turn.correlation_id)
        done = stream.done
        assert done is not None
        parts = self.finished(turn, stream)
        if done.finish_reason == "error":
            raise APIError(500, "generation failed", type="internal_error")
        # the completion's own text: for a redelivered turn it is the text of the attempt that finished
        return {**completion_body(turn.correlation_id, turn.model, done.text, done), "timing": _timing_ms(parts)}, parts

    async def _drain_pieces(self, stream: TurnStream) -> None:
        async for _ in stream.pieces(self.settings.turn_timeout_s):
            pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes with a 413 (also when no Content-Length is sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _data(obj: dict[str, Any]) -> dict[str, str]:
    return {"data": orjson.dumps(obj).decode()}


def _closing_events(
    chunks: ChunkBuilder, done: TurnCompleted, include_usage: bool, finish_extra: dict[str, Any] | None = None, event_id: str | None = None
) -> list[dict[str, str]]:
    """The SSE events that end a streamed turn: its finish chunk (plus ``finish_extra`` fields and an SSE
    ``id`` if given) and the usage chunk when asked for — or one error chunk if generation failed."""
    if done.finish_reason == "error":
        return [_data(APIError(500, "generation failed", type="internal_error").body())]
    finish = _data({**chunks.finish(done), **(finish_extra or {})})
    if event_id is not None:
        finish["id"] = event_id
    return [finish, _data(chunks.usage(done.usage))] if include_usage else [finish]


def _timing_ms(parts: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The latency split in milliseconds, as sent to clients in the ``timing`` extra field."""
    return {group: {k: round(v * 1000, 2) for k, v in values.items()} for group, values in parts.items()}


# --- routes ----------------------------------------------------------------------------------------------


def _check_auth(request: Request) -> None:
    keys: list[str] = request.app.state.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    if not any(secrets.compare_digest(token.encode(), k.encode()) for k in keys):
        raise APIError(401, "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key")


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON (413 past ``limit`` bytes, 400 if it is not JSON)."""
    try:
        return orjson.loads(await read_body(request, limit))
    except orjson.JSONDecodeError:
        raise APIError(400, "request body is not valid JSON") from None


# Routes raise APIError; the app's handler (``api_error``) renders it as OpenAI's error JSON.


async def chat_completions(request: Request) -> Response:
    received = time.time()
    service: ChatService = request.app.state.service
    _check_auth(request)
    req = parse_request(await read_json(request, service.settings.max_request_bytes))
    if len(req.messages) > service.settings.max_request_messages:
        raise APIError(400, f"at most {service.settings.max_request_messages} messages", param="messages")
    check_supported(req, service.settings.max_model_len)
    turn = service.build_turn(req, received)
    headers = {"X-Correlation-Id": turn.correlation_id, **service.admit(turn)}
    stream = await service.publish(turn)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventSourceResponse(
            service.stream_events(turn, stream, include_usage),
            ping=0,  # heartbeats come from stream_events (one task less per open stream)
            sep="\n",
            send_timeout=30,  # a client that stops reading cannot hold the turn (and a worker slot) for ever
            client_close_handler_callable=service.on_client_close(turn, stream),
            headers=headers,
        )
    body, parts = await service.complete(turn, stream, request)
    headers["Server-Timing"] = server_timing(parts)
    return ORJSONResponse(body, headers=headers)


async def resume_chat_completion(request: Request) -> Response:
    """``GET /v1/chat/completions/{id}/events`` with ``Last-Event-ID`` (or ``?last_event_id=``): the rest
    of a streamed turn after the last SSE event the client received — on any edge, the tokens are on Kafka."""
    service: ChatService = request.app.state.service
    _check_auth(request)
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if not last:
        raise APIError(400, "Last-Event-ID: required (the id of the last SSE event received)", param="Last-Event-ID")
    try:
        cid, partition, since_ms, delivered = parse_event_id(last)
    except ValueError:
        raise APIError(400, "Last-Event-ID: not an event id of this server", param="Last-Event-ID") from None
    if cid != request.path_params["completion_id"] or not 0 <= partition < CHAT_REPLIES_PARTITIONS or delivered < 0:
        raise APIError(400, "Last-Event-ID: does not belong to this completion", param="Last-Event-ID")
    include_usage = request.query_params.get("include_usage") in ("1", "true")
    return EventSourceResponse(
        service.resume_events(cid, partition, since_ms, delivered, include_usage),
        ping=0,
        sep="\n",
        send_timeout=30,
        headers={"X-Correlation-Id": cid},
    )


async def stop_chat_completion(request: Request) -> Response:
    """``POST /v1/chat/completions/{id}/cancel``: stop generating (Stop on the chat page)."""
    _check_auth(request)
    service: ChatService = request.app.state.service
    return ORJSONResponse(await service.stop(request.path_params["completion_id"], request.app.state.conversations))


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise APIError(400, f"limit: an integer from 1 to {most}", param="limit")
    return int(raw)


async def list_conversations(request: Request) -> Response:
    """``GET /v1/conversations?user=U&limit=N``: newest first (``limit`` 1–200, default 50)."""
    _check_auth(request)
    conversations: ConversationStore = request.app.state.conversations
    data = await conversations.list(request.query_params.get("user") or None, _limit(request, 50, 200))
    return ORJSONResponse({"object": "list", "data": data})


async def get_conversation(request: Request) -> Response:
    """``GET /v1/conversations/{id}``: the turns (masked messages, answer, verdict, vote) and preferences."""
    _check_auth(request)
    conversations: ConversationStore = request.app.state.conversations
    cid = request.path_params["conversation_id"]
    conv = await conversations.get(cid)
    if conv is None:
        raise APIError(404, f"No conversation found with id '{cid}'.", type="NotFoundError", param="conversation_id")
    return ORJSONResponse(conv)


async def create_feedback(request: Request) -> Response:
    """``POST /v1/feedback`` (:mod:`edge.feedback`): 400 bad body, 404 unknown response, else published."""
    _check_auth(request)
    service: ChatService = request.app.state.service
    conversations: ConversationStore = request.app.state.conversations
    req = parse_feedback(await read_json(request, 16_384))
    turns: dict[str, TurnInfo] = {}
    for rid in req.response_ids:
        info = await service.turn_info(rid, conversations)
        if info is None:
            raise APIError(404, f"No completed response found with id '{rid}'.", type="NotFoundError", param="response_id", code="response_not_found")
        turns[rid] = info
    event = feedback_event(req, turns)
    try:
        await service.producer.send_and_wait(service.feedback_topic, event.to_bytes(), key=event.key)
    except Exception as exc:
        log.exception("publishing feedback %s failed", event.feedback_id)
        raise APIError(503, "the message bus is unavailable, try again", type="service_unavailable") from exc
    return ORJSONResponse({"id": event.feedback_id, "object": "feedback", "status": "accepted", "event_id": event.event_id})


async def dashboard_data(request: Request) -> Response:
    """``GET /dashboard.json?hours=H`` (default 24, at most 720): see :meth:`ConversationStore.dashboard`."""
    _check_auth(request)
    raw = request.query_params.get("hours", "24")
    try:
        hours = float(raw)
    except ValueError:
        hours = -1
    if not 0 < hours <= 720:
        raise APIError(400, "hours: a number in (0, 720]", param="hours")
    bucket_s = 60 if hours <= 2 else 300 if hours <= 24 else 3600
    conversations: ConversationStore = request.app.state.conversations
    return ORJSONResponse(await conversations.dashboard(hours, bucket_s))


def _page(name: str) -> Callable[[Request], Awaitable[Response]]:
    async def page(request: Request) -> Response:
        return Response((STATIC / name).read_bytes(), media_type="text/html; charset=utf-8")

    return page


async def list_models(request: Request) -> Response:
    _check_auth(request)
    settings: Settings = request.app.state.settings
    model = {
        "id": settings.model_name,
        "object": "model",
        "created": request.app.state.started,
        "owned_by": "chatbus",
        "max_model_len": settings.max_model_len,  # the served context in tokens (prompt + completion), as vLLM's card
    }
    return ORJSONResponse({"object": "list", "data": [model]})


# --- files and batches (OpenAI's Files and Batch APIs) ------------------------------------------------------


def _batches(request: Request) -> BatchService:
    _check_auth(request)
    service: BatchService = request.app.state.batches
    return service


async def create_file(request: Request) -> Response:
    batches = _batches(request)
    limit = batches.settings.max_batch_file_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + 65536:
        raise APIError(413, f"file larger than {limit} bytes", param="file", code="file_too_large")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "expected multipart/form-data with fields `file` and `purpose`")
    async with request.form(max_files=1, max_fields=8) as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file: a file part is required", param="file")
        if not isinstance(purpose, str):
            raise APIError(400, "purpose: required", param="purpose")
        data = await upload.read(limit + 1)
        return ORJSONResponse(await batches.upload(data, upload.filename or "upload.jsonl", purpose))


async def retrieve_file(request: Request) -> Response:
    return ORJSONResponse(await _batches(request).file(request.path_params["file_id"]))


async def file_content(request: Request) -> Response:
    batches = _batches(request)
    file_id = request.path_params["file_id"]
    await batches.check_file(file_id)  # a 404 must come before the response starts
    return StreamingResponse(batches.store.file_content(file_id), media_type="application/octet-stream")


async def create_batch(request: Request) -> Response:
    batches = _batches(request)
    service: ChatService = request.app.state.service
    load = service.monitor.snapshot(len(service.relay.turns))
    decision = decide(load, batches.settings, "batch")
    if not decision.admit:  # batch work is shed before interactive work
        service.live.rejected("batch")
        raise refuse(decision, "batch", load, batches.settings)
    payload = await read_json(request, batches.settings.max_request_bytes)
    if not isinstance(payload, dict) or not isinstance(payload.get("input_file_id"), str):
        raise APIError(400, "input_file_id: required", param="input_file_id")
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise APIError(400, "metadata: must be an object of strings", param="metadata")
    batch = await batches.create(
        payload["input_file_id"],
        endpoint=str(payload.get("endpoint", "")),
        completion_window=str(payload.get("completion_window", "24h")),
        metadata=metadata,
        batch_key=request.headers.get("idempotency-key"),
    )
    return ORJSONResponse(batch)


async def list_batches(request: Request) -> Response:
    batches = _batches(request)
    return ORJSONResponse(await batches.list(_limit(request, 20, 100), request.query_params.get("after")))


async def retrieve_batch(request: Request) -> Response:
    return ORJSONResponse(await _batches(request).get(request.path_params["batch_id"]))


async def cancel_batch(request: Request) -> Response:
    return ORJSONResponse(await _batches(request).cancel(request.path_params["batch_id"]))


async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text exposition of this edge process (``chatbus:*`` metrics, :mod:`core.metrics`)."""
    service: ChatService = request.app.state.service
    metrics.OPEN_STREAMS.set(len(service.relay.turns))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def live_data(request: Request) -> Response:
    service: ChatService = request.app.state.service
    return ORJSONResponse(service.live.snapshot(service.monitor.lag_by, len(service.relay.turns)))


async def healthz(request: Request) -> Response:
    return ORJSONResponse({"status": "ok"})


async def readiness(settings: Settings, relay: ReplyRelay) -> dict[str, Any]:
    """Broker reachable, relay running, and a live member in every stage's consumer group."""
    checks: dict[str, Any] = {"relay": relay.alive}
    admin = make_admin(settings)
    try:
        await asyncio.wait_for(admin.start(), 5)
        groups = await asyncio.wait_for(describe_groups(admin, list(STAGE_GROUPS)), 5)
        checks["broker"] = True
        for group_id, g in groups.items():
            checks[group_id] = g["state"] == "Stable" and g["members"] > 0
    except Exception as exc:
        checks["broker"] = False
        checks["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    for group_id in STAGE_GROUPS:
        checks.setdefault(group_id, False)
    checks["ready"] = all(v is True for k, v in checks.items() if k not in ("error", "ready"))
    return checks


async def readyz(request: Request) -> Response:
    checks = await readiness(request.app.state.settings, request.app.state.relay)
    return ORJSONResponse(checks, status_code=200 if checks["ready"] else 503)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        producer = make_producer(settings)
        relay = ReplyRelay(settings)
        monitor = LoadMonitor(settings)
        mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri, serverSelectionTimeoutMS=5000)
        await producer.start()
        await relay.start()
        await monitor.start()
        app.state.relay = relay
        app.state.service = ChatService(settings, producer, relay, monitor, LiveStats())
        app.state.batches = BatchService(settings, BatchStore(mongo[settings.mongo_db]), producer)
        app.state.conversations = ConversationStore(mongo[settings.mongo_db])
        log.info("edge %s ready: reply partition %d, model %s", settings.edge_id, settings.reply_partition, settings.model_name)
        try:
            yield
        finally:
            await monitor.stop()
            await relay.stop()
            await producer.stop()
            await mongo.close()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/chat/completions/{completion_id}/events", resume_chat_completion, methods=["GET"]),
            Route("/v1/chat/completions/{completion_id}/cancel", stop_chat_completion, methods=["POST"]),
            Route("/v1/conversations", list_conversations, methods=["GET"]),
            Route("/v1/conversations/{conversation_id}", get_conversation, methods=["GET"]),
            Route("/v1/feedback", create_feedback, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/files", create_file, methods=["POST"]),
            Route("/v1/files/{file_id}", retrieve_file, methods=["GET"]),
            Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
            Route("/v1/batches", create_batch, methods=["POST"]),
            Route("/v1/batches", list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", retrieve_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
            Route("/metrics", prometheus_metrics, methods=["GET"]),
            Route("/", _page("chat.html"), methods=["GET"]),
            Route("/dashboard", _page("dashboard.html"), methods=["GET"]),
            Route("/dashboard.json", dashboard_data, methods=["GET"]),
            Route("/live", _page("live.html"), methods=["GET"]),
            Route("/live.json", live_data, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.settings = settings
    app.state.api_keys = settings.api_key_list()
    app.state.started = int(time.time())
    return app
