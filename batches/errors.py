"""The batch domain's errors (:mod:`schemas.errors` classes; the edge maps them to HTTP, the CLI prints them)."""

from __future__ import annotations

from schemas.errors import Conflict, InvalidRequest, NotFound, RequestError, TooLarge

__all__ = ["BatchKeyConflict", "Conflict", "FileTooLarge", "InvalidRequest", "NoSuchBatch", "NoSuchFile", "NotFound", "RequestError", "TooLarge"]


class NoSuchFile(NotFound):
    def __init__(self, file_id: str) -> None:
        super().__init__(f"No such File object: {file_id}", param="file_id", code="file_not_found")


class NoSuchBatch(NotFound):
    def __init__(self, batch_id: str) -> None:
        super().__init__(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")


class BatchKeyConflict(Conflict):
    def __init__(self) -> None:
        super().__init__("this batch key was already used for a different input file", param="batch_key", code="batch_key_conflict")


class FileTooLarge(TooLarge):
    def __init__(self, limit: int) -> None:
        super().__init__(f"file larger than {limit} bytes", param="file", code="file_too_large")
