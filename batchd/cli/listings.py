"""`batchd batches` and `batchd tasks`: local batches and tasks by status, for operators.

The `--json` documents are built from the same builders as the status document (and so
the web view's /api/status): `service.status.batch_json` for a batch, `commands.task_json`
(as `status CUSTOM_ID --json`) for a task. No listing writes: the store is opened read-only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from batchd.cli.commands import task_json
from batchd.domain import BatchRecord, BatchState, TaskRow, TaskStatus
from batchd.service.status import batch_json
from batchd.store import Store

_COUNT_KINDS = ("processing", "succeeded", "errored", "canceled", "expired")


async def batches_document(
    store: Store, now: datetime, *, limit: int, states: list[BatchState]
) -> dict[str, Any]:
    """The newest `limit` local batches (of `states`, or all), newest first."""
    batches: list[BatchRecord] = await store.recent_batches(limit, states)
    return {
        "generated_at": now.isoformat(),
        "batches": [batch_json(batch, now) for batch in batches],
    }


async def tasks_document(store: Store, status: TaskStatus, *, limit: int) -> dict[str, Any]:
    """Up to `limit` tasks in `status`, oldest first."""
    rows: list[TaskRow] = await store.tasks_in_status(status, limit)
    return {"status": str(status), "tasks": [task_json(row) for row in rows]}


def render_batches(document: dict[str, Any]) -> str:
    batches = document["batches"]
    if not batches:
        return "no batches"
    lines = [
        f"{'BATCH':<36} {'LOCAL':>6} {'STATE':<11} {'REQUESTS':>8}  "
        f"{'AGE':>7} {'EXPIRES IN':>10}  COUNTS"
    ]
    for batch in batches:
        counts = batch["request_counts"] or {}
        shown = ", ".join(f"{kind} {counts[kind]}" for kind in _COUNT_KINDS if counts.get(kind))
        expires = batch["expires_in_s"]
        lines.append(
            f"{batch['batch_id'] or '(creating)':<36} {batch['local_id']:>6} "
            f"{batch['state']:<11} {batch['requests']:>8,}  {duration(batch['age_s']):>7} "
            f"{'-' if expires is None else duration(expires):>10}  {shown or '-'}"
        )
    return "\n".join(lines)


def render_tasks(document: dict[str, Any]) -> str:
    tasks = document["tasks"]
    if not tasks:
        return f"no {document['status']} tasks"
    lines = [f"{'CUSTOM_ID':<40} {'STATUS':<10} {'ATTEMPTS':>8}  {'BATCH':<36} ERROR"]
    for task in tasks:
        error = (task["error"] or "").replace("\n", " ")
        lines.append(
            f"{task['custom_id']:<40} {task['status']:<10} {task['attempts']:>8}  "
            f"{task['batch_id'] or '-':<36} {error[:100]}"
        )
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """A short human duration: 45s, 12m, 3h05m, 2d04h; negative ones (overdue) with '-'."""
    sign, total = ("-", -seconds) if seconds < 0 else ("", seconds)
    whole = int(total)
    if whole < 60:
        return f"{sign}{whole}s"
    if whole < 3600:
        return f"{sign}{whole // 60}m"
    if whole < 86400:
        return f"{sign}{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{sign}{whole // 86400}d{whole % 86400 // 3600:02d}h"
