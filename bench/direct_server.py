"""The no-bus baseline for ``bench/bus_overhead.py``: one process, the engine behind a minimal SSE endpoint.

``POST /generate`` with ``{"messages": [...], "max_tokens": n}`` streams ``data: {"text": ...}`` events
straight from the engine (sse-starlette, as the edge does), then ``data: [DONE]``. No validation, no
safety, no retrieval, no Kafka: what is left is HTTP + SSE + the engine. Run by the bench as::

    .venv/bin/python bench/direct_server.py --port 8999
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import get_settings
from inference_workers.engines import GenerationRequest, make_engine


def create_app() -> Starlette:
    settings = get_settings()
    engine = make_engine(settings)

    async def generate(request: Request) -> Response:
        body = orjson.loads(await request.body())
        gen = GenerationRequest(request_id=uuid.uuid4().hex, messages=body["messages"], max_tokens=int(body.get("max_tokens", 16)), temperature=0.0, seed=0)

        async def events() -> AsyncIterator[dict[str, str]]:
            async for delta in engine.generate(gen):
                if delta.text:
                    yield {"data": orjson.dumps({"text": delta.text}).decode()}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), sep="\n")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    return Starlette(routes=[Route("/generate", generate, methods=["POST"])], lifespan=lifespan)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8999)
    args = ap.parse_args()
    threads = int(os.environ.get("CHATBUS_TORCH_THREADS", "1"))
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    uvicorn.run(create_app(), host="127.0.0.1", port=args.port, log_level="warning")
