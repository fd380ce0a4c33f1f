"""The fake Message Batches API as an aiohttp application (spec §1, §6, §9).

Six endpoints under /v1/messages/batches, with the real error bodies and headers,
plus the test-only control endpoints of `batchd.fakeapi.admin` under /_fake/.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import orjson
from aiohttp import web

from batchd.api.wire import (
    BATCHES_PATH,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    MAX_BATCH_BYTES,
    DeletedMessageBatch,
    MessageBatchList,
    error_body,
)
from batchd.fakeapi.faults import ENDPOINTS, STATUS_ERROR_TYPES, FaultConfig, FaultInjector
from batchd.fakeapi.persistence import save_state
from batchd.fakeapi.results import result_chunks
from batchd.fakeapi.state import ApiError, FakeClock, FakeState, new_id, not_found
from batchd.fakeapi.validation import CreateRejected, ParsedRequests, parse_create_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
READ_CHUNK_BYTES = 1 << 20
# aiohttp refuses bodies over client_max_size in read()/json(); we read the stream
# ourselves and enforce MAX_BATCH_BYTES with a 413, so let this never be the limit.
CLIENT_MAX_SIZE = MAX_BATCH_BYTES + (64 << 20)
REQUEST_ID = web.RequestKey("request_id", str)
TRUNCATE = web.RequestKey("truncate_results", bool)
LATE_CREATE = web.RequestKey("late_create", bool)


@dataclass
class FakeApi:
    """Everything the routes share: state, clock, faults and the server's settings."""

    state: FakeState
    clock: FakeClock
    faults: FaultInjector
    api_key: str | None = None
    models: frozenset[str] = frozenset()
    max_body_bytes: int = MAX_BATCH_BYTES
    state_path: Path | None = None
    ids: random.Random = field(default_factory=random.Random)
    # Late creates not yet committed (strong references: the loop keeps only weak ones).
    pending_creates: set[asyncio.Task[None]] = field(default_factory=set)

    def persist(self) -> None:
        """Called after every mutation: `--state FILE` keeps batches across restarts."""
        if self.state_path is not None:
            save_state(self.state_path, self.state, self.clock.offset.total_seconds())

    def create_later(self, parsed: ParsedRequests, faults: FaultConfig) -> None:
        """Commit this create `faults.late_create_seconds` from now (real time)."""

        async def commit() -> None:
            await asyncio.sleep(faults.late_create_seconds)
            self.state.create(parsed, faults)
            self.persist()

        task = asyncio.get_running_loop().create_task(commit())
        self.pending_creates.add(task)
        task.add_done_callback(self.pending_creates.discard)

    async def drop_pending_creates(self) -> None:
        """On stop: a create not committed yet never will be, as if the server died."""
        pending = list(self.pending_creates)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


FAKE_API = web.AppKey("fake_api", FakeApi)


def create_app(api: FakeApi) -> web.Application:
    """The aiohttp application serving `api` (the /_fake/ routes are added by server)."""
    app = web.Application(middlewares=[api_middleware], client_max_size=CLIENT_MAX_SIZE)
    app[FAKE_API] = api
    one = BATCHES_PATH + "/{batch_id}"
    app.router.add_post(BATCHES_PATH, create_batch, name="create")
    app.router.add_get(BATCHES_PATH, list_batches, name="list")
    app.router.add_get(one, retrieve_batch, name="retrieve")
    app.router.add_post(one + "/cancel", cancel_batch, name="cancel")
    app.router.add_delete(one, delete_batch, name="delete")
    app.router.add_get(one + "/results", batch_results, name="results")
    return app


def json_response(request: web.Request, payload: object, *, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type="application/json",
        headers={"request-id": request[REQUEST_ID]},
    )


def error_response(
    request: web.Request,
    status: int,
    error_type: str,
    message: str,
    *,
    should_retry: bool | None = None,
    retry_after: float | None = None,
) -> web.Response:
    """§6.1 body; §1.4 headers: x-should-retry false on 401/404 as captured."""
    response = json_response(
        request, error_body(error_type, message, request[REQUEST_ID]), status=status
    )
    if should_retry is None and status in (401, 404):
        should_retry = False
    if should_retry is not None:
        response.headers["x-should-retry"] = "true" if should_retry else "false"
    if retry_after is not None:
        response.headers["retry-after"] = f"{retry_after:g}"
    return response


def drop_connection(request: web.Request) -> web.Response:
    """Close the connection without a response; what we return is never sent."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=500)


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """request-id on everything; errors as JSON; down switch, auth and faults."""
    api = request.app[FAKE_API]
    request[REQUEST_ID] = new_id(api.ids, "req_")
    try:
        response = await _guarded(request, handler, api)
    except ApiError as exc:
        response = error_response(request, exc.status, exc.error_type, exc.message)
    except CreateRejected as exc:
        response = error_response(request, exc.status, exc.error_type, exc.message)
        if exc.status == 413:
            response.force_close()  # the rest of the body is not worth keeping
    except web.HTTPException as exc:  # unknown path or method
        error_type = "not_found_error" if exc.status == 404 else "invalid_request_error"
        response = error_response(request, exc.status, error_type, exc.reason)
    return response


async def _guarded(request: web.Request, handler: Handler, api: FakeApi) -> web.StreamResponse:
    endpoint = request.match_info.route.name
    if endpoint not in ENDPOINTS:
        return await handler(request)  # /_fake/ control endpoints, unknown paths
    faults = api.faults
    if faults.is_down(api.clock()):
        faults.record_down(request.method, request.path)
        if faults.down_mode == "drop":
            return drop_connection(request)
        return error_response(
            request,
            503,
            "api_error",
            "Service unavailable",
            should_retry=faults.config.should_retry,
        )
    # anthropic-version is not required: the real answer when it is missing is
    # UNCONFIRMED (§9), and refusing it would only break clients that the API accepts.
    if not _authenticated(request, api.api_key):
        # §6.1, §9: 401 with the 2025-captured message, never retried.
        raise ApiError(401, "authentication_error", "invalid x-api-key")
    if endpoint == "create":
        api.state.stats.creates_attempted += 1
    fault = faults.draw_http_fault(endpoint)
    if fault is None:
        return await handler(request)
    faults.record(fault)
    if fault in STATUS_ERROR_TYPES:
        status, error_type, message = STATUS_ERROR_TYPES[fault]
        retry_after = faults.config.retry_after_seconds if status == 429 else None
        return error_response(
            request,
            status,
            error_type,
            message,
            should_retry=faults.config.should_retry,
            retry_after=retry_after,
        )
    if fault == "drop":
        return drop_connection(request)
    if fault == "slow":
        await asyncio.sleep(faults.config.slow_seconds)
    if fault == "truncate":
        request[TRUNCATE] = True
    if fault == "late_create":
        request[LATE_CREATE] = True
    response = await handler(request)
    if fault == "commit_drop" and response.status == 200:
        return drop_connection(request)  # the batch exists; the client never hears of it
    return response


def _authenticated(request: web.Request, api_key: str | None) -> bool:
    """§1.3: x-api-key, or Authorization: Bearer; any non-empty key unless configured."""
    key = request.headers.get("x-api-key", "").strip()
    if not key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
    if not key:
        return False
    return api_key is None or secrets.compare_digest(key.encode(), api_key.encode())


def _base_url(request: web.Request) -> str:
    """The server's own origin as the client reached it (§1.2: results_url is absolute)."""
    return f"{request.scheme}://{request.host}"


async def read_body(request: web.Request, max_bytes: int) -> bytearray:
    """Stream the body in, refusing it with 413 once it passes `max_bytes` (§3.3)."""
    too_large = CreateRejected(
        # UNCONFIRMED: the real 413 may not even be JSON (§3.3); this is the Messages
        # API's wording.
        "Request exceeds the maximum allowed number of bytes.",
        status=413,
        error_type="request_too_large",
    )
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(READ_CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:  # chunked transfer: no Content-Length to check first
            raise too_large
    return body


async def create_batch(request: web.Request) -> web.StreamResponse:
    api = request.app[FAKE_API]
    body = await read_body(request, api.max_body_bytes)
    # Parsing 256 MB takes a while: off the loop, so polls keep being answered.
    parsed = await asyncio.to_thread(parse_create_body, body, api.models)
    del body
    if request.get(LATE_CREATE, False):
        # The body was read and is valid: the client's connection drops now, and the batch
        # appears later, as when the server commits a create whose answer was lost.
        api.create_later(parsed, api.faults.config)
        return drop_connection(request)
    batch = api.state.create(parsed, api.faults.config)
    api.persist()
    return json_response(request, batch.view(api.clock(), api.state.timeline, _base_url(request)))


async def retrieve_batch(request: web.Request) -> web.StreamResponse:
    api = request.app[FAKE_API]
    batch = api.state.get(request.match_info["batch_id"])
    now = api.clock()
    window = api.faults.config.not_found_after_create_seconds
    if window > 0 and (now - batch.created_at).total_seconds() < window:
        api.faults.record("not_found_after_create")
        raise not_found(batch.id)  # §7.6: transient 404s right after create
    return json_response(request, batch.view(now, api.state.timeline, _base_url(request)))


async def list_batches(request: web.Request) -> web.StreamResponse:
    api = request.app[FAKE_API]
    query = request.query
    limit = _parse_limit(query.get("limit"))
    before_id, after_id = query.get("before_id"), query.get("after_id")
    if before_id is not None and after_id is not None:
        # UNCONFIRMED: the real API's answer when both cursors are given.
        raise ApiError(400, "invalid_request_error", "Cannot specify both before_id and after_id")
    now = api.clock()
    lag = api.faults.config.list_lag_seconds
    created_by = now - timedelta(seconds=lag) if lag > 0 else None
    page, has_more = api.state.list_page(
        limit, before_id=before_id, after_id=after_id, created_by=created_by
    )
    if created_by is not None and any(
        b.created_at > created_by for b in api.state.batches.values()
    ):
        api.faults.record("list_lag")  # a list call that did not show every batch
    timeline, base_url = api.state.timeline, _base_url(request)
    data = [batch.view(now, timeline, base_url) for batch in page]
    payload: MessageBatchList = {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,  # UNCONFIRMED: null when empty (§1.1)
        "last_id": data[-1]["id"] if data else None,
    }
    return json_response(request, payload)


def _parse_limit(text: str | None) -> int:
    """§1.1: default 20, range 1..1000; a 400 outside is an assumption (§9)."""
    if text is None:
        return LIST_LIMIT_DEFAULT
    try:
        limit = int(text)
    except ValueError:
        raise ApiError(
            400,
            "invalid_request_error",
            "limit: Input should be a valid integer, unable to parse string as an integer",
        ) from None
    if limit < 1:
        raise ApiError(
            400, "invalid_request_error", "limit: Input should be greater than or equal to 1"
        )
    if limit > LIST_LIMIT_MAX:
        raise ApiError(
            400,
            "invalid_request_error",
            f"limit: Input should be less than or equal to {LIST_LIMIT_MAX}",
        )
    return limit


async def cancel_batch(request: web.Request) -> web.StreamResponse:
    api = request.app[FAKE_API]
    batch = api.state.cancel(request.match_info["batch_id"])
    api.persist()
    return json_response(request, batch.view(api.clock(), api.state.timeline, _base_url(request)))


async def delete_batch(request: web.Request) -> web.StreamResponse:
    api = request.app[FAKE_API]
    batch_id = request.match_info["batch_id"]
    api.state.delete(batch_id)
    api.persist()
    deleted: DeletedMessageBatch = {"id": batch_id, "type": "message_batch_deleted"}
    return json_response(request, deleted)


async def batch_results(request: web.Request) -> web.StreamResponse:
    """§1.2: JSONL streamed in ~1 MB writes, never built as one string."""
    api = request.app[FAKE_API]
    batch = api.state.results_batch(request.match_info["batch_id"])
    truncate = request.get(TRUNCATE, False)
    if not truncate and api.faults.draw_truncation():
        api.faults.record("truncate")
        truncate = True
    response = web.StreamResponse(
        status=200,
        headers={"content-type": "application/x-jsonl", "request-id": request[REQUEST_ID]},
    )
    await response.prepare(request)
    for chunk in result_chunks(batch, api.state.timeline, truncate=truncate):
        await response.write(chunk)
    if truncate:
        drop_connection(request)  # the client sees a chunked body that never finishes
        return response
    await response.write_eof()
    return response
