"""A create whose answer was never seen ─► adopted from the API's list, or released (design step 4).

The create call is not idempotent (spec §6.3, §8.3): a batch left `creating` may exist on
the API or not. It is looked for on the list endpoint (created in the intent window, with
our request count, not already recorded): one found is adopted; more than one, the oldest
created since the intent is adopted and every other becomes a candidate, harvested for
the intent's tasks (docs/design.md, "Harvesting candidate batches"); none, and the grace
has passed since the create stopped being in flight, the intent is released and its tasks
go out again. Either way the list is still watched for a while for a batch of the intent
that lands late (a lagging list, a late commit), which becomes a candidate too.

Batches in a window that match none of our unresolved creates by size were not created by
batchd: the key is shared with another tool. That is recorded, counted and warned about
once per start (docs/operations.md, "One key, one batchd").

The submitter tells `create_unknown` when a create's outcome is lost; the daemon calls
`reconcile` for each `creating` batch, then `watch`, before anything else is sent (never
while a create is in flight, so no batch of ours can be on the list unrecorded but those
of unresolved creates).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import structlog

from batchd.api import BatchesClient
from batchd.api.wire import MessageBatch, parse_timestamp, request_total
from batchd.config import BatchingConfig
from batchd.crashpoints import crash_point
from batchd.domain import BatchRecord, BatchState
from batchd.service.metrics import FOREIGN_BATCHES_LISTED, Registry
from batchd.store import Store

log = structlog.get_logger("batchd.pipeline.reconcile")

# Clocks of the API and of this machine may disagree: look this far either side.
_RECONCILE_SKEW = timedelta(minutes=5)
# A batch created this long before its intent (by the API's clock) cannot be ours unless
# the clocks disagree: adopted only when nothing created since the intent matches.
_ADOPT_TOLERANCE = timedelta(seconds=2)
_LIST_PAGE_LIMIT = 100
# Watched intents are looked for on the list this often: a tenth of the watch, between 1
# and 10 s (the list shares the API's rate limit with every other call).
_WATCH_INTERVAL_MIN = timedelta(seconds=1)
_WATCH_INTERVAL_MAX = timedelta(seconds=10)
SHARED_KEY_DOCS = "docs/operations.md#one-key-one-batchd"


class Reconciler:
    """Decides what became of creates whose outcome is unknown, one `creating` batch at a time."""

    def __init__(
        self,
        store: Store,
        client: BatchesClient,
        config: BatchingConfig,
        *,
        clock: Callable[[], datetime],
        registry: Registry | None = None,
    ) -> None:
        self._store = store
        self._client = client
        self._clock = clock
        self._registry = registry
        self._grace = timedelta(seconds=config.reconcile_grace_s)
        self._watch_for = timedelta(seconds=config.duplicate_watch_s)
        self._watch_every = min(max(self._watch_for / 10, _WATCH_INTERVAL_MIN), _WATCH_INTERVAL_MAX)
        # local_id -> when this process last knew that batch's create to be in flight.
        self._unknown_since: dict[int, datetime] = {}
        self._watched_at: datetime | None = None
        self._shared_key_warned = False

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
        watched = await self._store.watched_intents(now)
        listed = await self._unknown_batches(batch.intent_at - _RECONCILE_SKEW, now)
        candidates = [
            b for b in listed if request_total(b["request_counts"]) == batch.request_count
        ]
        await self._note_foreign(listed, [batch, *watched])
        if candidates:
            del self._unknown_since[batch.local_id]
            await self._adopt(batch, candidates)
            return
        if now - unknown_since < self._grace:
            return
        del self._unknown_since[batch.local_id]
        await self._store.release_intent(
            batch.local_id,
            "create outcome unknown and no such batch on the API: resubmitting",
            watch_until=now + self._watch_for,
        )
        log.warning("batch_resubmitting", local_id=batch.local_id, count=batch.request_count)

    async def watch(self) -> int:
        """Look for batches of released intents that landed late; each found becomes a
        candidate of its intent (harvested). Returns how many were found."""
        now = self._clock()
        if self._watched_at is not None and now - self._watched_at < self._watch_every:
            return 0
        watched = await self._store.watched_intents(now)
        if not watched:
            return 0
        self._watched_at = now
        earliest = min(intent.intent_at for intent in watched) - _RECONCILE_SKEW
        listed = await self._unknown_batches(earliest, now)
        await self._note_foreign(listed, watched)
        found = 0
        for batch in sorted(listed, key=lambda b: b["created_at"]):
            intent = _intent_of(batch, watched)
            if intent is None:
                continue
            crash_point("candidate_found")
            note = f"created for local batch {intent.local_id} after its intent was released"
            if await self._store.record_candidate(intent.local_id, batch, note):
                found += 1
                log.error(
                    "duplicate_batch_suspected", batch_id=batch["id"], local_id=intent.local_id
                )
        return found

    async def _adopt(self, batch: BatchRecord, candidates: list[MessageBatch]) -> None:
        """The oldest candidate created since the intent is our batch; every other one is a
        candidate of the intent, recorded with the adoption and harvested."""
        since_intent = [
            c
            for c in candidates
            if parse_timestamp(c["created_at"]) >= batch.intent_at - _ADOPT_TOLERANCE
        ]
        adopted = min(since_intent or candidates, key=lambda b: b["created_at"])
        others = [c for c in candidates if c["id"] != adopted["id"]]
        crash_point("reconcile_matched")
        # Watched on: with several creates on the key, the batch adopted may not be ours,
        # and ours may land on the list later (docs/design.md, step 4).
        watch_until = self._clock() + self._watch_for
        await self._store.mark_created(batch.local_id, adopted, others, watch_until=watch_until)
        log.warning("batch_adopted", batch_id=adopted["id"], local_id=batch.local_id)
        for other in others:
            log.error("duplicate_batch_suspected", batch_id=other["id"], local_id=batch.local_id)

    async def _note_foreign(
        self, listed: Sequence[MessageBatch], intents: Sequence[BatchRecord]
    ) -> None:
        """Listed batches whose size matches none of our unresolved creates are not ours."""
        sizes = {intent.request_count for intent in intents}
        foreign = [b["id"] for b in listed if request_total(b["request_counts"]) not in sizes]
        if not foreign:
            return
        new = await self._store.note_foreign_batches(foreign)
        if self._registry is not None and new:
            self._registry.inc(FOREIGN_BATCHES_LISTED, new)
        if not self._shared_key_warned:
            self._shared_key_warned = True
            log.warning(
                "api_key_shared",
                batches=len(foreign),
                first=foreign[0],
                advice="batches on this key that batchd did not create: give batchd a "
                f"dedicated workspace key (the API lists batches per workspace); {SHARED_KEY_DOCS}",
            )

    async def _unknown_batches(self, earliest: datetime, now: datetime) -> list[MessageBatch]:
        """Batches on the API created between `earliest` and `now + skew` that we have not
        recorded (as ours or as candidates)."""
        known = await self._store.known_api_batch_ids()
        latest = now + _RECONCILE_SKEW
        found: list[MessageBatch] = []
        after_id: str | None = None
        while True:
            page = await self._client.list_page(limit=_LIST_PAGE_LIMIT, after_id=after_id)
            for listed in page["data"]:
                created = parse_timestamp(listed["created_at"])
                if created < earliest:
                    return found  # newest first: nothing older can match
                if created <= latest and listed["id"] not in known:
                    found.append(listed)
            if not page["has_more"] or page["last_id"] is None:
                return found
            after_id = page["last_id"]


def _intent_of(batch: MessageBatch, watched: Sequence[BatchRecord]) -> BatchRecord | None:
    """The watched intent a late batch may belong to: of its size, its window holding the
    batch's creation; the latest such intent (a later one of the same size may carry the
    same tasks again: the custom_ids decide what it answers)."""
    created = parse_timestamp(batch["created_at"])
    fits = [
        intent
        for intent in watched
        if intent.request_count == request_total(batch["request_counts"])
        and intent.intent_at - _RECONCILE_SKEW <= created
    ]
    return max(fits, key=lambda intent: intent.intent_at, default=None)
