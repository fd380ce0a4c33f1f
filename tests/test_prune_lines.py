"""`batchd prune --export` lines, built by the database with the stored texts spliced: each
line is one line of valid JSON, for every row shape a user can store, and holds what the
line parsed and dumped again held (`prunelines.export_line`); on both stores."""

from __future__ import annotations

import json
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.cli import prune as prune_module
from batchd.store import PrunableTask, Store, StoreError
from batchd.store.prunelines import USAGE_KEYS, export_line
from tests.support.backends import Peek

pytestmark = pytest.mark.both_stores

OLD = "2026-01-01T00:00:00.000Z"
CUTOFF = datetime(2026, 6, 1, tzinfo=UTC)
KEYS = ["custom_id", "result", "status", "error", "model", "usage", "created_at"]
KEYS += ["completed_at", "params"]


def deep(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


# (custom_id, params, result): texts as a user or the API may leave them. Either store.
SHAPES: list[tuple[str, str, str | None]] = [
    ("plain", '{"model": "claude-x", "max_tokens": 5}', '{"type": "succeeded"}'),
    ("raw-unicode", '{"t": "é 中文 😀 \u2028 \u2029 \u0085 \ufeff"}', '{"x": "ß\u2028"}'),
    ("escapes", '{"t": "\\u00e9 \\ud83d\\ude00 \\u2028 \\u001f \\n \\" \\\\"}', None),
    ("pretty", '{\n\t"model": "m",\r\n  "list": [1,\n 2]\n}', '{\n "type":\n "errored"}'),
    ("duplicate-keys", '{"a": 1, "a": 2}', '{"b": [], "b": {}}'),
    ("scalar", '"just text"', "[1, 2.5, -0, 1e5, true, null]"),
    ("deep-past-orjson-dumps", deep(300), deep(3)),  # orjson dumps 254 levels at most
    ("deep", deep(600), None),
    ("long-flat", '{"t": "' + "x" * 5000 + '", "l": [' + ",".join(["[]"] * 800) + "]}", None),
    ('odd "id" \\ \n\t é', "{}", None),
]
# Texts only SQLite keeps (PostgreSQL's jsonb refuses them at the INSERT).
SQLITE_SHAPES: list[tuple[str, str, str | None]] = [
    ("not-json", "not json {", "{"),
    ("empty", "", None),
    ("nul-escape", '{"t": "\\u0000"}', None),
]


def value(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def held(row: PrunableTask) -> dict[str, Any]:
    tokens = row[7:11]
    usage = None if tokens[0] is None else dict(zip(USAGE_KEYS, tokens, strict=True))
    values = (row.custom_id, value(row.result), row.status, row.error, row.model, usage,
              row.created_at, row.completed_at, value(row.params))  # fmt: skip
    return dict(zip(KEYS, values, strict=True))


def add_shapes(peek: Peek, shapes: list[tuple[str, str, str | None]]) -> None:
    for n, (custom_id, params, result) in enumerate(shapes):
        peek.execute(
            "INSERT INTO tasks (custom_id, params, status, result, error, model, input_tokens,"
            f" output_tokens, completed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '{OLD}')",
            custom_id,
            params,
            ["succeeded", "errored", "invalid", "canceled", "expired"][n % 5],
            result,
            None if n % 3 else f'error "{n}"\n\u2028',
            None if n % 4 else "claude-x",
            None if n % 2 else 10 + n,
            None if n % 6 else 7,
        )


async def test_every_export_line_is_one_valid_json_line_holding_what_the_row_held(
    store: Store, peek: Peek, tmp_path: Path, store_backend: str
) -> None:
    shapes = SHAPES + (SQLITE_SHAPES if store_backend == "sqlite" else [])
    add_shapes(peek, shapes)
    rows = [row async for page in store.accounts.iter_prunable(CUTOFF) for row in page]
    assert len(rows) == len(shapes)
    # What the row held: each text as its JSON value where orjson reads it, else as a
    # string (as the export wrote it before the splice, parsed and dumped again).
    expected = {row.custom_id: held(row) for row in rows}
    for row in rows:  # the rows the SQL cannot splice are built here, the same way
        assert json.loads(export_line(row)) == expected[row.custom_id], row.custom_id
    export_path = tmp_path / "pruned.jsonl"
    with prune_module.open_export(export_path) as export:
        report = await prune_module.prune(store, CUTOFF, export=export, vacuum=False)
    assert (report.exported, report.deleted) == (len(shapes), len(shapes))
    raw_lines = export_path.read_bytes().split(b"\n")
    assert raw_lines[-1] == b""  # every line ends in a newline, and only there
    lines = raw_lines[:-1]
    assert len(lines) == len(shapes)
    for raw in lines:
        raw.decode("utf-8")  # strict: no lone surrogate, no invalid byte
        line: dict[str, Any] = json.loads(raw)
        assert orjson.loads(raw) == line  # the strictest parser we know reads it too
        assert list(line) == KEYS
        assert line == expected[line["custom_id"]], line["custom_id"]
    spliced = {json.loads(raw)["custom_id"]: json.loads(raw)["params"] for raw in lines}
    assert spliced["pretty"] == {"model": "m", "list": [1, 2]}
    assert spliced["deep"] == json.loads(deep(600))
    if store_backend == "sqlite":
        # Texts that are not JSON stay strings, as before the splice.
        assert spliced["not-json"] == "not json {"


async def test_numbers_and_nesting_past_a_readers_limits_are_kept_as_written(
    store: Store, peek: Peek, tmp_path: Path, store_backend: str
) -> None:
    """RFC 8259 leaves a number's range and the depth of nesting to the reader: the line
    keeps the stored text (valid JSON, which a reader with room reads), where parsing it
    with orjson refused it and kept a string."""
    huge = '{"n": 1e999, "m": 1' + "0" * 400 + "}"
    shapes = [("huge", huge, None), ("deeper-than-parsers", deep(1500), None)]
    if store_backend == "sqlite":  # jsonb refuses an unpaired surrogate
        shapes.append(("lone-surrogate", '{"t": "\\ud800"}', '"\\udc00"'))
    add_shapes(peek, shapes)
    export_path = tmp_path / "pruned.jsonl"
    with prune_module.open_export(export_path) as export:
        await prune_module.prune(store, CUTOFF, export=export, vacuum=False)
    huge_line, deep_line, *lone = export_path.read_bytes().splitlines()
    if lone:  # the RFC's grammar allows any \\uXXXX escape; orjson refuses this one
        assert json.loads(lone[0])["params"] == {"t": "\ud800"}
        assert json.loads(lone[0])["result"] == "\udc00"
    params = json.loads(huge_line)["params"]
    assert params["m"] == 10**400
    assert params["n"] in (float("inf"), 10**999)  # SQLite keeps the text; jsonb, the number
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # a reader with room for 1,500 levels
    try:
        assert json.loads(deep_line)["params"] == json.loads(deep(1500))
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.sqlite_only
async def test_an_invalid_tasks_params_are_exported_whole_past_a_nul(
    store: Store, peek: Peek, tmp_path: Path
) -> None:
    """A NUL inside params: SQLite's json_valid and printf stop there (`{}` would be the
    line's params and the rest lost). batchd marks such a task invalid; its line is built
    in Python, the whole text kept as a string."""
    params = '{}\x00"more data"'
    peek.execute(
        "INSERT INTO tasks (custom_id, params, status, error, completed_at)"
        f" VALUES ('nul', ?, 'invalid', 'not JSON', '{OLD}')",
        params,
    )
    export_path = tmp_path / "pruned.jsonl"
    with prune_module.open_export(export_path) as export:
        report = await prune_module.prune(store, CUTOFF, export=export, vacuum=False)
    assert (report.exported, report.deleted) == (1, 1)
    [line] = export_path.read_bytes().splitlines()
    assert json.loads(line)["params"] == params


@pytest.mark.sqlite_only
async def test_a_text_that_is_not_utf8_stops_the_export_and_its_task_stays(
    store: Store, peek: Peek, db_path: Path, tmp_path: Path
) -> None:
    """A TEXT holding bytes that are not UTF-8 (bound by another client as bytes): the line
    could not be JSON, so the prune stops with an error naming the column before deleting
    the tasks of its page, and the file holds only valid lines."""
    peek.execute(
        "INSERT INTO tasks (custom_id, params, status, result, completed_at)"
        " VALUES ('good', '{}', 'succeeded', '{}', '2025-12-01T00:00:00.000Z')"
    )
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute(
            "INSERT INTO tasks (custom_id, params, status, result, completed_at)"
            f" VALUES ('bad', CAST(X'7B2274223A2280FF227D' AS TEXT), 'succeeded', '{{}}',"
            f" '{OLD}')"
        )
    conn.close()
    export_path = tmp_path / "pruned.jsonl"
    with pytest.raises(StoreError, match="UTF-8"), prune_module.open_export(export_path) as out:
        await prune_module.prune(store, CUTOFF, export=out, vacuum=False)
    lines = [json.loads(line.decode("utf-8")) for line in export_path.read_bytes().splitlines()]
    assert "bad" not in [line["custom_id"] for line in lines]
    assert sorted(row[0] for row in peek.query("SELECT custom_id FROM tasks")) == ["bad", "good"]
