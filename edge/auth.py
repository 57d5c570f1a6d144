"""API keys: routes wrapped in :class:`RequireAPIKey` (see :func:`protected`) need
``Authorization: Bearer <key>`` when the edge has keys (``CHATBUS_API_KEYS``); without keys every route is open.

The middleware runs per route, after routing: an unknown path is still a 404 and a wrong method a 405,
as for the open routes (pages, ``/metrics``, ``/healthz``, ``/readyz``, ``/live.json``, ``/static``).
A refusal is OpenAI's 401 (``invalid_api_key``).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edge.errors import APIError, error_response


def authorized(authorization: str, keys: list[str]) -> bool:
    """Whether an ``Authorization`` header carries one of ``keys`` (any, when there are none)."""
    if not keys:
        return True
    token = authorization[7:] if authorization.lower().startswith("bearer ") else ""
    return any(secrets.compare_digest(token.encode(), k.encode()) for k in keys)


class RequireAPIKey:
    """ASGI middleware: a 401 unless the request carries one of ``app.state.api_keys``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            keys: list[str] = scope["app"].state.api_keys
            if not authorized(Headers(scope=scope).get("authorization", ""), keys):
                err = APIError(401, "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def protected(path: str, endpoint: Callable[..., Awaitable[Any]], methods: Collection[str]) -> Route:
    """A route that needs an API key."""
    return Route(path, endpoint, methods=list(methods), middleware=[Middleware(RequireAPIKey)])
