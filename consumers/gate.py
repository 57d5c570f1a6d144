"""Flow control for the batch lane: a stage works on batch records only while the next stage keeps up.

Without it, safety and retrieval race through a whole batch long before generation reaches it: their
CPU competes with the engine (on a small host that is what slows chat down most), and a cancelled batch
has thousands of pre-processed lines to wind down. A :class:`DownstreamGate` polls the next stage's
backlog on its batch topic — the end offsets minus that consumer group's committed offsets, summed over
partitions — and closes above ``high`` records, opening again below ``low`` (hysteresis). Interactive
records never wait for it. If the backlog cannot be read, the gate stays open (batches are never stuck).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from chatbus.config import Settings
from topics.clients import make_admin, make_consumer, partitions_of
from topics.registry import topic

log = logging.getLogger(__name__)


class DownstreamGate:
    def __init__(self, settings: Settings, name: str, group_id: str, *, high: int = 16, low: int = 4, every_s: float = 0.5) -> None:
        self.settings = settings
        self.topic = topic(name, settings.topic_prefix)
        self.group_id = group_id
        self.high, self.low, self.every_s = high, low, every_s
        self.open = True
        self.backlog = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = make_consumer(self.settings, group_id=None)
        self._admin = make_admin(self.settings)
        await self._consumer.start()
        await self._admin.start()
        self._task = asyncio.create_task(self._loop(), name=f"gate-{self.topic}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):
            if self._admin is not None:
                await self._admin.close()
        if self._consumer is not None:
            await self._consumer.stop()

    async def measure(self) -> int:
        """The downstream group's backlog on the topic (records not yet committed by it)."""
        assert self._consumer is not None and self._admin is not None
        tps: list[TopicPartition] = await partitions_of(self._consumer, self.topic)
        ends = await self._consumer.end_offsets(tps)
        committed = await self._admin.list_consumer_group_offsets(self.group_id, partitions=tps)
        backlog = 0
        for tp in tps:
            meta = committed.get(tp)
            backlog += ends[tp] - (meta.offset if meta is not None and meta.offset >= 0 else 0)
        return backlog

    async def _loop(self) -> None:
        while True:
            try:
                self.backlog = await self.measure()
                was = self.open
                self.open = self.backlog < (self.high if self.open else self.low)
                if was != self.open:
                    log.info("batch lane %s: %s backlog %d", "open" if self.open else "held", self.group_id, self.backlog)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # fail open: flow control must never strand a batch
                log.warning("gate on %s: cannot read the backlog (%s); open", self.topic, type(exc).__name__)
                self.open = True
            await asyncio.sleep(self.every_s)
