"""Chat completions: ``POST /v1/chat/completions`` (streamed or not), ``GET /v1/chat/completions/{id}/events``
(resume a stream after ``Last-Event-ID``, on any edge: the tokens are on Kafka) and
``POST /v1/chat/completions/{id}/cancel`` (Stop on the chat page).

A request is validated (:mod:`schemas.openai`), admitted (:mod:`edge.admission`), and only then published
to ``chat.requests`` keyed by conversation id, with ``reply_to`` this instance's reply partition. The
response is built from the token events the relay routes back: SSE by :mod:`edge.streaming`, or one
``chat.completion`` body with ``Server-Timing``. A client that disconnects mid-turn causes a
``chat.turn.cancel`` on ``chat.control`` (after ``resume_grace_s`` for a stream), so generation stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from pymongo.errors import ConnectionFailure
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from core.routing import AUTO
from edge.auth import owner_of, protected
from edge.conversations import ConversationStore
from edge.errors import APIError, generation_error
from edge.http import ORJSONResponse, read_json
from edge.keys import admit_key, lease_key, tenant_of
from edge.relay import TurnStream, TurnTimeout, parse_event_id
from edge.streaming import live_events, on_client_close, resume_event_id, resumed_events
from edge.turns import ChatService, timing_ms
from schemas.errors import InvalidRequest, NotFound
from schemas.events import ChatTurnRequest
from schemas.openai import check_supported, completion_body, parse_request
from schemas.timing import server_timing
from topics.registry import CHAT_REPLIES, spec

CHAT_REPLIES_PARTITIONS = spec(CHAT_REPLIES).partitions
MAX_DELIVERED = 1 << 40  # characters already received: far beyond any answer, well inside int64
CLOCK_SKEW_MS = 60_000
LEASE_MARGIN_S = 30.0  # a lease outlives the longest turn by this much (an edge crash frees it then)
DRAIN_GRACE_S = 3.0  # how long sse-starlette lets a stream end itself on shutdown before cancelling it


async def complete(service: ChatService, turn: ChatTurnRequest, stream: TurnStream, request: Request) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Wait for the whole answer; a client that disconnects meanwhile cancels the turn.

    Returns the response body and the turn's latency split (seconds, :func:`schemas.timing.breakdown`)."""
    waiter = asyncio.ensure_future(_drain_pieces(service, stream))
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=0.5)
            if not waiter.done() and await request.is_disconnected():
                waiter.cancel()
                await service.cancel(turn, "client_disconnected", stream)
                raise APIError(499, "client closed the request", type="client_closed")
        waiter.result()
    except TurnTimeout as exc:
        await service.cancel(turn, "timeout", stream)
        raise APIError(504, str(exc), type="timeout") from None
    finally:
        waiter.cancel()
        service.relay.close(turn.correlation_id)
    done = stream.done
    assert done is not None
    parts = service.finished(turn, stream)
    if done.finish_reason == "error":
        raise generation_error(done)
    # the completion's own text: for a redelivered turn it is the text of the attempt that finished
    body = {**completion_body(turn.correlation_id, turn.model, done.text, done), "timing": timing_ms(parts)}
    if turn.route is not None:
        body["route"] = turn.route.model_dump()
    if done.cache is not None:  # served from a response cache (inference_workers.response_cache)
        body["cache"] = done.cache
    return body, parts


async def check_conversation(request: Request, conversation_id: str, owner: str) -> None:
    """404 if ``conversation_id`` is another API key's conversation. The database down: the check is
    skipped (chat goes on without the database; the recorder still files the turn under its own key)."""
    conversations: ConversationStore = request.app.state.conversations
    try:
        async with asyncio.timeout(2):
            exists, conv_owner = await conversations.conversation_owner(conversation_id)
    except (TimeoutError, ConnectionFailure):
        return
    if exists and conv_owner != owner:
        raise NotFound(f"No conversation found with id '{conversation_id}'.", type="NotFoundError", param="conversation_id")


async def _drain_pieces(service: ChatService, stream: TurnStream) -> None:
    async for _ in stream.pieces(service.settings.turn_timeout_s):
        pass


async def chat_completions(request: Request) -> Response:
    received = time.time()
    service: ChatService = request.app.state.service
    req = parse_request(await read_json(request, service.settings.max_request_bytes))
    if len(req.messages) > service.settings.max_request_messages:
        raise InvalidRequest(f"at most {service.settings.max_request_messages} messages", param="messages")
    check_supported(req, service.settings.max_model_len)
    owner = owner_of(request)
    if owner is not None and req.conversation_id:  # continuing a conversation: only its own key may
        await check_conversation(request, req.conversation_id, owner)
    if req.model == AUTO:  # the model that answers: "auto", fallbacks (edge.routing)
        route = await service.route(req)
        limits = await admit_key(request, route.pool.name)  # the key's own limits (edge.keys): 403 / 429 before anything else
    else:
        limits = await admit_key(request, req.model)  # a model the key may not use is a 403 before any 404
        route = await service.route(req)
    lease = await lease_key(request, service.settings.turn_timeout_s + LEASE_MARGIN_S)  # its concurrent-request cap
    streaming = False
    try:
        turn = service.build_turn(req, received, owner, tenant_of(request), route)
        headers = {"X-Correlation-Id": turn.correlation_id, **limits, **service.admit(turn)}
        if turn.route is not None:
            headers["X-Chatbus-Route"] = route.header
        stream = await service.publish(turn)
        if req.stream:
            headers["X-Resume-Event-Id"] = resume_event_id(service, turn)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            response = EventSourceResponse(
                releasing(live_events(service, turn, stream, include_usage), service, request, lease),
                ping=0,  # heartbeats come from the event loop of edge.streaming (one task less per open stream)
                sep="\n",
                send_timeout=30,  # a client that stops reading cannot hold the turn (and a worker slot) for ever
                shutdown_grace_period=DRAIN_GRACE_S,  # on SIGTERM our generator ends the stream itself (edge_draining)
                client_close_handler_callable=on_client_close(service, turn, stream),
                headers=headers,
            )
            streaming = True  # the stream's end gives the lease back
            return response
        try:
            body, parts = await complete(service, turn, stream, request)
        except APIError as exc:  # published: the error names the turn, as an answer would
            exc.headers.setdefault("X-Correlation-Id", turn.correlation_id)
            raise
        headers["Server-Timing"] = server_timing(parts)
        if "cache" in body:
            headers["X-Chatbus-Cache"] = body["cache"]
        return ORJSONResponse(body, headers=headers)
    finally:
        if lease is not None and not streaming:
            release_soon(service, request, lease)


def release_soon(service: ChatService, request: Request, lease: str) -> None:
    """Give a concurrent-request lease back (edge.keys), in the background: it may run from a closing stream."""
    service.in_background(request.app.state.key_store.release(lease))


async def releasing(events: AsyncIterator[Any], service: ChatService, request: Request, lease: str | None) -> AsyncIterator[Any]:
    """``events``, then the lease given back however the stream ends (a client gone before the first event
    never starts this generator: its lease expires after ``turn_timeout_s``)."""
    try:
        async for event in events:
            yield event
    finally:
        if lease is not None:
            release_soon(service, request, lease)


async def resume_chat_completion(request: Request) -> Response:
    """``GET /v1/chat/completions/{id}/events`` with ``Last-Event-ID`` (or ``?last_event_id=``): the rest
    of a streamed turn after the last SSE event the client received — on any edge, the tokens are on Kafka.

    400 for an id this server did not give (its time before 1970 or in the future included), 404 at once
    for a turn that does not exist (:mod:`edge.resume`), 429 past ``max_resumes`` open resumed streams."""
    service: ChatService = request.app.state.service
    last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    if not last:
        raise InvalidRequest("Last-Event-ID: required (the id of the last SSE event received)", param="Last-Event-ID")
    try:
        cid, partition, since_ms, delivered = parse_event_id(last)
    except ValueError:
        raise InvalidRequest("Last-Event-ID: not an event id of this server", param="Last-Event-ID") from None
    if cid != request.path_params["completion_id"] or not 0 <= partition < CHAT_REPLIES_PARTITIONS or not 0 <= delivered <= MAX_DELIVERED:
        raise InvalidRequest("Last-Event-ID: does not belong to this completion", param="Last-Event-ID")
    if not 0 <= since_ms <= time.time() * 1000 + CLOCK_SKEW_MS:
        raise InvalidRequest("Last-Event-ID: its time is not one this server gave", param="Last-Event-ID")
    if len(service.resumed) >= service.settings.max_resumes:
        raise APIError(
            429,
            f"too many resumed streams on this edge ({len(service.resumed)}); retry after 1 s",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )
    if not await service.known(cid, since_ms, owner_of(request)):  # before the stream opens: a 404, not a stream held open
        raise NotFound(f"No chat completion found with id '{cid}'.", type="NotFoundError", param="completion_id")
    include_usage = request.query_params.get("include_usage") in ("1", "true")
    return EventSourceResponse(
        resumed_events(service, cid, partition, since_ms, delivered, include_usage),
        ping=0,
        sep="\n",
        send_timeout=30,
        shutdown_grace_period=DRAIN_GRACE_S,
        headers={"X-Correlation-Id": cid},
    )


async def stop_chat_completion(request: Request) -> Response:
    """``POST /v1/chat/completions/{id}/cancel``: stop generating (Stop on the chat page)."""
    service: ChatService = request.app.state.service
    return ORJSONResponse(await service.stop(request.path_params["completion_id"], request.app.state.conversations, owner_of(request)))


ROUTES: list[BaseRoute] = [
    protected("/v1/chat/completions", chat_completions, ["POST"]),
    protected("/v1/chat/completions/{completion_id}/events", resume_chat_completion, ["GET"]),
    protected("/v1/chat/completions/{completion_id}/cancel", stop_chat_completion, ["POST"]),
]
