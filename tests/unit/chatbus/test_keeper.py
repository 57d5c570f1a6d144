"""The keeper's restart policy on real processes (``python -c`` children, no Kafka): a crashed service is
restarted after its back-off with the reason logged; crashes in a row back off exponentially; a service
stopped on purpose stays stopped. (The services' own start is replaced by a sleeping child here; the
stack test ``test_keeper_restarts_a_killed_worker`` restarts a real worker.)"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from chatbus.keeper import Backoff, Keeper
from chatbus.stack import Stack, free_port, pid_alive
from core.config import Settings

SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]
CRASH = [sys.executable, "-c", "import sys; print('boom: out of cheese', flush=True); sys.exit(3)"]


def test_backoff_doubles_while_crashes_come_in_a_row_and_resets_after_a_stable_run() -> None:
    b = Backoff(base_s=1, max_s=8, stable_s=30, started_at=0.0)
    assert [b.delay(t) for t in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 8]
    b.started_at = 100.0
    assert b.delay(140.0) == 1  # up 40 s: stable, so from the base again


def test_a_crashed_service_is_restarted_after_its_backoff_and_a_stopped_one_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stack = Stack(Settings(state_dir=tmp_path / "state", build_dir=tmp_path / "build", kafka_bootstrap=f"127.0.0.1:{free_port()}"))
    now = [0.0]
    keeper = Keeper(stack, services=["recorder"], clock=lambda: now[0], base_s=1, max_s=4, stable_s=30)
    monkeypatch.setattr(stack, "start", lambda name: stack.spawn(name, SLEEP))
    try:
        first = stack.spawn("recorder", CRASH)
        deadline = time.monotonic() + 10
        while pid_alive(first):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with caplog.at_level(logging.WARNING, logger="chatbus.keeper"):
            assert keeper.check() == []  # noticed; its back-off (1 s) has not passed
        assert keeper.restarted == [("recorder", "exit code 3")]
        assert "boom: out of cheese" in caplog.text and "restarting in 1 s" in caplog.text
        now[0] = 1.0
        assert keeper.check() == ["recorder"]
        second = stack.running("recorder")
        assert second is not None and second != first

        os.kill(second, signal.SIGKILL)  # again, before it was up 30 s: twice the wait
        deadline = time.monotonic() + 10
        while keeper.check() == [] and not keeper.due:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert keeper.restarted[-1] == ("recorder", "killed by SIGKILL") and keeper.due["recorder"] == now[0] + 2
        now[0] += 1
        assert keeper.check() == []
        now[0] += 1
        assert keeper.check() == ["recorder"]

        stack.stop("recorder")  # on purpose: the pid file goes, the keeper leaves it stopped
        now[0] += 100
        assert keeper.check() == [] and stack.running("recorder") is None
    finally:
        stack.down()
