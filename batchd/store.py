"""Every SQL statement of batchd, behind methods named for what they mean.

INTERFACE STUB: the signatures and docstrings are the contract; bodies to be written.
See docs/design.md for the states and the transactions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from batchd.domain import BatchRecord, Outcome, PendingTask, TaskRow, TaskStatus, WriteReport
from batchd.wire import MessageBatch

Clock = Callable[[], datetime]


class StoreError(Exception):
    """The database cannot be used as it is (read-only, full, newer schema...)."""


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer batchd than this one."""


@dataclass(frozen=True, slots=True)
class EnqueueReport:
    inserted: int
    duplicates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CancelReport:
    canceled: tuple[str, ...]  # pending tasks now canceled
    flagged: tuple[str, ...]  # submitted tasks: canceled when their result comes back canceled
    not_cancelable: tuple[str, ...]  # already final
    unknown: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FinishReport:
    missing_requeued: tuple[str, ...]


class Store:
    """One writer connection behind an asyncio.Lock, one reader connection."""

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        busy_timeout_ms: int = 5000,
        clock: Clock | None = None,
        migrate: bool = True,
    ) -> Store:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def migrate(self) -> list[int]:
        raise NotImplementedError

    async def enqueue(self, items: Iterable[tuple[str, str]]) -> EnqueueReport:
        raise NotImplementedError

    def iter_pending(self, *, page_size: int = 1000) -> AsyncIterator[PendingTask]:
        raise NotImplementedError

    async def mark_invalid(self, reasons: Sequence[tuple[int, str]]) -> int:
        raise NotImplementedError

    async def record_intent(self, task_ids: Sequence[int], body_bytes: int) -> int | None:
        raise NotImplementedError

    async def mark_created(self, local_id: int, batch: MessageBatch) -> bool:
        raise NotImplementedError

    async def release_intent(
        self, local_id: int, reason: str, invalid: Sequence[tuple[str, str]] = ()
    ) -> None:
        raise NotImplementedError

    async def batches_in(self, *states: str) -> list[BatchRecord]:
        raise NotImplementedError

    async def known_api_batch_ids(self) -> set[str]:
        raise NotImplementedError

    async def in_flight_request_count(self) -> int:
        raise NotImplementedError

    async def update_batch(self, local_id: int, batch: MessageBatch) -> None:
        raise NotImplementedError

    async def note_not_found(self, local_id: int, since: datetime | None) -> None:
        raise NotImplementedError

    async def mark_lost(self, local_id: int, reason: str) -> int:
        raise NotImplementedError

    async def write_results(
        self, local_id: int, outcomes: Sequence[Outcome], max_attempts: int
    ) -> WriteReport:
        raise NotImplementedError

    async def keep_unmatched(self, api_batch_id: str, lines: Sequence[tuple[str, str]]) -> None:
        raise NotImplementedError

    async def finish_batch(self, local_id: int, reason: str) -> FinishReport:
        raise NotImplementedError

    async def note_download_failed(self, local_id: int, note: str) -> int:
        raise NotImplementedError

    async def record_duplicate(self, local_id: int, api_batch_id: str, note: str) -> None:
        raise NotImplementedError

    async def status_counts(self) -> dict[TaskStatus, int]:
        raise NotImplementedError

    async def tasks_by_custom_id(self, custom_ids: Sequence[str]) -> list[TaskRow]:
        raise NotImplementedError

    def iter_result_lines(self, statuses: Sequence[TaskStatus]) -> AsyncIterator[tuple[str, str]]:
        raise NotImplementedError

    async def request_cancel(self, custom_ids: Sequence[str]) -> CancelReport:
        raise NotImplementedError

    async def batches_to_cancel(self) -> list[BatchRecord]:
        raise NotImplementedError

    async def mark_canceling(self, local_id: int) -> None:
        raise NotImplementedError

    async def retry_tasks(
        self, statuses: Sequence[TaskStatus], custom_ids: Sequence[str] = ()
    ) -> int:
        raise NotImplementedError

    async def duplicate_batches(self) -> list[tuple[str, str, str]]:
        raise NotImplementedError
