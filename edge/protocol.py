"""Deprecated: the OpenAI shapes are :mod:`schemas.openai`, the edge's errors :mod:`edge.errors`.

Kept only for ``chatbus.cli`` (``from edge.protocol import APIError``) until it catches
:class:`schemas.errors.RequestError` itself; nothing else imports this module.
"""

from __future__ import annotations

from edge.errors import APIError

__all__ = ["APIError"]
