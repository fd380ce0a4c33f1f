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
from typing import Literal

import structlog

from batchd.api import (
    ApiError,
    ApiStatusError,
    AuthenticationError,
    BadRequestError,
    BatchesClient,
    CreateOutcomeUnknown,
    RateLimitError,
    RequestTooLargeError,
)
from batchd.api.wire import MessageBatch, parse_timestamp, request_total
from batchd.config import BatchingConfig
from batchd.crashpoints import crash_point
from batchd.domain import BatchRecord, BatchState, PendingTask
from batchd.money.budget import BudgetGate
from batchd.pipeline.chunker import Chunk, build_chunk, encode_request
from batchd.store import Store

log = structlog.get_logger("batchd.pipeline.submitter")

# Clocks of the API and of this machine may disagree: look this far either side.
_RECONCILE_SKEW = timedelta(minutes=5)
_LIST_PAGE_LIMIT = 100
_BAD_INDEX = re.compile(r"requests\.(\d+)\.")
# A 400 that names no request may be about the account, not the batch (a spend limit
# reached, a credit balance too low: spec §6.1). A lone request refused so is a suspect and
# the next create a control (another task, alone); a refused control is one more suspect,
# since bad requests may sit next to each other in the queue. This many different tasks
# refused alone in a row, with no create accepted, read as the account: creates pause
# this long, doubling each time, until one is accepted.
_MAX_SUSPECTS = 3
_REFUSAL_PAUSE_FIRST_S = 60.0
_REFUSAL_PAUSE_MAX_S = 900.0
# A create refused with 429 and no retry-after (the spend-cap 429 has none, §6.1): wait
# this long, doubling each time, until a create is accepted. A retry-after is honoured,
# but never below the floor: each attempt uploads the whole body again.
_RATE_LIMIT_FIRST_S = 5.0
_RATE_LIMIT_MAX_S = 300.0
_RETRY_AFTER_FLOOR_S = 1.0
_MAX_DOUBLINGS = 16  # keeps 2**n small; every wait is capped long before
# Suspects kept for a later verdict: a bound on memory only (each is dropped once it is
# accepted or blamed).
_SUSPECTS_KEPT = 64
_BODY_ENVELOPE_BYTES = len(b'{"requests":[]}')  # what the chunker adds around requests

# What a lone request refused by a create that names no request tells us.
_LoneVerdict = Literal["culprit", "control", "pause"]


class AuthenticationFailed(Exception):
    """The API refused our key: nothing more can be submitted until it is fixed."""


@dataclass(frozen=True, slots=True)
class _Suspect:
    """A lone request refused by a create that named no request (a 400, or a 413).

    The refusal alone proves nothing: the API refuses every create so while the account
    is (§6.1). Guilty when it is the only suspect and the control right after it is
    accepted, or when it is refused alone again after a create was accepted
    (`accepted_before` tells), creates not being paused.
    """

    task_id: int
    custom_id: str
    message: str  # the API's message
    reason: str  # what the task's `error` will say if it is blamed
    accepted_before: int  # creates accepted by this process before the refusal


@dataclass(frozen=True, slots=True)
class _Pick:
    """Which pending tasks the next chunk may take, oldest first."""

    max_requests: int
    only: int | None = None  # this task alone (a suspect retried)
    exclude: frozenset[int] = frozenset()  # suspects: a control must be another task
    after: int = 0  # tasks after this id only (the probe after a pause)


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
        # Lowered by a 413 on a batch of several; only ever a packing limit (see _next_chunk).
        self._max_bytes = config.max_bytes
        # Bisection after a 400 that names no request: batches are halved until the one
        # request the API refuses is alone (a suspect, see _Suspect). The cap is lifted
        # once a batch accepted reaches the end of the last refused one.
        self._max_requests_cap: int | None = None
        self._bisect_end: int | None = None  # the last task id of that refused batch
        self._suspects: dict[int, _Suspect] = {}  # task id ->, oldest first
        self._verify: list[int] = []  # suspects to retry alone, one create each
        self._accepted = 0  # creates accepted so far
        self._refusal_pauses = 0  # creates paused in a row for a refusal of everything
        self._probe_due = False  # the next create is the probe after such a pause
        self._probe_after = 0  # the task id the last lone refusal was about
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
        if self.budget is not None and self.budget.paused_reason is not None:
            limit = 1  # paused: only whether the oldest task fits now matters
        control, chunk = await self._choose_chunk(limit)
        try:
            if not chunk.task_ids:
                if control and await self._has_pending():
                    return self._no_control()
                self._pending_seen_at = None
                return SubmitResult()
            if not chunk.full and not self._linger_over():
                return SubmitResult(waiting=True)
            if self.budget is not None:
                # Priced on exactly the tasks the chunker took (invalid rows are already
                # marked and skipped): a batch never carries a request the budget did not
                # count. Cut to what fits, oldest first. Tasks at the head that alone pass
                # the whole limit are marked invalid: those admitted are the oldest pending.
                admission = await self.budget.admit(chunk.task_ids, chunk.custom_ids)
                if not admission.task_ids:
                    # The gate logs a pause; after a refusal, on at once to the tasks behind.
                    again_s = 0.0 if admission.refused else None
                    return SubmitResult(waiting=True, retry_after_s=again_s)
                if len(admission.task_ids) < len(chunk):
                    # Only a chunk of several: a suspect, control or probe is one task.
                    return await self._create_first(list(admission.task_ids))
            return await self._create(chunk)
        finally:
            chunk.body.close()

    async def _choose_chunk(self, limit: int) -> tuple[bool, Chunk]:
        """The next chunk, and whether it had to be a control (one task, not a suspect)."""
        while self._verify:
            chunk = await self._next_chunk(_Pick(1, only=self._verify[0]))
            if chunk.task_ids:
                return False, chunk
            chunk.body.close()
            self._verify.pop(0)  # no longer pending (canceled, say): nothing to retry
        suspects = frozenset(self._suspects)
        if self._probe_due:
            # The probe after a pause starts after the last task refused alone: a run of
            # bad requests longer than _MAX_SUSPECTS is walked through, a pause per
            # request, instead of the same ones being probed for ever. A suspect itself
            # only when no other task is pending.
            picks = (
                _Pick(1, exclude=suspects, after=self._probe_after),
                _Pick(1, exclude=suspects),
            )
            for pick in picks:
                chunk = await self._next_chunk(pick)
                if chunk.task_ids:
                    return False, chunk
                chunk.body.close()
            return False, await self._next_chunk(_Pick(1))
        if self._run() or self._refusal_pauses:
            return True, await self._next_chunk(_Pick(1, exclude=suspects))
        return False, await self._next_chunk(_Pick(limit))

    def _run(self) -> list[_Suspect]:
        """The suspects refused since the last create accepted, oldest first."""
        return [s for s in self._suspects.values() if s.accepted_before == self._accepted]

    def _forget(self, task_ids: list[int]) -> list[_Suspect]:
        """These tasks are judged (accepted, or invalid): the suspects among them, dropped."""
        if not self._suspects:
            return []  # the usual case: no set of a 100,000-request batch's ids
        judged = set(task_ids)
        dropped = [suspect for suspect in self._suspects.values() if suspect.task_id in judged]
        for suspect in dropped:
            del self._suspects[suspect.task_id]
        self._verify = [task_id for task_id in self._verify if task_id not in judged]
        return dropped

    async def _create_first(self, task_ids: list[int]) -> SubmitResult:
        """Send the oldest `task_ids` only (what the budget admits), if they still lead."""
        chunk = await self._next_chunk(_Pick(len(task_ids)))
        try:
            if chunk.task_ids != task_ids:
                return SubmitResult()  # the queue moved under us: price it again next step
            return await self._create(chunk)
        finally:
            chunk.body.close()

    async def _has_pending(self) -> bool:
        counts = await self._store.status_counts()
        return any(count for status, count in counts.items() if status == "pending")

    async def _next_chunk(self, pick: _Pick) -> Chunk:
        pending = self._store.iter_pending()
        rows: AsyncIterator[PendingTask] = pending
        layers: list[AsyncGenerator[PendingTask]] = []  # closed outermost first
        if pick.only is not None or pick.exclude or pick.after:
            picked = _picked(rows, pick)
            layers.append(picked)
            rows = picked
        too_big: list[PendingTask] = []
        if self._max_bytes < self._config.max_bytes:
            # A 413 taught us the server takes less than configured: that limit packs the
            # batches, but it is only a guess from one refused batch (halved), so it must
            # never be what marks a request invalid. A request over it goes alone, under
            # the configured limit, and the API's own answer to it decides.
            until = _until_larger_than(rows, self._max_bytes, too_big)
            layers.append(until)
            rows = until
        try:
            chunk = await build_chunk(
                rows, max_requests=pick.max_requests, max_bytes=self._max_bytes
            )
        finally:
            for layer in reversed(layers):
                await layer.aclose()
            await pending.aclose()  # type: ignore[attr-defined]
        if too_big:
            chunk = await self._too_big_alone(chunk, too_big[0])
        crash_point("chunk_built")
        if chunk.invalid:
            marked = await self._store.mark_invalid(chunk.invalid)
            log.warning("tasks_invalid", count=marked, first_reason=chunk.invalid[0][1])
        return chunk

    async def _too_big_alone(self, chunk: Chunk, task: PendingTask) -> Chunk:
        """`task` is over the learned byte limit: it goes alone, after the tasks before it."""
        if chunk.task_ids:
            chunk.full = True  # nothing more can join these: send them now
            return chunk
        chunk.body.close()
        alone = await build_chunk(_one(task), max_requests=1, max_bytes=self._config.max_bytes)
        alone.invalid[:0] = chunk.invalid
        return alone

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
        self._probe_due = False
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
        """Backoffs end; limits learned from refusals relax; suspects are judged."""
        self._rate_limited = 0
        paused, self._refusal_pauses = self._refusal_pauses, 0
        if paused:
            log.warning("creates_resumed", pauses=paused)
        for innocent in self._forget(chunk.task_ids):
            log.info("suspect_accepted", custom_id=innocent.custom_id, batch_id=batch_id)
        run = self._run()
        self._accepted += 1
        self._probe_after = 0
        self._relax_limits(chunk)
        if paused or not run:
            # After a pause the refusals were the account's: the suspects go out again in
            # full batches, and one refused alone again is blamed then.
            return
        if len(run) > 1:
            # Several refused in a row is also how a refusal of the account looks that
            # ended just before this control: each is retried alone before it is blamed.
            self._verify = [suspect.task_id for suspect in run]
            log.warning("suspects_retrying", custom_ids=[s.custom_id for s in run])
            return
        suspect = run[0]
        self._forget([suspect.task_id])
        await self._store.mark_invalid([(suspect.task_id, suspect.reason)])
        log.warning(
            "task_refused", custom_id=suspect.custom_id, error=suspect.message, control=batch_id
        )

    def _relax_limits(self, chunk: Chunk) -> None:
        """An accepted batch shows what the API takes: lift what refusals lowered."""
        if chunk.body.size > self._max_bytes:
            # A request over the learned limit went alone and was taken: the server takes
            # at least this much. Never raised further blindly: each try re-uploads a body
            # that may be hundreds of MB only to be refused again.
            self._max_bytes = chunk.body.size
            log.info("max_bytes_raised", max_bytes=self._max_bytes)
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
        invalid: list[tuple[str, str]] = []  # (custom_id, reason)
        judged: list[int] = []  # their task ids
        retry_after = exc.retry_after_s
        named = _BAD_INDEX.search(exc.message) if isinstance(exc, BadRequestError) else None
        names_nobody = isinstance(exc, RequestTooLargeError) or (
            isinstance(exc, BadRequestError) and named is None
        )
        verdict: _LoneVerdict | None = None
        if named is not None:
            index = int(named.group(1))
            if index < len(chunk.custom_ids):
                invalid.append((chunk.custom_ids[index], f"refused by the API: {exc.message}"))
                judged.append(chunk.task_ids[index])
        elif names_nobody and len(chunk) == 1:
            # Too large alone, or refused alone: the request, or every create (§6.1)?
            verdict = self._judge_lone_refusal(chunk, exc)
            if verdict == "culprit":
                invalid.append((chunk.custom_ids[0], _refusal_reason(exc, chunk)))
                judged.append(chunk.task_ids[0])
        elif isinstance(exc, RequestTooLargeError):
            # Our byte count is exact, so the server's limit is lower than this body.
            self._max_bytes = min(self._max_bytes, max(1024, chunk.body.size // 2))
            log.error("batch_too_large", body_bytes=chunk.body.size, new_max_bytes=self._max_bytes)
        await self._store.release_intent(local_id, f"create refused: {exc}", invalid)
        self._forget(judged)
        if isinstance(exc, AuthenticationError):
            log.error("authentication_failed", status=exc.status, error=exc.message)
            raise AuthenticationFailed(str(exc)) from exc
        if isinstance(exc, RateLimitError):
            wait = self._rate_limit_wait(retry_after)
            log.warning("batch_create_rate_limited", retry_after_s=retry_after, wait_s=wait)
            return SubmitResult(waiting=True, retry_after_s=wait)
        if invalid:
            log.warning("task_refused", custom_id=invalid[0][0], error=exc.message)
            return SubmitResult(waiting=True, retry_after_s=retry_after)  # at once
        if verdict == "control":
            return SubmitResult(waiting=True, retry_after_s=retry_after)  # at once
        if verdict == "pause":
            retry_after = self._pause_creates()
        elif names_nobody and isinstance(exc, BadRequestError):
            self._bisect(chunk, exc.message)
            return SubmitResult(waiting=True, retry_after_s=retry_after)  # at once
        else:
            log.error("batch_create_refused", status=exc.status, error=exc.message)
            retry_after = retry_after or 60.0
        return SubmitResult(waiting=True, retry_after_s=retry_after)

    def _bisect(self, chunk: Chunk, message: str) -> None:
        """A batch refused with a 400 naming no request: the next ones are half as big."""
        self._max_requests_cap = max(1, len(chunk) // 2)
        self._bisect_end = chunk.task_ids[-1]
        log.warning(
            "batch_refused_bisecting",
            count=len(chunk),
            next_count=self._max_requests_cap,
            error=message,
        )

    def _judge_lone_refusal(self, chunk: Chunk, exc: ApiStatusError) -> _LoneVerdict:
        """A lone request refused by a create that names no request: what it proves.

        Refused alone again after a create was accepted: the culprit. Otherwise it is a
        suspect and the next create a control, another task alone; but so many suspects
        in a row, or a refused probe after a pause, mean the account is refused (§6.1).
        """
        task_id, custom_id, message = chunk.task_ids[0], chunk.custom_ids[0], exc.message
        self._probe_after = task_id
        known = self._suspects.get(task_id)
        if self._refusal_pauses:
            # The probe after a pause: the account may still be refused, so this says
            # nothing about the request, which is never blamed now. A suspect is the
            # probe only when no other task is pending (the control that follows finds
            # none and pauses again); any other probe refused pauses longer.
            return "control" if known is not None else "pause"
        if known is not None and known.accepted_before < self._accepted:
            return "culprit"
        self._suspects[task_id] = _Suspect(
            task_id, custom_id, message, _refusal_reason(exc, chunk), self._accepted
        )
        while len(self._suspects) > _SUSPECTS_KEPT:
            del self._suspects[next(iter(self._suspects))]
        run = self._run()
        if len(run) < _MAX_SUSPECTS:
            log.warning("request_refused_alone", custom_id=custom_id, error=message)
            return "control"
        log.error(
            "creates_refused_not_about_requests",
            error=message,
            suspects=[suspect.custom_id for suspect in run],
            hint="an account setting (spend limit, credit balance)? nobody is blamed",
        )
        return "pause"

    def _no_control(self) -> SubmitResult:
        """No other task to test a lone refusal against: blame nobody, retry it later."""
        wait = self._pause_creates()
        log.warning(
            "refusal_unproven",
            custom_ids=[suspect.custom_id for suspect in self._run()],
            reason="no other pending task to send as a control",
            wait_s=wait,
        )
        return SubmitResult(waiting=True, retry_after_s=wait)

    def _pause_creates(self) -> float:
        """Hold creates, longer each time, until one is accepted; then one request each."""
        doublings = min(self._refusal_pauses, _MAX_DOUBLINGS)
        wait = min(_REFUSAL_PAUSE_FIRST_S * 2.0**doublings, _REFUSAL_PAUSE_MAX_S)
        self._refusal_pauses += 1
        self._probe_due = True
        self._max_requests_cap = None
        self._bisect_end = None
        if self._max_bytes < self._config.max_bytes:
            # Every create was refused, whatever its size: the 413s that lowered the
            # limit may have been that too (a proxy refusing everything), not a limit.
            self._max_bytes = self._config.max_bytes
            log.warning("max_bytes_restored", max_bytes=self._max_bytes)
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


async def _picked(pending: AsyncIterator[PendingTask], pick: _Pick) -> AsyncGenerator[PendingTask]:
    """The pending tasks `pick` allows, oldest first (pending comes in id order)."""
    async for task in pending:
        if pick.only is not None:
            if task.id == pick.only:
                yield task
            if task.id >= pick.only:
                return
        elif task.id > pick.after and task.id not in pick.exclude:
            yield task


async def _until_larger_than(
    rows: AsyncIterator[PendingTask], max_bytes: int, too_big: list[PendingTask]
) -> AsyncGenerator[PendingTask]:
    """`rows` up to the first whose request alone passes `max_bytes`, which goes in
    `too_big` instead of to the chunker."""
    async for task in rows:
        if _BODY_ENVELOPE_BYTES + len(encode_request(task)) > max_bytes:
            too_big.append(task)
            return
        yield task


async def _one(task: PendingTask) -> AsyncGenerator[PendingTask]:
    yield task


def _refusal_reason(exc: ApiStatusError, chunk: Chunk) -> str:
    """Why a lone request found to be the culprit is invalid, in the API's words."""
    if isinstance(exc, RequestTooLargeError):
        return f"refused by the API as too large ({chunk.body.size} bytes alone): {exc.message}"
    return f"refused by the API: {exc.message}"
