"""``model: "auto"`` routing on a held-out labelled set: agreement of the heuristic, the embedding
classifier and both together; the share sent to the small model; what the classifier costs per request;
and, with ``--answers``, how often each model's answer passes a simple check.

The labelled set (``bench/data/routing_eval.jsonl``, 80 prompts, 40 ``small`` / 40 ``primary``) was written
apart from the classifier's training set (``core/routing_labels.jsonl``), in other words and on other
topics. A request labelled ``primary`` needs code, maths or reasoning; ``small`` is chit-chat, a simple fact,
a short rewrite. Agreement = the router's choice equals the label.

``--answers`` also generates with both packaged models (in-process, transformers on CPU, greedy,
``--max-tokens``) for each prompt the router sends to the small model and reports, per label, how often the
answer passes the check: non-empty, at least 3 words, not a refusal, and for ``primary`` prompts that
ask for code a code block or a ``def``/``function``/``SELECT`` line. A weak judge, said as such: it
catches a model that cannot attempt the task, not a wrong answer.

    .venv/bin/python bench/routing.py [--answers --max-tokens 96]

Writes ``bench/results/routing.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.embeddings import get_embedder  # noqa: E402
from core.routing import classify, load_classifier, read_labels  # noqa: E402
from schemas.events import ChatMessage  # noqa: E402

EVAL = ROOT / "bench" / "data" / "routing_eval.jsonl"
OUT = ROOT / "bench" / "results"
CODE_ASK = re.compile(r"\b(write|implement|script|function|query|code|snippet|class)\b", re.IGNORECASE)
CODE_ANSWER = re.compile(r"```|^\s*(def |function |class |SELECT |fn |func |public |#include)", re.IGNORECASE | re.MULTILINE)
REFUSAL = re.compile(r"\b(I can't|I cannot|I'm sorry|as an AI)\b", re.IGNORECASE)


def scores(pred: list[bool], gold: list[bool]) -> dict[str, float]:
    n = len(gold)
    primary = sum(gold)
    return {
        "agreement": round(sum(p == g for p, g in zip(pred, gold, strict=True)) / n, 3),
        "primary_recall": round(sum(p and g for p, g in zip(pred, gold, strict=True)) / primary, 3),
        "small_sent_to_primary": round(sum(p and not g for p, g in zip(pred, gold, strict=True)) / (n - primary), 3),
        "share_to_small": round(sum(not p for p in pred) / n, 3),
    }


def passes(prompt: str, answer: str, needs_primary: bool) -> bool:
    """The weak check of the module docstring."""
    if len(answer.split()) < 3 or REFUSAL.search(answer):
        return False
    if needs_primary and CODE_ASK.search(prompt):
        return bool(CODE_ANSWER.search(answer))
    return True


def answers(rows: list[tuple[str, bool]], max_tokens: int) -> dict[str, Any]:
    """Both packaged models' answers to every prompt; pass rates per model and label, and decode tok/s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.catalogue import resolve
    from core.config import Settings

    settings = Settings()
    out: dict[str, Any] = {}
    for short in ("qwen2.5-coder-0.5b", "smollm2-135m"):
        target = resolve(short, settings.build_dir)
        tok = AutoTokenizer.from_pretrained(target.path)
        model = AutoModelForCausalLM.from_pretrained(target.path, dtype="bfloat16")
        passed = {"small": [], "primary": []}
        tokens = 0
        seconds = 0.0
        for prompt, gold in rows:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
            started = time.perf_counter()
            gen = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            seconds += time.perf_counter() - started
            new = gen[0][ids["input_ids"].shape[1] :]
            tokens += len(new)
            passed["primary" if gold else "small"].append(passes(prompt, tok.decode(new, skip_special_tokens=True), gold))
        out[target.served_name] = {
            "pass_small_prompts": round(sum(passed["small"]) / len(passed["small"]), 3),
            "pass_primary_prompts": round(sum(passed["primary"]) / len(passed["primary"]), 3),
            "tokens_per_s": round(tokens / seconds, 1),
        }
        print(target.served_name, out[target.served_name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", action="store_true", help="also generate with both packaged models and check the answers")
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    rows = read_labels(EVAL)
    gold = [y for _, y in rows]
    classifier = load_classifier()
    assert classifier is not None, "core/models/route_classifier.npz is missing: make routing-classifier"
    embedder = get_embedder()
    embedder.encode(["warm-up"])
    latencies, probabilities = [], []
    for text, _ in rows:
        started = time.perf_counter()
        probabilities.append(classifier.probability(embedder.encode([text])[0]))
        latencies.append(time.perf_counter() - started)
    heuristic = [classify([ChatMessage(role="user", content=t)])[0] for t, _ in rows]
    learned = [p >= classifier.threshold for p in probabilities]
    both = [h or c for h, c in zip(heuristic, learned, strict=True)]
    report: dict[str, Any] = {
        "prompts": len(rows),
        "primary_prompts": sum(gold),
        "threshold": classifier.threshold,
        "routers": {"heuristic": scores(heuristic, gold), "classifier": scores(learned, gold), "both (edge.routing)": scores(both, gold)},
        "classifier_ms_p50": round(statistics.median(latencies) * 1000, 2),
        "classifier_ms_p90": round(sorted(latencies)[int(0.9 * len(latencies))] * 1000, 2),
        "misrouted": [t for (t, g), b in zip(rows, both, strict=True) if b != g],
    }
    if args.answers:
        report["answers"] = answers(rows, args.max_tokens)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "routing.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f'`model: "auto"` on {len(rows)} held-out labelled prompts ({sum(gold)} need the primary model), classifier threshold {classifier.threshold}:',
        "",
        "| router | agreement | primary recall | small prompts sent to primary | share to the small model |",
        "|---|---|---|---|---|",
    ]
    for name, s in report["routers"].items():
        lines.append(f"| {name} | {s['agreement']} | {s['primary_recall']} | {s['small_sent_to_primary']} | {s['share_to_small']} |")
    lines += [
        "",
        f"The classifier (embedding + logistic regression) costs {report['classifier_ms_p50']} ms p50, {report['classifier_ms_p90']} ms p90 per request.",
    ]
    if report["misrouted"]:
        lines += ["", "Misrouted by the edge's rule: " + "; ".join(f"`{t}`" for t in report["misrouted"])]
    if args.answers:
        lines += ["", "| model | answers passing the check, small prompts | primary prompts | decode tok/s |", "|---|---|---|---|"]
        for name, a in report["answers"].items():
            lines.append(f"| {name} | {a['pass_small_prompts']} | {a['pass_primary_prompts']} | {a['tokens_per_s']} |")
    (OUT / "routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
