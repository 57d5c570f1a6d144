"""Overload answers 429 (with Retry-After and OpenAI's error JSON) instead of queueing; batches are shed
first; a brownout caps max_tokens instead of refusing. Extra edges run as separate processes against the
session's real stack, each with its own bounds and reply partition."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import orjson
import pytest

from chatbus.stack import Stack
from core.config import Settings
from tests.conftest import end_offsets, extra_edge
from topics.registry import CHAT_REQUESTS

LONG = {
    "model": "chatbus-tiny-random",
    "messages": [{"role": "user", "content": "Tell me about Python lists."}],
    "max_tokens": 400,
    "temperature": 0,
    "stream": True,
}


async def stream(http: httpx.AsyncClient, url: str, body: dict) -> tuple[int, dict[str, str], list[dict]]:
    """(status, headers, chunks) of one streamed request (the error body as a single chunk for a non-200)."""
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, dict(r.headers), [orjson.loads(await r.aread())]
        chunks = [orjson.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: {")]
        return 200, dict(r.headers), chunks


pytestmark = pytest.mark.stack


async def test_overload_answers_429_with_retry_after_and_loses_nothing(stack: Stack, settings: Settings) -> None:
    with extra_edge(stack, 6, admit_max_inflight=2, admit_max_lag=1000) as url:
        before = sum((await end_offsets(settings, CHAT_REQUESTS)).values())
        async with httpx.AsyncClient(timeout=120) as http:
            held = [asyncio.create_task(stream(http, url, LONG)) for _ in range(2)]
            await asyncio.sleep(1.0)  # both admitted and streaming
            t0 = time.perf_counter()
            status, headers, body = await stream(http, url, {**LONG, "max_tokens": 8})
            refused_in = time.perf_counter() - t0
            assert status == 429, body
            assert int(headers["retry-after"]) >= 1
            err = body[0]["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded" and "in flight" in err["message"]
            assert refused_in < 1.0  # refused at once, not queued
            # batch work is shed before interactive work
            batch = await http.post(f"{url}/v1/batches", json={"input_file_id": "file-none", "endpoint": "/v1/chat/completions", "completion_window": "24h"})
            assert batch.status_code == 429 and "shed first" in batch.json()["error"]["message"]
            # the official client sees a RateLimitError
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="chatbus-tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            results = await asyncio.gather(*held)
            assert [r[0] for r in results] == [200, 200]
            for _, _, chunks in results:  # the admitted turns completed normally
                assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            # capacity is back: admitted again
            status, _, chunks = await stream(http, url, {**LONG, "max_tokens": 4})
            assert status == 200 and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            live = (await http.get(f"{url}/live.json")).json()
            assert live["totals"]["rate_limited"] == 2 and live["totals"]["batch_rate_limited"] == 1 and live["inflight"] == 0
            metrics = (await http.get(f"{url}/metrics")).text
            assert 'chatbus:admission_rejected_total{lane="interactive",reason="inflight"} 2.0' in metrics
            assert 'chatbus:admission_rejected_total{lane="batch",reason="interactive_load"} 1.0' in metrics
        after = sum((await end_offsets(settings, CHAT_REQUESTS)).values())
        assert after - before == 3  # only admitted turns were published: nothing refused is queued


async def test_brownout_caps_max_tokens_instead_of_refusing(stack: Stack) -> None:
    with extra_edge(stack, 7, admit_max_inflight=1, admit_max_lag=1000, brownout_max_tokens=3, brownout_limit=4) as url:
        async with httpx.AsyncClient(timeout=120) as http:
            first = asyncio.create_task(stream(http, url, {**LONG, "stream_options": {"include_usage": True}}))
            await asyncio.sleep(1.0)
            rest = await asyncio.gather(*(stream(http, url, {**LONG, "stream_options": {"include_usage": True}}) for _ in range(2)))
            status, headers, chunks = await first
            assert status == 200 and "x-chatbus-brownout" not in headers
            assert chunks[-1]["usage"]["completion_tokens"] > 3
            for status, headers, chunks in rest:
                assert status == 200 and headers["x-chatbus-brownout"] == "max_tokens=3"
                assert chunks[-1]["usage"]["completion_tokens"] <= 3
            # past brownout_limit x the bound, refusal after all
            many = await asyncio.gather(*(stream(http, url, LONG) for _ in range(8)))
            assert 429 in [m[0] for m in many] and all(m[0] in (200, 429) for m in many)
