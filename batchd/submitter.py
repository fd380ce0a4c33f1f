"""Pending tasks ─► created batches: chunk, record the intent, create, reconcile.

The create call is not idempotent (spec §6.3, §8.3): the intent is committed before the
call and the batch id after it. A create whose outcome is unknown leaves the batch in
`creating`; `reconcile` then looks for it on the list endpoint before anything is sent
again.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
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
from batchd.domain import BatchRecord, BatchState, PendingTask
from batchd.store import Store
from batchd.wire import MessageBatch, parse_timestamp, request_total

log = structlog.get_logger("batchd.submitter")

# Clocks of the API and of this machine may disagree: look this far either side.
_RECONCILE_SKEW = timedelta(minutes=5)
_LIST_PAGE_LIMIT = 100
_BAD_INDEX = re.compile(r"requests\.(\d+)\.")
# A 400 that names no request may be about the account, not the batch (a spend limit
# reached, a credit balance too low: spec §6.1). When a lone request and then a control
# (another task, alone) are both refused so, creates pause this long, doubling each time,
# until one is accepted.
_REFUSAL_PAUSE_FIRST_S = 60.0
_REFUSAL_PAUSE_MAX_S = 900.0
# A create refused with 429 and no retry-after (the spend-cap 429 has none, §6.1): wait
# this long, doubling each time, until a create is accepted. A retry-after is honoured,
# but never below the floor: each attempt uploads the whole body again.
_RATE_LIMIT_FIRST_S = 5.0
_RATE_LIMIT_MAX_S = 300.0
_RETRY_AFTER_FLOOR_S = 1.0
_MAX_DOUBLINGS = 16  # keeps 2**n small; every wait is capped long before


class AuthenticationFailed(Exception):
    """The API refused our key: nothing more can be submitted until it is fixed."""


@dataclass(frozen=True, slots=True)
class _Suspect:
    """A lone request refused with a 400 naming no request: guilty once a control passes."""

    task_id: int
    custom_id: str
    message: str


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
        # request the API refuses is alone. It is marked invalid only once a control (the
        # next task, alone) is accepted; a refused control means the account is refused.
        # The cap is lifted once a batch accepted reaches the end of the last refused one.
        self._max_requests_cap: int | None = None
        self._bisect_end: int | None = None  # the last task id of that refused batch
        self._suspect: _Suspect | None = None
        self._refusal_pauses = 0  # creates paused in a row for a refusal of everything
        self._rate_limited = 0  # creates refused with 429 in a row
        # No create before this monotonic time (a pause, a 429 backoff): the daemon's
        # wait may be cut short when a batch ends, this may not.
        self._hold_until: float | None = None

    async def submit_once(self) -> SubmitResult:
        """Create at most one batch from the oldest pending tasks."""
        if (held_s := self._held_s()) is not None:
            return SubmitResult(waiting=True, retry_after_s=held_s)
        capacity = self._config.max_in_flight_requests - await self._store.in_flight_request_count()
        if capacity <= 0:
            return SubmitResult(waiting=await self._has_pending())
        limit = min(self._config.max_requests, capacity, self._max_requests_cap or capacity)
        if self._suspect is not None or self._refusal_pauses:
            limit = 1  # a control, or a probe after a pause: one small request is enough
        if self.budget is not None and self.budget.paused_reason is not None:
            limit = 1  # paused: only whether the oldest task fits now matters
        skip = self._suspect.task_id if self._suspect is not None else None
        chunk = await self._next_chunk(limit, skip=skip)
        try:
            if not chunk.task_ids:
                if self._suspect is not None:
                    return self._no_control(self._suspect)
                self._pending_seen_at = None
                return SubmitResult()
            if not chunk.full and not self._linger_over():
                return SubmitResult(waiting=True)
            if self.budget is not None:
                # Priced on exactly the tasks the chunker took (invalid rows are already
                # marked and skipped): a batch never carries a request the budget did not
                # count. Cut to what fits, oldest first.
                admitted = await self.budget.admit(chunk.task_ids)
                if admitted == 0:
                    return SubmitResult(waiting=True)  # the gate logs the pause
                if admitted < len(chunk):
                    return await self._create_first(chunk.task_ids[:admitted], skip)
            return await self._create(chunk)
        finally:
            chunk.body.close()

    async def _create_first(self, task_ids: list[int], skip: int | None) -> SubmitResult:
        """Send the oldest `task_ids` only (what the budget admits), if they still lead."""
        chunk = await self._next_chunk(len(task_ids), skip=skip)
        try:
            if chunk.task_ids != task_ids:
                return SubmitResult()  # the queue moved under us: price it again next step
            return await self._create(chunk)
        finally:
            chunk.body.close()

    async def _has_pending(self) -> bool:
        counts = await self._store.status_counts()
        return any(count for status, count in counts.items() if status == "pending")

    async def _next_chunk(self, max_requests: int, *, skip: int | None = None) -> Chunk:
        pending = self._store.iter_pending()
        rows = pending if skip is None else _without(pending, skip)
        try:
            chunk = await build_chunk(rows, max_requests=max_requests, max_bytes=self._max_bytes)
        finally:
            if rows is not pending:
                await rows.aclose()  # type: ignore[attr-defined]
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
        if not await self._store.mark_created(local_id, batch):
            # Our intent was released meanwhile (only another process could have done
            # it): these requests may be sent again; the store kept this batch on record.
            log.error("duplicate_batch_suspected", batch_id=batch["id"], local_id=local_id)
        else:
            crash_point("batch_recorded")
            log.info(
                "batch_created",
                batch_id=batch["id"],
                local_id=local_id,
                count=len(chunk),
                body_bytes=chunk.body.size,
            )
        await self._create_accepted(batch["id"], chunk)
        return SubmitResult(created=1, requests=len(chunk))

    async def _create_accepted(self, batch_id: str, chunk: Chunk) -> None:
        """Backoffs end; a suspect whose control was just accepted is the culprit."""
        self._rate_limited = 0
        if self._refusal_pauses:
            log.warning("creates_resumed", pauses=self._refusal_pauses)
            self._refusal_pauses = 0
        self._relax_limits(chunk)
        suspect, self._suspect = self._suspect, None
        if suspect is None:
            return
        self._max_requests_cap = None  # culprit found: full batches again
        reason = f"refused by the API: {suspect.message}"
        await self._store.mark_invalid([(suspect.task_id, reason)])
        log.warning(
            "task_refused", custom_id=suspect.custom_id, error=suspect.message, control=batch_id
        )

    def _relax_limits(self, chunk: Chunk) -> None:
        """An accepted batch shows what the API takes: lift what refusals lowered."""
        if self._bisect_end is not None and chunk.task_ids[-1] >= self._bisect_end:
            # Past the end of the last refused batch: every request of it was taken or
            # isolated, so the refusal is behind us and full batches are safe again.
            # Lifting at the first half accepted would send the refused half again at
            # full size, uploading it once more for every halving.
            self._bisect_end = None
            if self._max_requests_cap is not None:
                self._max_requests_cap = None
                log.info("bisection_done", max_requests=self._config.max_requests)

    async def _refused(self, local_id: int, chunk: Chunk, exc: ApiStatusError) -> SubmitResult:
        """The API answered and created nothing: put the tasks back, maybe minus culprits."""
        invalid: list[tuple[str, str]] = []
        named = None
        retry_after = exc.retry_after_s
        if isinstance(exc, BadRequestError) and (named := _BAD_INDEX.search(exc.message)):
            index = int(named.group(1))
            if index < len(chunk.custom_ids):
                invalid.append((chunk.custom_ids[index], f"refused by the API: {exc.message}"))
        elif isinstance(exc, RequestTooLargeError):
            # Our byte count is exact, so the server's limit is lower than configured.
            self._max_bytes = max(1024, chunk.body.size // 2)
            log.error("batch_too_large", body_bytes=chunk.body.size, new_max_bytes=self._max_bytes)
        await self._store.release_intent(local_id, f"create refused: {exc}", invalid)
        if isinstance(exc, AuthenticationError):
            log.error("authentication_failed", status=exc.status, error=exc.message)
            raise AuthenticationFailed(str(exc)) from exc
        if isinstance(exc, RateLimitError):
            wait = self._rate_limit_wait(retry_after)
            log.warning("batch_create_rate_limited", retry_after_s=retry_after, wait_s=wait)
            return SubmitResult(waiting=True, retry_after_s=wait)
        if invalid:
            log.warning("task_refused", custom_id=invalid[0][0], error=exc.message)
        elif isinstance(exc, BadRequestError) and named is None:
            if self._unnamed_refusal(chunk, exc.message):
                return SubmitResult(waiting=True, retry_after_s=retry_after)  # at once
            retry_after = self._pause_creates()
        else:
            log.error("batch_create_refused", status=exc.status, error=exc.message)
            retry_after = retry_after or 60.0
        return SubmitResult(waiting=True, retry_after_s=retry_after)

    def _unnamed_refusal(self, chunk: Chunk, message: str) -> bool:
        """Narrow down a 400 that names no request; False when it is not about any request.

        The batch is halved until one refused request is alone. That request is only a
        suspect: the next create is a control, another task alone. The API may refuse
        every create this way (a spend limit, a low credit balance: spec §6.1), and then
        the control is refused too: nobody is blamed and creates pause.
        """
        if len(chunk) > 1:
            self._max_requests_cap = max(1, len(chunk) // 2)
            self._bisect_end = chunk.task_ids[-1]
            log.warning(
                "batch_refused_bisecting",
                count=len(chunk),
                next_count=self._max_requests_cap,
                error=message,
            )
            return True
        suspect = self._suspect
        if suspect is None:
            self._suspect = _Suspect(chunk.task_ids[0], chunk.custom_ids[0], message)
            log.warning("request_refused_alone", custom_id=chunk.custom_ids[0], error=message)
            return True
        self._suspect = None
        log.error(
            "creates_refused_not_about_requests",
            error=message,
            suspect=suspect.custom_id,
            suspect_error=suspect.message,
            control=chunk.custom_ids[0],
            hint="an account setting (spend limit, credit balance)? nobody is blamed",
        )
        return False

    def _no_control(self, suspect: _Suspect) -> SubmitResult:
        """No other task to test a lone refusal against: blame nobody, retry it later."""
        self._suspect = None
        wait = self._pause_creates()
        log.warning(
            "refusal_unproven",
            custom_id=suspect.custom_id,
            error=suspect.message,
            reason="no other pending task to send as a control",
            wait_s=wait,
        )
        return SubmitResult(waiting=True, retry_after_s=wait)

    def _pause_creates(self) -> float:
        """Hold creates, longer each time, until one is accepted; then one request each."""
        doublings = min(self._refusal_pauses, _MAX_DOUBLINGS)
        wait = min(_REFUSAL_PAUSE_FIRST_S * 2.0**doublings, _REFUSAL_PAUSE_MAX_S)
        self._refusal_pauses += 1
        self._max_requests_cap = None
        self._bisect_end = None
        self._hold(wait)
        log.error("creates_paused", wait_s=wait, pauses=self._refusal_pauses)
        return wait

    def _rate_limit_wait(self, retry_after_s: float | None) -> float:
        """How long to hold creates after a 429: the API's wait, or a growing one."""
        doublings = min(self._rate_limited, _MAX_DOUBLINGS)
        self._rate_limited += 1
        if retry_after_s:  # the API's wait, but never a re-upload many times a second
            wait = max(retry_after_s, _RETRY_AFTER_FLOOR_S)
        else:
            wait = min(_RATE_LIMIT_FIRST_S * 2.0**doublings, _RATE_LIMIT_MAX_S)
        self._hold(wait)
        return wait

    def _hold(self, wait_s: float) -> None:
        self._hold_until = self._monotonic() + wait_s

    def _held_s(self) -> float | None:
        """Seconds left before creates may resume, or None."""
        if self._hold_until is None:
            return None
        left = self._hold_until - self._monotonic()
        if left <= 0:
            self._hold_until = None
            return None
        return left

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
            await self._store.mark_created(
                batch.local_id, adopted, [other["id"] for other in others]
            )
            log.warning("batch_adopted", batch_id=adopted["id"], local_id=batch.local_id)
            for other in others:
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


async def _without(
    pending: AsyncIterator[PendingTask], task_id: int
) -> AsyncGenerator[PendingTask]:
    """The pending tasks but one (the suspect a control is sent without)."""
    async for task in pending:
        if task.id != task_id:
            yield task
