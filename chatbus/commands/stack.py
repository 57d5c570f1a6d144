"""``chatbus stack up|down|run|status``: the local stack without Docker (:mod:`chatbus.stack`), and the default corpus."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from core.config import Settings, get_settings
from core.logging import setup_logging


@click.group()
def stack() -> None:
    """Start and stop the local stack (Kafka, FerretDB, workers, edge) without Docker."""


CLUSTER_HELP = "The local cluster: three KRaft nodes (replication 3, min ISR 2), two edges, two replicas of each worker (state in <state>/cluster)."


def _settings(cluster: bool) -> Settings:
    from chatbus.stack import cluster_settings

    settings = get_settings()
    return cluster_settings(settings) if cluster else settings


@stack.command("up")
@click.option("--ingest-default/--no-ingest-default", default=True, help="Ingest the default corpus if the knowledge base is empty.")
@click.option("--cluster", is_flag=True, help=CLUSTER_HELP)
def stack_up(ingest_default: bool, cluster: bool) -> None:
    """Start everything in the background; return once every edge's /readyz is 200."""
    from chatbus.stack import Stack

    settings = _settings(cluster)
    setup_logging(settings.log_level)
    s = Stack(settings)
    s.up()
    if settings.supervise:
        s.start_keeper()
    if ingest_default:
        _ingest_default(settings)
    click.echo(f"chatbus is up: {', '.join(u + '/v1' for u in s.edge_urls)} (model {settings.model_name}); logs in {s.paths.logs}")


@stack.command("down")
@click.option("--cluster", is_flag=True, help="The local cluster's processes (`up --cluster`).")
def stack_down(cluster: bool) -> None:
    """Stop every process this stack started (and nothing else)."""
    from chatbus.stack import Stack

    settings = _settings(cluster)
    setup_logging(settings.log_level)
    stopped = Stack(settings).down()
    click.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@stack.command("run")
@click.option("--cluster", is_flag=True, help=CLUSTER_HELP)
def stack_run(cluster: bool) -> None:
    """Start everything in the foreground; Ctrl-C stops all of it."""
    from chatbus.stack import Stack

    settings = _settings(cluster)
    setup_logging(settings.log_level)
    s = Stack(settings)
    try:
        s.up()
        _ingest_default(settings)
        click.echo(f"chatbus is running: {', '.join(u + '/v1' for u in s.edge_urls)} — Ctrl-C stops everything")
        # Explicit handlers: a process started in the background inherits SIGINT ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
        if settings.supervise:
            from chatbus.keeper import Keeper

            Keeper(s).run()  # restarts a crashed service (this process is every service's parent: exit codes are known)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("stopping…")
        s.down()


@stack.command("keep")
def stack_keep() -> None:
    """Restart crashed services of the stack with back-off (run by `stack up` as the `keeper` service)."""
    from chatbus.keeper import Keeper
    from chatbus.stack import Stack

    settings = get_settings()
    setup_logging(settings.log_level)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        Keeper(Stack(settings)).run()
    except KeyboardInterrupt:
        pass


@stack.command("status")
@click.option("--cluster", is_flag=True, help="The local cluster's processes (`up --cluster`).")
def stack_status(cluster: bool) -> None:
    """Which services run (pid, and each worker's metrics address) and which do not."""
    from chatbus.stack import WORKERS, Stack, kind_of

    stack = Stack(_settings(cluster))
    for name, pid in stack.status().items():
        port = stack.metrics_port(name) if kind_of(name) in WORKERS and pid else None
        metrics = f"  metrics http://{stack.settings.metrics_host}:{port}/metrics" if port else ""
        click.echo(f"{name:12s} {f'running (pid {pid})' if pid else 'stopped'}{metrics}")
    keeper = stack.running("keeper")
    click.echo(f"{'keeper':12s} {f'running (pid {keeper}): restarts crashed services' if keeper else 'off (crashed services stay down)'}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


DOCS_BASE_URL = "https://docs.python.org/3.11/"
# the parts of the Python documentation that answer programmers' questions (no generated indexes, search
# pages, changelogs, C API or "what's new")
DOCS_PARTS = ("library", "reference", "tutorial", "howto", "faq", "using", "glossary.html")


def docs_root(settings: Settings | None = None) -> Path | None:
    """Debian's python3.11-doc HTML: the copy `make setup` unpacks under .build, else the installed package."""
    from core.config import ROOT

    build = (settings.build_dir if settings else ROOT / ".build") / "python-docs" / "usr/share/doc/python3.11/html"
    for root in (build, Path("/usr/share/doc/python3.11/html")):
        if (root / "library").is_dir():
            return root
    return None


def default_corpus(settings: Settings | None = None) -> list[Path]:
    """The default knowledge base: the Python 3.11 documentation (:data:`DOCS_PARTS`), else the README here."""
    from core.config import ROOT

    root = docs_root(settings)
    if root is None:
        return [ROOT / "README.md"]
    return [root / part for part in DOCS_PARTS if (root / part).exists()]


def _ingest_default(settings: Settings) -> None:
    """Ingest the default corpus; documents already indexed and unchanged are skipped (nothing embedded)."""
    from retrieval_workers.ingest import ingest as do_ingest

    paths = default_corpus(settings)
    root = docs_root(settings)
    report = asyncio.run(do_ingest(paths, settings, wait=True, base_url=DOCS_BASE_URL if root else "", url_root=root))
    click.echo(f"default knowledge base ({paths[0].parent}): {report.summary()}")
