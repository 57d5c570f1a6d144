"""The one place where errors become HTTP: OpenAI's error JSON ``{"error": {"message", "type", "param",
"code"}}`` with its status.

* Domain errors (:mod:`schemas.errors`, raised by request validation, the batch service, the routes):
  :class:`~schemas.errors.InvalidRequest` 400, :class:`~schemas.errors.NotFound` 404,
  :class:`~schemas.errors.Conflict` 409, :class:`~schemas.errors.TooLarge` 413,
  :class:`~schemas.errors.UnsupportedMediaType` 415.
* :class:`APIError`: what only HTTP has — 401 (API key), 429 (admission, with ``Retry-After``), 499 (the
  client left), 500, 503 (the bus is down), 504 (no reply in time).
* Starlette's own :class:`~starlette.exceptions.HTTPException` (no such route 404, wrong method 405, a
  malformed multipart body 400): the same JSON, ``Invalid URL (METHOD /path)`` as OpenAI words it.
* The database unreachable (a :class:`pymongo.errors.ConnectionFailure`, server selection timing out):
  503 with ``Retry-After``.
* Anything else: a 500 with a sanitised message (the details stay in the log).

:data:`EXCEPTION_HANDLERS` registers all three with Starlette; :func:`error_body` gives the same JSON for
an error chunk inside a stream that has already begun.
"""

from __future__ import annotations

import logging
from typing import Any

from pymongo.errors import ConnectionFailure
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from core.tools import INVALID_TOOL_CALL
from edge.http import ORJSONResponse
from schemas.errors import Conflict, InvalidRequest, NotFound, RequestError, TooLarge, UnsupportedMediaType
from schemas.events import TurnCompleted

log = logging.getLogger(__name__)

HTTP_STATUS: dict[type[RequestError], int] = {InvalidRequest: 400, NotFound: 404, Conflict: 409, TooLarge: 413, UnsupportedMediaType: 415}


class APIError(Exception):
    """An error only HTTP has (see the module docstring), rendered as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def generation_error(done: TurnCompleted) -> APIError:
    """The error of a turn that ended with ``finish_reason: "error"``: a model's unusable tool call says why
    (500, ``code: "invalid_tool_call"``: the request was fine, the answer was not; chatbus does not retry
    it), any other failure is a plain 500 (its detail stays in the worker's log and the DLQ)."""
    if done.error and done.error.startswith(INVALID_TOOL_CALL):
        why = done.error.removeprefix(INVALID_TOOL_CALL)
        return APIError(500, f"The model made an invalid tool call: {why}", type="server_error", code="invalid_tool_call")
    return APIError(500, "generation failed", type="internal_error")


def http_status(err: RequestError) -> int:
    """The HTTP status of a domain error (by its class; 400 for any other request error)."""
    for cls in type(err).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400


def as_api_error(err: RequestError | APIError) -> APIError:
    if isinstance(err, APIError):
        return err
    return APIError(http_status(err), err.message, type=err.type, param=err.param, code=err.code)


def error_body(err: RequestError | APIError) -> dict[str, Any]:
    """OpenAI's error JSON of an error (also sent as an error chunk in a stream)."""
    return as_api_error(err).body()


def error_response(err: RequestError | APIError) -> Response:
    api = as_api_error(err)
    return ORJSONResponse(api.body(), status_code=api.status, headers=api.headers)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError | RequestError)
    return error_response(exc)


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's routing and parsing errors as OpenAI's error JSON (OpenAI answers an unknown route
    with ``Invalid URL (POST /v1/…)``); the response's own headers (``Allow`` on a 405) are kept."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (404, 405):
        message = (
            f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else f"Method {request.method} not allowed on {request.url.path}"
        )
    else:
        message = str(exc.detail)
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return ORJSONResponse(body, status_code=exc.status_code, headers=dict(exc.headers or {}))


async def database_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return error_response(
        APIError(503, "the database is unavailable, try again", type="service_unavailable", code="service_unavailable", headers={"Retry-After": "5"})
    )


async def internal_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected: an OpenAI-style 500 with a sanitised message (details stay in the log)."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(APIError(500, "internal server error", type="internal_error"))


EXCEPTION_HANDLERS: dict[Any, Any] = {
    APIError: api_error,
    RequestError: api_error,
    HTTPException: http_exception,
    ConnectionFailure: database_unavailable,  # AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError
    Exception: internal_error,
}
