"""The semantic cache's threshold and guard on labelled question pairs: the share of paraphrases served
from the cache (hit rate) and of near-misses served a wrong answer (false-hit rate), by cosine threshold,
with and without the guard (:func:`core.semantic_guard.conflict`).

Two labelled sets of (question, question, same answer?) pairs written for this: ``semantic_pairs.jsonl``
(30 paraphrase pairs, 30 near-misses: negations, opposites, other entities or numbers), on which the
threshold was chosen and the guard written, and ``semantic_pairs_eval.jsonl`` (21 / 19), written after,
on which neither was tuned. Embeddings: the packaged all-MiniLM-L6-v2 (what the cache searches with).

    .venv/bin/python bench/semantic_cache.py

Writes ``bench/results/semantic_cache.json`` and ``.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.config import Settings  # noqa: E402
from core.embeddings import get_embedder  # noqa: E402
from core.semantic_guard import conflict  # noqa: E402

DATA = ROOT / "bench" / "data"
OUT = ROOT / "bench" / "results"
THRESHOLDS = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def evaluate(path: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    embed = get_embedder()
    a, b = embed.encode([r["a"] for r in rows]), embed.encode([r["b"] for r in rows])
    sims = (a * b).sum(axis=1)
    same = [r["same"] for r in rows]
    blocked = [conflict(r["a"], r["b"]) for r in rows]
    out: dict[str, Any] = {"pairs": len(rows), "paraphrases": sum(same), "near_misses": len(rows) - sum(same), "by_threshold": {}}
    for t in THRESHOLDS:
        row = {}
        for guard in (False, True):
            served = [s >= t and not (guard and c) for s, c in zip(sims, blocked, strict=True)]
            hits = sum(1 for x, y in zip(served, same, strict=True) if x and y)
            false = sum(1 for x, y in zip(served, same, strict=True) if x and not y)
            row["guard" if guard else "no_guard"] = {"hit_rate": round(hits / sum(same), 3), "false_hit_rate": round(false / (len(rows) - sum(same)), 3)}
        out["by_threshold"][str(t)] = row
    out["false_hits_at_default"] = [
        f"{r['a']} | {r['b']}" for r, s, c in zip(rows, sims, blocked, strict=True) if not r["same"] and s >= Settings().semantic_cache_threshold and not c
    ]
    return out


def main() -> None:
    threshold = Settings().semantic_cache_threshold
    report = {"default_threshold": threshold, "tuning": evaluate(DATA / "semantic_pairs.jsonl"), "held_out": evaluate(DATA / "semantic_pairs_eval.jsonl")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "semantic_cache.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Semantic cache on labelled question pairs (MiniLM cosine; the default threshold is {threshold}):", ""]
    lines += ["| set | threshold | hit rate, no guard | false-hit rate, no guard | hit rate, guard | false-hit rate, guard |", "|---|---|---|---|---|---|"]
    for name in ("tuning", "held_out"):
        r = report[name]
        for t, row in r["by_threshold"].items():
            label = f"{name} ({r['paraphrases']} paraphrases, {r['near_misses']} near-misses)" if t == str(THRESHOLDS[0]) else ""
            ng, g = row["no_guard"], row["guard"]
            lines.append(f"| {label} | {t} | {ng['hit_rate']} | {ng['false_hit_rate']} | {g['hit_rate']} | {g['false_hit_rate']} |")
    for name in ("tuning", "held_out"):
        if report[name]["false_hits_at_default"]:
            lines += ["", f"False hits at the default threshold with the guard ({name}): " + "; ".join(f"`{p}`" for p in report[name]["false_hits_at_default"])]
    (OUT / "semantic_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
