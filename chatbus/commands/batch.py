"""``chatbus batch submit|status|list|wait|results|cancel|rebuild``: batch jobs through :class:`batches.service.BatchService`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from core.config import get_settings
from core.logging import setup_logging

if TYPE_CHECKING:
    from batches.service import BatchService

T = TypeVar("T")


def _batch_call(fn: Callable[[BatchService], Awaitable[T]]) -> T:
    """Run ``fn(service)`` with a connected :class:`batches.service.BatchService`; request errors exit 1 with the HTTP status the edge would give."""
    from batches.service import BatchService
    from edge.errors import http_status
    from schemas.errors import RequestError

    settings = get_settings()

    async def go() -> T:
        async with BatchService.connect(settings) as service:
            return await fn(service)

    try:
        return asyncio.run(go())
    except RequestError as err:  # the same status and message the edge would answer with
        raise click.ClickException(f"{http_status(err)} {err.message}") from None


def _print_batch(batch: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(batch, indent=2))
        return
    c = batch["request_counts"]
    counts = f"total={c['total']} completed={c['completed']} failed={c['failed']} (cancelled {batch.get('cancelled_count', 0)})"
    click.echo(f"{batch['id']}  {batch['status']}  {counts}")
    for e in (batch.get("errors") or {}).get("data", [])[:10]:
        click.echo(f"  error: {e['message']}")
    for f in ("output_file_id", "error_file_id"):
        if batch.get(f):
            click.echo(f"  {f}: {batch[f]}")


@click.group()
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

    async def submit(service: BatchService) -> dict[str, Any]:
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

    async def collect(service: BatchService) -> dict[str, Any]:
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
    setup_logging(settings.log_level)
    n = asyncio.run(rebuild(settings))
    click.echo(f"replayed {n} events")
