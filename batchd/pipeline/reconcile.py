"""A create whose answer was never seen ─► adopted from the API's list, or released (design step 4).

The create call is not idempotent (spec §6.3, §8.3): a batch left `creating` may exist on
the API or not. It is looked for on the list endpoint (created in the intent window, with
our request count, not already recorded): one found is adopted, more than one are the
oldest adopted and the others recorded as duplicates; none, and the grace has passed since
the create stopped being in flight, the intent is released and its tasks go out again.

The submitter tells `create_unknown` when a create's outcome is lost; the daemon calls
`reconcile` for each `creating` batch before anything else is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from batchd.api import BatchesClient
from batchd.api.wire import MessageBatch, parse_timestamp, request_total
from batchd.config import BatchingConfig
from batchd.crashpoints import crash_point
from batchd.domain import BatchRecord, BatchState
from batchd.store import Store

log = structlog.get_logger("batchd.pipeline.reconcile")

# Clocks of the API and of this machine may disagree: look this far either side.
_RECONCILE_SKEW = timedelta(minutes=5)
_LIST_PAGE_LIMIT = 100


class Reconciler:
    """Decides what became of creates whose outcome is unknown, one `creating` batch at a time."""

    def __init__(
        self,
        store: Store,
        client: BatchesClient,
        config: BatchingConfig,
        *,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._client = client
        self._clock = clock
        self._grace = timedelta(seconds=config.reconcile_grace_s)
        # local_id -> when this process last knew that batch's create to be in flight.
        self._unknown_since: dict[int, datetime] = {}

    def create_unknown(self, local_id: int) -> None:
        """The create of this batch just ended with no answer: its grace starts now."""
        self._unknown_since[local_id] = self._clock()

    async def creating_batches(self) -> list[BatchRecord]:
        """Batches whose create's outcome is not known yet."""
        return await self._store.batches_in(BatchState.CREATING)

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
            await self._adopt(batch, candidates)
            return
        if now - unknown_since < self._grace:
            return
        del self._unknown_since[batch.local_id]
        await self._store.release_intent(
            batch.local_id, "create outcome unknown and no such batch on the API: resubmitting"
        )
        log.warning("batch_resubmitting", local_id=batch.local_id, count=batch.request_count)

    async def _adopt(self, batch: BatchRecord, candidates: list[MessageBatch]) -> None:
        """The oldest candidate is our batch; any others are duplicates, recorded."""
        adopted, *others = sorted(candidates, key=lambda b: b["created_at"])
        crash_point("reconcile_matched")
        await self._store.mark_created(batch.local_id, adopted, [other["id"] for other in others])
        log.warning("batch_adopted", batch_id=adopted["id"], local_id=batch.local_id)
        for other in others:
            log.error("duplicate_batch_suspected", batch_id=other["id"], local_id=batch.local_id)

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
