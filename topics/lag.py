"""Consumer lag: for a consumer group and topic, the end offsets minus the group's committed offsets.

Lag counts records written but not yet *committed* by the group: waiting in its queue, or in work
(the inference worker commits a turn only once its completion is acknowledged, so its lag includes
the turns it is generating). A partition the group never committed counts from offset 0 (what the
group would read with ``auto_offset_reset="earliest"``).

:class:`LagReader` keeps one consumer (for end offsets, no group) and one admin client open, so a
poller (the edge's admission control, the batch lane's flow control) pays two round trips per read.
After ``RENEW_AFTER`` calls in a row that did not complete (an error, or cancelled by the caller's
timeout), the next call first replaces both clients (at most once every ``RENEW_EVERY_S``): after a broker restart under load, aiokafka's
long-lived clients were seen to time out for minutes while new ones answered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from core.config import Settings
from topics.clients import make_admin, make_consumer, partitions_of
from topics.compat import describe_groups

log = logging.getLogger(__name__)
T = TypeVar("T")
RENEW_AFTER = 3  # calls in a row that did not complete
RENEW_EVERY_S = 5.0  # at most one renewal this often (a broker that is down fails every call)


class LagReader:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer = make_consumer(settings, group_id=None)
        self._admin: AIOKafkaAdminClient = make_admin(settings)
        self._partitions: dict[str, list[TopicPartition]] = {}
        self.failures = 0  # calls in a row that raised or were cancelled
        self.renewals = 0
        self._renewing: asyncio.Task[None] | None = None
        self._renewed_at = -RENEW_EVERY_S  # monotonic

    async def start(self) -> None:
        await self._consumer.start()
        await self._admin.start()

    async def stop(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._admin.close()
        await self._consumer.stop()

    async def renew(self) -> None:
        """Replace both clients with new ones (the old ones are closed, at most 5 s each, errors ignored)."""
        old_consumer, old_admin = self._consumer, self._admin
        self._consumer, self._admin = make_consumer(self.settings, group_id=None), make_admin(self.settings)
        for close in (old_admin.close, old_consumer.stop):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(close(), 5)
        self.renewals += 1
        log.warning("lag reader: %d calls in a row failed; new clients (renewal %d)", self.failures, self.renewals)
        await self.start()  # may raise: failures stays high, so the next call renews again
        self.failures = 0

    async def _guarded(self, call: Awaitable[T]) -> T:
        try:
            out = await call
        except BaseException:  # an error, or the caller's timeout cancelling a call that hung
            self.failures += 1
            raise
        self.failures = 0
        return out

    async def _renew_if_stuck(self) -> None:
        """Renew once ``RENEW_AFTER`` calls failed in a row. The renewal is a task of its own, shielded from
        the caller's timeout (a caller with a 1 s budget must not cancel every renewal that takes longer);
        concurrent callers wait for the same one."""
        due = time.monotonic() - self._renewed_at >= RENEW_EVERY_S
        if self._renewing is None and self.failures >= RENEW_AFTER and due:
            self._renewed_at = time.monotonic()
            self._renewing = asyncio.create_task(self.renew(), name="lag-reader-renew")
        task = self._renewing
        if task is not None:
            try:
                await asyncio.shield(task)
            finally:
                if task.done() and self._renewing is task:
                    self._renewing = None

    async def _tps(self, topics: Iterable[str]) -> list[TopicPartition]:
        out: list[TopicPartition] = []
        for name in topics:
            if name not in self._partitions:
                self._partitions[name] = await partitions_of(self._consumer, name)
            out += self._partitions[name]
        return out

    async def partitions(self, groups: dict[str, tuple[str, ...]]) -> dict[tuple[str, TopicPartition], tuple[int, int]]:
        """``{(group, partition): (committed, end)}`` for each group's full topic names (committed counts
        from 0 where the group never committed)."""
        await self._renew_if_stuck()
        return await self._guarded(self._partitions_of(groups))

    async def _partitions_of(self, groups: dict[str, tuple[str, ...]]) -> dict[tuple[str, TopicPartition], tuple[int, int]]:
        tps = await self._tps({t for names in groups.values() for t in names})
        ends = await self._consumer.end_offsets(tps)
        out: dict[tuple[str, TopicPartition], tuple[int, int]] = {}
        mine_by = {group: [tp for tp in tps if tp.topic in names] for group, names in groups.items()}
        # one request per group, concurrently (each goes to its group's coordinator)
        answers = await asyncio.gather(*(self._admin.list_consumer_group_offsets(group, partitions=mine) for group, mine in mine_by.items()))
        for (group, mine), committed in zip(mine_by.items(), answers, strict=True):
            for tp in mine:
                meta = committed.get(tp)
                out[(group, tp)] = (meta.offset if meta is not None and meta.offset >= 0 else 0, ends[tp])
        return out

    async def read(self, groups: dict[str, tuple[str, ...]]) -> dict[tuple[str, str], int]:
        """``{(group, topic): lag}`` (records, summed over partitions) for each group's full topic names."""
        out: dict[tuple[str, str], int] = {}
        for (group, tp), (committed, end) in (await self.partitions(groups)).items():
            out[(group, tp.topic)] = out.get((group, tp.topic), 0) + max(0, end - committed)
        return out

    async def members(self, group_ids: list[str]) -> dict[str, int]:
        """``{group_id: live members}`` (0 for a group that is empty or unknown)."""
        await self._renew_if_stuck()
        groups = await self._guarded(describe_groups(self._admin, group_ids))
        return {gid: int(g["members"]) for gid, g in groups.items()}
