"""Batch cancels as the stages see them: a tail of ``batch.jobs`` kept by every pipeline worker.

``batch.jobs`` is read from the beginning without a consumer group (it is small: one or two events per
batch), so a worker that starts after a cancel still knows the batch is cancelled. Stages finish a
cancelled batch's remaining lines at once with ``finish_reason="cancelled"`` instead of working on them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer

from core.config import Settings
from schemas.events import BatchCancelled, ChatTurnRequest, DecodeError, decode
from topics.clients import make_consumer, partitions_of, records_forever
from topics.registry import BATCH_JOBS, topic

log = logging.getLogger(__name__)


class CancelledBatches:
    """The set of cancelled batch ids, kept current by a background task (``start``/``stop``)."""

    def __init__(self, settings: Settings, on_cancel: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.ids: set[str] = set()
        self.on_cancel = on_cancel
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    def __contains__(self, request: object) -> bool:
        return isinstance(request, ChatTurnRequest) and request.batch is not None and request.batch.batch_id in self.ids

    async def start(self) -> None:
        self._consumer = make_consumer(self.settings, group_id=None, auto_offset_reset="earliest")
        await self._consumer.start()
        self._consumer.assign(await partitions_of(self._consumer, topic(BATCH_JOBS, self.settings.topic_prefix)))
        await self._consumer.seek_to_beginning()
        self._task = asyncio.create_task(self._loop(self._consumer), name="batch-cancels")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        async for record in records_forever(consumer, "batch-cancels"):
            try:
                event = decode(record.value)
            except DecodeError:
                continue  # the batch store dead-letters it; here it only cannot be a cancel
            if isinstance(event, BatchCancelled) and event.batch_id not in self.ids:
                log.info("batch %s cancelled", event.batch_id)
                self.ids.add(event.batch_id)
                if self.on_cancel is not None:
                    self.on_cancel(event.batch_id)
