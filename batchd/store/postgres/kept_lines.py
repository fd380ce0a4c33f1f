"""Result lines no task holds, and what they cost (migration 015), in the caller's
transaction, on PostgreSQL (the SQLite twin: `batchd/store/sqlite/kept_lines.py`):
unmatched lines kept with their billed usage counted, and a foreign batch's usage taken
back out of the ledger. (A duplicate line is counted where it is kept, in the range's
apply: `writeback.py`; those a range left over, below.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchd.store.postgres.connection import Conn
from batchd.store.postgres.database import count_of
from batchd.store.postgres.storable import storable_text
from batchd.store.values import KeptLine


def count_staged(kept_in: str, lines: str) -> str:
    """SQL counting the billed (succeeded) staged lines `lines` (a FROM ... WHERE over
    `pg_temp.staging AS s`) as `kept_in`, one row per line of the API batch ($1), dated
    $2: a line counted before is left out."""
    return f"""
INSERT INTO kept_line_usage
SELECT $1, s.custom_id, '{kept_in}', ($2::timestamptz AT TIME ZONE 'UTC')::date,
    coalesce(s.model, ''), coalesce(s.input_tokens, 0), coalesce(s.output_tokens, 0),
    coalesce(s.cache_creation_input_tokens, 0), coalesce(s.cache_read_input_tokens, 0)
{lines} AND s.result_type = 'succeeded'
ON CONFLICT DO NOTHING"""


# The billed lines of a chunk counted in one statement: the ledger's trigger runs per
# statement (migration 015), and a line kept again is left out.
_COUNT_UNMATCHED = """
INSERT INTO kept_line_usage
SELECT $1, b.custom_id, 'unmatched', ($2::timestamptz AT TIME ZONE 'UTC')::date,
    coalesce(b.model, ''), b.input_tokens, b.output_tokens, b.cache_creation_input_tokens,
    b.cache_read_input_tokens
FROM unnest($3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[])
    AS b (custom_id, model, input_tokens, output_tokens, cache_creation_input_tokens,
          cache_read_input_tokens)
ON CONFLICT DO NOTHING"""
# A line that ends a task (a retryable error leaves the task to its own course).
ENDS_TASK = "(s.result_type = 'succeeded' OR (s.result_type = 'errored' AND NOT s.retryable))"
# The lines a range's apply (`writeback.py`) left neither written nor kept as duplicates,
# looked for only then (the common range writes every line); every statement below takes
# ($1 api_batch_id, $2 now, $3 and $4 the range's first and last task id, $5 the batch).
#
# A line staged for a task whose membership a retry (or an edit of its request) ended since
# (operations.py, migration 016): the task waits for a new request (requeued, or still
# `submitted` in this batch, requeued when it finishes), and the old one's answer is kept
# as a duplicate, and counted as the others.
_NO_LONGER_MEMBERS_LINES = f"""
FROM pg_temp.staging AS s JOIN tasks AS t ON t.id = s.task_id AND t.custom_id = s.custom_id
WHERE s.task_id BETWEEN $3 AND $4 AND s.batch_id = $5 AND {ENDS_TASK} AND t.id BETWEEN $3 AND $4
    AND (t.status IN ('pending', 'submitted')) IS TRUE
    AND NOT EXISTS (SELECT 1 FROM batch_tasks AS m WHERE m.batch_id = $5 AND m.task_id = t.id)"""
_KEEP_NO_LONGER_MEMBERS = f"""
INSERT INTO duplicate_results (api_batch_id, custom_id, line, received_at)
SELECT $1, s.custom_id,
    '{{"custom_id":' || to_json(s.custom_id)::text || ',"result":' || s.result_json::json::text
    || '}}',
    $2::timestamptz
{_NO_LONGER_MEMBERS_LINES}
ON CONFLICT DO NOTHING"""
_COUNT_NO_LONGER_MEMBERS = count_staged("duplicate", _NO_LONGER_MEMBERS_LINES)
# A line whose task is gone since it was staged: DELETEd, or its custom_id changed (the
# apply's guard left it alone). Paid all the same: kept as the collector keeps an
# unmatched line (custom_id first, then the result's text as it came), and counted. A line
# already kept as received (`writeback._keep_received`) stays as it was, counted all the
# same. (The SELECT names $1 and $2 only so that all five arguments have a type.)
_GONE_TASKS_LINES = """
FROM pg_temp.staging AS s
WHERE s.task_id BETWEEN $3 AND $4 AND s.batch_id = $5
    AND NOT EXISTS (
        SELECT 1 FROM tasks AS t WHERE t.id = s.task_id AND t.custom_id = s.custom_id)"""
_FIND_GONE_TASKS_LINES = f"""
SELECT s.custom_id, $1::text, $2::timestamptz {_GONE_TASKS_LINES} ORDER BY s.task_id"""
_KEEP_GONE_TASKS_LINES = f"""
INSERT INTO unmatched_results (api_batch_id, custom_id, line, received_at)
SELECT $1, s.custom_id,
    '{{"custom_id":' || to_json(s.custom_id)::text || ',"result":' || s.result_json::json::text
    || '}}',
    $2::timestamptz
{_GONE_TASKS_LINES}
ON CONFLICT DO NOTHING"""
_COUNT_GONE_TASKS_LINES = count_staged("unmatched", _GONE_TASKS_LINES)
# Negative upserts of the batch's rows, per (day, model) they were counted in.
_UNCOUNT = """
INSERT INTO usage_ledger AS l (day, model, requests, input_tokens, output_tokens,
                               cache_creation_input_tokens, cache_read_input_tokens)
SELECT day, model, -count(*), -sum(input_tokens), -sum(output_tokens),
    -sum(cache_creation_input_tokens), -sum(cache_read_input_tokens)
FROM kept_line_usage WHERE api_batch_id = $1 AND kept_in = 'unmatched'
GROUP BY day, model
ON CONFLICT (day, model) DO UPDATE SET
    requests = l.requests + excluded.requests,
    input_tokens = l.input_tokens + excluded.input_tokens,
    output_tokens = l.output_tokens + excluded.output_tokens,
    cache_creation_input_tokens =
        l.cache_creation_input_tokens + excluded.cache_creation_input_tokens,
    cache_read_input_tokens = l.cache_read_input_tokens + excluded.cache_read_input_tokens"""
# The ledger rows that held nothing but this batch's lines.
_EMPTIED = """
DELETE FROM usage_ledger WHERE requests <= 0
    AND (day, model) IN (SELECT day, model FROM kept_line_usage WHERE api_batch_id = $1)"""


async def keep_unmatched(
    conn: Conn, api_batch_id: str, lines: Sequence[KeptLine], now: Any
) -> None:
    """Keep lines that matched no task of their batch, and count the billed ones. A NUL
    (a malformed line's raw byte, an escape in a custom_id) is kept as the text `\\u0000`:
    PostgreSQL's text refuses it as it is (`storable.py`)."""
    await conn.executemany(
        "INSERT INTO unmatched_results (api_batch_id, custom_id, line, received_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        [(api_batch_id, storable_text(k.custom_id), storable_text(k.line), now) for k in lines],
    )
    billed = [_storable_billed(k) for k in lines if k.usage is not None]
    if billed:
        columns = [list(column) for column in zip(*billed, strict=True)]
        await conn.execute(_COUNT_UNMATCHED, api_batch_id, now, *columns)


def _storable_billed(kept: KeptLine) -> tuple[object, ...]:
    """(custom_id, model, tokens...) of a billed line, its texts as PostgreSQL holds them."""
    model, *tokens = kept.billed()
    return (storable_text(kept.custom_id), None if model is None else storable_text(model), *tokens)


async def keep_left_over_lines(conn: Conn, args: tuple[Any, ...]) -> tuple[int, tuple[str, ...]]:
    """In a range's apply, the lines it left over kept: of tasks no longer members (their
    old request's answer, kept as a duplicate) and of tasks gone (kept unmatched), the
    billed ones counted. Returns (duplicates kept, the gone tasks' custom_ids: a line kept
    by an earlier download is named again, as the collector names an unmatched line)."""
    no_longer = count_of(await conn.execute(_KEEP_NO_LONGER_MEMBERS, *args))
    if no_longer:
        await conn.execute(_COUNT_NO_LONGER_MEMBERS, *args)
    found = await conn.fetch(_FIND_GONE_TASKS_LINES, *args)
    if found:
        await conn.execute(_KEEP_GONE_TASKS_LINES, *args)
        await conn.execute(_COUNT_GONE_TASKS_LINES, *args)
    return no_longer, tuple(row[0] for row in found)


async def uncount_foreign(conn: Conn, api_batch_id: str) -> None:
    """A batch proven another client's: its kept lines' usage leaves the ledger (not ours
    to pay); the caller drops the lines themselves."""
    await conn.execute(_UNCOUNT, api_batch_id)
    await conn.execute(_EMPTIED, api_batch_id)
    await conn.execute(
        "DELETE FROM kept_line_usage WHERE api_batch_id = $1 AND kept_in = 'unmatched'",
        api_batch_id,
    )
