"""Cost and usage accounting: what a completion costs under the configured price table, and the daily
usage buckets ``GET /v1/usage`` serves.

Prices are USD per million tokens, per served model name (``CHATBUS_PRICES``, JSON:
``{"qwen2.5-coder-0.5b-instruct": {"prompt": 0.05, "completion": 0.10}}``); a model without a price costs
0. The recorder stores each answer's cost when it records it, so a later price change does not rewrite
what was billed.

Buckets follow OpenAI's usage API (``/v1/organization/usage/completions``): ``{"object": "bucket",
"start_time", "end_time", "results": [{"object": "usage.completions.result", "input_tokens",
"output_tokens", "num_model_requests", "model", "api_key_id", "cost_usd"}]}``, start and end in Unix
seconds, one bucket per UTC day; ``api_key_id`` is the key's identity (``key-…``, never the key), or None
for turns sent to an edge without keys.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo.asynchronous.collection import AsyncCollection

from schemas.documents import Answer, Turn

DAY_S = 86_400
# the fields of a turn document that usage_buckets reads
USAGE_FIELDS = {Turn.OWNER: 1, "answer.model": 1, "answer.usage": 1, Answer.COMPLETED_AT_PATH: 1, "answer.cost_usd": 1}


class TokenPrice(BaseModel):
    """USD per million tokens."""

    model_config = ConfigDict(extra="forbid")

    prompt: float = Field(default=0.0, ge=0)
    completion: float = Field(default=0.0, ge=0)


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int, prices: Mapping[str, TokenPrice]) -> float:
    """The cost in USD of one completion (0 for a model without a price), rounded to 1e-9 USD."""
    price = prices.get(model)
    if price is None:
        return 0.0
    return round((prompt_tokens * price.prompt + completion_tokens * price.completion) / 1e6, 9)


def day_start(t: float) -> int:
    """The UTC midnight (Unix seconds) of the day holding ``t``."""
    return int(t // DAY_S * DAY_S)


def usage_buckets(turns: Iterable[Mapping[str, Any]], start: int, end: int, group_by: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Daily buckets from ``start`` (inclusive) to ``end`` (exclusive, Unix seconds) of turn documents
    (``owner``, ``answer.model``, ``answer.usage``, ``answer.completed_at``, ``answer.cost_usd``). Results
    are split by the fields in ``group_by`` (``model``, ``api_key_id``); the others are None. Every day in
    the range has a bucket, empty or not."""
    sums: dict[tuple[int, str | None, str | None], dict[str, Any]] = defaultdict(
        lambda: {"input_tokens": 0, "input_cached_tokens": 0, "output_tokens": 0, "num_model_requests": 0, "cost_usd": 0.0}
    )
    for turn in turns:
        answer = turn.get("answer") or {}
        done = answer.get("completed_at")
        if not isinstance(done, int | float) or not start <= done < end:
            continue
        usage = answer.get("usage") or {}
        model = answer.get("model") if "model" in group_by else None
        key = turn.get("owner") if "api_key_id" in group_by else None
        row = sums[(day_start(done), model, key)]
        row["input_tokens"] += int(usage.get("prompt_tokens", 0))
        row["input_cached_tokens"] += int(usage.get("cached_tokens", 0))  # OpenAI's usage API field name
        row["output_tokens"] += int(usage.get("completion_tokens", 0))
        row["num_model_requests"] += 1
        row["cost_usd"] += float(answer.get("cost_usd", 0.0))
    buckets = []
    for day in range(day_start(start), end, DAY_S):
        results = [
            {"object": "usage.completions.result", **row, "cost_usd": round(row["cost_usd"], 9), "model": model, "api_key_id": key}
            for (d, model, key), row in sorted(sums.items(), key=lambda kv: (kv[0][0], kv[0][1] or "", kv[0][2] or ""))
            if d == day
        ]
        buckets.append({"object": "bucket", "start_time": day, "end_time": day + DAY_S, "results": results})
    return buckets


async def read_usage(
    turns: AsyncCollection[dict[str, Any]], start: int, end: int, group_by: tuple[str, ...] = (), owner: str | None = None
) -> list[dict[str, Any]]:
    """:func:`usage_buckets` of the turns (the ``turns`` collection) completed in ``[start, end)``, of one
    key's identity ``owner`` only, or of every key's (None)."""
    query: dict[str, Any] = {Answer.COMPLETED_AT_PATH: {"$gte": start, "$lt": end}}
    if owner is not None:
        query[Turn.OWNER] = owner
    return usage_buckets([t async for t in turns.find(query, USAGE_FIELDS)], start, end, group_by)
