"""The consume → handle → produce → commit loop shared by the pipeline stages (safety, retrieval, recorder).

Guarantee: **at-least-once**. A message's offset is committed only after every event its handler
produced has been acknowledged by the broker (``acks=all``). A crash between produce and commit
redelivers the message, so handlers must be idempotent on ``event_id`` (downstream stages and the
recorder are).

Poison messages never stop a worker: a message that fails to decode, whose handler raises, or whose
output the broker refuses (e.g. too large) is written to the dead-letter topic (``chat.dlq``) with the
reason (PII masked), and its offset is committed. A dependency that is down is different: the handler
raises :class:`RetryLater` (a retriable broker error counts too) and the record is retried with
back-off, uncommitted — never dropped. A commit that fails because a rebalance moved the partition is
logged; the partition's new owner resumes from the last commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from consumers.gate import DownstreamGate
from consumers.runtime import Companion, ConsumerRuntime
from core import metrics
from core.config import Settings
from producers.bus import Outgoing, is_outage, produce_all
from schemas.events import AnyEvent, DecodeError, decode_object, load_json
from topics.registry import topic

log = logging.getLogger(__name__)


class RetryLater(Exception):
    """A handler's signal that a dependency is down: retry the record later instead of dead-lettering it."""


Handler = Callable[[AnyEvent, ConsumerRecord], Awaitable[Sequence[Outgoing]]]
# a whole fetched batch of one partition at once (decoded, in offset order): e.g. the recorder's bulk writes
BatchHandler = Callable[[Sequence[tuple[AnyEvent, ConsumerRecord]]], Awaitable[Sequence[Outgoing]]]


class StageWorker(ConsumerRuntime):
    """Runs one stage: a consumer group over ``topics``, a handler per decoded event, one record after another.

    Priority: records of ``priority_topics`` (the interactive lane) are fetched first whenever any are
    waiting; other topics (the batch lane) are taken ``low_priority_records`` at a time only when none
    are, so an interactive turn waits behind at most that many batch records in this stage — and only
    while ``low_priority_gate`` (:class:`consumers.gate.DownstreamGate`) says the next stage keeps up.
    """

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
        priority_topics: Sequence[str] = (),
        low_priority_records: int = 2,
        low_priority_gate: DownstreamGate | None = None,
        companions: Sequence[Companion] = (),
        batch_handler: BatchHandler | None = None,
        skip_event_types: Sequence[str] = (),
    ) -> None:
        super().__init__(
            settings,
            name,
            group_id,
            topics,
            producer=producer,
            consumer=consumer,
            companions=list(companions) + ([low_priority_gate] if low_priority_gate is not None else []),
        )
        self.handler = handler
        self.batch_handler = batch_handler
        self.skip_event_types = frozenset(skip_event_types)  # the batch path drops these before validation
        self.max_records = max_records
        self.priority = {topic(t, settings.topic_prefix) for t in priority_topics}
        self.low_priority_records = low_priority_records
        self.gate = low_priority_gate
        self.processed = 0
        self._backoff = 0.0

    async def handle_record(self, record: ConsumerRecord) -> Sequence[Outgoing]:
        """The events to produce for one record; a dead letter when it cannot be processed.

        Raises :class:`RetryLater` (from the handler) to have the record retried after a back-off.
        """
        try:
            event = self.decode_record(record)
        except DecodeError as exc:
            return [self.reject(record, str(exc))]
        lane = self.lane(record)
        started = time.perf_counter()
        try:
            out = await self.handler(event, record)
            metrics.STAGE_SECONDS.labels(self.name, lane).observe(time.perf_counter() - started)
            metrics.STAGE_RECORDS.labels(self.name, lane).inc()
            return out
        except RetryLater:
            raise
        except Exception as exc:  # a handler bug or a bad event must not stop the stage
            log.exception("%s: handler failed on %s[%d]@%d", self.name, record.topic, record.partition, record.offset)
            return [self.reject(record, f"{type(exc).__name__}: {exc}", getattr(event, "correlation_id", None))]

    async def consume(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await self._fetch()
            for tp, records in batches.items():
                await self._process_partition(tp, records)

    async def _fetch(self) -> dict[TopicPartition, list[ConsumerRecord]]:
        if not self.priority:  # one lane
            return await self.fetch_lanes(self.topics, self.max_records, 0)
        low_room = self.low_priority_records if self.gate is None or self.gate.open else 0  # a closed gate holds the batch lane
        return await self.fetch_lanes(self.priority, self.max_records, low_room)

    async def _process_partition(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        if self.batch_handler is not None and len(records) > 1:
            try:
                if await self._process_batch(tp, records):
                    return
            except RetryLater as exc:
                await self._retry_later(tp, records[0].offset, exc)
                return
        next_offset: int | None = None  # the offset after the last record fully handled: what to commit
        try:
            for record in records:
                if tp not in self.consumer.assignment():
                    return  # revoked mid-batch: the partition's new owner takes it from the last commit
                await self._deliver(record, await self.handle_record(record))
                next_offset = record.offset + 1
                self.processed += 1
            self._backoff = 0.0
        except RetryLater as exc:
            # infrastructure trouble (database, broker): keep the record and retry it, never drop it
            await self._retry_later(tp, records[0].offset if next_offset is None else next_offset, exc)
        finally:
            if next_offset is not None:
                await self.commit(tp, next_offset)

    async def _retry_later(self, tp: TopicPartition, offset: int, exc: RetryLater) -> None:
        """Back off (doubling, 0.5 s to 10 s) and fetch ``tp`` again from ``offset``, uncommitted."""
        self._backoff = min(max(self._backoff * 2, 0.5), 10.0)
        log.warning("%s: %s; retrying %s[%d] in %.1fs", self.name, exc, tp.topic, tp.partition, self._backoff)
        self.consumer.seek(tp, offset)
        await asyncio.sleep(self._backoff)

    async def _process_batch(self, tp: TopicPartition, records: list[ConsumerRecord]) -> bool:
        """The whole batch through ``batch_handler``, then one commit. False (nothing written, nothing
        committed) if the handler failed otherwise than :class:`RetryLater`: the records then go one by one
        through :meth:`handle_record`, so only a poison record is dead-lettered."""
        assert self.batch_handler is not None
        if tp not in self.consumer.assignment():
            return True
        decoded: list[tuple[AnyEvent, ConsumerRecord]] = []
        rejected: list[Outgoing] = []
        for record in records:
            try:
                data = load_json(record.value)
                if isinstance(data, dict) and data.get("event_type") in self.skip_event_types:
                    continue  # e.g. the recorder's token events: one JSON parse, no model validation
                decoded.append((decode_object(data), record))
            except DecodeError as exc:
                rejected.append(self.reject(record, str(exc)))
        started = time.perf_counter()
        try:
            out = await self.batch_handler(decoded)
        except RetryLater:
            raise
        except Exception:
            log.exception(
                "%s: batch handler failed on %s[%d]@%d..%d; one by one instead", self.name, tp.topic, tp.partition, records[0].offset, records[-1].offset
            )
            return False
        lane = self.lane(records[0])
        metrics.STAGE_SECONDS.labels(self.name, lane).observe((time.perf_counter() - started) / max(1, len(decoded)))
        metrics.STAGE_RECORDS.labels(self.name, lane).inc(len(decoded))
        await self._deliver(records[-1], [*rejected, *out])
        self.processed += len(records)
        self._backoff = 0.0
        await self.commit(tp, records[-1].offset + 1)
        return True

    async def _deliver(self, record: ConsumerRecord, outgoing: Sequence[Outgoing]) -> None:
        """Produce a record's output and wait for the acks; an output the broker refuses is dead-lettered."""
        try:
            await produce_all(self.producer, outgoing)
        except KafkaError as exc:
            if is_outage(exc):
                raise RetryLater(f"produce failed: {type(exc).__name__}") from exc
            log.error("%s: output of %s[%d]@%d refused: %s", self.name, record.topic, record.partition, record.offset, exc)
            await produce_all(self.producer, [self.reject(record, f"output refused by the broker: {type(exc).__name__}: {exc}")])
