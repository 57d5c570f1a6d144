"""OpenAI request parsing (schemas.openai.parse_request) and its errors' HTTP status (edge.errors)."""

from __future__ import annotations

import pytest

from edge.errors import http_status
from schemas.errors import InvalidRequest
from schemas.openai import check_supported, parse_request


def test_parse_request_maps_openai_parameters() -> None:
    req = parse_request(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_completion_tokens": 9, "stop": "END", "seed": 3}
    )
    sp = req.sampling(256)
    assert (sp.max_tokens, sp.stop, sp.seed, sp.temperature) == (9, ["END"], 3, None)  # None: the model's default
    assert req.chat_messages()[0].content == "hi"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ([], None),
        ({"model": "m", "messages": [{"role": "system", "content": "x"}]}, None),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ],
)
def test_parse_request_errors(payload: object, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as exc:
        parse_request(payload)
    assert http_status(exc.value) == 400 and exc.value.param == param


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def tool_request(**extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": [WEATHER], **extra}


def test_tools_and_a_tool_loop_conversation_parse() -> None:
    req = parse_request(
        tool_request(
            messages=[
                {"role": "user", "content": "weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
            ],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    )
    check_supported(req, 4096)
    assert req.offered_tools()[1] == "get_weather"
    msgs = req.chat_messages()
    assert msgs[1].tool_calls[0].function.arguments == '{"city": "Paris"}' and msgs[2].tool_call_id == "call_1"
    assert msgs[1].template_dict()["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # templates take an object
    assert parse_request(tool_request(tool_choice="none")).offered_tools() == ([], "auto")  # the model is not told of them


@pytest.mark.parametrize(
    ("extra", "param", "why"),
    [
        ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "objekt"}}}]}, "tools", "not a valid JSON Schema"),
        ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]}, "tools", "must describe an object"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "letters, digits"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "given twice"),
        ({"tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice", "no tool named 'launch'"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ],
)
def test_bad_tools_get_a_400_naming_the_parameter(extra: dict[str, object], param: str, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why) as exc:
        check_supported(parse_request(tool_request(**extra)), 4096)
    assert exc.value.param == param and http_status(exc.value) == 400


def test_a_tool_message_needs_the_id_of_the_call_it_answers() -> None:
    with pytest.raises(InvalidRequest, match="tool_call_id") as exc:
        parse_request(tool_request(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "18"}]))
    assert exc.value.param == "messages"
