"""The SSE edge: an OpenAI-compatible HTTP front for the bus (Starlette + sse-starlette).

:func:`create_app` wires the feature modules, each with its routes:

* :mod:`edge.chat` — ``POST /v1/chat/completions`` (streaming and not; :mod:`edge.turns` publishes and
  cancels turns, :mod:`edge.streaming` builds the SSE events), ``GET /v1/chat/completions/{id}/events``
  (resume a stream), ``POST /v1/chat/completions/{id}/cancel`` (Stop);
* :mod:`edge.conversation_api` — ``GET /v1/conversations[/{id}]`` and ``GET /dashboard.json``;
* :mod:`edge.feedback` — ``POST /v1/feedback`` (published to ``chat.feedback``);
* :mod:`edge.embeddings_api` — ``POST /v1/embeddings`` (the knowledge base's embedding model, on the edge);
* :mod:`edge.usage_api` — ``GET /v1/usage`` (tokens, requests and cost per day, model and key);
* :mod:`edge.review` — the safety review queue: ``GET /v1/review``, ``POST /v1/review/decisions``, ``/review``;
* :mod:`edge.batch_api` — OpenAI's Files and Batch APIs (:mod:`batches.service`);
* :mod:`edge.ops` — ``GET /v1/models``, the pages (``/``, ``/dashboard``, ``/live``), ``/live.json``,
  ``/metrics``, ``/healthz``, ``/readyz``.

Cross-cutting: CORS (only ``CHATBUS_CORS_ORIGINS`` may call from another origin; JSON bodies must be
``application/json``, else 415), API keys (:mod:`edge.auth`, a middleware on every ``/v1/*`` route and ``/dashboard.json``),
errors as OpenAI's error JSON (:mod:`edge.errors`), admission control (:mod:`edge.admission`: past its
bounds a turn or a batch submission gets a 429 with ``Retry-After``, before anything is published), and
each answer's latency split (:mod:`schemas.timing`): ``timing`` on the last chunk or in the body, and
``Server-Timing`` on a non-streamed response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from pymongo import AsyncMongoClient
from sse_starlette.sse import AppStatus
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from batches.service import BatchService
from batches.store import BatchStore
from core.config import Settings, get_settings
from edge import batch_api, chat, conversation_api, embeddings_api, feedback, ops, review, usage_api
from edge.admission import LoadMonitor
from edge.conversations import ConversationStore
from edge.errors import EXCEPTION_HANDLERS, internal_error
from edge.http import ORJSONResponse
from edge.keys import KeyStore
from edge.live import LiveStats
from edge.ops import STAGE_GROUPS, STATIC
from edge.relay import ReplyRelay
from edge.turns import ChatService, Heartbeat
from topics.clients import make_producer

__all__ = ["STAGE_GROUPS", "STATIC", "ChatService", "create_app", "internal_error"]

log = logging.getLogger(__name__)


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware whose refused preflight (400) says why in OpenAI's error JSON, not plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        message = bytes(response.body).decode("utf-8", "replace")
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "cors_refused"}}
        return ORJSONResponse(body, status_code=response.status_code, headers=headers)


async def _drain_on_exit(service: ChatService, every_s: float = 0.05) -> None:
    """Drain (:meth:`ChatService.drain`) as soon as the server is told to exit (SIGTERM/SIGINT: uvicorn's
    handler, which sse-starlette's ``AppStatus`` records), before open streams are cut."""
    while not AppStatus.should_exit:
        await asyncio.sleep(every_s)
    service.drain()


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        producer = make_producer(settings)
        relay = ReplyRelay(settings)
        monitor = LoadMonitor(settings)
        mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            settings.mongo_uri, serverSelectionTimeoutMS=1500
        )  # a database that is down answers 503 in ~1.5 s (edge.errors), not after pymongo's default 30 s
        await producer.start()
        await relay.start()
        await monitor.start()
        app.state.relay = relay
        app.state.service = ChatService(settings, producer, relay, monitor, LiveStats())
        app.state.batches = BatchService(settings, BatchStore(mongo[settings.mongo_db]), producer)
        app.state.conversations = ConversationStore(mongo[settings.mongo_db])
        app.state.db = mongo[settings.mongo_db]
        if settings.key_store:
            app.state.key_store = KeyStore(app.state.db)
            app.state.service.charge = app.state.key_store.charge  # tokens per minute and budgets (edge.keys)
        log.info("edge %s ready: reply partition %d, model %s", settings.edge_id, settings.reply_partition, settings.model_name)
        watcher = asyncio.create_task(_drain_on_exit(app.state.service), name="drain-watcher")
        heartbeat = Heartbeat(app.state.service)
        await heartbeat.start()
        try:
            yield
        finally:
            watcher.cancel()
            await heartbeat.stop()
            await app.state.service.finder.stop()
            await monitor.stop()
            await relay.stop()
            await producer.stop()
            await mongo.close()

    app = Starlette(
        routes=[
            *chat.ROUTES,
            *conversation_api.ROUTES,
            *feedback.ROUTES,
            *embeddings_api.ROUTES,
            *usage_api.ROUTES,
            *review.ROUTES,
            *ops.MODEL_ROUTES,
            *batch_api.ROUTES,
            *ops.ROUTES,
        ],
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
        # CORS: no other origin may call the API from a browser unless CHATBUS_CORS_ORIGINS names it (the
        # edge's own pages are same-origin); JSON bodies must be application/json, which needs a preflight
        middleware=[
            Middleware(
                JSONCORSMiddleware,
                allow_origins=settings.cors_origin_list(),
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                expose_headers=["X-Correlation-Id", "X-Resume-Event-Id", "Retry-After"],  # what chat clients read
                max_age=600,
            )
        ],
    )
    app.state.settings = settings
    app.state.embeddings = embeddings_api.EmbeddingService(settings)
    app.state.key_store = None  # edge.keys.KeyStore once the database client exists (CHATBUS_KEY_STORE)
    app.state.api_keys = settings.api_key_list()
    app.state.operator_keys = settings.operator_key_list()
    app.state.started = int(time.time())
    return app
