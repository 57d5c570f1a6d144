"""``model: "auto"`` routing on a held-out labelled set: agreement of the heuristic, the embedding
classifier and both together; the share sent to the small model; what the classifier costs per request;
and, with ``--answers``, how often each model's answer passes a simple check.

The labelled set (``bench/data/routing_eval.jsonl``, 80 prompts, 40 ``small`` / 40 ``primary``) was written
apart from the classifier's training set (``core/routing_labels.jsonl``), in other words and on other
topics. A request labelled ``primary`` needs code, maths or reasoning; ``small`` is chit-chat, a simple fact,
a short rewrite. Agreement = the router's choice equals the label.

``--answers`` judges the answers against references: ``bench/data/routing_references.jsonl`` (50 prompts
written for this, 25 ``small`` simple facts and 25 ``primary`` — 15 Python functions, 10 arithmetic or
algebra questions — none from the router's training or evaluation sets), each with a check: a regular
expression the answer must match (the fact, the number), or ``assert`` tests the answer's code must pass
(its code blocks run with the tests in a fresh ``python -I`` with a 10 s timeout: model-written code runs
on this machine, as HumanEval-style benchmarks do). Both packaged models answer every prompt (in-process,
transformers on CPU, bf16, greedy; 64 new tokens for a fact, 160 for arithmetic, 256 for code); the router
(heuristic + classifier, the edge's rule) picks a model per prompt, and the routed answers' pass rate and
generation time are compared with sending everything to either model.

    .venv/bin/python bench/routing.py [--answers]

Writes ``bench/results/routing.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.embeddings import get_embedder  # noqa: E402
from core.routing import classify, load_classifier, read_labels  # noqa: E402
from schemas.events import ChatMessage  # noqa: E402

EVAL = ROOT / "bench" / "data" / "routing_eval.jsonl"
REFERENCES = ROOT / "bench" / "data" / "routing_references.jsonl"
OUT = ROOT / "bench" / "results"


def scores(pred: list[bool], gold: list[bool]) -> dict[str, float]:
    n = len(gold)
    primary = sum(gold)
    return {
        "agreement": round(sum(p == g for p, g in zip(pred, gold, strict=True)) / n, 3),
        "primary_recall": round(sum(p and g for p, g in zip(pred, gold, strict=True)) / primary, 3),
        "small_sent_to_primary": round(sum(p and not g for p, g in zip(pred, gold, strict=True)) / (n - primary), 3),
        "share_to_small": round(sum(not p for p in pred) / n, 3),
    }


def code_of(answer: str) -> str:
    """The Python in an answer: its fenced code blocks, else the answer itself from its first ``def``."""
    blocks = re.findall(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", answer + "\n```", re.DOTALL | re.IGNORECASE)
    if blocks:
        return "\n\n".join(blocks)
    start = answer.find("def ")
    return answer[start:] if start >= 0 else ""


def judged(answer: str, check: dict[str, Any]) -> bool:
    """Whether ``answer`` passes its reference ``check`` (``regex``: any pattern matches; ``python``: the
    answer's code with the tests appended exits 0 within 10 s)."""
    if "regex" in check:
        return any(re.search(p, answer, re.IGNORECASE) for p in check["regex"])
    code = code_of(answer)
    if not code.strip():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", code + "\n\n" + check["python"]], cwd=tmp, capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def budget(row: dict[str, Any]) -> int:
    if "python" in row["check"]:
        return 256
    return 64 if row["label"] == "small" else 160


def answers(routed_primary: list[bool]) -> dict[str, Any]:
    """Both packaged models' answers to the reference prompts, judged (:func:`judged`); per model and label
    the pass rate and generation time, and the same for the router's choice per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.catalogue import resolve
    from core.config import Settings

    rows = [json.loads(line) for line in REFERENCES.read_text().splitlines() if line.strip()]
    settings = Settings()
    per_model: dict[str, dict[str, list[Any]]] = {}
    names = []
    for short in ("qwen2.5-coder-0.5b", "smollm2-135m"):
        target = resolve(short, settings.build_dir)
        names.append(target.served_name)
        tok = AutoTokenizer.from_pretrained(target.path)
        model = AutoModelForCausalLM.from_pretrained(target.path, dtype="bfloat16")
        got: dict[str, list[Any]] = {"passed": [], "seconds": [], "tokens": [], "answers": []}
        for row in rows:
            ids = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
            started = time.perf_counter()
            gen = model.generate(**ids, max_new_tokens=budget(row), do_sample=False)
            got["seconds"].append(time.perf_counter() - started)
            new = gen[0][ids["input_ids"].shape[1] :]
            text = tok.decode(new, skip_special_tokens=True)
            got["tokens"].append(len(new))
            got["answers"].append(text)
            got["passed"].append(judged(text, row["check"]))
        per_model[target.served_name] = got
        print(target.served_name, sum(got["passed"]), "of", len(rows), flush=True)
    primary_name, small_name = names
    choice = [primary_name if p else small_name for p in routed_primary[len(routed_primary) - len(rows) :]]

    def summary(pick: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for label in ("small", "primary"):
            idx = [k for k, r in enumerate(rows) if r["label"] == label]
            out[f"pass_{label}"] = round(sum(per_model[pick[k]]["passed"][k] for k in idx) / len(idx), 3)
        out["pass_all"] = round(sum(per_model[pick[k]]["passed"][k] for k in range(len(rows))) / len(rows), 3)
        out["seconds"] = round(sum(per_model[pick[k]]["seconds"][k] for k in range(len(rows))), 1)
        out["share_to_small"] = round(sum(p == small_name for p in pick) / len(rows), 3)
        return out

    policies = {
        f"all {primary_name}": summary([primary_name] * len(rows)),
        f"all {small_name}": summary([small_name] * len(rows)),
        "routed (edge.routing)": summary(choice),
    }
    return {
        "prompts": len(rows),
        "policies": policies,
        "tokens_per_s": {n: round(sum(g["tokens"]) / sum(g["seconds"]), 1) for n, g in per_model.items()},
        "routed_failures": [r["prompt"] for k, r in enumerate(rows) if not per_model[choice[k]]["passed"][k]],
        "answers": {n: g["answers"] for n, g in per_model.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", action="store_true", help="also answer the reference prompts with both packaged models and judge them")
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
        refs = [json.loads(line)["prompt"] for line in REFERENCES.read_text().splitlines() if line.strip()]
        ref_primary = [
            classify([ChatMessage(role="user", content=t)])[0] or classifier.probability(embedder.encode([t])[0]) >= classifier.threshold for t in refs
        ]
        report["answers"] = answers(ref_primary)
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
        a = report["answers"]
        lines += [
            "",
            f"Answers judged against references ({a['prompts']} prompts of `bench/data/routing_references.jsonl`, half simple facts, half code "
            "with tests or arithmetic; both models in-process on CPU, greedy):",
            "",
            "| policy | pass, simple prompts | pass, code and maths | pass, all | share to the small model | generation time |",
            "|---|---|---|---|---|---|",
        ]
        for name, p in a["policies"].items():
            lines.append(f"| {name} | {p['pass_small']} | {p['pass_primary']} | {p['pass_all']} | {p['share_to_small']} | {p['seconds']} s |")
        lines += ["", "Decode tok/s: " + ", ".join(f"{n} {v}" for n, v in a["tokens_per_s"].items())]
    (OUT / "routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
