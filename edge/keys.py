"""Virtual API keys kept in the database (``CHATBUS_KEY_STORE=true``): each with a tenant, a requests-per-minute
limit and the models it may use; created, listed and revoked with ``chatbus keys``.

A key is stored only as its identity (:func:`edge.auth.key_owner`: ``key-`` + 24 hex digits of its SHA-256)
with a 6-character hint for people to tell keys apart; the key itself is printed once, when created.

* **Lookup**: every request looks its key up (one indexed read by ``_id``, no cache), so a revoked key stops
  working on every edge at the next request.
* **Requests per minute**: a fixed one-minute window per key in the ``rate_windows`` collection, counted with
  one atomic ``$inc`` upsert per admitted request (``find_one_and_update``), so the limit holds across any
  number of edges with no error: the database serialises the increments. A request past the limit is
  refused (429) before anything is published, and still counts, as OpenAI's limits do. Fixed windows let a
  client send up to 2 x rpm across a window boundary (the known cost of fixed windows over sliding ones).
* Headers, as OpenAI's: ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests`` and
  ``x-ratelimit-reset-requests`` (``"12s"``) on every rate-limited answer, ``Retry-After`` on a 429.

The simple mode, ``CHATBUS_API_KEYS`` (a static list, no limits), still works beside the store.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from starlette.requests import Request

from edge.auth import key_owner
from edge.errors import APIError

KEYS = "api_keys"
WINDOWS = "rate_windows"
WINDOW_S = 60
KEY_PREFIX = "cb-"


class KeyLimits(BaseModel):
    """What a key may do: ``rpm`` requests per minute (None: no limit); ``models`` the served model names it
    may ask for (empty: all)."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1)
    models: list[str] = Field(default_factory=list)


class KeyRecord(BaseModel):
    """A stored key: ``id`` is its identity (``key-…``), never the key."""

    id: str
    tenant: str
    name: str = ""
    hint: str = ""  # the key's last characters, to tell keys apart
    created_at: float
    revoked_at: float | None = None
    limits: KeyLimits = Field(default_factory=KeyLimits)

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def new_key() -> str:
    """A fresh key: ``cb-`` and 43 URL-safe characters (256 random bits, :func:`secrets.token_urlsafe`)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def rate_headers(limit: int, count: int, now: float) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*-requests`` headers for the window holding ``now`` after ``count`` requests."""
    reset = WINDOW_S - now % WINDOW_S
    return {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(max(0, limit - count)),
        "x-ratelimit-reset-requests": f"{math.ceil(reset)}s",
    }


class KeyStore:
    """The ``api_keys`` and ``rate_windows`` collections."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self.db = db

    async def create(self, tenant: str, name: str = "", limits: KeyLimits | None = None) -> tuple[str, KeyRecord]:
        """A new key and its record (the key is returned only here)."""
        key = new_key()
        record = KeyRecord(id=key_owner(key), tenant=tenant, name=name, hint=key[-6:], created_at=time.time(), limits=limits or KeyLimits())
        await self.db[KEYS].insert_one({"_id": record.id, **record.model_dump(exclude={"id"})})
        return key, record

    async def get(self, key_id: str) -> KeyRecord | None:
        doc = await self.db[KEYS].find_one({"_id": key_id})
        return None if doc is None else KeyRecord(id=doc.pop("_id"), **doc)

    async def list(self, tenant: str | None = None) -> list[KeyRecord]:
        query = {} if tenant is None else {"tenant": tenant}
        return [KeyRecord(id=d.pop("_id"), **d) async for d in self.db[KEYS].find(query).sort("created_at", 1)]

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key (True), or False when there is no such active key."""
        result = await self.db[KEYS].update_one({"_id": key_id, "revoked_at": None}, {"$set": {"revoked_at": time.time()}})
        return result.modified_count == 1

    async def count_request(self, key_id: str, now: float) -> int:
        """Count one request in ``key_id``'s current window; the window's count including it."""
        window = int(now // WINDOW_S)
        doc = await self.db[WINDOWS].find_one_and_update(
            {"_id": f"{key_id}:{window}"},
            {"$inc": {"n": 1}, "$setOnInsert": {"key": key_id, "window": window}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc is not None  # an upsert returning the document after it
        count = int(doc["n"])
        if count == 1:  # a new window: the key's older ones are done
            await self.db[WINDOWS].delete_many({"key": key_id, "window": {"$lt": window}})
        return count

    async def admit(self, record: KeyRecord, model: str | None = None) -> dict[str, str]:
        """Check ``record``'s limits for one request (for ``model``): the rate-limit headers to send, or a
        403 (model not allowed) or 429 (past the requests-per-minute limit, with ``Retry-After``)."""
        if model is not None and record.limits.models and model not in record.limits.models:
            raise APIError(
                403,
                f"This key may not use the model '{model}'; it may use {', '.join(record.limits.models)}.",
                type="permission_error",
                param="model",
                code="model_not_allowed",
            )
        if record.limits.rpm is None:
            return {}
        now = time.time()
        count = await self.count_request(record.id, now)
        headers = rate_headers(record.limits.rpm, count, now)
        if count > record.limits.rpm:
            headers["Retry-After"] = str(math.ceil(WINDOW_S - now % WINDOW_S))
            raise APIError(
                429,
                f"Rate limit reached for requests: limit {record.limits.rpm} per minute for this key. Try again in {headers['x-ratelimit-reset-requests']}.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers=headers,
            )
        return headers


async def admit_key(request: Request, model: str | None = None) -> dict[str, str]:
    """:meth:`KeyStore.admit` for the request's stored key (nothing for a static key or an open edge)."""
    record = getattr(request.state, "key_record", None)
    if not isinstance(record, KeyRecord):
        return {}
    store: KeyStore = request.app.state.key_store
    return await store.admit(record, model)
