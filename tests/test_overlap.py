"""The collector's next batch starts when the one before it is staged, or at once when a
batch ends while the last applies run (batchd/pipeline/overlap.py)."""

from __future__ import annotations

import asyncio

import pytest

from batchd.pipeline.overlap import until_done_or_ended, until_staged


async def test_a_batch_that_ends_during_an_apply_is_news_before_the_apply_is_done() -> None:
    applied = asyncio.Event()
    apply = asyncio.create_task(applied.wait(), name="apply")  # the first batch's apply
    ended = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, ended.set)
    assert await until_done_or_ended([apply], ended) is True
    assert not apply.done()  # still applying: the second batch's download overlaps it
    applied.set()
    assert await until_done_or_ended([apply], None) is False


async def test_without_news_it_waits_for_every_batch_and_says_so() -> None:
    batches = [asyncio.create_task(asyncio.sleep(0.02 * n, result=True)) for n in range(3)]
    assert await until_done_or_ended(batches, asyncio.Event()) is False
    assert all(batch.done() for batch in batches)


async def test_a_batch_that_fails_is_raised_at_once_whatever_is_awaited() -> None:
    async def fails() -> bool:
        raise RuntimeError("the database went read-only")

    slow = asyncio.create_task(asyncio.sleep(30, result=True))
    failing = asyncio.create_task(fails())
    with pytest.raises(RuntimeError, match="read-only"):
        await until_staged(asyncio.Event(), [slow, failing])
    with pytest.raises(RuntimeError, match="read-only"):
        await until_done_or_ended([slow, failing], asyncio.Event())
    assert not slow.done()
    slow.cancel()
