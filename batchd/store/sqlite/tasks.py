"""Intake and claiming (design steps 1-4): new tasks, pending pages, the intent of a batch."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime

from batchd.api.wire import MessageBatch, parse_timestamp
from batchd.domain import PendingTask
from batchd.store.errors import StoreError
from batchd.store.intake import enqueue_in_chunks
from batchd.store.sqlite.batches import STATE_OF_PROCESSING, batch_params
from batchd.store.sqlite.database import (
    Db,
    Rollback,
    Row,
    SqliteDatabase,
    format_time,
    json_list,
    run,
    run_many,
)
from batchd.store.sqlite.harvest import record_candidate_in
from batchd.store.sqlite.settle import cancel_flagged
from batchd.store.values import EnqueueReport

# A row as read (PendingTask.version): its revision (moved on by a user's UPDATE of params or
# custom_id, migration 015) and its creation time, since a row deleted and inserted again
# can reuse the id (INTEGER PRIMARY KEY without AUTOINCREMENT) but is created after the read.
# An unedited row's is its creation time as stored: no text is built for each row read.
_VERSION = "CASE revision WHEN 0 THEN created_at ELSE revision || ' ' || created_at END"
_CLAIM = (
    "UPDATE tasks SET status = 'submitted', batch_id = ?, attempts = attempts + 1,"
    " submitted_at = ?, error = NULL"
    " WHERE id IN (SELECT value FROM json_each(?)) AND status = 'pending'"
)
# The claim that also says what each row was (a RETURNING of the rows it changed, no
# second walk of them): compared with the versions read, in Python.
_CLAIM_AS_READ = f"{_CLAIM} RETURNING id, {_VERSION}"
_MARK_INVALID = (
    "UPDATE tasks SET status = 'invalid', error = ?, completed_at = ?"
    " WHERE id = ? AND status = 'pending'"
)
_MARK_INVALID_AS_READ = f"{_MARK_INVALID} AND {_VERSION} = ?"


class TaskIntake:
    """Tasks in, pending tasks out, and the claim that makes a batch (part of SqliteStore)."""

    _db: SqliteDatabase

    async def enqueue(self, items: Iterable[tuple[str, str]]) -> EnqueueReport:
        """Insert new tasks; custom_ids already stored or repeated in `items` are reported."""
        return await enqueue_in_chunks(items, lambda fresh: self._db.transact(_insert_tasks, fresh))

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
            sizes = await self._db.read(
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
            rows = await self._db.read(
                f"SELECT id, CAST(custom_id AS BLOB), CAST(params AS BLOB), attempts,"
                f" typeof(custom_id), typeof(params), {_VERSION} FROM tasks"
                " WHERE status = 'pending' AND id > ? AND id <= ? ORDER BY id",
                (after, last),
            )
            for row in rows:
                yield _pending_task(row)
            if len(sizes) < page_size and last == sizes[-1][0]:
                return
            after = last

    async def mark_invalid(
        self, reasons: Sequence[tuple[int, str]], versions: Sequence[str] = ()
    ) -> int:
        """Pending tasks the chunker refused become `invalid` with the reason; returns count.
        With `versions` (as `iter_pending` read them), only a task still the row read."""
        if versions and len(versions) != len(reasons):
            raise ValueError("mark_invalid needs one version per task")
        return await self._db.transact(self._mark_invalid, reasons, versions)

    async def _mark_invalid(
        self, db: Db, reasons: Sequence[tuple[int, str]], versions: Sequence[str]
    ) -> int:
        now = self._db.now()
        if not versions:
            return await run_many(db, _MARK_INVALID, [(r, now, i) for i, r in reasons])
        # The reason is about the params read: an edited row (or a new row on a reused id)
        # stays pending, judged again at the next read.
        rows = [(r, now, i, v) for (i, r), v in zip(reasons, versions, strict=True)]
        return await run_many(db, _MARK_INVALID_AS_READ, rows)

    # -- submission (design steps 1-4) ---------------------------------------------------------

    async def record_intent(
        self, task_ids: Sequence[int], body_bytes: int, versions: Sequence[str] = ()
    ) -> int | None:
        """Claim the tasks for a new `creating` batch; None if any stopped being pending or
        (`versions`, as `iter_pending` read them) is no longer the row read."""
        if not task_ids:
            raise ValueError("record_intent needs at least one task")
        if versions and len(versions) != len(task_ids):
            raise ValueError("record_intent needs one version per task")
        try:
            return await self._db.transact(self._claim, task_ids, body_bytes, versions)
        except Rollback:
            return None

    async def _claim(
        self, db: Db, task_ids: Sequence[int], body_bytes: int, versions: Sequence[str]
    ) -> int:
        now = self._db.now()
        async with db.execute(
            "INSERT INTO batches (state, request_count, body_bytes, intent_at)"
            " VALUES ('creating', ?, ?, ?)",
            (len(task_ids), body_bytes, now),
        ) as cursor:
            local_id = cursor.lastrowid
        assert local_id is not None
        # One JSON array parameter: no limit on bound variables, no temp table to fill.
        task_list = json_list(task_ids)
        if not versions:
            claimed = await run(db, _CLAIM, (local_id, now, task_list))
        else:
            # Each task as read: the body was built from that row's params (review 7, #6).
            rows = list(await db.execute_fetchall(_CLAIM_AS_READ, (local_id, now, task_list)))
            read = dict(zip(task_ids, versions, strict=True))
            if any(read[task_id] != version for task_id, version in rows):
                raise Rollback
            claimed = len(rows)
        if claimed != len(task_ids):
            raise Rollback
        await db.execute(
            "INSERT INTO batch_tasks (batch_id, task_id) SELECT ?, value FROM json_each(?)",
            (local_id, task_list),
        )
        return local_id

    async def mark_created(
        self,
        local_id: int,
        batch: MessageBatch,
        duplicates: Sequence[MessageBatch] = (),
        *,
        watch_until: datetime | None = None,
    ) -> bool:
        """Record the API's id for a `creating` batch (also adopts one found by reconcile).

        In the same transaction, so that a kill cannot leave a paid batch unrecorded:
        `duplicates` (other API batches reconcile matched) become candidates of this intent
        (recorded in duplicate_batches, and harvested), and so does `batch` itself if the
        local batch is no longer `creating` (returns False). `watch_until`: adopted by
        reconcile, so a batch of it may still land late: watched until then.
        """
        watch = None if watch_until is None else format_time(watch_until)
        return await self._db.transact(self._mark_created, local_id, batch, duplicates, watch)

    async def _mark_created(
        self,
        db: Db,
        local_id: int,
        batch: MessageBatch,
        duplicates: Sequence[MessageBatch],
        watch_until: str | None,
    ) -> bool:
        now = self._db.now()
        unrecorded = [
            (other, f"same request count created in the window of local batch {local_id}")
            for other in duplicates
        ]
        changed = await run(
            db,
            "UPDATE batches SET api_batch_id = :api_id, state = :state, submitted_at = :now,"
            " api_created_at = :created, processing_status = :processing,"
            " request_counts = :counts, results_url = :url, ended_at = :ended,"
            " watch_until = :watch"
            " WHERE id = :local AND state = 'creating'",
            {
                **batch_params(batch),
                "watch": watch_until,
                "state": STATE_OF_PROCESSING[batch["processing_status"]].value,
                "created": format_time(parse_timestamp(batch["created_at"])),
                "now": now,
                "local": local_id,
            },
        )
        if changed != 1:
            note = f"created for local batch {local_id} after its intent was released"
            unrecorded.append((batch, note))
        for other, note in unrecorded:
            await record_candidate_in(db, local_id, other, note, now)
        return changed == 1

    async def release_intent(
        self,
        local_id: int,
        reason: str,
        invalid: Sequence[tuple[str, str]] = (),
        *,
        watch_until: datetime | None = None,
    ) -> None:
        """The create was refused, or nothing was found for it: the batch is `rejected`, its
        tasks go back (no attempt). `watch_until`: the create's outcome was unknown, so the
        list is still searched until then for a batch that lands late (`watched_intents`)."""
        watch = None if watch_until is None else format_time(watch_until)
        await self._db.transact(self._release_intent, local_id, reason, invalid, watch)

    async def _release_intent(
        self,
        db: Db,
        local_id: int,
        reason: str,
        invalid: Sequence[tuple[str, str]],
        watch_until: str | None,
    ) -> None:
        rejected = await run(
            db,
            "UPDATE batches SET state = 'rejected', note = ?, watch_until = ?"
            " WHERE id = ? AND state = 'creating'",
            (reason, watch_until, local_id),
        )
        if not rejected:
            return
        now = self._db.now()
        # Only a task still the request sent: a user's edit since the claim ended its
        # membership (migration 016), and it goes back to pending with the others.
        await run_many(
            db,
            "UPDATE tasks SET status = 'invalid', error = ?, completed_at = ?,"
            " attempts = attempts - 1"
            " WHERE custom_id = ? AND batch_id = ? AND status = 'submitted'"
            " AND EXISTS (SELECT 1 FROM batch_tasks AS m"
            "   WHERE m.batch_id = tasks.batch_id AND m.task_id = tasks.id)",
            [(error, now, custom_id, local_id) for custom_id, error in invalid],
        )
        await cancel_flagged(db, local_id, now, attempts_delta=-1)
        await run(
            db,
            "UPDATE tasks SET status = 'pending', batch_id = NULL, attempts = attempts - 1,"
            " error = NULL WHERE batch_id = ? AND status = 'submitted'",
            (local_id,),
        )


async def _insert_tasks(db: Db, fresh: dict[str, str]) -> tuple[set[str], int]:
    """Insert `fresh`; (the custom_ids already stored, inserted). Read then insert is safe
    here, unlike on PostgreSQL: the transaction holds the write lock from its BEGIN
    IMMEDIATE, so no other producer commits a custom_id between the two."""
    rows = await db.execute_fetchall(
        "SELECT custom_id FROM tasks WHERE custom_id IN (SELECT value FROM json_each(?))",
        (json_list(fresh),),
    )
    existing = {row[0] for row in rows}
    new = [(cid, params) for cid, params in fresh.items() if cid not in existing]
    count = await run_many(db, "INSERT OR IGNORE INTO tasks (custom_id, params) VALUES (?, ?)", new)
    if count != len(new):  # a line neither inserted nor a duplicate: never drop it silently
        raise StoreError(f"enqueue: {len(new) - count} new task(s) were not inserted")
    return existing, count


def _pending_task(row: Row) -> PendingTask:
    """A pending row read as bytes with its column types, as `iter_pending` selects it."""
    task_id, custom_id, params, attempts, id_type, params_type, version = row
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
        return PendingTask(task_id, custom_id.decode(), params.decode(), attempts, None, version)
    readable_id = custom_id.decode(errors="replace")
    return PendingTask(
        task_id, readable_id, params.decode(errors="replace"), attempts, reason, version
    )
