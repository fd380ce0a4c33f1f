"""A result PostgreSQL cannot store as it came never stalls its batch (review 7, finding 2).

jsonb refuses the escape `\\u0000` and text refuses a NUL character; SQLite stores both. On
PostgreSQL such a line is written with each NUL as the six characters `\\u0000` (the
JSON string `"\\\\u0000"`), its line as received is kept in `unmatched_results` under its
custom_id, and every other line of the batch is written as usual; SQLite keeps the line
exactly. Real collector, real store, the results served over loopback.
"""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from batchd.api import BatchesClient, RetryPolicy
from batchd.config import CollectorSettings, ResultsConfig
from batchd.domain import Outcome, TaskStatus
from batchd.pipeline.collector import Collector
from batchd.store import Store
from batchd.store.postgres.storable import storable_json
from tests.support.backends import Peek
from tests.support.collector import ApiStub, line, serving
from tests.support.store import submitted_batch

pytestmark = pytest.mark.both_stores

NUL_TEXT = "before\x00after"
NUL_ERROR = "bad\x00byte"
# What PostgreSQL keeps in their place: each NUL as the six characters \u0000.
SHOWN_TEXT = "before\\u0000after"
SHOWN_ERROR = "bad\\u0000byte"


def errored_line(custom_id: str, message: str) -> bytes:
    error = {"type": "invalid_request_error", "message": message}
    result = {"type": "errored", "error": {"type": "error", "error": error}}
    return orjson.dumps({"custom_id": custom_id, "result": result})


async def collect_batch(store: Store, peek: Peek, api_id: str, body: bytes, *ids: str) -> int:
    """Batch `api_id` of tasks `ids`, ended, its results `body`: one collector pass (ranges
    of two tasks, so lines after the bad one are applied in ranges of their own)."""
    local_id = await submitted_batch(store, api_id, *ids)
    api = ApiStub()

    async def results(request: web.Request) -> web.Response:
        return web.Response(body=body)

    async with serving(api, results), aiohttp.ClientSession() as session:
        peek.execute("UPDATE batches SET results_url = ? WHERE id = ?", api.url(api_id), local_id)
        client = BatchesClient(session, base_url=api.base_url, api_key="k", policy=RetryPolicy(0))
        settings = CollectorSettings(ResultsConfig(chunk_size=2), 3)
        collector = Collector(store, client, settings, clock=lambda: datetime.now(UTC))
        return await collector.collect_all()


def text_of(peek: Peek, custom_id: str) -> str:
    result = peek.task(custom_id)["result"]
    text = orjson.loads(result)["message"]["content"][0]["text"]
    assert isinstance(text, str)
    return text


async def test_a_nul_in_a_result_or_an_error_never_holds_up_its_batch(
    store: Store, peek: Peek, store_backend: str
) -> None:
    ids = ("n1", "z1", "n2", "e1", "n3", "n4")
    nul_line = line("z1", NUL_TEXT)
    assert b"\\u0000" in nul_line  # the API's escape, as JSON writes a NUL
    body = b"\n".join(
        [line("n1"), nul_line, line("n2"), errored_line("e1", NUL_ERROR), line("n3"), line("n4")]
    )

    with capture_logs() as logs:
        assert await collect_batch(store, peek, "msgbatch_nul", body, *ids) == 1

    assert peek.query("SELECT state FROM batches WHERE api_batch_id = 'msgbatch_nul'") == [
        ("completed",)
    ]
    for custom_id in ("n1", "n2", "n3", "n4"):
        assert peek.task(custom_id)["status"] == TaskStatus.SUCCEEDED
        assert text_of(peek, custom_id) == f"answer for {custom_id}"
    # Nothing requeued: nothing will be sent, and paid for, again.
    assert peek.query("SELECT count(*) FROM tasks WHERE status = 'pending'") == [(0,)]
    assert peek.query("SELECT count(*) FROM missing_results") == [(0,)]
    z1, e1 = peek.task("z1"), peek.task("e1")
    assert (z1["status"], z1["error"], z1["input_tokens"]) == (TaskStatus.SUCCEEDED, None, 3)
    assert e1["status"] == TaskStatus.ERRORED
    # Paid for, so counted once, as any other succeeded result.
    assert peek.query("SELECT sum(requests) FROM usage_ledger") == [(5,)]
    kept = peek.query("SELECT custom_id, line FROM unmatched_results ORDER BY custom_id")
    if store_backend == "sqlite":
        assert text_of(peek, "z1") == NUL_TEXT
        assert e1["error"] == f"errored: invalid_request_error: {NUL_ERROR}"
        assert kept == []
        assert "results_nul_escaped" not in [entry["event"] for entry in logs]
        return
    assert text_of(peek, "z1") == SHOWN_TEXT
    escaped = [(e["count"], e["first"]) for e in logs if e["event"] == "results_nul_escaped"]
    assert escaped == [(1, "z1"), (1, "e1")]  # once per chunk of 2 lines that held one
    # Lines kept beside the unmatched ones: the batch shows as partly ours (documented).
    assert peek.query("SELECT origin FROM batches WHERE api_batch_id = 'msgbatch_nul'") == [
        ("partly_ours",)
    ]
    assert e1["error"] == f"errored: invalid_request_error: {SHOWN_ERROR}"
    assert orjson.loads(e1["result"])["error"]["error"]["message"] == SHOWN_ERROR
    # The lines as received, NUL and all, are kept where an operator finds them.
    assert [custom_id for custom_id, _ in kept] == ["e1", "z1"]
    received = {custom_id: orjson.loads(text) for custom_id, text in kept}
    assert received["z1"]["result"]["message"]["content"][0]["text"] == NUL_TEXT
    assert received["e1"]["result"]["error"]["error"]["message"] == NUL_ERROR


async def test_a_repeated_line_is_written_and_kept_once(
    store: Store, peek: Peek, store_backend: str
) -> None:
    """The API repeating a line (as a re-download repeats all): the first one is written,
    and its line as received kept once."""
    body = b"\n".join([line("r1", NUL_TEXT), line("r1", NUL_TEXT), line("r2")])
    assert await collect_batch(store, peek, "msgbatch_twice", body, "r1", "r2") == 1
    assert peek.task("r1")["status"] == TaskStatus.SUCCEEDED
    assert text_of(peek, "r1") == (NUL_TEXT if store_backend == "sqlite" else SHOWN_TEXT)
    copies = peek.query("SELECT count(*) FROM unmatched_results WHERE custom_id = 'r1'")
    assert copies == ([(0,)] if store_backend == "sqlite" else [(1,)])
    assert peek.query("SELECT sum(requests) FROM usage_ledger") == [(2,)]


async def test_a_nul_in_a_custom_id_a_model_or_a_malformed_line_is_kept_not_stalled(
    store: Store, peek: Peek, store_backend: str
) -> None:
    odd_model = orjson.loads(line("m1"))
    odd_model["result"]["message"]["model"] = "claude\x00x"
    body = b"\n".join(
        [
            line("a1"),
            line("nobody\x00here"),  # names no task (none can hold a NUL on PostgreSQL)
            b'{"custom_id": "a2", \x00 "broken',  # malformed, a raw NUL byte in it
            orjson.dumps(odd_model),
            line("a2"),
        ]
    )

    assert await collect_batch(store, peek, "msgbatch_odd", body, "a1", "a2", "m1") == 1

    assert peek.query("SELECT state FROM batches WHERE api_batch_id = 'msgbatch_odd'") == [
        ("completed",)
    ]
    statuses = dict(peek.query("SELECT custom_id, status FROM tasks"))
    assert statuses == {"a1": "succeeded", "a2": "succeeded", "m1": "succeeded"}
    kept = dict(peek.query("SELECT custom_id, line FROM unmatched_results"))
    if store_backend == "sqlite":
        assert peek.task("m1")["model"] == "claude\x00x"
        assert set(kept) == {"nobody\x00here", "malformed-line-3"}
        assert "\x00" in kept["malformed-line-3"]
        return
    assert peek.task("m1")["model"] == "claude\\u0000x"
    assert set(kept) == {"nobody\\u0000here", "malformed-line-3", "m1"}
    assert orjson.loads(kept["nobody\\u0000here"])["custom_id"] == "nobody\x00here"
    assert kept["malformed-line-3"] == '{"custom_id": "a2", \\u0000 "broken'
    assert orjson.loads(kept["m1"])["result"]["message"]["model"] == "claude\x00x"


async def test_write_results_stores_a_nul_as_the_lanes_do(
    store: Store, peek: Peek, store_backend: str
) -> None:
    """`write_results` (a few lines in one transaction, no lane) makes the same choice."""
    local_id = await submitted_batch(store, "msgbatch_w", "w1", "w2")
    result = orjson.loads(line("w1", NUL_TEXT))["result"]
    nul_result = Outcome("w1", "succeeded", orjson.dumps(result).decode(), None, False, model="m")
    refused = Outcome("w2", "errored", '{"type":"errored"}', f"errored: x: {NUL_ERROR}", False)

    report = await store.write_results(local_id, [nul_result, refused], 3)

    assert (report.written, report.requeued, report.unmatched) == (2, 0, ())
    sqlite = store_backend == "sqlite"
    assert text_of(peek, "w1") == (NUL_TEXT if sqlite else SHOWN_TEXT)
    assert peek.task("w2")["error"] == f"errored: x: {NUL_ERROR if sqlite else SHOWN_ERROR}"
    kept = peek.query("SELECT custom_id FROM unmatched_results ORDER BY custom_id")
    assert kept == ([] if sqlite else [("w1",), ("w2",)])  # each line changed, as received


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        (r'{"t":"a\u0000b"}', r'{"t":"a\\u0000b"}'),  # the escape: made text
        (r'{"t":"a\\u0000b"}', None),  # a backslash, then "u0000": jsonb takes it
        (r'{"t":"a\\\u0000b"}', r'{"t":"a\\\\u0000b"}'),  # a backslash, then the escape
        (r'{"t":"\u0000\u0000","\u0000":1}', r'{"t":"\\u0000\\u0000","\\u0000":1}'),
        (r'{"t":"a\u00001"}', r'{"t":"a\\u00001"}'),
        (r'{"t":"a\u0001"}', None),
    ],
)
def test_only_real_nul_escapes_are_made_text(sent: str, stored: str | None) -> None:
    assert storable_json(sent) == stored
    if stored is not None:  # valid JSON still, each NUL now the text \u0000
        expected = orjson.loads(sent.encode())
        assert orjson.loads(stored) == _nul_as_text(expected)


def _nul_as_text(value: object) -> object:
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, dict):
        return {_nul_as_text(k): _nul_as_text(v) for k, v in value.items()}
    return value
