"""Cancels as the stages see them: tails of ``batch.jobs`` and ``chat.control`` kept by pipeline workers.

:class:`CancelledBatches` — batch cancels: ``batch.jobs`` is read from the beginning without a consumer group (it is small: one or two events per
batch), so a worker that starts after a cancel still knows the batch is cancelled. Stages finish a
cancelled batch's remaining lines at once with ``finish_reason="cancelled"`` instead of working on them.

:class:`ControlTail` — turn cancels (``chat.control``), read by every inference worker from the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer

from core.background import BackgroundService
from core.config import Settings
from schemas.events import BatchCancelled, CancelTurn, ChatTurnRequest, DecodeError, decode
from topics.clients import make_consumer, partitions_of, records_forever
from topics.registry import BATCH_JOBS, CHAT_CONTROL, topic

log = logging.getLogger(__name__)


class CancelledBatches(BackgroundService):
    """The set of cancelled batch ids, kept current by a background task (``start``/``stop``)."""

    task_name = "batch-cancels"

    def __init__(self, settings: Settings, on_cancel: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.ids: set[str] = set()
        self.on_cancel = on_cancel
        self._consumer: AIOKafkaConsumer | None = None

    def __contains__(self, request: object) -> bool:
        return isinstance(request, ChatTurnRequest) and request.batch is not None and request.batch.batch_id in self.ids

    async def on_start(self) -> None:
        self._consumer = make_consumer(self.settings, group_id=None, auto_offset_reset="earliest")
        await self._consumer.start()
        self._consumer.assign(await partitions_of(self._consumer, topic(BATCH_JOBS, self.settings.topic_prefix)))
        await self._consumer.seek_to_beginning()

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def loop(self) -> None:
        assert self._consumer is not None
        async for record in records_forever(self._consumer, "batch-cancels"):
            try:
                event = decode(record.value)
            except DecodeError:
                continue  # the batch store dead-letters it; here it only cannot be a cancel
            if isinstance(event, BatchCancelled) and event.batch_id not in self.ids:
                log.info("batch %s cancelled", event.batch_id)
                self.ids.add(event.batch_id)
                if self.on_cancel is not None:
                    self.on_cancel(event.batch_id)


class ControlTail(BackgroundService):
    """Every :class:`~schemas.events.CancelTurn` on ``chat.control`` from now on, handed to ``on_cancel``
    (correlation id, reason). No consumer group: each worker reads all partitions, from the end."""

    task_name = "control"

    def __init__(self, settings: Settings, on_cancel: Callable[[str, str], object]) -> None:
        super().__init__()
        self.settings = settings
        self.on_cancel = on_cancel
        self.consumer: AIOKafkaConsumer = make_consumer(settings, group_id=None, auto_offset_reset="latest")

    async def on_start(self) -> None:
        await self.consumer.start()
        self.consumer.assign(await partitions_of(self.consumer, topic(CHAT_CONTROL, self.settings.topic_prefix)))
        await self.consumer.seek_to_end()

    async def on_stop(self) -> None:
        await self.consumer.stop()

    async def loop(self) -> None:
        async for record in records_forever(self.consumer, "control"):
            try:
                event = decode(record.value)
            except DecodeError as exc:
                log.warning("ignoring undecodable control message at %d: %s", record.offset, exc)
                continue
            if isinstance(event, CancelTurn):
                self.on_cancel(event.correlation_id, event.reason)
