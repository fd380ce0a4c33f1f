"""Backend-neutral intake: which of a stream of (custom_id, params) to insert, and which to
report as duplicates. Each store supplies only its own insert of one chunk."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from itertools import islice

from batchd.store.values import EnqueueReport

ENQUEUE_CHUNK = 5000
# Inserts one chunk of fresh tasks in one transaction: (custom_ids already stored, inserted).
InsertChunk = Callable[[dict[str, str]], Awaitable[tuple[set[str], int]]]


async def enqueue_in_chunks(
    items: Iterable[tuple[str, str]], insert_chunk: InsertChunk
) -> EnqueueReport:
    """Insert `items` a chunk at a time; a custom_id already stored, or repeated within
    `items`, is reported as a duplicate (the first one given wins)."""
    inserted = 0
    duplicates: list[str] = []
    seen: set[str] = set()
    source = iter(items)
    while chunk := list(islice(source, ENQUEUE_CHUNK)):
        fresh: dict[str, str] = {}
        for custom_id, params in chunk:
            if custom_id not in seen and custom_id not in fresh:
                fresh[custom_id] = params
        existing, count = await insert_chunk(fresh)
        inserted += count
        for custom_id, _ in chunk:
            if custom_id in seen or custom_id in existing:
                duplicates.append(custom_id)
            seen.add(custom_id)
    return EnqueueReport(inserted, tuple(duplicates))
