"""Ended batches ─► results streamed and staged, then applied to the tasks in id ranges.

Two batches at a time, on two write-back lanes of the store: while one batch is applied
(SQLite's work, which lets go of the GIL), the next one is downloaded, parsed and staged.
Each batch is taken under a lease (collectlease.py): on PostgreSQL every daemon collects,
one daemon per batch, and a batch whose holder died is taken over once its lease lapsed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson
import structlog

from batchd.api import (
    ApiError,
    AuthenticationError,
    BatchesClient,
    NotFoundError,
    ResultsStreamError,
)
from batchd.api.wire import RESULTS_RETENTION_DAYS, parse_timestamp
from batchd.config import CollectorSettings
from batchd.crashpoints import crash_point
from batchd.domain import BatchOrigin, BatchRecord, Outcome
from batchd.pipeline.collectlease import (
    CollectionLease,
    CollectionLeaseLost,
    instance_name,
    note_taken,
)
from batchd.pipeline.outcomes import MalformedResultLine, parse_result_line
from batchd.pipeline.overlap import until_done_or_ended, until_staged
from batchd.service.metrics import RESULTS_WRITTEN, Registry
from batchd.store import FinishReport, KeptLine, Store, StoreError, WriteBackLane

log = structlog.get_logger("batchd.pipeline.collector")

# Results are archived (gone) this long after the batch was created (spec §7.5).
_RETENTION = timedelta(days=RESULTS_RETENTION_DAYS)
# Back-to-back apply transactions leave a user's INSERT almost no moment to take the write
# lock: SQLite's busy handler retries only every 100 ms once it has waited 228 ms. So after
# this long of applying (by either lane), a pause of every write of ours that holds at
# least one of those retries (costs ~5-10%).
_WRITERS_WAIT_S = 1.0
_WRITERS_PAUSE_S = 0.12
# Warn loudly when results of an unfinished download are this close to being archived.
_RETENTION_WARNING = timedelta(days=RESULTS_RETENTION_DAYS - 2)


@dataclass(slots=True)
class _Tally:
    lines: int = 0
    written: int = 0
    requeued: int = 0
    ignored: int = 0
    unmatched: int = 0
    matched: int = 0  # lines that named a task of the batch's intent
    duplicates: int = 0  # lines for tasks another batch had already answered


class Collector:
    """Downloads each ended batch's results into staging, applies them, finishes the batch.

    Two phases per download, so the write lock is never held across network I/O and each
    write transaction is short: the stream's lines are staged chunk by chunk (staging database
    transactions, no lock on the database file), then applied in ranges of task ids, one
    guarded transaction per range (store.py, design step 6). A crash in either phase
    leaves the batch `ended`: the next run downloads again, and lines already applied
    are ignored by the guard.
    """

    def __init__(
        self,
        store: Store,
        client: BatchesClient,
        settings: CollectorSettings,
        *,
        clock: Callable[[], datetime],
        registry: Registry | None = None,
        holder: str | None = None,
    ) -> None:
        self._registry = registry
        # Who this daemon is in the collection leases (`batches.collector`).
        self.holder = holder or instance_name()
        self._leases: dict[int, CollectionLease] = {}
        self._store = store
        self._client = client
        self._config = settings.results
        self._max_attempts = settings.max_attempts
        self._clock = clock
        self._applying_since = time.monotonic()  # since the last pause for users' writes

    async def collect_all(self, ended: asyncio.Event | None = None) -> int:
        """Write back the results of every ended batch; returns how many were finished.

        Each batch is started once the one before it is staged, so that its download and
        staging overlap the previous batch's apply; at most one batch per lane at a time.
        `ended` (news of ended batches), while the last applies run: a batch that ends
        meanwhile is started at once, not after them (overlap.py).
        """
        running: list[asyncio.Task[bool]] = []
        self._applying_since = time.monotonic()
        taken: set[int] = set()  # this round's: a batch that failed waits for the next
        try:
            more = True
            while more:
                if ended is not None:
                    ended.clear()  # news from now on: the takes below see what came before
                # One batch taken at a time, when a lane is about to be free: the others
                # stay free for the other daemons (PostgreSQL) to take meanwhile.
                while found := await self._store.take_ended_batch(
                    self.holder, self._config.lease_s, taken
                ):
                    taken.add(found.batch.local_id)
                    note_taken(found, self.holder, self._registry)
                    staged = asyncio.Event()
                    running.append(asyncio.create_task(self._collect_one(found.batch, staged)))
                    await until_staged(staged, running)
                more = await until_done_or_ended(running, ended)
        except BaseException:
            # A fatal error (the key, the database: every batch would fail alike) stops the
            # batch still downloading too; it stays `ended` and is downloaded again.
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise
        return sum(1 for task in running if task.result())

    async def _collect_one(self, batch: BatchRecord, staged: asyncio.Event) -> bool:
        """One batch, `staged` set as soon as its lines are all staged (or it stopped)."""
        lease = CollectionLease(
            self._store,
            batch.local_id,
            batch.api_batch_id,
            holder=self.holder,
            lease_s=self._config.lease_s,
            registry=self._registry,
        )
        self._leases[batch.local_id] = lease
        try:
            async with lease:
                return await self._collect_held(batch, staged)
        finally:
            del self._leases[batch.local_id]
            # Last, the lease given back: a batch that failed is done (its exception
            # seen by `collect_all`) by the time the next one would be started.
            staged.set()

    async def _collect_held(self, batch: BatchRecord, staged: asyncio.Event) -> bool:
        try:
            return await self._collect(batch, staged)
        except CollectionLeaseLost:
            return False  # said when it was lost; the new holder writes the rest
        except (AuthenticationError, StoreError):
            # Not this batch's fault (the key; a full or read-only disk): every batch
            # would fail alike, and the daemon's step handling waits and retries.
            raise
        except ApiError as exc:
            await self._download_failed(batch, str(exc))
        except Exception:
            # What fails only this batch (a bug it alone meets) must not hold up the
            # batches after it until their results are archived: it stays `ended`, is
            # tried again next cycle, and is reported loudly meanwhile.
            log.exception("results_write_failed", batch_id=batch.api_batch_id)
        return False

    async def _collect(self, batch: BatchRecord, staged: asyncio.Event) -> bool:
        assert batch.api_batch_id is not None
        self._warn_if_near_archival(batch)
        if batch.results_url is None:
            await self._download_failed(batch, "ended without a results_url")
            return False
        try:
            async with self._store.write_back_lane() as lane, _given_back_on_failure(lane, batch):
                tally = await self._download(lane, batch, batch.results_url, staged)
        except NotFoundError as exc:
            return await self._results_not_found(batch, exc)
        if tally.lines < batch.request_count:
            # Fewer lines than requests means a cut-off stream, never "missing": requeuing
            # them would pay twice for results that exist. Only these count toward the
            # limit, not transport failures (which never prove anything is missing).
            note = f"results stream held {tally.lines} of {batch.request_count} lines"
            short = await self._store.note_short_stream(batch.local_id, note)
            log.warning(
                "results_download_failed", batch_id=batch.api_batch_id, attempts=short, error=note
            )
            if short < self._config.max_download_attempts:
                return False
        crash_point("results_streamed")
        await self._finish(batch, batch.api_batch_id, tally)
        return True

    async def _download(
        self, lane: WriteBackLane, batch: BatchRecord, url: str, staged: asyncio.Event
    ) -> _Tally:
        tally = _Tally()
        await lane.clear_staging()  # what a download that stopped midway left
        try:
            await self._stage_stream(lane, batch, url, tally)
        except ResultsStreamError:
            # Cut midway: the lines before the cut are whole. Apply them now (the stream
            # is closed), so the next download only has the rest left to write.
            staged.set()
            await self._apply(lane, batch, tally)
            raise
        crash_point("results_staged")
        staged.set()
        await self._apply(lane, batch, tally)
        return tally

    async def _stage_stream(
        self, lane: WriteBackLane, batch: BatchRecord, url: str, tally: _Tally
    ) -> None:
        api_batch_id = batch.api_batch_id
        assert api_batch_id is not None
        # Staging a chunk while the next is parsed (SQLite releases the GIL) was measured:
        # no gain on 2 cores (bench/README.md), so it is done in line.
        outcomes: list[Outcome] = []
        async with self._client.results(
            url, batch_id=api_batch_id, max_line_bytes=self._config.max_line_bytes
        ) as stream:
            async for line in stream:
                crash_point("result_line_read")
                tally.lines += 1
                try:
                    outcomes.append(parse_result_line(line))
                except MalformedResultLine as exc:
                    await self._keep_malformed(api_batch_id, tally.lines, line, exc)
                    continue
                if len(outcomes) >= self._config.chunk_size:
                    await self._stage(lane, batch, api_batch_id, outcomes, tally=tally)
                    outcomes = []
        if outcomes:
            await self._stage(lane, batch, api_batch_id, outcomes, tally=tally)

    async def _keep_malformed(
        self, api_batch_id: str, number: int, line: bytes, exc: MalformedResultLine
    ) -> None:
        # An expected data problem, not a crash: no traceback wanted.
        log.error("result_line_malformed", batch_id=api_batch_id, error=str(exc))
        await self._store.keep_unmatched(
            api_batch_id, [KeptLine(f"malformed-line-{number}", line.decode(errors="replace"))]
        )

    async def _stage(
        self,
        lane: WriteBackLane,
        batch: BatchRecord,
        api_batch_id: str,
        outcomes: Sequence[Outcome],
        *,
        tally: _Tally,
    ) -> None:
        self._leases[batch.local_id].check()
        report = await lane.stage_results(batch.local_id, outcomes)
        tally.matched += report.staged + report.repeated
        self._count(tally, ignored=report.repeated, unmatched=len(report.unmatched))
        if not report.unmatched:
            return
        unmatched = [outcomes[position] for position in report.unmatched]
        await self._store.keep_unmatched(
            api_batch_id, [KeptLine.of(outcome, _line_of(outcome)) for outcome in unmatched]
        )
        log.error(
            "results_unmatched",
            batch_id=api_batch_id,
            count=len(unmatched),
            first=unmatched[0].custom_id,
        )

    async def _apply(self, lane: WriteBackLane, batch: BatchRecord, tally: _Tally) -> None:
        after = 0
        lease = self._leases[batch.local_id]
        while True:
            lease.check()  # taken over: the new holder applies the rest
            applied = await lane.apply_staged(
                batch.local_id, self._max_attempts, self._config.chunk_size, after
            )
            if applied is None:
                break
            crash_point("results_chunk_written")
            if batch.candidate_for is not None:
                crash_point("harvest_chunk_written")
            report, after = applied.report, applied.last_task_id
            self._count(
                tally,
                written=report.written,
                requeued=report.requeued,
                ignored=report.ignored,
                unmatched=len(report.unmatched),  # tasks gone since staging: kept (store)
                duplicates=report.duplicates,
            )
            if time.monotonic() - self._applying_since >= _WRITERS_WAIT_S:
                # A sleep of this lane alone would leave the lock to the other lane.
                await self._store.yield_to_writers(_WRITERS_PAUSE_S)
                self._applying_since = time.monotonic()
        await lane.clear_staging()

    async def _finish_held(
        self, batch: BatchRecord, reason: str, *, archived: bool = False, matched: int | None = None
    ) -> FinishReport:
        """`finish_batch` under this daemon's lease: refused once the lease lapsed (another
        daemon may be writing the batch: its missing lines are not ours to requeue)."""
        lease = self._leases[batch.local_id]
        lease.check()
        await lease.stop_renewing()
        report = await self._store.finish_batch(
            batch.local_id, reason, archived=archived, matched_lines=matched, holder=self.holder
        )
        if report.lease_lapsed:
            lease.lapsed()
            raise CollectionLeaseLost(f"finish of batch {batch.api_batch_id} refused")
        lease.finished = True
        return report

    async def _finish(self, batch: BatchRecord, api_batch_id: str, tally: _Tally) -> None:
        reason = f"no result line for this request in batch {api_batch_id}"
        report = await self._finish_held(batch, reason, matched=tally.matched)
        crash_point("batch_finished")
        if batch.candidate_for is not None:
            crash_point("harvest_finished")
        _log_origin(batch, api_batch_id, report.origin, tally)
        if report.missing_requeued:
            log.error(
                "results_missing",
                batch_id=api_batch_id,
                count=len(report.missing_requeued),
                first=report.missing_requeued[0],
            )
        log.info(
            "results_written",
            batch_id=api_batch_id,
            lines=tally.lines,
            written=tally.written,
            requeued=tally.requeued,
            ignored=tally.ignored,
            unmatched=tally.unmatched,
            duplicates=tally.duplicates,
            candidate_for=batch.candidate_for,
        )

    async def _results_not_found(self, batch: BatchRecord, exc: NotFoundError) -> bool:
        assert batch.api_batch_id is not None
        archived_at = await self._archived_at(batch)
        if archived_at is None:
            # Spec §7.6: 404s right after the end are transient; retried until archival.
            await self._download_failed(batch, f"results not found: {exc}")
            return False
        reason = f"results of batch {batch.api_batch_id} archived at {archived_at}, never written"
        report = await self._finish_held(batch, reason, archived=True)
        # Loud on purpose: these requests will be sent, and paid for, a second time.
        log.error(
            "results_archived",
            batch_id=batch.api_batch_id,
            archived_at=archived_at,
            requests=batch.request_count,
            requeued=len(report.missing_requeued),
            first=report.missing_requeued[0] if report.missing_requeued else None,
        )
        return True

    async def _archived_at(self, batch: BatchRecord) -> str | None:
        """When the batch's results were archived (spec §7.5), or None if they should exist."""
        assert batch.api_batch_id is not None
        try:
            current = await self._client.retrieve(batch.api_batch_id)
        except NotFoundError:
            current = None  # deleted, or a transient 404 (§7.6): only its age can tell
        if current is not None and current.get("archived_at"):
            return current["archived_at"]
        if current is not None:
            created = parse_timestamp(current["created_at"])
        else:
            created = batch.api_created_at or batch.intent_at
        if self._clock() - created >= _RETENTION:
            return (created + _RETENTION).isoformat()
        return None

    async def _download_failed(self, batch: BatchRecord, note: str) -> int:
        attempts = await self._store.note_download_failed(batch.local_id, note)
        log.warning(
            "results_download_failed", batch_id=batch.api_batch_id, attempts=attempts, error=note
        )
        return attempts

    def _count(
        self,
        tally: _Tally,
        *,
        written: int = 0,
        requeued: int = 0,
        ignored: int = 0,
        unmatched: int = 0,
        duplicates: int = 0,
    ) -> None:
        tally.written += written
        tally.requeued += requeued
        tally.ignored += ignored
        tally.unmatched += unmatched
        tally.duplicates += duplicates
        if self._registry is None:
            return
        for outcome, count in (
            ("written", written),
            ("requeued", requeued),
            ("ignored", ignored),
            ("unmatched", unmatched),
            ("duplicate", duplicates),
        ):
            self._registry.inc(RESULTS_WRITTEN, count, outcome=outcome)

    def _warn_if_near_archival(self, batch: BatchRecord) -> None:
        created = batch.api_created_at or batch.intent_at
        if self._clock() - created >= _RETENTION_WARNING:
            log.error(
                "results_near_archival", batch_id=batch.api_batch_id, created_at=created.isoformat()
            )


@asynccontextmanager
async def _given_back_on_failure(lane: WriteBackLane, batch: BatchRecord) -> AsyncIterator[None]:
    """A download that fails (or is stopped) gives its staged lines back at once rather than
    at this lane's next download: a batch's lines may be gigabytes of disk, and the failure
    may be a full disk."""
    try:
        yield
    except ResultsStreamError:
        raise  # a cut stream: the lines before the cut were applied, and staging cleared
    except BaseException:
        try:
            await lane.clear_staging()
        except StoreError as exc:  # the error being raised says more; the next download clears
            log.warning("staging_not_cleared", batch_id=batch.api_batch_id, error=str(exc))
        raise


def _log_origin(batch: BatchRecord, api_batch_id: str, origin: str | None, tally: _Tally) -> None:
    """What a batch proved to be, when that is news: another client's, or a harvest."""
    if origin == BatchOrigin.FOREIGN:
        log.error(
            "batch_foreign",
            batch_id=api_batch_id,
            local_id=batch.local_id,
            candidate_for=batch.candidate_for,
            lines=tally.unmatched,
            advice="no line named a task of ours: another client uses this key (lines only"
            " counted); see docs/operations.md#one-key-one-batchd",
        )
    elif origin == BatchOrigin.PARTLY_OURS:
        log.error(
            "batch_partly_ours", batch_id=api_batch_id, local_id=batch.local_id,
            unmatched=tally.unmatched,
        )  # fmt: skip
    if batch.candidate_for is not None and origin != BatchOrigin.FOREIGN:
        log.warning(
            "duplicate_batch_harvested",
            batch_id=api_batch_id,
            candidate_for=batch.candidate_for,
            written=tally.written,
            duplicates=tally.duplicates,
        )


def _line_of(outcome: Outcome) -> str:
    """An unmatched line as kept: the API's line shape rebuilt from its parsed parts (the
    `result` as stored for every task), rather than holding every raw line of a chunk in
    memory for the rare line that matches no task."""
    custom_id = orjson.dumps(outcome.custom_id).decode()
    return f'{{"custom_id":{custom_id},"result":{outcome.result_json}}}'
