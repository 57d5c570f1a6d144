"""API keys: routes wrapped in :class:`RequireAPIKey` (see :func:`protected`) need
``Authorization: Bearer <key>`` when the edge has keys (``CHATBUS_API_KEYS``); without keys every route is open.

Each key is an identity: the request's ``owner`` (:func:`key_owner`: ``key-`` + 24 hex digits of the key's
SHA-256, never the key) scopes conversations, turns, streams and feedback to it (:mod:`edge.conversation_api`,
:mod:`edge.turns`). Operator surfaces (:func:`operator_only`: ``/metrics``, ``/live``, ``/live.json``,
``/dashboard``, ``/dashboard.json``) need one of ``CHATBUS_OPERATOR_KEYS`` once keys are configured, and
``/readyz`` then shows its details only to an operator.

With ``CHATBUS_KEY_STORE`` on, keys kept in the database (:mod:`edge.keys`, ``chatbus keys``) are looked up on
every request too (a revoked one is refused at once), and carry the key's limits for admission.

The middleware runs per route, after routing: an unknown path is still a 404 and a wrong method a 405,
as for the open routes (pages, ``/metrics``, ``/healthz``, ``/readyz``, ``/live.json``, ``/static``).
A refusal is OpenAI's 401 (``invalid_api_key``).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edge.errors import APIError, error_response


def key_owner(key: str) -> str:
    """The identity of an API key as stored and carried on the bus (a hash; the key itself never leaves the edge)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def bearer(authorization: str) -> str:
    return authorization[7:] if authorization.lower().startswith("bearer ") else ""


def owner_of(request: Request) -> str | None:
    """The identity of the request's API key, or None when the edge has no keys (everything is shared)."""
    owner = getattr(request.state, "owner", None)
    return owner if isinstance(owner, str) else None


def is_operator(request: Request) -> bool:
    """Whether the request may see operator surfaces: no keys configured at all, or an operator key."""
    app = request.app.state
    if not app.api_keys and not app.operator_keys:
        return True
    token = bearer(request.headers.get("authorization", ""))
    return bool(app.operator_keys) and any(secrets.compare_digest(token.encode(), k.encode()) for k in app.operator_keys)


def authorized(authorization: str, keys: list[str]) -> bool:
    """Whether an ``Authorization`` header carries one of ``keys`` (any, when there are none)."""
    if not keys:
        return True
    token = bearer(authorization)
    return any(secrets.compare_digest(token.encode(), k.encode()) for k in keys)


WRONG_KEY = "Incorrect API key provided."


async def refuse(message: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer OpenAI's 401 ``invalid_api_key`` with ``message``."""
    await error_response(APIError(401, message, type="invalid_request_error", code="invalid_api_key"))(scope, receive, send)


class RequireAPIKey:
    """ASGI middleware: a 401 unless the request carries one of ``app.state.api_keys`` (or, with
    ``operators``, an operator key: the request then has no owner and sees every key's data)."""

    def __init__(self, app: ASGIApp, operators: bool = False) -> None:
        self.app = app
        self.operators = operators

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.operators and scope["app"].state.operator_keys and is_operator(Request(scope)):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            keys: list[str] = scope["app"].state.api_keys
            store = getattr(scope["app"].state, "key_store", None)  # edge.keys.KeyStore, with CHATBUS_KEY_STORE
            authorization = Headers(scope=scope).get("authorization", "")
            token = bearer(authorization)
            if store is not None and not (keys and authorized(authorization, keys)):
                record = await store.get(key_owner(token)) if token else None
                if record is None or not record.active:
                    await refuse("This API key has been revoked." if record is not None else WRONG_KEY, scope, receive, send)
                    return
                state = scope.setdefault("state", {})
                state["owner"], state["key_record"] = record.id, record
            elif not authorized(authorization, keys):
                await refuse(WRONG_KEY, scope, receive, send)
                return
            elif keys:
                scope.setdefault("state", {})["owner"] = key_owner(token)
        await self.app(scope, receive, send)


class RequireOperatorKey:
    """ASGI middleware: a 401 unless the edge has no keys or the request carries an operator key."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_operator(Request(scope)):
            await refuse("This needs an operator key (CHATBUS_OPERATOR_KEYS).", scope, receive, send)
            return
        await self.app(scope, receive, send)


def operator_only(path: str, endpoint: Callable[..., Awaitable[Any]], methods: Collection[str]) -> Route:
    """A route for operators (metrics, live view, dashboard)."""
    return Route(path, endpoint, methods=list(methods), middleware=[Middleware(RequireOperatorKey)])


def protected(path: str, endpoint: Callable[..., Awaitable[Any]], methods: Collection[str], operators: bool = False) -> Route:
    """A route that needs an API key (or, with ``operators``, takes an operator key too)."""
    return Route(path, endpoint, methods=list(methods), middleware=[Middleware(RequireAPIKey, operators=operators)])
