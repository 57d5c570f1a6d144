"""The semantic cache: a conversation's first question close enough to one already answered, by the same
tenant, model and system prompt, gets that answer, streamed on the bus like any other (``cache:
"semantic"``).

Lives in the retrieval worker, the Milvus owner, beside the knowledge base (collection ``semantic_cache``,
384-d MiniLM vectors, inner product = cosine). The lookup uses the query embedding the safety stage
already computed. A hit needs cosine >= ``CHATBUS_SEMANTIC_CACHE_THRESHOLD`` (0.8) *and* the guard's
consent (:func:`core.semantic_guard.conflict`: negations, opposites, numbers, direction, names): on the
labelled pairs of ``bench/semantic_cache.py`` the threshold alone serves a near-miss a wrong answer 53 %
of the time, with the guard 5 % (held-out pairs). One threshold for every prompt gives no error bound
(vCache, ICLR 2026, learns one per cached prompt); that is not built.

Entries come from the inference worker (``cache.entries``, :class:`schemas.events.CacheEntry`) for the
turns :mod:`core.cache_rules` allows, each with an expiry (``CHATBUS_RESPONSE_CACHE_TTL_S``); any change
to the knowledge base (an ingest or a delete) empties the cache, since an answer may rest on passages
that changed. On per model with ``CHATBUS_SEMANTIC_CACHE_MODELS``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Literal

from pymilvus import DataType, MilvusClient

from schemas.events import CachedReply, CacheEntry

log = logging.getLogger(__name__)

COLLECTION = "semantic_cache"
MAX_TEXT = 60_000  # bytes (Milvus VARCHAR)


def _literal(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _cut(value: str, limit: int) -> str:
    data = value.encode()
    return value if len(data) <= limit else data[:limit].decode(errors="ignore")


class SemanticCache:
    """The Milvus side (blocking calls: run them on the retrieval worker's Milvus thread)."""

    def __init__(self, client: MilvusClient, dim: int = 384) -> None:
        self.client = client
        self.dim = dim
        self._ensure()

    def _ensure(self) -> None:
        if self.client.has_collection(COLLECTION):
            self.client.load_collection(COLLECTION)
            return
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("entry_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("tenant", DataType.VARCHAR, max_length=256)
        schema.add_field("model", DataType.VARCHAR, max_length=256)
        schema.add_field("system", DataType.VARCHAR, max_length=64)
        schema.add_field("question", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("answer", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("finish_reason", DataType.VARCHAR, max_length=16)
        schema.add_field("prompt_tokens", DataType.INT64)
        schema.add_field("completion_tokens", DataType.INT64)
        schema.add_field("expires_at", DataType.DOUBLE)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
        self.client.create_collection(COLLECTION, schema=schema, index_params=index)
        log.info("created Milvus collection %s (FLAT IP dim %d)", COLLECTION, self.dim)

    def put(self, entry: CacheEntry, vector: list[float]) -> None:
        """Insert or replace the entry for (tenant, model, system prompt, question)."""
        ident = hashlib.sha256("\x00".join((entry.tenant, entry.model, entry.system, entry.question)).encode()).hexdigest()
        row: dict[str, Any] = {
            "entry_id": ident,
            "vector": vector,
            "tenant": _cut(entry.tenant, 256),
            "model": _cut(entry.model, 256),
            "system": entry.system[:64],
            "question": _cut(entry.question, MAX_TEXT),
            "answer": _cut(entry.answer, MAX_TEXT),
            "finish_reason": entry.finish_reason,
            "prompt_tokens": entry.prompt_tokens,
            "completion_tokens": entry.completion_tokens,
            "expires_at": entry.expires_at,
        }
        self.client.upsert(COLLECTION, [row])

    def nearest(self, vector: list[float], tenant: str, model: str, system: str) -> tuple[float, CachedReply] | None:
        """The closest live entry of this tenant, model and system prompt: (cosine, reply), or None."""
        where = f"tenant == {_literal(tenant)} and model == {_literal(model)} and system == {_literal(system)} and expires_at > {time.time()}"
        fields = ["question", "answer", "finish_reason", "prompt_tokens", "completion_tokens"]
        hits = self.client.search(COLLECTION, data=[vector], filter=where, limit=1, output_fields=fields, search_params={"metric_type": "IP"})
        if not hits or not hits[0]:
            return None
        best = hits[0][0]
        e = best["entity"]
        score = float(best["distance"])
        finish: Literal["stop", "length"] = "length" if e["finish_reason"] == "length" else "stop"
        reply = CachedReply(
            text=e["answer"],
            finish_reason=finish,
            prompt_tokens=int(e["prompt_tokens"]),
            completion_tokens=int(e["completion_tokens"]),
            similarity=round(score, 4),
            question=e["question"],
        )
        return score, reply

    def clear(self) -> None:
        """Drop every entry (the knowledge base changed)."""
        self.client.delete(COLLECTION, filter='entry_id != ""')
