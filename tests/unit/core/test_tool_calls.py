"""Tool calls in generated text (core.tools): held back while streaming, parsed, checked against the schemas."""

from __future__ import annotations

import json

import pytest

from core.tools import InvalidToolCall, ToolCallStream, check_calls, forced_prefix
from schemas.events import ToolCall, ToolSpec

WEATHER = ToolSpec.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
)


def stream_in(text: str, step: int) -> tuple[str, ToolCallStream]:
    s = ToolCallStream()
    released = "".join(s.feed(text[i : i + step]) for i in range(0, len(text), step))
    return released, s


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_text_before_a_call_is_released_and_the_call_never_is(step: int) -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    released, s = stream_in(text, step)
    rest, calls = s.finish()
    assert released + rest == "Let me check.\n"
    assert "<" not in released + rest
    [call] = calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and len(call.id) == 29


def test_a_partial_tag_is_held_back_until_it_is_known_not_to_be_one() -> None:
    s = ToolCallStream()
    assert s.feed("a <tool") == "a "
    assert s.feed("s are handy") == "<tools are handy"
    assert s.finish() == ("", [])
    s = ToolCallStream()
    assert s.feed("ends with <tool_") == "ends with "
    assert s.finish() == ("<tool_", [])  # the answer ended: what was held is plain text after all


def test_several_calls_and_encoded_arguments() -> None:
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>'
    )
    _, s = stream_in(text, 5)
    _, calls = s.finish()
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Oslo", "Rome"]
    assert len({c.id for c in calls}) == 2
    check_calls(calls, [WEATHER])


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Paris"', "not valid JSON"),
        ('["get_weather"]', '"name"'),
        ('{"name": "get_weather", "arguments": [1, 2]}', "must be a JSON object"),
        ('{"name": "get_weather", "arguments": "not json"}', "are not JSON"),
    ],
)
def test_unparsable_calls_say_why(body: str, why: str) -> None:
    s = ToolCallStream()
    s.feed(f"<tool_call>\n{body}\n</tool_call>")
    with pytest.raises(InvalidToolCall, match=why):
        s.finish()


def call_of(name: str, args: object) -> list[ToolCall]:
    s = ToolCallStream()
    s.feed("<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>")
    return s.finish()[1]


@pytest.mark.parametrize(
    ("name", "args", "why"),
    [
        ("launch", {}, "not one of the tools offered"),
        ("get_weather", {}, "'city' is a required property"),
        ("get_weather", {"city": 42}, "at city: 42 is not of type 'string'"),
        ("get_weather", {"city": "Paris", "unit": "kelvin"}, "at unit"),
        ("get_weather", {"city": "Paris", "when": "now"}, "Additional properties"),
    ],
)
def test_calls_are_checked_against_the_tools_schemas(name: str, args: object, why: str) -> None:
    with pytest.raises(InvalidToolCall, match=why):
        check_calls(call_of(name, args), [WEATHER])


def test_a_named_tool_choice_refuses_another_tool() -> None:
    other = ToolSpec.model_validate({"type": "function", "function": {"name": "other"}})
    check_calls(call_of("other", {}), [WEATHER, other], "auto")
    with pytest.raises(InvalidToolCall, match="tool_choice asked for 'get_weather'"):
        check_calls(call_of("other", {}), [WEATHER, other], "get_weather")


def test_a_forced_prefix_is_the_start_of_a_call_the_model_completes() -> None:
    assert forced_prefix("auto") == ""
    for choice, completion in [("required", 'get_weather", "arguments": {"city": "Paris"}}</tool_call>'), ("get_weather", '{"city": "Paris"}}</tool_call>')]:
        s = ToolCallStream(forced_prefix(choice))
        assert s.feed(completion) == ""
        _, [call] = s.finish()
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize(
    "answer",
    [
        '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```',  # what Qwen2.5-Coder-0.5B writes under a system prompt
        '  {"name": "get_weather", "arguments": {"city": "Paris"}}',
        '{"name": "get_weather", "parameters": "{\\"city\\": \\"Paris\\"}"}',
    ],
)
def test_a_whole_answer_that_is_one_call_in_json_is_a_call(answer: str) -> None:
    s = ToolCallStream(names=["get_weather"])
    assert "".join(s.feed(answer[i : i + 4]) for i in range(0, len(answer), 4)) == ""
    rest, [call] = s.finish()
    assert rest == "" and call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize(
    "answer",
    [
        '```python\nprint({"a": 1})\n```',  # code, not a call: released whole at the end
        '{"name": "not_offered", "arguments": {}}',
        '{"name": "get_weather", "arguments": {}, "extra": 1}',
        '```json\n{"name": "get_weather", "arguments": {}}\n```\nThat is how you would call it.',
    ],
)
def test_a_json_or_code_answer_that_is_not_exactly_one_offered_call_is_text(answer: str) -> None:
    s = ToolCallStream(names=["get_weather"])
    assert s.feed(answer) == ""
    assert s.finish() == (answer, [])


def test_plain_text_streams_at_once_when_tools_are_offered() -> None:
    s = ToolCallStream(names=["get_weather"])
    assert s.feed("  ") == ""  # leading whitespace: not known yet
    assert s.feed("Hello {there}") == "  Hello {there}"
    assert s.finish() == ("", [])


def test_a_held_answer_that_turns_to_tags_keeps_its_preamble() -> None:
    s = ToolCallStream(names=["get_weather"])
    assert s.feed('`x` first\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>') == ""
    rest, [call] = s.finish()
    assert rest == "`x` first\n" and json.loads(call.function.arguments) == {"city": "Rome"}
