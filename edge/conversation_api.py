"""The chat page's history and the analysts' dashboard data (read from :class:`edge.conversations.ConversationStore`):
``GET /v1/conversations[?user=U&limit=N]``, ``GET /v1/conversations/{id}``, ``GET /dashboard.json?hours=H``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from core.pii import pseudonym
from edge.auth import operator_only, owner_of, protected
from edge.conversations import ConversationStore
from edge.http import ORJSONResponse, limit_param
from schemas.errors import InvalidRequest, NotFound


async def list_conversations(request: Request) -> Response:
    """``GET /v1/conversations?user=U&limit=N``: newest first (``limit`` 1–200, default 50); ``user`` is the
    id the client sends with its turns (stored only as its pseudonym, :func:`core.pii.pseudonym`)."""
    conversations: ConversationStore = request.app.state.conversations
    user = pseudonym(request.query_params.get("user") or None, request.app.state.settings.pseudonym_key_bytes())
    data = await conversations.list(user, limit_param(request, 50, 200), owner_of(request))
    return ORJSONResponse({"object": "list", "data": data})


async def get_conversation(request: Request) -> Response:
    """``GET /v1/conversations/{id}``: the turns (masked messages, answer, verdict, vote) and preferences."""
    conversations: ConversationStore = request.app.state.conversations
    cid = request.path_params["conversation_id"]
    conv = await conversations.get(cid, owner_of(request))
    if conv is None:
        raise NotFound(f"No conversation found with id '{cid}'.", type="NotFoundError", param="conversation_id")
    return ORJSONResponse(conv)


async def dashboard_data(request: Request) -> Response:
    """``GET /dashboard.json?hours=H`` (default 24, at most 720): see :meth:`ConversationStore.dashboard`."""
    raw = request.query_params.get("hours", "24")
    try:
        hours = float(raw)
    except ValueError:
        hours = -1
    if not 0 < hours <= 720:
        raise InvalidRequest("hours: a number in (0, 720]", param="hours")
    bucket_s = 60 if hours <= 2 else 300 if hours <= 24 else 3600
    conversations: ConversationStore = request.app.state.conversations
    return ORJSONResponse(await conversations.dashboard(hours, bucket_s))


ROUTES: list[BaseRoute] = [
    protected("/v1/conversations", list_conversations, ["GET"]),
    protected("/v1/conversations/{conversation_id}", get_conversation, ["GET"]),
    operator_only("/dashboard.json", dashboard_data, ["GET"]),
]
