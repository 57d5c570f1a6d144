"""The consume → handle → produce → commit loop shared by the pipeline stages (safety, retrieval, recorder).

Guarantee: **at-least-once**. A message's offset is committed only after every event its handler
produced has been acknowledged by the broker (``acks=all``). A crash between produce and commit
redelivers the message, so handlers must be idempotent on ``event_id`` (downstream stages and the
recorder are).

Poison messages never stop a worker: a message that fails to decode, or whose handler raises, is
written to the dead-letter topic (``chat.dlq``) with the reason, and its offset is committed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from chatbus.config import Settings
from schemas.events import AnyEvent, DeadLetter, DecodeError, decode
from topics.clients import make_consumer, make_producer
from topics.registry import CHAT_DLQ, topic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    """One event to produce: to a topic, keyed by conversation id, optionally to a fixed partition."""

    topic: str
    value: bytes
    key: bytes | None = None
    partition: int | None = None


Handler = Callable[[AnyEvent, ConsumerRecord], Awaitable[Sequence[Outgoing]]]


def dead_letter(settings: Settings, record: ConsumerRecord, worker: str, reason: str, correlation_id: str | None = None) -> Outgoing:
    raw = record.value or b""
    letter = DeadLetter(
        correlation_id=correlation_id,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key.decode("utf-8", "replace") if record.key else None,
        value=raw.decode("utf-8", "replace")[:100_000],
        worker=worker,
        reason=reason[:2_000],
    )
    return Outgoing(topic(CHAT_DLQ, settings.topic_prefix), letter.to_bytes(), key=record.key)


async def produce_all(producer: AIOKafkaProducer, outgoing: Sequence[Outgoing]) -> None:
    """Send every event, then wait for every acknowledgement (order per partition is kept)."""
    futures = [await producer.send(o.topic, o.value, key=o.key, partition=o.partition) for o in outgoing]
    if futures:
        await asyncio.gather(*futures)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass


class StageWorker:
    """Runs one stage: a consumer group over ``topics``, a handler per decoded event."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        group_id: str,
        topics: Sequence[str],
        handler: Handler,
        *,
        producer: AIOKafkaProducer | None = None,
        consumer: AIOKafkaConsumer | None = None,
        max_records: int = 64,
    ) -> None:
        self.settings = settings
        self.name = name
        self.group_id = group_id
        self.topics = [topic(t, settings.topic_prefix) for t in topics]
        self.handler = handler
        self.producer = producer or make_producer(settings)
        self.consumer = consumer or make_consumer(settings, *self.topics, group_id=group_id)
        self.max_records = max_records
        self.processed = 0
        self.dead_lettered = 0

    async def handle_record(self, record: ConsumerRecord) -> Sequence[Outgoing]:
        try:
            event = decode(record.value)
        except DecodeError as exc:
            log.warning("%s: dead-lettering %s[%d]@%d: %s", self.name, record.topic, record.partition, record.offset, exc)
            self.dead_lettered += 1
            return [dead_letter(self.settings, record, self.name, str(exc))]
        try:
            return await self.handler(event, record)
        except Exception as exc:  # a handler bug or a bad event must not stop the stage
            log.exception("%s: handler failed on %s[%d]@%d", self.name, record.topic, record.partition, record.offset)
            self.dead_lettered += 1
            cid = getattr(event, "correlation_id", None)
            return [dead_letter(self.settings, record, self.name, f"{type(exc).__name__}: {exc}", cid)]

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        await self.producer.start()
        try:
            await self.consumer.start()
            try:
                log.info("%s: consuming %s as group %s", self.name, ",".join(self.topics), self.group_id)
                while not stop.is_set():
                    batches = await self.consumer.getmany(timeout_ms=200, max_records=self.max_records)
                    for tp, records in batches.items():
                        await self._process_partition(tp, records)
            finally:
                await self.consumer.stop()
        finally:
            await self.producer.stop()

    async def _process_partition(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        outgoing: list[Outgoing] = []
        for record in records:
            outgoing.extend(await self.handle_record(record))
        await produce_all(self.producer, outgoing)
        await self.consumer.commit({tp: records[-1].offset + 1})
        self.processed += len(records)


def run_forever(coro_factory: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a worker until SIGTERM/SIGINT (used by ``chatbus worker …``)."""

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await coro_factory(stop)

    asyncio.run(main())
