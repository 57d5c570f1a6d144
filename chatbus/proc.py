"""Processes, pid files and ports on Linux, read from ``/proc``: the local stack's ground truth.

A pid file holds ``PID STARTTIME`` (the start time from ``/proc/PID/stat``, so a reused pid is never
mistaken for ours; files holding only a pid are still read). A process is *ours* (:func:`is_ours`) when it
is alive, started at the recorded time, and its environment names our ``CHATBUS_STATE_DIR``.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from core.config import Settings


class StackError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


def mongo_host_port(uri: str) -> tuple[str, int]:
    netloc = uri.split("://", 1)[-1].split("/", 1)[0].split(",")[0].rsplit("@", 1)[-1]
    return host_port(netloc if ":" in netloc else f"{netloc}:27017")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_port(host: str, port: int, timeout_s: float, name: str, proc_pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        if proc_pid is not None and not pid_alive(proc_pid):
            raise StackError(f"{name} exited during start-up; see its log")
        if time.monotonic() > deadline:
            raise StackError(f"{name} did not open {host}:{port} within {timeout_s:.0f}s")
        time.sleep(0.2)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` from field 3 (state) on; ``None`` if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields if len(fields) >= 20 else None


def proc_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat``: when the process started, in clock ticks after boot (zombies too)."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields is not None else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)  # a zombie (or a dying process) is not alive
    return fields is not None and fields[0] not in ("Z", "X", "x")


def read_environ(pid: int, settle_s: float = 1.0) -> list[bytes]:
    """``/proc/PID/environ`` as ``KEY=VALUE`` items (empty if unreadable).

    A process that is in the middle of ``execve`` (past closing its close-on-exec files, so ``Popen`` has
    returned, but before the kernel set up the new stack) shows an empty environment: wait that out."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return []
        if raw or not pid_alive(pid) or time.monotonic() >= deadline:
            return [item for item in raw.split(b"\0") if item]
        time.sleep(0.002)


def environ_is_ours(pid: int, settings: Settings) -> bool:
    return f"CHATBUS_STATE_DIR={settings.state_dir}".encode() in read_environ(pid)


def is_ours(pid: int, settings: Settings, start_time: int | None = None) -> bool:
    """True if ``pid`` is alive and was started by this stack: its environment names our state dir and,
    when ``start_time`` is known (from the pid file), it started then (the pid was not reused)."""
    if not pid_alive(pid):
        return False
    if start_time is not None and proc_start_time(pid) != start_time:
        return False
    return environ_is_ours(pid, settings)


def group_members(pgid: int) -> dict[int, int]:
    """Live processes (not zombies) in process group ``pgid``: pid -> start time."""
    members: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        if fields is not None and fields[0] not in ("Z", "X", "x") and int(fields[2]) == pgid:
            members[int(entry)] = int(fields[19])
    return members


def read_pidfile(path: Path) -> tuple[int, int | None] | None:
    """``(pid, start time)`` from a pid file; the start time is ``None`` in files that hold only a pid."""
    try:
        parts = path.read_text().split()
        pid = int(parts[0])
        start = int(parts[1]) if len(parts) > 1 else None
    except (OSError, ValueError, IndexError):
        return None
    return pid, start


def read_pid(path: Path) -> int | None:
    entry = read_pidfile(path)
    return entry[0] if entry is not None else None


def reap(pid: int) -> None:
    """Collect ``pid`` if it is an exited child of this process (else a no-op)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def reap_if_same(pid: int, start: int | None) -> None:
    """Reap ``pid`` unless it is known to be another process than the one started at ``start``."""
    if start is None or proc_start_time(pid) == start:
        reap(pid)
