"""The admission decision (edge.admission.decide): bounds per lane, batch shed first, brownout."""

from __future__ import annotations

from core.config import Settings
from edge.admission import Load, decide


def test_decide_bounds_lanes_and_brownout() -> None:
    s = Settings(admit_max_inflight=10, admit_max_lag=20, batch_shed_at=0.5, max_batch_backlog=100)
    idle = Load(inflight=0, lag=0, batch_backlog=0, drain_per_s=2.0)
    assert decide(idle, s).admit and decide(idle, s, "batch", lines=50).admit
    assert not decide(idle, s, "batch", lines=101).admit  # the batch lane's own bound
    half = Load(inflight=5, lag=0, batch_backlog=0, drain_per_s=2.0)
    assert decide(half, s).admit and not decide(half, s, "batch").admit  # batch is shed first
    full = Load(inflight=10, lag=3, batch_backlog=0, drain_per_s=2.0)
    d = decide(full, s)
    assert not d.admit and d.reason == "inflight" and d.retry_after_s == 1  # (10 - 10 + 1) / 2 per s, rounded up
    lagging = Load(inflight=1, lag=40, batch_backlog=0, drain_per_s=0.0)
    d = decide(lagging, s)
    assert d.reason == "lag" and d.retry_after_s == 42  # 21 over the bound at the 0.5/s floor
    assert decide(Load(0, 10_000, 0, 0.0), s).retry_after_s == 60  # capped
    brown = s.model_copy(update={"brownout_max_tokens": 64, "brownout_limit": 2.0})
    d = decide(full, brown, max_tokens=512)
    assert d.admit and d.max_tokens == 64
    assert decide(full, brown, max_tokens=16).max_tokens == 16  # never raises a request's own limit
    assert not decide(Load(20, 0, 0, 1.0), brown).admit  # past brownout_limit x the bound
