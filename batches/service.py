"""The batch API for programs, the CLI (``chatbus batch …``) and the edge (``/v1/files``, ``/v1/batches``).

Usage from Python::

    async with BatchService.connect(get_settings()) as batches:
        file = await batches.upload(Path("prompts.jsonl").read_bytes(), "prompts.jsonl")
        batch = await batches.create(file["id"], metadata={"team": "eval"}, batch_key="eval-2026-11-21")
        batch = await batches.wait(batch["id"])
        async for line in batches.content(batch["output_file_id"]):
            ...

Submitting publishes (:mod:`producers.batches`) a ``batch.created`` event on ``batch.jobs``, then every valid
line as a chat turn (``source="batch"``) on ``batch.requests`` with ``reply_to`` ``batch.results``; the safety, retrieval and
inference stages take those only when interactive turns leave room. The ``batches`` worker
(:mod:`batches.collector`) records each result; the batch is ``completed`` when every line has one.

Idempotency: with a ``batch_key`` the batch id is derived from the key, so submitting again returns the
existing batch and publishes nothing (an interrupted submission, left in ``validating``, is resumed,
skipping lines that already have a result). The same key with a different file is a 409.

Errors are :mod:`batches.errors` (OpenAI's message, param and code; the edge gives them their HTTP status):
:class:`~batches.errors.NoSuchFile` / :class:`~batches.errors.NoSuchBatch` (404), ``InvalidRequest`` (400,
a bad parameter or a file that cannot be a batch at all), :class:`~batches.errors.BatchKeyConflict` (409,
a reused batch key), :class:`~batches.errors.FileTooLarge` (413).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Collection
from typing import Any

from aiokafka import AIOKafkaProducer
from pymongo import AsyncMongoClient
from tqdm import tqdm

from batches.errors import BatchKeyConflict, FileTooLarge, InvalidRequest, NoSuchBatch, NoSuchFile
from batches.input import CHAT_COMPLETIONS, BatchFileError, parse_batch
from batches.store import TERMINAL, BatchStore, error_file_id, request_id
from core.config import Settings
from producers.batches import BatchProducer
from schemas.events import BatchCreated
from topics.clients import make_producer

MAX_EVENT_ERRORS = 2000  # invalid lines carried in batch.created (all of them are stored)


class BatchService:
    def __init__(self, settings: Settings, store: BatchStore, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.store = store
        self.producer = producer
        self.bus = BatchProducer(settings, producer)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, settings: Settings) -> AsyncIterator[BatchService]:
        """A service with its own database client and producer (closed on exit)."""
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri, serverSelectionTimeoutMS=10_000)
        producer = make_producer(settings)
        await producer.start()
        try:
            store = BatchStore(client[settings.mongo_db])
            await store.ensure_indexes()
            yield cls(settings, store, producer)
        finally:
            await producer.stop()
            await client.close()

    # --- files ---------------------------------------------------------------------------------------------
    # ``owner`` (an API key identity, edge.auth.key_owner) scopes files and batches: another key's are a 404,
    # as if they did not exist; None (no keys configured, or the CLI) sees everything.
    async def upload(self, data: bytes, filename: str, purpose: str = "batch", owner: str | None = None) -> dict[str, Any]:
        if purpose != "batch":
            raise InvalidRequest("purpose: only 'batch' files are accepted", param="purpose")
        if len(data) > self.settings.max_batch_file_bytes:
            raise FileTooLarge(self.settings.max_batch_file_bytes)
        return await self.store.put_file(data, filename, purpose, owner)

    async def file(self, file_id: str, owner: str | None = None) -> dict[str, Any]:
        await self._check_owner(file_id, owner)
        meta = await self.store.file(file_id)
        if meta is None:
            raise NoSuchFile(file_id)
        return meta

    async def _check_owner(self, file_id: str, owner: str | None) -> None:
        if owner is not None and await self.store.file_owner(file_id) != owner:
            raise NoSuchFile(file_id)

    async def check_file(self, file_id: str, owner: str | None = None) -> None:
        """404 unless the file exists (without rendering an output file to learn its size) and is ``owner``'s."""
        if not await self.store.file_exists(file_id):
            raise NoSuchFile(file_id)
        await self._check_owner(file_id, owner)

    async def content(self, file_id: str, owner: str | None = None) -> AsyncIterator[bytes]:
        await self.check_file(file_id, owner)
        async for piece in self.store.file_content(file_id):
            yield piece

    async def read(self, file_id: str, owner: str | None = None) -> bytes:
        return b"".join([piece async for piece in self.content(file_id, owner)])

    # --- batches -------------------------------------------------------------------------------------------
    async def create(
        self,
        input_file_id: str,
        *,
        endpoint: str = CHAT_COMPLETIONS,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        batch_key: str | None = None,
        progress: bool = False,
        owner: str | None = None,
        tenant: str | None = None,
        allowed_models: Collection[str] = (),
    ) -> dict[str, Any]:
        """Validate the input file and publish its lines; returns the OpenAI batch object. A line naming a
        model outside ``allowed_models`` (when given: the key's) is invalid (``model_not_allowed``)."""
        if endpoint != CHAT_COMPLETIONS:
            raise InvalidRequest(f"endpoint: only {CHAT_COMPLETIONS} is supported", param="endpoint")
        if completion_window != "24h":
            raise InvalidRequest("completion_window: only '24h' is supported", param="completion_window")
        metadata = metadata or {}
        if len(metadata) > 16 or any(not isinstance(v, str) or len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
            raise InvalidRequest("metadata: at most 16 string pairs, keys ≤ 64 and values ≤ 512 characters", param="metadata")
        if any(not k or k.startswith("$") or "." in k or "\0" in k for k in metadata):
            # stored as a document: MongoDB gives "$" and "." in field names a meaning of their own
            raise InvalidRequest("metadata: keys must be non-empty and may not start with '$' or contain '.'", param="metadata")
        data = await self.read(input_file_id, owner)
        sha = hashlib.sha256(data).hexdigest()
        scoped_key = f"{owner}:{batch_key}" if owner is not None and batch_key else batch_key  # one key's batch keys are its own
        key_sha = hashlib.sha256(scoped_key.encode()).hexdigest() if scoped_key else None
        batch_id = f"batch_{key_sha[:32]}" if key_sha else f"batch_{uuid.uuid4().hex}"
        existing = await self.store.get_batch(batch_id)
        if existing is not None:
            if existing["input_sha256"] != sha:
                raise BatchKeyConflict()
            if existing["status"] != "validating":
                return await self.store.openai_batch(existing)  # submitted before: nothing runs twice
        try:
            parsed = await asyncio.to_thread(parse_batch, data, self.settings, allowed_models)
        except BatchFileError as exc:
            created = BatchCreated(batch_id=batch_id, input_file_id=input_file_id, input_sha256=sha, metadata=metadata, total=0, owner=owner)
            await self.store.create_batch(created, "failed", key_sha)
            await self.store.batches.update_one(
                {"_id": batch_id}, {"$set": {"errors": [{"code": "invalid_file", "message": str(exc)}], "failed_at": int(created.created_at)}}
            )
            return await self.get(batch_id)
        invalid = [e.model_copy(update={"message": e.message[:200]}) for e in parsed.invalid]
        created = BatchCreated(
            batch_id=batch_id,
            input_file_id=input_file_id,
            input_sha256=sha,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            total=parsed.total,
            valid=len(parsed.lines),
            invalid=invalid[:MAX_EVENT_ERRORS],
            owner=owner,
        )
        await self.store.create_batch(created, "validating", key_sha)
        await self.store.record_invalid(batch_id, parsed.invalid)
        done = {d["_id"] async for d in self.store.requests.find({"batch_id": batch_id}, {"_id": 1})}  # lines with a result
        await self.bus.created(created)
        futures = []
        for line in tqdm(parsed.lines, desc="submitting", unit="req", disable=not progress):
            cid = request_id(batch_id, line.line)
            if cid in done:
                continue
            turn = self.bus.line_turn(cid, batch_id, line.custom_id, line.line, line.request, owner=owner, tenant=tenant)
            futures.append(await self.bus.send_line(turn))
        await asyncio.gather(*futures)
        if parsed.lines:
            await self.store.set_status(batch_id, "in_progress", only_from=("validating",))
        else:
            await self.store.set_status(batch_id, "failed", only_from=("validating",), error_file_id=error_file_id(batch_id))
        return await self.get(batch_id)

    async def get(self, batch_id: str, owner: str | None = None) -> dict[str, Any]:
        batch = await self.store.get_batch(batch_id)
        if batch is None or (owner is not None and batch.get("owner") != owner):
            raise NoSuchBatch(batch_id)
        return await self.store.openai_batch(batch)

    async def list(self, limit: int = 20, after: str | None = None, owner: str | None = None) -> dict[str, Any]:
        """Batches, newest first (OpenAI's list object with cursor pagination by ``after``); only ``owner``'s when given."""
        query: dict[str, Any] = {}
        if after:
            anchor = await self.store.get_batch(after)
            if anchor is not None:
                query = {"$or": [{"created_at": {"$lt": anchor["created_at"]}}, {"created_at": anchor["created_at"], "_id": {"$lt": after}}]}
        if owner is not None:
            query = {"$and": [query, {"owner": owner}]} if query else {"owner": owner}
        docs = [d async for d in self.store.batches.find(query).sort([("created_at", -1), ("_id", -1)]).limit(limit + 1)]
        data = [await self.store.openai_batch(d) for d in docs[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(docs) > limit,
        }

    async def cancel(self, batch_id: str, reason: str = "cancelled by the user", owner: str | None = None) -> dict[str, Any]:
        """Stop a batch: lines not yet generated finish as ``cancelled``; finished results are kept."""
        batch = await self.get(batch_id, owner)
        if batch["status"] not in ("validating", "in_progress"):  # as OpenAI: nothing to cancel once finalizing
            return batch
        await self.store.set_status(batch_id, "cancelling", only_from=("validating", "in_progress"))
        await self.bus.cancelled(batch_id, reason)
        await self.store.maybe_finalize(batch_id)
        batch = await self.get(batch_id)
        if batch["status"] in ("validating", "in_progress"):
            # FerretDB v1 can write the old status back with a concurrent counter update (BatchStore.set_status)
            await self.store.set_status(batch_id, "cancelling", only_from=("validating", "in_progress"))
            batch = await self.get(batch_id)
        return batch

    async def wait(self, batch_id: str, *, timeout_s: float | None = None, progress: bool = False, poll_s: float = 1.0) -> dict[str, Any]:
        """Poll until the batch is completed, failed, cancelled or expired; returns the batch object."""
        batch = await self.get(batch_id)
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        with tqdm(total=batch["request_counts"]["total"], desc=batch_id, unit="req", disable=not progress) as bar:
            while True:
                counts = batch["request_counts"]
                bar.n = counts["completed"] + counts["failed"]
                bar.set_postfix(status=batch["status"], failed=counts["failed"], refresh=False)
                bar.refresh()
                if batch["status"] in TERMINAL:
                    return batch
                if deadline is not None and asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"batch {batch_id} is still {batch['status']} after {timeout_s:.0f} s")
                await asyncio.sleep(poll_s)
                batch = await self.get(batch_id)
