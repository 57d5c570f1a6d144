"""``chatbus ingest PATH…``: chunk documents, embed them, publish them to ``kb.ingest``.

The ingest client embeds (so the Milvus owner only upserts) and publishes batches of chunks keyed by
source. With ``wait=True`` it returns once the retrieval worker's consumer group has committed past
every message it published, i.e. once the chunks are searchable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from aiokafka import TopicPartition
from tqdm import tqdm

from core.config import Settings
from core.embeddings import get_embedder
from retrieval_workers.chunking import Chunk, chunk_text, iter_files, load_text
from schemas.events import KbChunk, KbIngest
from topics.clients import make_admin, make_producer
from topics.registry import KB_INGEST, RETRIEVAL_INGEST, topic

log = logging.getLogger(__name__)

BATCH = 64


def collect_chunks(paths: list[Path], settings: Settings) -> list[Chunk]:
    chunks: list[Chunk] = []
    for f in iter_files(paths):
        chunks.extend(chunk_text(load_text(f), str(f), settings.chunk_chars, settings.chunk_overlap))
    return chunks


async def ingest(paths: list[Path], settings: Settings, *, wait: bool = True, progress: bool = True, timeout_s: float = 600) -> int:
    """Publish every chunk of ``paths``; returns the number of chunks. Raises TimeoutError if ``wait`` expires."""
    chunks = collect_chunks(paths, settings)
    embedder = get_embedder(settings.embedding_model, settings.embedding_backend, bulk=True)
    name = topic(KB_INGEST, settings.topic_prefix)
    producer = make_producer(settings, max_request_size=16 * 1024 * 1024)
    await producer.start()
    last: dict[int, int] = {}
    try:
        with tqdm(total=len(chunks), unit="chunk", desc="ingest", disable=not progress) as bar:
            for i in range(0, len(chunks), BATCH):
                batch = chunks[i : i + BATCH]
                vectors = await asyncio.to_thread(embedder.encode, [c.text for c in batch])
                msg = KbIngest(
                    chunks=[
                        KbChunk(chunk_id=c.chunk_id, text=c.text, source=c.source, position=c.position, embedding=v.tolist())
                        for c, v in zip(batch, vectors, strict=True)
                    ]
                )
                meta = await producer.send_and_wait(name, msg.to_bytes(), key=batch[0].source.encode())
                last[meta.partition] = max(last.get(meta.partition, -1), meta.offset)
                bar.update(len(batch))
    finally:
        await producer.stop()
    if wait and last:
        await wait_committed(settings, name, last, timeout_s)
    return len(chunks)


async def wait_committed(settings: Settings, name: str, last: dict[int, int], timeout_s: float) -> None:
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
