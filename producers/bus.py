"""What every writer into the bus shares: the :class:`Outgoing` event, producing a set of them with
their acknowledgements awaited, and the dead letter (``chat.dlq``) that replaces a message a worker
cannot process.

The dead letter keeps where the message came from (topic, partition, offset, key), the worker and the
reason; its value is PII-masked (:func:`core.pii.mask_pii`) and cut at 100 000 characters, since the DLQ
is retained for 14 days.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError, KafkaTimeoutError

from core import metrics
from core.config import Settings
from core.pii import mask_pii
from schemas.events import DeadLetter
from topics.registry import CHAT_DLQ, topic


@dataclass(frozen=True)
class Outgoing:
    """One event to produce: to a topic, keyed by conversation id, optionally to a fixed partition."""

    topic: str
    value: bytes | None  # None: a tombstone (compacted topics)
    key: bytes | None = None
    partition: int | None = None


def dead_letter(settings: Settings, record: ConsumerRecord, worker: str, reason: str, correlation_id: str | None = None) -> Outgoing:
    raw = record.value or b""
    letter = DeadLetter(
        correlation_id=correlation_id,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key.decode("utf-8", "replace") if record.key else None,
        value=mask_pii(raw[:100_000].decode("utf-8", "replace"))[0],  # the DLQ keeps 14 days: no raw PII
        worker=worker,
        reason=reason[:2_000],
    )
    metrics.DEAD_LETTERS.labels(worker).inc()
    return Outgoing(topic(CHAT_DLQ, settings.topic_prefix), letter.to_bytes(), key=record.key)


async def produce_all(producer: AIOKafkaProducer, outgoing: Sequence[Outgoing]) -> None:
    """Send every event, then wait for every acknowledgement (order per partition is kept)."""
    futures = [await producer.send(o.topic, o.value, key=o.key, partition=o.partition) for o in outgoing]
    if futures:
        await asyncio.gather(*futures)


def is_outage(exc: BaseException) -> bool:
    """Whether a failed send means the broker is unreachable or failing over (retry it later) rather than
    that it refused the message (dead-letter it). aiokafka marks ``KafkaTimeoutError`` — a batch that
    expired unacknowledged after ``request_timeout_ms``, what a broker outage looks like — not retriable;
    here it is an outage like the errors aiokafka does mark retriable."""
    return isinstance(exc, KafkaTimeoutError) or (isinstance(exc, KafkaError) and exc.retriable)
