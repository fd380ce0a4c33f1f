"""The user-facing commands other than `run`: enqueue, status, results, cancel, retry."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from batchd.cli.prune import PruneReport
from batchd.domain import TaskRow, TaskStatus
from batchd.money.spending import render_budget, render_usage

# The status document moved below the command line, to be served by the daemon too; its
# names stay importable from here (the `as` form is mypy's explicit re-export).
from batchd.service.status import RETENTION_MARGIN as RETENTION_MARGIN  # noqa: PLC0414
from batchd.service.status import retention_warnings as retention_warnings  # noqa: PLC0414
from batchd.service.status import status_snapshot as status_snapshot  # noqa: PLC0414
from batchd.service.status import task_head
from batchd.store import CancelReport, EnqueueReport, ResultRow, Store

_ENQUEUE_CHUNK = 5000
_RESULT_LINE = b'{"custom_id":%b,"result":%b}\n'


@dataclass(frozen=True, slots=True)
class BadLine:
    line_number: int
    reason: str


@dataclass(frozen=True, slots=True)
class EnqueueSummary:
    inserted: int
    duplicates: tuple[str, ...]
    bad_lines: tuple[BadLine, ...]


def _parse_request_line(text: bytes) -> tuple[str, str] | str:
    """(custom_id, params text) or the reason the line is unusable.

    A line with a custom_id but unusable params is kept: the daemon marks it invalid with
    the reason, so nothing the user sent disappears silently.
    """
    try:
        item = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return f"not valid JSON: {exc}"
    if not isinstance(item, dict):
        return "not a JSON object"
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "custom_id is missing or not a string"
    if "params" not in item:
        return "params is missing"
    return custom_id, orjson.dumps(item["params"]).decode()


def _request_lines(stream: IO[bytes], bad: list[BadLine]) -> Iterator[tuple[str, str]]:
    for number, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        parsed = _parse_request_line(raw)
        if isinstance(parsed, str):
            bad.append(BadLine(number, parsed))
        else:
            yield parsed


async def enqueue_file(store: Store, stream: IO[bytes]) -> EnqueueSummary:
    """Insert every usable line of a JSONL file of `{"custom_id", "params"}` items."""
    bad: list[BadLine] = []
    inserted = 0
    duplicates: list[str] = []
    batch: list[tuple[str, str]] = []
    for item in _request_lines(stream, bad):
        batch.append(item)
        if len(batch) >= _ENQUEUE_CHUNK:
            report = await store.enqueue(batch)
            inserted, batch = inserted + report.inserted, []
            duplicates.extend(report.duplicates)
    if batch:
        report = await store.enqueue(batch)
        inserted += report.inserted
        duplicates.extend(report.duplicates)
    return EnqueueSummary(inserted, tuple(duplicates), tuple(bad))


def open_input(path: str) -> IO[bytes]:
    return sys.stdin.buffer if path == "-" else Path(path).open("rb")


def render_status(snapshot: dict[str, Any]) -> str:
    tasks: dict[str, int] = snapshot["tasks"]
    lines = [f"tasks: {sum(tasks.values())}"]
    lines += [f"  {status:<10} {count:>10,}" for status, count in tasks.items()]
    batches = snapshot["batches_in_flight"]
    lines.append(f"batches in flight: {len(batches)}")
    for batch in batches:
        counts = batch["request_counts"] or {}
        done = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        candidate = batch.get("candidate_for")
        lines.append(
            f"  {batch['batch_id'] or '(creating)':<36} {batch['state']:<11} "
            f"{batch['requests']:>7,} requests  {done}"
            + (f"  (possible duplicate, read for local batch {candidate})" if candidate else "")
        )
    if "usage" in snapshot:
        lines += render_usage(snapshot["usage"])
    if snapshot.get("budget"):
        lines += render_budget(snapshot["budget"])
    lines += status_alerts(snapshot)
    return "\n".join(lines)


def status_alerts(snapshot: dict[str, Any]) -> list[str]:
    """The lines that need a person's attention, loudly."""
    alerts = [
        f"RESULTS NEAR ARCHIVAL: {w['batch_id']} ({w['state']}) was created {w['age_days']} "
        f"days ago; its results are not stored yet and are archived in "
        f"{w['archived_in_days']} days"
        for w in snapshot.get("retention", [])
    ]
    results = snapshot.get("results") or {}
    if results.get("unmatched"):
        alerts.append(
            f"UNMATCHED RESULTS: {results['unmatched']} result line(s) matched no task of "
            "their batch: kept in the unmatched_results table"
        )
    if results.get("missing_requeued"):
        alerts.append(
            f"MISSING RESULTS: {results['missing_requeued']} request(s) had no line in a "
            "whole results stream: requeued, listed in the missing_results table"
        )
    if results.get("archived_requeued"):
        alerts.append(
            f"ARCHIVED RESULTS: {results['archived_requeued']} request(s) of batches whose "
            "results were archived before they were written: requeued, so sent and paid for "
            "again; listed in the missing_results table (reason 'archived')"
        )
    for duplicate in snapshot["duplicate_batches"]:
        alerts.append(
            f"POSSIBLE DUPLICATE BATCH {duplicate['batch_id']}: {duplicate['note']}; "
            + _harvest_text(duplicate)
        )
    shared = snapshot.get("shared_key") or {}
    if shared.get("batches_not_ours"):
        alerts.append(
            f"KEY APPEARS SHARED: {shared['batches_not_ours']} batch(es) on this API key were "
            f"not created by batchd (first seen {shared['first_seen_at']}; "
            f"{shared['proven_foreign']} proven by their results). Give batchd a dedicated "
            "workspace key (the API lists batches per workspace): see docs/operations.md, "
            '"One key, one batchd"'
        )
    return alerts


def _harvest_text(duplicate: dict[str, Any]) -> str:
    state, origin = duplicate.get("harvest_state"), duplicate.get("origin")
    if origin == "foreign":
        return f"foreign: its {duplicate['foreign_lines']} line(s) named no task of ours"
    if state == "completed":
        return (
            f"harvested: {duplicate['written']} result(s) written from it, "
            f"{duplicate['duplicate_lines']} duplicate line(s) kept"
        )
    if state in ("lost", "unread"):
        return f"never read ({state})"
    return f"being read ({state}): its results will be harvested"


def task_json(row: TaskRow) -> dict[str, Any]:
    return {
        **task_head(row),
        "result": orjson.loads(row.result_json) if row.result_json else None,
        "created_at": row.created_at,
        "submitted_at": row.submitted_at,
        "completed_at": row.completed_at,
    }


def render_task(row: TaskRow) -> str:
    text = f"{row.custom_id}: {row.status} (attempts {row.attempts}"
    text += f", batch {row.api_batch_id})" if row.api_batch_id else ")"
    if row.error:
        text += f"\n  error: {row.error}"
    return text


async def export_results(store: Store, out: IO[bytes], statuses: Sequence[TaskStatus]) -> int:
    """Write `{"custom_id", "result"}` lines, the API's own JSONL shape; returns the count.
    A page's lines are built by one format each (a third faster than four concatenations,
    each copying the result again) and written at once."""
    count = 0
    pages: AsyncIterator[list[ResultRow]] = store.iter_result_rows(statuses)
    dumps = orjson.dumps
    async for page in pages:
        out.write(b"".join([_RESULT_LINE % (dumps(cid), result) for _, cid, result in page]))
        count += len(page)
    return count


def render_cancel(report: CancelReport) -> str:
    parts = [
        f"canceled {len(report.canceled)} pending task(s)",
        f"flagged {len(report.flagged)} submitted task(s): their batch is canceled once every "
        "task in it is flagged; a result that arrives first is kept",
    ]
    if report.not_cancelable:
        parts.append(f"already finished: {', '.join(report.not_cancelable[:10])}")
    if report.unknown:
        parts.append(f"unknown custom_id: {', '.join(report.unknown[:10])}")
    return "\n".join(parts)


def render_enqueue(summary: EnqueueSummary | EnqueueReport) -> str:
    text = f"enqueued {summary.inserted} task(s)"
    if summary.duplicates:
        text += (
            f"; {len(summary.duplicates)} duplicate custom_id(s) skipped "
            f"(first: {summary.duplicates[0]})"
        )
    if isinstance(summary, EnqueueSummary):
        for bad in summary.bad_lines[:20]:
            text += f"\nline {bad.line_number}: {bad.reason}"
        if len(summary.bad_lines) > 20:
            text += f"\n... and {len(summary.bad_lines) - 20} more bad line(s)"
    return text


def render_prune(report: PruneReport) -> str:
    text = (
        f"pruned {report.deleted:,} finished task(s) completed before "
        f"{report.cutoff:%Y-%m-%d %H:%M:%S} UTC"
    )
    if report.exported:
        text += f"; {report.exported:,} exported first"
    text += (
        f"\nforgot {report.batches_deleted:,} batch(es) and {report.batch_links_deleted:,} "
        "batch-task link(s) that no longer carry any task"
    )
    size = f"{report.bytes_before / 1e6:,.1f} MB -> {report.bytes_after / 1e6:,.1f} MB"
    text += f"\nvacuumed: {size}" if report.vacuumed else "\nnot vacuumed (--no-vacuum)"
    return text
