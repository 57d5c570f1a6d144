"""Interactive time-to-first-token while a large batch runs, next to idle time-to-first-token.

Run against a running stack (``make up``)::

    .venv/bin/python bench/batch_priority.py --turns 40 --batch-lines 2000

1. **idle**: ``--turns`` sequential streamed chat turns, nothing else running;
2. **under batch load**: a batch of ``--batch-lines`` lines is submitted through the batch API
   (the batch lane: ``batch.requests`` → … → ``batch.results``); once the inference worker is busy
   with it (some lines completed), the same ``--turns`` interactive turns are measured again while
   the batch keeps running; the batch's own throughput over that window is reported too;
3. the batch is cancelled (``--finish`` waits for it instead).

TTFT is measured as the client sees it (request sent → first content chunk, official ``openai``
client); the per-stage split of each turn (:mod:`schemas.timing`'s stages and hops) is read back from the
recorder's turn documents, to show where a turn waits behind batch work. Writes ``bench/results/batch_priority.json`` and ``.md``. Loopback only; bounded counts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import orjson
from bus_overhead import QUESTIONS  # bench/ is the script's folder
from openai import AsyncOpenAI
from pymongo import AsyncMongoClient
from report import pct

from batches.service import BatchService
from core.config import Settings, get_settings
from schemas.timing import HOPS, STAGES
from topics.ops import end_offsets
from topics.registry import BATCH_RESULTS, topic

SPANS = {**STAGES, **HOPS}

OUT = Path(__file__).resolve().parent / "results"


def summary(values: list[float]) -> dict[str, float]:
    """Percentiles of the turns that streamed content (a turn whose first token was EOS has no TTFT)."""
    values = [v for v in values if v == v]
    return {
        "p50": round(pct(values, 50), 1),
        "p90": round(pct(values, 90), 1),
        "p99": round(pct(values, 99), 1),
        "mean": round(statistics.fmean(values), 1),
        "n": len(values),
    }


async def ttft(client: AsyncOpenAI, model: str, question: str, max_tokens: int) -> tuple[str, float]:
    t0 = time.perf_counter()
    first = None
    cid = ""
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, stream=True)
    async for chunk in stream:
        cid = chunk.id
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
    return cid, (first or float("nan")) * 1000


async def measure(client: AsyncOpenAI, model: str, turns: int, max_tokens: int) -> tuple[list[str], list[float]]:
    results = [await ttft(client, model, QUESTIONS[i % len(QUESTIONS)], max_tokens) for i in range(turns)]
    return [r[0] for r in results], [r[1] for r in results]


async def stage_split(settings: Settings, ids: list[str]) -> dict[str, dict[str, float]]:
    """p50/p99 of each stage and hop of these turns, from the recorder's ``stages`` marks (ms)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    spans: dict[str, list[float]] = {name: [] for name in SPANS}
    try:
        for cid in ids:
            doc = None
            for _ in range(100):
                doc = await client[settings.mongo_db].turns.find_one({"_id": cid, "stages.first_token": {"$exists": True}})
                if doc:
                    break
                await asyncio.sleep(0.2)
            stages = (doc or {}).get("stages", {})
            for name, (a, b) in SPANS.items():
                if a in stages and b in stages:
                    spans[name].append((stages[b] - stages[a]) * 1000)
    finally:
        await client.close()
    return {name: {"p50": round(pct(v, 50), 1), "p99": round(pct(v, 99), 1)} for name, v in spans.items() if v}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=16, help="interactive turns")
    ap.add_argument("--batch-lines", type=int, default=2000)
    ap.add_argument("--batch-max-tokens", type=int, default=64)
    ap.add_argument("--finish", action="store_true", help="wait for the batch to complete instead of cancelling it")
    args = ap.parse_args()
    settings = get_settings()
    model = settings.model_name
    client = AsyncOpenAI(base_url=f"http://{settings.edge_host}:{settings.edge_port}/v1", api_key="none", max_retries=0)
    await measure(client, model, 3, args.max_tokens)  # warm-up
    idle_ids, idle = await measure(client, model, args.turns, args.max_tokens)
    print(f"idle TTFT p50 {pct(idle, 50):.1f} ms")

    lines = [
        orjson.dumps(
            {
                "custom_id": f"bench-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Batch question {i}: {QUESTIONS[i % 5]}"}],
                    "max_tokens": args.batch_max_tokens,
                },
            }
        )
        for i in range(args.batch_lines)
    ]
    results_topic = topic(BATCH_RESULTS, settings.topic_prefix)

    async def results_produced() -> int:  # completions on batch.results: independent of the batch store's lag
        return sum((await end_offsets(settings, [results_topic])).values())

    async with BatchService.connect(settings) as batches:
        start_results = await results_produced()
        t_submit = time.perf_counter()
        uploaded = await batches.upload(b"\n".join(lines), "bench.jsonl")
        batch = await batches.create(uploaded["id"], metadata={"bench": "batch_priority"}, progress=True)
        submit_s = time.perf_counter() - t_submit
        bid = batch["id"]
        while await results_produced() < start_results + 5:  # the inference worker is busy with it
            await asyncio.sleep(0.2)
        before = await results_produced()
        t0 = time.perf_counter()
        loaded_ids, loaded = await measure(client, model, args.turns, args.max_tokens)
        window_s = time.perf_counter() - t0
        done_in_window = await results_produced() - before
        print(f"under batch load TTFT p50 {pct(loaded, 50):.1f} ms")
        final = await batches.wait(bid, progress=True) if args.finish else await batches.cancel(bid)

    result: dict[str, Any] = {
        "model": model,
        "turns": args.turns,
        "interactive_max_tokens": args.max_tokens,
        "batch_lines": args.batch_lines,
        "batch_max_tokens": args.batch_max_tokens,
        "max_inflight_turns": settings.max_inflight_turns,
        "interactive_reserve": settings.interactive_reserve,
        "batch_submit_s": round(submit_s, 2),
        "batch_lines_per_s_during_window": round(done_in_window / window_s, 2),
        "batch_status_at_end": final["status"],
        "ttft_ms": {"idle": summary(idle), "under_batch_load": summary(loaded)},
        "ratio_p50": round(pct(loaded, 50) / pct(idle, 50), 2),
        "stages_ms": {"idle": await stage_split(settings, idle_ids), "under_batch_load": await stage_split(settings, loaded_ids)},
        "raw_ms": {"idle": idle, "under_batch_load": loaded},
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "batch_priority.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    rows = ["| interactive TTFT (ms) | p50 | p90 | p99 | mean | n |", "|---|---|---|---|---|---|"]
    for name, s in result["ttft_ms"].items():
        rows.append(f"| {name.replace('_', ' ')} | {s['p50']} | {s['p90']} | {s['p99']} | {s['mean']} | {s['n']} |")
    rows += ["", "| stage / hop (ms) | idle p50 | idle p99 | loaded p50 | loaded p99 |", "|---|---|---|---|---|"]
    split = result["stages_ms"]
    for name in SPANS:
        a, b = split["idle"].get(name, {}), split["under_batch_load"].get(name, {})
        rows.append(f"| {name} | {a.get('p50', '')} | {a.get('p99', '')} | {b.get('p50', '')} | {b.get('p99', '')} |")
    rows.append("")
    rows.append(
        f"Batch: {args.batch_lines} lines × max_tokens {args.batch_max_tokens}, submitted in {result['batch_submit_s']} s; "
        f"{result['batch_lines_per_s_during_window']} lines/s completed while the interactive turns ran; p50 ratio loaded/idle {result['ratio_p50']}."
    )
    (OUT / "batch_priority.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
