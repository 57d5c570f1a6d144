"""Export the curated preference dataset from MongoDB to files TRL trains on (``chatbus dpo export``).

Reads the documents the feedback app keeps (:mod:`consumers.feedback_app`): ``dpo_pairs`` or
``kto_examples`` (``_id`` = record id, the :class:`schemas.feedback.DpoPair` /
:class:`schemas.feedback.KtoExample` JSON), optionally only those with ``created_at >= since`` (epoch
seconds: when the newest vote behind a record was cast). Rows, oldest first (``created_at``, then id):

* ``dpo``: ``record_id``, ``prompt``, ``chosen``, ``rejected`` (lists of ``{role, content}``: TRL's
  conversational preference format), ``created_at``, ``metadata`` (:class:`schemas.feedback.DpoMetadata`);
* ``kto``: ``record_id``, ``prompt``, ``completion`` (lists of ``{role, content}``), ``label`` (bool:
  TRL's conversational unpaired preference format), ``created_at``, ``metadata``
  (:class:`schemas.feedback.KtoMetadata`).

Formats: ``jsonl`` (one JSON object per line, orjson) and ``parquet`` (pyarrow, with the explicit schema
below, so a column that is null in every row still has its type). Both load with
``datasets.load_dataset("json" | "parquet", data_files=PATH)``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from pymongo import AsyncMongoClient

from core.config import Settings

Kind = Literal["dpo", "kto"]
Format = Literal["jsonl", "parquet"]
COLLECTIONS: dict[str, str] = {"dpo": "dpo_pairs", "kto": "kto_examples"}

_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_DPO_META = pa.struct(
    [
        ("source", pa.string()),
        ("conversation_id", pa.string()),
        ("prompt_group", pa.string()),
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("feedback_ids", pa.list_(pa.string())),
        ("model", pa.string()),
        ("user", pa.string()),
        ("chosen_reason", pa.string()),
        ("rejected_reason", pa.string()),
    ]
)
_KTO_META = pa.struct(
    [
        ("conversation_id", pa.string()),
        ("prompt_group", pa.string()),
        ("response_id", pa.string()),
        ("feedback_id", pa.string()),
        ("rating", pa.string()),
        ("reason", pa.string()),
        ("comment", pa.string()),
        ("model", pa.string()),
        ("user", pa.string()),
    ]
)
SCHEMAS: dict[str, pa.Schema] = {
    "dpo": pa.schema(
        [
            ("record_id", pa.string()),
            ("prompt", _MESSAGES),
            ("chosen", _MESSAGES),
            ("rejected", _MESSAGES),
            ("created_at", pa.float64()),
            ("metadata", _DPO_META),
        ]
    ),
    "kto": pa.schema(
        [
            ("record_id", pa.string()),
            ("prompt", _MESSAGES),
            ("completion", _MESSAGES),
            ("label", pa.bool_()),
            ("created_at", pa.float64()),
            ("metadata", _KTO_META),
        ]
    ),
}


def parse_since(value: str | None) -> float | None:
    """``--since``: epoch seconds (``1732200000``) or an ISO 8601 date/time (``2026-11-01``,
    ``2026-11-01T12:00:00+01:00``; without a zone: UTC). Raises ``ValueError``."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            raise ValueError(f"not a time: {value!r}")
        return number
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def to_row(doc: dict[str, Any], kind: Kind) -> dict[str, Any]:
    """A stored record document as an export row (the columns of :data:`SCHEMAS`)."""
    row = {name: doc.get(name) for name in SCHEMAS[kind].names}
    row["record_id"] = doc.get("record_id") or doc["_id"]
    meta_fields = SCHEMAS[kind].field("metadata").type
    meta = doc.get("metadata") or {}
    row["metadata"] = {meta_fields.field(i).name: meta.get(meta_fields.field(i).name) for i in range(meta_fields.num_fields)}
    return row


async def fetch_rows(settings: Settings, kind: Kind, since: float | None = None) -> list[dict[str, Any]]:
    """Every persisted record of ``kind`` (with ``created_at >= since``), as rows, oldest first."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri, serverSelectionTimeoutMS=5_000)
    try:
        query: dict[str, Any] = {} if since is None else {"created_at": {"$gte": since}}
        docs = [d async for d in client[settings.mongo_db][COLLECTIONS[kind]].find(query)]
    finally:
        await client.close()
    rows = [to_row(d, kind) for d in docs]
    rows.sort(key=lambda r: (float(r.get("created_at") or 0.0), r["record_id"]))
    return rows


def write_rows(rows: list[dict[str, Any]], kind: Kind, fmt: Format, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with path.open("wb") as f:
            for row in rows:
                f.write(orjson.dumps(row) + b"\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[kind]), path)
    return path


def default_output(kind: Kind, fmt: Format) -> Path:
    return Path(f"{kind}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.{fmt}")


async def export(settings: Settings, kind: Kind, fmt: Format, output: Path | None = None, since: float | None = None) -> tuple[Path, int]:
    """Write the ``kind`` records to ``output`` (default: ``<kind>-<UTC time>.<fmt>`` here); returns (path, rows)."""
    rows = await fetch_rows(settings, kind, since)
    return write_rows(rows, kind, fmt, output or default_output(kind, fmt)), len(rows)
