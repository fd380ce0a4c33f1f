"""A results stream that ends cleanly inside a line (a gzip body whose content was cut short
but whose trailer is valid): the fragment is not a result line; a whole last line is."""

from __future__ import annotations

import gzip

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from batchd.api import BatchesClient, RetryPolicy
from tests.support.client import Serve

LINES = [b'{"custom_id":"c-%d","result":{"type":"expired"}}' % n for n in range(3)]


def gzip_app(content: bytes) -> web.Application:
    """Serves `content` gzip-compressed, complete and well-formed at the HTTP and gzip level."""

    async def results(request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(content), headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_get("/results", results)
    return app


async def read_all(session: aiohttp.ClientSession, base_url: str) -> list[bytes]:
    client = BatchesClient(session, base_url=base_url, api_key="k", policy=RetryPolicy(0))
    async with client.results(f"{base_url}/results", batch_id="msgbatch_1") as stream:
        return [line async for line in stream]


async def test_a_stream_ending_inside_a_line_yields_only_its_whole_lines(
    serve: Serve, session: aiohttp.ClientSession
) -> None:
    whole = b"".join(line + b"\n" for line in LINES)
    fragment = b'{"custom_id":"c-3","result":{"type":"succ'
    base_url = await serve(gzip_app(whole + fragment))
    with capture_logs() as logs:
        assert await read_all(session, base_url) == LINES
    [warning] = [e for e in logs if e["event"] == "results_stream_ended_mid_line"]
    assert warning["log_level"] == "warning"
    assert warning["batch_id"] == "msgbatch_1"
    assert (warning["offset"], warning["bytes"]) == (len(whole), len(fragment))


@pytest.mark.parametrize("last", [LINES[0], LINES[0] + b"  ", b"[1, 2]", b"{}"])
async def test_a_whole_last_line_without_a_newline_still_counts(
    serve: Serve, session: aiohttp.ClientSession, last: bytes
) -> None:
    # The SDKs' JSONL decoders accept an unterminated last line (spec §1.2): so do we,
    # when it is whole. Whether it is a good result line is the collector's to judge.
    body = b"\n".join([*LINES, last])
    base_url = await serve(gzip_app(body))
    with capture_logs() as logs:
        assert await read_all(session, base_url) == [*LINES, last]
    assert [e for e in logs if e["event"] == "results_stream_ended_mid_line"] == []
