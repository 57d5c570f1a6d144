"""Publishing knowledge-base chunks to ``kb.ingest`` (the retrieval worker's ingest group upserts them).

:class:`ChunkPublisher` sends :class:`~schemas.events.KbIngest` parts of a document (key: its source, so
one document's parts keep their order) and remembers the highest offset per partition;
:func:`wait_indexed` then waits until the ``chatbus-retrieval-ingest`` group has committed past all of
them, i.e. until the chunks are searchable. :func:`read_sources` reads ``kb.sources``, the catalogue of
indexed documents.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from types import TracebackType

from aiokafka import AIOKafkaProducer, TopicPartition

from core.config import Settings
from schemas.events import DecodeError, KbChunk, KbIngest, KbSource, decode_as
from topics.clients import make_admin, make_producer
from topics.ops import read_records
from topics.registry import KB_INGEST, KB_SOURCES, RETRIEVAL_INGEST, topic


class ChunkPublisher:
    """``async with ChunkPublisher(settings) as pub: await pub.send(chunks)``; ``pub.last`` holds the
    highest offset written per partition (what :func:`wait_indexed` waits for)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = topic(KB_INGEST, settings.topic_prefix)
        self.producer: AIOKafkaProducer = make_producer(settings, max_request_size=16 * 1024 * 1024)
        self.last: dict[int, int] = {}

    async def __aenter__(self) -> ChunkPublisher:
        await self.producer.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.producer.stop()

    async def send(self, chunks: Sequence[KbChunk], *, source: str | None = None, doc_hash: str = "", title: str = "", part: int = 0, parts: int = 1) -> None:
        """One ``KbIngest`` message: part ``part`` of ``parts`` of document ``source`` (``chunks`` non-empty),
        acknowledged by the broker."""
        msg = KbIngest(chunks=list(chunks), source=source, doc_hash=doc_hash, title=title, part=part, parts=parts)
        await self._send(msg, source or chunks[0].source)

    async def delete(self, source: str) -> None:
        """Ask the retrieval worker to delete every chunk of ``source``."""
        await self._send(KbIngest(op="delete", source=source), source)

    async def _send(self, msg: KbIngest, key: str) -> None:
        meta = await self.producer.send_and_wait(self.topic, msg.to_bytes(), key=key.encode())
        self.last[meta.partition] = max(self.last.get(meta.partition, -1), meta.offset)


async def read_sources(settings: Settings) -> dict[str, KbSource]:
    """The documents the knowledge base holds, by source: ``kb.sources`` read to its end (the last record per
    key wins; a null value means deleted)."""
    out: dict[str, KbSource] = {}
    for record in await read_records(settings, topic(KB_SOURCES, settings.topic_prefix)):
        key = (record.key or b"").decode(errors="replace")
        if record.value is None:
            out.pop(key, None)
            continue
        try:
            out[key] = decode_as(record.value, KbSource)
        except DecodeError:
            continue
    return out


async def wait_indexed(settings: Settings, last: dict[int, int], timeout_s: float) -> None:
    """Wait until the retrieval ingest group has committed past ``last`` (partition -> offset) on
    ``kb.ingest``. Raises ``TimeoutError`` after ``timeout_s`` seconds."""
    name = topic(KB_INGEST, settings.topic_prefix)
    admin = make_admin(settings)
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        wanted = {TopicPartition(name, p): off + 1 for p, off in last.items()}
        while True:
            offsets = await admin.list_consumer_group_offsets(RETRIEVAL_INGEST.group_id, partitions=list(wanted))
            if all(tp in offsets and offsets[tp].offset >= off for tp, off in wanted.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"retrieval worker did not index the chunks within {timeout_s:.0f}s")
            await asyncio.sleep(0.25)
    finally:
        await admin.close()
