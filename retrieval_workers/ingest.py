"""``chatbus ingest PATH…``: chunk documents, embed them, publish them to ``kb.ingest``.

The ingest client embeds (so the Milvus owner only upserts) and publishes batches of chunks keyed by
source. With ``wait=True`` it returns once the retrieval worker's consumer group has committed past
every message it published, i.e. once the chunks are searchable.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from tqdm import tqdm

from core.config import Settings
from core.embeddings import get_embedder
from producers.ingest import ChunkPublisher, wait_indexed
from retrieval_workers.chunking import Chunk, chunk_text, iter_files, load_text
from schemas.events import KbChunk

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
    async with ChunkPublisher(settings) as publisher:
        with tqdm(total=len(chunks), unit="chunk", desc="ingest", disable=not progress) as bar:
            for i in range(0, len(chunks), BATCH):
                batch = chunks[i : i + BATCH]
                vectors = await asyncio.to_thread(embedder.encode, [c.text for c in batch])
                await publisher.send(
                    [
                        KbChunk(chunk_id=c.chunk_id, text=c.text, source=c.source, position=c.position, embedding=v.tolist())
                        for c, v in zip(batch, vectors, strict=True)
                    ]
                )
                bar.update(len(batch))
    if wait and publisher.last:
        await wait_indexed(settings, publisher.last, timeout_s)
    return len(chunks)
