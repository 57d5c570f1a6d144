"""``chatbus review list|decide``: the safety review queue (``safety_review``) from a terminal."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click

from core.config import Settings, get_settings
from core.logging import setup_logging

DECISIONS = ("correct_block", "should_have_answered", "harmful_answer")


async def _items(settings: Settings, status: str, limit: int) -> list[dict[str, Any]]:
    from pymongo import AsyncMongoClient

    from producers.review import REVIEW_COLLECTION

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        query = {} if status == "all" else {"status": status}
        return [d async for d in client[settings.mongo_db][REVIEW_COLLECTION].find(query).sort("created_at", -1).limit(limit)]
    finally:
        await client.close()


async def _decide(settings: Settings, correlation_id: str, decision: str, reviewer: str, note: str, answer: str | None) -> str | None:
    from pymongo import AsyncMongoClient

    from producers.review import publish_decision
    from topics.clients import make_producer

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri, serverSelectionTimeoutMS=5000)
    producer = make_producer(settings)
    await producer.start()
    try:
        event = await publish_decision(
            producer,
            client[settings.mongo_db],
            settings.topic_prefix,
            correlation_id=correlation_id,
            decision=decision,  # type: ignore[arg-type]
            reviewer=reviewer,
            note=note,
            answer=answer,
        )
        return event.event_id if event else None
    finally:
        await producer.stop()
        await client.close()


@click.group()
def review() -> None:
    """The safety review queue: close blocks, flagged turns and retracted answers, and reviewers' decisions."""


@review.command("list")
@click.option("--status", type=click.Choice(["open", "decided", "all"]), default="open", show_default=True)
@click.option("-n", "limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per item.")
def review_list(status: str, limit: int, as_json: bool) -> None:
    """Items, newest first: turn id, kind, category, score, and the prompt (PII-masked)."""
    for doc in asyncio.run(_items(get_settings(), status, limit)):
        if as_json:
            click.echo(json.dumps({"id": doc.pop("_id"), **doc}, default=str))
            continue
        users = [m["content"] for m in doc.get("prompt", []) if m.get("role") == "user"]
        prompt = " ".join((users[-1] if users else "").split())[:80]
        decided = f" -> {doc['decision']['decision']}" if doc.get("decision") else ""
        click.echo(f"{doc['_id']}  {doc.get('kind', '?'):9s} {doc.get('category', ''):16s} {float(doc.get('score', 0)):.2f}{decided}  {prompt}")


@review.command("decide")
@click.argument("correlation_id")
@click.argument("decision", type=click.Choice(DECISIONS))
@click.option("--reviewer", required=True, help="Who decides (a name; kept in the audit log).")
@click.option("--note", default="", help="Why (PII-masked before it is stored).")
@click.option("--answer", default=None, help="For should_have_answered: the answer the turn should have had.")
def review_decide(correlation_id: str, decision: str, reviewer: str, note: str, answer: str | None) -> None:
    """Record a decision on a review item (published to safety.review; the recorder applies it)."""
    settings = get_settings()
    setup_logging(settings.log_level)
    try:
        event_id = asyncio.run(_decide(settings, correlation_id, decision, reviewer, note, answer))
    except ValueError as exc:  # pydantic: reviewer/note/answer out of bounds
        raise click.BadParameter(str(exc).splitlines()[0]) from None
    if event_id is None:
        raise click.ClickException(f"{correlation_id}: no review item (see `chatbus review list --status all`)")
    click.echo(f"{decision} recorded for {correlation_id} ({event_id})")
