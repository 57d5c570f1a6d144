"""Users' ``chat`` and ``ingest``; operators' ``topics``, ``lag`` and ``dlq``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from core.config import get_settings
from core.logging import setup_logging

# --- users ----------------------------------------------------------------------------------------------------


@click.command()
@click.argument("question")
@click.option("--url", default=None, help="Edge base URL (default: the configured edge).")
@click.option("--max-tokens", type=int, default=None, help="Completion tokens at most (default: the edge's, CHATBUS_DEFAULT_MAX_TOKENS).")
@click.option("--conversation", default=None, help="Conversation id to continue.")
def chat(question: str, url: str | None, max_tokens: int | None, conversation: str | None) -> None:
    """Ask a question through the edge and stream the answer."""
    from openai import OpenAI

    settings = get_settings()
    base = url or f"http://{settings.edge_host}:{settings.edge_port}/v1"
    key = (settings.api_key_list() or ["none"])[0]
    client = OpenAI(base_url=base, api_key=key)
    extra = {"conversation_id": conversation} if conversation else None
    stream = client.chat.completions.create(
        model=settings.model_name,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,  # None: the edge's default
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    citations: list[dict[str, object]] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            click.echo(chunk.choices[0].delta.content, nl=False)
        if chunk.choices and chunk.choices[0].finish_reason:
            click.echo(f"\n[finish_reason: {chunk.choices[0].finish_reason}]")
            citations = (chunk.model_extra or {}).get("citations") or []
        if chunk.usage:
            click.echo(f"[usage: {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]")
    for c in citations:
        click.echo(f"[{c['index']}] {c.get('title') or c['source']} — {c.get('url') or c['source']} (score {c['score']:.2f})")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--wait/--no-wait", default=True, help="Return once the chunks are searchable.")
@click.option("--base-url", default="", help="Citations link to BASE_URL + the file's path under the directory given (+ #anchor); default: the file path.")
def ingest(paths: tuple[Path, ...], wait: bool, base_url: str) -> None:
    """Chunk, embed and publish text/Markdown/HTML files to the knowledge base (unchanged files are skipped)."""
    from retrieval_workers.ingest import ingest as do_ingest

    settings = get_settings()
    setup_logging(settings.log_level)
    report = asyncio.run(do_ingest([p.resolve() for p in paths], settings, wait=wait, base_url=base_url))
    click.echo(report.summary())


# --- operators ------------------------------------------------------------------------------------------------


@click.command()
@click.option("--create", is_flag=True, help="First create the registry's topics that are missing (idempotent).")
def topics(create: bool) -> None:
    """Topics in the registry: partitions, end offsets, retention and purpose."""
    from topics.ops import describe_topics

    settings = get_settings()
    if create:
        from topics.clients import ensure_topics

        created = asyncio.run(ensure_topics(settings))
        click.echo(f"created: {', '.join(created) if created else 'none (all exist)'}")
    for row in asyncio.run(describe_topics(settings)):
        click.echo(row)


@click.command()
def lag() -> None:
    """Consumer lag per group and partition (end offset minus committed offset)."""
    from topics.ops import consumer_lag

    for row in asyncio.run(consumer_lag(get_settings())):
        click.echo(row)


@click.command()
@click.option("-n", "limit", default=20, show_default=True, help="How many of the latest dead letters.")
def dlq(limit: int) -> None:
    """Show the latest dead letters with their reasons."""
    from topics.ops import tail_dlq

    for row in asyncio.run(tail_dlq(get_settings(), limit)):
        click.echo(row)
