"""Review decisions on ``safety.review`` (keyed by conversation id), from the edge's ``POST
/v1/review/decisions`` and ``chatbus review decide``: one function so both check and mask alike."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer
from pymongo.asynchronous.database import AsyncDatabase

from core.pii import mask_pii
from schemas.events import ReviewDecision, ReviewVerdict
from topics.registry import SAFETY_REVIEW, topic

REVIEW_COLLECTION = "safety_review"  # written by consumers.review


async def publish_decision(
    producer: AIOKafkaProducer,
    db: AsyncDatabase[dict[str, Any]],
    prefix: str,
    *,
    correlation_id: str,
    decision: ReviewVerdict,
    reviewer: str,
    note: str = "",
    answer: str | None = None,
) -> ReviewDecision | None:
    """Publish a decision on the review item of ``correlation_id``; None (nothing published) when there is no
    such item. ``note`` and ``answer`` are PII-masked here. Raises the producer's ``KafkaError``,
    pydantic's ``ValidationError`` for a bad reviewer/note/answer."""
    item = await db[REVIEW_COLLECTION].find_one({"_id": correlation_id}, {"conversation_id": 1})
    if item is None:
        return None
    event = ReviewDecision(
        correlation_id=correlation_id,
        conversation_id=str(item["conversation_id"]),
        decision=decision,
        reviewer=reviewer,
        note=mask_pii(note)[0],
        answer=mask_pii(answer)[0] if answer else None,
    )
    await producer.send_and_wait(topic(SAFETY_REVIEW, prefix), event.to_bytes(), key=event.key)
    return event
