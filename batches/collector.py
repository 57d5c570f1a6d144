"""The ``batches`` worker: materialises the batch topics into the batch store (MongoDB API).

Consumer group ``chatbus-batches`` on ``batch.jobs`` (created / cancelled), ``batch.results`` (each
line's completion) and ``chat.dlq`` (batch lines a stage dead-lettered: failed, so the batch still
finishes). A line's document is written once, with its result — two writes per line would halve what
the store keeps up with (FerretDB: ~10–20 writes/s on the 2-core machine). Batches touched by events are checked for
completion every ``FINALIZE_EVERY_S`` from the counters kept with each batch (not by counting lines per
result, which would make a batch of n lines cost O(n²) in the database). An open batch with no event for
``RECONCILE_IDLE_S`` (and every open batch at start) is recounted exactly, so a counter left short by a
crash cannot keep a batch open for ever. At-least-once with idempotent upserts (:mod:`batches.store`); a database outage
is retried, never dropped (:class:`consumers.stage.RetryLater`).

Budgets: a line's tokens are charged to its batch's stored key (:mod:`core.quotas`, the day's and month's
budgets, not tokens per minute) when its completion is first stored, so a redelivered result is not charged
twice.

Rebuild: the store is a view of the topics. ``chatbus batch rebuild`` (:mod:`batches.rebuild`) replays
every batch still within the topics' retention through :meth:`BatchCollector.apply`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiokafka import ConsumerRecord
from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure, PyMongoError

from batches.store import OPEN, BatchStore, parse_request_id
from consumers.stage import RetryLater, StageWorker
from core.config import Settings
from core.quotas import charge_tokens
from producers.bus import Outgoing
from schemas.events import AnyEvent, BatchCancelled, BatchCreated, DeadLetter, TurnCompleted
from topics.registry import BATCH_LANE, BATCH_RESULTS, BATCHES, CHAT_DLQ, topic

log = logging.getLogger(__name__)

FINALIZE_EVERY_S = 0.5
RECONCILE_IDLE_S = 10.0
VALIDATING_STALE_S = 600.0
OWNERS_KEPT = 4096  # batch owners looked up and kept (then forgotten all at once)


class BatchCollector:
    def __init__(self, settings: Settings, store: BatchStore, *, charging: bool = True) -> None:
        self.settings = settings
        self.store = store
        self.charging = charging  # charge completed lines to their key's budget (not when rebuilding: charged once already)
        self.batch_topics = {topic(t, settings.topic_prefix) for t in (*BATCH_LANE.values(), BATCH_RESULTS)}
        self.dirty: set[str] = set()  # batches with new events since their last completion check
        self.last_event: dict[str, float] = {}  # batch id -> monotonic time of its latest event
        self.owners: dict[str, str | None] = {}  # batch id -> the stored key its lines are charged to (None: no budget)

    async def handle(self, event: AnyEvent, record: ConsumerRecord) -> Sequence[Outgoing]:
        batch_id = self.batch_of(event)
        if batch_id is None:
            return []
        self.last_event[batch_id] = time.monotonic()  # before the write: a recount racing it must not look idle
        try:
            await self.apply(event)
        except ConnectionFailure as exc:  # the database is away: retry, never drop (other errors are dead-lettered)
            raise RetryLater(f"database unavailable: {type(exc).__name__}") from exc
        self.dirty.add(batch_id)
        self.last_event[batch_id] = time.monotonic()
        return []

    async def finalize_dirty(self) -> None:
        """Finalise the touched batches whose lines all have a result."""
        while self.dirty:
            batch_id = self.dirty.pop()
            try:
                status = await self.store.maybe_finalize(batch_id)
            except PyMongoError:
                self.dirty.add(batch_id)
                raise
            if status is not None:
                log.info("batch %s %s", batch_id, status)

    async def reconcile_idle(self) -> None:
        """Recount open batches without recent events, end stale ones, then finalise those that are done.

        Stale: past ``expires_at`` (→ ``expired``), or left ``validating`` for ``VALIDATING_STALE_S`` by a
        submission that died while publishing (→ ``failed``; re-submitting with the batch key resumes it).
        """
        now = time.monotonic()
        wall = time.time()
        async for doc in self.store.batches.find({"status": {"$in": list(OPEN)}}):
            batch_id = doc["_id"]
            if doc["status"] == "validating":
                if wall - doc["created_at"] > VALIDATING_STALE_S:
                    await self.store.set_status(
                        batch_id,
                        "failed",
                        only_from=("validating",),
                        errors=[{"code": "submission_interrupted", "message": "the submission stopped before every line was published"}],
                    )
                continue
            if wall > doc.get("expires_at", wall + 1):
                await self.store.expire(batch_id)
                continue
            if now - self.last_event.get(batch_id, 0.0) >= RECONCILE_IDLE_S:
                await self.store.reconcile(batch_id)
                self.last_event[batch_id] = now
                self.dirty.add(batch_id)
        await self.finalize_dirty()

    async def finalizer(self, stop: asyncio.Event) -> None:
        next_reconcile = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_reconcile:
                    await self.reconcile_idle()
                    next_reconcile = time.monotonic() + RECONCILE_IDLE_S
                await self.finalize_dirty()
            except PyMongoError as exc:
                log.warning("batches: finalising failed (%s); retrying", type(exc).__name__)
            await asyncio.sleep(FINALIZE_EVERY_S)

    async def charge(self, batch_id: str, tokens: int) -> None:
        """Charge a line's tokens to its batch's stored key's budget (:func:`core.quotas.charge_tokens`; not
        to its tokens per minute). Once per line: only when the line first completes. A crash between the
        line's write and its charge leaves those tokens uncharged (the README's error bound)."""
        if batch_id not in self.owners:
            if len(self.owners) >= OWNERS_KEPT:
                self.owners.clear()
            self.owners[batch_id] = await self.store.budgeted_owner(batch_id)
        owner = self.owners[batch_id]
        if owner is not None:
            await charge_tokens(self.store.db, owner, tokens, time.time(), per_minute=False)

    def batch_of(self, event: AnyEvent) -> str | None:
        """The batch an event is about (None: not an event for the batch store)."""
        if isinstance(event, BatchCreated | BatchCancelled):
            return event.batch_id
        if isinstance(event, TurnCompleted):
            return event.batch.batch_id if event.batch is not None else None
        if isinstance(event, DeadLetter) and event.source_topic in self.batch_topics:
            parsed = parse_request_id(_line_id(event))
            return parsed[0] if parsed is not None else None
        return None

    async def apply(self, event: AnyEvent) -> str | None:
        """Record one event; returns the batch it touched (None: not a batch event)."""
        batch_id = self.batch_of(event)
        if batch_id is None:
            return None
        if isinstance(event, BatchCreated):
            valid = event.valid if event.valid is not None else event.total - len(event.invalid)
            await self.store.create_batch(event, "in_progress" if valid > 0 else "failed")
        elif isinstance(event, BatchCancelled):
            await self.store.set_status(batch_id, "cancelling", only_from=("validating", "in_progress"))
        elif isinstance(event, TurnCompleted):
            if await self.store.record_result(event) and self.charging and event.usage.total_tokens:
                await self.charge(batch_id, event.usage.total_tokens)
        elif isinstance(event, DeadLetter):
            reason = f"the {event.worker} stage could not process this request"
            await self.store.record_failure(_line_id(event), _custom_id(event.value), "dead_lettered", reason)
        return batch_id


def _line_id(letter: DeadLetter) -> str:
    """The batch line a dead letter is about: an undecodable or refused record has no correlation id,
    but on the batch lane its key is the line's id."""
    return letter.correlation_id or letter.key or ""


def _custom_id(value: str) -> str | None:
    """The ``custom_id`` of a dead-lettered batch event (its original JSON is the letter's ``value``)."""
    try:
        obj = orjson.loads(value)
        ref = obj.get("batch") or (obj.get("request") or {}).get("batch") or {}
        custom_id = ref.get("custom_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return custom_id if isinstance(custom_id, str) else None


class _Worker(StageWorker):
    async def handle_record(self, record: ConsumerRecord) -> Sequence[Outgoing]:
        if record.topic == topic(CHAT_DLQ, self.settings.topic_prefix):
            outgoing = await super().handle_record(record)
            # never dead-letter a dead letter (that would loop): an unreadable one is only logged
            return [o for o in outgoing if o.topic != record.topic]
        return await super().handle_record(record)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        store = BatchStore(client[settings.mongo_db])
        for attempt in range(30):
            try:
                await store.ensure_indexes()
                break
            except PyMongoError as exc:
                log.warning("batches: database not ready (%s); retrying", type(exc).__name__)
                await asyncio.sleep(min(1 + attempt, 5))
        collector = BatchCollector(settings, store)
        async with asyncio.TaskGroup() as group:
            group.create_task(collector.finalizer(stop))
            group.create_task(_Worker(settings, "batches", BATCHES.group_id, BATCHES.topics, collector.handle).run(stop))
    finally:
        await client.close()
