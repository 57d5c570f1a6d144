"""Parsing a batch input file: OpenAI Batch JSONL, validated line by line.

Accepted lines (one JSON object per line, UTF-8; blank lines are skipped):

* OpenAI's format (https://platform.openai.com/docs/api-reference/batch/request-input):
  ``{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {<chat completion request>}}``
* the short form ``{"custom_id": "r1", "messages": [...], <other request parameters>}``; ``model``
  defaults to the served model.

A bad line never fails the batch: it becomes a :class:`BatchLineError` (line number, code, reason) for the
error file and the other lines run. ``custom_id`` must be a non-empty string, unique within the batch.
The body is validated exactly like ``POST /v1/chat/completions`` (same 400 reasons), except that
``stream`` is refused (a batch has no stream to send).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import orjson

from batches.errors import InvalidRequest, NotFound, RequestError, TooLarge
from core.config import Settings
from core.routing import AUTO, classify
from schemas.events import BatchLineError
from schemas.openai import ChatCompletionRequest, check_supported, parse_request
from topics.pools import pool_named, pools

CHAT_COMPLETIONS = "/v1/chat/completions"


@dataclass(frozen=True)
class BatchLine:
    line: int  # 1-based
    custom_id: str
    request: ChatCompletionRequest


@dataclass
class ParsedBatch:
    lines: list[BatchLine]
    invalid: list[BatchLineError]

    @property
    def total(self) -> int:
        return len(self.lines) + len(self.invalid)


class BatchFileError(ValueError):
    """The file as a whole cannot be a batch (too large, too many lines, no line at all)."""


def parse_line(raw: bytes, number: int, settings: Settings) -> BatchLine:
    """One input line to a validated request. Raises a :class:`~schemas.errors.RequestError` (its message is the reason)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("a line must be a JSON object", code="invalid_json")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        raise InvalidRequest("custom_id: a non-empty string is required", param="custom_id", code="missing_custom_id")
    if len(custom_id) > 512:
        raise InvalidRequest("custom_id: at most 512 characters", param="custom_id", code="invalid_custom_id")
    if "body" in obj or "url" in obj or "method" in obj:
        if obj.get("method", "POST") != "POST":
            raise InvalidRequest(f"method: only POST is supported, got {obj.get('method')!r}", param="method", code="invalid_method")
        if obj.get("url") != CHAT_COMPLETIONS:
            raise InvalidRequest(f"url: only {CHAT_COMPLETIONS} is supported, got {obj.get('url')!r}", param="url", code="invalid_url")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise InvalidRequest("body: a JSON object is required", param="body", code="invalid_body")
    else:
        body = {k: v for k, v in obj.items() if k != "custom_id"}
        body.setdefault("model", settings.model_name)
    request = parse_request(body)
    if request.stream:
        raise InvalidRequest("stream: streaming is not available in a batch", param="stream")
    check_supported(request, settings.max_model_len)
    if request.model == AUTO:  # no live health here: a batch line waits for its pool (topics.pools)
        needs_primary, _ = classify(request.chat_messages())
        pool = pools(settings)[0] if needs_primary else pool_named(settings, settings.auto_small_model) or pools(settings)[-1]
        request = request.model_copy(update={"model": pool.name})
    if pool_named(settings, request.model) is None:
        raise NotFound(f"The model `{request.model}` does not exist.", param="model", code="model_not_found")
    if len(raw) > settings.max_request_bytes:
        raise TooLarge(f"line longer than {settings.max_request_bytes} bytes", code="request_too_large")
    return BatchLine(number, custom_id, request)


def parse_batch(data: bytes, settings: Settings, allowed_models: Collection[str] = ()) -> ParsedBatch:
    """Every line of an input file, valid or not; with ``allowed_models`` (a key's), a line naming another
    model (after ``auto`` is resolved) is invalid, ``model_not_allowed``. Raises :class:`BatchFileError` for
    the file as a whole."""
    if len(data) > settings.max_batch_file_bytes:
        raise BatchFileError(f"the file is larger than {settings.max_batch_file_bytes} bytes")
    parsed = ParsedBatch([], [])
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        if parsed.total >= settings.max_batch_lines:
            raise BatchFileError(f"the file has more than {settings.max_batch_lines} requests")
        try:
            line = parse_line(raw, number, settings)
        except RequestError as err:
            custom_id = _custom_id_of(raw)
            parsed.invalid.append(BatchLineError(line=number, custom_id=custom_id, code=err.code or err.type, message=f"line {number}: {err.message}"))
            continue
        if line.custom_id in seen:
            message = f"line {number}: custom_id {line.custom_id!r} is not unique within the batch"
            parsed.invalid.append(BatchLineError(line=number, custom_id=line.custom_id, code="duplicate_custom_id", message=message))
            continue
        seen.add(line.custom_id)
        if allowed_models and line.request.model not in allowed_models:
            message = f"line {number}: this key may not use the model '{line.request.model}'; it may use {', '.join(allowed_models)}"
            parsed.invalid.append(BatchLineError(line=number, custom_id=line.custom_id, code="model_not_allowed", message=message))
            continue
        parsed.lines.append(line)
    if parsed.total == 0:
        raise BatchFileError("the file has no requests")
    return parsed


def _custom_id_of(raw: bytes) -> str | None:
    try:
        value = orjson.loads(raw).get("custom_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None
