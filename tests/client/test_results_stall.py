"""A results download that trickles is given up as stalled, so one server that keeps a
connection alive with a byte now and then cannot hold the write-back forever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from batchd.api import BatchesClient, ResultsStreamError, RetryPolicy
from tests.support.client import Serve

LINE = b'{"custom_id":"a","result":{"type":"expired"}}\n'

# Writes a results body, in its own time, on a response already prepared.
WriteBody = Callable[[web.StreamResponse], Awaitable[None]]


async def serve_results(serve: Serve, write_body: WriteBody) -> str:
    """A loopback server whose /results is written by `write_body`; its base URL."""

    async def results(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await write_body(response)
        return response

    app = web.Application()
    app.router.add_get("/results", results)
    return await serve(app)


def stall_client(session: aiohttp.ClientSession, base_url: str, min_bytes: int) -> BatchesClient:
    """A client that gives a stream up when fewer than `min_bytes` came in 0.3 s."""
    return BatchesClient(
        session,
        base_url=base_url,
        api_key="k",
        policy=RetryPolicy(max_retries=0),
        results_stall=(0.3, min_bytes),
    )


async def test_a_trickling_results_stream_is_given_up_as_stalled(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    async def trickle(response: web.StreamResponse) -> None:
        await response.write(LINE)
        for _ in range(200):  # a byte every 20 ms: sock_read never fires
            await asyncio.sleep(0.02)
            await response.write(b" ")

    base_url = await serve_results(serve, trickle)
    client = stall_client(session, base_url, 1000)
    lines: list[bytes] = []
    # Without the guard the stream would end whole after 4 s, with no error.
    with pytest.raises(ResultsStreamError, match=r"stalled: \d+ bytes in the last 0.3 s"):
        await read_into(lines, client, f"{base_url}/results")
    assert lines == [LINE.rstrip(b"\n")]


async def read_into(
    lines: list[bytes], client: BatchesClient, url: str, *, pause_s: float = 0.0
) -> None:
    """Read every line, away from the stream `pause_s` after each (a busy consumer)."""
    async with client.results(url, batch_id="b") as stream:
        async for line in stream:
            lines.append(line)
            if pause_s:
                await asyncio.sleep(pause_s)


async def test_a_steady_stream_is_not_stalled(serve: Serve, session: aiohttp.ClientSession) -> None:
    async def steady(response: web.StreamResponse) -> None:
        # 40 lines of ~50 bytes, one due every 20 ms by the clock: over 600 bytes per 0.3 s.
        # A late wake-up (a loaded machine) sends the lines that fell due meanwhile at
        # once, so the rate is the server's, not the scheduler's: one line per wake-up fell
        # under 500 bytes per 0.3 s once the event loop ran 8 ms late on each.
        started, sent = time.monotonic(), 0
        while sent < 40:
            due = min(40, int((time.monotonic() - started) / 0.02) + 1)
            await response.write(LINE * (due - sent))
            sent = due
            await asyncio.sleep(0.02)

    base_url = await serve_results(serve, steady)
    client = stall_client(session, base_url, 500)
    async with client.results(f"{base_url}/results", batch_id="b") as stream:
        lines = [line async for line in stream]
    assert len(lines) == 40


async def test_a_consumer_away_longer_than_the_stall_window_does_not_stall_a_healthy_stream(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    # The collector stages lines between reads; waiting for SQLite's write lock it can hold
    # the stream for minutes. Only the time spent waiting on the network counts.
    async def quick(response: web.StreamResponse) -> None:
        await response.write(LINE)
        await asyncio.sleep(0.05)  # the rest arrives while the consumer is away
        await response.write(LINE * 3)

    base_url = await serve_results(serve, quick)
    client = stall_client(session, base_url, 1000)
    lines: list[bytes] = []
    async with client.results(f"{base_url}/results", batch_id="b") as stream:
        async for line in stream:
            lines.append(line)
            if len(lines) == 1:
                await asyncio.sleep(0.4)  # away longer than the window, with 200 bytes read
    assert lines == [LINE.rstrip(b"\n")] * 4


async def test_a_trickle_is_still_caught_when_the_consumer_is_slow_too(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    async def trickle(response: web.StreamResponse) -> None:
        for _ in range(200):  # a 3-byte line every 20 ms: never 1,000 bytes in 0.3 s
            await response.write(b"{}\n")
            await asyncio.sleep(0.02)

    base_url = await serve_results(serve, trickle)
    client = stall_client(session, base_url, 1000)
    lines: list[bytes] = []
    # Half of each 20 ms is the consumer's: the guard must still add up the other half.
    with pytest.raises(ResultsStreamError, match=r"stalled: \d+ bytes in the last 0.3 s"):
        await read_into(lines, client, f"{base_url}/results", pause_s=0.01)
    assert 0 < len(lines) < 200
