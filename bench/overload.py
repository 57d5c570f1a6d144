"""Overload: offered load rising past capacity, with and without admission control.

Run against a running stack (``make up``)::

    .venv/bin/python bench/overload.py                 # rates 1,2,4,8,16 turns/s, 15 s each
    .venv/bin/python bench/overload.py --quick         # a one-minute smoke run

The bench starts two extra edges on the stack (``bench/edge_harness.py``'s ``BenchEdge``: their own
processes, reply partitions 6 and 7):

* **admission on**: the default bounds (``CHATBUS_ADMIT_MAX_INFLIGHT``, ``CHATBUS_ADMIT_MAX_LAG``,
  :mod:`edge.admission`), or ``--max-lag`` / ``--max-inflight``;
* **admission off**: bounds too large to matter — what a server that queues without limit does.

For each, an open-loop generator (arrivals at a fixed rate, not waiting for answers — as real users
do) offers each rate in ``--rates`` for ``--step-s`` seconds; every request is a streamed chat turn
with ``--max-tokens`` tokens. Per request: HTTP status, time to the 429 (refused) or TTFT and
end-to-end time (admitted), finish reason, and whether it ended at all within ``--timeout-s``.
Reported per step: admitted/s, the share refused, admitted TTFT p50/p99, 429 latency p99, and
*lost* = admitted but never finished (no ``[DONE]``, an error chunk, or a client timeout). Also
checked: the records published to ``chat.requests`` equal the admitted turns (a refusal queues
nothing). Writes ``bench/results/overload.{json,md,png}``. Loopback only; bounded counts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import report
from edge_harness import BenchEdge

from core.config import get_settings
from topics.ops import end_offsets
from topics.registry import CHAT_REQUESTS, topic

QUESTION = "Explain how Python's for loop works, with an example."


async def one(http: httpx.AsyncClient, url: str, model: str, max_tokens: int, timeout_s: float, step: int, sent_at: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    out: dict[str, Any] = {"step": step, "sent_at": sent_at}
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens, "stream": True}
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                out["status"] = r.status_code
                if r.status_code != 200:
                    await r.aread()
                    out["answered_ms"] = (time.perf_counter() - t0) * 1000
                    out["retry_after"] = r.headers.get("retry-after")
                    return out
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        out["done"] = True
                        break
                    chunk = orjson.loads(line[6:])
                    if "error" in chunk:
                        out["error"] = chunk["error"].get("type")
                    choices = chunk.get("choices") or []
                    if choices and choices[0].get("delta", {}).get("content") and "ttft_ms" not in out:
                        out["ttft_ms"] = (time.perf_counter() - t0) * 1000
                    if choices and choices[0].get("finish_reason"):
                        out["finish"] = choices[0]["finish_reason"]
                out["e2e_ms"] = (time.perf_counter() - t0) * 1000
    except TimeoutError:
        out["timed_out"] = True
    except httpx.HTTPError as exc:
        out["http_error"] = type(exc).__name__
    return out


async def run_mode(url: str, model: str, rates: list[float], step_s: float, max_tokens: int, timeout_s: float) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as http:
        tasks: list[asyncio.Task[dict[str, Any]]] = []
        start = time.perf_counter()
        at = 0.0
        for step, rate in enumerate(rates):
            n = int(rate * step_s)
            for k in range(n):
                when = at + k / rate
                delay = start + when - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(http, url, model, max_tokens, timeout_s, step, when)))
            at += step_s
        return list(await asyncio.gather(*tasks))


def summarise_steps(rows: list[dict[str, Any]], rates: list[float], step_s: float) -> list[dict[str, Any]]:
    out = []
    for step, rate in enumerate(rates):
        mine = [r for r in rows if r["step"] == step]
        admitted = [r for r in mine if r.get("status") == 200]
        refused = [r for r in mine if r.get("status") == 429]
        lost = [r for r in admitted if not r.get("done") or r.get("error") or r.get("timed_out")]
        lost += [r for r in mine if "status" not in r]  # no answer at all (timeout before headers)
        ttft = [r["ttft_ms"] for r in admitted if "ttft_ms" in r]
        out.append(
            {
                "offered_per_s": rate,
                "requests": len(mine),
                "admitted_per_s": round(len(admitted) / step_s, 2),
                "refused_share": round(len(refused) / max(len(mine), 1), 3),
                "ttft_p50_ms": round(report.pct(ttft, 50), 1) if ttft else None,
                "ttft_p99_ms": round(report.pct(ttft, 99), 1) if ttft else None,
                "refusal_p99_ms": round(report.pct([r["answered_ms"] for r in refused], 99), 1) if refused else None,
                "lost": len(lost),
                "other_status": sorted({r.get("status") for r in mine} - {200, 429, None}),
            }
        )
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="1,2,4,8,16", help="offered turns/s, comma-separated")
    ap.add_argument("--step-s", type=float, default=15.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--timeout-s", type=float, default=150.0)
    ap.add_argument("--max-lag", type=int, default=None, help="admission bound for the 'on' edge (default: the setting)")
    ap.add_argument("--max-inflight", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="rates 2,8 for 8 s each")
    args = ap.parse_args()
    if args.quick:
        args.rates, args.step_s = "2,8", 8.0
    rates = [float(r) for r in args.rates.split(",")]
    settings = get_settings()
    requests_topic = topic(CHAT_REQUESTS, settings.topic_prefix)
    on_bounds = {k: v for k, v in {"admit_max_lag": args.max_lag, "admit_max_inflight": args.max_inflight}.items() if v is not None}
    modes = {
        "admission on": (6, on_bounds),
        "admission off": (7, {"admit_max_lag": 10**9, "admit_max_inflight": 10**9}),
    }
    results: dict[str, Any] = {}
    for mode, (partition, bounds) in modes.items():
        env = {f"CHATBUS_{k.upper()}": str(v) for k, v in bounds.items()}
        edge = BenchEdge(settings.topic_prefix, env, reply_partition=partition, wide_open=False).start()
        try:
            time.sleep(1.5)  # one consumer-lag reading before the first request
            before = sum((await end_offsets(settings, [requests_topic])).values())
            t0 = time.perf_counter()
            rows = await run_mode(edge.url, settings.model_name, rates, args.step_s, args.max_tokens, args.timeout_s)
            wall = time.perf_counter() - t0
            published = sum((await end_offsets(settings, [requests_topic])).values()) - before
        finally:
            edge.stop()
        steps = summarise_steps(rows, rates, args.step_s)
        admitted = sum(1 for r in rows if r.get("status") == 200)
        results[mode] = {
            "bounds": bounds or "defaults",
            "steps": steps,
            "admitted": admitted,
            "published": published,
            "wall_s": round(wall, 1),
            "per_request": rows,
        }
        print(f"{mode}: {len(rows)} requests, {admitted} admitted, {published} published, {sum(s['lost'] for s in steps)} lost, {wall:.0f} s")
        await asyncio.sleep(5)  # let the pipeline drain between modes

    header = ["mode", "offered/s", "admitted/s", "refused", "TTFT p50 (ms)", "TTFT p99 (ms)", "429 p99 (ms)", "lost"]
    md_rows = [
        [mode, s["offered_per_s"], s["admitted_per_s"], f"{s['refused_share']:.0%}", s["ttft_p50_ms"], s["ttft_p99_ms"], s["refusal_p99_ms"], s["lost"]]
        for mode, r in results.items()
        for s in r["steps"]
    ]
    md = report.table(header, md_rows)
    md += "\n" + report.table(
        ["mode", "admitted", "published to chat.requests", "lost"],
        [[m, r["admitted"], r["published"], sum(s["lost"] for s in r["steps"])] for m, r in results.items()],
    )

    fig, (left, right) = report.figure(ncols=2)
    for mode, r in results.items():
        xs = [s["offered_per_s"] for s in r["steps"]]
        left.plot(xs, [s["ttft_p99_ms"] or float("nan") for s in r["steps"]], marker="o", label=f"{mode}: TTFT p99")
        left.plot(xs, [s["ttft_p50_ms"] or float("nan") for s in r["steps"]], marker=".", linestyle="--", label=f"{mode}: TTFT p50")
        right.plot(xs, [s["admitted_per_s"] for s in r["steps"]], marker="o", label=f"{mode}: admitted/s")
    on = results["admission on"]["steps"]
    right.plot([s["offered_per_s"] for s in on], [s["offered_per_s"] * s["refused_share"] for s in on], marker="x", label="admission on: 429/s")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("offered turns/s")
        ax.legend(fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("admitted turns' TTFT (ms)")
    right.set_ylabel("turns/s")
    left.set_title(f"{args.max_tokens}-token turns, {args.step_s:.0f} s per rate")
    report.write("overload", {"rates": rates, "step_s": args.step_s, "max_tokens": args.max_tokens, "modes": results}, md, fig)


if __name__ == "__main__":
    asyncio.run(main())
