"""Consumer lag: for a consumer group and topic, the end offsets minus the group's committed offsets.

Lag counts records written but not yet *committed* by the group: waiting in its queue, or in work
(the inference worker commits a turn only once its completion is acknowledged, so its lag includes
the turns it is generating). A partition the group never committed counts from offset 0 (what the
group would read with ``auto_offset_reset="earliest"``).

:class:`LagReader` keeps one consumer (for end offsets, no group) and one admin client open, so a
poller (the edge's admission control, the batch lane's flow control) pays two round trips per read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from core.config import Settings
from topics.clients import make_admin, make_consumer, partitions_of
from topics.compat import describe_groups


class LagReader:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer = make_consumer(settings, group_id=None)
        self._admin: AIOKafkaAdminClient = make_admin(settings)
        self._partitions: dict[str, list[TopicPartition]] = {}

    async def start(self) -> None:
        await self._consumer.start()
        await self._admin.start()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._admin.close()
        await self._consumer.stop()

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
        return {gid: int(g["members"]) for gid, g in (await describe_groups(self._admin, group_ids)).items()}
