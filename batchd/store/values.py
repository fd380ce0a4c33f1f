"""What the store returns: reports of its writes and totals of its reads, backend-neutral.

Totals are NamedTuples where callers unpack them positionally (usage per model, sizes per
model, a pruned task's export line); reports of writes are frozen dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from batchd.domain import BatchRecord, Outcome, Usage, WriteReport

# What `batchd.store` re-exports (its `__init__` imports this list rather than repeating it).
__all__ = [
    "AcknowledgeReport",
    "AppliedRange",
    "CancelReport",
    "CandidateBatch",
    "DuplicateBatch",
    "EnqueueReport",
    "FinishReport",
    "ForgottenBatches",
    "KeptLine",
    "PendingFingerprint",
    "PrunableTask",
    "PruneExportPage",
    "ResultGaps",
    "ResultLine",
    "ResultRow",
    "SchemaVersions",
    "SharedKeyEvidence",
    "SizeTotals",
    "StageReport",
    "TakenBatch",
    "UsageTotals",
    "WaitingCancelReport",
]


@dataclass(frozen=True, slots=True)
class EnqueueReport:
    inserted: int
    duplicates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CancelReport:
    canceled: tuple[str, ...]  # pending tasks now canceled
    flagged: tuple[str, ...]  # submitted tasks: canceled when their result comes back canceled
    not_cancelable: tuple[str, ...]  # already final
    unknown: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FinishReport:
    missing_requeued: tuple[str, ...]
    origin: str | None = None  # what the batch's lines showed (BatchOrigin), if decided
    # Refused: the batch is still `ended` but the caller's collection lease had lapsed (or
    # was given back): another daemon may be writing it, so its missing lines are not ours
    # to requeue (interface.py, "Several daemons").
    lease_lapsed: bool = False


@dataclass(frozen=True, slots=True)
class TakenBatch:
    """An ended batch taken to collect, under a lease (`Store.take_ended_batch`)."""

    batch: BatchRecord
    # The holder whose lease had lapsed when this one was taken (it died or was cut off
    # mid-collection): a take-over. None when nobody held it.
    taken_over_from: str | None = None
    # Taken over before its lease lapsed: its holder's liveness lock was free, the session
    # that held it ended (the holder died or was cut off: docs/postgresql-design.md).
    holder_gone: bool = False


@dataclass(frozen=True, slots=True)
class ResultGaps:
    unmatched: int  # result lines that matched no task of their batch
    missing_requeued: int  # requests a whole results stream had no line for
    archived_requeued: int  # requests whose results were archived before being written


@dataclass(frozen=True, slots=True)
class AppliedRange:
    last_task_id: int  # apply the next range after this one
    report: WriteReport


@dataclass(frozen=True, slots=True)
class StageReport:
    staged: int  # lines kept for a task of the batch, to be applied
    repeated: int  # further lines for a task already staged: ignored
    unmatched: tuple[int, ...]  # positions in the chunk of lines that match no task of the batch


class KeptLine(NamedTuple):
    """A result line kept aside in unmatched_results, with what the API billed for it.

    Only a succeeded line is billed (spec §5: errored, canceled and expired are not), so
    `usage` is set for those alone: the store counts it in the usage ledger as it keeps the
    line. A malformed line has none: nothing it says can be trusted to be a bill.
    """

    custom_id: str
    line: str
    model: str | None = None
    usage: Usage | None = None  # None: not billed

    @classmethod
    def of(cls, outcome: Outcome, line: str) -> KeptLine:
        """The kept form of a parsed line: its usage when it was billed (succeeded)."""
        if outcome.result_type != "succeeded":
            return cls(outcome.custom_id, line)
        return cls(outcome.custom_id, line, outcome.model, outcome.usage or Usage())

    def billed(self) -> tuple[str | None, int | None, int | None, int | None, int | None]:
        """(model, input, output, cache-write, cache-read tokens) as `kept_line_usage` counts
        a billed line; all None for a line not billed (the stores count only billed ones)."""
        if self.usage is None:
            return (None, None, None, None, None)
        u = self.usage
        return (self.model, u.input_tokens, u.output_tokens, u.cache_creation_input_tokens,
                u.cache_read_input_tokens)  # fmt: skip


class UsageTotals(NamedTuple):
    """Usage of succeeded results of one model (the usage ledger)."""

    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class SizeTotals(NamedTuple):
    """Request sizes of some tasks of one model (None: a request the chunker will refuse)."""

    model: str | None
    requests: int
    request_bytes: int
    max_tokens: int


class PendingFingerprint(NamedTuple):
    """Which tasks are the oldest pending ones, cheaply: changes when any of them does."""

    tasks: int
    min_id: int
    max_id: int
    id_sum: int


class ForgottenBatches(NamedTuple):
    links: int  # task-to-batch links of deleted tasks
    batches: int  # finished batches nothing referred to any more


class DuplicateBatch(NamedTuple):
    api_batch_id: str
    detected_at: str
    note: str


class ResultLine(NamedTuple):
    custom_id: str
    result_json: str


# A task's result as an export reads it: (id, custom_id, the result's JSON as UTF-8 bytes),
# the bytes as the database gives them, never decoded into a str and encoded again.
ResultRow = tuple[int, str, bytes]


class PrunableTask(NamedTuple):
    """A final task old enough to prune, with everything an export line keeps of it."""

    id: int
    custom_id: str
    status: str
    result: str | None
    error: str | None
    params: str
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    cache_creation_input_tokens: int | None
    cache_read_input_tokens: int | None
    created_at: str
    completed_at: str | None


class PruneExportPage(NamedTuple):
    """A page of `batchd prune --export`: the tasks' ids, and their export lines (one per
    task, in the same order, each ending in a newline; `batchd/store/prunelines.py`)."""

    task_ids: list[int]
    lines: bytes


class CandidateBatch(NamedTuple):
    """A suspected duplicate batch and how far its harvest got."""

    api_batch_id: str
    harvest_id: int | None  # its batches row (None: recorded before schema v6, never read)
    intent_id: int  # the local batch whose tasks it may answer
    state: str  # the harvest row's state ('unread' without one)
    origin: str | None  # BatchOrigin, once its results were read
    written: int  # tasks whose result came from it
    duplicate_lines: int  # its lines for tasks another batch had already answered
    foreign_lines: int  # its lines when it proved another client's (only counted)
    detected_at: str
    note: str


class SharedKeyEvidence(NamedTuple):
    """Batches on the API key that batchd did not create."""

    batches: int  # seen on the list in a reconcile window, or proven by their results
    first_seen_at: str | None
    proven_foreign: int  # read to the end: none of their lines named a task of ours


class SchemaVersions(NamedTuple):
    """The schema version a database records (0: none) and the newest this batchd ships."""

    recorded: int
    supported: int


@dataclass(frozen=True, slots=True)
class WaitingCancelReport:
    """`cancel --all / --status`: how many waiting tasks the cancel reached."""

    canceled: int  # pending tasks now canceled
    flagged: int  # submitted tasks flagged: canceled when their result comes back canceled


@dataclass(frozen=True, slots=True)
class AcknowledgeReport:
    acknowledged: tuple[str, ...]  # suspected duplicates now acknowledged
    already: tuple[str, ...]  # acknowledged before (left as they were)
    unknown: tuple[str, ...]  # not a suspected duplicate batch
