"""Result lines no task holds, and what they cost (migration 015), in the caller's
transaction, on PostgreSQL (the SQLite twin: `batchd/store/sqlite/kept_lines.py`):
unmatched lines kept with their billed usage counted, and a foreign batch's usage taken
back out of the ledger. (A duplicate line is counted where it is kept, in the range's
apply: `writeback.py`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchd.store.postgres.connection import Conn
from batchd.store.postgres.storable import storable_text
from batchd.store.values import KeptLine

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


async def uncount_foreign(conn: Conn, api_batch_id: str) -> None:
    """A batch proven another client's: its kept lines' usage leaves the ledger (not ours
    to pay); the caller drops the lines themselves."""
    await conn.execute(_UNCOUNT, api_batch_id)
    await conn.execute(_EMPTIED, api_batch_id)
    await conn.execute(
        "DELETE FROM kept_line_usage WHERE api_batch_id = $1 AND kept_in = 'unmatched'",
        api_batch_id,
    )
