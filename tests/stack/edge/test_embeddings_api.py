"""``POST /v1/embeddings`` on the real edge: the official ``openai`` client (which asks for base64) and a
plain float request get the vectors the knowledge base's own embedder computes, with OpenAI's shape and
usage; bad requests get OpenAI's error JSON with the right status."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from core.embeddings import get_embedder

pytestmark = pytest.mark.stack

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["How do I write JSON to a file?", "Rivers flow into the sea.", "Quelle heure est-il ? ✓"]


async def test_the_openai_client_gets_the_knowledge_base_vectors(edge_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{edge_url}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = await client.embeddings.create(model=MODEL, input=TEXTS)  # encoding_format base64, decoded by the client
    embedder = get_embedder()
    expected = embedder.encode(TEXTS)
    got = np.array([d.embedding for d in reply.data], dtype=np.float32)
    assert got.shape == (len(TEXTS), 384) and [d.index for d in reply.data] == [0, 1, 2]
    assert np.allclose(got, expected, atol=1e-5)  # the same model and backend as retrieval's query embeddings
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert reply.model == MODEL
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(embedder.token_counts(TEXTS))

    one = await client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[0], encoding_format="float")
    assert np.allclose(one.data[0].embedding, expected[0], atol=1e-5)


async def test_bad_embedding_requests_get_openai_errors(edge_url: str) -> None:
    def error(r: httpx.Response, status: int) -> dict[str, object]:
        assert r.status_code == status, (r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"]
        return err

    async with httpx.AsyncClient(base_url=edge_url, timeout=60) as http:
        post = lambda body: http.post("/v1/embeddings", json=body)  # noqa: E731
        assert error(await post({"model": "text-embedding-3-small", "input": "x"}), 404)["code"] == "model_not_found"
        assert error(await post({"model": MODEL}), 400)["param"] == "input"
        assert error(await post({"model": MODEL, "input": []}), 400)["param"] == "input"
        assert error(await post({"model": MODEL, "input": ["ok", ""]}), 400)["param"] == "input"
        assert error(await post({"model": MODEL, "input": [[1, 2, 3]]}), 400)["param"] == "input"  # tiktoken ids
        assert error(await post({"model": MODEL, "input": "x", "encoding_format": "int8"}), 400)["param"] == "encoding_format"
        assert error(await post({"model": MODEL, "input": "x", "dimensions": 256}), 400)["param"] == "dimensions"
        too_long = error(await post({"model": MODEL, "input": ["short", "word " * 400]}), 400)
        assert too_long["code"] == "context_length_exceeded" and "input[1]" in str(too_long["message"])
        r = await http.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
        error(r, 400)
        assert (await post({"model": MODEL, "input": "still fine"})).status_code == 200
