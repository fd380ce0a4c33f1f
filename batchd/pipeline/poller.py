"""Every in-flight batch due polled at once, with a bounded number of requests in the air.

Due: on PostgreSQL several daemons poll, and a batch one of them claimed is skipped by the
others for a poll interval (`Store.batches_due_for_poll`); on SQLite every in-flight batch
is due at every cycle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

import structlog

from batchd.api import ApiError, AuthenticationError, BatchesClient, NotFoundError
from batchd.api.wire import MessageBatch
from batchd.config import PollingConfig
from batchd.crashpoints import crash_point
from batchd.domain import BatchRecord
from batchd.store import Store

log = structlog.get_logger("batchd.pipeline.poller")


@dataclass(frozen=True, slots=True)
class PollReport:
    polled: int = 0
    ended: int = 0
    failed: int = 0
    lost: int = 0


class Poller:
    def __init__(
        self,
        store: Store,
        client: BatchesClient,
        config: PollingConfig,
        *,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._client = client
        self._limit = asyncio.Semaphore(config.max_concurrency)
        self._grace = timedelta(seconds=config.not_found_grace_s)
        self._interval_s = config.interval_s
        self._clock = clock

    async def poll_all(self) -> PollReport:
        """One cycle: retrieve every batch still processing and due, record what changed."""
        batches = await self._store.batches_due_for_poll(self._interval_s)
        # Every poll is awaited even when one fails (a database fault): a plain gather
        # would return at the first error and leave the others running unsupervised.
        results = await asyncio.gather(
            *(self._poll(batch) for batch in batches), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        outcomes = cast(list[str], results)
        return PollReport(
            polled=len(batches),
            ended=outcomes.count("ended"),
            failed=outcomes.count("failed"),
            lost=outcomes.count("lost"),
        )

    async def _poll(self, batch: BatchRecord) -> str:
        assert batch.api_batch_id is not None
        async with self._limit:
            try:
                remote = await self._client.retrieve(batch.api_batch_id)
            except NotFoundError:
                return await self._not_found(batch)
            except AuthenticationError:
                raise  # not this batch's fault: every call will be refused
            except ApiError as exc:
                # Transport faults never fail tasks: the next cycle tries again.
                log.warning("batch_poll_failed", batch_id=batch.api_batch_id, error=str(exc))
                return "failed"
        crash_point("poll_retrieved")
        if not _unchanged(batch, remote):
            # Only a change costs a (fully synced) write transaction: with thousands of
            # batches in flight most polls change nothing (design step 5).
            await self._store.update_batch(batch.local_id, remote)
        counts = remote["request_counts"]
        log.debug(
            "batch_polled", batch_id=remote["id"], status=remote["processing_status"], **counts
        )
        if remote["processing_status"] == "ended":
            log.info("batch_ended", batch_id=remote["id"], **counts)
            return "ended"
        return "polled"

    async def _not_found(self, batch: BatchRecord) -> str:
        """Spec §7.6: 404s right after a create are transient; a lasting one is a loss."""
        now = self._clock()
        if batch.not_found_since is None:
            await self._store.note_not_found(batch.local_id, now)
            log.warning("batch_not_found", batch_id=batch.api_batch_id)
            return "failed"
        started = max(batch.not_found_since, batch.submitted_at or batch.not_found_since)
        if now - started < self._grace:
            return "failed"
        requeued = await self._store.mark_lost(batch.local_id, "404 on retrieve")
        log.error("batch_lost", batch_id=batch.api_batch_id, requeued=requeued)
        return "lost"


def _unchanged(batch: BatchRecord, remote: MessageBatch) -> bool:
    return (
        batch.not_found_since is None
        and batch.processing_status == remote["processing_status"]
        and batch.request_counts == remote["request_counts"]
    )
