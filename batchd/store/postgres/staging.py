"""A chunk of a batch's parsed lines ─► the rows COPYed into staging (writeback.py), on
PostgreSQL: each line matched to its task of the batch, or reported unmatched, and its
text made storable where PostgreSQL refuses it as it came (storable.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import structlog

from batchd.domain import Outcome
from batchd.store.postgres.connection import Conn
from batchd.store.postgres.storable import NUL, SHOWN, storable_json, storable_text

log = structlog.get_logger("batchd.store.postgres.staging")

# Each line's task and the revision of its request as this read found it a member: the
# apply writes the line only to that revision (writeback.py), which PostgreSQL re-checks on
# the task's row itself when the apply had to wait for it.
_MEMBER_TASK_IDS = """
SELECT t.custom_id, t.id, t.revision FROM unnest($1::text[]) AS line(cid)
JOIN tasks AS t ON t.custom_id = line.cid
JOIN batch_tasks AS m ON m.batch_id = $2 AND m.task_id = t.id"""


async def staging_rows(
    conn: Conn, local_id: int, outcomes: Sequence[Outcome], first_seq: int
) -> tuple[list[tuple[Any, ...]], list[int], list[tuple[str, str]]]:
    """The chunk's rows for `incoming` (writeback.py's `_COLUMNS`), the positions of its
    lines that match no task of batch `local_id`, and (custom_id, line as received) of the
    lines whose text had to be made storable, to be kept with the unmatched ones."""
    custom_ids = [o.custom_id for o in outcomes]
    if NUL in "".join(custom_ids):
        # No task's custom_id holds a NUL (text refuses it), nor may the query's parameter.
        custom_ids = [cid for cid in custom_ids if NUL not in cid]
    found = await conn.fetch(_MEMBER_TASK_IDS, custom_ids, local_id)
    task_ids: dict[str, tuple[int, int]] = {row[0]: (row[1], row[2]) for row in found}
    rows: list[tuple[Any, ...]] = []
    unmatched: list[int] = []
    received: list[tuple[str, str]] = []
    for position, outcome in enumerate(outcomes):
        member = task_ids.get(outcome.custom_id)
        if member is None:
            unmatched.append(position)
            continue
        task_id, revision = member
        usage = outcome.usage
        result_json, error, model = outcome.result_json, outcome.error, outcome.model
        # The common line costs one substring search of its result (bench/README.md).
        if SHOWN in result_json or (error and NUL in error) or (model and NUL in model):
            result_json, error, model = _storable(outcome, received)
        rows.append(
            (
                first_seq + position,
                task_id,
                revision,
                local_id,
                outcome.custom_id,
                outcome.result_type,
                result_json,
                error,
                outcome.retryable,
                usage and usage.input_tokens,
                usage and usage.output_tokens,
                usage and usage.cache_creation_input_tokens,
                usage and usage.cache_read_input_tokens,
                model,
            )
        )
    if received:  # once a chunk: a batch of such lines must not flood the log
        log.warning(
            "results_nul_escaped",
            batch=local_id,
            count=len(received),
            first=received[0][0],
            advice="PostgreSQL cannot store a NUL character: each is written as the text"
            " \\u0000; the lines as received are kept in unmatched_results (docs/postgresql.md)",
        )
    return rows, unmatched, received


def _storable(
    outcome: Outcome, received: list[tuple[str, str]]
) -> tuple[str, str | None, str | None]:
    """The line's result, error and model as PostgreSQL can store them; a line that this
    changed is added to `received` as it came."""
    result_json = storable_json(outcome.result_json)
    error = outcome.error and storable_text(outcome.error)
    model = outcome.model and storable_text(outcome.model)
    if result_json is None and error == outcome.error and model == outcome.model:
        return outcome.result_json, error, model  # an escaped backslash, then `u0000`
    # Kept as the collector keeps an unmatched line: the line's shape around the result's
    # text as the API sent it (its NULs are escapes there: JSON text holds none).
    custom_id = orjson.dumps(outcome.custom_id).decode()
    received.append(
        (outcome.custom_id, f'{{"custom_id":{custom_id},"result":{outcome.result_json}}}')
    )
    return result_json or outcome.result_json, error, model
