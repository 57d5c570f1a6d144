"""Errors of a request chatbus cannot serve, in OpenAI's error vocabulary (``message``, ``type``,
``param``, ``code``) but without HTTP: the edge maps each class to its status (:mod:`edge.errors`), the
CLI and the batch error file use the message and code as they are.

* :class:`InvalidRequest` — a bad parameter or body (HTTP 400 at the edge);
* :class:`NotFound` — an unknown model, file, batch… (404);
* :class:`Conflict` — a request that contradicts an earlier one, e.g. a reused batch key (409);
* :class:`TooLarge` — a body, line or file past its limit (413);
* :class:`UnsupportedMediaType` — a body not of the type the route reads, e.g. JSON sent as ``text/plain`` (415).
"""

from __future__ import annotations


class RequestError(Exception):
    """A request that cannot be served as sent (the base of the classes below)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.type = message, param, code, type

    def error(self) -> dict[str, str | None]:
        """OpenAI's error object (``{"message", "type", "param", "code"}``)."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class InvalidRequest(RequestError):
    """A parameter or body that is not valid."""


class NotFound(RequestError):
    """Something the request names does not exist."""


class Conflict(RequestError):
    """The request contradicts an earlier one."""


class TooLarge(RequestError):
    """A body, line or file larger than its limit."""


class UnsupportedMediaType(RequestError):
    """A body whose declared media type the route does not read."""
