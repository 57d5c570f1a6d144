"""``POST /v1/embeddings`` in OpenAI's format (https://platform.openai.com/docs/api-reference/embeddings),
served by the knowledge base's own embedding model (:mod:`core.embeddings`: all-MiniLM-L6-v2, int8 ONNX
for the packaged model), so a client's vectors are comparable with chatbus's retrieval.

Body (JSON object):

* ``input``: a string or a list of 1 to ``max_embedding_inputs`` strings (2,048 by default, as OpenAI),
  none empty, each at most the model's window (256 tokens for MiniLM, special tokens included): a longer
  one is a 400 ``context_length_exceeded``, never silently truncated. Token-id arrays (OpenAI's tiktoken
  ids) are refused with a 400: this model has another vocabulary.
* ``model``: the embedding model's name (``sentence-transformers/all-MiniLM-L6-v2`` or
  ``all-MiniLM-L6-v2``; ``CHATBUS_EMBEDDING_MODEL`` when set): another is a 404 ``model_not_found``.
* ``encoding_format``: ``float`` (default: lists of floats) or ``base64`` (each vector's float32
  little-endian bytes, base64-encoded, as OpenAI; the ``openai`` client asks for it and decodes it).
* ``dimensions``: only the model's own (384); ``user``: accepted, not stored.

Answer: ``{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": ...}], "model",
"usage": {"prompt_tokens", "total_tokens"}}``; vectors are L2-normalised (a dot product is the cosine).

Why on the edge, not through the bus: one request is a single forward pass of a 22M-parameter model
(milliseconds per short text), answered at once and not streamed; a round trip through Kafka (publish,
a consumer, a reply) would cost more than the work and give nothing to resume or cancel. The bound is
per edge: at most ``max_embedding_requests`` run at once (in threads, off the event loop); past it a
429 with ``Retry-After``. The embedder is loaded on the first request. Inputs are neither logged nor
stored.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from core.config import Settings
from core.embeddings import PACKAGED_NAME, TextEmbedder, get_embedder
from edge.auth import protected
from edge.errors import APIError
from edge.http import ORJSONResponse, read_json, validate_body
from edge.keys import admit_key
from schemas.errors import InvalidRequest, NotFound

log = logging.getLogger(__name__)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[int] | list[list[int]]
    model: str = Field(min_length=1, max_length=256)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)


def model_names(settings: Settings) -> set[str]:
    """The names ``model`` may take for the configured embedding model."""
    if settings.embedding_model:
        return {settings.embedding_model}
    return {PACKAGED_NAME, PACKAGED_NAME.split("/", 1)[1]}


def parse_embedding_request(payload: object, settings: Settings) -> tuple[EmbeddingRequest, list[str]]:
    """The validated request and its texts; 400 for a bad body (naming the field), 404 for another model."""
    req = validate_body(EmbeddingRequest, payload)
    items = [req.input] if isinstance(req.input, str) else req.input
    if not items:
        raise InvalidRequest("input: must not be an empty list", param="input")
    texts = [t for t in items if isinstance(t, str)]
    if len(texts) != len(items):
        raise InvalidRequest("input: token-id arrays are not supported by this model (another vocabulary); send text", param="input")
    if len(texts) > settings.max_embedding_inputs:
        raise InvalidRequest(f"input: at most {settings.max_embedding_inputs} texts per request, got {len(texts)}", param="input")
    if any(not t.strip() for t in texts):
        raise InvalidRequest("input: texts must not be empty", param="input")
    if req.model not in model_names(settings):
        names = " or ".join(sorted(model_names(settings)))
        raise NotFound(f"The model '{req.model}' does not exist; the embedding model is {names}.", param="model", code="model_not_found")
    return req, texts


def embedding_body(req: EmbeddingRequest, vectors: np.ndarray, tokens: int, name: str) -> dict[str, Any]:
    """OpenAI's answer for ``vectors`` (``(n, dim)`` float32): lists of floats or base64 of the float32
    little-endian bytes."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    data: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        encoded: Any = base64.b64encode(row.tobytes()).decode("ascii") if req.encoding_format == "base64" else row.tolist()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class EmbeddingService:
    """The edge's embedder, loaded on first use, with at most ``max_embedding_requests`` requests at once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots = asyncio.Semaphore(settings.max_embedding_requests)
        self._embedder: TextEmbedder | None = None
        self._loading = asyncio.Lock()

    async def embedder(self) -> TextEmbedder:
        async with self._loading:
            if self._embedder is None:
                self._embedder = await asyncio.to_thread(get_embedder, self.settings.embedding_model, self.settings.embedding_backend)
            return self._embedder

    async def embed(self, req: EmbeddingRequest, texts: list[str]) -> dict[str, Any]:
        """The answer body; 400 for a text past the model's window, 429 when every slot is taken."""
        if self.slots.locked():
            raise APIError(429, "too many embedding requests at once on this edge, retry shortly", type="rate_limit_error", headers={"Retry-After": "1"})
        async with self.slots:
            embedder = await self.embedder()
            if req.dimensions is not None and req.dimensions != embedder.dim:
                raise InvalidRequest(f"dimensions: this model's vectors have {embedder.dim} dimensions only", param="dimensions")
            counts = await asyncio.to_thread(embedder.token_counts, texts)
            for i, n in enumerate(counts):
                if n > embedder.max_tokens:
                    raise InvalidRequest(
                        f"input[{i}]: {n} tokens, past this model's maximum of {embedder.max_tokens}; split the text",
                        param="input",
                        code="context_length_exceeded",
                    )
            vectors = await asyncio.to_thread(embedder.encode, texts)
        return embedding_body(req, vectors, sum(counts), embedder.name)


async def create_embeddings(request: Request) -> Response:
    """``POST /v1/embeddings`` (see the module docstring)."""
    settings: Settings = request.app.state.settings
    req, texts = parse_embedding_request(await read_json(request, settings.max_request_bytes), settings)
    limits = await admit_key(request)  # the key's requests-per-minute (edge.keys)
    service: EmbeddingService = request.app.state.embeddings
    return ORJSONResponse(await service.embed(req, texts), headers=limits)


ROUTES: list[BaseRoute] = [protected("/v1/embeddings", create_embeddings, ["POST"])]
