"""Response caches on the real stack: TTFT of a hit against a miss, and the semantic cache's hit and
false-hit rates end to end (screening, retrieval, the Milvus search, the guard, the bus).

A stack of its own serving SmolLM2-135M-Instruct (a real model, transformers on CPU), run twice:

* *exact* (``CHATBUS_RESPONSE_CACHE_MODELS=*``): each question of the held-out labelled pairs
  (``bench/data/semantic_pairs_eval.jsonl``, its first questions) is asked, then asked again in a new
  conversation: the second is an exact-cache hit.
* *semantic* (``CHATBUS_SEMANTIC_CACHE_MODELS=*``): each pair's first question is asked (its answer becomes
  a cache entry), then its second question in a new conversation: a paraphrase should be a hit, a
  near-miss (a negation, an opposite, another entity) must not be.

TTFT is the client's: from sending the request to the first content chunk of the SSE stream (greedy,
``max_tokens`` 48). A question the input screen blocks is left out (counted). Some pairs share their
first question: asked again it is already a hit, so the exact run does not count it twice, and the semantic
run asks the pair's second question against the entry there is.

    .venv/bin/python bench/cache_ttft.py [--model smollm2-135m] [--pairs 40]

Writes ``bench/results/cache_ttft.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
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

DATA = ROOT / "bench" / "data" / "semantic_pairs_eval.jsonl"
OUT = ROOT / "bench" / "results"
SETTLE_S = 1.5  # for the cache entry of an answer to be written (exact: the worker's put; semantic: the retrieval worker's upsert)


def ask(http: httpx.Client, url: str, model: str, question: str, max_tokens: int) -> dict[str, Any]:
    """One streamed turn: its client TTFT (s), text, finish chunk's ``cache`` and finish reason."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    ttft, text, cache, finish = None, "", None, None
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    text += piece
                    ttft = ttft if ttft is not None else time.perf_counter() - sent
                if choice.get("finish_reason"):
                    finish, cache = choice["finish_reason"], chunk.get("cache")
    return {"question": question, "ttft_s": ttft, "text": text, "cache": cache, "finish_reason": finish}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


def measure(settings: Settings, mode: str, pairs: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    run = settings.model_copy(update={"response_cache_models": "*" if mode == "exact" else "", "semantic_cache_models": "*" if mode == "semantic" else ""})
    stack = Stack(run)
    stack.up(("kafka", "ferretdb", "safety", "retrieval", "inference", "recorder", "edge"), wait=False)
    misses: list[dict[str, Any]] = []
    seconds: list[dict[str, Any]] = []
    repeats: list[dict[str, Any]] = []
    try:
        stack.wait_ready(timeout_s=600)
        with httpx.Client(timeout=300) as http:
            ask(http, stack.edge_url, run.model_name, "Hello! What can you help me with?", max_tokens)  # warm-up
            for pair in pairs:
                first = ask(http, stack.edge_url, run.model_name, pair["a"], max_tokens)
                if first["finish_reason"] not in ("stop", "length"):
                    misses.append({**first, "skipped": True})  # blocked by the input screen
                    continue
                if first["cache"] is not None:  # the same first question as an earlier pair's: already cached
                    repeats.append(first)
                    if mode == "exact":
                        continue
                else:
                    misses.append(first)
                    time.sleep(SETTLE_S)
                again = ask(http, stack.edge_url, run.model_name, pair["a"] if mode == "exact" else pair["b"], max_tokens)
                seconds.append({**again, "same": True if mode == "exact" else pair["same"], "first_text": first["text"]})
    finally:
        stack.down()
    asked = [m for m in misses if not m.get("skipped")]
    hits = [s for s in seconds if s["cache"] == mode]
    row: dict[str, Any] = {
        "mode": mode,
        "pairs": len(pairs),
        "skipped": len(misses) - len(asked),
        "repeated_first_questions": len(repeats),
        "miss_ttft_p50_ms": pct([m["ttft_s"] for m in asked if m["ttft_s"] is not None], 0.5),
        "miss_ttft_p90_ms": pct([m["ttft_s"] for m in asked if m["ttft_s"] is not None], 0.9),
        "hit_ttft_p50_ms": pct([h["ttft_s"] for h in hits if h["ttft_s"] is not None], 0.5),
        "hit_ttft_p90_ms": pct([h["ttft_s"] for h in hits if h["ttft_s"] is not None], 0.9),
        "hits": len(hits),
        "hit_text_equal": sum(h["text"] == h["first_text"] for h in hits),
    }
    if mode == "exact":
        row["hit_rate"] = round(len(hits) / max(1, len(seconds)), 3)
    else:
        same = [s for s in seconds if s["same"]]
        near = [s for s in seconds if not s["same"]]
        row["paraphrases"], row["near_misses"] = len(same), len(near)
        row["hit_rate"] = round(sum(s["cache"] == mode for s in same) / max(1, len(same)), 3)
        row["false_hit_rate"] = round(sum(s["cache"] == mode for s in near) / max(1, len(near)), 3)
        row["false_hits"] = [s["question"] for s in near if s["cache"] == mode]
    row["turns"] = misses + repeats + seconds
    print(json.dumps({k: v for k, v in row.items() if k != "turns"}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    pairs = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()][: args.pairs]
    settings = Settings(
        state_dir=Path(tempfile.mkdtemp(prefix="chatbus-bench-cache-")),
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/",
        edge_port=free_port(),
        model=args.model,
        output_rail=False,
    )
    started = time.time()
    rows = [measure(settings, "exact", pairs, args.max_tokens), measure(settings, "semantic", pairs, args.max_tokens)]
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"model": settings.model_name, "max_tokens": args.max_tokens, "threshold": settings.semantic_cache_threshold, "rows": rows}
    (OUT / "cache_ttft.json").write_text(json.dumps(report, indent=2) + "\n")
    exact, semantic = rows
    lines = [
        f"Response caches through the whole stack ({settings.model_name}, transformers on CPU, greedy, {args.max_tokens} tokens; "
        f"held-out labelled pairs; {time.time() - started:.0f} s in all):",
        "",
        "| cache | second turns | hits | hit rate | false-hit rate | TTFT of a miss p50 / p90 | TTFT of a hit p50 / p90 | blocked by the input screen |",
        "|---|---|---|---|---|---|---|---|",
        f"| exact (the same question again) | {len([t for t in exact['turns'] if 'same' in t])} | {exact['hits']} | {exact['hit_rate']} | — | "
        f"{exact['miss_ttft_p50_ms']} / {exact['miss_ttft_p90_ms']} ms | {exact['hit_ttft_p50_ms']} / {exact['hit_ttft_p90_ms']} ms | {exact['skipped']} |",
        f"| semantic (paraphrase / near-miss, threshold {settings.semantic_cache_threshold}) | {semantic['paraphrases']} / {semantic['near_misses']} | "
        f"{semantic['hits']} | {semantic['hit_rate']} | {semantic['false_hit_rate']} | {semantic['miss_ttft_p50_ms']} / {semantic['miss_ttft_p90_ms']} ms | "
        f"{semantic['hit_ttft_p50_ms']} / {semantic['hit_ttft_p90_ms']} ms | {semantic['skipped']} |",
    ]
    if semantic["false_hits"]:
        lines += ["", "False hits: " + "; ".join(f"`{q}`" for q in semantic["false_hits"])]
    (OUT / "cache_ttft.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
