"""One line of `batchd prune --export`: a pruned task as JSON, `custom_id` and `result`
first (the API's own results line), then what else the row held, so the export loses
nothing.

Each store builds the lines in its SQL, splicing the stored params and result texts as
they are (`sqlite/pruning.py`, `postgres/pruning.py`): parsing each and dumping it again
took half of an export's time (bench/README.md, "Session 6: prune"). A text is spliced
only where the line is sure to stay JSON that any parser reads: the store's own JSON
check passes (SQLite `json_valid`; PostgreSQL keeps jsonb, valid by construction), it has
no `\\u` escape (an escaped lone surrogate passes `json_valid`, and orjson refuses it),
and it is nested at most `MAX_SPLICED_DEPTH` deep (json_valid takes 2,000 levels; orjson
and Python's json give up near 1,000). Any other row is built here, by `export_line`,
exactly as before the splice: a text orjson cannot read is kept as a JSON string.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from batchd.store.values import PrunableTask

# A text this long or shorter cannot nest deeper (each level takes two characters); a
# longer one is spliced when it holds at most this many `[` and `{` in all.
MAX_SPLICED_DEPTH = 500
SHORT_TEXT = 2 * MAX_SPLICED_DEPTH
USAGE_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def export_line(row: PrunableTask) -> bytes:
    """The line of one pruned task, parsing its texts (for the rows the SQL leaves)."""
    (_, custom_id, status, result, error, params, model, *tokens, created, completed) = row
    line = {
        "custom_id": custom_id,
        "result": None if result is None else _json(result),
        "status": status,
        "error": error,
        "model": model,
        "usage": None if tokens[0] is None else dict(zip(USAGE_KEYS, tokens, strict=True)),
        "created_at": created,
        "completed_at": completed,
        "params": _json(params),
    }
    return orjson.dumps(line)


def _json(text: str) -> Any:
    """The stored JSON text as a value of the line, or the text itself as a JSON string
    where orjson cannot read it: invalid tasks may hold params that are not JSON, and a
    line must stay valid JSON whatever a user stored."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:  # nested past orjson's 254 levels for dumping
        try:
            return orjson.Fragment(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
        except RecursionError:
            return text
    return value
