"""Pages and operator surfaces: ``GET /`` (chat page), ``/dashboard``, ``/live`` and ``/static`` (open),
``GET /live.json`` (:mod:`edge.live`), ``GET /metrics`` (Prometheus, :mod:`core.metrics`), ``GET /healthz``
(process alive), ``GET /readyz`` (broker reachable, reply relay running, every stage's consumer group
has a live member, admission taking turns; the database reported), and ``GET /v1/models`` (needs the
API key)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from core import metrics
from core.config import Settings
from core.embeddings import PACKAGED_NAME as EMBEDDING_PACKAGED_NAME
from core.routing import AUTO
from edge.admission import LoadMonitor
from edge.auth import is_operator, operator_only, protected
from edge.http import ORJSONResponse
from edge.relay import ReplyRelay
from edge.turns import ChatService
from topics.clients import make_admin
from topics.compat import describe_groups
from topics.pools import pools
from topics.registry import GROUPS

STAGE_GROUPS = tuple(g.group_id for g in GROUPS if g.stage)
STATIC = Path(__file__).resolve().parent / "static"


def page(name: str) -> Callable[[Request], Awaitable[Response]]:
    async def serve(request: Request) -> Response:
        return Response((STATIC / name).read_bytes(), media_type="text/html; charset=utf-8")

    return serve


async def list_models(request: Request) -> Response:
    """The chat models with a live inference worker at the last reading (each model's pool, topics.pools),
    ``auto`` when one is live (edge.routing), and the embedding model (``POST /v1/embeddings``)."""
    settings: Settings = request.app.state.settings
    service: ChatService = request.app.state.service
    created = request.app.state.started

    def card(name: str, **extra: Any) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "chatbus", **extra}

    live = service.router.live()
    # max_model_len: the served context in tokens (prompt + completion), as vLLM's card
    data = [card(p.name, max_model_len=settings.max_model_len) for p in live]
    if live and len(service.router.pools) > 1:  # "auto" chooses among several models
        data.append(card(AUTO, max_model_len=settings.max_model_len, routes_to=[p.name for p in service.router.pools]))
    data.append(card(settings.embedding_model or EMBEDDING_PACKAGED_NAME, type="embedding"))
    return ORJSONResponse({"object": "list", "data": data})


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


async def readiness(settings: Settings, relay: ReplyRelay, monitor: LoadMonitor | None = None, db: Any = None) -> dict[str, Any]:
    """Broker reachable, relay running, a live member in every stage's consumer group, and (with the
    edge's ``monitor``) admission taking turns (``admitting``: no 503 for the broker or a missing worker).

    With ``db`` (the edge's database) ``database`` says whether it answers a ping within 2 s. It is
    reported, not required: chat goes on without the database (the recorder catches up from Kafka), only
    conversations, batches, files and review answer 503 meanwhile — ``degraded`` lists it."""
    checks: dict[str, Any] = {"relay": relay.alive}
    if monitor is not None:
        checks["admitting"] = monitor.availability("interactive") is None
    degraded: list[str] = []
    if db is not None:
        try:
            await asyncio.wait_for(db.command("ping"), 2)
            database = True
        except Exception:
            database = False
            degraded.append("database")
    admin = make_admin(settings)
    try:
        await asyncio.wait_for(admin.start(), 5)
        wanted = [*STAGE_GROUPS, *(p.group.group_id for p in pools(settings)[1:])]  # and every extra model's pool
        groups = await asyncio.wait_for(describe_groups(admin, wanted), 5)
        checks["broker"] = True
        for group_id, g in groups.items():
            checks[group_id] = g["state"] == "Stable" and g["members"] > 0
    except Exception as exc:
        checks["broker"] = False
        checks["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    for group_id in (*STAGE_GROUPS, *(p.group.group_id for p in pools(settings)[1:])):
        checks.setdefault(group_id, False)
    checks["ready"] = all(v is True for k, v in checks.items() if k not in ("error", "ready"))
    if db is not None:
        checks["database"] = database
        checks["degraded"] = degraded
    return checks


async def readyz(request: Request) -> Response:
    """The checks, to an operator (no keys configured, or an operator key); to anyone else only ``ready``."""
    service: ChatService = request.app.state.service
    checks = await readiness(request.app.state.settings, request.app.state.relay, service.monitor, request.app.state.db)
    body = checks if is_operator(request) else {"ready": checks["ready"]}
    return ORJSONResponse(body, status_code=200 if checks["ready"] else 503)


MODEL_ROUTES: list[BaseRoute] = [protected("/v1/models", list_models, ["GET"])]

ROUTES: list[BaseRoute] = [
    operator_only("/metrics", prometheus_metrics, ["GET"]),
    Route("/", page("chat.html"), methods=["GET"]),
    Route("/dashboard", page("dashboard.html"), methods=["GET"]),
    Route("/live", page("live.html"), methods=["GET"]),
    operator_only("/live.json", live_data, ["GET"]),
    Mount("/static", StaticFiles(directory=STATIC), name="static"),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
