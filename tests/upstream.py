"""A scripted OpenAI-compatible upstream for stack tests: an inference worker on the ``openai`` engine
talks HTTP to it, so the answer's words (and how fast they come) are known.

``/v1/chat/completions`` streams ``script(last user message)`` one word per chunk, ``pace_s`` apart; it
records which streams finished and which the client closed early (by the last 12 characters of the prompt).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from chatbus.stack import Stack, free_port


class Upstream:
    def __init__(self, script: Callable[[str], str], pace_s: float = 0.02) -> None:
        self.script = script
        self.pace_s = pace_s
        self.port = free_port()
        self.closed_early: list[str] = []
        self.finished: list[str] = []
        self.started: list[str] = []
        self.log: list[tuple[str, str]] = []  # ("start" | "end", marker), in the order they happened
        self.requests: list[dict[str, Any]] = []  # each request body, as received
        app = Starlette(routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def completions(self, request: Request) -> StreamingResponse:
        body = await request.json()
        self.requests.append(body)
        prompt = body["messages"][-1]["content"]
        words = [w + " " for w in self.script(prompt).split()]
        marker = prompt[-12:]
        self.started.append(marker)
        self.log.append(("start", marker))

        async def chunks() -> AsyncIterator[bytes]:
            try:
                for w in words:
                    chunk = {
                        "id": "up",
                        "object": "chat.completion.chunk",
                        "model": "scripted",
                        "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}],
                    }
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                    await asyncio.sleep(self.pace_s)
                end = {"id": "up", "object": "chat.completion.chunk", "model": "scripted", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                yield b"data: " + orjson.dumps(end) + b"\n\ndata: [DONE]\n\n"
                self.finished.append(marker)
                self.log.append(("end", marker))
            except (asyncio.CancelledError, GeneratorExit):
                self.closed_early.append(marker)
                raise

        return StreamingResponse(chunks(), media_type="text/event-stream")

    def __enter__(self) -> Upstream:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "scripted upstream did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def spawn_scripted_inference(stack: Stack, upstream: Upstream, served_name: str, name: str = "inference", **env_settings: object) -> int:
    """Start the stack's inference worker ``name`` (``inference``, or a replica such as ``inference-2``) on the
    ``openai`` engine against ``upstream`` (served as ``served_name``)."""
    env = stack.env()
    env.update({"CHATBUS_ENGINE": "openai", "CHATBUS_OPENAI_BASE_URL": upstream.url, "CHATBUS_MODEL": "scripted", "CHATBUS_SERVED_MODEL_NAME": served_name})
    env.update({f"CHATBUS_{k.upper()}": str(v) for k, v in env_settings.items()})
    return stack.spawn(name, [sys.executable, "-m", "chatbus.cli", "worker", "inference"], env)


async def stream_turn(url: str, body: dict[str, Any], chunks: list[dict[str, Any]]) -> bool:
    """POST a streamed chat turn ``body`` to the edge at ``url``, appending its chunks to ``chunks`` (the
    caller reads them while it streams); True once ``[DONE]`` arrived."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=150)) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                if line[5:].strip() == "[DONE]":
                    return True
                chunks.append(orjson.loads(line[5:]))
    return False


def text_of(chunks: list[dict[str, Any]]) -> str:
    """The streamed text of ``chunks`` (their ``delta.content`` in order)."""
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
