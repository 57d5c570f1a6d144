"""The safety review queue: items and decisions from ``safety.review`` into MongoDB, and decisions into
preference records (the recorder runs it: :class:`consumers.recorder.Recorder`).

Collections:

* ``safety_review`` — ``_id`` = correlation id: the :class:`~schemas.events.ReviewItem` (text PII-masked
  again), ``status`` (``open`` / ``decided``) and the latest ``decision``.
* ``safety_audit`` — ``_id`` = the decision's event id: every decision ever made (who, what, when, the
  item's kind, category and policy version), the reviewer's note PII-masked; never the turn's text.

What a decision becomes (records on ``dpo.pairs`` / ``kto.examples`` and in ``dpo_pairs`` /
``kto_examples``, ``metadata.source = "safety_review"``, TRL's conversational format; ids derived from the
correlation id, so a changed decision replaces its records and retracts the ones it no longer makes):

==========================  ===========================================  ================================================
decision                    blocked turn (refused, nothing generated)    retracted / flagged turn (an answer exists)
==========================  ===========================================  ================================================
``correct_block``           KTO: the refusal, desirable                  DPO: the refusal chosen over the answer
``harmful_answer``          KTO: the refusal, desirable                  DPO: the refusal chosen over the answer
``should_have_answered``    KTO: the refusal, undesirable; DPO: the      DPO: the answer chosen over the refusal
                            reviewer's ``answer`` (if given) over it
==========================  ===========================================  ================================================

The edge and the CLI answer a decision for a turn without a review item with a 404 before publishing it;
one that arrives anyway is audited and makes no record. An older decision replayed after a newer one
changes nothing (``created_at`` decides).
"""

from __future__ import annotations

import logging
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from core.pii import mask_pii
from core.safety.output import SAFETY_MESSAGE
from producers.bus import Outgoing
from producers.review import REVIEW_COLLECTION
from schemas.events import ReviewDecision, ReviewItem
from schemas.feedback import (
    RECORD_COLLECTIONS,
    DpoMetadata,
    DpoPair,
    KtoExample,
    KtoMetadata,
    Message,
    dpo_record_id,
    kto_record_id,
    prompt_group,
    record_document,
)
from topics.registry import DPO_PAIRS, KTO_EXAMPLES, topic

log = logging.getLogger(__name__)

REVIEW = REVIEW_COLLECTION
AUDIT = "safety_audit"


def review_document(item: ReviewItem) -> dict[str, Any]:
    """The ``safety_review`` fields of an item (status not included: an upsert sets it only on insert)."""
    return {
        "conversation_id": item.conversation_id,
        "kind": item.kind,
        "category": item.category,
        "reason": item.reason,
        "score": item.score,
        "margin": item.margin,
        "scores": item.scores,
        "flags": item.flags,
        "policy_version": item.policy_version,
        "prompt": [{"role": m.role, "content": mask_pii(m.content)[0]} for m in item.prompt],
        "response": mask_pii(item.response)[0],
        "withdrawn": mask_pii(item.withdrawn)[0],
        "model": item.model,
        "created_at": item.created_at,
    }


def decision_records(item: dict[str, Any], decision: ReviewDecision | None, answer: str = "") -> list[DpoPair | KtoExample]:
    """The preference records ``decision`` makes of the review document ``item`` (see the module table);
    ``answer``: the turn's answer for a flagged item (its stored text). ``None``: no records."""
    if decision is None:
        return []
    cid = decision.correlation_id
    conv = str(item.get("conversation_id", decision.conversation_id))
    prompt = [Message(role=m["role"], content=m["content"]) for m in item.get("prompt", [])]
    pg = prompt_group(conv, [m.model_dump() for m in prompt])
    refusal = str(item.get("response") or SAFETY_MESSAGE)
    generated = str(item.get("withdrawn") or answer)
    model = str(item.get("model", ""))
    refusal_id = f"{cid}:refusal"

    def pair(chosen: tuple[str, str], rejected: tuple[str, str]) -> DpoPair:
        return DpoPair(
            record_id=dpo_record_id(chosen[0], rejected[0]),
            prompt=prompt,
            chosen=[Message(role="assistant", content=chosen[1])],
            rejected=[Message(role="assistant", content=rejected[1])],
            metadata=DpoMetadata(
                source="safety_review",
                conversation_id=conv,
                prompt_group=pg,
                chosen_id=chosen[0],
                rejected_id=rejected[0],
                feedback_ids=[decision.event_id],
                model=model,
                user=decision.reviewer,
                chosen_reason=decision.decision,
            ),
        )

    def refusal_example(desirable: bool) -> KtoExample:
        return KtoExample(
            record_id=kto_record_id(refusal_id),
            prompt=prompt,
            completion=[Message(role="assistant", content=refusal)],
            label=desirable,
            metadata=KtoMetadata(
                conversation_id=conv,
                prompt_group=pg,
                response_id=refusal_id,
                feedback_id=decision.event_id,
                rating="up" if desirable else "down",
                reason=decision.decision,
                comment=mask_pii(decision.note)[0] or None,
                model=model,
                user=decision.reviewer,
            ),
        )

    if item.get("kind") == "blocked" or not generated:
        if decision.decision == "should_have_answered":
            out: list[DpoPair | KtoExample] = [refusal_example(False)]
            if decision.answer:
                out.append(pair((f"{cid}:reviewer", mask_pii(decision.answer)[0]), (refusal_id, refusal)))
            return out
        return [refusal_example(True)]
    if decision.decision == "should_have_answered":
        return [pair((cid, generated), (refusal_id, refusal))]
    return [pair((refusal_id, refusal), (cid, generated))]


class ReviewLog:
    """Applies ``safety.review`` events to ``db`` and returns the records to publish (``prefix``: topic prefix)."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]], prefix: str = "") -> None:
        self.db, self.prefix = db, prefix

    async def on_item(self, item: ReviewItem) -> list[Outgoing]:
        await self.db[REVIEW].update_one({"_id": item.correlation_id}, {"$set": review_document(item), "$setOnInsert": {"status": "open"}}, upsert=True)
        return []

    async def on_decision(self, decision: ReviewDecision) -> list[Outgoing]:
        cid = decision.correlation_id
        item = await self.db[REVIEW].find_one({"_id": cid})
        audit = {
            "correlation_id": cid,
            "conversation_id": decision.conversation_id,
            "decision": decision.decision,
            "reviewer": decision.reviewer,
            "note": mask_pii(decision.note)[0],
            "kind": item.get("kind") if item else None,
            "category": item.get("category") if item else None,
            "policy_version": item.get("policy_version") if item else None,
            "decided_at": decision.created_at,
        }
        await self.db[AUDIT].update_one({"_id": decision.event_id}, {"$set": audit}, upsert=True)
        if item is None:
            log.warning("review decision %s for %s, which has no review item: audited, no records", decision.event_id, cid)
            return []
        previous = item.get("decision")
        if previous is not None and float(previous.get("created_at", 0.0)) > decision.created_at:
            return []  # an older decision replayed after a newer one
        answer = ""
        if item.get("kind") == "flagged":
            turn = await self.db["turns"].find_one({"_id": cid}, {"answer.text": 1})
            answer = str(((turn or {}).get("answer") or {}).get("text", ""))
        records = decision_records(item, decision, answer)
        old = decision_records(item, ReviewDecision.model_validate(previous), answer) if previous else []
        out: list[Outgoing] = []
        keep = {r.record_id for r in records}
        for r in old:
            if r.record_id not in keep:
                kind = "dpo" if isinstance(r, DpoPair) else "kto"
                await self.db[RECORD_COLLECTIONS[kind]].delete_one({"_id": r.record_id})
                out.append(Outgoing(topic(DPO_PAIRS if kind == "dpo" else KTO_EXAMPLES, self.prefix), None, key=r.key))
        for r in records:
            kind = "dpo" if isinstance(r, DpoPair) else "kto"
            await self.db[RECORD_COLLECTIONS[kind]].replace_one({"_id": r.record_id}, record_document(r), upsert=True)
            out.append(Outgoing(topic(DPO_PAIRS if kind == "dpo" else KTO_EXAMPLES, self.prefix), r.to_bytes(), key=r.key))
        stored = {**decision.model_dump(mode="json"), "note": mask_pii(decision.note)[0], "answer": mask_pii(decision.answer)[0] if decision.answer else None}
        await self.db[REVIEW].update_one({"_id": cid}, {"$set": {"status": "decided", "decision": stored}})
        return out
