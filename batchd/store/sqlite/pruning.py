"""`batchd prune` on SQLite: the tasks finished before a cutoff, oldest first, paged by key
on tasks_by_completion, and their deletes (`SqliteStore.accounts` calls these).

The index is (completed_at) and SQLite keeps the rowid after its columns, so a page
resumes at (completed_at, id) with two seeks: the rest of the last page's time, then the
times after it. Only entries before the cutoff are read, whatever the history holds
(through tasks_by_status, every finished task's entry up to the last old one was).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from batchd.crashpoints import crash_point
from batchd.domain import FINAL_TASK_STATUSES
from batchd.store.prunelines import export_line
from batchd.store.rows import keyed_pages
from batchd.store.sqlite.database import Db, Row, json_list, run
from batchd.store.values import PrunableTask, PruneExportPage

Read = Callable[[str, dict[str, Any]], Awaitable[list[Row]]]
Key = tuple[Any, int]  # (completed_at, id) of the last row of a page

FINAL = sorted(FINAL_TASK_STATUSES)
_FINAL_SQL = ", ".join(f"'{status}'" for status in FINAL)
PRUNE_COLUMNS = (
    "id, custom_id, status, result, error, params, model, input_tokens, output_tokens,"
    " cache_creation_input_tokens, cache_read_input_tokens, created_at, completed_at"
)


def _valid(text: str) -> str:
    """SQL: `text` is JSON text by SQLite's check."""
    return f"(typeof({text}) = 'text' AND json_valid({text}))"


# The export line of prunelines.py built by printf (one pass, where each `||` copied the
# line so far): the stored texts spliced as they are, every other value quoted by
# json_quote (NULL as null). NULL where a text is not valid JSON, and where an invalid
# task's params hold a NUL: json_valid and printf stop there (`{}\0...` passes as `{}`),
# and batchd marks such params invalid (only there is the byte search worth its cost).
# `export_pages` sends a line holding a line break or bytes that are not UTF-8 to
# `export_line` too (prunelines.py).
_LINE = f"""CASE WHEN (status <> 'invalid' OR instr(CAST(params AS BLOB), X'00') = 0)
        AND {_valid("params")} AND (result IS NULL OR {_valid("result")})
    THEN printf('{{"custom_id":%s,"result":%s,"status":%s,"error":%s,"model":%s,"usage":%s,'
                || '"created_at":%s,"completed_at":%s,"params":%s}}',
        json_quote(custom_id), coalesce(result, 'null'), json_quote(status), json_quote(error),
        json_quote(model),
        CASE WHEN input_tokens IS NULL THEN 'null' ELSE printf(
            '{{"input_tokens":%s,"output_tokens":%s,"cache_creation_input_tokens":%s,'
            || '"cache_read_input_tokens":%s}}', json_quote(input_tokens),
            json_quote(output_tokens), json_quote(cache_creation_input_tokens),
            json_quote(cache_read_input_tokens)) END,
        json_quote(created_at), json_quote(completed_at), params)
    END"""
# A spliced text may hold a line break (JSON's whitespace may be one; json_quote escapes
# those of the other values): looked for in Python, in a whole page at once, where it is
# a memchr (SQLite's instr() on each text cost more than building the line). Read as a
# BLOB, the line's bytes as SQLite holds them: a TEXT was decoded to a str, then joined
# and encoded again (0.15 s of CPU per 100,000 lines).
_LINE_BYTES = f"CAST(({_LINE}) AS BLOB)"


def _spliced(line: bytes | None) -> bool:
    return line is not None and b"\n" not in line and b"\r" not in line and _utf8(line)


def _utf8(text: bytes) -> bool:
    """Whether these bytes are UTF-8: SQLite keeps a TEXT's bytes as they were bound, and
    json_valid and printf pass on what is not (a line must be JSON, so UTF-8)."""
    if text.isascii():  # the common case, at memory speed
        return True
    try:
        text.decode()
    except UnicodeDecodeError:
        return False
    return True


def _page_text(lines: list[bytes | None]) -> bytes | None:
    """The page's lines, each ending in a newline, if every one of them can be spliced;
    None if one cannot (then each is looked at alone)."""
    texts = [line for line in lines if line is not None]
    if len(texts) != len(lines):
        return None
    text = b"\n".join(texts) + b"\n"
    if text.count(b"\n") != len(lines) or b"\r" in text or not _utf8(text):
        return None
    return text


def _pages(columns: str, condition: str = "") -> tuple[str, str, str]:
    """SQL of the first page, of the rest of a time after a key, and of the times after
    it: `columns` start with `completed_at, id`, in (completed_at, id) order."""
    where = f" AND ({condition})" if condition else ""
    start = f"SELECT {columns} FROM tasks WHERE completed_at < :cutoff{where}"
    order = " ORDER BY completed_at, id LIMIT :limit"
    return (
        start + order,
        f"SELECT {columns} FROM tasks WHERE completed_at = :time AND id > :id{where}"
        " ORDER BY id LIMIT :limit",
        start + " AND completed_at > :time" + order,
    )


async def _page(read: Read, sql: tuple[str, str, str], cutoff: str, key: Key | None,
                limit: int) -> list[Row]:  # fmt: skip
    first, same_time, later = sql
    if key is None:
        return await read(first, {"cutoff": cutoff, "limit": limit})
    named = {"cutoff": cutoff, "time": key[0], "id": key[1], "limit": limit}
    rows = await read(same_time, named)
    if len(rows) < limit:
        rows += await read(later, {**named, "limit": limit - len(rows)})
    return rows


def _keyed_pages(
    read: Read, sql: tuple[str, str, str], cutoff: str, page_size: int
) -> AsyncIterator[list[Row]]:
    return keyed_pages(lambda key: _page(read, sql, cutoff, key, page_size), page_size)


_KEYS = _pages("completed_at, id")
_ROWS = _pages(f"completed_at, {PRUNE_COLUMNS}", f"+status IN ({_FINAL_SQL})")
_LINES = _pages(f"completed_at, id, {_LINE_BYTES}", f"+status IN ({_FINAL_SQL})")


async def prunable_ids(read: Read, cutoff: str, page_size: int) -> AsyncIterator[list[int]]:
    """Ids of the tasks with a completion time before `cutoff`, oldest first, from the
    index alone: the final ones, as batchd keeps them (a retry clears the time); the
    deletes check the status again."""
    async for rows in _keyed_pages(read, _KEYS, cutoff, page_size):
        yield [row[1] for row in rows]


async def prunable_rows(
    read: Read, cutoff: str, page_size: int
) -> AsyncIterator[list[PrunableTask]]:
    """Final tasks completed before `cutoff`, oldest first, every column."""
    async for rows in _keyed_pages(read, _ROWS, cutoff, page_size):
        yield [PrunableTask(*row[1:]) for row in rows]


async def export_pages(read: Read, cutoff: str, page_size: int) -> AsyncIterator[PruneExportPage]:
    """`prunable_rows` as export lines, built by SQLite; a row whose texts cannot be
    spliced is read again whole and built by `prunelines.export_line`."""
    async for rows in _keyed_pages(read, _LINES, cutoff, page_size):
        task_ids = [row[1] for row in rows]
        lines: list[bytes | None] = [row[2] for row in rows]
        text = _page_text(lines)
        if text is None:
            task_ids, text = await _built_here(read, task_ids, lines)
        yield PruneExportPage(task_ids, text)


async def _built_here(
    read: Read, task_ids: list[int], lines: list[bytes | None]
) -> tuple[list[int], bytes]:
    """The page with the lines SQLite could not splice built by `export_line`."""
    unplain = [i for i, line in zip(task_ids, lines, strict=True) if not _spliced(line)]
    whole = await read(
        f"SELECT {PRUNE_COLUMNS} FROM tasks WHERE id IN (SELECT value FROM json_each(:ids))",
        {"ids": json_list(unplain)},
    )
    built = {row[0]: export_line(PrunableTask(*row)) for row in whole}
    # A row gone meanwhile (deleted by a user) is left out of the file and the page.
    kept = [
        (i, line if _spliced(line) else built.get(i))
        for i, line in zip(task_ids, lines, strict=True)
    ]
    return [i for i, line in kept if line is not None], b"".join(
        line + b"\n" for _, line in kept if line is not None
    )


async def delete_page(db: Db, cutoff: str, key: Key | None, limit: int) -> tuple[int, Key | None]:
    """One transaction of a prune without export: the next `limit` tasks after `key` found
    and deleted. (deleted, the key to go on from, or None when none is left)."""
    rows = await _page(_reader_of(db), _KEYS, cutoff, key, limit)
    if not rows:
        return 0, None
    deleted = await delete_ids(db, json_list(row[1] for row in rows), cutoff)
    return deleted, (rows[-1][0], rows[-1][1]) if len(rows) == limit else None


def _reader_of(db: Db) -> Read:
    async def read(sql: str, named: dict[str, Any]) -> list[Row]:
        return [tuple(row) for row in await db.execute_fetchall(sql, named)]

    return read


async def delete_ids(db: Db, task_ids: str, cutoff: str) -> int:
    """Delete these tasks (a JSON list), if still final and completed before `cutoff`.

    `+status`: found by id, never through tasks_by_status (all final rows).

    secure_delete FAST for these deletes only: SQLite as Debian builds it zeroes every
    deleted cell and writes every page a delete frees to the WAL (secure_delete = 1), a
    third of the WAL a prune wrote (193 against 136 MB per 100,000 tasks, plain sqlite3)
    and ~12% of its CPU. FAST still zeroes what is written anyway; the freed pages keep
    their old bytes until reused, or until prune's VACUUM drops them."""
    rows = await db.execute_fetchall("PRAGMA secure_delete")
    previous = int(next(iter(rows))[0])
    await db.execute("PRAGMA secure_delete = FAST")
    try:
        deleted = await run(
            db,
            "DELETE FROM tasks WHERE id IN (SELECT value FROM json_each(?))"
            f" AND +status IN ({_FINAL_SQL}) AND completed_at < ?",
            (task_ids, cutoff),
        )
        crash_point("prune_deleted")  # tests: killed before the commit
        return deleted
    finally:
        await db.execute(f"PRAGMA secure_delete = {previous}")
