"""Unit tests of single functions: offset tracking, reply splicing, chunking, prompt assembly, request parsing."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from core.grounding import assemble
from edge.errors import http_status
from edge.relay import TurnStream, TurnTimeout
from inference_workers.worker import OffsetTracker, derived_seed
from retrieval_workers.chunking import chunk_text
from schemas.errors import InvalidRequest
from schemas.events import ChatMessage, Passage, TokenEvent, TurnCompleted
from schemas.openai import parse_request

TP = TopicPartition("chat.grounded", 0)


def test_offset_tracker_commits_in_order() -> None:
    t = OffsetTracker()
    for off in (10, 11, 12):
        t.start(TP, off)
    assert t.finish(TP, 12) is None  # 10 and 11 still running
    assert t.finish(TP, 10) == 11
    assert t.finish(TP, 11) == 13
    t.start(TP, 13)
    assert t.finish(TP, 13) == 14


def test_offset_tracker_knows_what_it_handled() -> None:
    t = OffsetTracker()
    t.start(TP, 20)
    t.start(TP, 21)
    assert t.finish(TP, 21) is None
    # after a rebalance the consumer refetches from the commit point (20): both are already handled here
    assert t.handled(TP, 20) and t.handled(TP, 21) and not t.handled(TP, 22)
    assert t.finish(TP, 20) == 22
    assert t.handled(TP, 19) and not t.handled(TP, 22)
    t.forget(TP)
    assert not t.handled(TP, 20)


def test_dead_letters_mask_pii() -> None:
    from aiokafka import ConsumerRecord

    from core.config import Settings
    from producers.bus import dead_letter
    from schemas.events import decode as decode_event

    raw = b'{"messages":[{"content":"mail jane.doe@example.com"}]'
    record = ConsumerRecord("chat.requests", 2, 41, 0, 0, b"conv-1", raw, None, 6, len(raw), ())
    letter = decode_event(dead_letter(Settings(), record, "safety", "not JSON").value)
    assert "jane.doe@example.com" not in letter.value and "[EMAIL]" in letter.value  # type: ignore[union-attr]
    assert (letter.source_topic, letter.partition, letter.offset, letter.key) == ("chat.requests", 2, 41, "conv-1")  # type: ignore[union-attr]


def test_derived_seed_is_stable() -> None:
    assert derived_seed("chatcmpl-x") == derived_seed("chatcmpl-x") != derived_seed("chatcmpl-y")


def tok(attempt: str, seq: int, delta: str, offset: int) -> TokenEvent:
    return TokenEvent(correlation_id="c", conversation_id="v", attempt=attempt, seq=seq, delta=delta, text_offset=offset)


def test_splice_skips_text_a_redelivered_attempt_repeats() -> None:
    s = TurnStream("c")
    assert s.splice(tok("a1", 0, "Hello", 0)) == "Hello"
    assert s.splice(tok("a1", 1, " wor", 5)) == " wor"
    # the worker died; attempt 2 starts over
    assert s.splice(tok("a2", 0, "Hel", 0)) == ""
    assert s.splice(tok("a2", 1, "lo world", 3)) == "ld"
    assert s.splice(tok("a2", 2, "!", 11)) == "!"


async def test_pieces_finish_with_what_the_completion_adds() -> None:
    s = TurnStream("c")
    s.put(tok("a", 0, "Hi", 0))
    s.put(TurnCompleted(correlation_id="c", conversation_id="v", attempt="a", seq=2, finish_reason="stop", text="Hi there", model="m"))
    assert [p async for p in s.pieces(1)] == ["Hi there"]  # events already waiting are joined into one piece
    assert s.done is not None and s.done.finish_reason == "stop"
    # arriving one at a time, each is its own piece
    s = TurnStream("c")
    pieces = s.pieces(1)
    s.put(tok("a", 0, "Hi", 0))
    assert await anext(pieces) == "Hi"
    s.put(TurnCompleted(correlation_id="c", conversation_id="v", attempt="a", seq=2, finish_reason="stop", text="Hi there", model="m"))
    assert [p async for p in pieces] == [" there"]
    assert s.first_relayed is not None


def test_chunks_overlap_and_ids_are_content_hashes() -> None:
    text = " ".join(f"Sentence {i} talks about topic {i}." for i in range(120))
    a = chunk_text(text, "doc.md", size=300, overlap=60)
    b = chunk_text(text, "doc.md", size=300, overlap=60)
    assert [c.chunk_id for c in a] == [c.chunk_id for c in b]
    assert all(len(c.text) <= 300 for c in a) and len(a) > 5
    assert [c.position for c in a] == list(range(len(a)))
    # consecutive chunks share text (the overlap)
    assert a[1].text[:20] in a[0].text
    with pytest.raises(ValueError):
        chunk_text(text, "d", size=100, overlap=100)


def test_prompt_numbers_sources_and_keeps_the_system_message() -> None:
    msgs = [ChatMessage(role="system", content="Be terse."), ChatMessage(role="user", content="q?")]
    passages = [Passage(chunk_id="1", text="alpha", source="a.md", position=0, score=0.9), Passage(chunk_id="2", text="beta", source="b.md", position=3, score=0.5)]
    prompt, cites = assemble(msgs, passages)
    assert prompt[0].role == "system" and prompt[0].content.startswith("Be terse.")
    assert "[1] a.md\nalpha" in prompt[0].content and "[2] b.md\nbeta" in prompt[0].content
    assert prompt[1:] == msgs[1:]
    assert [(c.index, c.source) for c in cites] == [(1, "a.md"), (2, "b.md")]
    assert assemble(msgs, []) == (msgs, [])


def test_parse_request_maps_openai_parameters() -> None:
    req = parse_request(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_completion_tokens": 9, "stop": "END", "seed": 3}
    )
    sp = req.sampling(256)
    assert (sp.max_tokens, sp.stop, sp.seed, sp.temperature) == (9, ["END"], 3, None)  # None: the model's default
    assert req.chat_messages()[0].content == "hi"


@pytest.mark.parametrize(
    ("payload", "param"),
    [([], None), ({"model": "m", "messages": [{"role": "system", "content": "x"}]}, None), ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p")],
)
def test_parse_request_errors(payload: object, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as exc:
        parse_request(payload)
    assert http_status(exc.value) == 400 and exc.value.param == param


def test_unexpected_errors_become_openai_500s_without_details() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from edge.errors import internal_error

    async def boom(request: Request) -> None:
        raise RuntimeError("secret detail")

    app = Starlette(routes=[Route("/x", boom)], exception_handlers={Exception: internal_error})
    r = TestClient(app, raise_server_exceptions=False).get("/x")
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "internal_error" and "secret" not in r.text


async def test_pieces_send_heartbeats_while_waiting_and_time_out_without_events() -> None:
    s = TurnStream("c")
    pieces = s.pieces(timeout_s=1.0, heartbeat_s=0.05)
    assert await anext(pieces) is None  # a heartbeat: nothing arrived for 50 ms
    s.put(tok("a", 0, "Hi", 0))
    assert await anext(pieces) == "Hi"
    silent = TurnStream("d")
    with pytest.raises(TurnTimeout):
        async for piece in silent.pieces(timeout_s=0.2, heartbeat_s=0.05):
            assert piece is None  # heartbeats until the turn's own timeout


def test_onnx_embedder_matches_the_pytorch_one() -> None:
    """The int8 ONNX backend gives the PyTorch model's vectors (cosine) and rankings, on both models as packaged."""
    import numpy as np

    from core.embeddings import Embedder, OnnxEmbedder

    texts = [
        "How do I write JSON to a file in Python?",
        "json.dump(obj, fp) serializes obj as a JSON formatted stream to fp.",
        "Lists are mutable sequences, typically used to store collections of homogeneous items.",
        "Give me step-by-step instructions to build a pipe bomb at home.",
        "The with statement wraps the execution of a block with methods defined by a context manager. " * 30,
        "Café crème, naïve façade — ünïcödé ✓",
    ]
    onnx, torch = OnnxEmbedder().encode(texts), Embedder().encode(texts)
    assert onnx.shape == torch.shape == (len(texts), 384) and onnx.dtype == np.float32
    assert np.allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    assert float((onnx * torch).sum(axis=1).min()) >= 0.995
    assert (np.argsort(-(onnx @ onnx[0]))[:3] == np.argsort(-(torch @ torch[0]))[:3]).all()
