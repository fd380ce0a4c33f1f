"""A results stream cut short inside a line but ended cleanly (gzip with a valid trailer) is a
short stream: downloaded again, then finished as missing; its half line is never kept as a
malformed result. Real SQLite file, the real collector, a results server on loopback."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from batchd.store import Store
from tests.support.collector import ApiStub, answers, collect, ended_batch, line, serving
from tests.support.store import FakeClock, query

pytestmark = pytest.mark.fake_clock  # the store runs on `clock`, at START


@pytest.fixture
async def gzip_api() -> AsyncIterator[ApiStub]:
    stub = ApiStub()

    async def results(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        stub.hits[name] = stub.hits.get(name, 0) + 1
        body = gzip.compress(stub.bodies[name])  # a whole gzip member: trailer and all
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    async with serving(stub, results):
        yield stub


@pytest.mark.parametrize(
    "ids",
    [
        "abcd",  # counted as a line, the half of d's made the stream look whole
        "abcde",  # short either way, but the half line was kept as a malformed result
    ],
)
async def test_a_stream_cut_inside_a_line_is_short_never_a_malformed_line(
    store: Store, db_path: Path, gzip_api: ApiStub, clock: FakeClock, ids: str
) -> None:
    await ended_batch(store, db_path, gzip_api, "1", *ids)
    last = line("d")
    gzip_api.bodies["1"] = b"".join(line(cid) + b"\n" for cid in "abc") + last[: len(last) // 2]

    with capture_logs() as logs:
        assert await collect(store, gzip_api, clock, max_download_attempts=2) == 0
        assert answers(db_path)["d"] == ("submitted", None)  # to be downloaded again
        assert await collect(store, gzip_api, clock, max_download_attempts=2) == 1

    assert gzip_api.hits["1"] == 2
    assert query(db_path, "SELECT count(*) FROM unmatched_results") == [(0,)]
    assert [e for e in logs if e["event"] == "result_line_malformed"] == []
    assert len([e for e in logs if e["event"] == "results_stream_ended_mid_line"]) == 2
    got = answers(db_path)
    assert all(got[cid] == ("succeeded", f"answer for {cid}") for cid in "abc")
    missing = ids[3:]
    # The second short stream: missing, and sent again.
    assert all(got[cid] == ("pending", None) for cid in missing)
    assert query(db_path, "SELECT custom_id, reason FROM missing_results ORDER BY 1") == [
        (cid, "no_line") for cid in missing
    ]
    assert query(db_path, "SELECT state, short_downloads FROM batches") == [("completed", 2)]
