"""OpenAI request parsing (schemas.openai.parse_request) and its errors' HTTP status (edge.errors)."""

from __future__ import annotations

import pytest

from edge.errors import http_status
from schemas.errors import InvalidRequest
from schemas.openai import parse_request


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
