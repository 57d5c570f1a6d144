"""``chatbus worker KIND`` and ``chatbus edge``: the processes the local stack and compose.yaml start."""

from __future__ import annotations

import os
from pathlib import Path

import click

from core.config import get_settings
from core.logging import setup_logging


@click.command()
@click.argument("kind", type=click.Choice(["safety", "retrieval", "inference", "recorder", "batches", "feedback"]))
def worker(kind: str) -> None:
    """Run one pipeline worker until SIGTERM/SIGINT."""
    settings = get_settings()
    setup_logging(settings.log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if settings.torch_threads > 0 and kind in ("safety", "retrieval", "inference"):
        import torch

        torch.set_num_threads(settings.torch_threads)
    from consumers.runtime import run_forever
    from core import metrics

    metrics.serve(settings.metrics_port, settings.metrics_host, f"{kind} worker")
    if kind == "safety":
        from safety_workers.worker import build_worker

        run_forever(lambda stop: build_worker(settings).run(stop))
    elif kind == "retrieval":
        from retrieval_workers.worker import run

        run_forever(lambda stop: run(settings, stop))
    elif kind == "inference":
        from core.catalogue import resolve
        from inference_workers.worker import run as run_inference

        target = resolve(settings.model, settings.build_dir)
        if settings.engine == "transformers" and target.tiny and not (Path(target.path) / "config.json").exists():
            from chatbus.tiny_model import build_tiny_model

            build_tiny_model(Path(target.path))  # a few seconds; the packaged models are provisioned by `make setup`

        run_forever(lambda stop: run_inference(settings, stop))
    elif kind == "batches":
        from batches.collector import run as run_batches

        run_forever(lambda stop: run_batches(settings, stop))
    elif kind == "feedback":  # a faust app: faust's worker owns the loop and the signal handling
        from consumers.feedback_app import run as run_feedback

        run_feedback(settings)
    else:
        from consumers.recorder import run as run_recorder

        run_forever(lambda stop: run_recorder(settings, stop))


@click.command()
def edge() -> None:
    """Run the SSE edge (OpenAI-compatible HTTP) with uvicorn."""
    import uvicorn

    from edge.app import create_app

    settings = get_settings()
    setup_logging(settings.log_level)
    uvicorn.run(create_app(settings), host=settings.edge_host, port=settings.edge_port, log_level="warning", timeout_graceful_shutdown=5)
