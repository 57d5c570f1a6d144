"""Analysts: ``feedback tail`` (votes on chat.feedback) and ``dpo export`` (the curated preference dataset)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import click

from core.config import get_settings


@click.group()
def feedback() -> None:
    """Votes on chat.feedback (thumbs ratings and pairwise preferences)."""


@feedback.command("tail")
@click.option("--kind", type=click.Choice(["rating", "preference"]), default=None)
@click.option("--rating", type=click.Choice(["up", "down"]), default=None)
@click.option("--conversation", "conversation_id", default=None, help="Only this conversation id.")
@click.option("--user", default=None, help="Only this user's votes.")
@click.option("--from-beginning", is_flag=True, help="Start at the oldest retained event instead of now.")
@click.option("--json", "as_json", is_flag=True, help="Print each event as one JSON line.")
@click.option("-n", "--limit", type=int, default=None, help="Stop after this many events.")
def feedback_tail(
    kind: str | None, rating: str | None, conversation_id: str | None, user: str | None, from_beginning: bool, as_json: bool, limit: int | None
) -> None:
    """Follow chat.feedback live, one line per event (Ctrl-C stops)."""
    from consumers.feedback_tail import FeedbackFilter, print_tail

    keep = FeedbackFilter(kind=kind, rating=rating, conversation_id=conversation_id, user=user)
    try:
        asyncio.run(print_tail(get_settings(), keep, from_beginning, as_json, limit, click.echo))
    except KeyboardInterrupt:
        pass


@click.group()
def dpo() -> None:
    """The curated preference dataset (dpo.pairs / kto.examples, persisted in MongoDB)."""


@dpo.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True)
@click.option("--kind", type=click.Choice(["dpo", "kto"]), default="dpo", show_default=True, help="DPO pairs or KTO examples.")
@click.option("--since", default=None, help="Only records whose newest vote is at or after this time (ISO date/time, UTC if no zone, or epoch seconds).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Output file (default: <kind>-<UTC time>.<format>).")
def dpo_export(fmt: str, kind: str, since: str | None, output: Path | None) -> None:
    """Write the records TRL trains on (prompt/chosen/rejected or prompt/completion/label, plus record_id, metadata)."""
    from consumers.dataset import Format, Kind, export, parse_since

    try:
        since_ts = parse_since(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    path, n = asyncio.run(export(get_settings(), cast(Kind, kind), cast(Format, fmt), output, since_ts))  # click.Choice checked both
    click.echo(f"{n} {kind} records -> {path}")
