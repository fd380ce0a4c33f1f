"""Wire types and limits of the Message Batches API, shared by the client and the fake.

One definition of each object (spec: shared/docs/anthropic-batch-api.md, the sections
are cited inline). TypedDicts describe JSON exactly as it crosses the wire; nothing
here does I/O.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal, NotRequired, TypedDict

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_BASE_URL = "https://api.anthropic.com"
BATCHES_PATH = "/v1/messages/batches"

# §3.1 and §5: the API's own ceilings. The docs say "256 MB"; whether that is 10^6 or
# 2^20 bytes is UNCONFIRMED, so we take the smaller reading everywhere (daemon and fake).
MAX_REQUESTS_PER_BATCH = 100_000
MAX_BATCH_BYTES = 256_000_000
# The API's own pattern text (it appears in its 400 message); always use fullmatch():
# with match(), `$` also matches before a trailing newline and "id\n" would pass.
CUSTOM_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# §1.1: list page size.
LIST_LIMIT_DEFAULT = 20
LIST_LIMIT_MAX = 1000
# §5: results stay downloadable this long after created_at.
RESULTS_RETENTION_DAYS = 29

ProcessingStatus = Literal["in_progress", "canceling", "ended"]
ResultType = Literal["succeeded", "errored", "canceled", "expired"]
# §4.1 ErrorObject.type, plus the HTTP-only types of §6.1.
ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "billing_error",
    "permission_error",
    "not_found_error",
    "rate_limit_error",
    "timeout_error",
    "api_error",
    "overloaded_error",
    "conflict_error",
    "request_too_large",
]


class RequestCounts(TypedDict):
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int


class MessageBatch(TypedDict):
    """§2: every key always present; the nullable ones are sent as null."""

    id: str
    type: Literal["message_batch"]
    processing_status: ProcessingStatus
    request_counts: RequestCounts
    ended_at: str | None
    created_at: str
    expires_at: str
    archived_at: str | None
    cancel_initiated_at: str | None
    results_url: str | None


class MessageBatchList(TypedDict):
    """§1.1: a page of the list endpoint, newest first."""

    data: list[MessageBatch]
    has_more: bool
    first_id: str | None
    last_id: str | None


class DeletedMessageBatch(TypedDict):
    id: str
    type: Literal["message_batch_deleted"]


class ErrorObject(TypedDict):
    type: str
    message: str
    details: NotRequired[dict[str, object]]


class ErrorResponse(TypedDict):
    """§6.1: the error envelope; inside an errored result line it is nested once more."""

    type: Literal["error"]
    error: ErrorObject
    request_id: str | None


class BatchRequest(TypedDict):
    custom_id: str
    params: dict[str, object]


class CreateBatchBody(TypedDict):
    requests: list[BatchRequest]


class SucceededResult(TypedDict):
    type: Literal["succeeded"]
    message: dict[str, object]


class ErroredResult(TypedDict):
    type: Literal["errored"]
    error: ErrorResponse


class CanceledResult(TypedDict):
    type: Literal["canceled"]


class ExpiredResult(TypedDict):
    type: Literal["expired"]


BatchResult = SucceededResult | ErroredResult | CanceledResult | ExpiredResult


class ResultLine(TypedDict):
    """§4: one line of the results JSONL."""

    custom_id: str
    result: BatchResult


def format_timestamp(moment: datetime) -> str:
    """The real server's form (§2): microseconds and an explicit +00:00 offset."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def parse_timestamp(text: str) -> datetime:
    """Accept both `...Z` and `...+00:00`, with or without microseconds (§8.7)."""
    return datetime.fromisoformat(text)


def request_total(counts: RequestCounts) -> int:
    """The sum of all counts always equals the number of requests in the batch (§2)."""
    return (
        counts["processing"]
        + counts["succeeded"]
        + counts["errored"]
        + counts["canceled"]
        + counts["expired"]
    )


def error_body(error_type: str, message: str, request_id: str | None) -> ErrorResponse:
    return {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    }
