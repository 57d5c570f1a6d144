"""consumers.curation: the pure rules that decide which preference records exist (no broker, no database)."""

from __future__ import annotations

from typing import Any

from consumers.curation import Preference, PromptDeduper, TurnState, Vote, build_group, normalise_prompt, record_digest, turn_problem
from schemas.feedback import DpoPair, KtoExample, dpo_record_id, feedback_id, kto_record_id

PG = "pg-test"
PROMPT = [{"role": "user", "content": "How do I sort a list in Python?"}]


def turn(cid: str, text: str | None, **kw: Any) -> TurnState:
    t: TurnState = {
        "correlation_id": cid,
        "conversation_id": "conv-1",
        "prompt_group": PG,
        "prompt": PROMPT,
        "allowed": True,
        "flags": [],
        "text": text,
        "finish_reason": "stop",
        "model": "m",
    }
    t.update(kw)  # type: ignore[typeddict-item]
    return t


def vote(cid: str, rating: str | None, at: float = 1.0, **kw: Any) -> Vote:
    v: Vote = {
        "feedback_id": feedback_id("rating", "u1", cid),
        "response_id": cid,
        "conversation_id": "conv-1",
        "prompt_group": PG,
        "rating": rating,
        "reason": None,
        "comment": None,
        "user": "u1",
        "model": "m",
        "created_at": at,
    }
    v.update(kw)  # type: ignore[typeddict-item]
    return v


def pref(chosen: str, rejected: list[str], at: float = 5.0) -> Preference:
    return {
        "feedback_id": feedback_id("preference", "u1", PG),
        "conversation_id": "conv-1",
        "prompt_group": PG,
        "chosen_id": chosen,
        "rejected_ids": rejected,
        "user": "u1",
        "model": "m",
        "created_at": at,
    }


TURNS = {"a": turn("a", "Use sorted(xs)."), "b": turn("b", "Lists cannot be sorted."), "c": turn("c", "xs.sort() sorts in place.")}


def dpo(records: list[Any]) -> list[DpoPair]:
    return [r for r in records if isinstance(r, DpoPair)]


def kto(records: list[Any]) -> list[KtoExample]:
    return [r for r in records if isinstance(r, KtoExample)]


def test_ratings_give_an_inferred_pair_and_one_kto_example_per_rated_response() -> None:
    g = build_group(PG, TURNS, {"a": vote("a", "up", 1.0, reason=None), "b": vote("b", "down", 2.0, reason="not_factual")}, None)
    [pair] = dpo(g.records)
    assert pair.record_id == dpo_record_id("a", "b")
    assert pair.metadata.source == "inferred_from_ratings" and pair.metadata.rejected_reason == "not_factual"
    assert pair.prompt[0].content == PROMPT[0]["content"]
    assert [m.model_dump() for m in pair.chosen] == [{"role": "assistant", "content": "Use sorted(xs)."}]
    assert pair.created_at == 2.0 and sorted(pair.metadata.feedback_ids) == sorted([vote("a", "up")["feedback_id"], vote("b", "up")["feedback_id"]])
    labels = {k.record_id: k.label for k in kto(g.records)}
    assert labels == {kto_record_id("a"): True, kto_record_id("b"): False}
    assert not g.drops and not g.pending


def test_explicit_preference_wins_over_ratings() -> None:
    g = build_group(PG, TURNS, {"a": vote("a", "up"), "b": vote("b", "down")}, pref("b", ["a", "c"]))
    pairs = dpo(g.records)
    assert {p.record_id for p in pairs} == {dpo_record_id("b", "a"), dpo_record_id("b", "c")}
    assert {p.metadata.source for p in pairs} == {"explicit_preference"}
    assert len(kto(g.records)) == 2  # the ratings still make KTO examples


def test_withdrawn_votes_make_nothing() -> None:
    g = build_group(PG, TURNS, {"a": vote("a", "up"), "b": vote("b", None)}, None)
    assert not dpo(g.records) and [k.record_id for k in kto(g.records)] == [kto_record_id("a")]


def test_blocked_flagged_and_unfinished_turns_are_dropped_with_a_reason() -> None:
    turns = {
        "a": turn("a", "fine"),
        "blocked": turn("blocked", "", finish_reason="content_filter", prompt=None),
        "denied": turn("denied", "x", allowed=False),
        "flagged": turn("flagged", "y", flags=["prompt_injection"]),
        "cut": turn("cut", "z", finish_reason="cancelled"),
        "err": turn("err", "", finish_reason="error"),
    }
    votes = {"a": vote("a", "up")} | {k: vote(k, "down") for k in turns if k != "a"}
    g = build_group(PG, turns, votes, None)
    assert [k.record_id for k in kto(g.records)] == [kto_record_id("a")] and not dpo(g.records)
    reasons = {d.record_id: d.reason for d in g.drops}
    assert reasons[kto_record_id("blocked")] == "blocked" and reasons[kto_record_id("denied")] == "blocked"
    assert reasons[kto_record_id("flagged")] == "flagged:prompt_injection"
    assert reasons[kto_record_id("cut")] == "unfinished:cancelled" and reasons[kto_record_id("err")] == "unfinished:error"
    assert reasons[dpo_record_id("a", "flagged")] == "rejected flagged:prompt_injection"
    assert turn_problem(turn("x", "t")) is None and turn_problem(None) == "pending"


def test_missing_halves_are_pending_not_dropped() -> None:
    turns = {"a": turn("a", "fine"), "b": turn("b", None, finish_reason=None)}  # completion not seen yet
    g = build_group(PG, turns, {"a": vote("a", "up"), "b": vote("b", "down"), "c": vote("c", "down")}, None)
    assert set(g.pending) == {dpo_record_id("a", "b"), dpo_record_id("a", "c"), kto_record_id("b"), kto_record_id("c")}
    assert not g.drops and [k.record_id for k in kto(g.records)] == [kto_record_id("a")]


def test_identical_responses_make_no_pair() -> None:
    turns = {"a": turn("a", "same"), "b": turn("b", "same ")}
    g = build_group(PG, turns, {"a": vote("a", "up"), "b": vote("b", "down")}, None)
    assert [d.reason for d in g.drops] == ["identical_responses"] and len(kto(g.records)) == 2


def test_pii_is_masked_in_prompts_completions_and_comments() -> None:
    turns = {
        "a": turn("a", "Mail me at jane.doe@example.com", prompt=[{"role": "user", "content": "I am bob@example.org"}]),
        "b": turn("b", "no", prompt=[{"role": "user", "content": "I am bob@example.org"}]),
    }
    g = build_group(PG, turns, {"a": vote("a", "up", comment="call +44 20 7946 0958"), "b": vote("b", "down")}, None)
    [pair] = dpo(g.records)
    assert pair.prompt[0].content == "I am [EMAIL]" and pair.chosen[0].content == "Mail me at [EMAIL]"
    ka = next(k for k in kto(g.records) if k.label)
    assert ka.metadata.comment == "call [PHONE]"
    assert "@" not in str([r.model_dump() for r in g.records])


def test_record_ids_and_digests_are_stable() -> None:
    votes = {"a": vote("a", "up"), "b": vote("b", "down")}
    one, two = build_group(PG, TURNS, votes, None), build_group(PG, TURNS, votes, None)
    assert [r.record_id for r in one.records] == [r.record_id for r in two.records]
    assert [record_digest(r) for r in one.records] == [record_digest(r) for r in two.records]
    again = build_group(PG, TURNS, {"a": vote("a", "up", 9.0), "b": vote("b", "down")}, None)  # a later vote
    assert [r.record_id for r in again.records] == [r.record_id for r in one.records]
    assert record_digest(dpo(again.records)[0]) != record_digest(dpo(one.records)[0])


LONG = (
    "I have a pandas DataFrame with columns date, store and sales. How do I compute the rolling seven day "
    "average of sales per store, keeping the original row order, without a Python loop?"
)


def test_exact_and_near_duplicate_prompts_collapse_but_different_ones_do_not() -> None:
    d = PromptDeduper()
    assert d.classify("pg-1", normalise_prompt([{"role": "user", "content": LONG}]))[1] is None
    exact = normalise_prompt([{"role": "user", "content": LONG.upper().replace(",", " ,")}])  # same after normalising
    assert d.classify("pg-2", exact)[1] == "pg-1"
    near = normalise_prompt([{"role": "user", "content": "Please: " + LONG.replace("How do I", "How can I")}])
    assert d.classify("pg-3", near)[1] == "pg-1"
    other = normalise_prompt([{"role": "user", "content": "Write a haiku about the sea at dawn, with a heron in it."}])
    values, dup = d.classify("pg-4", other)
    assert dup is None and len(values) == 128


def test_the_index_is_rebuilt_from_persisted_entries() -> None:
    d = PromptDeduper()
    values, _ = d.classify("pg-1", normalise_prompt([{"role": "user", "content": LONG}]))
    fresh = PromptDeduper()  # after a restart: the table holds (group, hashvalues, duplicate_of)
    fresh.restore([("pg-1", values, None), ("pg-2", values, "pg-1")])
    assert fresh.classify("pg-5", normalise_prompt([{"role": "user", "content": LONG + "!"}]))[1] == "pg-1"
