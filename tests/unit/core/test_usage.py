"""Cost per completion and the daily usage buckets of ``GET /v1/usage``."""

from __future__ import annotations

from core.usage import DAY_S, TokenPrice, cost_usd, usage_buckets


def test_cost_is_per_million_tokens_and_zero_without_a_price() -> None:
    prices = {"m": TokenPrice(prompt=0.5, completion=2.0)}
    assert cost_usd("m", 1_000_000, 500_000, prices) == 1.5
    assert cost_usd("m", 1, 1, prices) == 2.5e-6
    assert cost_usd("other", 1000, 1000, prices) == 0.0


def turn(owner: str | None, model: str, at: float, prompt: int, completion: int, cost: float) -> dict[str, object]:
    doc: dict[str, object] = {
        "answer": {"model": model, "completed_at": at, "usage": {"prompt_tokens": prompt, "completion_tokens": completion}, "cost_usd": cost}
    }
    if owner:
        doc["owner"] = owner
    return doc


def test_buckets_split_by_day_and_the_asked_groups() -> None:
    day0 = 20_000 * DAY_S
    turns = [
        turn("key-a", "m1", day0 + 10, 10, 5, 0.1),
        turn("key-a", "m2", day0 + 20, 1, 1, 0.2),
        turn("key-b", "m1", day0 + DAY_S + 5, 7, 3, 0.3),
        turn(None, "m1", day0 + 30, 2, 2, 0.0),
        turn("key-a", "m1", day0 + 3 * DAY_S, 100, 100, 9.0),  # past the range
        {"answer": {"model": "m1"}},  # not completed
    ]
    flat = usage_buckets(turns, day0, day0 + 2 * DAY_S)
    assert [b["start_time"] for b in flat] == [day0, day0 + DAY_S] and all(b["end_time"] - b["start_time"] == DAY_S for b in flat)
    [first] = flat[0]["results"]
    assert (first["input_tokens"], first["output_tokens"], first["num_model_requests"]) == (13, 8, 3)
    assert abs(first["cost_usd"] - 0.3) < 1e-12 and first["model"] is None and first["api_key_id"] is None
    split = usage_buckets(turns, day0, day0 + 2 * DAY_S, ("model", "api_key_id"))
    assert [(r["model"], r["api_key_id"], r["input_tokens"]) for r in split[0]["results"]] == [("m1", None, 2), ("m1", "key-a", 10), ("m2", "key-a", 1)]
    assert [(r["model"], r["api_key_id"]) for r in split[1]["results"]] == [("m1", "key-b")]
    assert usage_buckets([], day0, day0 + 1)[0]["results"] == []  # every day has a bucket
