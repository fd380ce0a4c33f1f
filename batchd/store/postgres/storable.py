"""Text PostgreSQL cannot store as it came, made storable: a NUL character.

A `text` value refuses a NUL character (SQLSTATE 22021) and `jsonb` refuses the JSON escape
`\\u0000` (22P05), both of which an API's line may carry and SQLite stores. A write-back
that sent them would fail every cycle, its batch never finished and finally paid again
(review 7, finding 2). So each NUL is written as the six characters `\\u0000`: in text as
they are, in JSON as the string `"\\\\u0000"` (still valid JSON, read back as `\\u0000`).
The write-back also keeps such a line as received in `unmatched_results`, so nothing paid
for is altered beyond recovery (docs/postgresql.md, "Per-column differences").
"""

from __future__ import annotations

import re

NUL = "\x00"
SHOWN = "\\u0000"  # what a NUL becomes: backslash, u, four zeros
# A JSON text's backslashes pair from the left: `\\` is one escaped backslash, so the
# `\u0000` in `\\u0000` is plain text, not an escape. Matching both, leftmost first, finds
# exactly the escapes.
_ESCAPES = re.compile(r"\\(?:\\|u0000)")


def storable_text(value: str) -> str:
    """`value` with each NUL character as the six characters `\\u0000`."""
    return value.replace(NUL, SHOWN) if NUL in value else value


def storable_json(text: str) -> str | None:
    """`text` (JSON) with each `\\u0000` escape as the escaped text `\\\\u0000`, or None when
    jsonb takes it as it is (the common case: one substring search)."""
    if SHOWN not in text:
        return None
    changed = _ESCAPES.sub(_escaped_backslash, text)
    return changed if changed != text else None


def _escaped_backslash(found: re.Match[str]) -> str:
    escape = found.group()
    return escape if escape == "\\\\" else "\\" + escape
