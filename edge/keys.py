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
* **Tokens per minute** (``tpm``) and a **token budget** per UTC day or month (``budget_tokens``): the
  edge that streamed a turn to its end charges its prompt + completion tokens to the key (:meth:`KeyStore.charge`:
  one ``$inc`` on the minute's window and on the day's and month's budget documents, ``key_budgets``). A
  request is refused while what was charged already reaches the limit: 429 ``rate_limit_exceeded`` for
  tokens per minute, 429 ``insufficient_quota`` (OpenAI's code for a spent quota) for the budget, with
  ``Retry-After`` until the window or period ends. Error bound: turns admitted while under the limit are
  charged when they end, so a key can pass its limit by the tokens of the turns it had in flight; the
  tokens of a turn whose client left before its end are not charged. **Batches**: a submission is refused
  (429 ``insufficient_quota``) while the budget is spent, each line's tokens are charged to the budget by the
  ``batches`` worker as the line completes (not to tokens per minute: as OpenAI's, batch work is held to
  limits of its own), and a line naming a model the key may not use is an invalid line
  (``model_not_allowed``); a batch admitted under the budget can pass it by its own lines' tokens.
* **Concurrent requests** (``max_parallel``, LiteLLM's ``max_parallel_requests``): each admitted chat request
  holds a lease in ``key_leases`` until its answer ends (released then; on an edge crash it expires after
  ``turn_timeout_s``). A request finding ``max_parallel`` live leases gets a 429; two requests racing for
  the last slot on different edges each count again after taking theirs, and one past the cap gives its
  lease back and is refused — so never more than ``max_parallel`` run (at worst both racers are refused).
* Headers, as OpenAI's: ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests`` and
  ``x-ratelimit-reset-requests`` (``"12s"``), and the same three ``-tokens`` for ``tpm``, on every
  rate-limited answer, ``Retry-After`` on a 429.

The simple mode, ``CHATBUS_API_KEYS`` (a static list, no limits), still works beside the store.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError
from starlette.requests import Request

from core.quotas import KEYS, WINDOW_S, WINDOWS, budget_period, charge_tokens, charged_tokens
from edge.auth import key_owner
from edge.errors import APIError

log = logging.getLogger(__name__)

LEASES = "key_leases"
KEY_PREFIX = "cb-"


class KeyLimits(BaseModel):
    """What a key may do: ``rpm`` requests per minute (None: no limit); ``models`` the served model names it
    may ask for (empty: all)."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)  # tokens (prompt + completion) per minute
    budget_tokens: int | None = Field(default=None, ge=1)  # tokens per budget period
    budget_period: Literal["day", "month"] = "month"  # UTC
    max_parallel: int | None = Field(default=None, ge=1)  # chat requests answering at once
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


def rate_headers(limit: int, count: int, now: float, what: str = "requests") -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*-requests`` (or ``-tokens``) headers for the window holding ``now`` after ``count``."""
    reset = WINDOW_S - now % WINDOW_S
    return {
        f"x-ratelimit-limit-{what}": str(limit),
        f"x-ratelimit-remaining-{what}": str(max(0, limit - count)),
        f"x-ratelimit-reset-{what}": f"{math.ceil(reset)}s",
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

    async def charge(self, key_id: str, tokens: int, now: float) -> None:
        """Charge ``tokens`` (a finished turn's prompt + completion) to ``key_id``: its minute window and its
        day's and month's budgets (:func:`core.quotas.charge_tokens`)."""
        await charge_tokens(self.db, key_id, tokens, now)

    async def charged(self, key_id: str, period: str, now: float) -> int:
        """Tokens charged to ``key_id`` in the budget ``period`` (``day`` or ``month``) holding ``now``."""
        return await charged_tokens(self.db, key_id, period, now)

    async def _window_tokens(self, key_id: str, now: float) -> int:
        doc = await self.db[WINDOWS].find_one({"_id": f"{key_id}:{int(now // WINDOW_S)}"})
        return int(doc.get("tokens", 0)) if doc else 0

    async def admit(self, record: KeyRecord, model: str | None = None) -> dict[str, str]:
        """Check ``record``'s limits for one request (for ``model``): the rate-limit headers to send, or a
        403 (model not allowed) or 429 (past the requests- or tokens-per-minute limit, or the token budget
        spent; with ``Retry-After``)."""
        if model is not None and record.limits.models and model not in record.limits.models:
            raise APIError(
                403,
                f"This key may not use the model '{model}'; it may use {', '.join(record.limits.models)}.",
                type="permission_error",
                param="model",
                code="model_not_allowed",
            )
        now = time.time()
        limits = record.limits
        await self.check_budget(record, now)
        headers: dict[str, str] = {}
        if limits.tpm is not None:
            used = await self._window_tokens(record.id, now)
            headers = rate_headers(limits.tpm, used, now, "tokens")
            if used >= limits.tpm:
                headers["Retry-After"] = str(math.ceil(WINDOW_S - now % WINDOW_S))
                raise APIError(
                    429,
                    f"Rate limit reached for tokens: limit {limits.tpm} per minute for this key, used {used}. "
                    f"Try again in {headers['x-ratelimit-reset-tokens']}.",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers=headers,
                )
        if limits.rpm is None:
            return headers
        count = await self.count_request(record.id, now)
        headers.update(rate_headers(limits.rpm, count, now))
        if count > limits.rpm:
            headers["Retry-After"] = str(math.ceil(WINDOW_S - now % WINDOW_S))
            raise APIError(
                429,
                f"Rate limit reached for requests: limit {limits.rpm} per minute for this key. Try again in {headers['x-ratelimit-reset-requests']}.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers=headers,
            )
        return headers

    async def check_budget(self, record: KeyRecord, now: float) -> None:
        """A 429 ``insufficient_quota`` (with ``Retry-After`` until the period renews) when what was charged to
        ``record`` in its budget period (turns and batch lines) has reached its ``budget_tokens``."""
        limits = record.limits
        if limits.budget_tokens is None:
            return
        spent = await self.charged(record.id, limits.budget_period, now)
        if spent >= limits.budget_tokens:
            pid, ends = budget_period(limits.budget_period, now)
            raise APIError(
                429,
                f"You exceeded your current quota: this key's budget of {limits.budget_tokens} tokens for {pid} is spent "
                f"({spent} tokens used); it renews at {datetime.fromtimestamp(ends, UTC).isoformat()}.",
                type="insufficient_quota",
                code="insufficient_quota",
                headers={"Retry-After": str(max(1, math.ceil(ends - now)))},
            )

    async def lease(self, record: KeyRecord, now: float, ttl_s: float) -> str | None:
        """Take one of ``record``'s ``max_parallel`` slots for a request: the lease id to :meth:`release`
        (None without a cap), or a 429 (see the module docstring)."""
        cap = record.limits.max_parallel
        if cap is None:
            return None
        leases = self.db[LEASES]
        await leases.delete_many({"key": record.id, "expires_at": {"$lt": now}})
        running = await leases.count_documents({"key": record.id})
        if running < cap:
            lease_id = f"{record.id}:{uuid.uuid4().hex}"
            await leases.insert_one({"_id": lease_id, "key": record.id, "expires_at": now + ttl_s, "taken_at": now})
            running = await leases.count_documents({"key": record.id, "expires_at": {"$gte": now}})
            if running <= cap:
                return lease_id
            await leases.delete_one({"_id": lease_id})  # lost a race for the last slot
        raise APIError(
            429,
            f"Too many concurrent requests: this key may have {cap} at once and has {min(running, cap)} running. Retry when one ends.",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )

    async def release(self, lease_id: str) -> None:
        """Give a lease back; with the database down it expires instead (logged)."""
        try:
            await self.db[LEASES].delete_one({"_id": lease_id})
        except PyMongoError as exc:
            log.warning("could not release lease %s (it expires on its own): %s", lease_id.split(":")[0], type(exc).__name__)


def key_record(request: Request) -> KeyRecord | None:
    """The request's stored key (set by :class:`edge.auth.RequireAPIKey`); None for a static key or an open edge."""
    record = getattr(request.state, "key_record", None)
    return record if isinstance(record, KeyRecord) else None


def _store(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.key_store
    return store


async def admit_batch(request: Request) -> list[str]:
    """A batch submission by the request's stored key: a 429 when its token budget is spent
    (:meth:`KeyStore.check_budget`); else the models its lines may name (empty: all; nothing for a static key
    or an open edge). A batch is not held to the per-minute limits (OpenAI's batch limits are apart from them)."""
    record = key_record(request)
    if record is None:
        return []
    await _store(request).check_budget(record, time.time())
    return list(record.limits.models)


def tenant_of(request: Request) -> str | None:
    """The tenant of the request's stored key (None for a static key or an open edge)."""
    record = key_record(request)
    return record.tenant if record is not None else None


async def lease_key(request: Request, ttl_s: float) -> str | None:
    """:meth:`KeyStore.lease` for the request's stored key (None for a static key, an open edge, or no cap)."""
    record = key_record(request)
    return None if record is None else await _store(request).lease(record, time.time(), ttl_s)


async def admit_key(request: Request, model: str | None = None) -> dict[str, str]:
    """:meth:`KeyStore.admit` for the request's stored key (nothing for a static key or an open edge)."""
    record = key_record(request)
    return {} if record is None else await _store(request).admit(record, model)
