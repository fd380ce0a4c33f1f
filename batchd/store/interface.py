"""The store as the rest of batchd sees it: domain verbs, no database terms.

The pipeline, money, service and cli packages depend on these Protocols only; a backend
(`batchd/store/sqlite/`, later PostgreSQL) implements them in its own SQL. The numbers
are the transactions of docs/design.md. The contract every implementation keeps:

- **One write, one transaction.** Every method that writes runs exactly one database
  transaction (unless said otherwise below), committed before it returns, and that
  transaction runs to its end even when the caller is cancelled (shield it): a cancelled
  statement still runs in the database, so a caller must never see half of one.
- **Guarded state changes.** Every change of a task or batch state is an UPDATE guarded by
  the state it leaves (`WHERE ... AND state = 'creating'`); its row count decides what
  happens next. Replaying any write after a crash is therefore a no-op or the same change.
- **Durability.** A commit of `mark_created` (3) must survive power loss (SQLite:
  `synchronous=FULL`): losing it means paying again for a batch already created.
- **Environment errors** (read-only, disk full, unreachable, locked too long) raise
  `StoreError` naming the database and a remedy; a schema newer than this batchd raises
  `SchemaTooNewError` before anything is written. Our own bugs (integrity errors) are not
  translated. Any call after `close()` raises `StoreError`.
- **Users write too.** Users insert `tasks` rows and read results in the same database:
  keep write transactions short (results in ranges) and never hold one across network I/O.
- **Read-only stores** (`open_store(..., read_only=True)`: `status`, `results`,
  `estimate`, `batches`, `tasks`) never create the database or its schema, never migrate
  and never write; every write method (and `migrate`) raises StoreError before touching
  the database. A missing database raises DatabaseMissingError naming where it was
  looked for. A schema of another version than this batchd's is read where it can be; a
  read that needs a table or column that version lacks raises SchemaTooOldError or
  SchemaTooNewError naming both versions, and the schema is left as it was.

Per method (see each docstring):

1. `record_intent` (claim): one transaction inserts the `creating` batch, moves exactly
   the given tasks `pending -> submitted` (attempts + 1) and remembers them as the batch's
   members; any task no longer pending rolls it all back (returns None). At most one batch
   is `creating` at a time: the caller guarantees it, reconcile (4) relies on it.
3. `mark_created`: `creating -> in_progress/ended` with the API's id, guarded; the other
   API ids reconcile matched, and this one if the guard failed, go to duplicate_batches in
   the same transaction (a paid batch is never unrecorded, even across a kill).
   `release_intent` (a refused create): `creating -> rejected`, its tasks back to pending
   with the attempt given back, named ones `invalid`, user-cancelled ones `canceled`.
5. `update_batch` moves `in_progress -> canceling -> ended`, never back; `mark_lost`
   requeues a lost batch's tasks (attempts kept: the API may have billed them).
6. Write-back on a `WriteBackLane`: `stage_results` keeps lines apart from `tasks` (takes
   no lock users' INSERTs wait for; decides batch membership from the batch's members:
   lines of other tasks are reported unmatched, a repeated line ignored); `apply_staged`
   applies one range of task ids per transaction, guarded by `tasks.batch_id = batch AND
   status = 'submitted'`, so a line re-applied after a crash changes nothing. Staging may
   be lost at any time (a crash): the batch is still `ended` and is staged again.
   `yield_to_writers` pauses every write of ours so that users' writes get through.
7. `finish_batch`: `ended -> completed`, with the batch's origin (ours, partly ours,
   foreign: a foreign batch's kept lines dropped, counted); in the same transaction the
   intent's tasks still `submitted` are requeued and listed in missing_results (so paying
   again is always on record), but only once no candidate of the intent is still open.

**Several daemons** (PostgreSQL; docs/postgresql-design.md). Submission, reconcile and
cancels are the leader's (`leadership`); polling and write-back are shared by every daemon:

- `batches_due_for_poll` claims the in-flight batches no daemon polled within the poll
  interval (a due time in the row, taken with SKIP LOCKED), so two daemons do not both
  poll every batch every cycle. A batch polled twice costs one GET: `update_batch` is
  idempotent and never moves a state back.
- `take_ended_batch` gives one `ended` batch to one holder under a lease (an expiry on the
  server's clock), `renew_collection` extends it (every third of the lease while the
  holder downloads and applies; False once another holder took it over), and
  `give_back_collection` ends it early. A lapsed lease is taken over by the next holder,
  and so is a running one whose holder is known dead (`collector_liveness`: it held its
  liveness lock when it took or last renewed the lease, and the lock is free now).
  `finish_batch(..., holder=...)` is guarded by the lease: a holder whose lease lapsed
  cannot requeue as missing the lines the new holder is writing (`lease_lapsed`).
  Correctness never rests on the lease: every apply keeps its guard (batch, status,
  custom_id), so two holders writing one batch write each line once, never to another
  task. SQLite admits one daemon: its lease is always its own (take reads the next ended
  batch, renewing always holds, the finish is not guarded), and every in-flight batch is
  due at every poll, as before.

Candidates (docs/design.md, "Harvesting candidate batches"): an API batch found for an
intent but not adopted (`mark_created`'s `duplicates`, `record_candidate`) is a batch of
its own for the poller and the collector, whose members are the intent's tasks. Its
apply is guarded by `task in the intent AND status IN ('submitted', 'pending') AND the
line ends the task`: it writes a task that still waits, whichever batch it waits in,
exactly once (the task then points at the candidate, so no second line passes the guard of
any batch), and withdraws a pending one from the queue in the same UPDATE. Every apply
keeps, in its range's transaction, the lines for tasks another batch already answered in
duplicate_results: the first result written wins, none is ever overwritten. A kept line
that was billed (succeeded) is counted in the usage ledger as it is kept (migration 015's
triggers), so a line kept twice is counted once.

**Flat costs** (issue 16). A database may hold millions of finished tasks and a queue of
a million pending ones; what a second store must keep flat:

- `status_counts` costs the same at 2,000,000 rows as at 0: a `task_counts` table kept by
  triggers in the writing transaction, users' writes included (migration 007: row
  triggers in SQLite, statement-level ones over transition tables in PostgreSQL).
  It is read on timers: /metrics, /healthz, the watchdog, progress, the status line.
- `has_tasks` reads at most one row per status: the idle check (every 0.2 s) and the
  submitter at its in-flight limit ask it, never for counts.
- Pages by key: `iter_result_lines` (and `iter_result_rows`) and `iter_pending` read
  from an index on (status, id) only rows of the statuses asked for, each once: one
  cursor per status (`WHERE status = ? AND id > ? ORDER BY id LIMIT ?`), merged by id,
  and a status found exhausted is not read again (SQLite's own merge of the ranges read
  a status with no further match to its end on every page). No sort, no list of every
  id. PostgreSQL's results export reads windows of the primary key instead (`id > ? AND
  id <= ?`, the statuses a filter, several in flight): each row between the first and
  last task of the statuses asked read once, whatever its status. Prune's reads and
  deletes (`iter_prunable*`, `delete_prunable`) page tasks_by_completion by
  (completed_at, id) from the oldest: only the entries before the cutoff.
- A change to named tasks (`request_cancel`, `delete_tasks`, `record_intent`,
  `mark_invalid`) finds them by id or custom_id, never through the status index: a
  query that also says `status = ...` must not be planned as a scan of that status.
- Tests hold the SQLite plans to this (`EXPLAIN QUERY PLAN`, tests/test_flat_costs.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from batchd.api.wire import MessageBatch
from batchd.domain import (
    BatchRecord,
    BatchState,
    Outcome,
    PendingTask,
    TaskRow,
    TaskStatus,
    WriteReport,
)
from batchd.store.accounts import StoreAccounts
from batchd.store.values import (
    AcknowledgeReport,
    AppliedRange,
    CancelReport,
    CandidateBatch,
    DuplicateBatch,
    EnqueueReport,
    FinishReport,
    KeptLine,
    ResultLine,
    ResultRow,
    SchemaVersions,
    SharedKeyEvidence,
    StageReport,
    TakenBatch,
    WaitingCancelReport,
)


class WriteBackLane(Protocol):
    """Stages one batch's result lines and applies them (design step 6).

    Lines staged on a lane are applied on the same lane; a lane stages one batch at a time
    (`clear_staging` first). Two lanes may be used at once: one stages while the other
    applies.
    """

    async def clear_staging(self) -> None:
        """Forget every staged line (of a download that stopped midway)."""

    async def stage_results(self, local_id: int, outcomes: Sequence[Outcome]) -> StageReport:
        """Keep a chunk of batch `local_id`'s lines; no task changes yet, no lock users wait for."""

    async def apply_staged(
        self, local_id: int, max_attempts: int, max_rows: int, after_task_id: int = 0
    ) -> AppliedRange | None:
        """Apply the staged lines of the next `max_rows` task ids above `after_task_id`, in one
        guarded transaction; None once none is left. Staging stays as it is.

        A line is written only to its task still a member of the batch, unchanged: the
        line of a task whose request was edited since it was staged is kept as a duplicate,
        that of a task DELETEd or renamed since is kept unmatched (its custom_id in the
        report's `unmatched`, already kept: nothing for the caller to keep), the billed
        ones counted in the usage ledger, in the same transaction."""


class Leadership(Protocol):
    """Whether this daemon is the one that submits and reconciles (PostgreSQL: one of many
    daemons on a database; docs/postgresql-design.md)."""

    @property
    def leading(self) -> bool:
        """Leads now; False while it lost the lock and tries again (claims fail meanwhile)."""

    async def acquired(self) -> bool:
        """Wait until it leads (True) or the daemon stops (False)."""


class Store(Protocol):
    """Tasks, batches and results, in domain terms (see the module docstring)."""

    @property
    def accounts(self) -> StoreAccounts:
        """Usage, sizes, gaps and pruning, on this store's connections."""

    async def close(self) -> None:
        """Let a write in progress finish, then close; later calls raise StoreError."""

    async def migrate(self) -> list[int]:
        """Apply every shipped migration not yet recorded; returns the versions applied."""

    async def schema_versions(self) -> SchemaVersions:
        """The schema version the database records (0: none) and the newest this batchd
        ships: the command line refuses to migrate under a daemon of another version."""

    # -- intake --------------------------------------------------------------------------------

    async def enqueue(self, items: Iterable[tuple[str, str]]) -> EnqueueReport:
        """Insert (custom_id, params) tasks; custom_ids stored or repeated are reported.
        Every line is one or the other, even when another producer commits the same
        custom_id while this runs."""

    def iter_pending(
        self, *, page_size: int = 1000, page_bytes: int = 16 * 1024 * 1024
    ) -> AsyncIterator[PendingTask]:
        """Pending tasks, oldest first, in pages (no long read transaction), each page at
        most `page_size` rows and `page_bytes` of params unless one row alone is larger.
        A row that cannot be read as text comes with `unreadable` set, not an error."""

    async def mark_invalid(
        self, reasons: Sequence[tuple[int, str]], versions: Sequence[str] = ()
    ) -> int:
        """Pending tasks (id, reason) the chunker, the budget or a refusal judged become
        `invalid`; returns count. `versions` (each task's `PendingTask.version`, in order;
        every pipeline caller gives them): only a task that is still the row read is marked,
        as `record_intent` claims; one whose params or custom_id changed since, or (SQLite)
        deleted with another row on its id, stays pending and is judged again at the next
        read. Without them, any pending task of the id."""

    # -- submission (design 1-4) -----------------------------------------------------------------

    async def record_intent(
        self, task_ids: Sequence[int], body_bytes: int, versions: Sequence[str] = ()
    ) -> int | None:
        """Claim the tasks for a new `creating` batch (1); None if any stopped being pending,
        or (`versions`: each task's `PendingTask.version`, in order) is no longer the row read:
        its params changed, or it was deleted and another row took its id."""

    async def mark_created(
        self,
        local_id: int,
        batch: MessageBatch,
        duplicates: Sequence[MessageBatch] = (),
        *,
        watch_until: datetime | None = None,
    ) -> bool:
        """Record the API's id for a `creating` batch (3); False (and `batch` recorded as a
        candidate of the intent) if it is no longer `creating`; `duplicates` become
        candidates of the intent in the same transaction. `watch_until`: adopted by
        reconcile, the intent stays watched for a batch of it that lands late."""

    async def release_intent(
        self,
        local_id: int,
        reason: str,
        invalid: Sequence[tuple[str, str]] = (),
        *,
        watch_until: datetime | None = None,
    ) -> None:
        """The create was refused: `rejected`, tasks back to pending without the attempt;
        (custom_id, error) in `invalid` become `invalid`, each only if still the request
        sent (a user's edit since the claim ended its membership: back to pending).
        `watch_until`: its outcome was unknown and nothing was found; the intent stays
        watched until then."""

    # -- candidates (docs/design.md, "Harvesting candidate batches") ---------------------------

    async def record_candidate(self, intent_id: int, batch: MessageBatch, note: str) -> bool:
        """One transaction: `batch` (found late for intent `intent_id`) gets a row that is
        polled and harvested for the intent's tasks, its members copied, and is reported in
        duplicate_batches. Guard: its API id is not recorded yet (else False, no change)."""

    async def watched_intents(self, now: datetime) -> list[BatchRecord]:
        """Intents whose create's outcome was unknown (adopted from the list, or released),
        still watched at `now`: a batch of theirs may land late."""

    async def candidate_batches(self) -> list[CandidateBatch]:
        """Every suspected duplicate not acknowledged by an operator, with how far its harvest
        got, oldest first."""

    async def note_foreign_batches(self, api_batch_ids: Sequence[str]) -> int:
        """Batches listed in a reconcile window that batchd did not create (one
        transaction, each recorded once); returns how many were new."""

    async def shared_key_evidence(self) -> SharedKeyEvidence:
        """How many batches on the key batchd did not create, and since when."""

    # -- batches (design 4-5) -------------------------------------------------------------------

    async def batches_in(self, *states: str) -> list[BatchRecord]:
        """Batches in any of `states`, oldest first."""

    async def known_api_batch_ids(self) -> set[str]:
        """Every API batch id we know of: adopted or created, and suspected duplicates."""

    async def in_flight_request_count(self) -> int:
        """Requests of batches `creating`, `in_progress` or `canceling`."""

    async def update_batch(self, local_id: int, batch: MessageBatch) -> None:
        """Record a poll (5); `canceling` / `ended` move the state forward, never back."""

    async def note_not_found(self, local_id: int, since: datetime | None) -> None:
        """Set (first 404 of a run) or clear when the API stopped knowing the batch."""

    async def mark_lost(self, local_id: int, reason: str) -> int:
        """The API no longer knows the batch: `lost`, tasks requeued; returns how many."""

    async def note_short_stream(self, local_id: int, note: str) -> int:
        """Count a whole results stream with fewer lines than requests; returns the count."""

    async def note_download_failed(self, local_id: int, note: str) -> int:
        """Count a failed results download; returns the attempts so far."""

    async def batches_due_for_poll(self, interval_s: float) -> list[BatchRecord]:
        """In-flight batches (`in_progress`, `canceling`) due for a poll, oldest first, now
        claimed for `interval_s` so that other daemons skip them meanwhile (one short
        transaction; SQLite: every in-flight batch, nothing written)."""

    # -- collecting, shared by every daemon (see "Several daemons") -----------------------------

    async def take_ended_batch(
        self, holder: str, lease_s: float, skip: Collection[int] = ()
    ) -> TakenBatch | None:
        """The oldest `ended` batch no other holder's lease covers (and not in `skip`),
        now leased to `holder` for `lease_s` (one transaction); None when none is left."""

    async def renew_collection(self, local_id: int, holder: str, lease_s: float) -> bool:
        """Extend `holder`'s lease on an ended batch by `lease_s` from now; False when it no
        longer holds it (taken over, given back, or the batch is no longer `ended`)."""

    async def give_back_collection(self, local_id: int, holder: str) -> None:
        """End `holder`'s lease early (a collection that stopped without finishing), so that
        any daemon may take the batch at once; a lease it no longer holds is left alone."""

    async def duplicate_batches(self) -> list[DuplicateBatch]:
        """Every suspected duplicate batch not acknowledged by an operator, oldest first
        (acknowledged ones stay recorded, and known to `known_api_batch_ids`)."""

    # -- results (design 6-7) -------------------------------------------------------------------

    async def write_results(
        self, local_id: int, outcomes: Sequence[Outcome], max_attempts: int
    ) -> WriteReport:
        """Stage and apply a few lines of batch `local_id` in one transaction (6)."""

    def write_back_lane(self) -> AbstractAsyncContextManager[WriteBackLane]:
        """A write-back lane of its own, while the context lasts (waits for a free one)."""

    async def yield_to_writers(self, seconds: float) -> None:
        """No write of ours for `seconds`, so that users' writes waiting for the database
        get through (SQLite: its busy handler; a backend with row locks may just return)."""

    async def keep_unmatched(self, api_batch_id: str, lines: Sequence[KeptLine]) -> None:
        """Keep result lines that matched no task of their batch (a repeated one once),
        and count the usage of the billed ones in the usage ledger in the same
        transaction: paid is recorded, even for a line no task of ours can hold."""

    async def finish_batch(
        self,
        local_id: int,
        reason: str,
        *,
        archived: bool = False,
        matched_lines: int | None = None,
        holder: str | None = None,
    ) -> FinishReport:
        """`ended -> completed` (7), guarded; its origin from `matched_lines` (lines that
        named a task of its intent; None: not read); the intent's tasks without a line
        requeued and listed, at once, once no candidate of the intent is still open.
        `holder`: guarded by its collection lease too; refused (`lease_lapsed`, nothing
        changed) once the lease lapsed or another holder took the batch."""

    # -- user commands and reads ----------------------------------------------------------------

    async def status_counts(self) -> dict[TaskStatus, int]:
        """How many tasks are in each status, zeros included, in time independent of how
        many tasks there are: read on timers (/metrics, /healthz, progress, status)."""

    async def has_tasks(self, *statuses: TaskStatus) -> bool:
        """Whether any task is in one of `statuses`, from the tasks themselves (exact even
        if kept counts drifted): the daemon's idle and anything-pending decisions."""

    async def tasks_by_custom_id(self, custom_ids: Sequence[str]) -> list[TaskRow]:
        """The tasks asked for, in the order asked; unknown custom_ids are left out."""

    def iter_result_lines(
        self, statuses: Sequence[TaskStatus], *, page_size: int = 1000
    ) -> AsyncIterator[ResultLine]:
        """Tasks in `statuses` that have a result, by id, in pages; a page reads only rows
        of `statuses` (never every pending row again)."""

    def iter_result_rows(
        self, statuses: Sequence[TaskStatus], *, page_size: int = 1000
    ) -> AsyncIterator[list[ResultRow]]:
        """`iter_result_lines` in lists (none empty, at most `page_size` rows each), each
        result as its JSON's UTF-8 bytes: what `batchd results` writes, with no work per
        row beyond the line's own (the export's rate is per-row costs, issue 16)."""

    async def request_cancel(self, custom_ids: Sequence[str]) -> CancelReport:
        """Cancel pending tasks now; flag submitted ones for when their result comes back.
        Reads the asked rows only (by custom_id), however many tasks are pending."""

    async def batches_to_cancel(self) -> list[BatchRecord]:
        """In-progress batches in which every task still waiting was canceled by the user."""

    async def mark_canceling(self, local_id: int) -> None:
        """We asked the API to cancel the batch (`in_progress -> canceling`)."""

    async def retry_tasks(
        self, statuses: Sequence[TaskStatus], custom_ids: Sequence[str] = ()
    ) -> int:
        """Put final tasks (of `statuses`, optionally only `custom_ids`) back in the queue,
        each as a new request: its revision moves on and its membership of every batch that
        may still answer the old one ends, so no line of those is written to it."""

    def leadership(
        self, stop: asyncio.Event, on_standby: Callable[[str], None]
    ) -> AbstractAsyncContextManager[Leadership]:
        """Try to lead the daemons of this database for the duration (`on_standby` called
        once while another leads). SQLite: its file lock already admits one daemon, so it
        leads at once and for good."""

    def collector_liveness(self, holder: str) -> AbstractAsyncContextManager[None]:
        """While the context lasts, show that `holder` lives (PostgreSQL: a session lock on
        a connection of its own), so that a collection lease it took meanwhile is taken
        over as soon as it dies rather than at the lease's expiry. SQLite: nothing."""

    def listen_for_tasks(self, wake: Callable[[], None]) -> AbstractAsyncContextManager[None]:
        """While the context lasts, call `wake()` soon after users commit new tasks, and
        after every reconnect (notifications sent meanwhile are lost). A store that cannot
        tell (SQLite) never calls it: the daemon's poll tick finds new tasks."""

    # --- issue 14 reads ---

    async def completed_since(self, since: datetime) -> tuple[int, datetime | None]:
        """Tasks that reached a final status at or after `since`, and the first such time."""

    async def recent_batches(
        self, limit: int, states: Sequence[BatchState] = ()
    ) -> list[BatchRecord]:
        """The newest `limit` batches (of `states`, or any), newest first; reads about
        `limit` rows however many batches are remembered (`batchd batches`)."""

    async def tasks_in_status(self, status: TaskStatus, limit: int) -> list[TaskRow]:
        """Up to `limit` tasks in `status`, oldest first; reads about `limit` rows however
        many tasks there are (`batchd tasks`)."""

    async def cancel_waiting(self, statuses: Sequence[TaskStatus]) -> WaitingCancelReport:
        """`cancel --all / --status`: every task waiting in `statuses` (pending, submitted)
        when the call began is canceled (pending) or flagged (submitted, as
        `request_cancel` does). Several short transactions, not one (users' writes get
        through): a crash midway leaves what was done, and running it again finishes. A
        task the daemon moves between pending and submitted meanwhile is still reached."""

    async def acknowledge_duplicates(
        self, api_batch_ids: Sequence[str], note: str
    ) -> AcknowledgeReport:
        """An operator has seen these suspected duplicates (one transaction): they stay
        recorded, with the time and `note`, and `duplicate_batches` no longer returns them."""

    # -- operator views: /metrics and the web view read these every few seconds ------------------

    async def oldest_pending_created_at(self) -> datetime | None:
        """When the longest-waiting pending task was inserted; None when none is pending."""

    async def batch_completions_since(self, since: datetime) -> list[tuple[datetime, int, int]]:
        """(completed_at, succeeded, not succeeded) per batch whose results were all stored
        at or after `since`, oldest first."""

    async def latest_failed_tasks(self, limit: int) -> list[TaskRow]:
        """Up to `limit` errored, expired or invalid tasks, most recently finished first
        (among the newest failed tasks of each status; no result bodies)."""
