"""``chatbus keys create|list|revoke|usage``: the API keys kept in the database (:mod:`edge.keys`; the edges
read them with ``CHATBUS_KEY_STORE=true``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from pymongo import AsyncMongoClient

from core.config import Settings, get_settings
from core.usage import DAY_S, day_start, read_usage
from edge.keys import KeyLimits, KeyStore

T = TypeVar("T")


def _with_store(settings: Settings, work: Callable[[KeyStore], Awaitable[T]]) -> T:
    async def run() -> T:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri, serverSelectionTimeoutMS=5000)
        try:
            return await work(KeyStore(client[settings.mongo_db]))
        finally:
            await client.close()

    return asyncio.run(run())


@click.group()
def keys() -> None:
    """API keys with a tenant and limits (stored hashed; an edge reads them with CHATBUS_KEY_STORE=true)."""


@keys.command("create")
@click.option("--tenant", required=True, help="Whose key it is (usage is reported per key and tenant).")
@click.option("--name", default="", help="A label, e.g. what uses the key.")
@click.option("--rpm", type=click.IntRange(1), default=None, help="Requests per minute (default: no limit).")
@click.option("--tpm", type=click.IntRange(1), default=None, help="Tokens (prompt + completion) per minute (default: no limit).")
@click.option("--budget-tokens", type=click.IntRange(1), default=None, help="Tokens per budget period (default: no budget).")
@click.option("--budget-period", type=click.Choice(["day", "month"]), default="month", show_default=True, help="The budget's UTC period.")
@click.option("--max-parallel", type=click.IntRange(1), default=None, help="Chat requests answering at once (default: no cap).")
@click.option("--models", default="", help="Comma-separated model names the key may use (default: all).")
@click.option("--json", "as_json", is_flag=True)
def keys_create(
    tenant: str,
    name: str,
    rpm: int | None,
    tpm: int | None,
    budget_tokens: int | None,
    budget_period: str,
    max_parallel: int | None,
    models: str,
    as_json: bool,
) -> None:
    """Create a key and print it: it is shown only this once (the database keeps its hash)."""
    models_list = [m.strip() for m in models.split(",") if m.strip()]
    limits = KeyLimits.model_validate(
        {"rpm": rpm, "tpm": tpm, "budget_tokens": budget_tokens, "budget_period": budget_period, "max_parallel": max_parallel, "models": models_list}
    )
    key, record = _with_store(get_settings(), lambda store: store.create(tenant, name, limits))
    if as_json:
        click.echo(json.dumps({"key": key, **record.model_dump()}))
    else:
        click.echo(f"{key}\n(id {record.id}, tenant {tenant}; store the key now, it is not shown again)")


@keys.command("list")
@click.option("--tenant", default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
def keys_list(tenant: str | None, as_json: bool) -> None:
    """Keys (never the keys themselves): id, tenant, name, limits, whether revoked."""
    for r in _with_store(get_settings(), lambda store: store.list(tenant)):
        if as_json:
            click.echo(json.dumps(r.model_dump()))
            continue
        state = "revoked" if not r.active else "active"
        rpm, tpm = r.limits.rpm or "-", r.limits.tpm or "-"
        budget = f"{r.limits.budget_tokens}/{r.limits.budget_period}" if r.limits.budget_tokens else "-"
        click.echo(
            f"{r.id}  …{r.hint}  {r.tenant:12s} {r.name:16s} rpm {rpm!s:6s} tpm {tpm!s:8s} budget {budget:14s} "
            f"parallel {r.limits.max_parallel or '-'!s:4s} models {','.join(r.limits.models) or 'all'}  {state}"
        )


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (``key-…``): every edge refuses it from its next request."""
    if not _with_store(get_settings(), lambda store: store.revoke(key_id)):
        raise click.ClickException(f"{key_id}: no such active key (see `chatbus keys list`)")
    click.echo(f"{key_id} revoked")


@keys.command("usage")
@click.argument("key_id")
@click.option("--days", type=click.IntRange(1, 31), default=7, show_default=True)
def keys_usage(key_id: str, days: int) -> None:
    """A key's tokens, requests and cost per UTC day and model (from the recorded turns)."""
    settings = get_settings()
    now = time.time()
    start = day_start(now) - (days - 1) * DAY_S

    for bucket in _with_store(settings, lambda store: read_usage(store.db.turns, start, int(now) + 1, ("model",), key_id)):
        day = time.strftime("%Y-%m-%d", time.gmtime(bucket["start_time"]))
        for r in bucket["results"]:
            click.echo(
                f"{day}  {r['model']:32s} requests {r['num_model_requests']:6d}  in {r['input_tokens']:9d}  out {r['output_tokens']:9d}  ${r['cost_usd']:.6f}"
            )
