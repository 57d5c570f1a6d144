"""The documents the recorder (:mod:`consumers.recorder`) writes to the MongoDB API and the edge
(:mod:`edge.conversations`) reads: their shape (TypedDicts; every field optional, since events of one turn
arrive in any order and each sets its own fields) and their field names (the constants, also as dotted
paths for queries). Values are what ``model_dump()`` of the event types gives; text is PII-masked.

* ``conversations`` — ``_id`` = conversation id: :class:`ConversationDoc`;
* ``turns`` — ``_id`` = correlation id: :class:`TurnDoc` (``answer``: :class:`AnswerDoc`, ``retrieval``:
  :class:`RetrievalDoc`, ``verdict``: a :class:`schemas.events.SafetyVerdict` dump);
* ``verdicts`` — ``_id`` = correlation id: the safety verdict and its ``conversation_id``.
"""

from __future__ import annotations

from typing import Any, Final, NotRequired, TypedDict

CONVERSATIONS: Final = "conversations"
TURNS: Final = "turns"
VERDICTS: Final = "verdicts"

ID: Final = "_id"


class MessageDoc(TypedDict):
    role: str
    content: str  # masked
    tool_calls: NotRequired[list[dict[str, Any]]]  # an assistant message's ToolCall s, arguments masked
    tool_call_id: NotRequired[str]  # a tool message: the call it answers


class AnswerDoc(TypedDict, total=False):
    text: str  # masked
    finish_reason: str
    model: str
    usage: dict[str, Any]  # Usage
    cost_usd: float  # under the price table when it was recorded (core.usage)
    attempt: str
    error: str | None
    citations: list[dict[str, Any]]  # Citation
    completed_at: float
    retraction: dict[str, Any]  # Retraction (its withdrawn_text PII-masked again); text is then the safety message
    tool_calls: list[dict[str, Any]]  # ToolCall, with finish_reason "tool_calls"
    cache: str  # "exact": served from the response cache (inference_workers.response_cache)


class RetrievalDoc(TypedDict, total=False):
    status: str
    reason: str
    latency_ms: float
    sources: list[dict[str, Any]]  # Passage without its text


class TurnDoc(TypedDict, total=False):
    conversation_id: str
    owner: str  # the API key identity that sent it (absent: an edge without keys)
    model: str
    messages: list[MessageDoc]
    sampling: dict[str, Any]  # SamplingParams
    source: str
    created_at: float
    route: dict[str, Any]  # RouteInfo: how the edge chose the model (edge.routing), when it routed or fell back
    verdict: dict[str, Any]  # SafetyVerdict
    retrieval: RetrievalDoc
    answer: AnswerDoc
    stages: dict[str, float]
    events: list[str]  # event ids recorded ($addToSet)


class ConversationDoc(TypedDict, total=False):
    title: str  # masked, the first user message's first 80 characters
    user: str
    owner: str  # the API key identity of its first turn: only that key sees and continues it
    created_at: float
    updated_at: float
    turn_ids: list[str]


class Turn:
    """Field names of a ``turns`` document."""

    CONVERSATION_ID: Final = "conversation_id"
    OWNER: Final = "owner"
    MODEL: Final = "model"
    MESSAGES: Final = "messages"
    SAMPLING: Final = "sampling"
    SOURCE: Final = "source"
    CREATED_AT: Final = "created_at"
    VERDICT: Final = "verdict"
    RETRIEVAL: Final = "retrieval"
    ANSWER: Final = "answer"
    STAGES: Final = "stages"
    EVENTS: Final = "events"


class Answer:
    """Field names of a turn's ``answer`` (and their dotted paths from the turn)."""

    TEXT: Final = "text"
    FINISH_REASON: Final = "finish_reason"
    MODEL: Final = "model"
    CITATIONS: Final = "citations"
    COMPLETED_AT: Final = "completed_at"
    USAGE: Final = "usage"
    COST_USD: Final = "cost_usd"
    FINISH_REASON_PATH: Final = "answer.finish_reason"
    COMPLETED_AT_PATH: Final = "answer.completed_at"


class Conversation:
    """Field names of a ``conversations`` document."""

    TITLE: Final = "title"
    USER: Final = "user"
    OWNER: Final = "owner"
    CREATED_AT: Final = "created_at"
    UPDATED_AT: Final = "updated_at"
    TURN_IDS: Final = "turn_ids"


# what GET /v1/conversations/{id} shows of a turn's answer and verdict
ANSWER_SHOWN: Final = (Answer.TEXT, Answer.FINISH_REASON, Answer.CITATIONS, Answer.MODEL, Answer.COMPLETED_AT)
VERDICT_SHOWN: Final = ("allowed", "category", "flags")
