"""OpenAI's Files and Batch APIs over :class:`batches.service.BatchService`: ``POST /v1/files``,
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``POST /v1/batches`` (an ``Idempotency-Key``
header makes re-submission return the same batch; shed first under load, :mod:`edge.admission`),
``GET /v1/batches``, ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.

The service raises :mod:`batches.errors`; :mod:`edge.errors` gives them their HTTP status.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute

from batches.errors import FileTooLarge, InvalidRequest
from batches.service import BatchService
from edge.admission import decide, refuse
from edge.auth import owner_of, protected
from edge.http import ORJSONResponse, ascii_int, limit_param, read_json
from edge.keys import admit_batch, tenant_of
from edge.turns import ChatService


def _batches(request: Request) -> BatchService:
    service: BatchService = request.app.state.batches
    return service


async def create_file(request: Request) -> Response:
    batches = _batches(request)
    limit = batches.settings.max_batch_file_bytes
    declared = ascii_int(request.headers.get("content-length"))
    if declared is not None and declared > limit + 65536:
        raise FileTooLarge(limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("expected multipart/form-data with fields `file` and `purpose`")
    async with request.form(max_files=1, max_fields=8) as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("file: a file part is required", param="file")
        if not isinstance(purpose, str):
            raise InvalidRequest("purpose: required", param="purpose")
        data = await upload.read(limit + 1)
        return ORJSONResponse(await batches.upload(data, upload.filename or "upload.jsonl", purpose, owner_of(request)))


async def retrieve_file(request: Request) -> Response:
    return ORJSONResponse(await _batches(request).file(request.path_params["file_id"], owner_of(request)))


async def file_content(request: Request) -> Response:
    batches = _batches(request)
    file_id = request.path_params["file_id"]
    await batches.check_file(file_id, owner_of(request))  # a 404 must come before the response starts
    return StreamingResponse(batches.store.file_content(file_id), media_type="application/octet-stream")


async def create_batch(request: Request) -> Response:
    batches = _batches(request)
    service: ChatService = request.app.state.service
    down = service.monitor.unavailable("batch")
    if down is not None:
        raise down
    load = service.monitor.snapshot(len(service.relay.turns))
    decision = decide(load, batches.settings, "batch")
    if not decision.admit:  # batch work is shed before interactive work
        service.live.rejected("batch")
        raise refuse(decision, "batch", load, batches.settings)
    allowed_models = await admit_batch(request)  # a spent token budget is a 429 before anything is published
    payload = await read_json(request, batches.settings.max_request_bytes)
    if not isinstance(payload, dict) or not isinstance(payload.get("input_file_id"), str):
        raise InvalidRequest("input_file_id: required", param="input_file_id")
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata: must be an object of strings", param="metadata")
    batch = await batches.create(
        payload["input_file_id"],
        endpoint=str(payload.get("endpoint", "")),
        completion_window=str(payload.get("completion_window", "24h")),
        metadata=metadata,
        batch_key=request.headers.get("idempotency-key"),
        owner=owner_of(request),
        tenant=tenant_of(request),  # the fair queue counts its lines as the key's tenant's (inference_workers.fair)
        allowed_models=allowed_models,
    )
    return ORJSONResponse(batch)


async def list_batches(request: Request) -> Response:
    batches = _batches(request)
    return ORJSONResponse(await batches.list(limit_param(request, 20, 100), request.query_params.get("after"), owner_of(request)))


async def retrieve_batch(request: Request) -> Response:
    return ORJSONResponse(await _batches(request).get(request.path_params["batch_id"], owner_of(request)))


async def cancel_batch(request: Request) -> Response:
    return ORJSONResponse(await _batches(request).cancel(request.path_params["batch_id"], owner=owner_of(request)))


ROUTES: list[BaseRoute] = [
    protected("/v1/files", create_file, ["POST"]),
    protected("/v1/files/{file_id}", retrieve_file, ["GET"]),
    protected("/v1/files/{file_id}/content", file_content, ["GET"]),
    protected("/v1/batches", create_batch, ["POST"]),
    protected("/v1/batches", list_batches, ["GET"]),
    protected("/v1/batches/{batch_id}", retrieve_batch, ["GET"]),
    protected("/v1/batches/{batch_id}/cancel", cancel_batch, ["POST"]),
]
