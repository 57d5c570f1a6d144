"""The edge as ``chatbus edge`` runs it, with tracemalloc on: for attributing the edge's memory in a bench.

``python bench/edge_tracemalloc.py`` (settings from ``CHATBUS_*`` as usual); each ``SIGUSR1`` writes a
snapshot to ``$BENCH_TRACEMALLOC_DIR/snapshot-<n>.bin`` (``tracemalloc.Snapshot.load`` reads it back).
tracemalloc costs memory and CPU of its own: numbers from this process are for attribution only.
"""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import uvicorn

    from core.config import get_settings
    from core.logging import setup_logging
    from edge.app import create_app

    out = Path(os.environ.get("BENCH_TRACEMALLOC_DIR", "."))
    count = [0]

    def dump(signum: int, frame: object) -> None:
        out.mkdir(parents=True, exist_ok=True)
        tracemalloc.take_snapshot().dump(str(out / f"snapshot-{count[0]}.bin"))
        count[0] += 1

    tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "12")))
    signal.signal(signal.SIGUSR1, dump)
    settings = get_settings()
    setup_logging(settings.log_level)
    uvicorn.run(create_app(settings), host=settings.edge_host, port=settings.edge_port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
