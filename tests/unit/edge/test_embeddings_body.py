"""The pure parts of ``POST /v1/embeddings``: request validation and the answer's two encodings."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from core.config import Settings
from core.embeddings import OnnxEmbedder
from edge.embeddings_api import EmbeddingService, embedding_body, parse_embedding_request
from edge.errors import APIError
from schemas.errors import InvalidRequest, NotFound


def test_inputs_are_checked_and_named() -> None:
    settings = Settings(max_embedding_inputs=3)
    req, texts = parse_embedding_request({"model": "all-MiniLM-L6-v2", "input": "one"}, settings)
    assert texts == ["one"] and req.encoding_format == "float"
    with pytest.raises(InvalidRequest, match="at most 3"):
        parse_embedding_request({"model": "all-MiniLM-L6-v2", "input": ["a", "b", "c", "d"]}, settings)
    with pytest.raises(InvalidRequest, match="token-id"):
        parse_embedding_request({"model": "all-MiniLM-L6-v2", "input": [1, 2]}, settings)
    with pytest.raises(InvalidRequest, match="unknown|extra|not permitted"):
        parse_embedding_request({"model": "all-MiniLM-L6-v2", "input": "a", "temperature": 0}, settings)
    with pytest.raises(NotFound):
        parse_embedding_request({"model": "text-embedding-ada-002", "input": "a"}, settings)
    custom = Settings(embedding_model="/models/e5")
    assert parse_embedding_request({"model": "/models/e5", "input": "a"}, custom)[1] == ["a"]


def test_base64_is_the_float32_little_endian_bytes() -> None:
    vectors = np.array([[0.5, -0.25, 1.0], [0.0, 2.0, -3.5]], dtype=np.float32)
    req, _ = parse_embedding_request({"model": "all-MiniLM-L6-v2", "input": ["a", "b"], "encoding_format": "base64"}, Settings())
    body = embedding_body(req, vectors, 7, "m")
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]  # as the openai client decodes
    assert np.array_equal(np.stack(decoded), vectors)
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and body["model"] == "m"
    req, _ = parse_embedding_request({"model": "all-MiniLM-L6-v2", "input": ["a", "b"]}, Settings())
    assert embedding_body(req, vectors, 7, "m")["data"][1]["embedding"] == [0.0, 2.0, -3.5]


def test_token_counts_are_before_truncation() -> None:
    embedder = OnnxEmbedder()
    short, long = "hello world", "word " * 400
    counts = embedder.token_counts([short, long])
    assert counts[0] == 4  # [CLS] hello world [SEP]
    assert counts[1] > embedder.max_tokens == 256


async def test_past_the_edge_bound_a_request_is_a_429_with_retry_after() -> None:
    service = EmbeddingService(Settings(max_embedding_requests=1))
    req, texts = parse_embedding_request({"model": "all-MiniLM-L6-v2", "input": "a"}, Settings())
    async with service.slots:  # the one slot is taken
        with pytest.raises(APIError) as refused:
            await service.embed(req, texts)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
    body = await service.embed(req, texts)  # free again
    assert len(body["data"][0]["embedding"]) == 384
