"""Pending tasks ─► created batches: choose a chunk, record the intent, create.

The create call is not idempotent (spec §6.3, §8.3): the intent is committed before the
call and the batch id after it. A create whose outcome is unknown leaves the batch in
`creating`; the reconciler (`reconcile.py`) then looks for it on the list endpoint before
anything is sent again. What refused creates prove, and the waits and limits they impose,
is the refusal state machine's (`refusals.py`), which this module drives.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from batchd.api import (
    ApiStatusError,
    AuthenticationError,
    BatchesClient,
    CreateNotSent,
    CreateOutcomeUnknown,
)
from batchd.config import BatchingConfig
from batchd.crashpoints import crash_point
from batchd.domain import PendingTask, TaskStatus
from batchd.money.budget import BudgetGate
from batchd.pipeline.chunker import Chunk, build_chunk, encode_request
from batchd.pipeline.reconcile import Reconciler
from batchd.pipeline.refusals import Pick, Refusals
from batchd.store import Store

log = structlog.get_logger("batchd.pipeline.submitter")

_BODY_ENVELOPE_BYTES = len(b'{"requests":[]}')  # what the chunker adds around requests


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
        reconciler: Reconciler,
        monotonic: Callable[[], float],
        budget: BudgetGate | None = None,
    ) -> None:
        self.budget = budget  # None: no [budget] configured
        self._store = store
        self._client = client
        self._config = config
        self._reconciler = reconciler  # told of every create whose outcome is unknown
        self._monotonic = monotonic
        self._pending_seen_at: float | None = None
        self._refusals = Refusals(config, monotonic=monotonic)

    async def submit_once(self) -> SubmitResult:
        """Create at most one batch from the oldest pending tasks."""
        if (held_s := self._refusals.held_s()) is not None:
            return SubmitResult(waiting=True, retry_after_s=held_s)
        capacity = self._config.max_in_flight_requests - await self._store.in_flight_request_count()
        if capacity <= 0:
            return SubmitResult(waiting=await self._has_pending())
        cap = self._refusals.max_requests_cap
        limit = min(self._config.max_requests, capacity, cap or capacity)
        if self.budget is not None and self.budget.paused_reason is not None:
            limit = 1  # paused: only whether the oldest task fits now matters
        control, chunk = await self._choose_chunk(limit)
        try:
            if not chunk.task_ids:
                if control and await self._has_pending():
                    wait = self._refusals.no_control()
                    return SubmitResult(waiting=True, retry_after_s=wait)
                self._pending_seen_at = None
                return SubmitResult()
            if not chunk.full and not self._linger_over():
                return SubmitResult(waiting=True)
            if self.budget is not None:
                # Priced on exactly the tasks the chunker took (invalid rows are already
                # marked and skipped): a batch never carries a request the budget did not
                # count. Cut to what fits, oldest first. Tasks at the head that alone pass
                # the whole limit are marked invalid: those admitted are the oldest pending.
                admission = await self.budget.admit(
                    chunk.task_ids, chunk.custom_ids, chunk.versions
                )
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
        while (suspect := self._refusals.suspect_to_retry()) is not None:
            chunk = await self._next_chunk(Pick(1, only=suspect))
            if chunk.task_ids:
                return False, chunk
            chunk.body.close()
            self._refusals.retry_dropped(suspect)
        plan = self._refusals.plan(limit)
        *first, last = plan.picks
        for pick in first:
            chunk = await self._next_chunk(pick)
            if chunk.task_ids:
                return False, chunk
            chunk.body.close()
        return plan.control, await self._next_chunk(last)

    async def _create_first(self, task_ids: list[int]) -> SubmitResult:
        """Send the oldest `task_ids` only (what the budget admits), if they still lead."""
        chunk = await self._next_chunk(Pick(len(task_ids)))
        try:
            if chunk.task_ids != task_ids:
                return SubmitResult()  # the queue moved under us: price it again next step
            return await self._create(chunk)
        finally:
            chunk.body.close()

    async def _has_pending(self) -> bool:
        return await self._store.has_tasks(TaskStatus.PENDING)  # one index entry, not a count

    async def _next_chunk(self, pick: Pick) -> Chunk:
        pending = self._store.iter_pending()
        rows: AsyncIterator[PendingTask] = pending
        layers: list[AsyncGenerator[PendingTask]] = []  # closed outermost first
        if pick.only is not None or pick.exclude or pick.after:
            picked = _picked(rows, pick)
            layers.append(picked)
            rows = picked
        too_big: list[PendingTask] = []
        if self._refusals.max_bytes < self._config.max_bytes:
            # A 413 taught us the server takes less than configured: that limit packs the
            # batches, but it is only a guess from one refused batch (halved), so it must
            # never be what marks a request invalid. A request over it goes alone, under
            # the configured limit, and the API's own answer to it decides.
            until = _until_larger_than(rows, self._refusals.max_bytes, too_big)
            layers.append(until)
            rows = until
        try:
            chunk = await build_chunk(
                rows, max_requests=pick.max_requests, max_bytes=self._refusals.max_bytes
            )
        finally:
            for layer in reversed(layers):
                await layer.aclose()
            await pending.aclose()  # type: ignore[attr-defined]
        try:
            if too_big:
                chunk = await self._too_big_alone(chunk, too_big[0])
            crash_point("chunk_built")
            if chunk.invalid:
                marked = await self._store.mark_invalid(chunk.invalid, chunk.invalid_versions)
                log.warning("tasks_invalid", count=marked, first_reason=chunk.invalid[0][1])
        except BaseException:
            chunk.body.close()  # the caller never sees this chunk to close it
            raise
        return chunk

    async def _too_big_alone(self, chunk: Chunk, task: PendingTask) -> Chunk:
        """`task` is over the learned byte limit: it goes alone, after the tasks before it."""
        if chunk.task_ids:
            chunk.full = True  # nothing more can join these: send them now
            return chunk
        chunk.body.close()
        alone = await build_chunk(_one(task), max_requests=1, max_bytes=self._config.max_bytes)
        alone.invalid[:0] = chunk.invalid
        alone.invalid_versions[:0] = chunk.invalid_versions
        return alone

    def _linger_over(self) -> bool:
        """A partly full batch waits `linger_s` for more tasks, then goes anyway."""
        now = self._monotonic()
        if self._pending_seen_at is None:
            self._pending_seen_at = now
        return now - self._pending_seen_at >= self._config.linger_s

    async def _create(self, chunk: Chunk) -> SubmitResult:
        local_id = await self._store.record_intent(chunk.task_ids, chunk.body.size, chunk.versions)
        if local_id is None:
            log.info("intent_conflict", reason="a task changed while the batch was built")
            return SubmitResult(waiting=True)
        crash_point("intent_recorded")
        self._refusals.create_sent()
        try:
            batch = await self._client.create(chunk.body)
        except CreateNotSent as exc:
            # The connection never opened: no batch can exist, so nothing to reconcile or
            # watch for; the tasks go back now, and creates wait for the API a while.
            await self._store.release_intent(local_id, f"create not sent: {exc.cause}")
            wait = self._refusals.create_not_sent()
            log.warning("batch_create_not_sent", local_id=local_id, error=str(exc), wait_s=wait)
            return SubmitResult(waiting=True, retry_after_s=wait)
        except CreateOutcomeUnknown as exc:
            self._reconciler.create_unknown(local_id)
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
        """The refusal state learns of it; a suspect the control proves guilty is marked."""
        culprit = self._refusals.create_accepted(batch_id, chunk)
        if culprit is None:
            return
        await self._store.mark_invalid([(culprit.task_id, culprit.reason)], [culprit.version])
        log.warning(
            "task_refused", custom_id=culprit.custom_id, error=culprit.message, control=batch_id
        )

    async def _refused(self, local_id: int, chunk: Chunk, exc: ApiStatusError) -> SubmitResult:
        """The API answered and created nothing: put the tasks back, maybe minus culprits."""
        diagnosis = self._refusals.diagnose(chunk, exc)
        await self._store.release_intent(local_id, f"create refused: {exc}", diagnosis.invalid)
        if isinstance(exc, AuthenticationError):
            log.error("authentication_failed", status=exc.status, error=exc.message)
            raise AuthenticationFailed(str(exc)) from exc
        return SubmitResult(waiting=True, retry_after_s=self._refusals.put_back(chunk, diagnosis))


async def _picked(pending: AsyncIterator[PendingTask], pick: Pick) -> AsyncGenerator[PendingTask]:
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
