"""The streaming output rail on the real stack: an inference worker whose engine is the ``openai`` engine
talking HTTP to a scripted OpenAI-compatible upstream (started here), so the answer's words are known.
A continuation that turns harmful mid-stream is never streamed, is retracted (stream, resume, the
non-streamed body and the stored turn agree) and generation stops upstream; PII the model writes is
masked in the stream; an ordinary answer streams unchanged."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from chatbus.stack import Stack
from core.config import Settings
from core.safety.output import SAFETY_MESSAGE
from schemas.events import TurnCompleted
from schemas.feedback import dpo_record_id
from tests.conftest import eventually, read_topic
from tests.upstream import Upstream, spawn_scripted_inference
from topics.ops import read_records
from topics.registry import topic

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"
BENIGN = "Sure. Lists in Python keep their order, and you can sort them in place with the sort method or get a sorted copy with sorted. "
HARMFUL = (
    "To build the pipe bomb, pack a steel pipe tightly with black powder, screw on both end caps and insert a fuse through a drilled hole. "
    "Then place it where the crowd gathers and light the fuse. "
)
PII = "You can reach the author at jane.roe@example.org or call +1 415 555 2671 any weekday. "
TAIL = "More words follow here to keep the stream going for a while longer. " * 6


def script(prompt: str) -> str:
    """``[harm]`` turns harmful mid-stream, ``[pii]`` writes PII, anything else is ordinary."""
    return BENIGN + (HARMFUL if "[harm]" in prompt else PII if "[pii]" in prompt else "") + TAIL


@pytest.fixture(scope="module")
def upstream(stack: Stack) -> Iterator[Upstream]:
    """The stack's inference worker replaced by one on the scripted upstream, for this module."""
    with Upstream(script) as up:
        stack.stop("inference")
        spawn_scripted_inference(stack, up, MODEL, output_rail=True)  # the session stack runs without it (noise model)
        stack.wait_ready()  # the edge answers 503 until the inference group has a live member again
        try:
            yield up
        finally:
            stack.stop("inference")
            stack.start_worker("inference")
            stack.wait_ready()


async def stream(edge_url: str, content: str, conversation_id: str) -> tuple[list[dict[str, Any]], list[str]]:
    """A streamed turn's chunks and SSE ids."""
    chunks: list[dict[str, Any]] = []
    ids: list[str] = []
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": content}], "conversation_id": conversation_id, "max_tokens": 200}
    async with httpx.AsyncClient(timeout=120) as http, http.stream("POST", f"{edge_url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("id:"):
                ids.append(line[3:].strip())
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunks.append(orjson.loads(line[5:]))
    return chunks, ids


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))


def finish_of(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    [fin] = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    return fin


async def test_a_continuation_turning_harmful_is_retracted_everywhere(edge_url: str, settings: Settings, mongo: Any, upstream: Upstream) -> None:
    conv = f"conv-rail-{time.time_ns()}"
    chunks, ids = await stream(edge_url, "Tell me about lists, then the rest [harm] " + conv, conv)
    fin = finish_of(chunks)
    assert fin["choices"][0]["finish_reason"] == "content_filter"
    marker = fin["chatbus_retraction"]
    assert marker["withdrawn"] is True and marker["message"] == SAFETY_MESSAGE and marker["category"] != "none"
    shown = text_of(chunks)
    # the ordinary start was streamed, nothing of the harmful part ever was (window 0), the message follows
    assert shown.startswith("Sure. Lists in Python") and "pipe" not in shown and "powder" not in shown
    assert shown.endswith(SAFETY_MESSAGE) and marker["withdrawn_chars"] == len(shown) - len(SAFETY_MESSAGE) - 2
    cid = chunks[0]["id"]

    # the retraction on the reply topic: masked withdrawn answer, policy version; generation stopped upstream
    [done] = [e for e in await read_topic(settings, "chat.replies", cid) if isinstance(e, TurnCompleted)]
    assert done.finish_reason == "content_filter" and done.text == SAFETY_MESSAGE and done.retraction is not None
    assert "pipe" in done.retraction.withdrawn_text and done.retraction.policy_version and done.retraction.leaked_tokens == 0
    await eventually(lambda: asyncio.sleep(0, conv[-12:] in upstream.closed_early), 10, "the upstream stream closed early")
    assert conv[-12:] not in upstream.finished

    # a resumed stream (from the first event) gets the retraction too
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.get(f"{edge_url}/v1/chat/completions/{cid}/events", headers={"Last-Event-ID": ids[0]})
    resumed = [orjson.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    assert finish_of(resumed)["choices"][0]["finish_reason"] == "content_filter" and finish_of(resumed)["chatbus_retraction"]["withdrawn"]
    assert "pipe" not in text_of(resumed)

    # the stored turn: the safety message as its answer, the withdrawn answer only masked and marked
    turn = await eventually(lambda: mongo.turns.find_one({"_id": cid, "answer.retraction": {"$exists": True}}), 30, "retracted turn stored")
    assert turn["answer"]["text"] == SAFETY_MESSAGE and turn["answer"]["finish_reason"] == "content_filter"
    assert turn["answer"]["retraction"]["category"] == marker["category"]


async def test_the_non_streamed_body_of_a_retracted_turn(edge_url: str, upstream: Upstream) -> None:
    conv = f"conv-rail-{time.time_ns()}"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Lists please [harm] " + conv}], "conversation_id": conv}
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(f"{edge_url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["finish_reason"] == "content_filter" and data["choices"][0]["message"]["content"] == SAFETY_MESSAGE
    assert data["chatbus_retraction"]["withdrawn"] is True


async def test_pii_the_model_writes_is_masked_in_the_stream(edge_url: str, upstream: Upstream) -> None:
    conv = f"conv-rail-{time.time_ns()}"
    chunks, _ = await stream(edge_url, "Who wrote it? [pii] " + conv, conv)
    shown = text_of(chunks)
    assert finish_of(chunks)["choices"][0]["finish_reason"] == "stop" and "chatbus_retraction" not in finish_of(chunks)
    assert "[EMAIL]" in shown and "[PHONE]" in shown and "example.org" not in shown and "2671" not in shown


async def test_an_ordinary_answer_streams_unchanged(edge_url: str, upstream: Upstream) -> None:
    conv = f"conv-rail-{time.time_ns()}"
    chunks, _ = await stream(edge_url, "Tell me about lists " + conv, conv)
    expected = " ".join((BENIGN + TAIL).split()) + " "
    assert text_of(chunks) == expected and finish_of(chunks)["choices"][0]["finish_reason"] == "stop"
    assert sum(1 for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content")) > 1  # streamed, not held to the end


async def test_the_chat_page_replaces_a_retracted_answer(edge_url: str, upstream: Upstream) -> None:
    from playwright.async_api import expect

    from tests.stack.edge.test_chat_page import ask, chat_page, open_chat, wait_idle

    async with chat_page() as (page, errors):
        await open_chat(page, f"{edge_url}/")
        await ask(page, f"Tell me about lists [harm] {time.time_ns()}")
        await wait_idle(page)
        answer = page.locator(".answer").last
        await expect(answer).to_have_attribute("data-status", "refused")
        shown = await answer.inner_text()
        assert "can't continue with that answer" in shown and "Lists in Python" not in shown and "pipe" not in shown
        await page.reload()  # the stored turn says the same
        await page.wait_for_selector("body[data-ready]", timeout=20_000)
        answer = page.locator(".answer").last
        await expect(answer).to_contain_text("can't continue with that answer")
        assert "pipe" not in await answer.inner_text()
        assert not errors, errors


async def test_a_retraction_is_reviewed_and_decisions_become_preference_records(
    edge_url: str, settings: Settings, mongo: Any, stack: Stack, upstream: Upstream
) -> None:
    conv = f"conv-rail-{time.time_ns()}"
    chunks, _ = await stream(edge_url, "Tell me about lists [harm] " + conv, conv)
    cid = chunks[0]["id"]

    async def item() -> dict[str, Any] | None:
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.get(f"{edge_url}/v1/review", params={"status": "open", "limit": 500})
        assert r.status_code == 200, r.text
        return next((i for i in r.json()["data"] if i["id"] == cid), None)

    found = await eventually(item, 30, "the retraction in the review queue")
    assert found["kind"] == "retracted" and "pipe" in found["withdrawn"] and found["response"] == SAFETY_MESSAGE and found["policy_version"]

    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{edge_url}/v1/review/decisions", json={"correlation_id": cid, "decision": "harmful_answer", "reviewer": "rita"})
    assert r.status_code == 200, r.text
    refusal_first = dpo_record_id(f"{cid}:refusal", cid)
    pair = await eventually(lambda: latest_value(settings, "dpo.pairs", refusal_first), 30, "the refusal-over-answer pair")
    assert pair["chosen"][0]["content"] == SAFETY_MESSAGE and "pipe" in pair["rejected"][0]["content"]
    assert pair["metadata"]["source"] == "safety_review" and pair["metadata"]["user"] == "rita"
    assert pair["prompt"][-1]["role"] == "user" and "[harm]" in pair["prompt"][-1]["content"]
    audit = await eventually(lambda: mongo.safety_audit.find_one({"correlation_id": cid}), 30, "the audit entry")
    assert audit["decision"] == "harmful_answer" and audit["policy_version"] == found["policy_version"] and audit["kind"] == "retracted"

    # the CLI changes its mind: the answer was fine; the old pair is retracted, the flipped one published
    proc = subprocess.run(
        [sys.executable, "-m", "chatbus.cli", "review", "decide", cid, "should_have_answered", "--reviewer", "sam", "--note", "mail me at a@b.example"],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    flipped = await eventually(lambda: latest_value(settings, "dpo.pairs", dpo_record_id(cid, f"{cid}:refusal")), 30, "the answer-over-refusal pair")
    assert "pipe" in flipped["chosen"][0]["content"] and flipped["rejected"][0]["content"] == SAFETY_MESSAGE

    async def retracted() -> bool:
        return refusal_first in (await latest_all(settings, "dpo.pairs")) and (await latest_all(settings, "dpo.pairs"))[refusal_first] is None

    await eventually(retracted, 30, "the first pair tombstoned")
    assert await mongo.dpo_pairs.find_one({"_id": refusal_first}) is None
    audits = [a async for a in mongo.safety_audit.find({"correlation_id": cid})]
    assert sorted(a["decision"] for a in audits) == ["harmful_answer", "should_have_answered"]
    assert all("a@b.example" not in str(a) for a in audits)  # notes are PII-masked
    listed = subprocess.run(
        [sys.executable, "-m", "chatbus.cli", "review", "list", "--status", "decided", "-n", "500"], env=stack.env(), capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0 and any(line.startswith(cid) and "should_have_answered" in line for line in listed.stdout.splitlines()), listed.stdout


async def latest_all(settings: Settings, name: str) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for r in sorted(await read_records(settings, topic(name, settings.topic_prefix)), key=lambda r: (r.partition, r.offset)):
        out[r.key.decode()] = orjson.loads(r.value) if r.value is not None else None
    return out


async def latest_value(settings: Settings, name: str, key: str) -> dict[str, Any] | None:
    return (await latest_all(settings, name)).get(key)
