"""``POST /v1/feedback``: validate a person's vote and publish it to ``chat.feedback``.

Body (JSON object), one of

* ``{"type": "rating", "response_id": "chatcmpl-…", "rating": "up" | "down" | null, "reason": <one of
  schemas.feedback.REASONS>, "comment": str ≤ 2000 chars, "user": str}`` — ``null`` withdraws a rating;
* ``{"type": "preference", "chosen_id": "chatcmpl-…", "rejected_ids": ["chatcmpl-…", …] (or
  "rejected_id"), "user": str}`` — the responses must be siblings (same conversation and prompt).

Errors (OpenAI-style JSON): 400 for a body that is not such an object, 404 for a response id that is
not a completed turn. The answer is ``{"id": feedback_id, "object": "feedback", "status": "accepted"}``;
the event is keyed by conversation id, and voting again publishes the same ``feedback_id``, so every
reader keeps one vote per person and target (:mod:`schemas.feedback`). Comments are PII-masked before
they leave the edge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from core.pii import mask_pii, pseudonym
from edge.auth import owner_of, protected
from edge.conversations import ConversationStore, TurnInfo
from edge.errors import APIError
from edge.http import ORJSONResponse, read_json, validate_body
from edge.turns import ChatService
from producers.feedback import preference_event, rating_event
from schemas.errors import InvalidRequest, NotFound
from schemas.feedback import MAX_COMMENT_CHARS, FeedbackEvent, Rating, Reason

log = logging.getLogger(__name__)


def _id() -> Any:
    return Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["rating", "preference"]
    response_id: str | None = _id()
    rating: Rating | None = None
    reason: Reason | None = None
    comment: str | None = Field(default=None, max_length=MAX_COMMENT_CHARS)
    chosen_id: str | None = _id()
    rejected_ids: list[str] = Field(default_factory=list, max_length=16)
    rejected_id: str | None = _id()
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _shape(self) -> FeedbackRequest:
        if self.type == "rating":
            if self.response_id is None:
                raise ValueError("response_id: required for a rating")
            if "rating" not in self.model_fields_set:
                raise ValueError("rating: required (up, down, or null to withdraw)")
            if self.chosen_id or self.rejected_ids or self.rejected_id:
                raise ValueError("chosen_id/rejected_ids: only for a preference")
        else:
            if self.rejected_id:
                self.rejected_ids = [*self.rejected_ids, self.rejected_id]
            if not self.chosen_id or not self.rejected_ids:
                raise ValueError("chosen_id and rejected_ids: required for a preference")
            if self.chosen_id in self.rejected_ids or len(set(self.rejected_ids)) != len(self.rejected_ids):
                raise ValueError("rejected_ids: must be distinct and not include chosen_id")
            if self.response_id or "rating" in self.model_fields_set or self.reason or self.comment:
                raise ValueError("response_id/rating/reason/comment: only for a rating")
        return self

    @property
    def response_ids(self) -> list[str]:
        if self.type == "rating":
            assert self.response_id is not None
            return [self.response_id]
        assert self.chosen_id is not None
        return [self.chosen_id, *self.rejected_ids]


def parse_feedback(payload: object) -> FeedbackRequest:
    """The request, or a 400 naming the first problem."""
    return validate_body(FeedbackRequest, payload)


def as_recorded(req: FeedbackRequest, turns: dict[str, TurnInfo], current: Callable[[str], str]) -> tuple[FeedbackRequest, dict[str, TurnInfo]]:
    """The request and its turns under the ids their answers are recorded with: a turn rerouted to a
    fallback pool (edge.turns ``reroute_stranded``) keeps its first id for the client, its answer is the
    second's. ``current`` maps an id to the one its turn runs as (the edge's relay remembers its own)."""
    ids = {rid: current(rid) for rid in req.response_ids}
    if all(k == v for k, v in ids.items()):
        return req, turns
    update: dict[str, Any] = {"rejected_ids": [ids[r] for r in req.rejected_ids], "rejected_id": None}
    if req.response_id is not None:
        update["response_id"] = ids[req.response_id]
    if req.chosen_id is not None:
        update["chosen_id"] = ids[req.chosen_id]
    return req.model_copy(update=update), {ids[k]: v for k, v in turns.items()}


def feedback_event(req: FeedbackRequest, turns: dict[str, TurnInfo], key: bytes | None = None) -> FeedbackEvent:
    """The event for a validated request whose responses were all found (``turns`` by id); 400 if a
    preference names responses that are not siblings. ``user`` becomes its pseudonym under ``key``
    (:func:`core.pii.pseudonym`)."""
    first = turns[req.response_ids[0]]
    if req.type == "rating":
        assert req.response_id is not None
        return rating_event(
            user=pseudonym(req.user, key),
            response_id=req.response_id,
            conversation_id=first.conversation_id,
            prompt_group=first.prompt_group,
            model=first.model,
            rating=req.rating,
            reason=req.reason,
            comment=mask_pii(req.comment)[0] if req.comment else None,
        )
    if any(turns[r].prompt_group != first.prompt_group for r in req.rejected_ids):
        raise InvalidRequest("rejected_ids: not siblings of chosen_id (same conversation and prompt)", param="rejected_ids")
    return preference_event(
        user=pseudonym(req.user, key),
        chosen_id=req.chosen_id,
        rejected_ids=req.rejected_ids,
        conversation_id=first.conversation_id,
        prompt_group=first.prompt_group,
        model=first.model,
    )


async def create_feedback(request: Request) -> Response:
    """``POST /v1/feedback``: 400 bad body, 404 unknown response, else published."""
    service: ChatService = request.app.state.service
    conversations: ConversationStore = request.app.state.conversations
    req = parse_feedback(await read_json(request, 16_384))
    turns: dict[str, TurnInfo] = {}
    for rid in req.response_ids:
        info = await service.turn_info(rid, conversations, owner_of(request))
        if info is None:
            raise NotFound(f"No completed response found with id '{rid}'.", type="NotFoundError", param="response_id", code="response_not_found")
        turns[rid] = info
    req, turns = as_recorded(req, turns, service.relay.current)
    event = feedback_event(req, turns, request.app.state.settings.pseudonym_key_bytes())
    try:
        await service.feedback.publish(event)
    except Exception as exc:
        log.exception("publishing feedback %s failed", event.feedback_id)
        raise APIError(503, "the message bus is unavailable, try again", type="service_unavailable") from exc
    return ORJSONResponse({"id": event.feedback_id, "object": "feedback", "status": "accepted", "event_id": event.event_id})


ROUTES: list[BaseRoute] = [protected("/v1/feedback", create_feedback, ["POST"])]
