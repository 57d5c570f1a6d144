"""Faults under steady traffic on a local stack of its own: turns admitted, completed, lost and
duplicated, client-visible errors and the longest stall, one fault at a time.

The inference workers run on a scripted OpenAI-compatible upstream (``tests/upstream.py``: the answer is
known word for word, so a lost or repeated character is seen); the keeper (:mod:`chatbus.keeper`) restarts
what crashes. Two layouts, on free loopback ports::

    .venv/bin/python bench/chaos.py [--clients 4] [--words 60] [--pace-ms 20]            # single broker
    .venv/bin/python bench/chaos.py --cluster                                             # 3 brokers

* single broker (Kafka, FerretDB, one of each worker, two edges): SIGKILL the inference worker; SIGKILL
  edge 1 (its clients resume on edge 0); stop FerretDB for 30 s; SIGSTOP the broker for 60 s.
* ``--cluster`` (three KRaft nodes, RF 3, min ISR 2, two edges, two replicas of each worker, milvus-lite's
  server): SIGKILL the node leading the edges' reply partitions; SIGKILL one replica of each worker kind;
  SIGKILL edge 2; stop FerretDB for 30 s; SIGSTOP the leading node for 60 s.

A client streams a turn, resumes it on the other edge when its stream breaks or drains (from the 200's
``X-Resume-Event-Id`` if no event came), and retries a refused turn (429/503) after ``Retry-After``. Per
phase: turns *admitted* (a 200), *completed* (the whole expected answer, once), *lost* (admitted, never
completed), *duplicated* (text repeated or out of order), client-visible *errors* (refusals and broken
streams, by kind) and the longest *stall* (seconds without a byte on a stream).

Writes ``bench/results/chaos.json`` and ``.md`` (``chaos-cluster.*`` with ``--cluster``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402

from chatbus.keeper import Keeper  # noqa: E402
from chatbus.stack import Stack, free_port  # noqa: E402
from core.config import Settings  # noqa: E402
from tests.upstream import Upstream, spawn_scripted_inference  # noqa: E402

OUT = ROOT / "bench" / "results"
MODEL = "chatbus-tiny-random"


class Phase:
    def __init__(self, name: str) -> None:
        self.name = name
        self.admitted = self.completed = self.lost = self.duplicated = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.stall_s = 0.0

    def row(self) -> dict[str, Any]:
        return {
            "fault": self.name,
            "admitted": self.admitted,
            "completed": self.completed,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "errors": dict(self.errors),
            "longest_stall_s": round(self.stall_s, 1),
        }


def expected(words: int) -> str:
    return " ".join(f"w{i}" for i in range(words)) + " "


async def one_turn(edges: list[str], phase: Phase, words: int, deadline: float) -> None:
    """One client turn: stream it, resume it on the other edge after a break, retry a refusal."""
    prompt = f"Tell me a long story about the sea, take {random.randint(10_000, 99_999_999)}."
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": prompt}], "max_tokens": 2000}
    edge = random.randrange(len(edges))
    text, last_id = "", None
    admitted = done = False
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=90)) as http:
        while not admitted and time.monotonic() < deadline:
            try:
                async with http.stream("POST", f"{edges[edge]}/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        phase.errors[f"http_{r.status_code}"] += 1
                        await asyncio.sleep(min(5.0, float(r.headers.get("retry-after", "1"))))
                        continue
                    admitted = True
                    phase.admitted += 1
                    last_id = r.headers.get("x-resume-event-id")  # resumable before the first event
                    done, text, last_id = await read(r, text, last_id, phase)
            except httpx.HTTPError as exc:
                phase.errors[f"{'stream' if admitted else 'connect'}:{type(exc).__name__}"] += 1
                if not admitted:
                    edge = (edge + 1) % len(edges)
                    await asyncio.sleep(1)
        for _attempt in range(30):
            if done or not admitted or last_id is None:
                break
            edge = (edge + 1) % len(edges)
            await asyncio.sleep(1)
            cid = last_id.split(":")[0]
            try:
                async with http.stream("GET", f"{edges[edge]}/v1/chat/completions/{cid}/events", headers={"Last-Event-ID": last_id}) as r:
                    if r.status_code != 200:
                        await r.aread()
                        phase.errors[f"resume_{r.status_code}"] += 1
                        continue
                    done, text, last_id = await read(r, text, last_id, phase)
            except httpx.HTTPError as exc:
                phase.errors[f"stream:{type(exc).__name__}"] += 1
    if not admitted:
        return
    if done and text == expected(words):
        phase.completed += 1
    elif expected(words).startswith(text):
        phase.lost += 1
    else:
        phase.duplicated += 1


async def read(r: httpx.Response, text: str, last_id: str | None, phase: Phase) -> tuple[bool, str, str | None]:
    """Read SSE lines: (finished, text so far, last SSE id); the longest gap between lines is the stall."""
    sse_id = None
    last_byte = time.monotonic()
    async for line in r.aiter_lines():
        now = time.monotonic()
        phase.stall_s = max(phase.stall_s, now - last_byte)
        last_byte = now
        if line.startswith("id:"):
            sse_id = line[3:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                return False, text, last_id  # a [DONE] without a finish chunk: drained or failed
            chunk = orjson.loads(data)
            if "error" in chunk:
                phase.errors[f"chunk:{chunk['error'].get('code') or chunk['error'].get('type')}"] += 1
                continue
            choice = (chunk.get("choices") or [{}])[0]
            text += (choice.get("delta") or {}).get("content") or ""
            if sse_id:
                last_id = sse_id
            if choice.get("finish_reason"):
                return True, text, last_id
    return False, text, last_id


async def clients(edges: list[str], phase: Phase, n: int, seconds: float, words: int) -> None:
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < deadline:
            await one_turn(edges, phase, words, deadline + 120)

    await asyncio.gather(*(loop() for _ in range(n)))


async def run_phase(edges: list[str], phase: Phase, fault: Any, args: argparse.Namespace) -> None:
    """Traffic for ``args.phase_s``; the fault 10 s in (in a thread: it may sleep through an outage)."""
    traffic = asyncio.create_task(clients(edges, phase, args.clients, args.phase_s, args.words))
    await asyncio.sleep(10)
    await asyncio.to_thread(fault)
    await traffic


async def leader_of_streams(settings: Settings, partitions: int) -> int:
    """The node leading most of ``chat.replies``' first ``partitions`` partitions (the edges' reply
    partitions: every token event of every stream goes there)."""
    from topics.clients import make_admin
    from topics.registry import CHAT_REPLIES, topic

    admin = make_admin(settings)
    await admin.start()
    try:
        [desc] = await admin.describe_topics([topic(CHAT_REPLIES, settings.topic_prefix)])
    finally:
        await admin.close()
    leaders = collections.Counter(p["leader"] for p in desc["partitions"] if p["partition"] < partitions)
    return int(leaders.most_common(1)[0][0])


def keep(keeper: Keeper, stop: threading.Event) -> None:
    while not stop.is_set():
        keeper.check()
        time.sleep(0.5)


def run_single(args: argparse.Namespace, up: Upstream) -> list[dict[str, Any]]:
    """One broker, one of each worker, two edges (the second outside the keeper: it stays dead)."""
    state = Path(tempfile.mkdtemp(prefix="chatbus-bench-chaos-"))
    settings = Settings(
        state_dir=state,
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/",
        edge_port=free_port(),
        model="tiny",
        served_model_name=MODEL,
        output_rail=False,
        resume_grace_s=30,
    )
    stack = Stack(settings)
    rows: list[dict[str, Any]] = []
    stack.up(("kafka", "ferretdb", "safety", "retrieval", "recorder", "edge"), wait=False)
    spawn_scripted_inference(stack, up, MODEL, output_rail=False)
    original_start = stack.start
    stack.start = lambda name: spawn_scripted_inference(stack, up, MODEL, output_rail=False) if name == "inference" else original_start(name)  # type: ignore[method-assign,assignment]
    env = stack.env()
    port = free_port()
    env.update({"CHATBUS_EDGE_PORT": str(port), "CHATBUS_REPLY_PARTITION": "1", "CHATBUS_EDGE_ID": "edge-1"})
    edge1_log = open(stack.paths.logs / "edge-1.log", "ab")
    edge1 = subprocess.Popen([sys.executable, "-m", "chatbus.cli", "edge"], env=env, cwd=ROOT, stdout=edge1_log, stderr=subprocess.STDOUT)
    edges = [stack.edge_url, f"http://127.0.0.1:{port}"]
    keeper = Keeper(stack, services=["safety", "retrieval", "inference", "recorder"], base_s=0.5)
    stop_keeper = threading.Event()
    threading.Thread(target=keep, args=(keeper, stop_keeper), daemon=True).start()
    try:
        stack.wait_ready()
        time.sleep(2)

        def worker() -> None:
            pid = stack.running("inference")
            if pid:
                os.kill(pid, signal.SIGKILL)

        def edge() -> None:
            edge1.kill()

        def database() -> None:
            stack.stop("ferretdb")
            time.sleep(30)
            stack.start_ferretdb()

        def broker() -> None:
            pid = stack.running("kafka")
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            time.sleep(60)
            os.kill(pid, signal.SIGCONT)

        for name, fault in (("worker", worker), ("edge", edge), ("database", database), ("broker", broker)):
            phase = Phase(name)
            asyncio.run(run_phase(edges, phase, fault, args))
            rows.append(phase.row())
            print(json.dumps(phase.row()), flush=True)
            if name == "edge":
                edges = edges[:1]
            stack.wait_ready(timeout_s=300)
    finally:
        stop_keeper.set()
        if edge1.poll() is None:
            edge1.terminate()
        edge1_log.close()
        stack.down()
    return rows


def run_cluster(args: argparse.Namespace, up: Upstream) -> list[dict[str, Any]]:
    """Three KRaft nodes (RF 3, min ISR 2), two edges and two replicas of each worker, all under the keeper."""
    from chatbus.infra import kafka_nodes
    from tests.conftest import cluster_stack_settings

    settings = cluster_stack_settings(
        Path(tempfile.mkdtemp(prefix="chatbus-bench-chaos-cluster-")), replicas=2, model="tiny", served_model_name=MODEL, output_rail=False, resume_grace_s=30
    )
    stack = Stack(settings)
    rows: list[dict[str, Any]] = []
    stack.up(("kafka", "ferretdb", "milvus", "safety", "retrieval", "recorder", "edge"), wait=False)
    for name in ("inference", "inference-2"):
        spawn_scripted_inference(stack, up, MODEL, name=name, output_rail=False)
    original_start = stack.start

    def start(name: str) -> None:
        if name.startswith("inference"):
            spawn_scripted_inference(stack, up, MODEL, name=name, output_rail=False)
        else:
            original_start(name)

    stack.start = start  # type: ignore[method-assign]
    keeper = Keeper(stack, base_s=0.5)  # every service: brokers, workers and edges come back
    stop_keeper = threading.Event()
    threading.Thread(target=keep, args=(keeper, stop_keeper), daemon=True).start()
    edges = stack.edge_urls
    service_of = {n.node_id: n.service for n in kafka_nodes(settings)}

    def crash(name: str) -> None:
        """SIGKILL, leaving the pid file (``stack.kill`` would mark it stopped on purpose): the keeper restarts it."""
        pid = stack.running(name)
        if pid:
            os.killpg(pid, signal.SIGKILL)

    try:
        stack.wait_ready()
        time.sleep(2)

        def leader() -> None:
            victim = service_of[asyncio.run(leader_of_streams(settings, len(edges)))]
            print(f"killing {victim}, leader of the reply partitions", flush=True)
            crash(victim)

        def replicas() -> None:
            for name in ("safety-2", "retrieval-2", "inference-2", "recorder-2"):
                crash(name)

        def edge() -> None:
            crash("edge-2")

        def database() -> None:
            stack.stop("ferretdb")
            time.sleep(30)
            stack.start_ferretdb()

        def broker() -> None:
            victim = service_of[asyncio.run(leader_of_streams(settings, len(edges)))]
            pid = stack.running(victim)
            assert pid is not None
            print(f"pausing {victim}, leader of the reply partitions", flush=True)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(60)
            os.kill(pid, signal.SIGCONT)

        faults: list[tuple[str, Callable[[], None]]] = [("leader broker killed", leader), ("one replica of each worker killed", replicas)]
        faults += [("edge killed", edge), ("database stopped 30 s", database), ("leader broker paused 60 s", broker)]
        for name, fault in faults:
            phase = Phase(name)
            asyncio.run(run_phase(edges, phase, fault, args))
            rows.append(phase.row())
            print(json.dumps(phase.row()), flush=True)
            stack.wait_ready(timeout_s=300)
    finally:
        stop_keeper.set()
        stack.down()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--words", type=int, default=60)
    ap.add_argument("--pace-ms", type=float, default=20.0)
    ap.add_argument("--phase-s", type=float, default=90.0, help="traffic per phase (the fault comes 10 s in)")
    ap.add_argument("--cluster", action="store_true", help="three brokers, two edges, two replicas of each worker")
    args = ap.parse_args()
    with Upstream(lambda prompt: expected(args.words), pace_s=args.pace_ms / 1000) as up:
        rows = run_cluster(args, up) if args.cluster else run_single(args, up)
    OUT.mkdir(parents=True, exist_ok=True)
    name = "chaos-cluster" if args.cluster else "chaos"
    layout = "3 KRaft brokers (RF 3, min ISR 2), 2 edges, 2 replicas of each worker" if args.cluster else "single broker, 2 edges"
    report = {"layout": layout, "clients": args.clients, "words": args.words, "pace_ms": args.pace_ms, "phase_s": args.phase_s, "rows": rows}
    (OUT / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Faults under steady traffic ({args.clients} clients, {args.words}-word answers at {args.pace_ms:g} ms a word, {args.phase_s:g} s a phase), {layout}:",
        "",
        "| fault | admitted | completed | lost | duplicated | client-visible errors | longest stall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"
        lines.append(f"| {r['fault']} | {r['admitted']} | {r['completed']} | {r['lost']} | {r['duplicated']} | {errors} | {r['longest_stall_s']} |")
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
