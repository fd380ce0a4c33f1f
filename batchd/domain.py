"""batchd's own value types: task and batch states, outcomes, records read from the store."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from batchd.api.wire import RequestCounts


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    SUBMITTED = "submitted"
    SUCCEEDED = "succeeded"
    ERRORED = "errored"
    CANCELED = "canceled"
    EXPIRED = "expired"
    INVALID = "invalid"


FINAL_TASK_STATUSES = frozenset(
    {
        TaskStatus.SUCCEEDED,
        TaskStatus.ERRORED,
        TaskStatus.CANCELED,
        TaskStatus.EXPIRED,
        TaskStatus.INVALID,
    }
)
# What `batchd retry` puts back in the queue by default.
FAILED_TASK_STATUSES = frozenset({TaskStatus.ERRORED, TaskStatus.EXPIRED, TaskStatus.CANCELED})


class BatchState(enum.StrEnum):
    CREATING = "creating"
    IN_PROGRESS = "in_progress"
    CANCELING = "canceling"
    ENDED = "ended"
    COMPLETED = "completed"
    REJECTED = "rejected"
    LOST = "lost"


class BatchOrigin(enum.StrEnum):
    """What a batch's results showed (decided when it is finished; `batches.origin`)."""

    OURS = "ours"  # every line answered a task of its intent
    PARTLY_OURS = "partly_ours"  # some lines named no task of the intent: kept unmatched
    FOREIGN = "foreign"  # no line named any task of ours: another client's batch


# Batches whose requests count against the organisation's processing queue.
IN_FLIGHT_BATCH_STATES = frozenset(
    {BatchState.CREATING, BatchState.IN_PROGRESS, BatchState.CANCELING}
)


@dataclass(frozen=True, slots=True)
class PendingTask:
    id: int
    custom_id: str
    params: str
    attempts: int
    # Why the row cannot be read as a request at all (a BLOB, text that is not UTF-8):
    # it is marked invalid with this reason instead of stopping submission for everyone.
    unreadable: str | None = None
    # The row as read, in the store's own terms (a revision its params' UPDATEs move on; on
    # SQLite, whose ids can be reused, also when the row was created): the claim takes the
    # task only if it is still this row, so no body goes out built from a changed request.
    version: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """One parsed result line, with what the store needs to decide the task's next status."""

    custom_id: str
    result_type: str  # succeeded | errored | canceled | expired
    result_json: str  # the line's `result` object, as JSON text
    error: str | None  # readable reason for every non-success
    retryable: bool  # errored with a transient type, or expired / canceled
    usage: Usage | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class WriteReport:
    written: int  # tasks that reached a final status
    requeued: int  # tasks sent back to pending for another attempt
    ignored: int  # lines for tasks already written (a re-download): harmless no-ops
    unmatched: tuple[str, ...]  # custom_ids with no task in this batch: kept aside
    # Lines for tasks another batch had already answered: kept in duplicate_results.
    duplicates: int = 0


@dataclass(frozen=True, slots=True)
class BatchRecord:
    local_id: int
    api_batch_id: str | None
    state: BatchState
    request_count: int
    body_bytes: int
    intent_at: datetime
    submitted_at: datetime | None
    processing_status: str | None
    request_counts: RequestCounts | None
    api_created_at: datetime | None
    ended_at: datetime | None
    results_url: str | None
    not_found_since: datetime | None
    download_attempts: int
    note: str | None
    # Set on a candidate batch (a suspected duplicate read for the tasks of that intent).
    candidate_for: int | None = None
    origin: BatchOrigin | None = None  # what its results showed, once finished


@dataclass(frozen=True, slots=True)
class TaskRow:
    """A task as `batchd status CUSTOM_ID` shows it."""

    custom_id: str
    status: TaskStatus
    attempts: int
    api_batch_id: str | None
    error: str | None
    result_json: str | None
    created_at: str
    submitted_at: str | None
    completed_at: str | None
