"""The operators' commands of issue 14: `batches`, `tasks`, `cancel --all / --status`,
`acknowledge-duplicate` (main.py parses; these call the store and print)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

import orjson

from batchd.cli.listings import batches_document, render_batches, render_tasks, tasks_document
from batchd.domain import BatchState, TaskStatus
from batchd.store import Store


async def batches(store: Store, args: argparse.Namespace) -> int:
    states = [BatchState(state) for state in args.state or ()]
    document = await batches_document(store, datetime.now(UTC), limit=args.limit, states=states)
    print(orjson.dumps(document).decode() if args.json else render_batches(document))
    return 0


async def tasks(store: Store, args: argparse.Namespace) -> int:
    document = await tasks_document(store, TaskStatus(args.status), limit=args.limit)
    print(orjson.dumps(document).decode() if args.json else render_tasks(document))
    return 0


async def cancel_waiting(store: Store, args: argparse.Namespace) -> int:
    """`cancel --all` or `cancel --status S`: every waiting task of those statuses."""
    statuses = (
        [TaskStatus.PENDING, TaskStatus.SUBMITTED]
        if args.all
        else [TaskStatus(status) for status in dict.fromkeys(args.status)]
    )
    report = await store.cancel_waiting(statuses)
    print(
        f"canceled {report.canceled} pending task(s)\n"
        f"flagged {report.flagged} submitted task(s): their batch is canceled once every "
        "task in it is flagged; a result that arrives first is kept"
    )
    return 0


async def acknowledge_duplicate(store: Store, args: argparse.Namespace) -> int:
    report = await store.acknowledge_duplicates(args.batch_ids, args.note)
    for batch_id in report.acknowledged:
        print(
            f"acknowledged {batch_id}: kept in duplicate_batches for the record, no longer "
            "reported by status"
        )
    for batch_id in report.already:
        print(f"{batch_id}: already acknowledged")
    for batch_id in report.unknown:
        print(f"batchd: {batch_id} is not a suspected duplicate batch", file=sys.stderr)
    return 1 if report.unknown else 0
