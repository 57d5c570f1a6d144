"""Unexpected errors become OpenAI-style 500s (edge.errors.internal_error)."""

from __future__ import annotations


def test_unexpected_errors_become_openai_500s_without_details() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from edge.errors import internal_error

    async def boom(request: Request) -> None:
        raise RuntimeError("secret detail")

    app = Starlette(routes=[Route("/x", boom)], exception_handlers={Exception: internal_error})
    r = TestClient(app, raise_server_exceptions=False).get("/x")
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "internal_error" and "secret" not in r.text
