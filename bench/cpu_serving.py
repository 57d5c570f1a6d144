"""CPU serving of a real model, in-process: decode scaling with concurrency and prefill cost.

Usage (the default is the packaged default model, provisioned by ``make setup``)::

    .venv/bin/python bench/cpu_serving.py                      # Qwen2.5-Coder-0.5B-Instruct
    .venv/bin/python bench/cpu_serving.py --model smollm2-135m --dtype float32

Three measurements with :class:`~inference_workers.engines.transformers_engine.TransformersEngine`, the
engine the inference worker runs, in one process so every ratio shares the machine's noise:

1. **dtype x threads** (``--dtypes``, ``--threads``): one stream in the continuous-batching engine (the
   worker's mode), prefill of a ~750-token prompt and decode tokens/s — the data behind
   ``CHATBUS_DTYPE=auto`` and the stack's thread count for the inference worker.
2. **decode at 1, 2, 4 concurrent streams** (``--streams``): the same ``--max-tokens`` greedy completions
   (``ignore_eos``-like: prompts that make the model write at length), aggregate tokens/s and per-stream
   tokens/s, with continuous batching (the default mode) and with ``threads`` mode run one at a time
   (``max_concurrency=1``: what serving without batching gives). TPOT = decode time / (tokens - 1).
3. **prefill per 1,000 prompt tokens**: TTFT of ``max_tokens=1`` generations at several prompt lengths;
   the slope of a least-squares line (ms per 1,000 tokens) and its intercept.

Targets (issue 11): aggregate decode at 4 streams >= 2x one stream. Writes
``bench/results/cpu_serving.{json,md}``. Needs no stack: no broker, no network.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import report

from core.catalogue import resolve
from core.config import Settings
from inference_workers.engines import GenerationRequest
from inference_workers.engines.transformers_engine import TransformersEngine

TOPICS = ["dictionaries", "decorators", "generators", "context managers", "classes", "exceptions", "modules", "closures"]
FILLER = (
    "Python's standard library is very extensive, offering a wide range of facilities. The library contains "
    "built-in modules that provide access to system functionality such as file I/O, as well as modules "
    "written in Python that provide standardized solutions for many problems in everyday programming. "
)


def long_prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a detailed tutorial about Python {TOPICS[i % len(TOPICS)]}, with many examples."}]


def sized_prompt(tokens: int) -> list[dict[str, str]]:
    words = max(1, int(tokens / 1.25 / 40))  # ~40 words per FILLER, ~1.25 tokens per word
    return [{"role": "system", "content": FILLER * words}, {"role": "user", "content": "Summarise the text above in one sentence."}]


async def one(engine: TransformersEngine, rid: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = None
    last = None
    tokens = prompt = 0
    async for delta in engine.generate(GenerationRequest(rid, messages, max_tokens=max_tokens, temperature=0)):
        now = time.perf_counter()
        if first is None and (delta.text or delta.finish_reason):
            first = now
        last = now
        tokens, prompt = delta.completion_tokens, delta.prompt_tokens
    assert first is not None and last is not None
    decode_s = last - first
    return {
        "ttft_s": first - t0,
        "decode_s": decode_s,
        "tokens": tokens,
        "prompt_tokens": prompt,
        "tpot_ms": 1000 * decode_s / max(1, tokens - 1),
        "total_s": last - t0,
    }


async def streams_run(engine: TransformersEngine, n: int, max_tokens: int, sequential: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    if sequential:
        rows = [await one(engine, f"s{i}", long_prompt(i), max_tokens) for i in range(n)]
    else:
        rows = await asyncio.gather(*(one(engine, f"c{n}-{i}", long_prompt(i), max_tokens) for i in range(n)))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in rows)
    return {
        "streams": n,
        "aggregate_tok_s": round(tokens / wall, 2),
        "per_stream_tok_s": round(statistics.mean(r["tokens"] / r["decode_s"] for r in rows if r["decode_s"] > 0), 2),
        "tpot_ms_p50": round(statistics.median(r["tpot_ms"] for r in rows), 1),
        "ttft_s_p50": round(statistics.median(r["ttft_s"] for r in rows), 3),
        "tokens": tokens,
        "wall_s": round(wall, 2),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="packaged short name, HF id or path (default: the default model)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}")
    ap.add_argument("--prefill-lengths", default="250,500,1000,1500")
    ap.add_argument("--out", default="cpu_serving")
    args = ap.parse_args()
    import torch

    settings = Settings()
    target = resolve(args.model, settings.build_dir)
    results: dict[str, Any] = {"model": target.served_name, "path": target.path, "cpus": os.cpu_count()}

    # 1. dtype x threads, one stream. A fresh engine per cell: a thread's OpenMP team is sized when it first
    # computes, so the engine's own threads must start after torch.set_num_threads (as in the worker process).
    grid = []
    for dtype in args.dtypes.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            engine = TransformersEngine(target.path, device="cpu", dtype=dtype, max_concurrency=1, max_model_len=4096)
            await engine.start()
            try:
                await one(engine, "warm", sized_prompt(100), 4)
                pre = await one(engine, "pre", sized_prompt(750), 1)
                dec = await one(engine, "dec", long_prompt(0), args.max_tokens)
            finally:
                await engine.stop()
            grid.append(
                {
                    "dtype": dtype,
                    "threads": threads,
                    "prefill_750_s": round(pre["ttft_s"], 3),
                    "prompt_tokens": pre["prompt_tokens"],
                    "decode_tok_s": round(dec["tokens"] / dec["decode_s"], 2),
                }
            )
            print(grid[-1], flush=True)
    results["dtype_threads"] = grid
    best = max(grid, key=lambda g: g["decode_tok_s"] / 2 + 750 / g["prefill_750_s"] / 100)
    torch.set_num_threads(best["threads"])
    results["chosen"] = {"dtype": best["dtype"], "threads": best["threads"]}

    # 2. decode scaling: continuous batching vs one at a time
    counts = [int(n) for n in args.streams.split(",")]
    scaling: dict[str, list[dict[str, Any]]] = {}
    for mode, conc in (("continuous_batching", max(counts)), ("threads", 1)):
        engine = TransformersEngine(target.path, device="cpu", dtype=best["dtype"], mode=mode, max_concurrency=conc, max_model_len=2048)
        await engine.start()
        try:
            await one(engine, "warm", long_prompt(0), 8)
            scaling[mode] = []
            for n in counts:
                row = await streams_run(engine, n, args.max_tokens, sequential=(mode == "threads"))
                scaling[mode].append(row)
                print(mode, row, flush=True)
        finally:
            await engine.stop()
    results["decode_scaling"] = scaling
    cb = {r["streams"]: r["aggregate_tok_s"] for r in scaling["continuous_batching"]}
    results["cb_aggregate_ratio_max_vs_1"] = round(cb[max(counts)] / cb[min(counts)], 2)

    # 3. prefill cost per 1,000 tokens
    engine = TransformersEngine(target.path, device="cpu", dtype=best["dtype"], mode="threads", max_concurrency=1, max_model_len=4096)
    await engine.start()
    try:
        await one(engine, "warm", sized_prompt(100), 1)
        points = []
        for n in (int(x) for x in args.prefill_lengths.split(",")):
            runs = [await one(engine, f"p{n}", sized_prompt(n), 1) for _ in range(3)]
            points.append((runs[0]["prompt_tokens"], statistics.median(r["ttft_s"] for r in runs)))
            print("prefill", points[-1], flush=True)
    finally:
        await engine.stop()
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    slope, intercept = statistics.linear_regression(xs, ys)
    results["prefill"] = {
        "points": [{"prompt_tokens": x, "ttft_s": round(y, 3)} for x, y in points],
        "ms_per_1000_tokens": round(slope * 1e6, 1),
        "intercept_ms": round(intercept * 1000, 1),
    }

    lines = [
        f"# CPU serving: {target.served_name} ({os.cpu_count()} cores)",
        "",
        "## dtype x threads (one stream)",
        "",
        "| dtype | threads | prefill ~750 tok (s) | decode tok/s |",
        "|---|---|---|---|",
        *[f"| {g['dtype']} | {g['threads']} | {g['prefill_750_s']} | {g['decode_tok_s']} |" for g in grid],
        "",
        f"chosen: {best['dtype']}, {best['threads']} threads",
        "",
        f"## decode, {args.max_tokens}-token greedy completions",
        "",
        "| mode | streams | aggregate tok/s | per-stream tok/s | TPOT p50 (ms) | TTFT p50 (s) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {m} | {r['streams']} | {r['aggregate_tok_s']} | {r['per_stream_tok_s']} | {r['tpot_ms_p50']} | {r['ttft_s_p50']} |"
            for m, rows in scaling.items()
            for r in rows
        ],
        "",
        f"continuous batching, aggregate at {max(counts)} streams / 1 stream: {results['cb_aggregate_ratio_max_vs_1']}x (target >= 2x)",
        "",
        "## prefill",
        "",
        f"{results['prefill']['ms_per_1000_tokens']} ms per 1,000 prompt tokens (intercept {results['prefill']['intercept_ms']} ms); points: "
        + ", ".join(f"{p['prompt_tokens']} tok {p['ttft_s']} s" for p in results["prefill"]["points"]),
    ]
    report.write(args.out, results, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
