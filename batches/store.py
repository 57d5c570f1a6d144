"""Batch state in the MongoDB API: files, batches and one document per batch line.

Collections (any MongoDB API; FerretDB locally):

* ``files`` — ``_id`` = ``file-…``; OpenAI file object fields (``bytes``, ``filename``, ``purpose``,
  ``created_at``) and ``chunks``; the content is in ``file_chunks`` (``_id`` = ``file-…:n``, 1 MiB each).
* ``batches`` — ``_id`` = ``batch_…``; OpenAI batch object fields, ``total`` and ``input_sha256``.
* ``batch_requests`` — ``_id`` = the line's correlation id ``batch_req_<hex>_<line>``; ``batch_id``,
  ``line``, ``custom_id``, ``status`` (``completed`` | ``failed`` | ``cancelled``; written when the line
  has a result — a line without a document is still running), and the ``response`` or ``error`` of
  OpenAI's output format.

Every write is an idempotent upsert derived from one event, in any order: a result that arrives before
its request, or a replay of the topics into an empty database (the rebuild), gives the same documents.
Output and error files are not stored twice: ``file-out-<hex>`` / ``file-err-<hex>`` are rendered from
``batch_requests`` in line order when read. Output format:
https://platform.openai.com/docs/api-reference/batch/request-output
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from core.pii import mask_pii
from core.quotas import KEYS
from core.tools import INVALID_TOOL_CALL
from schemas.events import BatchCreated, BatchLineError, TurnCompleted
from schemas.openai import completion_body

CHUNK_BYTES = 1024 * 1024
TERMINAL = ("completed", "failed", "cancelled", "expired")
FINAL = ("completed", "failed", "cancelled")  # of a line
OPEN = ("validating", "in_progress", "finalizing", "cancelling")


def batch_hex(batch_id: str) -> str:
    return batch_id.removeprefix("batch_")


def request_id(batch_id: str, line: int) -> str:
    """The correlation id of a batch line (also the ``id`` and ``request_id`` of its output line)."""
    return f"batch_req_{batch_hex(batch_id)}_{line}"


def parse_request_id(correlation_id: str) -> tuple[str, int] | None:
    """``(batch_id, line)`` of a batch line's correlation id, or None for any other id."""
    if not correlation_id.startswith("batch_req_"):
        return None
    hex_part, _, line = correlation_id.removeprefix("batch_req_").rpartition("_")
    if not hex_part or not line.isdigit():
        return None
    return f"batch_{hex_part}", int(line)


def rendered_file(file_id: str) -> tuple[str, str] | None:
    """``(batch_id, "output" | "error")`` for a rendered file's id, None for an uploaded file's."""
    for prefix, kind in (("file-out-", "output"), ("file-err-", "error")):
        if file_id.startswith(prefix):
            return f"batch_{file_id.removeprefix(prefix)}", kind
    return None


def output_file_id(batch_id: str) -> str:
    return f"file-out-{batch_hex(batch_id)}"


def error_file_id(batch_id: str) -> str:
    return f"file-err-{batch_hex(batch_id)}"


class BatchStore:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self.db = db
        self.files = db["files"]
        self.chunks = db["file_chunks"]
        self.batches = db["batches"]
        self.requests = db["batch_requests"]

    async def ensure_indexes(self) -> None:
        await self.requests.create_index([("batch_id", ASCENDING), ("status", ASCENDING)])
        await self.requests.create_index([("batch_id", ASCENDING), ("line", ASCENDING)])
        await self.chunks.create_index([("file_id", ASCENDING), ("n", ASCENDING)])

    # --- files --------------------------------------------------------------------------------------------
    async def put_file(self, data: bytes, filename: str, purpose: str, owner: str | None = None) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex}"
        pieces = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
        await self.chunks.insert_many([{"_id": f"{file_id}:{n}", "file_id": file_id, "n": n, "data": p} for n, p in enumerate(pieces)])
        doc = {"_id": file_id, "bytes": len(data), "filename": filename, "purpose": purpose, "created_at": int(time.time()), "chunks": len(pieces)}
        if owner is not None:
            doc["owner"] = owner
        await self.files.insert_one(doc)  # last: a file is visible only once its content is complete
        return file_object(doc)

    async def file_exists(self, file_id: str) -> bool:
        """Whether a stored file, or a finished batch's output/error file, has this id (no rendering)."""
        if await self.files.find_one({"_id": file_id}, {"_id": 1}) is not None:
            return True
        named = rendered_file(file_id)
        if named is None:
            return False
        batch = await self.batches.find_one({"_id": named[0]})
        return batch is not None and batch.get(f"{named[1]}_file_id") == file_id

    async def file_owner(self, file_id: str) -> str | None:
        """The API key identity a file belongs to: its uploader's, or (output/error files) its batch's."""
        doc = await self.files.find_one({"_id": file_id}, {"owner": 1})
        if doc is None:
            named = rendered_file(file_id)
            doc = await self.batches.find_one({"_id": named[0]}, {"owner": 1}) if named is not None else None
        owner = None if doc is None else doc.get("owner")
        return owner if isinstance(owner, str) else None

    async def file(self, file_id: str) -> dict[str, Any] | None:
        """The OpenAI file object of a stored or rendered (output/error) file; None if unknown."""
        doc = await self.files.find_one({"_id": file_id})
        if doc is not None:
            return file_object(doc)
        named = rendered_file(file_id)
        if named is None or not await self.file_exists(file_id):
            return None
        batch_id, kind = named
        batch = await self.get_batch(batch_id)
        assert batch is not None
        size = sum([len(line) async for line in self.rendered(batch_id, kind)])
        at = batch.get("completed_at") or batch.get("cancelled_at") or batch.get("failed_at") or batch["created_at"]
        return file_object({"_id": file_id, "bytes": size, "filename": f"{batch_id}_{kind}.jsonl", "purpose": "batch_output", "created_at": at})

    async def file_content(self, file_id: str) -> AsyncIterator[bytes]:
        """The bytes of a file in pieces (check :meth:`file_exists` first)."""
        named = rendered_file(file_id)
        if named is None:
            async for chunk in self.chunks.find({"file_id": file_id}).sort("n", ASCENDING):
                yield bytes(chunk["data"])
        else:
            async for line in self.rendered(*named):
                yield line

    # --- batches ------------------------------------------------------------------------------------------
    async def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        return await self.batches.find_one({"_id": batch_id})

    async def create_batch(self, event: BatchCreated, status: str, batch_key_sha: str | None = None) -> None:
        """Insert the batch document unless it exists (idempotent; also what the rebuild does)."""
        fields = {
            "object": "batch",
            "endpoint": event.endpoint,
            "input_file_id": event.input_file_id,
            "input_sha256": event.input_sha256,
            "completion_window": event.completion_window,
            "metadata": event.metadata,
            "total": event.total,
            "created_at": int(event.created_at),
            "expires_at": int(event.created_at) + 24 * 3600,
            "status": status,
            "counts": {"completed": 0, "failed": 0, "cancelled": 0},
            "errors": [e.model_dump() for e in event.invalid[:100]],
            "batch_key_sha": batch_key_sha,
        }
        if event.owner is not None:
            fields["owner"] = event.owner
        if status == "in_progress":
            fields["in_progress_at"] = int(event.created_at)
        await self.batches.update_one({"_id": event.batch_id}, {"$setOnInsert": fields}, upsert=True)
        await self.record_invalid(event.batch_id, event.invalid)

    async def set_status(self, batch_id: str, status: str, *, only_from: tuple[str, ...], **fields: Any) -> bool:
        """Move a batch to ``status`` (stamping ``<status>_at``) if it is in one of ``only_from``."""
        update = {"status": status, f"{status}_at": int(time.time()), **fields}
        for _ in range(5):
            result = await self.batches.update_one({"_id": batch_id, "status": {"$in": list(only_from)}}, {"$set": update})
            if result.modified_count != 1:
                return False
            # FerretDB v1 applies an update as a read then a write of the whole document, without isolation:
            # a concurrent ``$inc`` of this batch's counters can write the old status back. Real MongoDB never
            # does; there the read-back only confirms.
            doc = await self.batches.find_one({"_id": batch_id}, {"status": 1})
            if doc is None or doc.get("status") == status or doc.get("status") not in only_from:
                return True
        return False  # undone every time: the caller sees the batch as not moved

    async def record_invalid(self, batch_id: str, invalid: list[BatchLineError]) -> None:
        for e in invalid:
            error = {"code": e.code, "message": e.message, "line": e.line}
            fields = {"batch_id": batch_id, "line": e.line, "custom_id": e.custom_id, "status": "failed", "error": error}
            await self._finish(request_id(batch_id, e.line), fields, overwrite=False)

    async def record_result(self, done: TurnCompleted) -> bool:
        """Store a line's result; True when this made the line ``completed`` (a replay of a completion that
        was already stored is False, so what follows a completion happens once)."""
        ref = done.batch
        assert ref is not None
        cid = done.correlation_id
        fields: dict[str, Any] = {"batch_id": ref.batch_id, "line": ref.line, "custom_id": ref.custom_id, "response": None, "error": None}
        if done.finish_reason in ("stop", "length", "content_filter", "tool_calls"):
            text = mask_pii(done.text)[0]  # what is stored is masked, as everywhere in chatbus
            body = completion_body(cid, done.model, text, done)
            fields.update(status="completed", response={"status_code": 200, "request_id": cid, "body": body})
        elif done.finish_reason == "cancelled":
            fields.update(status="cancelled", error={"code": "batch_cancelled", "message": "the batch was cancelled before this request completed"})
        elif done.error and done.error.startswith(INVALID_TOOL_CALL):
            fields.update(status="failed", error={"code": "invalid_tool_call", "message": done.error})
        else:
            fields.update(status="failed", error={"code": "generation_error", "message": "generation failed for this request"})
        return await self._finish(cid, fields) and fields["status"] == "completed"

    async def record_failure(self, correlation_id: str, custom_id: str | None, code: str, message: str) -> None:
        """A line that will never complete (dead-lettered by a stage): failed, unless it already has a result."""
        parsed = parse_request_id(correlation_id)
        if parsed is None:
            return
        batch_id, line = parsed
        error = {"code": code, "message": message}
        fields = {"batch_id": batch_id, "line": line, "custom_id": custom_id, "status": "failed", "error": error}
        await self._finish(correlation_id, fields, overwrite=False)

    async def _finish(self, cid: str, fields: dict[str, Any], *, overwrite: bool = True) -> bool:
        """Give a line its final result and keep its batch's ``counts`` exact.

        One atomic ``findAndModify`` by ``_id`` (every write here filters on ``_id`` alone: FerretDB
        scans the collection for any other filter) returns the line as it was, so a replayed result
        counts nothing twice, and a result that replaces another final one moves the count. With
        ``overwrite=False`` (a dead letter) a line that already has a result keeps it. A crash between
        the two writes leaves a counter short; :meth:`reconcile` recounts exactly. True when the line's
        status changed.
        """
        if not overwrite:
            current = await self.requests.find_one({"_id": cid}, {"status": 1})
            if current is not None and current.get("status") in FINAL:
                return False
        # (no projection: FerretDB v1's findAndModify does not implement ``fields``)
        before = await self.requests.find_one_and_update({"_id": cid}, {"$set": fields}, upsert=True)
        old = (before or {}).get("status")
        if before is not None and old == "completed" and fields["status"] != "completed":
            # a redelivered line cancelled or failed after it had completed: keep the completion
            await self.requests.replace_one({"_id": cid}, before)
            return False
        if old == fields["status"]:
            return False
        inc = {f"counts.{fields['status']}": 1}
        if old in FINAL:
            inc[f"counts.{old}"] = -1
        await self.batches.update_one({"_id": fields["batch_id"]}, {"$inc": inc})
        return True

    async def budgeted_owner(self, batch_id: str) -> str | None:
        """The batch's owner when it is a stored key (``api_keys``, :mod:`core.quotas`), whose budget its lines
        are charged to; None for a batch sent with a static key, through an open edge, or from the CLI."""
        batch = await self.batches.find_one({"_id": batch_id}, {"owner": 1})
        owner = (batch or {}).get("owner")
        if not isinstance(owner, str) or await self.db[KEYS].find_one({"_id": owner}, {"_id": 1}) is None:
            return None
        return owner

    async def counts(self, batch_id: str, batch: dict[str, Any] | None = None) -> dict[str, int]:
        """Lines with a final result, by status (the counters kept by :meth:`_finish`; never more than exact)."""
        batch = batch if batch is not None else await self.get_batch(batch_id)
        kept = (batch or {}).get("counts") or {}
        return {k: int(kept.get(k, 0)) for k in ("completed", "failed", "cancelled")}

    async def reconcile(self, batch_id: str) -> dict[str, int]:
        """Recount a batch's lines exactly (a scan of its lines) and store the counters."""
        exact = {"completed": 0, "failed": 0, "cancelled": 0}
        async for doc in self.requests.find({"batch_id": batch_id}, {"status": 1}):
            if doc.get("status") in exact:
                exact[doc["status"]] += 1
        await self.batches.update_one({"_id": batch_id}, {"$set": {"counts": exact}})
        return exact

    async def maybe_finalize(self, batch_id: str) -> str | None:
        """Finish a batch whose lines all have a result: ``completed`` (or ``cancelled``). Returns the new status.

        ``finalizing`` is a short step in between; a batch left there by a crash is finished on the next call.
        """
        batch = await self.get_batch(batch_id)
        if batch is None or batch["status"] not in ("in_progress", "cancelling", "finalizing"):
            return None
        if batch["status"] != "finalizing":
            if sum((await self.counts(batch_id, batch)).values()) < batch["total"]:
                return None
            # the counters say done: confirm with an exact recount (a recount racing a result can over-count)
            if sum((await self.reconcile(batch_id)).values()) < batch["total"]:
                return None
            if not await self.set_status(batch_id, "finalizing", only_from=(batch["status"],)):
                return None  # another writer moved it on
        final = "cancelled" if batch.get("cancelling_at") else "completed"
        await self.set_status(batch_id, final, only_from=("finalizing",), **_result_files(batch_id, await self.counts(batch_id)))
        return final

    async def expire(self, batch_id: str) -> None:
        """End a batch past its ``expires_at``: finished lines keep their results, the rest are not run."""
        files = _result_files(batch_id, await self.reconcile(batch_id))
        await self.set_status(batch_id, "expired", only_from=("in_progress", "cancelling", "finalizing"), **files)

    async def rendered(self, batch_id: str, kind: str) -> AsyncIterator[bytes]:
        """The output (``kind="output"``) or error file of a batch, one JSONL line per request, in input order."""
        statuses = ["completed"] if kind == "output" else ["failed", "cancelled"]
        cursor = self.requests.find({"batch_id": batch_id, "status": {"$in": statuses}}).sort("line", ASCENDING)
        async for doc in cursor:
            line = {"id": doc["_id"], "custom_id": doc.get("custom_id"), "response": doc.get("response"), "error": doc.get("error")}
            yield orjson.dumps(line) + b"\n"

    async def openai_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The OpenAI batch object (https://platform.openai.com/docs/api-reference/batch/object)."""
        counts = await self.counts(batch["_id"], batch)
        errors = batch.get("errors") or []
        return {
            "id": batch["_id"],
            "object": "batch",
            "endpoint": batch.get("endpoint", "/v1/chat/completions"),
            "errors": {"object": "list", "data": [_openai_error(e) for e in errors]} if errors else None,
            "input_file_id": batch["input_file_id"],
            "completion_window": batch.get("completion_window", "24h"),
            "status": batch["status"],
            "output_file_id": batch.get("output_file_id"),
            "error_file_id": batch.get("error_file_id"),
            **{
                f"{s}_at": batch.get(f"{s}_at")
                for s in ("created", "in_progress", "expires", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")
            },
            "request_counts": {"total": batch["total"], "completed": counts["completed"], "failed": counts["failed"] + counts["cancelled"]},
            "metadata": batch.get("metadata") or None,
            # chatbus's own: cancelled lines (counted in ``failed`` above, as OpenAI has no such count)
            "cancelled_count": counts["cancelled"],
        }


def _result_files(batch_id: str, counts: dict[str, int]) -> dict[str, str | None]:
    """The output and error file ids a finished batch gets (None where it has no such lines)."""
    return {
        "output_file_id": output_file_id(batch_id) if counts["completed"] else None,
        "error_file_id": error_file_id(batch_id) if counts["failed"] + counts["cancelled"] else None,
    }


def _openai_error(e: dict[str, Any]) -> dict[str, Any]:
    return {"code": e.get("code"), "message": e.get("message"), "param": None, "line": e.get("line")}


def file_object(doc: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI file object (https://platform.openai.com/docs/api-reference/files/object)."""
    return {
        "id": doc["_id"],
        "object": "file",
        "bytes": doc["bytes"],
        "created_at": doc["created_at"],
        "filename": doc["filename"],
        "purpose": doc["purpose"],
        "status": "processed",
        "status_details": None,
    }
