"""Operator views of the bus: topics with offsets, consumer lag per group, the latest dead letters."""

from __future__ import annotations

import asyncio

from aiokafka import ConsumerRecord, TopicPartition

from core.config import Settings
from schemas.events import DeadLetter, DecodeError, decode
from topics.clients import make_consumer, partitions_of
from topics.lag import LagReader
from topics.registry import CHAT_DLQ, GROUPS, REGISTRY, topic


async def end_offsets(settings: Settings, names: list[str]) -> dict[TopicPartition, int]:
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tps = [tp for n in names for tp in await partitions_of(consumer, n)]
        return await consumer.end_offsets(tps) if tps else {}
    finally:
        await consumer.stop()


async def describe_topics(settings: Settings) -> list[str]:
    names = [topic(s.name, settings.topic_prefix) for s in REGISTRY]
    ends = await end_offsets(settings, names)
    rows = [f"{'topic':28s} {'parts':>5s} {'messages':>10s} {'retention':>10s}  purpose"]
    for s, name in zip(REGISTRY, names, strict=True):
        total = sum(off for tp, off in ends.items() if tp.topic == name)
        parts = sum(1 for tp in ends if tp.topic == name)
        rows.append(f"{name:28s} {parts:5d} {total:10d} {s.retention_ms // 3_600_000:>9d}h  {s.purpose}")
    return rows


async def consumer_lag(settings: Settings) -> list[str]:
    """Rows ``group topic partition committed end lag`` for every stage's consumer group."""
    reader = LagReader(settings)
    await reader.start()
    try:
        found = await reader.partitions({g.group_id: tuple(topic(t, settings.topic_prefix) for t in g.topics) for g in GROUPS})
    finally:
        await reader.stop()
    rows = [f"{'group':26s} {'topic':20s} {'part':>4s} {'committed':>10s} {'end':>10s} {'lag':>8s}"]
    for g in GROUPS:
        for (group, tp), (pos, end) in sorted((k, v) for k, v in found.items() if k[0] == g.group_id):
            rows.append(f"{group:26s} {tp.topic:20s} {tp.partition:4d} {pos:10d} {end:10d} {end - pos:8d}")
    return rows


async def read_records(settings: Settings, name: str, last: int | None = None, timeout_s: float = 20.0) -> list[ConsumerRecord]:
    """The records of a topic up to its current end: all of them, or the ``last`` N of each partition."""
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tps = await partitions_of(consumer, name)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, 0 if last is None else max(ends[tp] - last, 0))
        out: list[ConsumerRecord] = []
        remaining = {tp for tp in tps if ends[tp] > 0}
        deadline = asyncio.get_running_loop().time() + timeout_s
        while remaining and asyncio.get_running_loop().time() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=300)).items():
                out.extend(r for r in records if r.offset < ends[tp])
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
        return out
    finally:
        await consumer.stop()


async def read_dead_letters(settings: Settings, limit: int = 20) -> list[DeadLetter]:
    """The last ``limit`` dead letters (oldest first; undecodable records skipped)."""
    letters = []
    for r in await read_records(settings, topic(CHAT_DLQ, settings.topic_prefix), last=limit):
        try:
            ev = decode(r.value)
        except DecodeError:
            continue
        if isinstance(ev, DeadLetter):
            letters.append(ev)
    return sorted(letters, key=lambda d: d.created_at)[-limit:]


async def tail_dlq(settings: Settings, limit: int) -> list[str]:
    return [f"{d.source_topic}[{d.partition}]@{d.offset} {d.worker}: {d.reason}" for d in await read_dead_letters(settings, limit)]
