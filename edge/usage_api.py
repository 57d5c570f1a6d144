"""``GET /v1/usage``: tokens, requests and cost per UTC day, in the shape of OpenAI's usage API
(:mod:`core.usage`), read from the recorded turns.

Query: ``start_time`` (Unix seconds, default: 6 days before today's UTC midnight), ``end_time`` (exclusive,
default now), at most 31 days apart; ``group_by`` ``model`` and/or ``api_key_id`` (comma-separated or
repeated, also as ``group_by[]``). A request with an API key sees its own key's usage only; one with an
operator key (``CHATBUS_OPERATOR_KEYS``; or any request to an edge without keys) sees every key's. Answer: ``{"object": "page", "data": [bucket, ...],
"has_more": false}``. Errors: 400 for a bad parameter.

Only completed, recorded turns count (the recorder is at-least-once and idempotent, so a turn counts
once); the scan covers the range's turns, fine for days of one deployment, not for years of many.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from core.usage import DAY_S, day_start, read_usage
from edge.auth import owner_of, protected
from edge.http import ORJSONResponse, ascii_int
from schemas.errors import InvalidRequest

GROUPS = ("model", "api_key_id")
MAX_DAYS = 31


def usage_range(request: Request, now: float) -> tuple[int, int, tuple[str, ...]]:
    """``(start, end, group_by)`` from the query; 400 naming a bad parameter."""
    q = request.query_params
    start = ascii_int(q.get("start_time", str(day_start(now) - 6 * DAY_S)))
    end = ascii_int(q.get("end_time", str(int(now) + 1)))
    if start is None or start < 0:
        raise InvalidRequest("start_time: Unix seconds", param="start_time")
    if end is None or end <= start:
        raise InvalidRequest("end_time: Unix seconds after start_time", param="end_time")
    if end - day_start(start) > MAX_DAYS * DAY_S:
        raise InvalidRequest(f"end_time: at most {MAX_DAYS} days after start_time", param="end_time")
    groups = tuple(g.strip() for v in (*q.getlist("group_by"), *q.getlist("group_by[]")) for g in v.split(",") if g.strip())
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise InvalidRequest(f"group_by: {bad[0]!r} is not one of {', '.join(GROUPS)}", param="group_by")
    return start, end, groups


async def get_usage(request: Request) -> Response:
    """``GET /v1/usage`` (see the module docstring)."""
    start, end, groups = usage_range(request, time.time())
    owner = owner_of(request)  # None for an operator key (or an edge without keys): every key's usage
    data = await read_usage(request.app.state.db.turns, start, end, groups, owner)
    return ORJSONResponse({"object": "page", "data": data, "has_more": False})


ROUTES: list[BaseRoute] = [protected("/v1/usage", get_usage, ["GET"], operators=True)]
