"""Result lines no task holds, and what they cost (migration 015), in the caller's
transaction: unmatched lines kept with their billed usage counted, and a foreign batch's
usage taken back out of the ledger. (A duplicate line is counted where it is kept, in the
range's apply: `writeback.py`; a line whose task went since it was staged, below.)

The API bills every succeeded line (spec §5). `kept_line_usage` holds one row per line of
an API batch: its trigger adds it to `usage_ledger`, and a line kept again is ignored, so
a re-download counts nothing twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchd.store.sqlite.database import Db, run, run_many
from batchd.store.values import KeptLine

_KEEP_UNMATCHED = (
    "INSERT OR IGNORE INTO unmatched_results (api_batch_id, custom_id, line, received_at)"
    " VALUES (?, ?, ?, ?)"
)


def count_staged(kept_in: str, lines: str) -> str:
    """SQL counting the billed (succeeded) staged lines `lines` (a FROM ... WHERE over
    `staging.results AS s`) as `kept_in`, one row per line of the API batch (:api_id),
    dated :now: a line counted before is ignored."""
    return f"""
INSERT OR IGNORE INTO kept_line_usage
SELECT :api_id, s.custom_id, '{kept_in}', substr(:now, 1, 10), coalesce(s.model, ''),
    coalesce(s.input_tokens, 0), coalesce(s.output_tokens, 0),
    coalesce(s.cache_creation_input_tokens, 0), coalesce(s.cache_read_input_tokens, 0)
{lines} AND s.result_type = 'succeeded'"""


_COUNT_UNMATCHED = (
    "INSERT OR IGNORE INTO kept_line_usage VALUES (?, ?, 'unmatched', substr(?, 1, 10),"
    " coalesce(?, ''), ?, ?, ?, ?)"
)
# Staged lines of a range whose task is gone since they were staged: DELETEd, or its
# custom_id changed (then the apply's guard left it alone). Kept as the collector keeps an
# unmatched line: custom_id first, then the result's text as it came.
_GONE_TASKS_LINES = """
FROM staging.results AS s
WHERE s.task_id BETWEEN :first AND :last AND s.batch_id = :local
    AND NOT EXISTS (
        SELECT 1 FROM tasks AS t WHERE t.id = s.task_id AND t.custom_id = s.custom_id)"""
_KEEP_GONE_TASKS_LINES = f"""
INSERT OR IGNORE INTO unmatched_results (api_batch_id, custom_id, line, received_at)
SELECT :api_id, s.custom_id,
    '{{"custom_id":' || json_quote(s.custom_id) || ',"result":' || s.result_json || '}}', :now
{_GONE_TASKS_LINES}"""
_COUNT_GONE_TASKS_LINES = count_staged("unmatched", _GONE_TASKS_LINES)
# Negative upserts of the batch's rows, per (day, model) they were counted in.
_UNCOUNT = """
INSERT INTO usage_ledger (day, model, requests, input_tokens, output_tokens,
                          cache_creation_input_tokens, cache_read_input_tokens)
SELECT day, model, -count(*), -sum(input_tokens), -sum(output_tokens),
    -sum(cache_creation_input_tokens), -sum(cache_read_input_tokens)
FROM kept_line_usage WHERE api_batch_id = ? AND kept_in = 'unmatched'
GROUP BY day, model
ON CONFLICT (day, model) DO UPDATE SET
    requests = requests + excluded.requests,
    input_tokens = input_tokens + excluded.input_tokens,
    output_tokens = output_tokens + excluded.output_tokens,
    cache_creation_input_tokens =
        cache_creation_input_tokens + excluded.cache_creation_input_tokens,
    cache_read_input_tokens = cache_read_input_tokens + excluded.cache_read_input_tokens"""
# The ledger rows that held nothing but this batch's lines.
_EMPTIED = """
DELETE FROM usage_ledger WHERE requests <= 0
    AND (day, model) IN (SELECT day, model FROM kept_line_usage WHERE api_batch_id = ?)"""


async def keep_unmatched(db: Db, api_batch_id: str, lines: Sequence[KeptLine], now: str) -> None:
    """Keep lines that matched no task of their batch, and count the billed ones."""
    await run_many(db, _KEEP_UNMATCHED, [(api_batch_id, k.custom_id, k.line, now) for k in lines])
    billed = [(api_batch_id, k.custom_id, now, *k.billed()) for k in lines if k.usage is not None]
    if billed:
        await run_many(db, _COUNT_UNMATCHED, billed)


async def keep_gone_tasks_lines(db: Db, names: dict[str, Any]) -> tuple[str, ...]:
    """In a range's apply (`writeback.py`, names: api_id, local, first, last, now): keep the
    staged lines whose task is gone, counting the billed ones; returns their custom_ids
    (a line kept before, by a download before this one, is named again, as the collector
    names an unmatched line again)."""
    found = await db.execute_fetchall(f"SELECT s.custom_id {_GONE_TASKS_LINES}", names)
    gone = tuple(custom_id for (custom_id,) in found)
    if gone:
        await run(db, _KEEP_GONE_TASKS_LINES, names)
        await run(db, _COUNT_GONE_TASKS_LINES, names)
    return gone


async def uncount_foreign(db: Db, api_batch_id: str) -> None:
    """A batch proven another client's: its kept lines' usage leaves the ledger (not ours
    to pay); the caller drops the lines themselves."""
    await run(db, _UNCOUNT, (api_batch_id,))
    await run(db, _EMPTIED, (api_batch_id,))
    await run(
        db,
        "DELETE FROM kept_line_usage WHERE api_batch_id = ? AND kept_in = 'unmatched'",
        (api_batch_id,),
    )
