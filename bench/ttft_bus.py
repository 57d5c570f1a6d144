"""Time-to-first-token through the whole bus, with the per-stage and per-hop split.

Run against a running stack (``make up``)::

    .venv/bin/python bench/ttft_bus.py --turns 40

Each turn is streamed with the official ``openai`` client; TTFT is the time from sending the request
to the first content chunk, as the client sees it. The stage marks each event carried
(``schemas/events.py``) are read back from the recorder's turn documents, giving per turn:

* ``safety``, ``retrieval``: each stage's own work (end − start),
* ``hop_*``: transport + queueing between stages (next stage's start − previous stage's end),
* ``engine_ttft``: ``first_token − inference_dequeued`` (prefill + first decode step),
* ``bus_overhead``: client TTFT − engine TTFT.

Writes ``bench/results/ttft_bus.json`` and ``.md``. Loopback only; bounded count.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import orjson
from openai import AsyncOpenAI
from pymongo import AsyncMongoClient

from chatbus.config import get_settings

OUT = Path(__file__).resolve().parent / "results"
SPANS = {
    "edge→safety hop": ("edge_published", "safety_start"),
    "safety": ("safety_start", "safety_end"),
    "safety→retrieval hop": ("safety_end", "retrieval_start"),
    "retrieval": ("retrieval_start", "retrieval_end"),
    "retrieval→inference hop": ("retrieval_end", "inference_dequeued"),
    "engine TTFT": ("inference_dequeued", "first_token"),
}
QUESTIONS = [
    "How do I define a function in Python?",
    "What is a list comprehension?",
    "How do I read a file line by line?",
    "What does the with statement do?",
    "How are exceptions handled?",
]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


async def one_turn(client: AsyncOpenAI, model: str, question: str, max_tokens: int) -> tuple[str, float, float]:
    t0 = time.perf_counter()
    ttft = None
    cid = ""
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, stream=True
    )
    async for chunk in stream:
        cid = chunk.id
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
    return cid, (ttft or float("nan")) * 1000, (time.perf_counter() - t0) * 1000


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    settings = get_settings()
    client = AsyncOpenAI(base_url=f"http://{settings.edge_host}:{settings.edge_port}/v1", api_key="none", max_retries=0)
    for i in range(args.warmup):
        await one_turn(client, settings.model_name, QUESTIONS[i % len(QUESTIONS)], args.max_tokens)
    turns = []
    for i in range(args.turns):
        cid, ttft, total = await one_turn(client, settings.model_name, QUESTIONS[i % len(QUESTIONS)], args.max_tokens)
        turns.append({"id": cid, "ttft_ms": ttft, "total_ms": total})

    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    db = mongo[settings.mongo_db]
    deadline = time.monotonic() + 30
    for t in turns:
        while True:
            doc = await db.turns.find_one({"_id": t["id"], "stages.first_token": {"$exists": True}})
            if doc or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        stages = (doc or {}).get("stages", {})
        for name, (a, b) in SPANS.items():
            if a in stages and b in stages:
                t[name] = (stages[b] - stages[a]) * 1000
        if "engine TTFT" in t:
            t["bus overhead (TTFT − engine TTFT)"] = t["ttft_ms"] - t["engine TTFT"]
        hops = [t[k] for k in SPANS if k.endswith("hop") and k in t]
        if len(hops) == 3:
            t["all hops"] = sum(hops)
    await mongo.close()

    metrics = ["ttft_ms", *SPANS, "all hops", "bus overhead (TTFT − engine TTFT)", "total_ms"]
    summary = {}
    for m in metrics:
        vals = [t[m] for t in turns if m in t]
        if vals:
            summary[m] = {"p50": round(pct(vals, 50), 2), "p90": round(pct(vals, 90), 2), "p99": round(pct(vals, 99), 2), "mean": round(statistics.fmean(vals), 2), "n": len(vals)}
    OUT.mkdir(exist_ok=True)
    result = {"turns": args.turns, "max_tokens": args.max_tokens, "model": settings.model_name, "summary_ms": summary, "per_turn": turns}
    (OUT / "ttft_bus.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    lines = ["| metric (ms) | p50 | p90 | p99 | mean |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {s['p50']} | {s['p90']} | {s['p99']} | {s['mean']} |" for m, s in summary.items()]
    (OUT / "ttft_bus.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
