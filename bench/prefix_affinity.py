"""Prefix-cache affinity: the prefill time of a conversation's later turns when its turns reach the same
inference worker (``chat.grounded`` keyed by conversation id, the default) against a run with affinity
broken (each turn keyed by its own correlation id, ``CHATBUS_CONVERSATION_AFFINITY=false``).

A stack of its own with two inference workers in one consumer group, both on a real packaged model
(``--model``, SmolLM2-135M-Instruct by default: the transformers engine in continuous-batching mode, whose
paged cache shares full blocks of a prompt prefix it has seen — ``allow_block_sharing``, on by default in
transformers 5). ``--conversations`` conversations of ``--turns`` turns each about a ~1,000-token document pasted
into the first message (the help text of a standard-library module), one turn at a time, each turn carrying the whole history
(the previous answers included). The stack's knowledge base is empty, so no sources are added and the
placement of sources does not matter here; the document is what a prefix cache can reuse. Prefill is the turn's ``prefill`` stage
(generation slot granted → first token, from the response's ``timing``), so it includes the engine's
prefill of the uncached part of the prompt, and nothing else is running.

Two configurations: affinity (the default) and affinity broken. With two workers and random keys a
later turn still reaches the worker that holds its conversation about half the time.

    .venv/bin/python bench/prefix_affinity.py [--model smollm2-135m] [--conversations 6] [--turns 5]

Writes ``bench/results/prefix_affinity.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
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
QUESTIONS = [  # the turns of one conversation about a document pasted into its first message
    "Here is a document:\n\n{}\n\nWhat is it about, in one sentence?",
    "Which part of it matters most to an operator?",
    "What would you ask its authors?",
    "Summarise it in three bullet points.",
    "What is missing from it?",
]
DOC_CHARS = 4000  # ~1,000 tokens: the prefix a later turn can reuse


def documents(n: int) -> list[str]:
    """``n`` different documents of ``DOC_CHARS`` characters: the plain-text help of standard-library modules
    (benign technical text the input screen lets through)."""
    import pydoc

    # csv, textwrap and string are left out: the input screen blocks their help text as a prompt injection
    # (an over-refusal, noted in README Limitations)
    names = ["json", "shutil", "heapq", "bisect", "calendar", "fractions", "statistics", "difflib", "pprint"]
    return [pydoc.render_doc(name, renderer=pydoc.plaintext)[:DOC_CHARS] for name in names[:n]]


def conversation(http: httpx.Client, url: str, model: str, document: str, turns: int, max_tokens: int) -> list[dict[str, Any]]:
    """One conversation's turns; per turn its number, prompt tokens and prefill seconds."""
    messages: list[dict[str, str]] = []
    out = []
    for n in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[n % len(QUESTIONS)].format(document)})
        r = http.post(f"{url}/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        body = r.json()
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"] or "ok"})
        usage = body["usage"]
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        out.append({"turn": n + 1, "prompt_tokens": usage["prompt_tokens"], "cached_tokens": cached, "prefill_s": body["timing"]["stages"]["prefill"] / 1000})
    return out


def measure(settings: Settings, args: argparse.Namespace, name: str, affinity: bool, placement: str) -> dict[str, Any]:
    run = settings.model_copy(update={"conversation_affinity": affinity, "grounding_placement": placement})
    stack = Stack(run)
    stack.up(("kafka", "ferretdb", "safety", "retrieval", "inference", "recorder", "edge"), wait=False)
    try:
        stack.start_worker("inference-2")
        stack.wait_ready(timeout_s=600)
        turns: list[dict[str, Any]] = []
        with httpx.Client(timeout=300) as http:
            docs = documents(args.conversations + 1)
            conversation(http, stack.edge_url, run.model_name, docs[-1], 2, args.max_tokens)  # warm-up
            for document in docs[: args.conversations]:
                turns += conversation(http, stack.edge_url, run.model_name, document, args.turns, args.max_tokens)
    finally:
        stack.stop("inference-2")
        stack.down()
    first = [t for t in turns if t["turn"] == 1]
    later = [t for t in turns if t["turn"] > 1]
    row = {
        "configuration": name,
        "affinity": affinity,
        "placement": placement,
        "turn1_prefill_ms": round(statistics.mean(t["prefill_s"] for t in first) * 1000, 1),
        "later_prefill_ms": round(statistics.mean(t["prefill_s"] for t in later) * 1000, 1),
        "later_prompt_tokens": round(statistics.mean(t["prompt_tokens"] for t in later)),
        "later_ms_per_1k_prompt_tokens": round(sum(t["prefill_s"] for t in later) * 1e6 / sum(t["prompt_tokens"] for t in later), 1),
        "later_cached_share": round(sum(t["cached_tokens"] for t in later) / sum(t["prompt_tokens"] for t in later), 3),
        "turns": turns,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "turns"}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    settings = Settings(
        state_dir=Path(tempfile.mkdtemp(prefix="chatbus-bench-prefix-")),
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/",
        edge_port=free_port(),
        model=args.model,
        output_rail=False,
        max_inflight_turns=2,
        prefill_budget_tokens=0,  # the whole history each turn: what a prefix cache can reuse grows with it
    )
    started = time.time()
    rows = [
        measure(settings, args, "affinity (conversation keys)", True, "system"),
        measure(settings, args, "affinity broken (random keys)", False, "system"),
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"model": settings.model_name, "workers": 2, "conversations": args.conversations, "turns": args.turns, "max_tokens": args.max_tokens, "rows": rows}
    (OUT / "prefix_affinity.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Prefill of a conversation's turns on two inference workers ({settings.model_name}, transformers continuous batching on CPU, "
        f"{args.conversations} conversations x {args.turns} turns, one turn at a time, greedy, {args.max_tokens} tokens an answer; {time.time() - started:.0f} s in all):",
        "",
        f"| configuration | turn 1 prefill | turns 2-{args.turns} prefill | their prompt tokens | their ms per 1k prompt tokens | their cached prompt tokens |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['configuration']} | {r['turn1_prefill_ms']} ms | {r['later_prefill_ms']} ms | {r['later_prompt_tokens']} | {r['later_ms_per_1k_prompt_tokens']} | {r['later_cached_share']:.0%} |"
        )
    (OUT / "prefix_affinity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
