"""Cancels as the stages see them: tails of ``batch.jobs`` and ``chat.control`` kept by pipeline workers.

:class:`CancelledBatches` — batch cancels: ``batch.jobs`` is read from the beginning without a consumer group (it is small: one or two events per
batch), so a worker that starts after a cancel still knows the batch is cancelled. Stages finish a
cancelled batch's remaining lines at once with ``finish_reason="cancelled"`` instead of working on them.

:class:`ControlTail` — turn cancels and edge heartbeats (``chat.control``), read by every inference worker
from ``CANCEL_MEMORY_S`` ago: a worker started after a cancel (none was running, or it restarted) still
knows it, and it knows which edges were alive and when they last beat (:class:`EdgeLiveness`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from core.background import BackgroundService
from core.config import Settings
from schemas.events import AnyEvent, BatchCancelled, CancelTurn, ChatTurnRequest, DecodeError, EdgeHeartbeat, decode
from topics.clients import make_consumer, partitions_of
from topics.registry import BATCH_JOBS, CHAT_CONTROL, topic

log = logging.getLogger(__name__)


TOPIC_WAIT_S = 60.0  # a worker starting with the stack waits this long for its topics' metadata (three loaded brokers took over 10 s)


class _TopicTail(BackgroundService):
    """Every partition of one topic without a consumer group, from its beginning or its end; each record
    that decodes goes to :meth:`handle`, one that does not to :meth:`undecodable`.

    :meth:`start` returns once the tail has read what the topic held when it started (every partition's
    position at its end offset of that moment), so a worker that consumes turns only after its companions
    started never takes a turn whose cancel is already on the topic but not yet read. It waits at most
    ``catch_up_s`` (then logs a warning and goes on: a slow tail must not keep a worker from starting)."""

    catch_up_s = 30.0

    def __init__(self, settings: Settings, name: str, *, from_beginning: bool, since_s: float | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.topic = topic(name, settings.topic_prefix)
        self.from_beginning = from_beginning
        self.since_s = since_s  # start this many seconds back (records by timestamp) instead of at the end
        self._consumer: AIOKafkaConsumer | None = None
        self._behind: dict[TopicPartition, int] = {}  # partition -> its end offset at start, until read up to it
        self.caught_up = asyncio.Event()

    async def on_start(self) -> None:
        reset = "earliest" if self.from_beginning else "latest"
        self._consumer = consumer = make_consumer(self.settings, group_id=None, auto_offset_reset=reset)
        await consumer.start()
        tps = await partitions_of(consumer, self.topic, timeout_s=TOPIC_WAIT_S)
        consumer.assign(tps)
        if self.from_beginning:
            await consumer.seek_to_beginning()
        elif self.since_s is None:
            await consumer.seek_to_end()
        else:
            since_ms = int((time.time() - self.since_s) * 1000)
            found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
            for tp in tps:
                if found.get(tp) is not None:
                    consumer.seek(tp, found[tp].offset)
                else:
                    await consumer.seek_to_end(tp)
        ends = await consumer.end_offsets(tps)
        self._behind = {tp: end for tp, end in ends.items() if await consumer.position(tp) < end}
        if not self._behind:
            self.caught_up.set()

    async def start(self) -> None:
        await super().start()
        try:
            await asyncio.wait_for(self.caught_up.wait(), self.catch_up_s)
        except TimeoutError:
            log.warning("%s: not caught up with %s after %.0f s; going on", self.task_name, self.topic, self.catch_up_s)

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None, "started"
        while True:  # a failed fetch is logged and retried, never fatal
            try:
                batches = await consumer.getmany(timeout_ms=200)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: fetch failed; retrying", self.task_name)
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for record in records:
                    try:
                        event = decode(record.value)
                    except DecodeError as exc:
                        self.undecodable(record.offset, exc)
                        continue
                    self.handle(event)
            if self._behind:  # positions, not record offsets: transaction markers leave gaps
                for tp, end in list(self._behind.items()):
                    if await consumer.position(tp) >= end:
                        del self._behind[tp]
                if not self._behind:
                    self.caught_up.set()

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


CANCEL_MEMORY_S = 600.0


class EdgeLiveness:
    """When each edge (by reply partition) and each watched turn last showed a heartbeat (wall-clock seconds,
    the heartbeat's own ``created_at``, so beats replayed from the past count as old) — and whether the bus
    has been flowing long enough to judge: beats of any sender (the worker's own included) must have kept
    arriving without a gap of ``gap_s`` for ``timeout_s``, so after a broker outage every edge gets a fresh
    ``timeout_s`` to beat again before its turns are called orphaned."""

    def __init__(self, gap_s: float = 6.0) -> None:
        self.partitions: dict[int, float] = {}
        self.watched: dict[str, float] = {}
        self.gap_s = gap_s
        self.last_received: float | None = None  # local wall time of the last beat of anyone
        self.flowing_since: float | None = None

    def received(self, now: float | None = None) -> None:
        """A heartbeat (of anyone) arrived now."""
        now = time.time() if now is None else now
        if self.last_received is None or now - self.last_received > self.gap_s:
            self.flowing_since = now
        self.last_received = now if self.last_received is None else max(self.last_received, now)

    def beat(self, event: EdgeHeartbeat, now: float | None = None) -> None:
        self.received(now)
        if event.reply_partition is None:
            return
        at = event.created_at
        self.partitions[event.reply_partition] = max(at, self.partitions.get(event.reply_partition, 0.0))
        for cid in event.watching:
            self.watched[cid] = max(at, self.watched.get(cid, 0.0))
        if len(self.watched) > 100_000:  # forget turns not watched for ten minutes
            cutoff = at - CANCEL_MEMORY_S
            self.watched = {c: t for c, t in self.watched.items() if t >= cutoff}

    def gone(self, reply_partition: int, correlation_id: str, timeout_s: float, now: float | None = None) -> bool:
        """True if the turn's edge has beaten before but not within ``timeout_s``, and no edge watches the
        turn within it. An edge never seen beating is not gone (a client of the bus without heartbeats)."""
        now = time.time() if now is None else now
        if self.last_received is None or self.flowing_since is None or now - self.last_received > self.gap_s:
            return False  # the bus is silent: no beat can be judged
        if now - self.flowing_since <= timeout_s:
            return False  # the bus has just come back (or this worker just started): give edges their time
        last = self.partitions.get(reply_partition)
        if last is None or now - last <= timeout_s:
            return False
        return now - self.watched.get(correlation_id, 0.0) > timeout_s


class ControlTail(_TopicTail):
    """Every :class:`~schemas.events.CancelTurn` on ``chat.control`` since ``CANCEL_MEMORY_S`` ago, handed
    to ``on_cancel`` (correlation id, reason), and every :class:`~schemas.events.EdgeHeartbeat` into
    ``edges``. No consumer group: each worker reads all partitions."""

    task_name = "control"

    def __init__(self, settings: Settings, on_cancel: Callable[[str, str], object]) -> None:
        super().__init__(settings, CHAT_CONTROL, from_beginning=False, since_s=CANCEL_MEMORY_S)
        self.on_cancel = on_cancel
        self.edges = EdgeLiveness(gap_s=3 * settings.edge_heartbeat_s)

    def handle(self, event: AnyEvent) -> None:
        if isinstance(event, CancelTurn):
            self.on_cancel(event.correlation_id, event.reason)
        elif isinstance(event, EdgeHeartbeat):
            self.edges.beat(event)

    def undecodable(self, offset: int, exc: DecodeError) -> None:
        log.warning("ignoring undecodable control message at %d: %s", offset, exc)
