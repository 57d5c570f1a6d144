"""The pure parts of stored keys (:mod:`edge.keys`): key format and OpenAI's rate-limit headers."""

from __future__ import annotations

from datetime import UTC, datetime

from core.quotas import budget_period
from edge.auth import key_owner
from edge.keys import new_key, rate_headers


def test_a_new_key_is_random_and_its_identity_is_a_hash() -> None:
    a, b = new_key(), new_key()
    assert a != b and a.startswith("cb-") and len(a) == 3 + 43
    assert key_owner(a).startswith("key-") and a[3:] not in key_owner(a)


def test_headers_count_down_and_reset_at_the_minute() -> None:
    now = 1_800_000_000 + 45.2  # 45.2 s into a minute
    assert rate_headers(10, 3, now) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "7",
        "x-ratelimit-reset-requests": "15s",
    }
    assert rate_headers(10, 12, now)["x-ratelimit-remaining-requests"] == "0"


def test_budget_periods_are_utc_days_and_months() -> None:
    at = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp()
    assert budget_period("day", at) == ("2026-12-31", datetime(2027, 1, 1, tzinfo=UTC).timestamp())
    assert budget_period("month", at) == ("2026-12", datetime(2027, 1, 1, tzinfo=UTC).timestamp())
    assert budget_period("month", datetime(2027, 2, 10, tzinfo=UTC).timestamp()) == ("2027-02", datetime(2027, 3, 1, tzinfo=UTC).timestamp())


def test_token_headers_name_tokens() -> None:
    h = rate_headers(1000, 1200, 30.0, "tokens")
    assert h == {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "30s"}
