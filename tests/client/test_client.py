"""BatchesClient: protocol details against aioresponses, streaming and faults on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aioresponses import aioresponses
from structlog.testing import capture_logs
from yarl import URL

from batchd.api import (
    ApiConnectionError,
    ApiError,
    ApiStatusError,
    AuthenticationError,
    BadRequestError,
    BatchesClient,
    BytesBody,
    CreateOutcomeUnknown,
    NotFoundError,
    RateLimitError,
    RequestBodySizeError,
    RequestTooLargeError,
    ResultsStreamError,
    RetryPolicy,
    ServerError,
    parse_retry_after,
)
from batchd.api.wire import ANTHROPIC_VERSION, error_body
from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from tests.support.client import BATCHES, KEY, Sleeps, batch_json

Serve = Callable[[web.Application], Awaitable[str]]  # the `serve` fixture


def error_json(error_type: str, message: str = "nope") -> dict[str, Any]:
    return dict(error_body(error_type, message, "req_body"))


def sent(mock: aioresponses, method: str, url: str) -> list[Any]:
    return mock.requests.get((method, URL(url)), [])


def refuse_retrieve(
    mocked: aioresponses,
    status: int,
    error_type: str,
    *,
    headers: dict[str, str] | None = None,
    repeat: bool = False,
) -> None:
    """GET batch `b` answers `status` with the API's error envelope (once, or always)."""
    mocked.get(
        f"{BATCHES}/b",
        status=status,
        payload=error_json(error_type),
        headers=headers,
        repeat=repeat,
    )


def answer_retrieve(mocked: aioresponses) -> None:
    """The next GET of batch `b` answers with the batch."""
    mocked.get(f"{BATCHES}/b", payload=batch_json())


# ─── headers and endpoints ───────────────────────────────────────────────────────────


async def test_every_request_carries_key_version_and_accept(
    mocked: aioresponses, make_client: Any
) -> None:
    mocked.get(f"{BATCHES}/msgbatch_01", payload=batch_json(), headers={"request-id": "req_1"})
    batch = await make_client().retrieve("msgbatch_01")
    assert batch["id"] == "msgbatch_01"
    (call,) = sent(mocked, "GET", f"{BATCHES}/msgbatch_01")
    headers = call.kwargs["headers"]
    assert headers["x-api-key"] == KEY
    assert headers["anthropic-version"] == ANTHROPIC_VERSION == "2023-06-01"
    assert headers["accept"] == "application/json"
    assert "content-type" not in headers  # no body on GET
    assert call.kwargs["timeout"].total == 60.0


async def test_create_posts_json_with_explicit_length(
    mocked: aioresponses, make_client: Any
) -> None:
    mocked.post(BATCHES, payload=batch_json())
    body = BytesBody(b'{"requests":[]}')
    assert (await make_client().create(body))["processing_status"] == "in_progress"
    (call,) = sent(mocked, "POST", BATCHES)
    headers = call.kwargs["headers"]
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(body.size)
    assert headers["x-api-key"] == KEY


async def test_list_cancel_delete_use_their_routes(mocked: aioresponses, make_client: Any) -> None:
    page = {"data": [batch_json()], "has_more": False, "first_id": "a", "last_id": "a"}
    mocked.get(f"{BATCHES}?limit=100&after_id=msgbatch_00", payload=page)
    mocked.post(f"{BATCHES}/msgbatch_01/cancel", payload=batch_json(status="canceling"))
    mocked.delete(
        f"{BATCHES}/msgbatch_01", payload={"id": "msgbatch_01", "type": "message_batch_deleted"}
    )
    client = make_client()
    assert (await client.list_page(limit=100, after_id="msgbatch_00"))["data"][0]["id"]
    assert (await client.cancel("msgbatch_01"))["processing_status"] == "canceling"
    assert (await client.delete("msgbatch_01"))["type"] == "message_batch_deleted"


async def test_list_limit_is_checked_locally(make_client: Any) -> None:
    with pytest.raises(ValueError, match="between 1 and 1000"):
        await make_client().list_page(limit=1001)


# ─── error mapping ───────────────────────────────────────────────────────────────────


# (status, the class it raises, an error type the API sends with it)
STATUS_ERRORS: list[tuple[int, type[ApiStatusError], str]] = [
    (400, BadRequestError, "invalid_request_error"),
    (401, AuthenticationError, "authentication_error"),
    (403, AuthenticationError, "permission_error"),
    (404, NotFoundError, "not_found_error"),
    (409, ApiStatusError, "conflict_error"),
    (422, BadRequestError, "invalid_request_error"),
    (429, RateLimitError, "rate_limit_error"),
    (500, ServerError, "api_error"),
    (529, ServerError, "overloaded_error"),
]


@pytest.mark.parametrize(("status", "error_cls", "error_type"), STATUS_ERRORS)
async def test_status_maps_to_typed_error(
    mocked: aioresponses,
    make_client: Any,
    status: int,
    error_cls: type[ApiStatusError],
    error_type: str,
) -> None:
    mocked.get(
        f"{BATCHES}/b",
        status=status,
        payload=error_json(error_type, "what went wrong"),
        headers={"request-id": "req_42"},
    )
    with pytest.raises(error_cls) as caught:
        await make_client(policy=RetryPolicy(max_retries=0)).retrieve("b")
    error = caught.value
    assert type(error) is error_cls
    assert (error.status, error.error_type, error.message) == (
        status,
        error_type,
        "what went wrong",
    )
    assert error.request_id == "req_42"
    assert f"HTTP {status} {error_type}: what went wrong" in str(error)
    assert "req_42" in str(error)


async def test_non_json_413_body_is_handled(mocked: aioresponses, make_client: Any) -> None:
    html = "<html><body>413 Request Entity Too Large</body></html>"
    mocked.post(BATCHES, status=413, body=html, content_type="text/html")
    with pytest.raises(RequestTooLargeError) as caught:
        await make_client().create(BytesBody(b"{}"))
    assert caught.value.error_type == "request_too_large"
    assert "Request Entity Too Large" in caught.value.message
    assert caught.value.request_id is None
    assert "256 MB" in str(caught.value)


async def test_malformed_success_body_is_a_retried_connection_error(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps
) -> None:
    mocked.get(f"{BATCHES}/b", body="<html>proxy</html>", repeat=True)
    with pytest.raises(ApiConnectionError, match="not JSON"):
        await make_client(policy=RetryPolicy(max_retries=1)).retrieve("b")
    assert len(sleeps) == 1


# ─── retries ─────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("refusals", "waits"),
    [
        pytest.param([(429, "rate_limit_error", {"retry-after": "7"})], [7.0], id="seconds"),
        pytest.param(
            [(529, "overloaded_error", {"retry-after-ms": "1500", "retry-after": "30"})],
            [1.5],
            id="retry-after-ms wins over retry-after",
        ),
        pytest.param(  # the SDK's 60 s cap would have ignored both
            [
                (429, "rate_limit_error", {"retry-after": "120"}),
                (429, "rate_limit_error", {"retry-after": "3600"}),
            ],
            [120.0, 900.0],
            id="long, up to the policy bound",
        ),
    ],
)
async def test_retry_after_is_honoured(
    mocked: aioresponses,
    make_client: Any,
    sleeps: Sleeps,
    refusals: list[tuple[int, str, dict[str, str]]],
    waits: list[float],
) -> None:
    for status, error_type, headers in refusals:
        refuse_retrieve(mocked, status, error_type, headers=headers)
    answer_retrieve(mocked)
    await make_client().retrieve("b")
    assert sleeps == waits


async def test_retry_after_http_date_is_honoured(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    refuse_retrieve(mocked, 503, "api_error", headers={"retry-after": when})
    answer_retrieve(mocked)
    await make_client().retrieve("b")
    assert len(sleeps) == 1
    assert 115 <= sleeps[0] <= 121


async def test_without_retry_after_backoff_is_exponential_with_jitter(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps
) -> None:
    refuse_retrieve(mocked, 500, "api_error", repeat=True)
    with pytest.raises(ServerError):
        await make_client().retrieve("b")
    expected_rng = random.Random(0)
    expected = [min(0.5 * 2**n, 8.0) * (1 - 0.25 * expected_rng.random()) for n in range(5)]
    assert sleeps == pytest.approx(expected)
    assert len(sent(mocked, "GET", f"{BATCHES}/b")) == 6  # 1 + max_retries


async def test_retries_exhausted_raise_the_last_typed_error(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps
) -> None:
    refuse_retrieve(mocked, 429, "rate_limit_error", repeat=True)
    with pytest.raises(RateLimitError):
        await make_client(policy=RetryPolicy(max_retries=2)).retrieve("b")
    assert len(sleeps) == 2
    assert len(sent(mocked, "GET", f"{BATCHES}/b")) == 3


async def test_x_should_retry_false_stops_retries(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps
) -> None:
    refuse_retrieve(mocked, 500, "api_error", headers={"x-should-retry": "false"}, repeat=True)
    with pytest.raises(ServerError) as caught:
        await make_client().retrieve("b")
    assert caught.value.should_retry is False
    assert sleeps == []


async def test_x_should_retry_true_forces_a_retry(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps
) -> None:
    refuse_retrieve(mocked, 400, "invalid_request_error", headers={"x-should-retry": "true"})
    answer_retrieve(mocked)
    await make_client().retrieve("b")
    assert len(sleeps) == 1


async def test_404_is_not_retried(mocked: aioresponses, make_client: Any, sleeps: Sleeps) -> None:
    refuse_retrieve(mocked, 404, "not_found_error", repeat=True)
    with pytest.raises(NotFoundError):
        await make_client().retrieve("b")
    assert sleeps == []


async def test_connection_errors_are_retried_then_raised(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps
) -> None:
    mocked.post(
        f"{BATCHES}/b/cancel", exception=aiohttp.ClientConnectionError("reset by peer"), repeat=True
    )
    statuses: list[tuple[str, int]] = []
    client = make_client(
        policy=RetryPolicy(max_retries=3),
        on_response=lambda endpoint, status, _elapsed: statuses.append((endpoint, status)),
    )
    with pytest.raises(ApiConnectionError, match="reset by peer"):
        await client.cancel("b")
    assert len(sleeps) == 3
    assert statuses == [("cancel", 0)] * 4


def test_policy_retries_the_sdk_statuses() -> None:
    policy = RetryPolicy()

    def status_error(status: int, should_retry: bool | None = None) -> ApiStatusError:
        return ApiStatusError(
            method="GET",
            path="/",
            status=status,
            error_type="x",
            message="m",
            request_id=None,
            should_retry=should_retry,
        )

    retried = {
        s
        for s in (400, 401, 404, 408, 409, 413, 422, 429, 500, 502, 529)
        if policy.should_retry(status_error(s))
    }
    assert retried == {408, 409, 429, 500, 502, 529}
    assert policy.should_retry(status_error(503, should_retry=False)) is False
    assert policy.should_retry(status_error(401, should_retry=True)) is True
    assert policy.should_retry(ApiConnectionError("GET", "/", "down")) is True


def test_backoff_stays_within_the_sdk_bounds() -> None:
    policy, rng = RetryPolicy(), random.Random(1)
    for retries_done in range(10):
        ceiling = min(0.5 * 2**retries_done, 8.0)
        delay = policy.delay_s(retries_done, None, rng)
        assert 0.75 * ceiling <= delay <= ceiling
    assert policy.delay_s(0, 0.0, rng) <= 0.5  # a zero retry-after means "no hint"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "2.5"}, 2.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
        ({"retry-after": "not a date"}, None),
        ({"retry-after": "Thu, 01 Jan 1970 00:01:40 GMT"}, 100.0 - 50.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=50.0) == expected


# ─── create: never retried, ambiguous vs definite ────────────────────────────────────


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(500, "api_error"), (529, "overloaded_error"), (504, "timeout_error")],
)
async def test_create_5xx_is_outcome_unknown_and_not_retried(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps, status: int, error_type: str
) -> None:
    mocked.post(BATCHES, status=status, payload=error_json(error_type), repeat=True)
    with pytest.raises(CreateOutcomeUnknown) as caught:
        await make_client().create(BytesBody(b"{}"))
    assert isinstance(caught.value.cause, ServerError)
    assert "list endpoint" in str(caught.value)
    assert len(sent(mocked, "POST", BATCHES)) == 1
    assert sleeps == []


async def test_create_connection_error_is_outcome_unknown(
    mocked: aioresponses, make_client: Any
) -> None:
    mocked.post(BATCHES, exception=aiohttp.ServerDisconnectedError(), repeat=True)
    with pytest.raises(CreateOutcomeUnknown) as caught:
        await make_client().create(BytesBody(b"{}"))
    assert isinstance(caught.value.cause, ApiConnectionError)
    assert len(sent(mocked, "POST", BATCHES)) == 1


@pytest.mark.parametrize(
    ("status", "error_cls", "error_type"),
    [case for case in STATUS_ERRORS if case[0] in (400, 401, 429)],
)
async def test_create_refusals_are_definite(
    mocked: aioresponses,
    make_client: Any,
    sleeps: Sleeps,
    status: int,
    error_cls: type[ApiStatusError],
    error_type: str,
) -> None:
    mocked.post(
        BATCHES,
        status=status,
        payload=error_json(error_type),
        headers={"retry-after": "12"},
        repeat=True,
    )
    with pytest.raises(error_cls) as caught:
        await make_client().create(BytesBody(b"{}"))
    assert caught.value.retry_after_s == 12.0
    assert len(sent(mocked, "POST", BATCHES)) == 1
    assert sleeps == []


# ─── secrets and observability ───────────────────────────────────────────────────────


@pytest.fixture
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """capture_logs, with debug events let through whatever another test configured."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**saved)


async def test_api_key_never_appears_in_errors_or_logs(
    mocked: aioresponses, make_client: Any, captured_logs: list[dict[str, Any]]
) -> None:
    echoed = error_json("authentication_error", f"invalid x-api-key {KEY}")
    mocked.get(f"{BATCHES}/a", status=401, payload=echoed, headers={"request-id": "req_a"})
    refuse_retrieve(mocked, 500, "api_error", repeat=True)
    mocked.post(BATCHES, exception=aiohttp.ClientConnectionError(f"failed with {KEY}"))
    client = make_client(policy=RetryPolicy(max_retries=1))
    errors: list[ApiError] = []
    for call in (client.retrieve("a"), client.retrieve("b"), client.create(BytesBody(b"{}"))):
        with pytest.raises(ApiError) as caught:
            await call
        errors.append(caught.value)
    for error in errors:
        assert KEY not in str(error)
        assert KEY not in repr(error)
    assert "<redacted>" in str(errors[0])
    assert "ANTHROPIC_API_KEY" in str(errors[0])  # tells the user what to fix
    assert KEY not in repr(captured_logs)
    responses = [event for event in captured_logs if event["event"] == "api_response"]
    assert responses[0] == {
        "event": "api_response",
        "log_level": "debug",
        "method": "GET",
        "path": "/v1/messages/batches/a",
        "status": 401,
        "request_id": "req_a",
    }
    assert any(event["event"] == "api_retry" for event in captured_logs)


async def test_on_response_sees_every_attempt(mocked: aioresponses, make_client: Any) -> None:
    refuse_retrieve(mocked, 429, "rate_limit_error")
    answer_retrieve(mocked)
    seen: list[tuple[str, int, float]] = []
    client = make_client(on_response=lambda *args: seen.append(args))
    await client.retrieve("b")
    assert [(endpoint, status) for endpoint, status, _ in seen] == [
        ("retrieve", 429),
        ("retrieve", 200),
    ]
    assert all(elapsed >= 0 for _, _, elapsed in seen)


# ─── loopback: streamed create ───────────────────────────────────────────────────────


async def test_20mb_create_body_arrives_whole_and_not_chunked(
    serve: Serve, make_client: Any
) -> None:
    received: dict[str, Any] = {}

    async def create(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for piece in request.content.iter_any():
            digest.update(piece)
            size += len(piece)
        received.update(
            size=size,
            sha256=digest.hexdigest(),
            content_length=request.headers.get("Content-Length"),
            transfer_encoding=request.headers.get("Transfer-Encoding"),
            content_type=request.headers.get("Content-Type"),
        )
        return web.json_response(batch_json())

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/messages/batches", create)
    data = random.Random(5).randbytes(20 * 1024 * 1024)
    await make_client(await serve(app)).create(BytesBody(data))
    assert received == {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "content_length": str(len(data)),
        "transfer_encoding": None,
        "content_type": "application/json",
    }


class _ShortBody:
    size = 100

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield b"x" * 60


async def test_create_body_shorter_than_declared_fails_fast(serve: Serve, make_client: Any) -> None:
    async def create(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(batch_json())

    app = web.Application()
    app.router.add_post("/v1/messages/batches", create)
    client = make_client(await serve(app), control_timeout_s=60.0)
    started = time.monotonic()
    with pytest.raises(RequestBodySizeError, match="yielded 60 bytes, not its size 100"):
        await client.create(_ShortBody())
    # Aborted at once, not left to the 60 s timeout (a wide margin for a loaded machine).
    assert time.monotonic() - started < 15.0


class _LongBody:
    size = 10

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield b"x" * 60


async def test_create_body_longer_than_declared_is_never_sent_past_its_size(
    serve: Serve, make_client: Any
) -> None:
    received: list[bytes] = []

    async def create(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response(batch_json())

    app = web.Application()
    app.router.add_post("/v1/messages/batches", create)
    with pytest.raises(RequestBodySizeError, match="not its size 10"):
        await make_client(await serve(app)).create(_LongBody())
    assert received == []  # the server never saw a complete request


# ─── loopback: control-plane timeouts ────────────────────────────────────────────────


@pytest.fixture
async def stalling_api(serve: Serve) -> AsyncIterator[str]:
    """An API whose handlers stall until the test ends (aiohttp does not cancel them)."""
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await request.read()
        await release.wait()
        return web.json_response(batch_json())

    app = web.Application()
    app.router.add_route("*", "/v1/messages/batches{tail:.*}", stall)
    yield await serve(app)
    release.set()


async def test_control_call_timeout_is_retried_then_raised(
    stalling_api: str, make_client: Any, sleeps: Sleeps
) -> None:
    client = make_client(stalling_api, control_timeout_s=0.2, policy=RetryPolicy(max_retries=2))
    with pytest.raises(ApiConnectionError, match="timed out"):
        await client.retrieve("b")
    assert len(sleeps) == 2


async def test_create_timeout_after_sending_is_outcome_unknown(
    stalling_api: str, make_client: Any, sleeps: Sleeps
) -> None:
    client = make_client(stalling_api, control_timeout_s=0.2)
    with pytest.raises(CreateOutcomeUnknown, match="timed out"):
        await client.create(BytesBody(b'{"requests":[]}'))
    assert sleeps == []


# ─── loopback: results ───────────────────────────────────────────────────────────────


def results_app(body: bytes, seen: list[dict[str, str]] | None = None) -> web.Application:
    async def results(request: web.Request) -> web.StreamResponse:
        if seen is not None:
            seen.append(dict(request.headers))
        response = web.StreamResponse(headers={"Content-Type": "text/html"})  # §1.2: ignored
        await response.prepare(request)
        for start in range(0, len(body), 300_000):
            await response.write(body[start : start + 300_000])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/messages/batches/{batch_id}/results", results)
    return app


async def read_results(client: BatchesClient, url: str, **options: Any) -> list[bytes]:
    async with client.results(url, batch_id="msgbatch_01", **options) as lines:
        return [line async for line in lines]


async def test_results_stream_big_lines_crlf_and_no_trailing_newline(
    serve: Serve, make_client: Any
) -> None:
    big = b'{"custom_id":"big","result":{"type":"succeeded","text":"' + b"x" * 3_000_000 + b'"}}'
    small = [b'{"custom_id":"s%d","result":{"type":"expired"}}' % n for n in range(1000)]
    body = b"\r\n".join([small[0], big, *small[1:]])  # CRLF, no trailing newline
    seen: list[dict[str, str]] = []
    base = await serve(results_app(body, seen))
    url = f"{base}/v1/messages/batches/msgbatch_01/results"
    assert await read_results(make_client(base), url) == [small[0], big, *small[1:]]
    assert seen[0]["Accept"] == "application/binary"
    assert seen[0]["x-api-key"] == KEY
    assert seen[0]["anthropic-version"] == ANTHROPIC_VERSION


async def test_results_line_over_the_cap_names_batch_and_offset(
    serve: Serve, make_client: Any
) -> None:
    base = await serve(results_app(b"ok\n" + b"y" * 5000 + b"\n"))
    url = f"{base}/v1/messages/batches/msgbatch_01/results"
    with pytest.raises(ResultsStreamError) as caught:
        await read_results(make_client(base), url, max_line_bytes=1000)
    assert caught.value.offset == 3
    assert caught.value.batch_id == "msgbatch_01"
    assert "msgbatch_01" in str(caught.value)
    assert "offset 3" in str(caught.value)


async def test_results_initial_get_is_retried(
    serve: Serve, make_client: Any, sleeps: Sleeps
) -> None:
    calls = 0

    async def results(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.json_response(error_json("overloaded_error"), status=529)
        return web.Response(body=b"a\nb\n", content_type="application/x-jsonl")

    app = web.Application()
    app.router.add_get("/r", results)
    base = await serve(app)
    assert await read_results(make_client(base), f"{base}/r") == [b"a", b"b"]
    assert len(sleeps) == 1


async def test_results_not_ready_404_is_not_retried(
    serve: Serve, make_client: Any, sleeps: Sleeps
) -> None:
    async def results(request: web.Request) -> web.Response:
        body = error_json("not_found_error", "Message Batch msgbatch_01 has no available results.")
        return web.json_response(body, status=404, headers={"x-should-retry": "false"})

    app = web.Application()
    app.router.add_get("/r", results)
    base = await serve(app)
    with pytest.raises(NotFoundError, match="no available results"):
        await read_results(make_client(base), f"{base}/r")
    assert sleeps == []


class RawServer:
    """A loopback TCP server that sends canned HTTP bytes, then misbehaves."""

    def __init__(self, head: bytes, body: bytes, *, stall: bool = False) -> None:
        self._reply = head + body
        self._stall = stall
        self._release = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self._reply)
        await writer.drain()
        if self._stall:
            await self._release.wait()
        writer.transport.abort()  # a reset mid-body, not a clean end

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/messages/batches/msgbatch_01/results"

    async def __aexit__(self, *exc_info: object) -> None:
        self._release.set()
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()


HALF = b'{"custom_id":"a","result":{"type":"expired"}}\n{"custom_id":"b","res'


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(HALF),
    ],
    ids=["content-length", "chunked"],
)
async def test_results_cut_off_mid_body_raise_stream_error(make_client: Any, head: bytes) -> None:
    received: list[bytes] = []

    async def consume(client: BatchesClient, url: str) -> None:
        async with client.results(url, batch_id="msgbatch_01") as lines:
            async for line in lines:
                received.append(line)

    async with RawServer(head, HALF) as url:
        client = make_client(url.split("/v1")[0])
        with pytest.raises(ResultsStreamError) as caught:
            await consume(client, url)
    assert received == [b'{"custom_id":"a","result":{"type":"expired"}}']
    assert caught.value.offset == len(HALF)
    assert "msgbatch_01" in str(caught.value)
    assert isinstance(caught.value.__cause__, aiohttp.ClientError)


async def test_results_read_timeout_mid_body_raises_stream_error(make_client: Any) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    async with RawServer(head, HALF, stall=True) as url:
        client = make_client(url.split("/v1")[0], results_sock_read_timeout_s=0.2)
        with pytest.raises(ResultsStreamError, match="timed out") as caught:
            await read_results(client, url)
    assert caught.value.offset == len(HALF)


async def test_leaving_results_early_releases_the_response(
    serve: Serve, make_client: Any, session: aiohttp.ClientSession
) -> None:
    body = b"".join(b'{"custom_id":"s%d"}\n' % n for n in range(200_000))
    base = await serve(results_app(body))
    url = f"{base}/v1/messages/batches/msgbatch_01/results"
    async with make_client(base).results(url, batch_id="msgbatch_01") as lines:
        async for line in lines:
            assert line == b'{"custom_id":"s0"}'
            break
    assert session.connector is not None
    assert not session.connector._acquired  # no connection left checked out


async def test_consumer_errors_inside_results_are_not_stream_errors(
    serve: Serve, make_client: Any
) -> None:
    base = await serve(results_app(b"a\nb\n"))
    url = f"{base}/v1/messages/batches/msgbatch_01/results"

    async def consume() -> None:
        async with make_client(base).results(url, batch_id="msgbatch_01") as lines:
            async for _line in lines:
                raise TimeoutError("the consumer's own")

    with pytest.raises(TimeoutError, match="consumer's own"):
        await consume()


async def test_every_retry_is_reported_to_the_metrics_hook() -> None:
    faults = FaultConfig(
        http_fault_rate=1.0, http_fault_kinds=("500",), http_fault_endpoints=("retrieve",)
    )
    retried: list[str] = []

    async def no_wait(_: float) -> None:
        return None

    async with (
        FakeApiServer(FakeApiConfig(faults=faults, seed=1)) as fake,
        aiohttp.ClientSession() as session,
    ):
        client = BatchesClient(
            session,
            base_url=fake.base_url,
            api_key="k",
            policy=RetryPolicy(max_retries=3),
            sleep=no_wait,
            on_retry=retried.append,
        )
        with pytest.raises(ServerError):
            await client.retrieve("msgbatch_missing")
    assert retried == ["retrieve", "retrieve", "retrieve"]
