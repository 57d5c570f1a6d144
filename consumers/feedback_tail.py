"""``chatbus feedback tail``: follow ``chat.feedback`` live with a plain consumer (no group, commits nothing).

Every partition is assigned and read from its end (or from the beginning); each decodable
:class:`schemas.feedback.FeedbackEvent` that passes the filters becomes one line — readable text or the
event's JSON. Undecodable records are skipped (the feedback app dead-letters them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from core.config import Settings
from schemas.events import DecodeError
from schemas.feedback import FeedbackEvent, decode_feedback
from topics.clients import make_consumer, partitions_of, records_forever
from topics.registry import CHAT_FEEDBACK, topic


@dataclass(frozen=True)
class FeedbackFilter:
    kind: str | None = None  # "rating" | "preference"
    rating: str | None = None  # "up" | "down"
    conversation_id: str | None = None
    user: str | None = None

    def __call__(self, event: FeedbackEvent) -> bool:
        return (
            (self.kind is None or event.kind == self.kind)
            and (self.rating is None or event.rating == self.rating)
            and (self.conversation_id is None or event.conversation_id == self.conversation_id)
            and (self.user is None or event.user == self.user)
        )


def line(event: FeedbackEvent, as_json: bool = False) -> str:
    """One event as a line: its JSON, or ``time kind conversation … user`` text."""
    if as_json:
        return orjson.dumps(event.model_dump(mode="json")).decode()
    at = datetime.fromtimestamp(event.created_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if event.kind == "rating":
        what = f"rating {event.rating or 'withdrawn':9s} {event.response_id}"
        if event.reason:
            what += f" reason={event.reason}"
        if event.comment:
            what += f" comment={event.comment[:80]!r}"
    else:
        what = f"preference {event.chosen_id} > {','.join(event.rejected_ids)}"
    return f"{at} {event.conversation_id} {what} user={event.user or '-'} [{event.feedback_id}]"


async def tail(settings: Settings, keep: Callable[[FeedbackEvent], bool], from_beginning: bool = False) -> AsyncGenerator[FeedbackEvent, None]:
    """Matching events as they arrive, for ever (the caller stops iterating)."""
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tps = await partitions_of(consumer, topic(CHAT_FEEDBACK, settings.topic_prefix))
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        async for record in records_forever(consumer, "feedback tail"):
            try:
                event = decode_feedback(record.value)
            except DecodeError:
                continue
            if keep(event):
                yield event
    finally:
        await consumer.stop()


async def print_tail(settings: Settings, keep: FeedbackFilter, from_beginning: bool, as_json: bool, limit: int | None, echo: Callable[[str], None]) -> int:
    """Print matching events until ``limit`` of them (None: until interrupted); returns how many."""
    n = 0
    if limit is not None and limit <= 0:
        return 0
    gen = tail(settings, keep, from_beginning)
    try:
        async for event in gen:
            echo(line(event, as_json))
            n += 1
            if limit is not None and n >= limit:
                break
    except asyncio.CancelledError:
        pass
    finally:
        await gen.aclose()
    return n
