"""``chatbus ingest PATH…``: chunk documents, embed what changed, publish it to ``kb.ingest``.

Incremental: the client first reads ``kb.sources`` (compacted: what the knowledge base holds per document,
published by the retrieval worker once a document is indexed). A file whose ``doc_hash`` (its bytes and the
chunker's version and sizes) is already there is skipped without embedding; a changed file is chunked,
embedded and sent as the parts of one document, after whose last part the worker deletes the old version's
chunks. Files that cannot be ingested (empty, binary, too large, unreadable, no text) are skipped with the
reason and reported in :class:`IngestReport`; the rest goes on.

Embedding is batched across documents and sorted by length (less padding), on the bulk embedder of
:func:`core.embeddings.get_embedder`. With ``wait=True`` :func:`ingest` returns once the retrieval worker's
consumer group has committed past every message published, i.e. once the chunks are searchable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from core.config import Settings
from core.embeddings import get_embedder
from producers.ingest import ChunkPublisher, read_sources, wait_indexed
from retrieval_workers.chunking import Chunk, Document, SkipFile, Unchanged, document_chunks, iter_files, read_document
from schemas.events import KbChunk, KbSource

log = logging.getLogger(__name__)

PART = 64  # chunks per kb.ingest message (64 x 384 floats as JSON: ~0.5 MB)
GROUP = 512  # chunks embedded together (sorted by length across documents)


@dataclass
class IngestReport:
    """What one ``ingest`` run did. ``skipped``: (path, reason) of files not ingested."""

    files: int = 0
    ingested: int = 0
    unchanged: int = 0
    chunks: int = 0
    embed_s: float = 0.0
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.embed_s if self.embed_s else 0.0

    def summary(self) -> str:
        lines = [
            f"{self.files} files: {self.ingested} ingested ({self.chunks} chunks, {self.chunks_per_s:.0f} chunks/s embedding), "
            f"{self.unchanged} unchanged, {len(self.skipped)} skipped; {self.seconds:.1f} s"
        ]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def plan(
    paths: list[Path],
    settings: Settings,
    known: dict[str, KbSource],
    base_url: str = "",
    report: IngestReport | None = None,
    url_root: Path | None = None,
) -> list[tuple[Document, list[Chunk]]]:
    """The documents to (re)index and their chunks; unchanged and unreadable files are counted in ``report``.
    URLs are ``base_url`` + the path under ``url_root`` (default: the directory given). Raises
    ``FileNotFoundError`` for a path that does not exist."""
    report = report if report is not None else IngestReport()
    todo: list[tuple[Document, list[Chunk]]] = []
    for f, root in iter_files(paths):
        report.files += 1
        entry = known.get(str(f))
        try:
            doc = read_document(
                f,
                url_root or root,
                max_bytes=settings.ingest_max_bytes,
                size=settings.chunk_chars,
                overlap=settings.chunk_overlap,
                known_hash=entry.doc_hash if entry else None,
            )
        except Unchanged:
            report.unchanged += 1
            continue
        except SkipFile as exc:
            report.skipped.append((str(f), str(exc)))
            continue
        chunks = document_chunks(doc, size=settings.chunk_chars, overlap=settings.chunk_overlap, base_url=base_url)
        if not chunks:
            report.skipped.append((str(f), "no text"))
            continue
        todo.append((doc, chunks))
    return todo


def collect_chunks(paths: list[Path], settings: Settings, base_url: str = "", url_root: Path | None = None) -> list[Chunk]:
    """Every chunk of ``paths`` (nothing skipped as unchanged; unreadable files left out), in file order."""
    return [c for _, chunks in plan(paths, settings, {}, base_url, url_root=url_root) for c in chunks]


def _groups(todo: list[tuple[Document, list[Chunk]]]) -> list[list[tuple[Document, list[Chunk]]]]:
    groups: list[list[tuple[Document, list[Chunk]]]] = [[]]
    size = 0
    for item in todo:
        if size and size + len(item[1]) > GROUP:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += len(item[1])
    return [g for g in groups if g]


async def ingest(
    paths: list[Path],
    settings: Settings,
    *,
    wait: bool = True,
    progress: bool = True,
    timeout_s: float = 1800,
    base_url: str = "",
    url_root: Path | None = None,
) -> IngestReport:
    """Publish every new or changed document of ``paths``; returns what was done. Raises ``TimeoutError`` if
    ``wait`` expires, ``FileNotFoundError`` for a missing path."""
    t0 = time.perf_counter()
    report = IngestReport()
    known = await read_sources(settings)
    todo = plan(paths, settings, known, base_url, report, url_root)
    total = sum(len(c) for _, c in todo)
    embedder = get_embedder(settings.embedding_model, settings.embedding_backend, bulk=True) if todo else None
    async with ChunkPublisher(settings) as publisher:
        with tqdm(total=total, unit="chunk", desc="ingest", disable=not progress or not total) as bar:
            for group in _groups(todo):
                chunks = [c for _, cs in group for c in cs]
                e0 = time.perf_counter()
                assert embedder is not None
                vectors = await asyncio.to_thread(embedder.encode, [c.indexed_text for c in chunks])
                report.embed_s += time.perf_counter() - e0
                by_id = {c.chunk_id: v for c, v in zip(chunks, vectors, strict=True)}
                for doc, cs in group:
                    events = [
                        KbChunk(
                            chunk_id=c.chunk_id,
                            text=c.text,
                            source=c.source,
                            position=c.position,
                            embedding=by_id[c.chunk_id].tolist(),
                            title=c.title,
                            heading_path=list(c.heading_path),
                            anchor=c.anchor,
                            url=c.url,
                            doc_hash=c.doc_hash,
                        )
                        for c in cs
                    ]
                    parts = [events[i : i + PART] for i in range(0, len(events), PART)]
                    for i, part in enumerate(parts):
                        await publisher.send(part, source=doc.source, doc_hash=doc.doc_hash, title=doc.title, part=i, parts=len(parts))
                    report.ingested += 1
                    report.chunks += len(cs)
                bar.update(len(chunks))
    if wait and publisher.last:
        await wait_indexed(settings, publisher.last, timeout_s)
    report.seconds = time.perf_counter() - t0
    return report


async def delete(source: str, settings: Settings, *, wait: bool = True, timeout_s: float = 60) -> None:
    """Remove every chunk of ``source`` from the knowledge base (and its ``kb.sources`` entry)."""
    async with ChunkPublisher(settings) as publisher:
        await publisher.delete(source)
    if wait and publisher.last:
        await wait_indexed(settings, publisher.last, timeout_s)
