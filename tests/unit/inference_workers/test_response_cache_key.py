"""inference_workers.response_cache: what the exact cache's key covers, and which turns it never takes."""

from __future__ import annotations

from inference_workers.response_cache import cache_key, cacheable
from schemas.events import ChatMessage, ChatTurnRequest, GroundedTurn, ReplyTo, RetrievalResult, SafetyVerdict, SamplingParams

PROMPT = [{"role": "system", "content": "Sources: [1] lists are mutable"}, {"role": "user", "content": "Is a list mutable?"}]


def test_the_key_covers_model_prompt_passages_and_length_not_whitespace() -> None:
    key = cache_key("m", PROMPT, 64, [])
    assert cache_key("m", [{**PROMPT[0]}, {"role": "user", "content": "  Is a  list mutable?\n"}], 64, []) == key
    assert cache_key("other", PROMPT, 64, []) != key
    assert cache_key("m", PROMPT, 32, []) != key
    assert cache_key("m", PROMPT, 64, ["\n"]) != key
    edited = [{"role": "system", "content": "Sources: [1] lists are mutable sequences"}, PROMPT[1]]  # the knowledge base changed
    assert cache_key("m", edited, 64, []) != key


def turn(**request: object) -> GroundedTurn:
    values: dict[str, object] = {
        "correlation_id": "c",
        "conversation_id": "v",
        "model": "m",
        "messages": [ChatMessage(role="user", content="hi")],
        "reply_to": ReplyTo(topic="t"),
        "sampling": SamplingParams(temperature=0),
    }
    values.update(request)
    req = ChatTurnRequest.model_validate(values)
    return GroundedTurn(
        correlation_id="c",
        conversation_id="v",
        request=req,
        verdict=SafetyVerdict(allowed=True, policy_version="p", latency_ms=1.0),
        retrieval=RetrievalResult(status="ok"),
        prompt_messages=req.messages,
    )


def test_only_plain_temperature_0_turns_are_cacheable() -> None:
    assert cacheable(turn()) is None
    assert cacheable(turn(sampling=SamplingParams(temperature=0.7))) == "sampled"
    assert cacheable(turn(pii=["email"])) == "pii"
    assert cacheable(turn(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])) == "tools"
    flagged = turn()
    flagged.verdict.flags.append("self_harm")
    assert cacheable(flagged) == "flagged"
