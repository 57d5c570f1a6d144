"""Read side of the chat page and the dashboard: conversations, turns, votes and record counts from the
MongoDB API (written by the recorder, :mod:`consumers.recorder`, and the feedback app).

Every lookup filters on ``_id`` (FerretDB v1 pushes only those down): a conversation's turns by their ids,
its votes by their stable ids (:func:`schemas.feedback.feedback_id` of the conversation's user and each
turn or prompt group). The dashboard scans the window it shows (see :meth:`ConversationStore.dashboard`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

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


class ConversationStore:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self.db = db

    async def list(self, user: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first: ``[{id, title, created_at, updated_at, turns}]`` (epoch seconds); only ``user``'s
        conversations when given."""
        query: dict[str, Any] = {"user": user} if user else {}
        cursor = self.db.conversations.find(query, {"title": 1, "created_at": 1, "updated_at": 1, "turn_ids": 1}).sort("updated_at", -1).limit(limit)
        return [
            {
                "id": c["_id"],
                "title": c.get("title") or "(untitled)",
                "created_at": c.get("created_at"),
                "updated_at": c.get("updated_at"),
                "turns": len(c.get("turn_ids") or []),
            }
            async for c in cursor
        ]

    async def get(self, conversation_id: str) -> dict[str, Any] | None:
        """The conversation with its turns (oldest first), each turn's vote, and explicit preferences by
        prompt group — the shape ``GET /v1/conversations/{id}`` returns. None if unknown."""
        conv = await self.db.conversations.find_one({"_id": conversation_id})
        if conv is None:
            return None
        user = conv.get("user")
        ids = list(conv.get("turn_ids") or [])
        docs = [d async for d in self.db.turns.find({"_id": {"$in": ids}})] if ids else []
        docs.sort(key=lambda d: d.get("created_at") or 0.0)
        turns = []
        for d in docs:
            messages = d.get("messages") or []
            answer = d.get("answer")
            verdict = d.get("verdict")
            turns.append(
                {
                    "id": d["_id"],
                    "created_at": d.get("created_at"),
                    "prompt_group": prompt_group(conversation_id, messages),
                    "messages": messages,
                    "answer": None
                    if answer is None
                    else {k: answer.get(k) for k in ("text", "finish_reason", "citations", "model", "completed_at")},
                    "verdict": None if verdict is None else {k: verdict.get(k) for k in ("allowed", "category", "flags")},
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
        d = await self.db.turns.find_one({"_id": correlation_id}, {"conversation_id": 1, "messages": 1, "answer": 1, "model": 1})
        if d is None or not d.get("answer") or not d.get("conversation_id"):
            return None
        conv = d["conversation_id"]
        answer = d["answer"]
        return TurnInfo(correlation_id, conv, prompt_group(conv, d.get("messages") or []), answer.get("model") or d.get("model", ""), answer.get("finish_reason", ""))

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
        async for d in self.db.turns.find({"answer.completed_at": {"$gte": start}}, {"answer.finish_reason": 1, "answer.completed_at": 1}):
            answer = d.get("answer") or {}
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
