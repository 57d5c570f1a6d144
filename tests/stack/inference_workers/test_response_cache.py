"""The response caches on the real stack: the session's small model pool (``chatbus-tiny-small``, the tiny
random model: noise, deterministic at temperature 0) has the exact cache (inference_workers.response_cache)
and the semantic cache (retrieval_workers.semantic_cache) on."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from chatbus.stack import Stack
from tests.conftest import eventually
from tests.upstream import Upstream, spawn_scripted_inference

pytestmark = pytest.mark.stack

SMALL = "chatbus-tiny-small"


async def small_pool_live(http: httpx.AsyncClient) -> None:
    """Until the edge's router sees the small pool's worker, its turns fall back to the primary model (no cache)."""

    async def listed() -> bool:
        return SMALL in [m["id"] for m in (await http.get("/v1/models")).json()["data"]]

    await eventually(listed, 60, "the small pool live")


def word() -> str:
    """A made-up word of letters only (digits can read as PII to the masker, and a turn with PII is never cached)."""
    return "".join(random.choice("bcdfghjklmnpqrstvwxz") + random.choice("aeiou") for _ in range(4))


HISTORY = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"}]


def body(content: str, history: bool = True, **extra: Any) -> dict[str, Any]:
    """A temperature-0 turn; with ``history`` a later turn of a conversation, which the semantic cache never takes."""
    messages = [*(HISTORY if history else []), {"role": "user", "content": content}]
    return {"model": SMALL, "messages": messages, "max_tokens": 12, "temperature": 0, **extra}


async def test_a_repeated_temperature_0_question_is_answered_from_the_cache(edge_url: str, mongo: Any) -> None:
    question = f"What is a good name for a garden gnome from {word()}?"
    async with httpx.AsyncClient(base_url=edge_url, timeout=60) as http:
        await small_pool_live(http)
        first = await http.post("/v1/chat/completions", json=body(question))
        assert first.status_code == 200, first.text
        assert "cache" not in first.json() and "x-chatbus-cache" not in first.headers

        async def stored() -> int:
            return await mongo.response_cache.count_documents({"model": SMALL})

        await eventually(stored, 20, "the answer stored")

        second = await http.post("/v1/chat/completions", json=body(f"  {question}  "))  # the same after normalising
        assert second.status_code == 200, second.text
        assert second.json()["cache"] == "exact" and second.headers["x-chatbus-cache"] == "exact"
        a, b = first.json(), second.json()
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert [b["usage"][k] for k in ("prompt_tokens", "completion_tokens")] == [a["usage"][k] for k in ("prompt_tokens", "completion_tokens")]
        assert b["id"] != a["id"]

        chunks: list[dict[str, Any]] = []  # streamed like any answer, on the bus
        async with http.stream("POST", "/v1/chat/completions", json=body(question, stream=True)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    chunks.append(orjson.loads(line[5:]))
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        assert text == a["choices"][0]["message"]["content"]
        assert chunks[-1].get("cache") == "exact" or any(c.get("cache") == "exact" for c in chunks)


async def test_sampled_answers_and_turns_with_pii_are_never_cached(edge_url: str, mongo: Any) -> None:
    marker = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(base_url=edge_url, timeout=60) as http:
        await small_pool_live(http)
        for _ in range(2):
            sampled = await http.post("/v1/chat/completions", json=body(f"Suggest a holiday spot {marker}", temperature=0.8))
            assert sampled.status_code == 200 and "cache" not in sampled.json()
            private = await http.post("/v1/chat/completions", json=body(f"Write to jane.doe.{marker}@example.com about lunch"))
            assert private.status_code == 200 and "cache" not in private.json()
    docs = [d async for d in mongo.response_cache.find({})]
    assert not any(marker in str(d) for d in docs)  # neither stored (nor any PII)


@pytest.fixture()
def scripted_small(stack: Stack) -> Iterator[Upstream]:
    """The small pool's worker on a scripted upstream: the tiny model answers these questions at temperature 0
    with newlines only, and a blank answer is never cached."""
    service = next(name for name in stack.services if name.startswith("inference.chatbus-tiny-small"))
    with Upstream(lambda prompt: f"Open the settings of the app and switch it ({prompt[-8:]})", pace_s=0.005) as up:
        stack.stop(service)
        spawn_scripted_inference(stack, up, "chatbus-tiny-random", name=service, pool=SMALL, output_rail=False)  # the primary keeps its name
        stack.wait_ready()
        try:
            yield up
        finally:
            stack.stop(service)
            stack.start(service)
            stack.wait_ready()


async def test_a_paraphrased_first_question_is_answered_from_the_semantic_cache_and_a_negated_one_is_not(edge_url: str, scripted_small: Upstream) -> None:
    async with httpx.AsyncClient(base_url=edge_url, timeout=60) as http:
        await small_pool_live(http)
        tag = word()  # a name of its own, so no earlier run's entry answers
        first = await http.post("/v1/chat/completions", json=body(f"How do I enable dark mode in Zorblax{tag}?", history=False))
        assert first.status_code == 200 and "cache" not in first.json(), first.text
        original = first.json()["choices"][0]["message"]["content"]
        assert original.strip()  # a blank answer is never cached

        async def paraphrase() -> dict[str, Any] | None:
            r = await http.post("/v1/chat/completions", json=body(f"How can I turn on dark mode in Zorblax{tag}?", history=False))
            return r.json() if r.json().get("cache") == "semantic" else None

        hit = await eventually(paraphrase, 30, "a semantic cache hit")  # the entry is upserted through cache.entries
        assert hit["choices"][0]["message"]["content"] == original
        opposite = await http.post("/v1/chat/completions", json=body(f"How do I disable dark mode in Zorblax{tag}?", history=False))
        assert opposite.status_code == 200 and opposite.json().get("cache") is None  # close, but the guard refuses it
        other_app = await http.post("/v1/chat/completions", json=body(f"How can I turn on dark mode in Quiblet{tag}?", history=False))
        assert other_app.json().get("cache") is None  # another name
        followup = await http.post("/v1/chat/completions", json=body(f"How can I turn on dark mode in Zorblax{tag}?"))
        assert followup.json().get("cache") != "semantic"  # a later turn of a conversation: never semantic
