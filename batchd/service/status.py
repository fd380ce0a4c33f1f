"""The status document: what `batchd status --json` prints and the web view's /api/status.

One builder for both, so the page and the command can never disagree. It sits below the
command line (the daemon's listener serves it too) and reads only through the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from batchd.api.wire import RESULTS_RETENTION_DAYS
from batchd.config import Config
from batchd.domain import BatchRecord, BatchState, TaskRow, TaskStatus
from batchd.money.spending import budget_status, usage_status
from batchd.store import CandidateBatch, Store

ACTIVE_BATCH_STATES = (
    BatchState.CREATING,
    BatchState.IN_PROGRESS,
    BatchState.CANCELING,
    BatchState.ENDED,
)
# Results not yet stored this close to the API's retention limit are flagged (as the
# collector's `results_near_archival` log line does).
RETENTION_MARGIN = timedelta(days=2)
# The API expires a batch that has not ended 24 hours after its creation (spec §1).
BATCH_EXPIRY = timedelta(hours=24)
THROUGHPUT_WINDOW = timedelta(hours=1)
THROUGHPUT_BUCKET = timedelta(minutes=1)
LATEST_ERRORS = 10


async def status_snapshot(
    store: Store,
    config: Config | None = None,
    now: datetime | None = None,
    *,
    accounting: bool = True,
) -> dict[str, Any]:
    """Everything `batchd status` shows, as plain JSON-ready data.

    `accounting=False` leaves out usage, cost, budget, result gaps, throughput and the
    latest errors: the run's progress bar reads this several times a second.
    """
    config = config or Config()
    now = now or datetime.now(UTC)
    counts = await store.status_counts()
    batches = await store.batches_in(*ACTIVE_BATCH_STATES)
    candidates = await store.candidate_batches()
    shared = await store.shared_key_evidence()
    snapshot: dict[str, Any] = {
        "generated_at": now.isoformat(),
        "tasks": {str(status): counts[status] for status in TaskStatus},
        "batches_in_flight": [batch_json(batch, now) for batch in batches],
        "duplicate_batches": [candidate_json(candidate) for candidate in candidates],
        "shared_key": {
            "batches_not_ours": shared.batches,
            "first_seen_at": shared.first_seen_at,
            "proven_foreign": shared.proven_foreign,
        },
        "retention": retention_warnings(batches, now),
    }
    if accounting:
        accounts = store.accounts
        snapshot["usage"] = await usage_status(accounts, config)
        snapshot["budget"] = await budget_status(accounts, config, batches, now)
        gaps = await accounts.result_gaps()
        snapshot["results"] = {
            "unmatched": gaps.unmatched,
            "missing_requeued": gaps.missing_requeued,
            "archived_requeued": gaps.archived_requeued,
        }
        snapshot["throughput"] = await throughput(store, now)
        snapshot["latest_errors"] = [
            error_json(row) for row in await store.latest_failed_tasks(LATEST_ERRORS)
        ]
    return snapshot


def retention_warnings(batches: Sequence[BatchRecord], now: datetime) -> list[dict[str, Any]]:
    """Batches whose results are not stored yet and will soon be (or are) archived."""
    limit = timedelta(days=RESULTS_RETENTION_DAYS)
    warnings = []
    for batch in batches:
        created = batch.api_created_at
        if created is None or now - created < limit - RETENTION_MARGIN:
            continue
        warnings.append(
            {
                "batch_id": batch.api_batch_id,
                "state": str(batch.state),
                "created_at": created.isoformat(),
                "age_days": round((now - created) / timedelta(days=1), 2),
                "archived_in_days": round((created + limit - now) / timedelta(days=1), 2),
            }
        )
    return warnings


def batch_created_at(batch: BatchRecord) -> datetime:
    """When the batch's 24 h started: the API's created_at, else our best earlier guess."""
    return batch.api_created_at or batch.submitted_at or batch.intent_at


def expires_in_s(batch: BatchRecord, now: datetime) -> float | None:
    """Seconds until the API expires the batch; None once it ended or before it exists."""
    if batch.state not in (BatchState.IN_PROGRESS, BatchState.CANCELING):
        return None
    return (batch_created_at(batch) + BATCH_EXPIRY - now).total_seconds()


def batch_json(batch: BatchRecord, now: datetime) -> dict[str, Any]:
    remaining = expires_in_s(batch, now)
    return {
        "batch_id": batch.api_batch_id,
        "local_id": batch.local_id,
        "state": str(batch.state),
        "requests": batch.request_count,
        "body_bytes": batch.body_bytes,
        "request_counts": dict(batch.request_counts) if batch.request_counts else None,
        "submitted_at": _iso(batch.submitted_at),
        "ended_at": _iso(batch.ended_at),
        "age_s": round((now - batch_created_at(batch)).total_seconds(), 1),
        "expires_in_s": None if remaining is None else round(remaining, 1),
        "note": batch.note,
        "candidate_for": batch.candidate_for,
    }


def candidate_json(candidate: CandidateBatch) -> dict[str, Any]:
    """A suspected duplicate and its harvest (issue 15: read to the end, never wasted)."""
    return {
        "batch_id": candidate.api_batch_id,
        "detected_at": candidate.detected_at,
        "note": candidate.note,
        "candidate_for": candidate.intent_id,
        "harvest_state": candidate.state,
        "origin": candidate.origin,
        "written": candidate.written,
        "duplicate_lines": candidate.duplicate_lines,
        "foreign_lines": candidate.foreign_lines,
    }


async def throughput(store: Store, now: datetime) -> dict[str, Any]:
    """Results stored per minute over the last hour, oldest minute first.

    Counted per batch, at the minute its results were all stored (see the store's
    `batch_completions_since`).
    """
    buckets = int(THROUGHPUT_WINDOW / THROUGHPUT_BUCKET)
    # Whole minutes, so a bucket does not shift its edges from one refresh to the next.
    end = now.replace(second=0, microsecond=0) + THROUGHPUT_BUCKET
    start = end - THROUGHPUT_WINDOW
    succeeded, failed = [0] * buckets, [0] * buckets
    for completed_at, ok, not_ok in await store.batch_completions_since(start):
        index = min(int((completed_at - start) / THROUGHPUT_BUCKET), buckets - 1)
        succeeded[index] += ok
        failed[index] += not_ok
    return {
        "start": start.isoformat(),
        "bucket_s": int(THROUGHPUT_BUCKET.total_seconds()),
        "succeeded": succeeded,
        "failed": failed,
    }


def task_head(row: TaskRow) -> dict[str, Any]:
    """The fields every task document begins with (`error_json`, `batchd status CUSTOM_ID
    --json`): which task, how it stands, and why it failed if it did."""
    return {
        "custom_id": row.custom_id,
        "status": str(row.status),
        "attempts": row.attempts,
        "batch_id": row.api_batch_id,
        "error": row.error,
    }


def error_json(row: TaskRow) -> dict[str, Any]:
    return {**task_head(row), "completed_at": row.completed_at}


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None
