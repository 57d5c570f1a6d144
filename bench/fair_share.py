"""Fair share across tenants: a light tenant's TTFT alone and while another tenant sends 10x its load, with
the inference worker's fair queue off (arrival order) and on (``CHATBUS_FAIR_QUEUE_TURNS``).

A local stack of its own (Kafka, FerretDB, safety, retrieval, recorder, one edge with two API keys); the
inference worker runs the ``openai`` engine on a scripted upstream (``tests/upstream.py``) with
``--slots`` generation slots (``CHATBUS_MAX_INFLIGHT_TURNS``), each answer ``--words`` words at
``--pace-ms``. The heavy tenant keeps ``--heavy`` streamed turns in flight (closed loop); the light tenant
sends ``--turns`` streamed turns one after another. TTFT is the client's: request sent to first content
chunk. Conversations are new per turn, so turns spread over ``chat.grounded``'s partitions as in real use.

    .venv/bin/python bench/fair_share.py [--slots 4] [--heavy 10] [--words 40] [--pace-ms 20] [--turns 20]

Writes ``bench/results/fair_share.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from chatbus.stack import Stack, free_port  # noqa: E402
from core.config import Settings  # noqa: E402
from tests.upstream import Upstream, spawn_scripted_inference  # noqa: E402

OUT = ROOT / "bench" / "results"
MODEL = "chatbus-tiny-random"
HEAVY, LIGHT = "sk-bench-heavy", "sk-bench-light"


async def ttft(http: httpx.AsyncClient, url: str, key: str) -> float:
    """One streamed turn; seconds to its first content chunk (the rest is read to the end)."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": f"Tell me something, {uuid.uuid4().hex[:8]}."}], "max_tokens": 500}
    started = time.perf_counter()
    first: float | None = None
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if first is None and line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunk = orjson.loads(line[5:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
    assert first is not None, "no content"
    return first


async def light_ttfts(url: str, turns: int, heavy: int) -> tuple[list[float], float]:
    """The light tenant's TTFTs (seconds), with ``heavy`` heavy turns kept in flight meanwhile; and the heavy
    tenant's throughput meanwhile (turns completed per second)."""
    done = 0
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=300), limits=httpx.Limits(max_connections=heavy + 4)) as http:

        async def flood() -> None:
            nonlocal done
            while not stop.is_set():
                await ttft(http, url, HEAVY)
                done += 1

        floods = [asyncio.create_task(flood()) for _ in range(heavy)]
        if heavy:
            await asyncio.sleep(3)  # the flood fills the worker first
        started = time.perf_counter()
        out = [await ttft(http, url, LIGHT) for _ in range(turns)]
        elapsed = time.perf_counter() - started
        finished_before = done
        stop.set()
        await asyncio.gather(*floods, return_exceptions=True)
    return out, finished_before / elapsed


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--heavy", type=int, default=10, help="heavy turns in flight (10x the light tenant's one)")
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--pace-ms", type=float, default=20.0)
    ap.add_argument("--turns", type=int, default=20, help="light turns per measurement")
    ap.add_argument("--queue", type=int, default=32, help="CHATBUS_FAIR_QUEUE_TURNS when the fair queue is on")
    ap.add_argument("--reserve", type=int, default=1, help="CHATBUS_FAIR_RESERVE_SLOTS in the last configuration")
    args = ap.parse_args()
    settings = Settings(
        state_dir=Path(tempfile.mkdtemp(prefix="chatbus-bench-fair-")),
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/",
        edge_port=free_port(),
        model="tiny",
        served_model_name=MODEL,
        output_rail=False,
        api_keys=SecretStr(f"{HEAVY},{LIGHT}"),
        admit_max_inflight=256,
        admit_max_lag=256,
    )
    rows: list[dict[str, Any]] = []
    words = " ".join(f"w{i}" for i in range(args.words))
    with Upstream(lambda prompt: words, pace_s=args.pace_ms / 1000) as up:
        stack = Stack(settings)
        stack.up(("kafka", "ferretdb", "safety", "retrieval", "recorder", "edge"), wait=False)
        try:
            configs = (("off (arrival order)", 0, 0), ("on, no reserve", args.queue, 0), (f"on, {args.reserve} reserve slot", args.queue, args.reserve))
            for name, queue, reserve in configs:
                if stack.running("inference"):
                    stack.stop("inference")
                spawn_scripted_inference(stack, up, MODEL, output_rail=False, max_inflight_turns=args.slots, fair_queue_turns=queue, fair_reserve_slots=reserve)
                stack.wait_ready(timeout_s=300)
                asyncio.run(light_ttfts(stack.edge_url, 3, 0))  # warm-up
                idle, _ = asyncio.run(light_ttfts(stack.edge_url, args.turns, 0))
                loaded, heavy_rate = asyncio.run(light_ttfts(stack.edge_url, args.turns, args.heavy))
                row = {
                    "fair_queue": name,
                    "fair_queue_turns": queue,
                    "fair_reserve_slots": reserve,
                    "idle_ttft_p50_ms": round(statistics.median(idle) * 1000, 1),
                    "loaded_ttft_p50_ms": round(statistics.median(loaded) * 1000, 1),
                    "loaded_ttft_p90_ms": round(pct(loaded, 0.9) * 1000, 1),
                    "ratio_p50": round(statistics.median(loaded) / statistics.median(idle), 2),
                    "ratio_p90": round(pct(loaded, 0.9) / pct(idle, 0.9), 2),
                    "heavy_turns_per_s": round(heavy_rate, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            stack.down()
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"slots": args.slots, "heavy_in_flight": args.heavy, "words": args.words, "pace_ms": args.pace_ms, "turns": args.turns, "rows": rows}
    (OUT / "fair_share.json").write_text(json.dumps(report, indent=2) + "\n")
    answer_s = args.words * args.pace_ms / 1000
    lines = [
        f"Light tenant's TTFT, alone and while a heavy tenant keeps {args.heavy} turns in flight against its 1 "
        f"({args.slots} generation slots, {args.words}-word answers at {args.pace_ms:g} ms a word: ~{answer_s:.1f} s each; {args.turns} light turns each):",
        "",
        "| fair queue | light TTFT alone p50 | light TTFT under the flood p50 | p90 | ratio p50 | ratio p90 (to idle p90) | heavy turns/s meanwhile |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['fair_queue']} | {r['idle_ttft_p50_ms']} ms | {r['loaded_ttft_p50_ms']} ms | {r['loaded_ttft_p90_ms']} ms | {r['ratio_p50']}x | {r['ratio_p90']}x | {r['heavy_turns_per_s']} |"
        )
    (OUT / "fair_share.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
