"""Process supervision for the local stack: start a service in its own session with a log and a pid file,
stop it (SIGTERM, then SIGKILL) by its process group — only ever processes that are ours (:func:`chatbus.proc.is_ours`).

Kafka and FerretDB get no secret settings in their environment (:meth:`Supervisor.infra_env`); the workers and
the edge get them all (:meth:`Supervisor.env`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from chatbus.proc import environ_is_ours, group_members, is_ours, pid_alive, proc_start_time, read_environ, read_pidfile, reap_if_same
from core.config import ROOT, Settings

log = logging.getLogger("chatbus.stack")


@dataclass
class Paths:
    settings: Settings

    @property
    def logs(self) -> Path:
        return self.settings.state_dir / "logs"

    @property
    def pids(self) -> Path:
        return self.settings.state_dir / "pids"

    @property
    def kafka_libs(self) -> Path:
        return self.settings.build_dir / "kafka-libs"

    @property
    def ferretdb_bin(self) -> Path:
        return self.settings.build_dir / "bin" / "chatbus-ferretdb"

    def pidfile(self, name: str) -> Path:
        return self.pids / f"{name}.pid"


def setting_env_keys(settings: Settings) -> set[str]:
    """The environment variables :meth:`Settings.child_env` may set (``CHATBUS_*`` and aliases such as ``MILVUS_URI``)."""
    return {
        field.validation_alias if isinstance(field.validation_alias, str) else f"CHATBUS_{name.upper()}" for name, field in type(settings).model_fields.items()
    }


class Supervisor:
    """The services of one state dir (``settings.state_dir``): their environments, pid files, start and stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = Paths(settings)
        self._started: list[str] | None = None  # services started by the ``up`` in progress

    # --- process plumbing ------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The environment of the workers and the edge: every setting, secrets included."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBUS_")}
        env.update(self.settings.child_env())
        if self.settings.torch_threads == 0:  # every process shares this host: do not oversubscribe its cores
            env["CHATBUS_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def infra_env(self) -> dict[str, str]:
        """The environment of Kafka and FerretDB: none of the settings (so none of the secrets, e.g.
        ``CHATBUS_API_KEYS``, ``CHATBUS_OPENAI_API_KEY``) but ``CHATBUS_STATE_DIR``, which :func:`is_ours` needs."""
        keys = setting_env_keys(self.settings)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBUS_") and k not in keys}
        env["CHATBUS_STATE_DIR"] = str(self.settings.state_dir)
        return env

    def running(self, name: str) -> int | None:
        entry = read_pidfile(self.paths.pidfile(name))
        if entry is None:
            return None
        pid, start = entry
        if is_ours(pid, self.settings, start):
            return pid
        if start is not None:
            reap_if_same(pid, start)  # our own exited child: do not leave it a zombie
        return None

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        existing = self.running(name)
        if existing:
            log.info("%s already running (pid %d)", name, existing)
            return existing
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self.paths.pids.mkdir(parents=True, exist_ok=True)
        logf = open(self.paths.logs / f"{name}.log", "ab")  # handed to the child (closed here once it has it)
        try:
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env if env is not None else self.env(),
                start_new_session=True,
                cwd=ROOT,
            )
        finally:
            logf.close()
        start = proc_start_time(proc.pid)  # our unreaped child: readable even if it has exited already
        read_environ(proc.pid)  # returns once its exec is complete: from here on is_ours() recognises it
        self.paths.pidfile(name).write_text(f"{proc.pid} {start}\n" if start is not None else f"{proc.pid}\n")
        if self._started is not None:
            self._started.append(name)
        log.info("started %s (pid %d)", name, proc.pid)
        return proc.pid

    def stop(self, name: str, timeout_s: float = 15.0) -> bool:
        """SIGTERM a service's process group, SIGKILL what is left after ``timeout_s``; False if it was not running.

        If the group's leader has died, the members of its group that are ours are stopped all the same."""
        return self._stop(name, signal.SIGTERM, timeout_s)

    def kill(self, name: str) -> None:
        """SIGKILL a service (tests use it to simulate a crash)."""
        self._stop(name, signal.SIGKILL, 10.0)

    def _targets(self, pgid: int, start: int | None, leader_ours: bool) -> dict[int, int]:
        """The processes to stop for the service whose session leader was ``pgid``: pid -> start time."""
        if leader_ours:
            return group_members(pgid)  # the whole group is ours: it is signalled with killpg
        now = proc_start_time(pgid)
        if now is not None and (pid_alive(pgid) or (start is not None and now != start)):
            return {}  # the pid belongs to another process now: its group, if any, is not ours
        # the leader is gone; its group lives on while any member does (so its pgid cannot have been reused)
        return {pid: st for pid, st in group_members(pgid).items() if (start is None or st >= start) and environ_is_ours(pid, self.settings)}

    def _stop(self, name: str, sig: signal.Signals, timeout_s: float) -> bool:
        pidfile = self.paths.pidfile(name)
        entry = read_pidfile(pidfile)
        if entry is None:
            return False
        pgid, start = entry
        leader_ours = is_ours(pgid, self.settings, start)
        targets = self._targets(pgid, start, leader_ours)
        if not leader_ours and not targets:
            reap_if_same(pgid, start)
            pidfile.unlink(missing_ok=True)
            return False
        if not leader_ours:
            log.warning("%s: leader (pid %d) is gone; stopping the %d survivors of its group", name, pgid, len(targets))

        def remaining() -> dict[int, int]:
            if leader_ours:
                return group_members(pgid)
            return {pid: st for pid, st in targets.items() if pid_alive(pid) and proc_start_time(pid) == st}

        def send(s: signal.Signals) -> None:
            if leader_ours:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, s)
                return
            for pid in remaining():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, s)

        def wait(seconds: float) -> dict[int, int]:
            deadline = time.monotonic() + seconds
            while True:
                reap_if_same(pgid, start)
                left = remaining()
                if not left or time.monotonic() >= deadline:
                    return left
                time.sleep(0.05)

        send(sig)
        if wait(timeout_s) and sig != signal.SIGKILL:
            log.warning("%s did not stop in %.0fs; killing", name, timeout_s)
            send(signal.SIGKILL)
            if wait(5.0):
                log.warning("%s: processes of group %d survived SIGKILL", name, pgid)
        reap_if_same(pgid, start)
        pidfile.unlink(missing_ok=True)
        log.info("stopped %s", name)
        return True
