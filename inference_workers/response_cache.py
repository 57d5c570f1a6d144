"""The exact response cache: a temperature-0 turn whose prompt the model has already answered gets that
answer again, streamed on the bus like any other (token events, then the completion, marked ``cache:
"exact"``), so recording, feedback and timing work unchanged.

Key: SHA-256 over the served model's name, the prompt exactly as the engine gets it (the grounded, fitted
messages: system prompt, history, the retrieved passages' text, the question), with each message's text
Unicode-NFC normalised and its whitespace collapsed, and the sampling parameters that change the answer
(``max_tokens``, ``stop``). The retrieved passages are in the key, so an edit to the knowledge base that
changes what a question retrieves, or the text retrieved, misses the old entry: invalidation needs no
version counter. Entries expire after ``CHATBUS_RESPONSE_CACHE_TTL_S``.

Never cached (:func:`cacheable`): sampling above temperature 0 (another answer is as right), turns with
PII masked in them, turns the input screen flagged, turns offering tools or carrying tool messages,
answers that did not end in ``stop`` / ``length``, answers retracted by the output rail or with PII in
them. On with ``CHATBUS_RESPONSE_CACHE_MODELS`` (served model names, or ``*``); stored in the database
(``response_cache``), shared by every inference worker of the model. A database that does not answer
within 0.3 s is a miss, never an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

import orjson
from pymongo import AsyncMongoClient

from core import metrics
from core.cache_rules import not_cacheable
from core.config import Settings
from schemas.events import FinishReason, GroundedTurn

log = logging.getLogger(__name__)

COLLECTION = "response_cache"
LOOKUP_TIMEOUT_S = 0.3


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def cache_key(model: str, messages: list[dict[str, Any]], max_tokens: int, stop: list[str]) -> str:
    """Hex SHA-256 of the request as the engine would run it (``messages``: the fitted prompt, chat-template
    dicts with ``role`` and ``content``; see the module docstring)."""
    canonical = {
        "v": 1,
        "model": model,
        "messages": [[m["role"], normalise(str(m.get("content") or ""))] for m in messages],
        "max_tokens": max_tokens,
        "stop": sorted(stop),
    }
    return hashlib.sha256(orjson.dumps(canonical)).hexdigest()


def cacheable(turn: GroundedTurn) -> str | None:
    """Why the turn's answer may not be served from or stored in the cache, or None when it may (core.cache_rules)."""
    return not_cacheable(turn.request, turn.verdict)


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: FinishReason  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class ResponseCache:
    """The database side: :meth:`get` and :meth:`put` by key (a companion of the inference worker)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ttl_s = settings.response_cache_ttl_s
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def _collection(self) -> Any:
        assert self._client is not None
        return self._client[self.settings.mongo_db][COLLECTION]

    async def start(self) -> None:
        self._client = AsyncMongoClient(self.settings.mongo_uri, serverSelectionTimeoutMS=1000)
        try:  # expired entries are also filtered on read, so a database without TTL indexes still works
            await asyncio.wait_for(self._collection.create_index("expires_at", expireAfterSeconds=0), 5)
        except Exception as exc:
            log.warning("response cache: no TTL index (%s: %s); expired entries are skipped on read", type(exc).__name__, exc)

    async def stop(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending, timeout=5)
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def get(self, key: str) -> CachedAnswer | None:
        """The stored answer for ``key``, or None (a miss, an expired entry, or a database not answering in time)."""
        try:
            doc = await asyncio.wait_for(self._collection.find_one({"_id": key}), LOOKUP_TIMEOUT_S)
        except Exception as exc:
            metrics.RESPONSE_CACHE.labels("exact", "unavailable").inc()
            log.debug("response cache lookup failed: %s", exc)
            return None
        if doc is None or doc["expires_at"] < time.time() or doc.get("finish_reason") not in ("stop", "length"):
            metrics.RESPONSE_CACHE.labels("exact", "miss").inc()
            return None
        metrics.RESPONSE_CACHE.labels("exact", "hit").inc()
        finish: FinishReason = "length" if doc["finish_reason"] == "length" else "stop"
        return CachedAnswer(str(doc["text"]), finish, int(doc["prompt_tokens"]), int(doc["completion_tokens"]))

    def put_soon(self, key: str, answer: CachedAnswer, model: str) -> None:
        """Store ``answer`` in the background (a failure is logged, never raised)."""
        task = asyncio.get_running_loop().create_task(self._put(key, answer, model))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _put(self, key: str, answer: CachedAnswer, model: str) -> None:
        now = time.time()
        doc = {
            "text": answer.text,
            "finish_reason": answer.finish_reason,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "model": model,
            "created_at": now,
            "expires_at": now + self.ttl_s,
        }
        try:
            await asyncio.wait_for(self._collection.replace_one({"_id": key}, doc, upsert=True), 5)
            metrics.RESPONSE_CACHE.labels("exact", "stored").inc()
        except Exception as exc:
            log.warning("response cache: could not store an answer: %s: %s", type(exc).__name__, exc)
