"""``chatbus kb list|stats|delete``: what the knowledge base holds, read from ``kb.sources``."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import click

from core.config import get_settings
from core.logging import setup_logging


@click.group()
def kb() -> None:
    """The knowledge base: its documents (from the kb.sources catalogue), and deleting one."""


@kb.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per document.")
def kb_list(as_json: bool) -> None:
    """Every document indexed: chunks, title and source."""
    from producers.ingest import read_sources

    sources = asyncio.run(read_sources(get_settings()))
    for source, entry in sorted(sources.items()):
        if as_json:
            click.echo(entry.model_dump_json(include={"source", "doc_hash", "title", "chunks", "url"}))
        else:
            click.echo(f"{entry.chunks:6d}  {entry.title[:60]:60s}  {source}")


@kb.command("stats")
def kb_stats() -> None:
    """Documents and chunks in all, and per top folder."""
    from producers.ingest import read_sources

    sources = asyncio.run(read_sources(get_settings()))
    chunks = sum(e.chunks for e in sources.values())
    click.echo(f"{len(sources)} documents, {chunks} chunks")
    per: Counter[str] = Counter()
    docs: Counter[str] = Counter()
    for source, entry in sources.items():
        folder = Path(source).parent.name or "."
        per[folder] += entry.chunks
        docs[folder] += 1
    for folder, n in per.most_common():
        click.echo(f"  {folder:20s} {docs[folder]:5d} documents {n:7d} chunks")


@kb.command("delete")
@click.argument("source")
def kb_delete(source: str) -> None:
    """Remove a document (its source path as `kb list` shows it) from the knowledge base."""
    from producers.ingest import read_sources
    from retrieval_workers.ingest import delete

    settings = get_settings()
    setup_logging(settings.log_level)
    known = asyncio.run(read_sources(settings))
    if source not in known:
        resolved = str(Path(source).resolve())
        if resolved not in known:
            raise click.ClickException(f"{source}: not in the knowledge base (see `chatbus kb list`)")
        source = resolved
    asyncio.run(delete(source, settings))
    click.echo(f"deleted {source} ({known[source].chunks} chunks)")
