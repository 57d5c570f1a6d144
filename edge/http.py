"""What every route of the edge shares: the JSON response (orjson), reading a bounded body, query parameters."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from schemas.errors import InvalidRequest, TooLarge, UnsupportedMediaType

M = TypeVar("M", bound=BaseModel)
DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() accepts "²", which int() refuses
JSON_TYPES = ("application/json",)


def ascii_int(raw: str | None) -> int | None:
    """``raw`` as a non-negative integer if it is 1 to 18 ASCII digits, else None."""
    return int(raw) if raw is not None and DIGITS.fullmatch(raw) else None


def validate_body(model: type[M], payload: object) -> M:
    """``payload`` (a decoded JSON body) as ``model``, or an :class:`InvalidRequest` (400) naming the first
    problem and its field (a whole-body check's message names its field first: ``"field: why"``)."""
    if not isinstance(payload, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if not loc and ": " in msg:
            loc = msg.split(": ", 1)[0].split("/")[0].split(" ")[0]
            msg = msg.split(": ", 1)[1]
        raise InvalidRequest(f"{loc}: {msg}" if loc else msg, param=loc or None) from None


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes with a 413 (also when no Content-Length is sent)."""
    declared = ascii_int(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise TooLarge(f"request body larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def require_json(request: Request) -> None:
    """415 unless the body is declared ``application/json``: a cross-site page can send ``text/plain``
    without a CORS preflight, never ``application/json`` (the Fetch standard's CORS-safelisted types)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in JSON_TYPES:
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {media or 'missing'}")


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON (415 unless declared ``application/json``, 413 past ``limit`` bytes,
    400 if it is not JSON)."""
    require_json(request)
    try:
        return orjson.loads(await read_body(request, limit))
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON") from None


def limit_param(request: Request, default: int, most: int) -> int:
    """``?limit=N`` (1 to ``most``, default ``default``); 400 otherwise."""
    value = ascii_int(request.query_params.get("limit", str(default)))
    if value is None or not 1 <= value <= most:
        raise InvalidRequest(f"limit: an integer from 1 to {most}", param="limit")
    return value
