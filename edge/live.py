"""The edge's live picture for ``GET /live`` (a page) and ``GET /live.json`` (its data).

The edge sees every interactive turn it serves end to end, and each turn's completion carries the marks
of every stage (:mod:`schemas.timing`), so one edge can draw the whole pipeline without a Prometheus
server: TTFT percentiles over time, the split of TTFT into stage work and hops, consumer lag per
group, outcomes (answered, refused by safety, cancelled, failed, 429) and tokens per second.

Memory is bounded: the last ``keep`` turns (default 5,000) and ``buckets`` x ``bucket_s`` of series
(default 120 x 5 s = 10 minutes).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from schemas.timing import HOPS, STAGES


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


@dataclass
class _Bucket:
    start: float
    ttft: list[float] = field(default_factory=list)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens: int = 0


@dataclass
class _Turn:
    at: float
    parts: dict[str, dict[str, float]]


class LiveStats:
    def __init__(self, bucket_s: float = 5.0, buckets: int = 120, keep: int = 5000) -> None:
        self.bucket_s = bucket_s
        self.series: collections.deque[_Bucket] = collections.deque(maxlen=buckets)
        self.turns: collections.deque[_Turn] = collections.deque(maxlen=keep)
        self.totals: collections.Counter[str] = collections.Counter()

    def _bucket(self, now: float) -> _Bucket:
        start = now - now % self.bucket_s
        if not self.series or self.series[-1].start < start:
            self.series.append(_Bucket(start))
        return self.series[-1]

    def turn(self, finish_reason: str, parts: dict[str, dict[str, float]], completion_tokens: int) -> None:
        """Record one finished turn: its finish reason, :func:`schemas.timing.breakdown` and tokens."""
        now = time.time()
        b = self._bucket(now)
        outcome = {"stop": "answered", "length": "answered", "content_filter": "refused"}.get(finish_reason, finish_reason)
        b.outcomes[outcome] += 1
        self.totals[outcome] += 1
        b.tokens += completion_tokens
        ttft = parts.get("totals", {}).get("ttft")
        if ttft is not None and finish_reason in ("stop", "length"):
            b.ttft.append(ttft)
        self.turns.append(_Turn(now, parts))

    def rejected(self, lane: str) -> None:
        """Record one 429: an interactive turn in the series, a batch submission in the totals only."""
        if lane != "interactive":
            self.totals[f"{lane}_rate_limited"] += 1
            return
        b = self._bucket(time.time())
        b.outcomes["rate_limited"] += 1
        self.totals["rate_limited"] += 1

    def snapshot(self, lag: dict[tuple[str, str], int], inflight: int, window_s: float = 300.0) -> dict[str, Any]:
        """JSON for the page: ``series`` (per bucket: t [unix s], ttft p50/p99 [ms], outcomes, tokens/s),
        ``breakdown`` (p50/p99 ms per stage and hop over the last ``window_s``), ``lag`` per group."""
        now = time.time()
        series = [
            {
                "t": b.start,
                "ttft_p50_ms": _ms(_pct(b.ttft, 50)),
                "ttft_p99_ms": _ms(_pct(b.ttft, 99)),
                "outcomes": dict(b.outcomes),
                "tokens_per_s": round(b.tokens / self.bucket_s, 1),
            }
            for b in self.series
        ]
        recent = [t.parts for t in self.turns if now - t.at <= window_s]
        breakdown = []
        for group, names in (("stages", STAGES), ("hops", HOPS), ("totals", ("ttft", "hops", "bus_overhead"))):
            for name in names:
                values = [p[group][name] for p in recent if name in p.get(group, {})]
                if values:
                    breakdown.append({"kind": group[:-1], "name": name, "p50_ms": _ms(_pct(values, 50)), "p99_ms": _ms(_pct(values, 99)), "n": len(values)})
        by_group: dict[str, int] = collections.Counter()
        for (group, _topic), value in lag.items():
            by_group[group] += value
        return {
            "now": now,
            "bucket_s": self.bucket_s,
            "inflight": inflight,
            "series": series,
            "breakdown": breakdown,
            "lag": dict(sorted(by_group.items())),
            "totals": dict(self.totals),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)
