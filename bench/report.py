"""Shared output for the benchmarks: every bench writes ``bench/results/<name>.json``, ``.md`` and ``.png``.

``pct`` is the nearest-rank percentile used by every bench (values in, same unit out; p in 0..100).
``summarise`` gives ``{p50, p90, p99, mean, n}`` for a list; ``table`` renders rows as a Markdown
table; ``write`` stores the JSON (orjson, indented), the Markdown and a matplotlib figure (Agg
backend, no display needed).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import orjson
from matplotlib.figure import Figure

OUT = Path(__file__).resolve().parent / "results"


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (``p`` in 0..100); NaN for an empty list."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def summarise(values: Sequence[float], digits: int = 2) -> dict[str, float]:
    """``{p50, p90, p99, mean, n}`` of ``values`` (same unit as the input)."""
    if not values:
        return {"n": 0}
    return {
        "p50": round(pct(values, 50), digits),
        "p90": round(pct(values, 90), digits),
        "p99": round(pct(values, 99), digits),
        "mean": round(statistics.fmean(values), digits),
        "n": len(values),
    }


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def machine() -> dict[str, Any]:
    """Where the numbers were taken (they depend on it)."""
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.0) -> tuple[Figure, Any]:
    """A figure with ``ncols`` axes side by side."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0] if ncols > 1 else axes[0][0]


def write(name: str, result: dict[str, Any], markdown: str, fig: Figure | None = None) -> Path:
    """Store ``<name>.json`` (with ``machine``), ``<name>.md`` and ``<name>.png``; returns the JSON path."""
    OUT.mkdir(exist_ok=True)
    result = {"bench": name, "machine": machine(), **result}
    path = OUT / f"{name}.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    (OUT / f"{name}.md").write_text(markdown)
    if fig is not None:
        fig.tight_layout()
        fig.savefig(OUT / f"{name}.png", dpi=110)
        plt.close(fig)
    print(markdown)
    return path
