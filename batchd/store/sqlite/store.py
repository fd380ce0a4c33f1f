"""Every SQL statement of batchd, behind methods named for what they mean.

One writer connection behind an asyncio.Lock (pitfalls: coroutines sharing a connection
share its transaction), one reader connection, and two write-back lanes (connections
that stage results apart and apply them under the same lock). Every write is one `BEGIN
IMMEDIATE` transaction run in a shielded inner task, so a cancelled caller never leaves
half of one behind. See docs/design.md for the states and the transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, cast

import aiosqlite
import orjson

from batchd.api.wire import MessageBatch, RequestCounts, parse_timestamp
from batchd.crashpoints import crash_point
from batchd.domain import (
    FINAL_TASK_STATUSES,
    BatchRecord,
    BatchState,
    Outcome,
    PendingTask,
    TaskRow,
    TaskStatus,
    WriteReport,
)
from batchd.store.sqlite.staging import StagingKeys

Clock = Callable[[], datetime]
Db = aiosqlite.Connection
Row = tuple[Any, ...]
# How a store call holds the writer: a write transaction, a transaction that writes only
# the staging database, or no transaction at all (ATTACH and DETACH refuse to run in one).
_WriteMode = Literal["immediate", "staging", "no_transaction"]
P = ParamSpec("P")
T = TypeVar("T")

# Bigger pages and cache roughly halve the shuffled UPDATEs of the write-back (pitfalls).
_PAGE_SIZE = 16384
_PRAGMAS = (
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    # 16 MB, the writer's and each write-back lane's: a lane's applied range is ~7 MB of pages
    # for 5,000 tasks; the writer's claims and polls were no faster with 64 MB, which only
    # grew the daemon (bench/memory.py: 163 → 134 MB). The lanes were slower with 8 MB.
    "PRAGMA cache_size = -16384",
    # No temp_store = MEMORY: a multi-row UPDATE keeps a statement journal of every page it
    # changes, which in memory grew the daemon by ~340 MB claiming a 256 MB batch (bench/).
)
# The reader streams pending rows and counts: the OS page cache serves it as well, and a
# second 64 MB cache filled by reading a 256 MB batch's params would be ~30% of the RSS.
_READER_CACHE = "PRAGMA cache_size = -8192"
# Write-back lanes (`Store.write_back_lane`): connections of their own, each with its own
# staging, so that one batch's lines are parsed and staged while another batch is applied.
# Two: the apply is one writer at a time anyway; a third lane would only wait for it.
_WRITE_BACK_LANES = 2
_ENQUEUE_CHUNK = 5000
_MIGRATION_FILE = re.compile(r"(\d+)_(\w+)\.sql")
_RESULT_TYPES = frozenset({"succeeded", "errored", "canceled", "expired"})
_USER_CANCELED = "canceled at user request"
_STATE_OF_PROCESSING = {
    "in_progress": BatchState.IN_PROGRESS,
    "canceling": BatchState.CANCELING,
    "ended": BatchState.ENDED,
}
# What to tell a user for the SQLite errors that come from the environment.
_HINTS = (
    ("readonly", "this user must be able to write the file and its directory"),
    ("unable to open", "the directory must exist and be writable by this user"),
    ("disk is full", "free some disk space"),
    ("not a database", "the path points at a file that is not a SQLite database"),
    ("locked", "another process held the write lock longer than busy_timeout_ms"),
)


class StoreError(Exception):
    """The database cannot be used as it is (read-only, full, newer schema...)."""


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer batchd than this one."""


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


@dataclass(frozen=True, slots=True)
class _Migration:
    version: int
    name: str
    script: str


@dataclass(slots=True)
class _Connection:
    """A connection that writes, the lock that gives it one transaction at a time, and the
    keys of the lines in its staging database."""

    db: Db
    lock: asyncio.Lock
    staging_keys: StagingKeys


class _Rollback(Exception):
    """Raised inside a transaction body to undo it; never leaves the store."""


class Store:
    """One writer connection behind an asyncio.Lock, one reader connection, and the
    write-back lanes (each a connection whose writes to the database take that lock too)."""

    def __init__(
        self,
        path: Path,
        stack: AsyncExitStack,
        writer: Db,
        reader: Db,
        clock: Clock,
        *,
        busy_timeout_ms: int,
    ):
        self._path = path
        self._stack = stack
        self._writer = writer
        self._reader = reader
        self._clock = clock
        self._lock = asyncio.Lock()
        self._writes: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._busy_timeout_ms = busy_timeout_ms
        self._main = _Connection(writer, self._lock, StagingKeys())
        self._lanes: asyncio.Queue[_Connection] | None = None
        self._lanes_opening = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        busy_timeout_ms: int = 5000,
        clock: Clock | None = None,
        migrate: bool = True,
    ) -> Store:
        """Open (creating if needed) the database at `path`; apply missing migrations."""
        stack = AsyncExitStack()
        try:
            with _sqlite_errors(path, "open"):
                _create_group_writable(path)
                writer = await _connect(stack, path, busy_timeout_ms, new_page_size=True)
                await _attach_staging(writer)
                reader = await _connect(stack, path, busy_timeout_ms, new_page_size=False)
                # A stray write through the reader would bypass the lock: forbid it.
                await reader.execute("PRAGMA query_only = ON")
                await reader.execute(_READER_CACHE)
            store = cls(
                path, stack, writer, reader, clock or _utc_now, busy_timeout_ms=busy_timeout_ms
            )
            if migrate:
                await store.migrate()
            else:
                await store._check_version(_shipped_migrations())
        except BaseException:
            await stack.aclose()
            raise
        return store

    async def close(self) -> None:
        """Let a write in progress finish (it may be shielded from its caller), then close."""
        self._closed = True
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._stack.aclose()

    async def migrate(self) -> list[int]:
        """Apply every shipped migration not yet recorded, each in its own transaction."""
        shipped = _shipped_migrations()
        await self._transact(_create_migrations_table)
        await self._check_version(shipped)
        applied = []
        for migration in shipped:
            if await self._transact(self._apply_migration, migration):
                applied.append(migration.version)
        return applied

    async def _check_version(self, shipped: list[_Migration]) -> None:
        supported = max((m.version for m in shipped), default=0)
        recorded = await self._recorded_version()
        if recorded > supported:
            raise SchemaTooNewError(
                f"{self._path}: database schema version {recorded} is newer than this batchd "
                f"supports ({supported}); upgrade batchd"
            )

    async def _recorded_version(self) -> int:
        exists = await self._read(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        )
        if not exists:
            return 0
        rows = await self._read("SELECT coalesce(max(version), 0) FROM schema_migrations")
        return int(rows[0][0])

    async def _apply_migration(self, db: Db, migration: _Migration) -> bool:
        # Checked inside the transaction: another process may have migrated meanwhile.
        done = await db.execute_fetchall(
            "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
        )
        if list(done):
            return False
        # Statement by statement: executescript would COMMIT first and escape the lock.
        for statement in _statements(migration.script):
            await db.execute(statement)
        await db.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, self._now()),
        )
        return True

    # -- transactions ------------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self, mode: _WriteMode, conn: _Connection) -> AsyncIterator[Db]:
        """The one way to write: the locks, `BEGIN IMMEDIATE`, COMMIT or ROLLBACK.

        Every write to the database file holds the store's lock, whichever connection makes
        it: our own connections never wait on each other in SQLite's busy handler. A lane's
        staging-only transaction holds only the lane's lock, so it runs while another
        connection writes.
        """
        async with AsyncExitStack() as locks:
            if mode == "immediate" and conn.lock is not self._lock:
                await locks.enter_async_context(self._lock)  # always before a lane's lock
            await locks.enter_async_context(conn.lock)
            db = conn.db
            if mode == "no_transaction":  # ATTACH / DETACH: refused inside a transaction
                yield db
                return
            # IMMEDIATE waits for the write lock under busy_timeout; a deferred transaction
            # that upgrades would fail at once with "database is locked" (pitfalls). A body
            # that writes only the staging database never upgrades: its deferred BEGIN
            # takes no write lock on the database file, so users' INSERTs do not wait.
            await db.execute("BEGIN" if mode == "staging" else "BEGIN IMMEDIATE")
            try:
                yield db
                if mode == "immediate":
                    crash_point("store_commit")  # tests/crash: a kill -9 inside a transaction
                await db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (disk full, I/O error).
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise

    async def _transact(
        self, body: Callable[Concatenate[Db, P], Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `body(db, ...)` as one transaction in a task the caller's cancellation can't stop.

        Cancelling an awaited statement does not stop it (pitfalls), so a cancelled caller
        must not be able to interrupt the body between statements either.
        """
        return await self._shielded("immediate", self._main, body, *args, **kwargs)

    async def _shielded(
        self,
        mode: _WriteMode,  # positional, as `conn`: keywords belong to the body
        conn: _Connection,
        body: Callable[Concatenate[Db, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        if self._closed:
            raise StoreError(f"{self._path}: the store is closed")

        async def run() -> T:
            with _sqlite_errors(self._path, "write to"):
                async with self._write(mode, conn) as db:
                    return await body(db, *args, **kwargs)

        task = asyncio.create_task(run(), name="batchd-store-write")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    async def _read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Row]:
        """One statement on the reader, fully fetched: no read transaction outlives it."""
        with _sqlite_errors(self._path, "read"):
            return cast(list[Row], list(await self._reader.execute_fetchall(sql, params)))

    def _now(self) -> str:
        return _format_time(self._clock())

    # -- intake ------------------------------------------------------------------------------

    async def enqueue(self, items: Iterable[tuple[str, str]]) -> EnqueueReport:
        """Insert new tasks; custom_ids already stored or repeated in `items` are reported."""
        inserted = 0
        duplicates: list[str] = []
        seen: set[str] = set()
        source = iter(items)
        while chunk := list(islice(source, _ENQUEUE_CHUNK)):
            fresh: dict[str, str] = {}
            for custom_id, params in chunk:
                if custom_id not in seen and custom_id not in fresh:
                    fresh[custom_id] = params
            existing, count = await self._transact(self._insert_tasks, fresh)
            inserted += count
            for custom_id, _ in chunk:
                if custom_id in seen or custom_id in existing:
                    duplicates.append(custom_id)
                seen.add(custom_id)
        return EnqueueReport(inserted, tuple(duplicates))

    async def _insert_tasks(self, db: Db, fresh: dict[str, str]) -> tuple[set[str], int]:
        rows = await db.execute_fetchall(
            "SELECT custom_id FROM tasks WHERE custom_id IN (SELECT value FROM json_each(?))",
            (_json_list(fresh),),
        )
        existing = {row[0] for row in rows}
        new = [(cid, params) for cid, params in fresh.items() if cid not in existing]
        count = await _run_many(
            db, "INSERT OR IGNORE INTO tasks (custom_id, params) VALUES (?, ?)", new
        )
        return existing, count

    async def iter_pending(
        self, *, page_size: int = 1000, page_bytes: int = 16 * 1024 * 1024
    ) -> AsyncIterator[PendingTask]:
        """Pending tasks, oldest first, a page per query (keyset: no long read transaction).

        A page holds at most `page_size` rows and, unless one row alone is larger, at most
        `page_bytes` of params: a thousand requests of a few MB each never sit in memory
        at once. Their sizes are read first (SQLite reads the rows, Python only ints).
        """
        after = 0
        while True:
            sizes = await self._read(
                "SELECT id, length(CAST(params AS BLOB)) FROM tasks"
                " WHERE status = 'pending' AND id > ? ORDER BY id LIMIT ?",
                (after, page_size),
            )
            if not sizes:
                return
            last, total = sizes[0][0], 0
            for task_id, size in sizes:
                if total and total + (size or 0) > page_bytes:
                    break
                last, total = task_id, total + (size or 0)
            # As bytes, with their types: a user's INSERT may store a BLOB or text that is
            # not UTF-8, which sqlite3 would fail to decode for the whole page.
            rows = await self._read(
                "SELECT id, CAST(custom_id AS BLOB), CAST(params AS BLOB), attempts,"
                " typeof(custom_id), typeof(params) FROM tasks"
                " WHERE status = 'pending' AND id > ? AND id <= ? ORDER BY id",
                (after, last),
            )
            for row in rows:
                yield _pending_task(row)
            if len(sizes) < page_size and last == sizes[-1][0]:
                return
            after = last

    async def mark_invalid(self, reasons: Sequence[tuple[int, str]]) -> int:
        """Pending tasks the chunker refused become `invalid` with the reason; returns count."""
        return await self._transact(self._mark_invalid, reasons)

    async def _mark_invalid(self, db: Db, reasons: Sequence[tuple[int, str]]) -> int:
        now = self._now()
        return await _run_many(
            db,
            "UPDATE tasks SET status = 'invalid', error = ?, completed_at = ?"
            " WHERE id = ? AND status = 'pending'",
            [(reason, now, task_id) for task_id, reason in reasons],
        )

    # -- submission (design steps 1-4) ---------------------------------------------------------

    async def record_intent(self, task_ids: Sequence[int], body_bytes: int) -> int | None:
        """Claim the tasks for a new `creating` batch; None if any stopped being pending."""
        if not task_ids:
            raise ValueError("record_intent needs at least one task")
        try:
            return await self._transact(self._claim, task_ids, body_bytes)
        except _Rollback:
            return None

    async def _claim(self, db: Db, task_ids: Sequence[int], body_bytes: int) -> int:
        now = self._now()
        async with db.execute(
            "INSERT INTO batches (state, request_count, body_bytes, intent_at)"
            " VALUES ('creating', ?, ?, ?)",
            (len(task_ids), body_bytes, now),
        ) as cursor:
            local_id = cursor.lastrowid
        assert local_id is not None
        # One JSON array parameter: no limit on bound variables, no temp table to fill.
        task_list = _json_list(task_ids)
        claimed = await _run(
            db,
            "UPDATE tasks SET status = 'submitted', batch_id = ?, attempts = attempts + 1,"
            " submitted_at = ?, error = NULL"
            " WHERE id IN (SELECT value FROM json_each(?)) AND status = 'pending'",
            (local_id, now, task_list),
        )
        if claimed != len(task_ids):
            raise _Rollback
        await db.execute(
            "INSERT INTO batch_tasks (batch_id, task_id) SELECT ?, value FROM json_each(?)",
            (local_id, task_list),
        )
        return local_id

    async def mark_created(
        self, local_id: int, batch: MessageBatch, duplicates: Sequence[str] = ()
    ) -> bool:
        """Record the API's id for a `creating` batch (also adopts one found by reconcile).

        In the same transaction, so that a kill cannot leave a paid batch unrecorded:
        `duplicates` (other API batches reconcile matched) go to duplicate_batches, and so
        does `batch` itself if the local batch is no longer `creating` (returns False).
        """
        return await self._transact(self._mark_created, local_id, batch, duplicates)

    async def _mark_created(
        self, db: Db, local_id: int, batch: MessageBatch, duplicates: Sequence[str]
    ) -> bool:
        now = self._now()
        unrecorded = [
            (api_id, f"same request count created in the window of local batch {local_id}")
            for api_id in duplicates
        ]
        changed = await _run(
            db,
            "UPDATE batches SET api_batch_id = :api_id, state = :state, submitted_at = :now,"
            " api_created_at = :created, processing_status = :processing,"
            " request_counts = :counts, results_url = :url, ended_at = :ended"
            " WHERE id = :local AND state = 'creating'",
            {
                **_batch_params(batch),
                "state": _STATE_OF_PROCESSING[batch["processing_status"]].value,
                "created": _format_time(parse_timestamp(batch["created_at"])),
                "now": now,
                "local": local_id,
            },
        )
        if changed != 1:
            note = f"created for local batch {local_id} after its intent was released"
            unrecorded.append((batch["id"], note))
        await _run_many(
            db,
            "INSERT OR IGNORE INTO duplicate_batches (api_batch_id, local_id, detected_at, note)"
            " VALUES (?, ?, ?, ?)",
            [(api_id, local_id, now, note) for api_id, note in unrecorded],
        )
        return changed == 1

    async def release_intent(
        self, local_id: int, reason: str, invalid: Sequence[tuple[str, str]] = ()
    ) -> None:
        """The create was refused: the batch is `rejected`, its tasks go back (no attempt)."""
        await self._transact(self._release_intent, local_id, reason, invalid)

    async def _release_intent(
        self, db: Db, local_id: int, reason: str, invalid: Sequence[tuple[str, str]]
    ) -> None:
        rejected = await _run(
            db,
            "UPDATE batches SET state = 'rejected', note = ? WHERE id = ? AND state = 'creating'",
            (reason, local_id),
        )
        if not rejected:
            return
        now = self._now()
        await _run_many(
            db,
            "UPDATE tasks SET status = 'invalid', error = ?, completed_at = ?,"
            " attempts = attempts - 1"
            " WHERE custom_id = ? AND batch_id = ? AND status = 'submitted'",
            [(error, now, custom_id, local_id) for custom_id, error in invalid],
        )
        await _cancel_flagged(db, local_id, now, attempts_delta=-1)
        await _run(
            db,
            "UPDATE tasks SET status = 'pending', batch_id = NULL, attempts = attempts - 1,"
            " error = NULL WHERE batch_id = ? AND status = 'submitted'",
            (local_id,),
        )

    # -- batches -------------------------------------------------------------------------------

    async def batches_in(self, *states: str) -> list[BatchRecord]:
        """Batches in any of `states`, oldest first."""
        if not states:
            return []
        rows = await self._read(
            f"SELECT {_BATCH_COLUMNS} FROM batches"
            " WHERE state IN (SELECT value FROM json_each(?)) ORDER BY id",
            (_json_list(states),),
        )
        return [_batch_record(row) for row in rows]

    async def known_api_batch_ids(self) -> set[str]:
        """Every API batch id we know of: adopted or created, and suspected duplicates."""
        rows = await self._read(
            "SELECT api_batch_id FROM batches WHERE api_batch_id IS NOT NULL"
            " UNION SELECT api_batch_id FROM duplicate_batches"
        )
        return {row[0] for row in rows}

    async def in_flight_request_count(self) -> int:
        """Requests counting against the API's processing queue (ours, at least)."""
        rows = await self._read(
            "SELECT coalesce(sum(request_count), 0) FROM batches"
            " WHERE state IN ('creating', 'in_progress', 'canceling')"
        )
        return int(rows[0][0])

    async def update_batch(self, local_id: int, batch: MessageBatch) -> None:
        """Record a poll; `ended` / `canceling` move the batch state forward, never back."""
        await self._transact(self._update_batch, local_id, batch)

    async def _update_batch(self, db: Db, local_id: int, batch: MessageBatch) -> None:
        await _run(
            db,
            "UPDATE batches SET processing_status = :processing, request_counts = :counts,"
            " results_url = :url, ended_at = :ended, last_polled_at = :now,"
            " not_found_since = NULL,"
            " state = CASE"
            "   WHEN :processing = 'ended' AND state IN ('in_progress', 'canceling') THEN 'ended'"
            "   WHEN :processing = 'canceling' AND state = 'in_progress' THEN 'canceling'"
            "   ELSE state END"
            " WHERE id = :local AND api_batch_id = :api_id"
            " AND state IN ('in_progress', 'canceling', 'ended')",
            {**_batch_params(batch), "now": self._now(), "local": local_id},
        )

    async def note_not_found(self, local_id: int, since: datetime | None) -> None:
        """Set (first 404 of a run, spec 7.6) or clear `not_found_since`."""
        stamp = None if since is None else _format_time(since)
        await self._transact(
            _run_in, "UPDATE batches SET not_found_since = ? WHERE id = ?", (stamp, local_id)
        )

    async def mark_lost(self, local_id: int, reason: str) -> int:
        """The API no longer knows the batch: requeue its tasks; returns how many."""
        return await self._transact(self._mark_lost, local_id, reason)

    async def _mark_lost(self, db: Db, local_id: int, reason: str) -> int:
        rows = list(
            await db.execute_fetchall(
                "UPDATE batches SET state = 'lost', note = ? WHERE id = ?"
                " AND state IN ('in_progress', 'canceling', 'ended') RETURNING api_batch_id",
                (reason, local_id),
            )
        )
        if not rows:
            return 0
        await _cancel_flagged(db, local_id, self._now(), attempts_delta=0)
        # Attempts stay counted: the API may have processed (and billed) them.
        return await _run(
            db,
            "UPDATE tasks SET status = 'pending', batch_id = NULL, error = ?"
            " WHERE batch_id = ? AND status = 'submitted'",
            (f"batch {rows[0][0]} lost: {reason}", local_id),
        )

    async def note_short_stream(self, local_id: int, note: str) -> int:
        """Count a whole results stream with fewer lines than requests; returns how many
        such streams so far (transport failures are counted apart, `note_download_failed`)."""
        rows = await self._transact(
            _fetch_in,
            "UPDATE batches SET download_attempts = download_attempts + 1,"
            " short_downloads = short_downloads + 1, note = ?"
            " WHERE id = ? RETURNING short_downloads",
            (note, local_id),
        )
        if not rows:
            raise StoreError(f"{self._path}: no batch with local id {local_id}")
        return int(rows[0][0])

    async def note_download_failed(self, local_id: int, note: str) -> int:
        """Count a failed results download; returns the attempts so far."""
        rows = await self._transact(
            _fetch_in,
            "UPDATE batches SET download_attempts = download_attempts + 1, note = ?"
            " WHERE id = ? RETURNING download_attempts",
            (note, local_id),
        )
        if not rows:
            raise StoreError(f"{self._path}: no batch with local id {local_id}")
        return int(rows[0][0])

    async def duplicate_batches(self) -> list[tuple[str, str, str]]:
        """(api_batch_id, detected_at, note) of every suspected duplicate, oldest first."""
        rows = await self._read(
            "SELECT api_batch_id, detected_at, note FROM duplicate_batches"
            " ORDER BY detected_at, api_batch_id"
        )
        return [(row[0], row[1], row[2]) for row in rows]

    # -- results (design steps 6-7) --------------------------------------------------------------

    async def write_results(
        self, local_id: int, outcomes: Sequence[Outcome], max_attempts: int
    ) -> WriteReport:
        """Apply a chunk of result lines to the tasks of batch `local_id`, in one transaction.

        The collector stages a whole batch instead (`stage_results`, `apply_staged`); this
        is the same SQL in one transaction, for a few lines at once.
        """
        _check_result_types(outcomes)
        return await self._transact(self._write_results, local_id, outcomes, max_attempts)

    async def _write_results(
        self, db: Db, local_id: int, outcomes: Sequence[Outcome], max_attempts: int
    ) -> WriteReport:
        await _clear_staging(db)
        staged = await self._stage(db, self._main.staging_keys, local_id, outcomes)
        applied = await self._apply_range(db, local_id, max_attempts, -1, 0)
        await _clear_staging(db)  # frees the chunk's text now
        written, requeued = (applied.report.written, applied.report.requeued) if applied else (0, 0)
        # A repeated unmatched line counts once, as a repeated matched one does.
        unmatched = tuple(dict.fromkeys(outcomes[at].custom_id for at in staged.unmatched))
        ignored = len(outcomes) - written - requeued - len(unmatched)
        return WriteReport(written, requeued, ignored, unmatched)

    @asynccontextmanager
    async def write_back_lane(self) -> AsyncIterator[WriteBackLane]:
        """A write-back lane of its own (waits for a free one): a connection with its own
        staging, so that one batch is staged while another lane's batch is applied."""
        lanes = await self._write_back_lanes()
        conn = await lanes.get()
        try:
            yield WriteBackLane(self, conn)
        finally:
            lanes.put_nowait(conn)

    async def _write_back_lanes(self) -> asyncio.Queue[_Connection]:
        # Opened at the first write-back, not at open: `batchd status` and the other
        # commands never need them.
        async with self._lanes_opening:
            if self._closed:
                raise StoreError(f"{self._path}: the store is closed")
            if self._lanes is None:
                self._lanes = await self._open_lanes()
            return self._lanes

    async def _open_lanes(self) -> asyncio.Queue[_Connection]:
        lanes: asyncio.Queue[_Connection] = asyncio.Queue()
        # All or none: lanes half opened by a failed attempt (out of file descriptors, a
        # temporary directory that refuses the staging file) are closed at once, not kept
        # until the store closes while every retry opens more.
        async with AsyncExitStack() as opening:
            for _ in range(_WRITE_BACK_LANES):
                with _sqlite_errors(self._path, "open"):
                    db = await _connect(
                        opening, self._path, self._busy_timeout_ms, new_page_size=False
                    )
                    await _attach_staging(db)
                lanes.put_nowait(_Connection(db, asyncio.Lock(), StagingKeys()))
            if self._closed:
                raise StoreError(f"{self._path}: the store is closed")
            self._stack.push_async_callback(opening.pop_all().aclose)
        return lanes

    async def hold_writes(self, seconds: float) -> None:
        """No write of ours, on any connection, for `seconds`: a user's write waiting in
        SQLite's busy handler gets the lock at its next try."""
        async with self._lock:
            await asyncio.sleep(seconds)

    async def clear_staging(self) -> None:
        """`WriteBackLane.clear_staging` on the writer connection's own staging."""
        await WriteBackLane(self, self._main).clear_staging()

    async def stage_results(self, local_id: int, outcomes: Sequence[Outcome]) -> StageReport:
        """`WriteBackLane.stage_results` on the writer connection's own staging."""
        return await WriteBackLane(self, self._main).stage_results(local_id, outcomes)

    async def apply_staged(
        self, local_id: int, max_attempts: int, max_rows: int, after_task_id: int = 0
    ) -> AppliedRange | None:
        """`WriteBackLane.apply_staged` on the writer connection's own staging."""
        return await WriteBackLane(self, self._main).apply_staged(
            local_id, max_attempts, max_rows, after_task_id
        )

    async def _reset_staging(self, db: Db, conn: _Connection) -> None:
        """Replace the staging database by an empty one, dropping every line at once.

        If a previous reset stopped halfway (detached, the attach failed), this one
        finishes it: staging heals at the next download instead of failing every one.
        """
        if await db.execute_fetchall(_STAGING_ATTACHED):
            await db.execute("DETACH DATABASE staging")
        await _attach_staging(db)
        conn.staging_keys = StagingKeys()

    async def _stage(
        self, db: Db, keys: StagingKeys, local_id: int, outcomes: Sequence[Outcome]
    ) -> StageReport:
        first_task_id = next(iter(await db.execute_fetchall(_FIRST_MEMBER, (local_id,))))[0]
        found = await db.execute_fetchall(
            _MEMBER_TASK_IDS,
            {"local": local_id, "custom_ids": _json_list(o.custom_id for o in outcomes)},
        )
        task_ids: dict[str, int] = dict(cast(Iterable[tuple[str, int]], found))
        rows: list[Row] = []
        unmatched: list[int] = []
        for position, outcome in enumerate(outcomes):
            task_id = task_ids.get(outcome.custom_id)
            if task_id is None:
                unmatched.append(position)
            else:
                key = keys.key(first_task_id, task_id)
                rows.append(_staging_row(key, local_id, task_id, outcome))
        # The first line for a task wins, a repeated one is ignored (as if it were
        # downloaded again). Only that conflict: a key used twice would be our bug, and
        # must fail loudly rather than drop a line.
        staged = await _run_many(db, _INSERT_STAGING, rows)
        return StageReport(staged, len(rows) - staged, tuple(unmatched))

    async def _apply_range(
        self, db: Db, local_id: int, max_attempts: int, max_rows: int, after_task_id: int
    ) -> AppliedRange | None:
        # Only reads staging: deleting the applied rows here (scattered over the staging
        # table) journaled most of its pages in every transaction, doubling the lock time.
        rows = await db.execute_fetchall(_NEXT_RANGE, (after_task_id, max_rows))
        first, last, count = next(iter(rows))
        if not count:
            return None
        names = {
            "local": local_id,
            "max_attempts": max_attempts,
            "now": self._now(),
            "first": first,
            "last": last,
        }
        changed = list(await db.execute_fetchall(_APPLY_STAGED, names))
        requeued = sum(1 for (status,) in changed if status == TaskStatus.PENDING)
        report = WriteReport(len(changed) - requeued, requeued, count - len(changed), ())
        return AppliedRange(last, report)

    async def keep_unmatched(self, api_batch_id: str, lines: Sequence[tuple[str, str]]) -> None:
        """Keep result lines that matched no task of their batch (never dropped)."""
        now = self._now()
        await self._transact(
            _run_many_in,
            "INSERT OR IGNORE INTO unmatched_results (api_batch_id, custom_id, line, received_at)"
            " VALUES (?, ?, ?, ?)",
            [(api_batch_id, custom_id, line, now) for custom_id, line in lines],
        )

    async def finish_batch(
        self, local_id: int, reason: str, *, archived: bool = False
    ) -> FinishReport:
        """All lines written (or, `archived`, none can be any more): requeue tasks that
        got none and list them in missing_results, mark the batch `completed`; at once."""
        return await self._transact(self._finish_batch, local_id, reason, archived)

    async def _finish_batch(
        self, db: Db, local_id: int, reason: str, archived: bool
    ) -> FinishReport:
        now = self._now()
        completed = await _run(
            db,
            "UPDATE batches SET state = 'completed', completed_at = ?"
            " WHERE id = ? AND state = 'ended'",
            (now, local_id),
        )
        if not completed:
            return FinishReport(())
        await _cancel_flagged(db, local_id, now, attempts_delta=0)
        rows = await db.execute_fetchall(
            "UPDATE tasks SET status = 'pending', batch_id = NULL, error = ?"
            " WHERE batch_id = ? AND status = 'submitted' RETURNING id, custom_id",
            (reason, local_id),
        )
        missing = tuple(custom_id for _, custom_id in sorted(rows))
        # In the same transaction: requests that will be sent (and paid for) again are
        # always on record (`batchd status`), even across a kill.
        kind = "archived" if archived else "no_line"
        await _run_many(
            db,
            "INSERT OR IGNORE INTO missing_results (api_batch_id, custom_id, detected_at, reason)"
            " SELECT api_batch_id, ?, ?, ? FROM batches WHERE id = ?",
            [(custom_id, now, kind, local_id) for custom_id in missing],
        )
        return FinishReport(missing)

    # -- user-facing reads and commands ------------------------------------------------------------

    async def status_counts(self) -> dict[TaskStatus, int]:
        """How many tasks are in each status, zeros included."""
        rows = await self._read("SELECT status, count(*) FROM tasks GROUP BY status")
        counts = dict.fromkeys(TaskStatus, 0)
        counts.update({TaskStatus(status): count for status, count in rows})
        return counts

    async def tasks_by_custom_id(self, custom_ids: Sequence[str]) -> list[TaskRow]:
        """The tasks asked for, in the order asked; unknown custom_ids are left out."""
        rows = await self._read(
            "SELECT t.custom_id, t.status, t.attempts, b.api_batch_id, t.error, t.result,"
            " t.created_at, t.submitted_at, t.completed_at"
            " FROM json_each(?) AS asked"
            " JOIN tasks AS t ON t.custom_id = asked.value"
            " LEFT JOIN batches AS b ON b.id = t.batch_id"
            " ORDER BY asked.key",
            (_json_list(dict.fromkeys(custom_ids)),),
        )
        return [TaskRow(row[0], TaskStatus(row[1]), *row[2:]) for row in rows]

    async def iter_result_lines(
        self, statuses: Sequence[TaskStatus], *, page_size: int = 1000
    ) -> AsyncIterator[tuple[str, str]]:
        """(custom_id, result JSON) of tasks in `statuses` that have a result, by id."""
        after = 0
        wanted = _json_list(statuses)
        while True:
            rows = await self._read(
                "SELECT id, custom_id, result FROM tasks"
                " WHERE status IN (SELECT value FROM json_each(?))"
                " AND result IS NOT NULL AND id > ? ORDER BY id LIMIT ?",
                (wanted, after, page_size),
            )
            for _, custom_id, result in rows:
                yield custom_id, result
            if len(rows) < page_size:
                return
            after = rows[-1][0]

    async def request_cancel(self, custom_ids: Sequence[str]) -> CancelReport:
        """Cancel pending tasks now; flag submitted ones for when their result comes back."""
        return await self._transact(self._request_cancel, list(dict.fromkeys(custom_ids)))

    async def _request_cancel(self, db: Db, custom_ids: list[str]) -> CancelReport:
        asked = _json_list(custom_ids)
        rows = await db.execute_fetchall(
            "SELECT custom_id, status FROM tasks"
            " WHERE custom_id IN (SELECT value FROM json_each(?))",
            (asked,),
        )
        status_of: dict[str, str] = {row[0]: row[1] for row in rows}
        await db.execute(
            "UPDATE tasks SET status = 'canceled', error = ?, completed_at = ?"
            " WHERE custom_id IN (SELECT value FROM json_each(?)) AND status = 'pending'",
            (_USER_CANCELED, self._now(), asked),
        )
        await db.execute(
            "UPDATE tasks SET cancel_requested = 1"
            " WHERE custom_id IN (SELECT value FROM json_each(?)) AND status = 'submitted'",
            (asked,),
        )

        def having(*statuses: str | None) -> tuple[str, ...]:
            return tuple(cid for cid in custom_ids if status_of.get(cid) in statuses)

        return CancelReport(
            canceled=having(TaskStatus.PENDING),
            flagged=having(TaskStatus.SUBMITTED),
            not_cancelable=having(*FINAL_TASK_STATUSES),
            unknown=having(None),
        )

    async def batches_to_cancel(self) -> list[BatchRecord]:
        """In-progress batches in which every task still waiting was canceled by the user."""
        rows = await self._read(
            f"SELECT {_BATCH_COLUMNS} FROM batches AS b WHERE state = 'in_progress'"
            " AND EXISTS (SELECT 1 FROM tasks AS t"
            "   WHERE t.batch_id = b.id AND t.status = 'submitted')"
            " AND NOT EXISTS (SELECT 1 FROM tasks AS t"
            "   WHERE t.batch_id = b.id AND t.status = 'submitted' AND t.cancel_requested = 0)"
            " ORDER BY id"
        )
        return [_batch_record(row) for row in rows]

    async def mark_canceling(self, local_id: int) -> None:
        """We asked the API to cancel the batch."""
        await self._transact(
            _run_in,
            "UPDATE batches SET state = 'canceling' WHERE id = ? AND state = 'in_progress'",
            (local_id,),
        )

    async def retry_tasks(
        self, statuses: Sequence[TaskStatus], custom_ids: Sequence[str] = ()
    ) -> int:
        """Put final tasks (of `statuses`, optionally only `custom_ids`) back in the queue."""
        not_final = set(statuses) - FINAL_TASK_STATUSES
        if not_final:
            raise ValueError(f"only final tasks can be retried, not {sorted(not_final)}")
        which = " AND custom_id IN (SELECT value FROM json_each(?))" if custom_ids else ""
        params = [_json_list(statuses)] + ([_json_list(custom_ids)] if custom_ids else [])
        # Usage and model go too: they would describe a result that is no longer there.
        return await self._transact(
            _run_in,
            "UPDATE tasks SET status = 'pending', attempts = 0, batch_id = NULL, result = NULL,"
            " error = NULL, cancel_requested = 0, completed_at = NULL, model = NULL,"
            " input_tokens = NULL, output_tokens = NULL, cache_creation_input_tokens = NULL,"
            " cache_read_input_tokens = NULL"
            f" WHERE status IN (SELECT value FROM json_each(?)){which}",
            params,
        )

    # --- issue 14 reads (web) ---
    # What /metrics and the web view read every few seconds: each walks an index for a
    # few rows (tasks_by_status, batches_by_state), never the finished tasks' history.

    # How many failed tasks of each status, newest by id, `latest_failed_tasks` orders by time.
    _failed_tasks_window = 10

    async def oldest_pending_created_at(self) -> datetime | None:
        """When the longest-waiting pending task was inserted; None when none is pending."""
        # Lowest id first on tasks_by_status: a retried task keeps its id and created_at,
        # so this is the one that has waited longest since it was first inserted.
        rows = await self._read(
            "SELECT created_at FROM tasks WHERE status = 'pending' ORDER BY id LIMIT 1"
        )
        return _parse_time(rows[0][0]) if rows else None

    async def batch_completions_since(self, since: datetime) -> list[tuple[datetime, int, int]]:
        """(completed_at, succeeded, not succeeded) of each batch whose results were all
        stored at or after `since`, in that order; counts as the API last reported them.

        Per batch rather than per task: tasks have no index on completed_at, and a scan of
        finished tasks on every refresh would grow with the history.
        """
        rows = await self._read(
            "SELECT completed_at, request_count, request_counts FROM batches"
            " WHERE state = 'completed' AND completed_at >= ? ORDER BY completed_at",
            (_format_time(since),),
        )
        completions = []
        for completed_at, request_count, counts_json in rows:
            counts = orjson.loads(counts_json) if counts_json else {}
            succeeded = int(counts.get("succeeded", 0))
            finished = sum(
                int(counts.get(key, 0)) for key in ("succeeded", "errored", "canceled", "expired")
            )
            # No counts (never polled to the end): every request is counted as not succeeded.
            failed = finished - succeeded if counts else int(request_count)
            completions.append((_parse_time(completed_at), succeeded, failed))
        return completions

    async def latest_failed_tasks(self, limit: int) -> list[TaskRow]:
        """Up to `limit` errored, expired or invalid tasks, most recently finished first.

        Among the newest `limit * 10` of each status by id: tasks have no index on
        completed_at, so an older task that failed again after a retry is seen only while
        it is among those (an index on (status, completed_at) would make this exact).
        """
        statuses = (TaskStatus.ERRORED, TaskStatus.EXPIRED, TaskStatus.INVALID)
        # One short walk per status down tasks_by_status (newest ids first), then the few
        # candidates are ordered by when they finished.
        per_status = " UNION ALL ".join(
            "SELECT * FROM (SELECT id FROM tasks WHERE status = ? ORDER BY id DESC LIMIT ?)"
            for _ in statuses
        )
        window = limit * self._failed_tasks_window
        rows = await self._read(
            "SELECT t.custom_id, t.status, t.attempts, b.api_batch_id, t.error, NULL,"
            " t.created_at, t.submitted_at, t.completed_at"
            f" FROM ({per_status}) AS recent JOIN tasks AS t ON t.id = recent.id"
            " LEFT JOIN batches AS b ON b.id = t.batch_id"
            " ORDER BY t.completed_at DESC, t.id DESC LIMIT ?",
            [value for status in statuses for value in (str(status), window)] + [limit],
        )
        return [TaskRow(row[0], TaskStatus(row[1]), *row[2:]) for row in rows]


# -- write-back SQL (design step 6) ------------------------------------------------------------


class WriteBackLane:
    """Stages a batch's result lines and applies them, on one connection of the store.

    The staging database belongs to the connection: lines staged on a lane are applied
    on the same lane. Staging writes only that database (no lock on the database file);
    applying holds the store's write lock like every other write.
    """

    def __init__(self, store: Store, conn: _Connection) -> None:
        self._store = store
        self._conn = conn

    async def clear_staging(self) -> None:
        """Forget staged lines (of a download that stopped midway): a batch stages alone."""
        store = self._store
        await store._shielded("no_transaction", self._conn, store._reset_staging, self._conn)

    async def stage_results(self, local_id: int, outcomes: Sequence[Outcome]) -> StageReport:
        """Keep a chunk of a batch's lines in the staging table; no task changes yet.

        Writes only the staging database, so it takes no write lock: users' INSERTs never
        wait, and neither does another lane applying its batch.
        """
        _check_result_types(outcomes)
        store, conn = self._store, self._conn
        return await store._shielded(
            "staging", conn, store._stage, conn.staging_keys, local_id, outcomes
        )

    async def apply_staged(
        self, local_id: int, max_attempts: int, max_rows: int, after_task_id: int = 0
    ) -> AppliedRange | None:
        """Apply the staged lines of the next `max_rows` task ids above `after_task_id` in
        one transaction; None once none is left. Staging is left as it is (`clear_staging`).
        """
        store = self._store
        return await store._shielded(
            "immediate",
            self._conn,
            store._apply_range,
            local_id,
            max_attempts,
            max_rows,
            after_task_id,
        )


# Where the staged lines of a batch wait: a private database ATTACHed to each connection
# that writes back (the lanes; the writer for `write_results`) as `staging` from '' (a
# temporary file SQLite creates 0600 and unlinks as it opens it; no RAM for it), never in
# the database file or its WAL. Staging takes no write lock and no
# fsync; a crash loses it, which is harmless: the batch is still `ended` and its results
# are downloaded and staged again. Clearing it is a DETACH (the file is dropped whole): a
# DELETE of a TEMP table walked every page of a batch's lines (0.2 s per 100,000).
# A transaction applies a contiguous range of task ids, whose rows share pages of `tasks`,
# instead of a shuffled chunk that touches every page (bench/README.md). Rows are keyed by
# the bucket of their task id (staging.py), appended within it in arrival order, and found
# by the task_id index: keying the table by task_id itself made staging 5x slower
# (shuffled inserts of ~1 KB rows split its pages), keying it by arrival made the apply
# read a random staging page per line. One batch is staged at a time (the collector
# clears it first).
_CREATE_STAGING = """
CREATE TABLE IF NOT EXISTS staging.results (
    seq INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL UNIQUE,
    batch_id INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    result_type TEXT NOT NULL,
    result_json TEXT NOT NULL,
    error TEXT,
    retryable INTEGER NOT NULL,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cache_creation_input_tokens INTEGER,
    cache_read_input_tokens INTEGER,
    model TEXT
)"""
_INSERT_STAGING = (
    "INSERT INTO staging.results"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # the columns above, in order
    " ON CONFLICT (task_id) DO NOTHING"
)
_STAGING_ATTACHED = "SELECT 1 FROM pragma_database_list WHERE name = 'staging'"
# Matched: a task with that custom_id was in this batch (batch_tasks remembers requeued
# ones, whose re-downloaded lines are then merely ignored by the guard below). custom_id is
# unique, so a line names at most one task: its rowid is looked up once, here.
# CROSS JOIN keeps the lines as the outer loop: the planner would otherwise walk every
# member of the batch for each chunk. (A dict of the whole batch's members was no faster
# and held ~12 MB per 100,000.)
_MEMBER_TASK_IDS = """
SELECT t.custom_id, t.id FROM json_each(:custom_ids) AS line
CROSS JOIN tasks AS t ON t.custom_id = line.value
CROSS JOIN batch_tasks AS m ON m.batch_id = :local AND m.task_id = t.id"""
_FIRST_MEMBER = "SELECT min(task_id) FROM batch_tasks WHERE batch_id = ?"
# The first and last task ids and the count of the next range of staged lines.
_NEXT_RANGE = """
SELECT min(task_id), max(task_id), count(*)
FROM (SELECT task_id FROM staging.results WHERE task_id > ? ORDER BY task_id LIMIT ?)"""
# Another try: a transient failure, attempts left, and the user did not ask to cancel.
_RETRY = """(s.result_type <> 'succeeded' AND s.retryable
    AND tasks.attempts < :max_attempts AND tasks.cancel_requested = 0)"""
# The guard: only tasks of THIS batch still waiting, so a repeated line is a no-op.
_STAGED_TASKS = """s.task_id BETWEEN :first AND :last AND s.batch_id = :local
    AND tasks.id = s.task_id AND tasks.custom_id = s.custom_id
    AND tasks.batch_id = :local AND tasks.status = 'submitted'"""
# RETURNING the new status counts the requeued tasks (now 'pending') without a second join.
_APPLY_STAGED = f"""
UPDATE tasks SET
    status = CASE
        WHEN s.result_type = 'succeeded' THEN 'succeeded'
        WHEN s.result_type = 'canceled' AND tasks.cancel_requested = 1 THEN 'canceled'
        WHEN {_RETRY} THEN 'pending'
        ELSE s.result_type END,
    batch_id = CASE WHEN {_RETRY} THEN NULL ELSE tasks.batch_id END,
    result = CASE WHEN {_RETRY} THEN NULL ELSE s.result_json END,
    error = CASE
        WHEN s.result_type = 'succeeded' THEN NULL
        WHEN s.result_type = 'canceled' AND tasks.cancel_requested = 1 THEN '{_USER_CANCELED}'
        ELSE s.error END,
    completed_at = CASE WHEN {_RETRY} THEN NULL ELSE :now END,
    model = s.model,
    input_tokens = s.input_tokens,
    output_tokens = s.output_tokens,
    cache_creation_input_tokens = s.cache_creation_input_tokens,
    cache_read_input_tokens = s.cache_read_input_tokens
FROM staging.results AS s
WHERE {_STAGED_TASKS}
RETURNING tasks.status"""

_BATCH_COLUMNS = (
    "id, api_batch_id, state, request_count, body_bytes, intent_at, submitted_at,"
    " processing_status, request_counts, api_created_at, ended_at, results_url,"
    " not_found_since, download_attempts, note"
)


def _staging_row(key: int, local_id: int, task_id: int, outcome: Outcome) -> Row:
    usage = outcome.usage
    return (
        key,
        task_id,
        local_id,
        outcome.custom_id,
        outcome.result_type,
        outcome.result_json,
        outcome.error,
        int(outcome.retryable),
        usage and usage.input_tokens,
        usage and usage.output_tokens,
        usage and usage.cache_creation_input_tokens,
        usage and usage.cache_read_input_tokens,
        outcome.model,
    )


def _pending_task(row: Row) -> PendingTask:
    """A pending row read as bytes with its column types, as `iter_pending` selects it."""
    task_id, custom_id, params, attempts, id_type, params_type = row
    for name, value, kind in (("custom_id", custom_id, id_type), ("params", params, params_type)):
        if kind != "text":
            reason = f"{name} is stored as a {kind.upper()}; store it as text (a str, not bytes)"
            break
        try:
            value.decode()
        except UnicodeDecodeError as exc:
            reason = f"{name} is not valid UTF-8 text (byte {exc.start}: {exc.reason})"
            break
    else:
        return PendingTask(task_id, custom_id.decode(), params.decode(), attempts)
    readable_id = custom_id.decode(errors="replace")
    return PendingTask(task_id, readable_id, params.decode(errors="replace"), attempts, reason)


def _check_result_types(outcomes: Iterable[Outcome]) -> None:
    for outcome in outcomes:
        if outcome.result_type not in _RESULT_TYPES:
            raise ValueError(f"unknown result type {outcome.result_type!r}")


async def _attach_staging(db: Db) -> None:
    """Attach an empty staging database; outside any transaction."""
    await db.execute("ATTACH DATABASE '' AS staging")
    # Before its first table, pages as large as the main file's: staging ~1 KB rows into
    # 4 KB pages took ~30% longer.
    await db.execute(f"PRAGMA staging.page_size = {_PAGE_SIZE}")
    # Room for the buckets (staging.py) of a range or two of task ids being applied.
    await db.execute("PRAGMA staging.cache_size = -8192")
    # Disposable: no fsync; the rollback journal of a chunk's few pages kept in memory.
    await db.execute("PRAGMA staging.synchronous = OFF")
    await db.execute("PRAGMA staging.journal_mode = MEMORY")
    await db.execute(_CREATE_STAGING)


async def _clear_staging(db: Db) -> None:
    """Drop every staged line, inside a transaction (a few lines: `write_results`)."""
    await db.execute("DELETE FROM staging.results")


def _batch_params(batch: MessageBatch) -> dict[str, Any]:
    ended = batch["ended_at"]
    return {
        "api_id": batch["id"],
        "processing": batch["processing_status"],
        "counts": orjson.dumps(batch["request_counts"]).decode(),
        "url": batch["results_url"],
        "ended": None if ended is None else _format_time(parse_timestamp(ended)),
    }


def _batch_record(row: Row) -> BatchRecord:
    return BatchRecord(
        local_id=row[0],
        api_batch_id=row[1],
        state=BatchState(row[2]),
        request_count=row[3],
        body_bytes=row[4],
        intent_at=_parse_time(row[5]),
        submitted_at=_parse_optional_time(row[6]),
        processing_status=row[7],
        request_counts=None if row[8] is None else cast(RequestCounts, orjson.loads(row[8])),
        api_created_at=_parse_optional_time(row[9]),
        ended_at=_parse_optional_time(row[10]),
        results_url=row[11],
        not_found_since=_parse_optional_time(row[12]),
        download_attempts=row[13],
        note=row[14],
    )


# -- small helpers -----------------------------------------------------------------------------


def _create_group_writable(path: Path) -> None:
    """Create a new database file 0660 (less the umask) rather than SQLite's 0644.

    Users feed the daemon from other accounts through a shared group (docs/operations.md);
    SQLite copies the main file's mode onto -wal and -shm, so this one mode decides all.
    """
    if not path.exists():
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o660))


async def _connect(
    stack: AsyncExitStack, path: Path, busy_timeout_ms: int, *, new_page_size: bool
) -> Db:
    db = await aiosqlite.connect(path, isolation_level=None)
    stack.push_async_callback(_close_connection, db)
    await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    # page_size only takes effect before the first table exists.
    if new_page_size and next(iter(await db.execute_fetchall("PRAGMA page_count")))[0] == 0:
        await db.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
    mode = next(iter(await db.execute_fetchall("PRAGMA journal_mode = WAL")))[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"cannot open database {path}: journal_mode is {mode}, WAL is required")
    for pragma in _PRAGMAS:
        await db.execute(pragma)
    return db


async def _close_connection(db: Db) -> None:
    """Close `db` and return only once its worker thread has ended.

    aiosqlite resolves `close()` just before its worker thread leaves its loop, so a
    closed connection could still count as a live thread: a store that says its
    connections are closed (a failed lane opening, `close()`) must leave none behind.
    """
    await db.close()
    # aiosqlite does not expose its worker thread; a later version without the attribute
    # only loses this wait, never the close. The thread sets no event to await, and
    # join() would block the loop (to_thread would leave an executor thread instead).
    worker = getattr(db, "_thread", None)
    while isinstance(worker, threading.Thread) and worker.is_alive():  # noqa: ASYNC110
        await asyncio.sleep(0.001)


async def _create_migrations_table(db: Db) -> None:
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )


def _shipped_migrations() -> list[_Migration]:
    found: dict[int, _Migration] = {}
    for entry in resources.files("batchd.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match is None:
            raise StoreError(f"migration {entry.name} is not named NNN_name.sql")
        version = int(match[1])
        if version in found:
            raise StoreError(f"two migrations share version {version}: {entry.name}")
        found[version] = _Migration(version, match[2], entry.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


def _statements(script: str) -> Iterator[str]:
    """Split a script where SQLite itself says a statement ends (quotes, comments, triggers)."""
    start = 0
    for end, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start : end + 1]):
            yield script[start : end + 1]
            start = end + 1
    if script[start:].strip():
        yield script[start:]  # a last statement without ';', or trailing comments


async def _run(db: Db, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
    async with db.execute(sql, params) as cursor:
        return cursor.rowcount


async def _run_many(db: Db, sql: str, rows: Iterable[Sequence[Any]]) -> int:
    async with db.executemany(sql, rows) as cursor:
        return cursor.rowcount


# Transaction bodies for one-statement writes, so they need no method of their own.
async def _run_in(db: Db, sql: str, params: Sequence[Any]) -> int:
    return await _run(db, sql, params)


async def _run_many_in(db: Db, sql: str, rows: Iterable[Sequence[Any]]) -> int:
    return await _run_many(db, sql, rows)


async def _fetch_in(db: Db, sql: str, params: Sequence[Any]) -> list[Row]:
    return cast(list[Row], list(await db.execute_fetchall(sql, params)))


async def _cancel_flagged(db: Db, local_id: int, now: str, *, attempts_delta: int) -> None:
    """Tasks the user canceled must not go back to the queue with their batch."""
    await _run(
        db,
        "UPDATE tasks SET status = 'canceled', error = ?, completed_at = ?,"
        " attempts = attempts + ?"
        " WHERE batch_id = ? AND status = 'submitted' AND cancel_requested = 1",
        (_USER_CANCELED, now, attempts_delta, local_id),
    )


@contextmanager
def _sqlite_errors(path: Path, action: str) -> Iterator[None]:
    """SQLite errors from the environment become StoreError naming the path and a remedy."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise  # our bugs, not the environment's
    except sqlite3.Error as exc:
        message = f"cannot {action} database {path}: {exc}"
        hint = next((hint for key, hint in _HINTS if key in str(exc)), None)
        raise StoreError(f"{message} ({hint})" if hint else message) from exc


def _json_list(values: Iterable[Any]) -> str:
    return orjson.dumps(list(values)).decode()


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _format_time(moment: datetime) -> str:
    """The SQL default's form, `%Y-%m-%dT%H:%M:%fZ` (milliseconds), so all of them sort."""
    utc = moment.astimezone(UTC)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond // 1000:03d}Z"


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _parse_optional_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


# -- usage, cost inputs, result gaps and housekeeping (issue 7) ----------------------------------

UsageRow = tuple[str, int, int, int, int, int]  # model, requests, input, output, cache w, cache r
SizeRow = tuple[str | None, int, int, int]  # model, requests, params bytes, sum of max_tokens
# Read from the params text without trusting it: rows the chunker will refuse (bad JSON,
# no model, a custom_id the API would refuse) give a NULL model and 0 max_tokens instead
# of an SQL error, so a row about to be marked invalid never holds up a budget.
_REQUEST_SIZE_COLUMNS = """
    CASE WHEN json_valid(params) AND json_type(params, '$.model') = 'text'
              AND typeof(custom_id) = 'text' AND length(custom_id) BETWEEN 1 AND 64
              AND custom_id NOT GLOB '*[^a-zA-Z0-9_-]*'
         THEN json_extract(params, '$.model') END AS model,
    length(CAST(params AS BLOB)) AS request_bytes,
    CASE WHEN json_valid(params) AND json_type(params, '$.max_tokens') = 'integer'
         THEN json_extract(params, '$.max_tokens') ELSE 0 END AS max_tokens"""
_SIZE_TOTALS = "model, count(*), sum(request_bytes), sum(max_tokens)"
_PRUNE_COLUMNS = (
    "id, custom_id, status, result, error, params, model, input_tokens, output_tokens,"
    " cache_creation_input_tokens, cache_read_input_tokens, created_at, completed_at"
)
_FINISHED_BATCH_STATES = ("completed", "rejected", "lost")


class StoreAccounts:
    """Reads and writes about money, gaps and old rows, on a Store's own connections.

    A companion rather than more Store methods, so this feature's SQL sits in one place at
    the end of the module and the Store class is left as it is; it goes through the same
    reader, writer lock and shielded transactions as every other statement.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    async def usage_by_model(self, since_day: str | None = None) -> list[UsageRow]:
        """Usage of succeeded results per model (the ledger), on or after `since_day`."""
        rows = await self._store._read(
            "SELECT model, sum(requests), sum(input_tokens), sum(output_tokens),"
            " sum(cache_creation_input_tokens), sum(cache_read_input_tokens)"
            " FROM usage_ledger WHERE day >= ? GROUP BY model ORDER BY model",
            (since_day or "",),
        )
        return [cast(UsageRow, tuple(row)) for row in rows]

    async def pending_sizes(self, limit: int | None = None) -> list[SizeRow]:
        """Request sizes per model of pending tasks (the oldest `limit`, or all)."""
        rows = await self._store._read(
            f"SELECT {_SIZE_TOTALS} FROM (SELECT {_REQUEST_SIZE_COLUMNS} FROM tasks"
            " WHERE status = 'pending' ORDER BY id LIMIT ?) GROUP BY model ORDER BY model",
            (-1 if limit is None else limit,),
        )
        return [cast(SizeRow, tuple(row)) for row in rows]

    async def task_sizes(self, task_ids: Sequence[int]) -> list[SizeRow]:
        """Request sizes per model of exactly these tasks (a chunk about to be sent)."""
        rows = await self._store._read(
            f"SELECT {_SIZE_TOTALS} FROM (SELECT {_REQUEST_SIZE_COLUMNS} FROM tasks"
            " WHERE id IN (SELECT value FROM json_each(?))) GROUP BY model ORDER BY model",
            (_json_list(task_ids),),
        )
        return [cast(SizeRow, tuple(row)) for row in rows]

    async def pending_fingerprint(self, limit: int) -> tuple[int, int, int, int]:
        """(count, min id, max id, sum of ids) of the oldest `limit` pending tasks (index only)."""
        rows = await self._store._read(
            "SELECT count(*), coalesce(min(id), 0), coalesce(max(id), 0), coalesce(sum(id), 0)"
            " FROM (SELECT id FROM tasks WHERE status = 'pending' ORDER BY id LIMIT ?)",
            (limit,),
        )
        count, low, high, total = rows[0]
        return int(count), int(low), int(high), int(total)

    async def batch_sizes(self, local_ids: Sequence[int]) -> dict[int, list[SizeRow]]:
        """Request sizes per model of every task each batch carried, whatever became of it."""
        rows = await self._store._read(
            f"SELECT batch_id, {_SIZE_TOTALS} FROM (SELECT m.batch_id, {_REQUEST_SIZE_COLUMNS}"
            " FROM batch_tasks AS m JOIN tasks ON tasks.id = m.task_id"
            " WHERE m.batch_id IN (SELECT value FROM json_each(?)))"
            " GROUP BY batch_id, model ORDER BY batch_id, model",
            (_json_list(local_ids),),
        )
        sizes: dict[int, list[SizeRow]] = {local_id: [] for local_id in local_ids}
        for local_id, *size in rows:
            sizes[local_id].append(cast(SizeRow, tuple(size)))
        return sizes

    async def result_gaps(self) -> ResultGaps:
        """Result lines kept as unmatched, and requests requeued for want of a result."""
        rows = await self._store._read(
            "SELECT (SELECT count(*) FROM unmatched_results),"
            " (SELECT count(*) FROM missing_results WHERE reason = 'no_line'),"
            " (SELECT count(*) FROM missing_results WHERE reason = 'archived')"
        )
        unmatched, missing, archived = rows[0]
        return ResultGaps(int(unmatched), int(missing), int(archived))

    async def prunable_tasks(self, cutoff: datetime, after_id: int, limit: int) -> list[Row]:
        """Final tasks completed before `cutoff`, by id after `after_id` (keyset pages)."""
        return await self._store._read(
            f"SELECT {_PRUNE_COLUMNS} FROM tasks WHERE id > ?"
            " AND status IN (SELECT value FROM json_each(?)) AND completed_at < ?"
            " ORDER BY id LIMIT ?",
            (after_id, _json_list(sorted(FINAL_TASK_STATUSES)), _format_time(cutoff), limit),
        )

    async def delete_tasks(self, task_ids: Sequence[int], cutoff: datetime) -> int:
        """Delete these tasks, if they are still final and completed before `cutoff`."""
        return await self._store._transact(
            _run_in,
            "DELETE FROM tasks WHERE id IN (SELECT value FROM json_each(?))"
            " AND status IN (SELECT value FROM json_each(?)) AND completed_at < ?",
            (_json_list(task_ids), _json_list(sorted(FINAL_TASK_STATUSES)), _format_time(cutoff)),
        )

    async def forget_empty_batches(self) -> tuple[int, int]:
        """Drop batch_tasks rows of deleted tasks, then finished batches nothing refers to.

        One short transaction per batch, so users' INSERTs never wait long. A batch named
        in duplicate_batches stays: that report must survive.
        """
        finished = await self._store._read(
            "SELECT id FROM batches WHERE state IN (SELECT value FROM json_each(?)) ORDER BY id",
            (_json_list(_FINISHED_BATCH_STATES),),
        )
        links = batches = 0
        for (local_id,) in finished:
            links_gone, batch_gone = await self._store._transact(_forget_batch, local_id)
            links += links_gone
            batches += batch_gone
        return links, batches

    async def database_bytes(self) -> int:
        """The main file's size as SQLite counts it (pages x page size)."""
        rows = await self._store._read(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
        )
        return int(rows[0][0])

    async def vacuum(self) -> None:
        """Rewrite the file without its free pages.

        VACUUM cannot run inside a transaction, so not through `_transact`: it runs on the
        writer connection under the store's lock, so no write of this process interleaves,
        and it waits for another process's write lock under busy_timeout like any writer.
        With `temp_store = MEMORY` VACUUM would build the whole copy in RAM: the copy goes
        to a temporary file for the duration, whatever the connection uses otherwise.
        """
        store = self._store
        if store._closed:
            raise StoreError(f"{store._path}: the store is closed")
        async with store._lock:
            with _sqlite_errors(store._path, "vacuum"):
                rows = await store._writer.execute_fetchall("PRAGMA temp_store")
                previous = int(next(iter(rows))[0])
                await store._writer.execute("PRAGMA temp_store = FILE")
                try:
                    await store._writer.execute("VACUUM")
                finally:
                    await store._writer.execute(f"PRAGMA temp_store = {previous}")


async def _forget_batch(db: Db, local_id: int) -> tuple[int, int]:
    links = await _run(
        db,
        "DELETE FROM batch_tasks WHERE batch_id = ?"
        " AND NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.id = batch_tasks.task_id)",
        (local_id,),
    )
    batches = await _run(
        db,
        "DELETE FROM batches WHERE id = :id"
        " AND NOT EXISTS (SELECT 1 FROM batch_tasks WHERE batch_id = :id)"
        " AND NOT EXISTS (SELECT 1 FROM tasks WHERE batch_id = :id)"
        " AND NOT EXISTS (SELECT 1 FROM duplicate_batches WHERE local_id = :id)",
        {"id": local_id},
    )
    return links, batches
