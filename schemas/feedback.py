"""Feedback events and the preference records built from them (the analysts' topics).

* ``chat.feedback`` (key: conversation id) — :class:`FeedbackEvent`: a thumbs rating of one response
  (with an optional reason from :data:`REASONS` and a comment) or a pairwise preference between sibling
  responses (responses to the same prompt in the same conversation: a regenerate makes a sibling).
  A vote has a stable ``feedback_id`` (who voted on what, :func:`feedback_id`): voting again publishes
  the same id with a later ``created_at``, and every reader keeps the latest — an update, never a
  duplicate. ``rating: null`` withdraws a rating.
* ``dpo.pairs`` (key: record id, compacted) — :class:`DpoPair`, TRL's conversational preference format
  ``{prompt: [messages], chosen: [assistant message], rejected: [assistant message]}``
  (https://huggingface.co/docs/trl/dataset_formats#preference) plus ``metadata``.
* ``kto.examples`` (key: record id, compacted) — :class:`KtoExample`, TRL's conversational unpaired
  preference format ``{prompt: [messages], completion: [assistant message], label: bool}``
  (https://huggingface.co/docs/trl/dataset_formats#unpaired-preference) plus ``metadata``.

A record that no longer holds (a vote changed or was withdrawn) is deleted: a tombstone (the record id
as key, a null value) on its topic, and the document removed from the database.

Sibling responses share a :func:`prompt_group`: a hash of the conversation id and the PII-masked prompt
messages, so the edge, the feedback app and analysts compute the same value from the same turn.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from schemas.events import ChatMessage, DecodeError, _Envelope, _Model, check_envelope, invalid, load_json

# The fixed list of reasons a person can give with a rating (the page shows them; the API accepts no others).
REASONS: dict[str, str] = {
    "not_factual": "Not factually correct",
    "ignored_instructions": "Didn't follow instructions",
    "refused_unnecessarily": "Refused when it shouldn't have",
    "unsafe": "Unsafe or harmful",
    "style": "Style or tone",
    "other": "Other",
}
Reason = Literal["not_factual", "ignored_instructions", "refused_unnecessarily", "unsafe", "style", "other"]
Rating = Literal["up", "down"]
MAX_COMMENT_CHARS = 2000


def _digest(*parts: str, size: int = 24) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\x00")
    return h.hexdigest()[:size]


def prompt_group(conversation_id: str, messages: Iterable[ChatMessage | dict[str, Any]]) -> str:
    """The id siblings share: ``pg-`` + 24 hex of sha256(conversation id, then each message's role and
    content). ``messages`` must be PII-masked (:func:`core.pii.mask_pii`), as stored and as on
    ``chat.screened``."""
    parts = [conversation_id]
    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, ChatMessage) else (str(m["role"]), str(m["content"]))
        parts += [role, content]
    return "pg-" + _digest(*parts)


def feedback_id(kind: str, user: str | None, target: str) -> str:
    """A vote's stable id: ``fb-`` + 24 hex of sha256(kind, user, target), where the target is the rated
    response id (rating) or the prompt group (preference). The same person voting again gets the same id."""
    return "fb-" + _digest(kind, user or "", target)


def dpo_record_id(chosen_id: str, rejected_id: str) -> str:
    return "dpo-" + _digest(chosen_id, rejected_id)


def kto_record_id(response_id: str) -> str:
    return "kto-" + _digest(response_id)


class FeedbackEvent(_Envelope):
    """``chat.feedback``: one vote. ``kind="rating"`` sets ``response_id`` and ``rating`` (``None``
    withdraws it), optionally ``reason`` and ``comment`` (PII-masked by the edge); ``kind="preference"``
    sets ``chosen_id`` and ``rejected_ids`` (siblings of ``chosen_id``, same ``prompt_group``)."""

    event_type: Literal["chat.feedback"] = "chat.feedback"
    feedback_id: str
    kind: Literal["rating", "preference"]
    conversation_id: str
    prompt_group: str
    response_id: str | None = None
    rating: Rating | None = None
    reason: Reason | None = None
    comment: str | None = Field(default=None, max_length=MAX_COMMENT_CHARS)
    chosen_id: str | None = None
    rejected_ids: list[str] = Field(default_factory=list)
    user: str | None = None
    model: str = ""

    @model_validator(mode="after")
    def _shape(self) -> FeedbackEvent:
        if self.kind == "rating" and not self.response_id:
            raise ValueError("a rating needs response_id")
        if self.kind == "preference":
            if not self.chosen_id or not self.rejected_ids:
                raise ValueError("a preference needs chosen_id and rejected_ids")
            if self.chosen_id in self.rejected_ids:
                raise ValueError("chosen_id is also in rejected_ids")
        return self

    @property
    def key(self) -> bytes:
        return self.conversation_id.encode()


class Message(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class DpoMetadata(_Model):
    """Where a pair came from: enough ids to trace it back to its turns and votes."""

    source: Literal["explicit_preference", "inferred_from_ratings", "safety_review"]
    conversation_id: str
    prompt_group: str
    chosen_id: str  # correlation ids of the two responses (``chatcmpl-…``)
    rejected_id: str
    feedback_ids: list[str]
    model: str
    user: str | None = None
    chosen_reason: str | None = None  # the rating reasons, when inferred from ratings
    rejected_reason: str | None = None


class DpoPair(_Envelope):
    """``dpo.pairs``: one preference pair in TRL's conversational format, plus ``metadata``."""

    event_type: Literal["dpo.pair"] = "dpo.pair"
    record_id: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    metadata: DpoMetadata

    @property
    def key(self) -> bytes:
        return self.record_id.encode()


class KtoMetadata(_Model):
    conversation_id: str
    prompt_group: str
    response_id: str
    feedback_id: str
    rating: Rating
    reason: str | None = None
    comment: str | None = None
    model: str
    user: str | None = None


class KtoExample(_Envelope):
    """``kto.examples``: one rated response in TRL's conversational unpaired format, plus ``metadata``."""

    event_type: Literal["kto.example"] = "kto.example"
    record_id: str
    prompt: list[Message]
    completion: list[Message]
    label: bool  # True: thumbs up (desirable), False: thumbs down
    metadata: KtoMetadata

    @property
    def key(self) -> bytes:
        return self.record_id.encode()


FEEDBACK_TYPES: dict[str, type[_Envelope]] = {"chat.feedback": FeedbackEvent, "dpo.pair": DpoPair, "kto.example": KtoExample}


def decode_feedback(raw: bytes | None) -> FeedbackEvent:
    """Bytes from ``chat.feedback`` to a :class:`FeedbackEvent`. Raises :class:`DecodeError` with a reason."""
    data = check_envelope(load_json(raw))
    if data.get("event_type") != "chat.feedback":
        raise DecodeError(f"expected chat.feedback, got {data.get('event_type')!r}")
    try:
        return FeedbackEvent.model_validate(data)
    except ValidationError as exc:
        raise invalid("chat.feedback", exc) from None


# --- the feedback app's internal topic ------------------------------------------------------------------
class CandidateRecord(_Model):
    """One record a prompt group should have now: a :class:`DpoPair` or :class:`KtoExample` as JSON."""

    kind: Literal["dpo", "kto"]
    record: dict[str, Any]


class CandidateDrop(_Model):
    """A record that must not exist, and why (``consumers.curation.Drop``)."""

    record_id: str
    kind: Literal["dpo", "kto"]
    reason: str
    prompt_group: str
    conversation_id: str = ""
    response_ids: list[str] = Field(default_factory=list)


class CurationCandidate(_Model):
    """``<app id>-candidates`` (key: prompt group, 1 partition): a prompt group's complete current set
    of records, sent by the feedback app's joiner to its curator (which dedups prompts and publishes)."""

    prompt_group: str
    conversation_id: str = ""
    prompt: list[dict[str, str]] | None = None  # the group's masked prompt messages, once known
    records: list[CandidateRecord]
    drops: list[CandidateDrop]
    pending: list[str] = Field(default_factory=list)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> CurationCandidate:
        """Raises :class:`~schemas.events.DecodeError` if ``raw`` is not a candidate."""
        try:
            return cls.model_validate_json(raw or b"")
        except ValidationError as exc:
            raise DecodeError(f"not a curation candidate: {exc.errors()[:3]}") from None


RECORD_COLLECTIONS = {"dpo": "dpo_pairs", "kto": "kto_examples"}  # the MongoDB collections of curated records


def record_document(record: DpoPair | KtoExample) -> dict[str, Any]:
    """The MongoDB document of a record (``dpo_pairs`` / ``kto_examples``): its JSON, ``_id`` = record id, ``updated_at``."""
    return {**record.model_dump(mode="json"), "_id": record.record_id, "updated_at": time.time()}
