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
from schemas.events import AnyEvent, BatchCancelled, CancelTurn, ChatTurnRequest, DecodeError, decode
from topics.clients import make_consumer, partitions_of, records_forever
from topics.registry import BATCH_JOBS, CHAT_CONTROL, topic

log = logging.getLogger(__name__)


class _TopicTail(BackgroundService):
    """Every partition of one topic without a consumer group, from its beginning or its end; each record
    that decodes goes to :meth:`handle`, one that does not to :meth:`undecodable`."""

    def __init__(self, settings: Settings, name: str, *, from_beginning: bool) -> None:
        super().__init__()
        self.settings = settings
        self.topic = topic(name, settings.topic_prefix)
        self.from_beginning = from_beginning
        self._consumer: AIOKafkaConsumer | None = None

    async def on_start(self) -> None:
        reset = "earliest" if self.from_beginning else "latest"
        self._consumer = consumer = make_consumer(self.settings, group_id=None, auto_offset_reset=reset)
        await consumer.start()
        consumer.assign(await partitions_of(consumer, self.topic))
        await (consumer.seek_to_beginning() if self.from_beginning else consumer.seek_to_end())

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def loop(self) -> None:
        assert self._consumer is not None, "started"
        async for record in records_forever(self._consumer, self.task_name):
            try:
                event = decode(record.value)
            except DecodeError as exc:
                self.undecodable(record.offset, exc)
                continue
            self.handle(event)

    def handle(self, event: AnyEvent) -> None:
        raise NotImplementedError

    def undecodable(self, offset: int, exc: DecodeError) -> None:
        """A record that does not decode (its stage dead-letters it; a tail only skips it)."""


class CancelledBatches(_TopicTail):
    """The set of cancelled batch ids, kept current by a background task (``start``/``stop``)."""

    task_name = "batch-cancels"

    def __init__(self, settings: Settings, on_cancel: Callable[[str], None] | None = None) -> None:
        super().__init__(settings, BATCH_JOBS, from_beginning=True)
        self.ids: set[str] = set()
        self.on_cancel = on_cancel

    def __contains__(self, request: object) -> bool:
        return isinstance(request, ChatTurnRequest) and request.batch is not None and request.batch.batch_id in self.ids

    def handle(self, event: AnyEvent) -> None:
        if isinstance(event, BatchCancelled) and event.batch_id not in self.ids:
            log.info("batch %s cancelled", event.batch_id)
            self.ids.add(event.batch_id)
            if self.on_cancel is not None:
                self.on_cancel(event.batch_id)


class ControlTail(_TopicTail):
    """Every :class:`~schemas.events.CancelTurn` on ``chat.control`` from now on, handed to ``on_cancel``
    (correlation id, reason). No consumer group: each worker reads all partitions, from the end."""

    task_name = "control"

    def __init__(self, settings: Settings, on_cancel: Callable[[str, str], object]) -> None:
        super().__init__(settings, CHAT_CONTROL, from_beginning=False)
        self.on_cancel = on_cancel

    def handle(self, event: AnyEvent) -> None:
        if isinstance(event, CancelTurn):
            self.on_cancel(event.correlation_id, event.reason)

    def undecodable(self, offset: int, exc: DecodeError) -> None:
        log.warning("ignoring undecodable control message at %d: %s", offset, exc)
