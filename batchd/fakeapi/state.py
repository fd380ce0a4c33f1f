"""The fake's batch state machine: pure, clock-injected, seeded (spec §2, §7).

Nothing is scheduled: each request gets a finish time at create, and every view of a
batch (status, counts, end) is computed from the clock when asked. Per request only
compact columns are kept (see validation.ParsedRequests), never the params dicts.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from batchd.api.wire import (
    BATCHES_PATH,
    LIST_LIMIT_DEFAULT,
    RESULTS_RETENTION_DAYS,
    MessageBatch,
    ProcessingStatus,
    RequestCounts,
    format_timestamp,
)
from batchd.fakeapi.faults import FaultConfig, RequestFate, draw_request_fate
from batchd.fakeapi.validation import ParsedRequests

Clock = Callable[[], datetime]
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FATES: tuple[RequestFate, ...] = ("succeeded", "errored", "expired")
# Why requests still unfinished at the end did not finish.
Cutoff = Literal["none", "canceled", "expired"]


def micros(delta: timedelta) -> int:
    return delta // timedelta(microseconds=1)


def new_id(rng: random.Random, prefix: str) -> str:
    """`prefix` + 24 base62 chars; real ids start with "01" (§2: `msgbatch_01Hkc...`)."""
    return prefix + "01" + "".join(rng.choices(BASE62, k=22))


class FakeClock:
    """Real time plus an offset that tests (or `POST /_fake/advance`) move forward."""

    def __init__(self, offset_seconds: float = 0.0) -> None:
        self.offset = timedelta(seconds=offset_seconds)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@dataclass(frozen=True)
class Timeline:
    """How long things take in the fake."""

    processing_seconds: float = 3.0
    expiry_seconds: float = 24 * 3600.0  # §2: expires_at = created_at + 24 h
    # §7.2: "cancellation may not take immediate effect"; RN saw ~25 s. Short here.
    cancel_delay_seconds: float = 1.0
    retention_seconds: float = RESULTS_RETENTION_DAYS * 86400.0  # §5
    # §7.3: by default counts stay in `processing` until the end (documented behaviour).
    incremental_counts: bool = False


class ApiError(Exception):
    """An HTTP error the app turns into the real error body (§6.1)."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def not_found(batch_id: str) -> ApiError:
    return ApiError(404, "not_found_error", f"Message Batch {batch_id} not found.")


@dataclass(eq=False)
class FakeBatch:
    """One batch: its times, and column-wise facts plus a fate per request."""

    id: str
    seq: int
    created_at: datetime
    expires_at: datetime
    seed: int  # renders the same results (order, message ids) on every download
    requests: ParsedRequests
    fates: list[RequestFate]
    finish_us: list[int]  # microseconds after created_at (integers: exact comparisons)
    cancel_initiated_at: datetime | None = None
    # index -> (type, message, request_id) of errors injected at "execution" time.
    injected_errors: dict[int, tuple[str, str, str]] = field(default_factory=dict)
    _sorted: dict[RequestFate, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for fate in FATES:
            self._sorted[fate] = sorted(
                offset for offset, f in zip(self.finish_us, self.fates, strict=True) if f == fate
            )

    def __len__(self) -> int:
        return len(self.fates)

    def end(self, timeline: Timeline) -> tuple[datetime, Cutoff]:
        """When processing ends (or will), and what happens to unfinished requests."""
        natural = self.created_at + timedelta(microseconds=max(self.finish_us, default=0))
        candidates: list[tuple[datetime, Cutoff]] = [
            (natural, "none"),
            (self.expires_at, "expired"),
        ]
        if self.cancel_initiated_at is not None:
            delay = timedelta(seconds=timeline.cancel_delay_seconds)
            candidates.append((self.cancel_initiated_at + delay, "canceled"))
        return min(candidates, key=lambda candidate: candidate[0])

    def status(self, now: datetime, timeline: Timeline) -> ProcessingStatus:
        ended_at, _ = self.end(timeline)
        if now >= ended_at:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"

    def counts(self, now: datetime, timeline: Timeline) -> RequestCounts:
        """§2: the counts always sum to the number of requests."""
        ended_at, cutoff = self.end(timeline)
        ended = now >= ended_at
        counts: RequestCounts = {
            "processing": 0,
            "succeeded": 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        }
        if not ended and not timeline.incremental_counts:
            counts["processing"] = len(self)
            return counts
        moment = ended_at if ended else now
        offset = micros(moment - self.created_at)
        for fate in FATES:
            counts[fate] = bisect_right(self._sorted[fate], offset)
        unfinished = len(self) - counts["succeeded"] - counts["errored"] - counts["expired"]
        if not ended:
            counts["processing"] = unfinished
        elif cutoff == "canceled":
            counts["canceled"] = unfinished
        else:
            counts["expired"] += unfinished
        return counts

    def end_us(self, timeline: Timeline) -> tuple[int, Cutoff]:
        """`end` as microseconds after created_at: requests finishing later are cut off."""
        ended_at, cutoff = self.end(timeline)
        return micros(ended_at - self.created_at), cutoff

    def archived_at(self, now: datetime, timeline: Timeline) -> datetime | None:
        archived = self.created_at + timedelta(seconds=timeline.retention_seconds)
        return archived if now >= archived else None

    def view(self, now: datetime, timeline: Timeline, base_url: str) -> MessageBatch:
        """The MessageBatch object, every nullable field explicit, keys in §2 order."""
        status = self.status(now, timeline)
        ended_at = self.end(timeline)[0] if status == "ended" else None
        archived_at = self.archived_at(now, timeline)
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": self.counts(now, timeline),
            "ended_at": format_timestamp(ended_at) if ended_at else None,
            "created_at": format_timestamp(self.created_at),
            "expires_at": format_timestamp(self.expires_at),
            "archived_at": format_timestamp(archived_at) if archived_at else None,
            "cancel_initiated_at": (
                format_timestamp(self.cancel_initiated_at) if self.cancel_initiated_at else None
            ),
            "results_url": (
                f"{base_url}{BATCHES_PATH}/{self.id}/results" if status == "ended" else None
            ),
        }


@dataclass
class Stats:
    """Counters for `GET /_fake/stats` (test assertions, e.g. duplicate submissions)."""

    creates_attempted: int = 0
    creates_accepted: int = 0
    requests_received: int = 0
    submissions: Counter[str] = field(default_factory=Counter)


class FakeState:
    """Every batch the fake knows, newest last; all views computed from `clock`."""

    def __init__(
        self, *, clock: Clock, timeline: Timeline | None = None, seed: int | None = None
    ) -> None:
        self.clock = clock
        self.timeline = timeline or Timeline()
        self.seed = seed
        self.batches: dict[str, FakeBatch] = {}
        # Every id ever issued (deleted ones too), so list cursors keep working.
        self.seq_by_id: dict[str, int] = {}
        self.stats = Stats()
        self.reseed()

    def reseed(self) -> None:
        """A fresh rng stream per (seed, batches so far): a restarted fake with the same
        seed and state file does not issue the same ids again."""
        base = random.Random(self.seed).getrandbits(64) if self.seed is not None else None
        self._rng = random.Random(f"{base}:{len(self.seq_by_id)}" if base is not None else None)

    def create(self, parsed: ParsedRequests, faults: FaultConfig) -> FakeBatch:
        now = self.clock()
        rng = self._rng
        batch_id = new_id(rng, "msgbatch_")
        while batch_id in self.seq_by_id:
            batch_id = new_id(rng, "msgbatch_")
        fates: list[RequestFate] = []
        injected: dict[int, tuple[str, str, str]] = {}
        span_us = round(self.timeline.processing_seconds * 1e6)
        finish_us = [rng.randint(0, span_us) if span_us > 0 else 0 for _ in parsed.custom_ids]
        for index in range(len(parsed)):
            if index in parsed.errors:
                fates.append("errored")
                continue
            fate, error = draw_request_fate(rng, faults)
            fates.append(fate)
            if error is not None:
                injected[index] = (error[0], error[1], new_id(rng, "workerreq_"))
        batch = FakeBatch(
            id=batch_id,
            seq=len(self.seq_by_id),
            created_at=now,
            expires_at=now + timedelta(seconds=self.timeline.expiry_seconds),
            seed=rng.getrandbits(64),
            requests=parsed,
            fates=fates,
            finish_us=finish_us,
            injected_errors=injected,
        )
        self.add(batch)
        self.stats.creates_accepted += 1
        self.stats.requests_received += len(parsed)
        self.stats.submissions.update(parsed.custom_ids)
        return batch

    def add(self, batch: FakeBatch) -> None:
        self.batches[batch.id] = batch
        self.seq_by_id[batch.id] = batch.seq

    def get(self, batch_id: str) -> FakeBatch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise not_found(batch_id)
        return batch

    def list_page(
        self,
        limit: int = LIST_LIMIT_DEFAULT,
        before_id: str | None = None,
        after_id: str | None = None,
        created_by: datetime | None = None,
    ) -> tuple[list[FakeBatch], bool]:
        """§1.1: newest first; `after_id` pages towards older, `before_id` towards newer.

        `created_by`: only batches created at or before it are listed (the list lag).
        """
        listed: Iterable[FakeBatch] = self.batches.values()
        if created_by is not None:
            listed = [b for b in listed if b.created_at <= created_by]
        newest_first = sorted(listed, key=lambda b: b.seq, reverse=True)
        if after_id is not None:
            cursor = self._cursor(after_id, "after_id")
            older = [b for b in newest_first if b.seq < cursor]
            return older[:limit], len(older) > limit
        if before_id is not None:
            cursor = self._cursor(before_id, "before_id")
            newer = [b for b in newest_first if b.seq > cursor]
            return newer[-limit:], len(newer) > limit
        return newest_first[:limit], len(newest_first) > limit

    def _cursor(self, batch_id: str, name: str) -> int:
        seq = self.seq_by_id.get(batch_id)
        if seq is None:
            # UNCONFIRMED: the real API's answer to a cursor it never issued.
            raise ApiError(400, "invalid_request_error", f"{name}: unknown Message Batch id")
        return seq

    def cancel(self, batch_id: str) -> FakeBatch:
        """§7.2: in_progress -> canceling; canceling again is a no-op."""
        batch = self.get(batch_id)
        now = self.clock()
        status = batch.status(now, self.timeline)
        if status == "ended":
            # UNCONFIRMED (§7.2, §9): a 400 for cancelling a batch that has ended.
            raise ApiError(
                400,
                "invalid_request_error",
                f"Message Batch {batch_id} has already ended and cannot be canceled.",
            )
        if batch.cancel_initiated_at is None:
            batch.cancel_initiated_at = now
        return batch

    def delete(self, batch_id: str) -> None:
        """§7.4: only ended batches; a canceling one is refused like in_progress."""
        batch = self.get(batch_id)
        if batch.status(self.clock(), self.timeline) != "ended":
            raise ApiError(
                400,
                "invalid_request_error",
                "In progress batches cannot be deleted. Consider canceling the batch instead.",
            )
        del self.batches[batch_id]

    def results_batch(self, batch_id: str) -> FakeBatch:
        """The batch whose results may be downloaded now, or the 404 the API sends."""
        batch = self.get(batch_id)
        now = self.clock()
        if batch.status(now, self.timeline) != "ended" or batch.archived_at(now, self.timeline):
            # §1.2 before the end; after archiving the answer is UNCONFIRMED (§7.5).
            raise ApiError(
                404, "not_found_error", f"Message Batch {batch_id} has no available results."
            )
        return batch

    def stats_json(self) -> dict[str, object]:
        stats = self.stats
        return {
            "creates_attempted": stats.creates_attempted,
            "creates_accepted": stats.creates_accepted,
            "batches": len(self.batches),
            "requests_received": stats.requests_received,
            "submissions_by_custom_id": {
                custom_id: count for custom_id, count in stats.submissions.items() if count > 1
            },
            # Every custom_id ever received, with how many times: the counter itself (one
            # int per id), never the requests.
            "submission_counts": dict(stats.submissions),
        }
