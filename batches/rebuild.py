"""Rebuild the batch store from the topics (``chatbus batch rebuild``), e.g. after the database was lost.

Reads ``batch.jobs``, ``batch.results`` and ``chat.dlq`` from the earliest retained
offset to their current end, without a consumer group (the running ``batches`` worker is not disturbed),
and applies every event with the collector's idempotent upserts, then finalises finished batches. What
the topics no longer retain cannot come back; uploaded input files live only in the database.
"""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient

from batches.collector import BatchCollector
from batches.store import BatchStore
from core.config import Settings
from schemas.events import DecodeError, decode
from topics.ops import read_records
from topics.registry import BATCH_JOBS, BATCH_RESULTS, CHAT_DLQ, topic


async def rebuild(settings: Settings) -> int:
    """Replay the batch topics into the store; returns the number of events applied."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri, serverSelectionTimeoutMS=10_000)
    try:
        store = BatchStore(client[settings.mongo_db])
        await store.ensure_indexes()
        collector = BatchCollector(settings, store, charging=False)  # the lines were charged when first collected
        applied = 0
        for name in (BATCH_JOBS, BATCH_RESULTS, CHAT_DLQ):  # batches before their lines
            for record in await read_records(settings, topic(name, settings.topic_prefix), timeout_s=60):
                try:
                    event = decode(record.value)
                except DecodeError:
                    continue
                batch_id = await collector.apply(event)
                if batch_id is not None:
                    collector.dirty.add(batch_id)
                    applied += 1
        for batch_id in list(collector.dirty):
            await store.reconcile(batch_id)
        await collector.finalize_dirty()
        return applied
    finally:
        await client.close()
