"""The keep-alive between SSE events (edge.streaming.PING) as the official openai client reads it."""

from __future__ import annotations

import orjson
from openai._streaming import SSEDecoder  # the decoder openai's Stream / AsyncStream run every response through
from sse_starlette.event import ensure_bytes

from edge.streaming import PING


def decoded(events: list[object]) -> list[str]:
    """The ``data`` of every event openai's client dispatches for these SSE events, as sse-starlette writes them."""
    wire = b"".join(ensure_bytes(e, "\n") for e in events)
    return [sse.data for sse in SSEDecoder().iter_bytes(iter([wire]))]


def test_keepalives_between_events_with_ids_reach_the_openai_client_as_nothing() -> None:
    role = {"id": "chatcmpl-1:0:0:0", "data": orjson.dumps({"choices": [{"delta": {"role": "assistant"}}]}).decode()}
    text = {"id": "chatcmpl-1:0:0:2", "data": orjson.dumps({"choices": [{"delta": {"content": "Hi"}}]}).decode()}
    datas = decoded([role, PING, PING, text, PING, {"data": "[DONE]"}])
    assert datas == [role["data"], text["data"], "[DONE]"]  # every dispatched event is JSON (or [DONE])
    # why not a comment block: once an event had an id, openai's decoder dispatches an empty event for it,
    # and its stream ends in json.loads("") (openai/openai-python#2722)
    assert "" in decoded([role, {"comment": "ping"}, text])
