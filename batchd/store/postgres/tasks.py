"""Intake and claiming (design steps 1-4) on PostgreSQL: new tasks, pending pages, intents.

Bodies are built from `params::text`: jsonb keeps no text of the user's own, so the text
read here is exactly what is sent, and its bytes are what is counted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime

from batchd.api.wire import MessageBatch, parse_timestamp
from batchd.domain import PendingTask
from batchd.store.errors import StoreError
from batchd.store.intake import enqueue_in_chunks
from batchd.store.postgres.batches import STATE_OF_PROCESSING, batch_params
from batchd.store.postgres.connection import Conn
from batchd.store.postgres.database import PostgresDatabase, Rollback, count_of, ids, to_millis
from batchd.store.postgres.harvest import record_candidate_in
from batchd.store.postgres.leader import check_fence
from batchd.store.postgres.settle import cancel_flagged
from batchd.store.postgres.storable import storable_text
from batchd.store.values import EnqueueReport

# A page of at most $2 pending tasks, cut before the row whose params would take the
# running total past $3 bytes (the first row is always sent). `rows`: the page's rows
# before the cut, so a page shorter than $2 and not cut was the last.
_PENDING_PAGE = """
SELECT id, custom_id, params, attempts, rows, revision FROM (
    SELECT id, custom_id, params, attempts, count(*) OVER () AS rows,
        row_number() OVER w AS n, sum(octet_length(params)) OVER w AS running, revision
    FROM (SELECT id, custom_id, params::text AS params, attempts, revision FROM tasks
          WHERE status = 'pending' AND id > $1 ORDER BY id LIMIT $2) AS page
    WINDOW w AS (ORDER BY id)
) AS sized
WHERE n = 1 OR running <= $3
ORDER BY id"""
# What was inserted is what the INSERT returns: under READ COMMITTED a custom_id another
# producer commits while this runs is seen only by ON CONFLICT (which waits for that
# transaction, then skips the row), never by a read before it (review 7, finding 4).
_INSERT_TASKS = """
INSERT INTO tasks (custom_id, params)
SELECT c, p::jsonb FROM unnest($1::text[], $2::text[]) AS new(c, p)
ON CONFLICT (custom_id) DO NOTHING
RETURNING custom_id"""


_CLAIM_SET = (
    "UPDATE tasks SET status = 'submitted', batch_id = $1, attempts = attempts + 1,"
    " submitted_at = $2, error = NULL"
)
# By id only, never a scan of the status index or of the table (the statistics of a queue
# go stale within a run): the id range makes the primary key the cheapest path whatever
# they say, and `IS TRUE` keeps the status test out of the index conditions. `{}`: the
# revision read, if any (migration 015: a user's UPDATE of params moves it on; ids are an
# identity, never reused, so the revision alone tells the row read from another).
_CLAIM = (
    f"{_CLAIM_SET} WHERE id BETWEEN $4 AND $5 AND id = ANY($3::bigint[])"
    " AND (status = 'pending' {}) IS TRUE"
)
_CLAIM_AS_READ = f"""{_CLAIM_SET}
FROM unnest($3::bigint[], $6::integer[]) AS seen(id, revision)
WHERE tasks.id BETWEEN $4 AND $5 AND tasks.id = seen.id
    AND (tasks.status = 'pending' AND tasks.revision = seen.revision) IS TRUE"""
# A refused task becomes invalid; as read: only at the revision read (see mark_invalid).
_MARK_INVALID = """
UPDATE tasks SET status = 'invalid', error = r.reason, completed_at = $3
FROM unnest($1::bigint[], $2::text[]) AS r(id, reason)
WHERE tasks.id = r.id AND tasks.status = 'pending'"""
_MARK_INVALID_AS_READ = """
UPDATE tasks SET status = 'invalid', error = r.reason, completed_at = $3
FROM unnest($1::bigint[], $2::text[], $4::integer[]) AS r(id, reason, revision)
WHERE tasks.id = r.id AND tasks.status = 'pending' AND tasks.revision = r.revision"""


class TaskIntake:
    """Tasks in, pending tasks out, and the claim that makes a batch (part of PostgresStore)."""

    _db: PostgresDatabase

    async def enqueue(self, items: Iterable[tuple[str, str]]) -> EnqueueReport:
        """Insert new tasks; custom_ids already stored or repeated in `items` are reported."""
        return await enqueue_in_chunks(items, lambda fresh: self._db.transact(_insert_tasks, fresh))

    async def iter_pending(
        self, *, page_size: int = 1000, page_bytes: int = 16 * 1024 * 1024
    ) -> AsyncIterator[PendingTask]:
        """Pending tasks, oldest first, a page per query (keyset: no long read transaction).

        One query a page: the server turns each row's params into text once, and sends the
        rows up to `page_bytes` of it (the first row whatever its size). Ids are not in
        commit order across producers: a task that commits after this walk passed its id
        is simply found by the next walk (each starts from the lowest id).
        """
        after = 0
        while True:
            rows = await self._db.read_in_key_order(_PENDING_PAGE, after, page_size, page_bytes)
            for task_id, custom_id, params, attempts, _, revision in rows:
                yield PendingTask(task_id, custom_id, params, attempts, None, str(revision))
            page = rows[-1][4] if rows else 0
            if page < page_size and len(rows) == page:
                return  # the page held every pending row left, and none was cut
            after = rows[-1][0]

    async def mark_invalid(
        self, reasons: Sequence[tuple[int, str]], versions: Sequence[str] = ()
    ) -> int:
        """Pending tasks the chunker refused become `invalid` with the reason; returns count.
        With `versions` (as `iter_pending` read them), only a task still at that revision."""
        if versions and len(versions) != len(reasons):
            raise ValueError("mark_invalid needs one version per task")
        return await self._db.transact(self._mark_invalid, reasons, versions)

    async def _mark_invalid(
        self, conn: Conn, reasons: Sequence[tuple[int, str]], versions: Sequence[str]
    ) -> int:
        task_ids = [task_id for task_id, _ in reasons]
        texts = [storable_text(reason) for _, reason in reasons]  # may quote the API
        if not versions:
            status = await conn.execute(_MARK_INVALID, task_ids, texts, self._db.now())
        else:
            # The reason is about the params read: an edited task stays pending, judged
            # again at the next read.
            revisions = [int(version) for version in versions]
            status = await conn.execute(
                _MARK_INVALID_AS_READ, task_ids, texts, self._db.now(), revisions
            )
        return count_of(status)

    # -- submission (design steps 1-4) ---------------------------------------------------------

    async def record_intent(
        self, task_ids: Sequence[int], body_bytes: int, versions: Sequence[str] = ()
    ) -> int | None:
        """Claim the tasks for a new `creating` batch; None if any stopped being pending or
        (`versions`, as `iter_pending` read them) had its params changed since."""
        if not task_ids:
            raise ValueError("record_intent needs at least one task")
        if versions and len(versions) != len(task_ids):
            raise ValueError("record_intent needs one version per task")
        try:
            return await self._db.transact(self._claim, ids(task_ids), body_bytes, versions)
        except Rollback:
            return None

    async def _claim(
        self, conn: Conn, task_ids: list[int], body_bytes: int, versions: Sequence[str]
    ) -> int:
        # The intent: a create follows its COMMIT, and a server crash that lost it would
        # leave that create's batch with no row to record it in. Flushed whatever the
        # role's default says.
        await conn.execute("SET LOCAL synchronous_commit = on")
        lease = self._db.lease
        if lease is not None and not await check_fence(conn, lease):
            raise StoreError(
                f"{self._db.shown}: this daemon no longer leads (its leader lock's session "
                "ended): it claims nothing more"
            )
        now = self._db.now()
        local_id: int = await conn.fetchval(
            "INSERT INTO batches (state, request_count, body_bytes, intent_at)"
            " VALUES ('creating', $1, $2, $3) RETURNING id",
            len(task_ids),
            body_bytes,
            now,
        )
        bounds = (min(task_ids), max(task_ids))
        if any(version != "0" for version in versions):
            # Some task's params were edited before the read: each checked at its revision.
            revisions = [int(version) for version in versions]
            status = await conn.execute(_CLAIM_AS_READ, local_id, now, task_ids, *bounds, revisions)
        else:
            # Unedited, as nearly always: the revision read was 0 (none given: unchecked).
            as_read = "AND revision = 0" if versions else ""
            status = await conn.execute(_CLAIM.format(as_read), local_id, now, task_ids, *bounds)
        claimed = count_of(status)
        if claimed != len(task_ids):
            raise Rollback
        await conn.execute(
            "INSERT INTO batch_tasks (batch_id, task_id) SELECT $1, unnest($2::bigint[])",
            local_id,
            task_ids,
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
        watch = None if watch_until is None else to_millis(watch_until)
        return await self._db.transact(self._mark_created, local_id, batch, duplicates, watch)

    async def _mark_created(
        self,
        conn: Conn,
        local_id: int,
        batch: MessageBatch,
        duplicates: Sequence[MessageBatch],
        watch_until: datetime | None,
    ) -> bool:
        # Losing this commit means paying again: flushed whatever the role's default says.
        await conn.execute("SET LOCAL synchronous_commit = on")
        now = self._db.now()
        unrecorded = [
            (other, f"same request count created in the window of local batch {local_id}")
            for other in duplicates
        ]
        api_id, processing, counts, url, ended = batch_params(batch)
        changed = count_of(
            await conn.execute(
                "UPDATE batches SET api_batch_id = $1, state = $2, submitted_at = $3,"
                " api_created_at = $4, processing_status = $5, request_counts = $6::jsonb,"
                " results_url = $7, ended_at = $8, watch_until = $9"
                " WHERE id = $10 AND state = 'creating'",
                api_id,
                STATE_OF_PROCESSING[batch["processing_status"]].value,
                now,
                parse_timestamp(batch["created_at"]),
                processing,
                counts,
                url,
                ended,
                watch_until,
                local_id,
            )
        )
        if changed != 1:
            note = f"created for local batch {local_id} after its intent was released"
            unrecorded.append((batch, note))
        for other, note in unrecorded:
            await record_candidate_in(conn, local_id, other, note, now)
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
        watch = None if watch_until is None else to_millis(watch_until)
        await self._db.transact(self._release_intent, local_id, reason, invalid, watch)

    async def _release_intent(
        self,
        conn: Conn,
        local_id: int,
        reason: str,
        invalid: Sequence[tuple[str, str]],
        watch_until: datetime | None,
    ) -> None:
        rejected = await conn.execute(
            "UPDATE batches SET state = 'rejected', note = $1, watch_until = $2"
            " WHERE id = $3 AND state = 'creating'",
            storable_text(reason),  # quotes the API's refusal
            watch_until,
            local_id,
        )
        if not count_of(rejected):
            return
        now = self._db.now()
        if invalid:
            # Only a task still the request sent: a user's edit since the claim ended its
            # membership (migration 016), and it goes back to pending with the others. The
            # named rows are locked first, in a statement of their own: an UPDATE that
            # waits for a row an edit holds re-checks its WHERE on the new row version but
            # reads batch_tasks at its snapshot, the membership still there (review 8,
            # finding 6); once the locks are held, the UPDATE's own snapshot (READ
            # COMMITTED: taken per statement) sees every edit committed before them.
            await conn.execute(
                "SELECT 1 FROM tasks WHERE custom_id = ANY($1::text[]) AND batch_id = $2"
                " ORDER BY id FOR UPDATE",
                [custom_id for custom_id, _ in invalid],
                local_id,
            )
            await conn.execute(
                "UPDATE tasks SET status = 'invalid', error = i.error, completed_at = $3,"
                " attempts = attempts - 1 FROM unnest($1::text[], $2::text[]) AS i(cid, error)"
                " WHERE tasks.custom_id = i.cid AND tasks.batch_id = $4"
                " AND tasks.status = 'submitted' AND EXISTS (SELECT 1 FROM batch_tasks AS m"
                "   WHERE m.batch_id = $4 AND m.task_id = tasks.id)",
                [custom_id for custom_id, _ in invalid],
                [storable_text(error) for _, error in invalid],
                now,
                local_id,
            )
        await cancel_flagged(conn, local_id, now, attempts_delta=-1)
        await conn.execute(
            "UPDATE tasks SET status = 'pending', batch_id = NULL, attempts = attempts - 1,"
            " error = NULL WHERE batch_id = $1 AND status = 'submitted'",
            local_id,
        )


async def _insert_tasks(conn: Conn, fresh: dict[str, str]) -> tuple[set[str], int]:
    """Insert `fresh`; (the custom_ids already stored, by anyone, however recently: every
    one given but not inserted, inserted)."""
    rows = await conn.fetch(_INSERT_TASKS, list(fresh), list(fresh.values()))
    inserted = {row[0] for row in rows}
    return fresh.keys() - inserted, len(inserted)
