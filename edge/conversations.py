"""Read side of the chat page and the dashboard: conversations, turns, votes and record counts from the
MongoDB API (written by the recorder, :mod:`consumers.recorder`, and the feedback app).

Every lookup filters on ``_id`` (FerretDB v1 pushes only those down): a conversation's turns by their ids,
its votes by their stable ids (:func:`schemas.feedback.feedback_id` of the conversation's user and each
turn or prompt group). The dashboard scans the window it shows (see :meth:`ConversationStore.dashboard`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from pymongo.asynchronous.database import AsyncDatabase

from schemas.documents import ANSWER_SHOWN, CONVERSATIONS, ID, TURNS, VERDICT_SHOWN, Answer, Conversation, ConversationDoc, Turn, TurnDoc
from schemas.feedback import feedback_id, prompt_group

# finish reasons as the dashboard groups them
OUTCOMES = {"stop": "answered", "length": "answered", "content_filter": "refused", "cancelled": "cancelled", "error": "error"}


@dataclass(frozen=True)
class TurnInfo:
    """What feedback validation needs of a completed turn."""

    correlation_id: str
    conversation_id: str
    prompt_group: str
    model: str
    finish_reason: str
    owner: str | None = None


class ConversationStore:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self.db = db
        self.conversations = db[CONVERSATIONS]
        self.turns = db[TURNS]

    async def list(self, user: str | None, limit: int, owner: str | None = None) -> list[dict[str, Any]]:
        """Newest first: ``[{id, title, created_at, updated_at, turns}]`` (epoch seconds); only ``user``'s
        conversations when given, and only ``owner``'s (an API key identity) when given."""
        query: dict[str, Any] = {Conversation.USER: user} if user else {}
        if owner is not None:
            query[Conversation.OWNER] = owner
        fields = (Conversation.TITLE, Conversation.CREATED_AT, Conversation.UPDATED_AT, Conversation.TURN_IDS)
        cursor = self.conversations.find(query, dict.fromkeys(fields, 1)).sort(Conversation.UPDATED_AT, -1).limit(limit)
        listed = []
        async for raw in cursor:
            c = cast(ConversationDoc, raw)
            listed.append(
                {
                    "id": raw[ID],
                    "title": c.get("title") or "(untitled)",
                    "created_at": c.get("created_at"),
                    "updated_at": c.get("updated_at"),
                    "turns": len(c.get("turn_ids") or []),
                }
            )
        return listed

    async def get(self, conversation_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """The conversation with its turns (oldest first), each turn's vote, and explicit preferences by
        prompt group — the shape ``GET /v1/conversations/{id}`` returns. None if unknown, or (``owner``
        given) another key's."""
        found = await self.conversations.find_one({ID: conversation_id})
        if found is None or (owner is not None and found.get(Conversation.OWNER) != owner):
            return None
        conv = cast(ConversationDoc, found)
        user = conv.get("user")
        ids = list(conv.get("turn_ids") or [])
        docs = [d async for d in self.turns.find({ID: {"$in": ids}})] if ids else []
        if owner is not None:
            docs = [d for d in docs if d.get(Turn.OWNER) in (owner, None)]
        docs.sort(key=lambda d: d.get(Turn.CREATED_AT) or 0.0)
        turns = []
        for raw in docs:
            d = cast(TurnDoc, raw)
            messages = d.get("messages") or []
            answer = d.get("answer")
            verdict = d.get("verdict")
            turns.append(
                {
                    "id": raw[ID],
                    "created_at": d.get("created_at"),
                    "prompt_group": prompt_group(conversation_id, messages),  # type: ignore[arg-type]
                    "messages": messages,
                    "answer": None if answer is None else {k: answer.get(k) for k in ANSWER_SHOWN},
                    "verdict": None if verdict is None else {k: verdict.get(k) for k in VERDICT_SHOWN},
                    "feedback": None,
                }
            )
        groups = sorted({t["prompt_group"] for t in turns})
        wanted = {feedback_id("rating", user, t["id"]): t for t in turns}
        wanted_groups = {feedback_id("preference", user, g): g for g in groups}
        preferences: dict[str, dict[str, Any]] = {}
        if wanted or wanted_groups:
            async for f in self.db.feedback.find({"_id": {"$in": [*wanted, *wanted_groups]}}):
                if f["_id"] in wanted and f.get("rating") is not None:
                    wanted[f["_id"]]["feedback"] = {k: f.get(k) for k in ("rating", "reason", "comment")}
                elif f["_id"] in wanted_groups:
                    preferences[wanted_groups[f["_id"]]] = {"chosen_id": f.get("chosen_id"), "rejected_ids": f.get("rejected_ids") or []}
        return {
            "id": conversation_id,
            "object": "conversation",
            "title": conv.get("title") or "(untitled)",
            "user": user,
            "created_at": conv.get("created_at"),
            "updated_at": conv.get("updated_at"),
            "turns": turns,
            "preferences": preferences,
        }

    async def turn(self, correlation_id: str) -> TurnInfo | None:
        """A completed turn (one with an answer), or None."""
        found = await self.turns.find_one({ID: correlation_id}, dict.fromkeys((Turn.CONVERSATION_ID, Turn.MESSAGES, Turn.ANSWER, Turn.MODEL, Turn.OWNER), 1))
        d = cast(TurnDoc | None, found)
        if d is None or not d.get("answer") or not d.get("conversation_id"):
            return None
        conv = d["conversation_id"]
        answer = d["answer"]
        messages = d.get("messages") or []
        model = answer.get("model") or d.get("model", "")
        return TurnInfo(correlation_id, conv, prompt_group(conv, messages), model, answer.get("finish_reason", ""), d.get("owner"))  # type: ignore[arg-type]

    async def turn_state(self, correlation_id: str) -> tuple[str, bool, str | None] | None:
        """``(conversation_id, answered, owner)`` of a recorded turn, or None if the recorder has not seen it."""
        found = await self.turns.find_one({ID: correlation_id}, {Turn.CONVERSATION_ID: 1, Answer.FINISH_REASON_PATH: 1, Turn.OWNER: 1})
        d = cast(TurnDoc | None, found)
        if d is None or not d.get("conversation_id"):
            return None
        return d["conversation_id"], bool(d.get("answer")), d.get("owner")

    async def conversation_owner(self, conversation_id: str) -> tuple[bool, str | None]:
        """``(exists, owner)`` of a conversation."""
        found = await self.conversations.find_one({ID: conversation_id}, {Conversation.OWNER: 1})
        return (found is not None, None if found is None else found.get(Conversation.OWNER))

    async def dashboard(self, hours: float, bucket_s: int) -> dict[str, Any]:
        """Outcomes of turns per ``bucket_s`` over the last ``hours`` (answered / refused / cancelled /
        error, by the completion's finish reason and time), thumbs up/down counts, and DPO pairs and KTO
        examples collected (cumulative per bucket, and totals). Epoch seconds.

        Scans the turns completed in the window and every vote and record (fine for a dashboard of one
        deployment's recent days; a large deployment would pre-aggregate)."""
        now = time.time()
        start = (now - hours * 3600) // bucket_s * bucket_s
        n = int((now - start) // bucket_s) + 1
        ts = [start + i * bucket_s for i in range(n)]
        outcomes: dict[str, list[int]] = {k: [0] * n for k in ("answered", "refused", "cancelled", "error")}
        turns = 0
        async for d in self.turns.find({Answer.COMPLETED_AT_PATH: {"$gte": start}}, {Answer.FINISH_REASON_PATH: 1, Answer.COMPLETED_AT_PATH: 1}):
            answer = d.get(Turn.ANSWER) or {}
            at, kind = answer.get("completed_at"), OUTCOMES.get(answer.get("finish_reason", ""))
            if kind is None or not isinstance(at, (int, float)) or at < start:
                continue
            outcomes[kind][min(n - 1, int((at - start) // bucket_s))] += 1
            turns += 1
        thumbs = {"up": 0, "down": 0}
        async for f in self.db.feedback.find({"kind": "rating"}, {"rating": 1}):
            if f.get("rating") in thumbs:
                thumbs[f["rating"]] += 1
        records: dict[str, Any] = {"t": ts}
        totals: dict[str, int] = {"turns": turns}
        for name, coll in (("dpo", self.db.dpo_pairs), ("kto", self.db.kto_examples)):
            per = [0] * n
            before = total = 0
            async for r in coll.find({}, {"created_at": 1}):
                total += 1
                at = r.get("created_at")
                if not isinstance(at, (int, float)) or at < start:
                    before += 1
                else:
                    per[min(n - 1, int((at - start) // bucket_s))] += 1
            running, cumulative = before, []
            for c in per:
                running += c
                cumulative.append(running)
            records[name] = cumulative
            totals[name] = total
        return {"bucket_s": bucket_s, "outcomes": {"t": ts, **outcomes}, "thumbs": thumbs, "records": records, "totals": totals}
