"""The safety review queue over HTTP: ``GET /v1/review``, ``POST /v1/review/decisions`` (both behind API
keys when the edge has them) and the ``/review`` page (a static shell whose data comes from those routes).

* ``GET /v1/review?status=open|decided|all&limit=N`` (default ``open``, 50; at most 500): ``{"object":
  "list", "data": [item, …]}``, newest first. An item is the ``safety_review`` document
  (:mod:`consumers.review`): ``id`` (the correlation id), ``kind`` (``blocked`` / ``flagged`` /
  ``retracted``), ``category``, ``reason``, ``score``, ``margin``, ``scores``, ``policy_version``,
  ``prompt`` (messages, PII-masked), ``response`` (what the user was shown), ``withdrawn`` (a retracted
  answer, masked), ``status``, ``decision``.
* ``POST /v1/review/decisions`` with ``{"correlation_id": "chatcmpl-…", "decision": "correct_block" |
  "should_have_answered" | "harmful_answer", "reviewer": str, "note": str ≤ 2000, "answer": str}``
  (``answer``: optional, the answer an unnecessary refusal should have given): 400 for a bad body, 404
  for a turn with no review item, 503 when the bus is down; else the :class:`~schemas.events.ReviewDecision`
  is published to ``safety.review`` and the answer is ``{"id": event_id, "object": "review.decision",
  "status": "accepted"}``. The recorder applies it (the audit log, the preference records).
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field
from pymongo.asynchronous.database import AsyncDatabase
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from edge.auth import protected
from edge.errors import APIError
from edge.http import ORJSONResponse, read_json, validate_body
from edge.ops import page
from edge.turns import ChatService
from producers.review import REVIEW_COLLECTION, publish_decision
from schemas.errors import InvalidRequest, NotFound
from schemas.events import ReviewVerdict

log = logging.getLogger(__name__)

REVIEW = REVIEW_COLLECTION
STATUSES = ("open", "decided", "all")


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    correlation_id: str = Field(min_length=1, max_length=128, pattern=r"^chatcmpl-[A-Za-z0-9]+$")
    decision: ReviewVerdict
    reviewer: str = Field(min_length=1, max_length=200)
    note: str = Field(default="", max_length=2000)
    answer: str | None = Field(default=None, min_length=1, max_length=20000)


def parse_decision(payload: object) -> DecisionRequest:
    """The request, or a 400 naming the first problem."""
    return validate_body(DecisionRequest, payload)


def public_item(doc: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k != "_id"}
    return {"id": doc["_id"], "object": "review.item", **out}


async def list_review(request: Request) -> Response:
    db: AsyncDatabase[dict[str, Any]] = request.app.state.db
    status = request.query_params.get("status", "open")
    if status not in STATUSES:
        raise InvalidRequest(f"status: one of {', '.join(STATUSES)}", param="status")
    try:
        limit = int(request.query_params.get("limit", "50"))
    except ValueError:
        raise InvalidRequest("limit: an integer", param="limit") from None
    if not 1 <= limit <= 500:
        raise InvalidRequest("limit: between 1 and 500", param="limit")
    query = {} if status == "all" else {"status": status}
    docs = [d async for d in db[REVIEW].find(query).sort("created_at", -1).limit(limit)]
    return ORJSONResponse({"object": "list", "data": [public_item(d) for d in docs]})


async def create_decision(request: Request) -> Response:
    db: AsyncDatabase[dict[str, Any]] = request.app.state.db
    service: ChatService = request.app.state.service
    req = parse_decision(await read_json(request, 65_536))
    try:
        event = await publish_decision(
            service.producer,
            db,
            service.settings.topic_prefix,
            correlation_id=req.correlation_id,
            decision=req.decision,
            reviewer=req.reviewer,
            note=req.note,
            answer=req.answer,
        )
    except KafkaError as exc:
        log.exception("publishing a review decision for %s failed", req.correlation_id)
        raise APIError(503, "the message bus is unavailable, try again", type="service_unavailable") from exc
    if event is None:
        raise NotFound(f"No review item for turn '{req.correlation_id}'.", type="NotFoundError", param="correlation_id", code="review_item_not_found")
    return ORJSONResponse({"id": event.event_id, "object": "review.decision", "status": "accepted"})


ROUTES: list[BaseRoute] = [
    protected("/v1/review", list_review, ["GET"]),
    protected("/v1/review/decisions", create_decision, ["POST"]),
    Route("/review", page("review.html"), methods=["GET"]),
]
