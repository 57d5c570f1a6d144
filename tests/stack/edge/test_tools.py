"""Tool calling on the real stack, through the official ``openai`` client: the inference worker runs the
``openai`` engine against a scripted upstream (:mod:`tests.upstream`) that writes Hermes ``<tool_call>``
text, as Qwen2.5 does, one word per chunk — so the worker's parser sees the tags cut across chunks. The
calls come back as ``tool_calls`` with ``finish_reason: "tool_calls"`` (streamed as tool-call deltas),
the follow-up turn with the ``role: "tool"`` message reaches the model, and calls the tools' schemas
refuse, or bad tool definitions, get clear errors. (Real-model tool calls: tests/stack/test_real_model.py.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from chatbus.stack import Stack
from core.config import Settings
from tests.conftest import end_offsets, eventually, read_topic
from tests.upstream import Upstream, spawn_scripted_inference

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "local_time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ANSWER = "It is 18 degrees and sunny in Paris right now."


def call(name: str, arguments: object) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def script(prompt: str) -> str:
    """What the scripted model writes for the last message: a tool result gets the answer; a question
    tagged ``[weather]`` one call, ``[two]`` a sentence then two calls, ``[bad-args]`` / ``[unknown]`` a call
    the schemas refuse; anything else plain text."""
    if prompt.startswith('{"temp_c"'):
        return ANSWER
    if "[weather]" in prompt:
        return call("get_weather", {"city": "Paris", "unit": "celsius"})
    if "[two]" in prompt:
        return "Let me look both up. " + call("get_weather", {"city": "Oslo"}) + "\n" + call("local_time", {"city": "Oslo"})
    if "[bad-args]" in prompt:
        return call("get_weather", {"city": 42})
    if "[unknown]" in prompt:
        return call("launch_rockets", {"count": 3})
    return "Plain words, no tools needed here."


@pytest.fixture(scope="module")
def upstream(stack: Stack) -> Iterator[Upstream]:
    """The stack's inference worker replaced by one on the scripted upstream, for this module."""
    with Upstream(script, pace_s=0.005) as up:
        stack.stop("inference")
        spawn_scripted_inference(stack, up, MODEL, output_rail=True)
        stack.wait_ready()
        try:
            yield up
        finally:
            stack.stop("inference")
            stack.start_worker("inference")
            stack.wait_ready()


def client(edge_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{edge_url}/v1", api_key="unused", max_retries=0, timeout=120)


def weather_of(city: str, unit: str = "celsius") -> str:
    return json.dumps({"temp_c": 18, "sky": "sunny", "city": city, "unit": unit})


async def test_the_openai_clients_tool_loop_runs_unchanged(edge_url: str, upstream: Upstream, mongo: Any) -> None:
    c = client(edge_url)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris? [weather]"}]
    first = await c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [tc] = choice.message.tool_calls or []
    assert tc.type == "function" and tc.id.startswith("call_")
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert "tools" in upstream.requests[-1] and upstream.requests[-1]["tools"][0]["function"]["name"] == "get_weather"

    # the loop as the openai docs write it: append the assistant message, run the tool, append its result
    messages.append(choice.message)
    args = json.loads(tc.function.arguments)
    messages.append({"role": "tool", "tool_call_id": tc.id, "content": weather_of(**args)})
    second = await c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content.strip() == ANSWER
    # the whole conversation crossed the bus: the model got the call it made and the tool's result
    seen = upstream.requests[-1]["messages"]
    assert seen[-2]["role"] == "assistant" and seen[-2]["tool_calls"][0]["id"] == tc.id
    assert json.loads(seen[-2]["tool_calls"][0]["function"]["arguments"]) == args  # JSON text, as OpenAI's API takes it
    assert seen[-1] == {"role": "tool", "content": weather_of(**args), "tool_call_id": tc.id}
    turn = await eventually(lambda: mongo.turns.find_one({"_id": first.id, "answer": {"$exists": True}}), what="the tool-call turn recorded")
    assert turn["answer"]["finish_reason"] == "tool_calls" and turn["answer"]["tool_calls"][0]["function"]["name"] == "get_weather"
    follow_up = await eventually(lambda: mongo.turns.find_one({"_id": second.id, "answer": {"$exists": True}}), what="the follow-up recorded")
    stored = follow_up["messages"]
    assert stored[1]["tool_calls"][0]["id"] == tc.id and stored[2]["role"] == "tool" and stored[2]["tool_call_id"] == tc.id


async def test_tool_calls_stream_as_deltas_after_the_text_and_the_tags_never_show(edge_url: str, upstream: Upstream) -> None:
    stream = await client(edge_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather and time in Oslo? [two]"}], tools=[WEATHER, TIME], stream=True
    )
    text, calls, finish = "", {}, []
    async for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for d in delta.tool_calls or []:  # accumulated by index, as every OpenAI streaming client does
            entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = d.id or entry["id"]
            if d.function is not None:
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
        if chunk.choices[0].finish_reason:
            finish.append(chunk.choices[0].finish_reason)
    assert text.strip() == "Let me look both up."
    assert "<tool_call" not in text and "{" not in text
    assert finish == ["tool_calls"]
    got = [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)]
    assert got == [("get_weather", {"city": "Oslo"}), ("local_time", {"city": "Oslo"})]
    assert len({calls[i]["id"] for i in calls}) == 2


async def test_parallel_tool_calls_false_returns_one_call(edge_url: str, upstream: Upstream) -> None:
    r = await client(edge_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather and time in Oslo? [two]"}], tools=[WEATHER, TIME], parallel_tool_calls=False
    )
    assert r.choices[0].finish_reason == "tool_calls" and [t.function.name for t in r.choices[0].message.tool_calls or []] == ["get_weather"]
    assert (r.choices[0].message.content or "").strip() == "Let me look both up."


REFUSED = [("[bad-args]", "at city: 42 is not of type 'string'"), ("[unknown]", "'launch_rockets', which is not one of the tools")]


@pytest.mark.parametrize(("tag", "why"), REFUSED)
async def test_a_refused_call_is_a_clear_error_not_a_poison_message(edge_url: str, settings: Settings, upstream: Upstream, tag: str, why: str) -> None:
    c = client(edge_url)
    with pytest.raises(openai.InternalServerError) as exc:
        await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Weather please {tag}"}], tools=[WEATHER])
    err = exc.value.body
    assert isinstance(err, dict) and err["code"] == "invalid_tool_call" and why in err["message"], err
    cid = exc.value.response.headers["X-Correlation-Id"]
    assert not await read_topic(settings, "chat.dlq", cid)
    stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Weather please {tag}"}], tools=[WEATHER], stream=True)
    with pytest.raises(openai.APIError, match="invalid tool call"):  # in a stream: the error chunk
        async for _ in stream:
            pass


async def test_bad_tool_definitions_are_400s_that_publish_nothing(edge_url: str, settings: Settings, upstream: Upstream) -> None:
    bad = [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integr"}}}}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "18"}]}, "messages"),
    ]
    before = await end_offsets(settings, "chat.requests")
    async with httpx.AsyncClient(timeout=30) as http:
        for extra, param in bad:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
            r = await http.post(f"{edge_url}/v1/chat/completions", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert await end_offsets(settings, "chat.requests") == before


async def test_tool_choice_none_answers_in_text_without_telling_the_model(edge_url: str, upstream: Upstream) -> None:
    r = await client(edge_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Just chat with me."}], tools=[WEATHER], tool_choice="none"
    )
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content.strip() == "Plain words, no tools needed here."
    assert "tools" not in upstream.requests[-1]
