"""Keep-alives on a real stream: an edge that pings every 20 ms sends them while a turn waits for tokens,
and the official openai client streams the whole answer through them."""

from __future__ import annotations

import httpx
import openai
import pytest

from chatbus.stack import Stack
from tests.conftest import extra_edge

pytestmark = pytest.mark.stack

BODY = {"model": "chatbus-tiny-random", "messages": [{"role": "user", "content": "What is a Python list?"}], "max_tokens": 24, "temperature": 0}


async def test_pings_while_waiting_do_not_break_the_openai_client(stack: Stack) -> None:
    with extra_edge(stack, 4, sse_ping_s=0.02) as url:
        for _ in range(3):  # a starved edge can find the first tokens already waiting (no wait, so no ping): try again
            async with httpx.AsyncClient(timeout=60) as http, http.stream("POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as r:
                assert r.status_code == 200
                lines = [line async for line in r.aiter_lines()]
            assert "data: [DONE]" in lines
            if ": ping" in lines:
                break
        assert ": ping" in lines  # the turn took longer than 20 ms to its first token: pings were sent

        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(**BODY, stream=True)
        chunks = [chunk async for chunk in stream]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish in (["stop"], ["length"])
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # the answer came through
