"""Curation of preference records: the pure rules the feedback app applies before anything is emitted.

Inputs are the feedback app's table values (plain dicts, JSON-serialisable, see :mod:`consumers.feedback_app`):

* a **turn** (:class:`TurnState`): what ``chat.screened`` and the completion on ``chat.replies`` told about
  one response (``correlation_id``); either half may still be missing;
* a **vote** (:class:`Vote`): the latest rating of one response (``rating`` ``None`` = withdrawn);
* a **preference** (:class:`Preference`): the latest explicit preference of a prompt group.

:func:`build_group` turns one prompt group's turns, votes and preference into the records that should
exist now (:class:`schemas.feedback.DpoPair` / :class:`schemas.feedback.KtoExample`), the records that
must not exist (:class:`Drop`, with a reason) and the record ids still waiting for a missing half
(``pending``). Rules, in order:

1. Pairs: an explicit preference gives ``explicit_preference`` pairs (chosen × each rejected id); only a
   group *without* one gets ``inferred_from_ratings`` pairs (every up-voted × down-voted sibling).
   KTO: every rated response gives one example, ``label = rating == "up"``.
2. A record involving a **blocked** turn (``finish_reason == "content_filter"`` or a verdict not
   allowed), a **flagged** turn (verdict ``flags`` non-empty) or an **unfinished** one (``cancelled``,
   ``error``) is dropped; so is a pair whose two responses read the same (no preference signal).
3. Every prompt, completion and comment is PII-masked (:func:`core.pii.mask_pii`) again —
   turns arrive masked from the safety stage; masking is idempotent, this guards against a stage that
   forgot.

Near-duplicate prompts across prompt groups are collapsed by :class:`PromptDeduper` (MinHash + LSH,
datasketch). Choice and source: Jaccard similarity of **character 5-gram shingles** of the normalised
prompt (NFKC, lower case, punctuation → space, whitespace collapsed), the resemblance measure of Broder
(1997, "On the resemblance and containment of documents"), estimated with 128 MinHash permutations and
indexed with ``MinHashLSH(threshold=0.8)`` as in the datasketch docs
(https://ekzhu.com/datasketch/lsh.html). 0.8 is the threshold Lee et al. (2022, "Deduplicating Training
Data Makes Language Models Better", NearDup) used for MinHash dedup of training text. Character shingles
rather than word 5-grams because chat prompts are short: a 6-word question has two word 5-grams, so one
changed word would make it "different". LSH candidates are confirmed by their estimated Jaccard, so a
band collision alone never drops a group.

Record ids are deterministic (:func:`schemas.feedback.dpo_record_id`, :func:`schemas.feedback.kto_record_id`):
voting again updates the same record. A record's ``created_at`` is the latest ``created_at`` of the votes
it derives from (so ``--since`` exports select by when people voted, and an unchanged record is
byte-identical apart from ``event_id``: see :func:`record_digest`).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import orjson
from datasketch import MinHash, MinHashLSH

from core.pii import mask_pii
from schemas.feedback import DpoMetadata, DpoPair, KtoExample, KtoMetadata, Message, dpo_record_id, kto_record_id

UNFINISHED = ("cancelled", "error")
SHINGLE_CHARS = 5
NUM_PERM = 128
DEDUP_THRESHOLD = 0.8
MINHASH_SEED = 1
MINHASH_SCHEME: Literal["affine32"] = "affine32"


class TurnState(TypedDict, total=False):
    """``turns`` table value (key: correlation id). ``prompt`` comes from ``chat.screened``; ``text`` and
    ``finish_reason`` from the completion; ``allowed``/``flags`` from whichever verdict was seen (both are
    merged: allowed is False if either said so, flags are the union)."""

    correlation_id: str
    conversation_id: str
    prompt_group: str | None
    prompt: list[dict[str, str]] | None
    allowed: bool | None
    flags: list[str]
    text: str | None
    finish_reason: str | None
    model: str


class Vote(TypedDict, total=False):
    """``votes`` table value (key: response id): the latest rating event of that response."""

    feedback_id: str
    response_id: str
    conversation_id: str
    prompt_group: str
    rating: str | None  # "up" | "down"; None: withdrawn
    reason: str | None
    comment: str | None
    user: str | None
    model: str
    created_at: float


class Preference(TypedDict, total=False):
    """``preferences`` table value (key: prompt group): the latest explicit preference."""

    feedback_id: str
    conversation_id: str
    prompt_group: str
    chosen_id: str
    rejected_ids: list[str]
    user: str | None
    model: str
    created_at: float


@dataclass(frozen=True)
class Drop:
    """A record that must not exist, and why (``blocked``, ``flagged:…``, ``unfinished:…``, ``identical_responses``,
    ``near_duplicate_prompt:<prompt group>``)."""

    record_id: str
    kind: Literal["dpo", "kto"]
    reason: str
    prompt_group: str
    conversation_id: str
    response_ids: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id,
            "kind": self.kind,
            "reason": self.reason,
            "prompt_group": self.prompt_group,
            "conversation_id": self.conversation_id,
            "response_ids": list(self.response_ids),
        }


@dataclass
class GroupRecords:
    """What one prompt group should hold now."""

    prompt_group: str
    records: list[DpoPair | KtoExample] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # record ids waiting for a turn's missing half
    prompt: list[dict[str, str]] | None = None  # the group's masked prompt, once known


def mask(text: str | None) -> str | None:
    return None if text is None else mask_pii(text)[0]


def turn_problem(turn: TurnState | None) -> str | None:
    """Why a turn may not be used (``blocked``, ``flagged:a,b``, ``unfinished:<reason>``), ``"pending"``
    while what is known does not decide yet, or ``None`` when it is usable."""
    if turn is None:
        return "pending"
    if turn.get("finish_reason") == "content_filter" or turn.get("allowed") is False:
        return "blocked"
    if turn.get("flags"):
        return "flagged:" + ",".join(sorted(turn.get("flags") or []))
    if turn.get("finish_reason") in UNFINISHED:
        return f"unfinished:{turn.get('finish_reason')}"
    if turn.get("text") is None or turn.get("finish_reason") is None or turn.get("prompt") is None:
        return "pending"
    return None


def _messages(messages: Iterable[Mapping[str, str]]) -> list[Message]:
    return [Message.model_validate({"role": m["role"], "content": mask(m["content"]) or ""}) for m in messages]


def _answer(turn: TurnState) -> list[Message]:
    return [Message(role="assistant", content=mask(turn.get("text")) or "")]


def _pair(
    group: GroupRecords,
    conversation_id: str,
    turns: Mapping[str, TurnState],
    chosen: str,
    rejected: str,
    *,
    source: Literal["explicit_preference", "inferred_from_ratings"],
    feedback_ids: list[str],
    user: str | None,
    created_at: float,
    reasons: tuple[str | None, str | None] = (None, None),
) -> None:
    rid = dpo_record_id(chosen, rejected)
    problems = [(side, turn_problem(turns.get(cid))) for side, cid in (("chosen", chosen), ("rejected", rejected))]
    for side, problem in problems:
        if problem is not None and problem != "pending":
            group.drops.append(Drop(rid, "dpo", f"{side} {problem}", group.prompt_group, conversation_id, (chosen, rejected)))
            return
    if any(problem == "pending" for _, problem in problems):
        group.pending.append(rid)
        return
    c, r = turns[chosen], turns[rejected]
    chosen_msgs, rejected_msgs = _answer(c), _answer(r)
    if chosen_msgs[0].content.strip() == rejected_msgs[0].content.strip():
        group.drops.append(Drop(rid, "dpo", "identical_responses", group.prompt_group, conversation_id, (chosen, rejected)))
        return
    group.records.append(
        DpoPair(
            record_id=rid,
            created_at=created_at,
            prompt=_messages(c.get("prompt") or []),
            chosen=chosen_msgs,
            rejected=rejected_msgs,
            metadata=DpoMetadata(
                source=source,
                conversation_id=conversation_id,
                prompt_group=group.prompt_group,
                chosen_id=chosen,
                rejected_id=rejected,
                feedback_ids=feedback_ids,
                model=c.get("model") or r.get("model") or "",
                user=user,
                chosen_reason=reasons[0],
                rejected_reason=reasons[1],
            ),
        )
    )


def build_group(
    prompt_group: str,
    turns: Mapping[str, TurnState],
    votes: Mapping[str, Vote],
    preference: Preference | None,
) -> GroupRecords:
    """The records, drops and pending record ids of one prompt group (see the module docstring).

    ``turns`` and ``votes`` are keyed by response (correlation) id and hold the group's responses only;
    withdrawn votes (``rating`` ``None``) are ignored. Output order is deterministic (sorted ids)."""
    group = GroupRecords(prompt_group)
    for turn in turns.values():
        if turn.get("prompt"):
            group.prompt = _messages_dicts(turn.get("prompt") or [])
            break
    live = {rid: v for rid, v in sorted(votes.items()) if v.get("rating") in ("up", "down")}
    conversation_id = next(
        (x.get("conversation_id", "") for x in (*turns.values(), *live.values(), *([preference] if preference else [])) if x.get("conversation_id")), ""
    )
    if preference is not None:
        chosen = preference["chosen_id"]
        for rejected in sorted(set(preference.get("rejected_ids") or [])):
            _pair(
                group,
                conversation_id,
                turns,
                chosen,
                rejected,
                source="explicit_preference",
                feedback_ids=[preference["feedback_id"]],
                user=preference.get("user"),
                created_at=float(preference.get("created_at") or 0.0),
            )
    else:
        ups = [v for v in live.values() if v.get("rating") == "up"]
        downs = [v for v in live.values() if v.get("rating") == "down"]
        for up in ups:
            for down in downs:
                _pair(
                    group,
                    conversation_id,
                    turns,
                    up["response_id"],
                    down["response_id"],
                    source="inferred_from_ratings",
                    feedback_ids=[up["feedback_id"], down["feedback_id"]],
                    user=up.get("user") or down.get("user"),
                    created_at=max(float(up.get("created_at") or 0.0), float(down.get("created_at") or 0.0)),
                    reasons=(up.get("reason"), down.get("reason")),
                )
    for response_id, vote in live.items():
        rid = kto_record_id(response_id)
        maybe_turn = turns.get(response_id)
        problem = turn_problem(maybe_turn)
        if problem == "pending":
            group.pending.append(rid)
            continue
        if problem is not None:
            group.drops.append(Drop(rid, "kto", problem, prompt_group, conversation_id, (response_id,)))
            continue
        assert maybe_turn is not None
        turn = maybe_turn
        rating: Literal["up", "down"] = "up" if vote.get("rating") == "up" else "down"
        group.records.append(
            KtoExample(
                record_id=rid,
                created_at=float(vote.get("created_at") or 0.0),
                prompt=_messages(turn.get("prompt") or []),
                completion=_answer(turn),
                label=rating == "up",
                metadata=KtoMetadata(
                    conversation_id=conversation_id,
                    prompt_group=prompt_group,
                    response_id=response_id,
                    feedback_id=vote["feedback_id"],
                    rating=rating,
                    reason=vote.get("reason"),
                    comment=mask(vote.get("comment")),
                    model=turn.get("model") or vote.get("model") or "",
                    user=vote.get("user"),
                ),
            )
        )
    return group


def _messages_dicts(messages: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
    return [m.model_dump() for m in _messages(messages)]


def record_digest(record: DpoPair | KtoExample) -> str:
    """sha256 of a record without its ``event_id``: equal digests mean nothing an analyst sees changed."""
    data = record.model_dump(mode="json", exclude={"event_id"})
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


# --- near-duplicate prompts -------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[^\w]+")


def normalise_prompt(messages: Iterable[Mapping[str, str]]) -> str:
    """The text compared for duplicates: every message's content (roles left out), NFKC, lower case,
    punctuation as spaces, whitespace collapsed."""
    text = "\n".join(str(m.get("content", "")) for m in messages)
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_NON_WORD.sub(" ", text).split())


def shingles(text: str, k: int = SHINGLE_CHARS) -> set[bytes]:
    """Character ``k``-grams of ``text`` (the whole text when shorter), as UTF-8 bytes."""
    if len(text) <= k:
        return {text.encode()}
    return {text[i : i + k].encode() for i in range(len(text) - k + 1)}


def minhash(text: str) -> MinHash:
    m = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
    m.update_batch(list(shingles(text)))
    return m


def minhash_from(hashvalues: Iterable[int]) -> MinHash:
    return MinHash(seed=MINHASH_SEED, hashvalues=list(hashvalues), scheme=MINHASH_SCHEME)


class PromptDeduper:
    """Prompt groups clustered by near-duplicate prompts; the first group of a cluster is its canonical one.

    Only canonical groups are indexed, so a later group is compared with the groups that keep records.
    State to persist per prompt group: ``(hashvalues, duplicate_of)`` from :meth:`classify`; :meth:`restore`
    rebuilds the index from it (the feedback app does so lazily after a restart)."""

    def __init__(self, threshold: float = DEDUP_THRESHOLD) -> None:
        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self._hashes: dict[str, MinHash] = {}

    def restore(self, entries: Iterable[tuple[str, list[int], str | None]]) -> None:
        """Index the canonical groups of ``(prompt group, hashvalues, duplicate_of)`` entries."""
        for pg, values, duplicate_of in entries:
            if duplicate_of is None and pg not in self._hashes:
                m = minhash_from(values)
                self.lsh.insert(pg, m)
                self._hashes[pg] = m

    def classify(self, prompt_group: str, text: str) -> tuple[list[int], str | None]:
        """A new prompt group: its MinHash values and the canonical group it duplicates (``None``: it
        is canonical itself, and indexed from now on)."""
        m = minhash(text)
        best: tuple[float, str] | None = None
        for other in self.lsh.query(m):
            other_pg = str(other)
            if other_pg == prompt_group:
                continue
            similarity = m.jaccard(self._hashes[other_pg])
            if similarity >= self.threshold and (best is None or (similarity, other_pg) > best):
                best = (similarity, other_pg)
        values = [int(v) for v in m.hashvalues]
        if best is not None:
            return values, best[1]
        if prompt_group not in self._hashes:
            self.lsh.insert(prompt_group, m)
            self._hashes[prompt_group] = m
        return values, None
