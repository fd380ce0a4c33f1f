"""One line of `batchd prune --export`: a pruned task as JSON, `custom_id` and `result`
first (the API's own results line), then what else the row held, so the export loses
nothing.

Each store builds the lines in its SQL, splicing the stored params and result texts as
they are (`sqlite/pruning.py`, `postgres/pruning.py`): parsing each and dumping it again
took half of an export's time (bench/README.md, "Session 6: prune"). PostgreSQL's jsonb
text is always valid JSON, on one line. SQLite splices a text that passes `json_valid`
and holds no line break (JSON's whitespace may be one); any other row is built here, by
`export_line`, as before the splice: a text orjson cannot read is kept as a JSON string.

What a spliced text keeps as stored, valid JSON (RFC 8259) that some readers refuse just
as they refuse the stored text itself: a number beyond a double's range (the RFC leaves
the range to the reader: Python's json reads 1e999, orjson refuses it), an escaped
unpaired UTF-16 surrogate (`"\\ud800"`: the RFC's grammar allows any `\\uXXXX`;
Python's json reads it, orjson refuses it), and nesting deeper than a reader's limit
(orjson reads 1,024 levels, Python's json ~1,000; SQLite's json_valid takes 2,000).
Looking for these cost more than the splice saved: counting brackets in SQL 0.5 s of CPU
per 100,000 rows, searching each page for `\\ud` ~0.3 s.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from batchd.store.values import PrunableTask

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
