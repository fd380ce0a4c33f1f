"""What both stores compute in Python around their own SQL: the checks of the user
commands' arguments, the reports built from the rows a command read, and the walk of a
cancel of many through the queue a chunk at a time. Each store keeps its statements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from batchd.domain import FINAL_TASK_STATUSES, TaskStatus
from batchd.store.values import (
    AcknowledgeReport,
    CancelReport,
    ResultLine,
    ResultRow,
    WaitingCancelReport,
)

# Tasks changed per transaction by a cancel of many: the write lock (SQLite) or the rows
# and count rows locked (PostgreSQL) are held only that long, never for a whole queue.
# Each store's `actions` imports it into its own namespace (a test lowers it there).
CANCEL_CHUNK = 5000
# The error a task canceled at a user's request carries, whichever store and path set it.
USER_CANCELED = "canceled at user request"
WAITING_STATUSES = (TaskStatus.PENDING, TaskStatus.SUBMITTED)
# Cancels one chunk of the tasks in any of the statuses above an id, up to the last id,
# in one transaction: (pending tasks canceled, submitted tasks flagged, id to go on from).
CancelChunk = Callable[[Sequence[TaskStatus], int, int], Awaitable[tuple[int, int, int]]]


def status_counts(rows: Iterable[Iterable[Any]]) -> dict[TaskStatus, int]:
    """{status: tasks} from (status, tasks) rows, every status present (zeros included)."""
    counts = dict.fromkeys(TaskStatus, 0)
    counts.update({TaskStatus(status): int(count) for status, count in rows})
    return counts


def cancel_report(custom_ids: Sequence[str], status_of: Mapping[str, str]) -> CancelReport:
    """`request_cancel`'s answer: each custom_id asked for, by the status it had before."""

    def having(*statuses: str | None) -> tuple[str, ...]:
        return tuple(cid for cid in custom_ids if status_of.get(cid) in statuses)

    return CancelReport(
        canceled=having(TaskStatus.PENDING),
        flagged=having(TaskStatus.SUBMITTED),
        not_cancelable=having(*FINAL_TASK_STATUSES),
        unknown=having(None),
    )


def acknowledge_report(asked: Sequence[str], already_done: Mapping[str, bool]) -> AcknowledgeReport:
    """`acknowledge_duplicates`' answer from {api_batch_id: acknowledged before} of the
    suspected duplicates found among `asked`."""
    return AcknowledgeReport(
        acknowledged=tuple(b for b in asked if already_done.get(b) is False),
        already=tuple(b for b in asked if already_done.get(b) is True),
        unknown=tuple(b for b in asked if b not in already_done),
    )


def check_retryable(statuses: Iterable[TaskStatus]) -> None:
    """Only final tasks go back to the queue (`retry_tasks`)."""
    not_final = set(statuses) - FINAL_TASK_STATUSES
    if not_final:
        raise ValueError(f"only final tasks can be retried, not {sorted(not_final)}")


def check_waiting(statuses: Iterable[TaskStatus]) -> None:
    """Only waiting tasks can be canceled (`cancel_waiting`)."""
    unknown = set(statuses) - set(WAITING_STATUSES)
    if unknown:
        raise ValueError(f"only waiting tasks can be canceled, not {sorted(unknown)}")


async def cancel_in_chunks(
    statuses: Sequence[TaskStatus], last_id: int, cancel_chunk: CancelChunk
) -> WaitingCancelReport:
    """Cancel the tasks of `statuses` with ids up to `last_id` (those that existed when the
    cancel began), one transaction of a range of ids at a time; a crash midway leaves the
    chunks done canceled, and running it again finishes the rest.

    One walk by id over every status at once, each range's statuses decided in one
    transaction: a task the daemon moves between them meanwhile (requeued submitted ->
    pending, claimed pending -> submitted) is met in its range whatever its status then,
    and a flag set on it before the walk passed survives any requeue (the task is canceled
    instead). A walk per status missed a task requeued between the two (review 7, 8)."""
    wanted = tuple(dict.fromkeys(statuses))
    canceled = flagged = 0
    after = 0
    while after < last_id:
        chunk_canceled, chunk_flagged, after = await cancel_chunk(wanted, after, last_id)
        canceled += chunk_canceled
        flagged += chunk_flagged
    return WaitingCancelReport(canceled, flagged)


def cancel_range(
    rows: Iterable[tuple[int, str]], limit: int, last_id: int
) -> tuple[list[int], int]:
    """One range of a cancel's walk, from the ids read for it: up to `limit` per status
    above the last range, in id order, as (id, status) rows read at one moment. Returns
    the ids of the range and its last id (where the next range starts): every waiting id
    up to it was read, since a status with fewer than `limit` ids had none left below
    `last_id`, and one with `limit` none below its own last."""
    by_status: dict[str, list[int]] = {}
    for task_id, status in rows:
        by_status.setdefault(str(status), []).append(int(task_id))
    end = min((max(ids) for ids in by_status.values() if len(ids) >= limit), default=last_id)
    return sorted(i for ids in by_status.values() for i in ids if i <= end), end


async def result_lines(pages: AsyncIterator[list[ResultRow]]) -> AsyncIterator[ResultLine]:
    """`iter_result_lines` from `iter_result_rows`' pages: each row as (custom_id, text)."""
    async for rows in pages:
        for _, custom_id, result in rows:
            yield ResultLine(custom_id, result.decode())


async def keyed_pages(
    page: Callable[[tuple[Any, int] | None], Awaitable[list[tuple[Any, ...]]]], page_size: int
) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Prune's pages, oldest first: `page(key)` reads the `page_size` rows after `key`
    (None: from the start), each row starting (completed_at, id); a short page is the last."""
    key: tuple[Any, int] | None = None
    while True:
        rows = await page(key)
        if rows:
            yield rows
        if len(rows) < page_size:
            return
        key = (rows[-1][0], rows[-1][1])
