"""Ended batches ─► results streamed, parsed and written back in chunked transactions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from batchd.client import ApiError, AuthenticationError, BatchesClient, NotFoundError
from batchd.config import ResultsConfig
from batchd.crashpoints import crash_point
from batchd.domain import BatchRecord, BatchState, Outcome
from batchd.metrics import RESULTS_WRITTEN, Registry
from batchd.outcomes import MalformedResultLine, parse_result_line
from batchd.store import Store, StoreAccounts
from batchd.wire import RESULTS_RETENTION_DAYS

log = structlog.get_logger("batchd.collector")

# Warn loudly when results of an unfinished download are this close to being archived.
_RETENTION_WARNING = timedelta(days=RESULTS_RETENTION_DAYS - 2)


@dataclass(slots=True)
class _Tally:
    lines: int = 0
    written: int = 0
    requeued: int = 0
    ignored: int = 0
    unmatched: int = 0


class Collector:
    def __init__(
        self,
        store: Store,
        client: BatchesClient,
        config: ResultsConfig,
        *,
        max_attempts: int,
        clock: Callable[[], datetime],
        registry: Registry | None = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self._client = client
        self._config = config
        self._max_attempts = max_attempts
        self._clock = clock

    async def collect_all(self) -> int:
        """Write back the results of every ended batch; returns how many were finished."""
        finished = 0
        for batch in await self._store.batches_in(BatchState.ENDED):
            try:
                if await self._collect(batch):
                    finished += 1
            except AuthenticationError:
                raise  # not a download fault: counting it would only burn attempts
            except ApiError as exc:
                await self._download_failed(batch, str(exc))
        return finished

    async def _collect(self, batch: BatchRecord) -> bool:
        assert batch.api_batch_id is not None
        self._warn_if_near_archival(batch)
        if batch.results_url is None:
            await self._download_failed(batch, "ended without a results_url")
            return False
        try:
            tally = await self._stream(batch, batch.api_batch_id, batch.results_url)
        except NotFoundError as exc:
            # Spec §7.6: transient 404s right after the end; retried a bounded number of times.
            await self._download_failed(batch, f"results not found: {exc}")
            return False
        if tally.lines < batch.request_count:
            # Fewer lines than requests means a cut-off stream, never "missing": requeuing
            # them would pay twice for results that exist.
            note = f"results stream held {tally.lines} of {batch.request_count} lines"
            if await self._download_failed(batch, note) < self._config.max_download_attempts:
                return False
        reason = f"no result line for this request in batch {batch.api_batch_id}"
        crash_point("results_streamed")
        report = await self._store.finish_batch(batch.local_id, reason)
        crash_point("batch_finished")
        if report.missing_requeued:
            await StoreAccounts(self._store).keep_missing(
                batch.api_batch_id, report.missing_requeued
            )
            log.error(
                "results_missing",
                batch_id=batch.api_batch_id,
                count=len(report.missing_requeued),
                first=report.missing_requeued[0],
            )
        log.info(
            "results_written",
            batch_id=batch.api_batch_id,
            lines=tally.lines,
            written=tally.written,
            requeued=tally.requeued,
            ignored=tally.ignored,
            unmatched=tally.unmatched,
        )
        return True

    async def _stream(self, batch: BatchRecord, api_batch_id: str, url: str) -> _Tally:
        tally = _Tally()
        outcomes: list[Outcome] = []
        lines: dict[str, str] = {}
        async with self._client.results(
            url, batch_id=api_batch_id, max_line_bytes=self._config.max_line_bytes
        ) as stream:
            async for line in stream:
                crash_point("result_line_read")
                tally.lines += 1
                try:
                    outcome = parse_result_line(line)
                except MalformedResultLine as exc:
                    # An expected data problem, not a crash: no traceback wanted.
                    log.error("result_line_malformed", batch_id=api_batch_id, error=str(exc))  # noqa: TRY400
                    await self._store.keep_unmatched(
                        api_batch_id,
                        [(f"malformed-line-{tally.lines}", line.decode(errors="replace"))],
                    )
                    continue
                outcomes.append(outcome)
                lines[outcome.custom_id] = line.decode()
                if len(outcomes) >= self._config.chunk_size:
                    await self._write(batch, api_batch_id, outcomes, lines, tally)
                    outcomes, lines = [], {}
        if outcomes:
            await self._write(batch, api_batch_id, outcomes, lines, tally)
        return tally

    async def _write(
        self,
        batch: BatchRecord,
        api_batch_id: str,
        outcomes: list[Outcome],
        lines: dict[str, str],
        tally: _Tally,
    ) -> None:
        report = await self._store.write_results(batch.local_id, outcomes, self._max_attempts)
        crash_point("results_chunk_written")
        tally.written += report.written
        tally.requeued += report.requeued
        tally.ignored += report.ignored
        if self._registry is not None:
            for outcome, count in (
                ("written", report.written),
                ("requeued", report.requeued),
                ("ignored", report.ignored),
                ("unmatched", len(report.unmatched)),
            ):
                self._registry.inc(RESULTS_WRITTEN, count, outcome=outcome)
        if report.unmatched:
            tally.unmatched += len(report.unmatched)
            await self._store.keep_unmatched(
                api_batch_id, [(custom_id, lines[custom_id]) for custom_id in report.unmatched]
            )
            log.error(
                "results_unmatched",
                batch_id=api_batch_id,
                count=len(report.unmatched),
                first=report.unmatched[0],
            )

    async def _download_failed(self, batch: BatchRecord, note: str) -> int:
        attempts = await self._store.note_download_failed(batch.local_id, note)
        log.warning(
            "results_download_failed", batch_id=batch.api_batch_id, attempts=attempts, error=note
        )
        return attempts

    def _warn_if_near_archival(self, batch: BatchRecord) -> None:
        created = batch.api_created_at or batch.intent_at
        if self._clock() - created >= _RETENTION_WARNING:
            log.error(
                "results_near_archival", batch_id=batch.api_batch_id, created_at=created.isoformat()
            )
