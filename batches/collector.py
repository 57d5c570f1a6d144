"""The ``batches`` worker: materialises the batch topics into the batch store (MongoDB API).

Consumer group ``chatbus-batches`` on ``batch.jobs`` (created / cancelled), ``batch.requests`` (one
pending document per line), ``batch.results`` (each line's completion) and ``chat.dlq`` (batch lines a
stage dead-lettered: failed, so the batch still finishes). After each event the batch is finalised if
every line has a result. At-least-once with idempotent upserts (:mod:`batches.store`); a database outage
is retried, never dropped (:class:`consumers.stage.RetryLater`).

Rebuild: the store is a view of the topics. ``chatbus batch rebuild`` resets this group to the earliest
offsets; the worker then replays every batch still within the topics' retention.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import ConsumerRecord
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from batches.store import BatchStore, parse_request_id
from chatbus.config import Settings
from consumers.stage import Outgoing, RetryLater, StageWorker
from schemas.events import AnyEvent, BatchCancelled, BatchCreated, ChatTurnRequest, DeadLetter, TurnCompleted
from topics.registry import BATCH_LANE, BATCH_RESULTS, BATCHES, CHAT_DLQ, topic

log = logging.getLogger(__name__)


class BatchCollector:
    def __init__(self, settings: Settings, store: BatchStore) -> None:
        self.settings = settings
        self.store = store
        self.batch_topics = {topic(t, settings.topic_prefix) for t in (*BATCH_LANE.values(), BATCH_RESULTS)}

    async def handle(self, event: AnyEvent, record: ConsumerRecord) -> Sequence[Outgoing]:
        try:
            batch_id = await self.apply(event)
            if batch_id is not None:
                status = await self.store.maybe_finalize(batch_id)
                if status is not None:
                    log.info("batch %s %s", batch_id, status)
        except PyMongoError as exc:
            raise RetryLater(f"database unavailable: {type(exc).__name__}") from exc
        return []

    async def apply(self, event: AnyEvent) -> str | None:
        """Record one event; returns the batch it touched (None: not a batch event)."""
        if isinstance(event, BatchCreated):
            await self.store.create_batch(event, "in_progress" if event.total > len(event.invalid) else "failed")
            return event.batch_id
        if isinstance(event, BatchCancelled):
            await self.store.set_status(event.batch_id, "cancelling", only_from=("validating", "in_progress"))
            return event.batch_id
        if isinstance(event, ChatTurnRequest) and event.batch is not None:
            await self.store.record_request(event.batch.batch_id, event.batch.line, event.batch.custom_id)
            return event.batch.batch_id
        if isinstance(event, TurnCompleted) and event.batch is not None:
            await self.store.record_result(event)
            return event.batch.batch_id
        if isinstance(event, DeadLetter) and event.source_topic in self.batch_topics and event.correlation_id:
            parsed = parse_request_id(event.correlation_id)
            if parsed is not None:
                await self.store.record_failure(event.correlation_id, "dead_lettered", f"the {event.worker} stage could not process this request")
                return parsed[0]
        return None


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
        await _Worker(settings, "batches", BATCHES.group_id, BATCHES.topics, collector.handle).run(stop)
    finally:
        await client.close()
