"""Whether a resume id names a turn that exists, answered before a resumed stream opens.

A resume (``GET /v1/chat/completions/{id}/events`` with ``Last-Event-ID``) names a turn, its reply
partition and ``since_ms`` (:func:`edge.relay.sse_event_id`: a second before the turn was published). A
well-formed id for a turn that never existed would otherwise hold a stream and a Kafka consumer until
``turn_timeout_s``; :class:`TurnFinder` answers at once instead: a turn this edge published or relayed is
known; any other must be on ``chat.requests`` within ``[since_ms, since_ms + FIND_WINDOW_MS]`` — a
bounded read (offsets by time, then records up to the window's end, ~1 round trip per partition)
through one consumer per edge, one lookup at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.config import Settings
from topics.clients import make_consumer, partitions_of
from topics.registry import CHAT_REQUESTS, topic

log = logging.getLogger(__name__)

FIND_WINDOW_MS = 1_000 + 30_000  # the second before publishing, plus a slow publish and clock skew between edges
FIND_TIMEOUT_S = 5.0


class TurnFinder:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = topic(CHAT_REQUESTS, settings.topic_prefix)
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self._lock = asyncio.Lock()

    async def _ready(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = make_consumer(self.settings, group_id=None, fetch_max_wait_ms=5)
            await consumer.start()
            try:
                self._tps = await partitions_of(consumer, self.topic)
            except BaseException:
                await consumer.stop()
                raise
            consumer.assign(self._tps)
            self._consumer = consumer
        return self._consumer

    async def published(self, correlation_id: str, since_ms: int) -> tuple[bool, str | None]:
        """``(found, owner)``: whether ``chat.requests`` holds the turn in the window after ``since_ms``, and
        its ``owner`` (the API key identity). Raises ``TimeoutError`` (or a Kafka error) if the broker does
        not answer within ``FIND_TIMEOUT_S``."""
        needle = correlation_id.encode()
        async with self._lock, asyncio.timeout(FIND_TIMEOUT_S):
            consumer = await self._ready()
            starts = await consumer.offsets_for_times({tp: since_ms for tp in self._tps})
            ends = await consumer.end_offsets(self._tps)
            active: set[TopicPartition] = set()
            for tp in self._tps:
                found = starts.get(tp)
                if found is not None and found.offset < ends[tp]:
                    consumer.seek(tp, found.offset)
                    active.add(tp)
            window_end = since_ms + FIND_WINDOW_MS
            while active:
                batches = await consumer.getmany(*active, timeout_ms=200, max_records=500)
                for tp, records in batches.items():
                    for r in records:
                        if r.timestamp > window_end:
                            active.discard(tp)
                            break
                        if r.value and needle in r.value:
                            data = _json(r.value)
                            if data.get("correlation_id") == correlation_id:
                                owner = data.get("owner")
                                return True, owner if isinstance(owner, str) else None
                    if records and records[-1].offset + 1 >= ends[tp]:
                        active.discard(tp)
            return False, None

    async def stop(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None


def _json(value: bytes) -> dict[str, object]:
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
