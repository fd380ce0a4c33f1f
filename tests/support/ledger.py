"""Money paid against money recorded: what the fake API billed (every succeeded line of
every ended batch, spec §5) and what a database's usage ledger holds."""

from __future__ import annotations

from collections.abc import Container

import orjson

from batchd.fakeapi.results import result_lines
from batchd.fakeapi.state import FakeState
from tests.support.backends import Peek

# (requests, input, output, cache-write, cache-read tokens)
Tokens = tuple[int, int, int, int, int]


def billed_by_fake(state: FakeState, batch_ids: Container[str] | None = None) -> Tokens:
    """What the fake billed: the succeeded lines of its ended batches (all, or those in
    `batch_ids`), as it renders them for a download."""
    totals = [0, 0, 0, 0, 0]
    now = state.clock()
    for batch in state.batches.values():
        if batch_ids is not None and batch.id not in batch_ids:
            continue
        if batch.status(now, state.timeline) != "ended":
            continue
        for raw in result_lines(batch, state.timeline):
            result = orjson.loads(raw)["result"]
            if result["type"] != "succeeded":
                continue
            usage = result["message"]["usage"]
            totals[0] += 1
            totals[1] += usage["input_tokens"]
            totals[2] += usage["output_tokens"]
            totals[3] += usage.get("cache_creation_input_tokens") or 0
            totals[4] += usage.get("cache_read_input_tokens") or 0
    return (totals[0], totals[1], totals[2], totals[3], totals[4])


def recorded_in_ledger(peek: Peek) -> Tokens:
    """The whole usage ledger, summed."""
    [row] = peek.query(
        "SELECT coalesce(sum(requests), 0), coalesce(sum(input_tokens), 0),"
        " coalesce(sum(output_tokens), 0), coalesce(sum(cache_creation_input_tokens), 0),"
        " coalesce(sum(cache_read_input_tokens), 0) FROM usage_ledger"
    )
    return (int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]))
