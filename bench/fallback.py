"""Fallback when a model's pool fails: a pool's only inference worker is SIGKILLed under steady traffic
and restarted ``--down-s`` later; how soon new turns go to the fallback, how long the turns caught in
the failure wait, whether any is lost, and how soon the pool serves again.

A stack of its own serving the tiny random model twice (noise; the mechanics do not depend on the model):
``chatbus-tiny-random`` (primary) and ``chatbus-tiny-small`` (an extra pool, falling back to the
primary). ``--clients`` clients each ask ``chatbus-tiny-small`` one non-streamed turn after another
(``max_tokens`` 8); a 429 is retried after its ``Retry-After``. Times are from the SIGKILL.

* *first fallback answer*: when the first answer from the fallback arrived (the pool's consumer group
  drops a killed member after its session timeout, 6 s; the edge reads membership every 0.5 s).
* *turns in flight at the kill*: sent before it, answered after. They are republished to the fallback once
  the edge sees the pool has no live worker (``edge.turns.reroute_stranded``); one whose answer had begun
  streaming goes with that text, and the fallback continues it (*continued*).
* *later turns to the fallback*: of the turns sent after the first fallback answer and before the restart,
  the share the fallback answered, and their p50 latency.
* *lost*: turns that got no answer (an error, a timeout). Target 0.
* *back*: from the restart, the first turn answered by the pool again.

    .venv/bin/python bench/fallback.py [--clients 4] [--down-s 20]

Writes ``bench/results/fallback.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from chatbus.stack import Stack, free_port  # noqa: E402
from core.config import Settings  # noqa: E402

OUT = ROOT / "bench" / "results"
PRIMARY, SMALL = "chatbus-tiny-random", "chatbus-tiny-small"
QUESTIONS = [
    "What is a good name for a pet cat?",
    "Any tips for a relaxing weekend?",
    "Tell me a fun fact about octopuses.",
    "How many legs does a spider have?",
]


async def traffic(url: str, clients: int, stop: asyncio.Event, turns: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10, read=150)) as http:

        async def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                sent = time.time()
                body = {"model": SMALL, "messages": [{"role": "user", "content": QUESTIONS[(n + i) % len(QUESTIONS)]}], "max_tokens": 8}
                try:
                    r = await http.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    turns.append({"sent": sent, "done": time.time(), "status": 0, "error": type(exc).__name__})
                    continue
                if r.status_code == 429:
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                    continue
                answer = r.json() if r.status_code == 200 else {}
                turns.append(
                    {
                        "sent": sent,
                        "done": time.time(),
                        "status": r.status_code,
                        "model": answer.get("model"),
                        "route": answer.get("route"),
                        "error": None if r.status_code == 200 else r.text[:200],
                    }
                )
                i += 1

        await asyncio.gather(*(client(n) for n in range(clients)))


async def run(stack: Stack, clients: int, down_s: float) -> dict[str, Any]:
    turns: list[dict[str, Any]] = []
    stop = asyncio.Event()
    load = asyncio.create_task(traffic(stack.edge_url, clients, stop, turns))
    service = next(s for s in stack.services if s.startswith("inference.chatbus-tiny-small"))
    await asyncio.sleep(15)
    before = [t["done"] - t["sent"] for t in turns if t["status"] == 200]
    pid = stack.running(service)
    assert pid, "the small pool's worker is not running"
    killed = time.time()
    os.killpg(pid, signal.SIGKILL)  # a crash: the pid file stays, nothing deregisters the member
    await asyncio.sleep(down_s)
    await asyncio.to_thread(stack.stop, service)  # forget the dead process
    restarted = time.time()
    await asyncio.to_thread(stack.start, service)
    deadline = time.time() + 120
    while time.time() < deadline and not any(t["sent"] > restarted and t.get("model") == SMALL for t in turns):
        await asyncio.sleep(0.5)
    await asyncio.sleep(3)
    stop.set()
    await load
    p50 = statistics.median(before)
    fallbacks = [t for t in turns if t.get("route") and t["route"].get("fallback_from") == SMALL]
    detected = min((t["done"] for t in fallbacks), default=float("nan"))
    caught = [t for t in turns if t["sent"] < killed < t["done"]]  # in flight when the worker died
    after = [t for t in turns if detected <= t["sent"] <= restarted]  # sent once the fallback answered
    back = min((t["done"] for t in turns if t["sent"] > restarted and t.get("model") == SMALL), default=None)
    return {
        "clients": clients,
        "down_s": down_s,
        "turns": len(turns),
        "answered": sum(t["status"] == 200 for t in turns),
        "lost": sum(t["status"] != 200 for t in turns),
        "p50_before_s": round(p50, 3),
        "first_fallback_answer_s": round(detected - killed, 2),
        "caught_in_flight": len(caught),
        "caught_rerouted": sum(1 for t in caught if t.get("model") == PRIMARY),
        "caught_continued": sum(1 for t in caught if (t.get("route") or {}).get("continued_after")),
        "longest_wait_s": round(max((t["done"] - t["sent"] for t in caught), default=0.0), 2),
        "after_to_fallback": round(sum(t.get("model") == PRIMARY for t in after) / max(1, len(after)), 3),
        "after_p50_s": round(statistics.median([t["done"] - t["sent"] for t in after]), 3) if after else None,
        "fallback_answers": len(fallbacks),
        "back_after_restart_s": None if back is None else round(back - restarted, 2),
        "errors": sorted({t["error"] for t in turns if t["error"]})[:5],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--down-s", type=float, default=20.0)
    args = ap.parse_args()
    settings = Settings(
        state_dir=Path(tempfile.mkdtemp(prefix="chatbus-bench-fallback-")),
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/",
        edge_port=free_port(),
        model="tiny",
        served_model_name=PRIMARY,
        extra_models=f"{SMALL}=tiny",
        model_fallbacks=f"{SMALL}={PRIMARY}",
        output_rail=False,
        supervise=False,  # no keeper: the pool stays down for --down-s
    )
    stack = Stack(settings)
    stack.up()
    try:
        report = asyncio.run(run(stack, args.clients, args.down_s))
    finally:
        stack.down()
    print(json.dumps(report, indent=2))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fallback.json").write_text(json.dumps(report, indent=2) + "\n")
    r = report
    lines = [
        f"A pool's only worker SIGKILLed under {r['clients']} clients' steady traffic, restarted {r['down_s']:g} s later (tiny model twice; times from the kill):",
        "",
        "| answered | lost | first fallback answer | turns in flight at the kill (rerouted; continued) | their longest wait | later turns to the fallback (p50) | pool serving again after its restart |",
        "|---|---|---|---|---|---|---|",
        f"| {r['answered']} of {r['turns']} | {r['lost']} | {r['first_fallback_answer_s']} s | {r['caught_in_flight']} ({r['caught_rerouted']}; {r['caught_continued']}) | {r['longest_wait_s']} s | {r['after_to_fallback']} ({r['after_p50_s']} s; {r['p50_before_s']} s before) | {r['back_after_restart_s']} s |",
    ]
    (OUT / "fallback.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
