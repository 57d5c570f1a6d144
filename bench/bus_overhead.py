"""Bus overhead: the same engine and model called directly vs through the whole pipeline.

Run against a running stack (``make up``)::

    .venv/bin/python bench/bus_overhead.py --turns 60

For each of ``--turns`` questions, three measurements, interleaved so they share the machine's noise:

1. **bus**: a streamed chat completion through the edge (official ``openai`` client) — edge, Kafka,
   safety (PII masking + the query embedding, computed once), retrieval (Milvus), inference, and the
   token events' trip back; TTFT = request sent → first content chunk, as the client sees it. The
   turn's own split (``timing`` on its finish chunk, :mod:`schemas.timing`) gives each stage's work
   and each hop's transport + queueing;
2. **direct in-process**: the same engine class with the same model in this process, given the *same
   prompt* the pipeline built (the grounded messages, read from ``chat.grounded``); TTFT = call →
   first text from ``engine.generate``;
3. **direct HTTP/SSE**: the same, behind a minimal Starlette + sse-starlette endpoint in its own process
   (``bench/direct_server.py``): what a single-process server (vLLM's OpenAI server, say) costs.

Reported: TTFT p50/p90/p99 of each mode and the ratios bus/direct; the per-stage and per-hop split;
``bus overhead`` = client TTFT − the engine's own TTFT in the pipeline (``prefill``). Targets (this
issue, 2-core machine): all hops p50 ≤ 8 ms and p99 ≤ 25 ms; safety p99 ≤ 10 ms; retrieval p99 ≤ 50 ms;
bus overhead p50 ≤ 30 ms. Writes ``bench/results/bus_overhead.{json,md,png}``. Loopback only, bounded.
Every process here shares one small host, so the direct modes' engine and the stack's compete for the
same cores only while each runs — measurements are sequential.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import report

from core.config import get_settings
from inference_workers.engines import GenerationRequest, make_engine
from schemas.events import GroundedTurn, decode
from topics.clients import make_consumer, partitions_of
from topics.registry import CHAT_GROUNDED, topic

QUESTIONS = [
    "How do I define a function in Python?",
    "What is a list comprehension?",
    "How do I read a file line by line?",
    "What does the with statement do?",
    "How are exceptions handled?",
]
TARGETS = {  # metric -> (percentile, bound ms)
    "hops (all three)": [("p50", 8.0), ("p99", 25.0)],
    "safety": [("p99", 10.0)],
    "retrieval": [("p99", 50.0)],
    "bus overhead": [("p50", 30.0)],
}


async def bus_turn(client: AsyncOpenAI, model: str, question: str, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft, cid, timing = None, "", None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0, stream=True
    )
    async for chunk in stream:
        cid = chunk.id
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        extra = chunk.model_extra or {}
        if "timing" in extra:
            timing = extra["timing"]
    return {"id": cid, "ttft_ms": None if ttft is None else ttft * 1000, "timing": timing}


async def direct_turn(engine: Any, messages: list[dict[str, str]], max_tokens: int) -> float | None:
    gen = GenerationRequest(request_id=os.urandom(8).hex(), messages=messages, max_tokens=max_tokens, temperature=0.0, seed=0)
    t0 = time.perf_counter()
    first = None
    async for delta in engine.generate(gen):
        if first is None and delta.text:
            first = time.perf_counter() - t0
    return None if first is None else first * 1000


async def http_turn(http: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int) -> float | None:
    t0 = time.perf_counter()
    first = None
    async with http.stream("POST", f"{url}/generate", json={"messages": messages, "max_tokens": max_tokens}) as r:
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
    return None if first is None else first * 1000


class GroundedTail:
    """Collects the grounded prompt of every interactive turn (``chat.grounded``, from now on)."""

    def __init__(self) -> None:
        self.prompts: dict[str, list[dict[str, str]]] = {}
        self.settings = get_settings()
        self.consumer = make_consumer(self.settings, group_id=None, auto_offset_reset="latest")
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        tps = await partitions_of(self.consumer, topic(CHAT_GROUNDED, self.settings.topic_prefix))
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        self.task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        async for record in self.consumer:
            ev = decode(record.value)
            if isinstance(ev, GroundedTurn):
                self.prompts[ev.correlation_id] = [m.model_dump() for m in ev.prompt_messages]

    async def prompt(self, cid: str) -> list[dict[str, str]]:
        for _ in range(200):
            if cid in self.prompts:
                return self.prompts[cid]
            await asyncio.sleep(0.02)
        raise RuntimeError(f"grounded prompt of {cid} not seen on chat.grounded")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        await self.consumer.stop()


def start_direct_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("direct_server.py")), "--port", str(port)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/generate", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, timeout=30)
            return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("direct server did not start")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--direct-port", type=int, default=8999)
    ap.add_argument("--questions", type=Path, default=None, help="one question a line, asked in order (distinct questions: no prefix-cache hits)")
    ap.add_argument("--out", default="bus_overhead", help="results name under bench/results")
    args = ap.parse_args()
    settings = get_settings()
    questions = [q.strip() for q in args.questions.read_text().splitlines() if q.strip()] if args.questions else QUESTIONS
    threads = int(os.environ.get("CHATBUS_TORCH_THREADS") or (os.cpu_count() or 1))
    import torch

    torch.set_num_threads(threads)  # as the stack gives its inference worker (chatbus.stack: every core)
    client = AsyncOpenAI(base_url=f"http://{settings.edge_host}:{settings.edge_port}/v1", api_key="none", max_retries=0)
    engine = make_engine(settings)
    await engine.start()
    server = start_direct_server(args.direct_port)
    tail = GroundedTail()
    await tail.start()
    url = f"http://127.0.0.1:{args.direct_port}"
    rows: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            for i in range(args.warmup + args.turns):
                q = questions[i % len(questions)]
                bus = await bus_turn(client, settings.model_name, q, args.max_tokens)
                prompt = await tail.prompt(bus["id"])
                direct = await direct_turn(engine, prompt, args.max_tokens)
                via_http = await http_turn(http, url, prompt, args.max_tokens)
                if i >= args.warmup:
                    rows.append({**bus, "direct_ms": direct, "direct_http_ms": via_http})
    finally:
        await tail.stop()
        await engine.stop()
        server.terminate()
        server.wait(20)

    def col(f: Any) -> list[float]:
        return [v for v in (f(r) for r in rows) if v is not None]

    metrics: dict[str, list[float]] = {
        "TTFT through the bus (client)": col(lambda r: r["ttft_ms"]),
        "TTFT direct, in-process engine": col(lambda r: r["direct_ms"]),
        "TTFT direct, HTTP/SSE endpoint": col(lambda r: r["direct_http_ms"]),
    }
    for group in ("stages", "hops"):
        for name in ("edge", "safety", "retrieval", "prefill", "edge→safety", "safety→retrieval", "retrieval→inference", "inference→edge"):
            vals = col(lambda r, g=group, n=name: (r["timing"] or {}).get(g, {}).get(n))
            if vals:
                metrics[name if group == "stages" else f"hop {name}"] = vals
    metrics["hops (all three)"] = col(lambda r: (r["timing"] or {}).get("totals", {}).get("hops"))
    metrics["bus overhead"] = [
        r["ttft_ms"] - r["timing"]["stages"]["prefill"] for r in rows if r["ttft_ms"] is not None and r["timing"] and "prefill" in r["timing"]["stages"]
    ]
    summary = {k: report.summarise(v) for k, v in metrics.items() if v}
    bus, direct, via_http = (summary[k]["p50"] for k in list(metrics)[:3])
    ratios = {"bus / direct in-process (p50)": round(bus / direct, 2), "bus / direct HTTP (p50)": round(bus / via_http, 2)}
    verdicts = []
    for metric, bounds in TARGETS.items():
        for p, bound in bounds:
            value = summary.get(metric, {}).get(p)
            verdicts.append({"metric": metric, "percentile": p, "target_ms": bound, "measured_ms": value, "met": value is not None and value <= bound})

    md = report.table(["metric (ms)", "p50", "p90", "p99", "mean", "n"], [[k, s["p50"], s["p90"], s["p99"], s["mean"], s["n"]] for k, s in summary.items()])
    md += "\n" + report.table(["ratio", "value"], list(ratios.items()))
    md += "\n" + report.table(
        ["target", "measured", "met"],
        [[f"{v['metric']} {v['percentile']} ≤ {v['target_ms']} ms", v["measured_ms"], "yes" if v["met"] else "**no**"] for v in verdicts],
    )

    fig, (left, right) = report.figure(ncols=2)
    names = list(metrics)[:3]
    left.boxplot([metrics[n] for n in names], showfliers=False)
    left.set_xticks(range(1, 4), ["bus", "direct\nin-process", "direct\nHTTP/SSE"])
    left.set_ylabel("TTFT (ms)")
    left.set_title(f"TTFT, {len(rows)} turns, {args.max_tokens} tokens")
    split = [k for k in summary if k not in names and k not in ("hops (all three)", "bus overhead")]
    right.barh(split, [summary[k]["p99"] for k in split], color="#f3b27a", label="p99")
    right.barh(split, [summary[k]["p50"] for k in split], color="#d9534f", label="p50")
    right.invert_yaxis()
    right.set_xlabel("ms")
    right.set_title("where the bus turn's TTFT goes")
    right.legend()
    report.write(
        args.out,
        {
            "turns": len(rows),
            "max_tokens": args.max_tokens,
            "model": settings.model_name,
            "summary_ms": summary,
            "ratios": ratios,
            "targets": verdicts,
            "per_turn": rows,
        },
        md,
        fig,
    )


if __name__ == "__main__":
    asyncio.run(main())
