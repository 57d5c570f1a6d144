"""What the edge benches (``relay_throughput.py``, ``open_streams.py``) share.

* :class:`BenchEdge`: an edge process of the bench's own (``python -m chatbus.cli edge``) on a free port,
  with its own topic prefix (default ``bench.``) against the broker of a running stack (``make up``), so
  the stack's safety/retrieval/inference workers never see the bench's turns. Admission control is
  opened wide (``CHATBUS_ADMIT_*``) and the metrics port disabled, so only the relay path is measured.
* :class:`Role`: a helper process of the bench (the load tool, the clients) driven by JSON lines on its
  stdin/stdout (one command in, one answer out).
* :func:`cpu_seconds`, :func:`memory`: psutil readings of a process (user + system CPU; RSS and USS).

Everything runs on loopback; the bench's processes are started in their own session and stopped by
pid (SIGTERM, then SIGKILL) when the bench ends, also on an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # this checkout's packages, not whichever one the venv was installed from
    sys.path.insert(0, str(ROOT))

from chatbus.stack import free_port  # noqa: E402
from core.config import Settings  # noqa: E402

PY = sys.executable
# Admission control (429 past a number of in-flight turns or a reply lag) must not limit a bench of the
# relay itself; the metrics endpoint is off. Settings the current code does not know are ignored.
WIDE_OPEN = {"CHATBUS_ADMIT_MAX_INFLIGHT": "1000000", "CHATBUS_ADMIT_MAX_LAG": "100000000", "CHATBUS_METRICS_PORT": "0"}


class BenchError(RuntimeError):
    """The bench cannot produce a valid number (no broker, a 429, a helper process died…)."""


def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def check_broker(bootstrap: str) -> None:
    host, _, port = bootstrap.rpartition(":")
    with socket.socket() as s:
        s.settimeout(2)
        if s.connect_ex((host or "127.0.0.1", int(port))) != 0:
            raise BenchError(f"no Kafka broker at {bootstrap}: start the stack first (`make up`)")


def bench_settings(prefix: str) -> Settings:
    return Settings(topic_prefix=prefix)


def ensure_topics(prefix: str) -> list[str]:
    """Create the registry's topics under ``prefix`` (idempotent); the names created."""
    from topics.clients import ensure_topics as ensure

    return asyncio.run(ensure(bench_settings(prefix)))


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def runtime_info() -> dict[str, Any]:
    """What the edge runs on (uvicorn picks uvloop and httptools when installed) and which code it is."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {}
    for dist in ("uvicorn", "uvloop", "httptools", "sse-starlette", "starlette", "aiokafka", "pydantic"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = None
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "edge", "schemas", "topics", "chatbus"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        info["edge_code"] = rev + (" (edge code modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        info["edge_code"] = None
    return info


def runtime_line(info: dict[str, Any]) -> str:
    loop = f"uvloop {info['uvloop']}" if info.get("uvloop") else "asyncio"
    http = f"httptools {info['httptools']}" if info.get("httptools") else "h11"
    return f"edge code {info.get('edge_code')}; uvicorn {info.get('uvicorn')} on {loop} + {http}; sse-starlette {info.get('sse-starlette')}"


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def runq_wait_seconds(proc: psutil.Process) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (``/proc/PID/task/*/schedstat``,
    second field): a busy host shows here, while the process's own CPU time does not grow."""
    total = 0
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def memory(proc: psutil.Process) -> dict[str, float]:
    """RSS and USS (unique set: memory only this process holds) in MiB."""
    m = proc.memory_full_info()
    return {"rss_mib": m.rss / 2**20, "uss_mib": m.uss / 2**20}


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the bench process dies, however it dies (Linux prctl)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in the bench, so its ``finally`` blocks stop what it started."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s`` (only this pid)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


class BenchEdge:
    """An edge process owned by the bench (see the module docstring)."""

    def __init__(self, prefix: str, env: dict[str, str] | None = None, reply_partition: int = 0, argv: list[str] | None = None, wide_open: bool = True) -> None:
        """``wide_open``: admission bounds too large to matter (:data:`WIDE_OPEN`); False keeps the settings'."""
        self.prefix = prefix
        self.argv = argv or [PY, "-m", "chatbus.cli", "edge"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.gettempdir()) / f"chatbus-bench-edge-{self.port}.log"
        self.env = child_env(
            CHATBUS_TOPIC_PREFIX=prefix,
            CHATBUS_EDGE_HOST="127.0.0.1",
            CHATBUS_EDGE_PORT=str(self.port),
            CHATBUS_EDGE_ID=f"bench-edge-{self.port}",
            CHATBUS_REPLY_PARTITION=str(reply_partition),
            **(WIDE_OPEN if wide_open else {}),
            **(env or {}),
        )
        self.env.pop("CHATBUS_API_KEYS", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.model = ""

    def start(self, timeout_s: float = 60.0) -> BenchEdge:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
        )
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the bench edge exited with {self.proc.returncode}; log: {self.log_path}\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.url}/v1/models", timeout=2)
                if r.status_code == 200:
                    self.model = r.json()["data"][0]["id"]
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise BenchError(f"the bench edge did not answer on {self.url} within {timeout_s:.0f}s; log: {self.log_path}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> BenchEdge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Role:
    """A helper process: ``python <script> --role <name> …``, one JSON command per line on stdin, one JSON
    answer per line on stdout (its stderr goes to a log file)."""

    def __init__(self, script: str, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = Path(tempfile.gettempdir()) / f"chatbus-bench-{Path(script).stem}-{name}-{os.getpid()}.log"
        self.proc = subprocess.Popen(
            [PY, script, "--role", name, *args],
            cwd=ROOT,
            env=child_env(**(env or {})),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_path.open("wb"),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.ps = psutil.Process(self.proc.pid)

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(orjson.dumps(cmd) + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"helper {self.name} died; log: {self.log_path}\n{self.log_tail()}") from None

    def recv(self, timeout_s: float = 120.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise BenchError(f"helper {self.name} gave no answer within {timeout_s:.0f}s; log: {self.log_path}")
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"helper {self.name} exited ({self.proc.poll()}); log: {self.log_path}\n{self.log_tail()}")
        answer: dict[str, Any] = orjson.loads(line)
        if "error" in answer:
            raise BenchError(f"helper {self.name}: {answer['error']}")
        return answer

    def call(self, cmd: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
        self.send(cmd)
        return self.recv(timeout_s)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # a role exits when its stdin closes
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)


async def serve_role(handler: Any) -> None:
    """The helper side of :class:`Role`: read commands from stdin, answer each with ``await handler(cmd)``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    parent = os.getppid()

    async def orphaned() -> None:  # the bench is gone (belt and braces next to PDEATHSIG): stop at once
        while os.getppid() == parent:
            await asyncio.sleep(1)
        os._exit(3)

    _watchdog = asyncio.create_task(orphaned())  # held: a task nobody references can be collected
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd = orjson.loads(line)
        try:
            answer = await handler(cmd)
        except Exception as exc:  # reported to the bench, which stops with it
            import traceback

            traceback.print_exc()
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        out.flush()
        if cmd.get("cmd") == "exit":
            return
