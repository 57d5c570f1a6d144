"""Feedback events on ``chat.feedback`` (keyed by conversation id): a rating of one response or a
preference among sibling responses, with the stable ``feedback_id`` that makes a second vote of the same
person replace the first (:func:`schemas.feedback.feedback_id`)."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from core.config import Settings
from schemas.feedback import FeedbackEvent, Rating, Reason, feedback_id
from topics.registry import CHAT_FEEDBACK, topic


def rating_event(
    *,
    user: str | None,
    response_id: str,
    conversation_id: str,
    prompt_group: str,
    model: str,
    rating: Rating | None,
    reason: Reason | None,
    comment: str | None,
) -> FeedbackEvent:
    """A rating (``rating`` None withdraws it); ``comment`` must already be PII-masked."""
    return FeedbackEvent(
        feedback_id=feedback_id("rating", user, response_id),
        kind="rating",
        conversation_id=conversation_id,
        prompt_group=prompt_group,
        response_id=response_id,
        rating=rating,
        reason=reason,
        comment=comment,
        user=user,
        model=model,
    )


def preference_event(*, user: str | None, chosen_id: str | None, rejected_ids: list[str], conversation_id: str, prompt_group: str, model: str) -> FeedbackEvent:
    """A preference for ``chosen_id`` over its siblings ``rejected_ids`` (one per person and prompt group)."""
    return FeedbackEvent(
        feedback_id=feedback_id("preference", user, prompt_group),
        kind="preference",
        conversation_id=conversation_id,
        prompt_group=prompt_group,
        chosen_id=chosen_id,
        rejected_ids=rejected_ids,
        user=user,
        model=model,
    )


class FeedbackProducer:
    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.topic = topic(CHAT_FEEDBACK, settings.topic_prefix)

    async def publish(self, event: FeedbackEvent) -> None:
        """Produce the event and wait for its acknowledgement."""
        await self.producer.send_and_wait(self.topic, event.to_bytes(), key=event.key)
