"""The one place where errors become HTTP: OpenAI's error JSON ``{"error": {"message", "type", "param",
"code"}}`` with its status.

* Domain errors (:mod:`schemas.errors`, raised by request validation, the batch service, the routes):
  :class:`~schemas.errors.InvalidRequest` 400, :class:`~schemas.errors.NotFound` 404,
  :class:`~schemas.errors.Conflict` 409, :class:`~schemas.errors.TooLarge` 413.
* :class:`APIError`: what only HTTP has — 401 (API key), 429 (admission, with ``Retry-After``), 499 (the
  client left), 500, 503 (the bus is down), 504 (no reply in time).
* Anything else: a 500 with a sanitised message (the details stay in the log).

:data:`EXCEPTION_HANDLERS` registers all three with Starlette; :func:`error_body` gives the same JSON for
an error chunk inside a stream that has already begun.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from edge.http import ORJSONResponse
from schemas.errors import Conflict, InvalidRequest, NotFound, RequestError, TooLarge

log = logging.getLogger(__name__)

HTTP_STATUS: dict[type[RequestError], int] = {InvalidRequest: 400, NotFound: 404, Conflict: 409, TooLarge: 413}


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


async def internal_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected: an OpenAI-style 500 with a sanitised message (details stay in the log)."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(APIError(500, "internal server error", type="internal_error"))


EXCEPTION_HANDLERS: dict[Any, Any] = {APIError: api_error, RequestError: api_error, Exception: internal_error}
