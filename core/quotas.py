"""The token counters behind a stored key's limits (:mod:`edge.keys`), shared by everything that charges a key:
the edge for a streamed turn, the ``batches`` worker for a batch line.

Collections (MongoDB API): ``api_keys`` (the key records, :class:`edge.keys.KeyRecord`), ``rate_windows``
(one document per key and one-minute window: ``n`` requests, ``tokens``), ``key_budgets`` (one document per
key and UTC budget period, ``{key-id}:2026-12-04`` for a day and ``{key-id}:2026-12`` for a month:
``tokens``). Every charge is one ``$inc`` upsert by ``_id``, so any number of processes charge one key
without losing a count.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

KEYS = "api_keys"
WINDOWS = "rate_windows"
BUDGETS = "key_budgets"
WINDOW_S = 60


def budget_period(period: str, now: float) -> tuple[str, float]:
    """The UTC budget period holding ``now``: its id (``2026-12-04`` for a day, ``2026-12`` for a month) and
    when it ends (epoch seconds)."""
    t = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), start.timestamp() + 86400
    start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.strftime("%Y-%m"), end.timestamp()


async def charge_tokens(db: AsyncDatabase[dict[str, Any]], key_id: str, tokens: int, now: float, *, per_minute: bool = True) -> None:
    """Charge ``tokens`` (prompt + completion) to ``key_id`` at ``now`` (epoch seconds): its day's and month's
    budgets and, with ``per_minute``, its tokens-per-minute window (batch lines are not: as OpenAI's, batch
    work has limits of its own, apart from the per-minute ones)."""
    if per_minute:
        window = int(now // WINDOW_S)
        await db[WINDOWS].update_one(
            {"_id": f"{key_id}:{window}"}, {"$inc": {"tokens": tokens}, "$setOnInsert": {"key": key_id, "window": window}}, upsert=True
        )
    for period in ("day", "month"):
        pid, _ = budget_period(period, now)
        await db[BUDGETS].update_one({"_id": f"{key_id}:{pid}"}, {"$inc": {"tokens": tokens}, "$setOnInsert": {"key": key_id}}, upsert=True)


async def charged_tokens(db: AsyncDatabase[dict[str, Any]], key_id: str, period: str, now: float) -> int:
    """Tokens charged to ``key_id`` in the budget ``period`` (``day`` or ``month``) holding ``now``."""
    doc = await db[BUDGETS].find_one({"_id": f"{key_id}:{budget_period(period, now)[0]}"})
    return int(doc.get("tokens", 0)) if doc else 0
