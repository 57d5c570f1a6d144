"""Faults on a stack of this module's own (its broker is paused here, so it must not be the session's):
a broker outage longer than the producers' request timeout in the middle of a streamed turn, and a stage
without a live worker.

The inference worker runs the ``openai`` engine against a scripted upstream (:mod:`tests.upstream`), so
the answer is known word for word and lasts long enough to pause the broker in the middle of it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatbus.stack import Stack
from core.config import Settings
from tests.conftest import eventually, read_topic, running_stack, stack_settings
from tests.upstream import Upstream, spawn_scripted_inference, stream_turn, text_of

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"
WORDS = 3000  # at 10 ms a word and one token event a word: ~30 s of stream, ~1 MB of events during the outage
OUTAGE_S = 40.0  # longer than the producers' request_timeout_ms (30 s): sends really fail, not just wait


def script(prompt: str) -> str:
    return " ".join(f"word{i}" for i in range(WORDS))


EXPECTED = " ".join(f"word{i}" for i in range(WORDS)) + " "


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[Stack, Settings, Upstream]]:
    settings = stack_settings(
        tmp_path_factory.mktemp("chatbus-faults"),
        mongo_db="chatbus_faults",
        model=str(tiny_model_dir),
        served_model_name=MODEL,
        turn_timeout_s=120,
        resume_grace_s=30,
    )
    services = ("kafka", "ferretdb", "safety", "retrieval", "recorder", "edge")
    with Upstream(script, pace_s=0.01) as up, running_stack(settings, services, wait=False) as stack:
        spawn_scripted_inference(
            stack, up, MODEL, coalesce_ms=0, coalesce_tokens=1, output_rail=False
        )  # an event per token (as vLLM streams; no rail batching the release)
        stack.wait_ready()
        yield stack, settings, up


def prompt(template: str) -> str:
    """A benign prompt made unique by a number (hex ids in a prompt can trip the input classifier)."""
    return template.format(random.randint(10_000, 99_999_999))


def body(content: str, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": content}], "max_tokens": 400}


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


async def until_ready(stack: Stack, timeout_s: float, what: str) -> None:
    """Wait for the edge's ``/readyz`` to be 200; on a timeout fail with its last checks (no keys here: the
    test is the operator) and which of the stack's processes are alive, so a CI log says what was wrong."""
    try:
        await eventually(lambda: asyncio.to_thread(ready, stack.edge_url), timeout_s, what)
    except AssertionError as exc:
        try:
            checks: object = httpx.get(f"{stack.edge_url}/readyz", timeout=10).json()
        except (httpx.HTTPError, ValueError) as e:
            checks = repr(e)
        raise AssertionError(f"{exc}; /readyz: {checks}; processes: {stack.status()}") from None


def refusing(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).json().get("admitting") is False
    except (httpx.HTTPError, ValueError):
        return False


@pytest.mark.parametrize("outage", ["killed", "paused"])
async def test_a_broker_outage_mid_stream_loses_no_turn_and_new_turns_get_a_fast_503(own: tuple[Stack, Settings, Upstream], outage: str) -> None:
    """The broker is SIGKILLed and restarted after OUTAGE_S (connections refused: batches expire as
    ``KafkaTimeoutError``), or SIGSTOPped for OUTAGE_S (requests time out on open connections)."""
    stack, settings, up = own
    url = stack.edge_url
    content = prompt("Tell me a long story about the sea, take {}.")
    marker = content[-12:]
    chunks: list[dict[str, Any]] = []
    streaming = asyncio.create_task(stream_turn(url, body(content, True), chunks))
    await eventually(lambda: asyncio.sleep(0, len(text_of(chunks)) > 60), 60, "the first words of the stream")

    broker = stack.running("kafka")
    assert broker is not None
    if outage == "killed":
        stack.kill("kafka")
    else:
        os.kill(broker, signal.SIGSTOP)
    paused_at = time.monotonic()
    try:
        await asyncio.sleep(3)  # the edge's next readings fail
        shown_at_pause = text_of(chunks)
        async with httpx.AsyncClient(timeout=30) as http:
            started = time.monotonic()
            r = await http.post(f"{url}/v1/chat/completions", json=body(prompt("What is the capital of France? (try {})"), False))
            answered_s = time.monotonic() - started
            readyz = await http.get(f"{url}/readyz")
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"].isdigit()
        assert r.json()["error"]["type"] == "service_unavailable" and "message bus" in r.json()["error"]["message"]
        assert answered_s < 5, f"the 503 took {answered_s:.1f} s"  # not the whole outage (the target, 1 s, is in bench/chaos)
        assert readyz.status_code == 503 and readyz.json()["admitting"] is False
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - paused_at)))
    finally:
        if outage == "killed":
            await asyncio.to_thread(stack.start_kafka)
        else:
            os.kill(broker, signal.SIGCONT)

    assert await asyncio.wait_for(streaming, 150), "the stream did not end with [DONE]"
    assert text_of(chunks) == EXPECTED  # every word once, in order: nothing lost or repeated across the outage
    assert text_of(chunks).startswith(shown_at_pause)
    [fin] = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    assert fin["choices"][0]["finish_reason"] == "stop"
    cid = fin["id"]
    assert up.started.count(marker) == 1  # the turn was not regenerated: the worker kept it through the outage
    assert not await read_topic(settings, "chat.dlq", cid), "an outage is not a poison message"

    await until_ready(stack, 60, "the edge admitting again")
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(f"{url}/v1/chat/completions", json=body(prompt("Please write a short poem about autumn, version {}."), False))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == EXPECTED


async def test_a_stage_without_a_live_worker_gets_a_fast_503_naming_it(own: tuple[Stack, Settings, Upstream]) -> None:
    stack, settings, up = own
    url = stack.edge_url
    await until_ready(stack, 60, "the edge admitting")
    stack.stop("inference")  # a clean stop leaves the group at once
    try:
        await eventually(lambda: asyncio.to_thread(refusing, url), 20, "the edge noticing the inference group is empty")
        async with httpx.AsyncClient(timeout=30) as http:
            started = time.monotonic()
            r = await http.post(f"{url}/v1/chat/completions", json=body(prompt("What is the capital of France? (try {})"), False))
            answered_s = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert "inference" in r.json()["error"]["message"] and r.headers["Retry-After"].isdigit()
        assert answered_s < 5, f"the 503 took {answered_s:.1f} s"
    finally:
        spawn_scripted_inference(stack, up, MODEL, coalesce_ms=0, coalesce_tokens=1, output_rail=False)
    await until_ready(stack, 90, "the edge admitting once a worker is back")
