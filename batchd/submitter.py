"""Pending tasks ─► created batches: chunk, record the intent, create, reconcile.

The create call is not idempotent (spec §6.3, §8.3): the intent is committed before the
call and the batch id after it. A create whose outcome is unknown leaves the batch in
`creating`; `reconcile` then looks for it on the list endpoint before anything is sent
again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from batchd.budget import BudgetGate
from batchd.chunker import Chunk, build_chunk
from batchd.client import (
    ApiError,
    ApiStatusError,
    AuthenticationError,
    BadRequestError,
    BatchesClient,
    CreateOutcomeUnknown,
    RateLimitError,
    RequestTooLargeError,
)
from batchd.config import BatchingConfig
from batchd.crashpoints import crash_point
from batchd.domain import BatchRecord, BatchState
from batchd.store import Store
from batchd.wire import MessageBatch, parse_timestamp, request_total

log = structlog.get_logger("batchd.submitter")

# Clocks of the API and of this machine may disagree: look this far either side.
_RECONCILE_SKEW = timedelta(minutes=5)
_LIST_PAGE_LIMIT = 100
_BAD_INDEX = re.compile(r"requests\.(\d+)\.")


class AuthenticationFailed(Exception):
    """The API refused our key: nothing more can be submitted until it is fixed."""


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """What one submission step did, for the daemon's pacing."""

    created: int = 0  # batches created
    requests: int = 0  # requests in them
    waiting: bool = False  # tasks are pending but held back (linger, admission, backoff)
    retry_after_s: float | None = None


class Submitter:
    def __init__(
        self,
        store: Store,
        client: BatchesClient,
        config: BatchingConfig,
        *,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float],
        reconcile_grace_s: float,
        budget: BudgetGate | None = None,
    ) -> None:
        self.budget = budget  # None: no [budget] configured
        self._store = store
        self._client = client
        self._config = config
        self._clock = clock
        self._monotonic = monotonic
        self._reconcile_grace = timedelta(seconds=reconcile_grace_s)
        self._pending_seen_at: float | None = None
        # local_id -> when this process last knew that batch's create to be in flight.
        self._unknown_since: dict[int, datetime] = {}
        self._max_bytes = config.max_bytes
        # Bisection after a 400 that names no request: batches are halved until the one
        # request the API refuses is alone (then it is marked invalid).
        self._max_requests_cap: int | None = None
        self._last_single_refusal: str | None = None

    async def submit_once(self) -> SubmitResult:
        """Create at most one batch from the oldest pending tasks."""
        if self.budget is not None and await self.budget.pause_reason():
            return SubmitResult(waiting=True)  # the gate logs submission_paused_budget
        capacity = self._config.max_in_flight_requests - await self._store.in_flight_request_count()
        if capacity <= 0:
            return SubmitResult(waiting=await self._has_pending())
        limit = min(self._config.max_requests, capacity, self._max_requests_cap or capacity)
        chunk = await self._next_chunk(limit)
        try:
            if not chunk.task_ids:
                self._pending_seen_at = None
                return SubmitResult()
            if not chunk.full and not self._linger_over():
                return SubmitResult(waiting=True)
            return await self._create(chunk)
        finally:
            chunk.body.close()

    async def _has_pending(self) -> bool:
        counts = await self._store.status_counts()
        return any(count for status, count in counts.items() if status == "pending")

    async def _next_chunk(self, max_requests: int) -> Chunk:
        pending = self._store.iter_pending()
        try:
            chunk = await build_chunk(pending, max_requests=max_requests, max_bytes=self._max_bytes)
        finally:
            await pending.aclose()  # type: ignore[attr-defined]
        crash_point("chunk_built")
        if chunk.invalid:
            marked = await self._store.mark_invalid(chunk.invalid)
            log.warning("tasks_invalid", count=marked, first_reason=chunk.invalid[0][1])
        return chunk

    def _linger_over(self) -> bool:
        """A partly full batch waits `linger_s` for more tasks, then goes anyway."""
        now = self._monotonic()
        if self._pending_seen_at is None:
            self._pending_seen_at = now
        return now - self._pending_seen_at >= self._config.linger_s

    async def _create(self, chunk: Chunk) -> SubmitResult:
        local_id = await self._store.record_intent(chunk.task_ids, chunk.body.size)
        if local_id is None:
            log.info("intent_conflict", reason="a task changed while the batch was built")
            return SubmitResult(waiting=True)
        crash_point("intent_recorded")
        try:
            batch = await self._client.create(chunk.body)
        except CreateOutcomeUnknown as exc:
            self._unknown_since[local_id] = self._clock()
            log.warning("batch_create_unknown", local_id=local_id, error=str(exc))
            return SubmitResult(waiting=True)
        except ApiStatusError as exc:
            return await self._refused(local_id, chunk, exc)
        crash_point("create_returned")
        self._pending_seen_at = None
        self._last_single_refusal = None
        if not await self._store.mark_created(local_id, batch):
            # Our intent was released meanwhile (only another process could have done
            # it): these requests may be sent again, so this batch is kept on record.
            note = f"created for local batch {local_id} after its intent was released"
            await self._store.record_duplicate(local_id, batch["id"], note)
            log.error("duplicate_batch_suspected", batch_id=batch["id"], local_id=local_id)
            return SubmitResult(created=1, requests=len(chunk))
        crash_point("batch_recorded")
        log.info(
            "batch_created",
            batch_id=batch["id"],
            local_id=local_id,
            count=len(chunk),
            body_bytes=chunk.body.size,
        )
        return SubmitResult(created=1, requests=len(chunk))

    async def _refused(self, local_id: int, chunk: Chunk, exc: ApiStatusError) -> SubmitResult:
        """The API answered and created nothing: put the tasks back, maybe minus culprits."""
        invalid: list[tuple[str, str]] = []
        bisecting = False
        retry_after = exc.retry_after_s
        if isinstance(exc, BadRequestError) and (match := _BAD_INDEX.search(exc.message)):
            index = int(match.group(1))
            if index < len(chunk.custom_ids):
                invalid.append((chunk.custom_ids[index], f"refused by the API: {exc.message}"))
        elif isinstance(exc, BadRequestError) and self._bisect(chunk, exc.message):
            bisecting = len(chunk) > 1
            if not bisecting:
                invalid.append((chunk.custom_ids[0], f"refused by the API: {exc.message}"))
        elif isinstance(exc, RequestTooLargeError):
            # Our byte count is exact, so the server's limit is lower than configured.
            self._max_bytes = max(1024, chunk.body.size // 2)
            log.error("batch_too_large", body_bytes=chunk.body.size, new_max_bytes=self._max_bytes)
        await self._store.release_intent(local_id, f"create refused: {exc}", invalid)
        if isinstance(exc, AuthenticationError):
            log.error("authentication_failed", status=exc.status, error=exc.message)
            raise AuthenticationFailed(str(exc)) from exc
        if isinstance(exc, RateLimitError):
            log.warning("batch_create_rate_limited", retry_after_s=retry_after)
        elif bisecting:
            pass  # the next, smaller batch goes at once
        elif not invalid:
            log.error("batch_create_refused", status=exc.status, error=exc.message)
            retry_after = retry_after or 60.0
        else:
            log.warning("task_refused", custom_id=invalid[0][0], error=exc.message)
        return SubmitResult(waiting=True, retry_after_s=retry_after)

    def _bisect(self, chunk: Chunk, message: str) -> bool:
        """Halve the next batches to find the request a whole-batch 400 is about.

        False when bisection cannot help: the same refusal of two lone requests in a row
        means the problem is not in the requests (a header, an account setting), so they
        go back to pending and submission waits, loudly, instead of failing every task.
        """
        if len(chunk) > 1:
            self._max_requests_cap = max(1, len(chunk) // 2)
            log.warning(
                "batch_refused_bisecting",
                count=len(chunk),
                next_count=self._max_requests_cap,
                error=message,
            )
            return True
        if message == self._last_single_refusal:
            self._max_requests_cap = self._last_single_refusal = None
            return False
        self._max_requests_cap = None  # culprit found: full batches again
        self._last_single_refusal = message
        return True

    async def reconcile(self, batch: BatchRecord) -> None:
        """Decide what became of a create whose answer we never saw (design step 4)."""
        now = self._clock()
        # The grace runs from when the create stopped being in flight, not from the intent:
        # a create may last far longer than the grace (its timeout allows for a 256 MB
        # upload) and land at its very end. A batch found at start-up may have been in
        # flight when the last process died, so its grace starts now.
        unknown_since = self._unknown_since.setdefault(batch.local_id, now)
        candidates = await self._matching_api_batches(batch, now)
        if candidates:
            del self._unknown_since[batch.local_id]
            adopted, *others = sorted(candidates, key=lambda b: b["created_at"])
            crash_point("reconcile_matched")
            await self._store.mark_created(batch.local_id, adopted)
            log.warning("batch_adopted", batch_id=adopted["id"], local_id=batch.local_id)
            for other in others:
                note = f"same request count created in the window of local batch {batch.local_id}"
                await self._store.record_duplicate(batch.local_id, other["id"], note)
                log.error(
                    "duplicate_batch_suspected", batch_id=other["id"], local_id=batch.local_id
                )
            return
        if now - unknown_since < self._reconcile_grace:
            return
        del self._unknown_since[batch.local_id]
        await self._store.release_intent(
            batch.local_id, "create outcome unknown and no such batch on the API: resubmitting"
        )
        log.warning("batch_resubmitting", local_id=batch.local_id, count=batch.request_count)

    async def _matching_api_batches(self, batch: BatchRecord, now: datetime) -> list[MessageBatch]:
        """Batches on the API created in the intent window with our request count."""
        known = await self._store.known_api_batch_ids()
        earliest = batch.intent_at - _RECONCILE_SKEW
        latest = now + _RECONCILE_SKEW
        found: list[MessageBatch] = []
        after_id: str | None = None
        while True:
            page = await self._client.list_page(limit=_LIST_PAGE_LIMIT, after_id=after_id)
            for candidate in page["data"]:
                created = parse_timestamp(candidate["created_at"])
                if created < earliest:
                    return found  # newest first: nothing older can match
                if (
                    created <= latest
                    and candidate["id"] not in known
                    and request_total(candidate["request_counts"]) == batch.request_count
                ):
                    found.append(candidate)
            if not page["has_more"] or page["last_id"] is None:
                return found
            after_id = page["last_id"]

    async def cancel_requested(self) -> None:
        """Cancel batches in which every task still waiting was canceled by the user."""
        for batch in await self._store.batches_to_cancel():
            if batch.api_batch_id is None:
                continue
            try:
                await self._client.cancel(batch.api_batch_id)
            except AuthenticationError:
                raise
            except ApiError as exc:
                log.warning("batch_cancel_failed", batch_id=batch.api_batch_id, error=str(exc))
                continue
            await self._store.mark_canceling(batch.local_id)
            log.info("batch_canceling", batch_id=batch.api_batch_id)

    async def creating_batches(self) -> list[BatchRecord]:
        return await self._store.batches_in(BatchState.CREATING)
