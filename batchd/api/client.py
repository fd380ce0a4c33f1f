"""The Batches API over one aiohttp session: endpoints, headers, the retry loop.

Knows status codes, `retry-after` and `x-should-retry` (spec §1, §6) through
`batchd.api.errors` and `batchd.api.retry`; knows nothing about tasks. Every failure
surfaces as an `ApiError` subclass whose message a user can act on and which never
contains the API key.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast
from urllib.parse import quote

import aiohttp
import orjson
import structlog
import yarl

from batchd.api import shapes
from batchd.api.bodies import RequestBody, RequestBodySizeError, checked_chunks
from batchd.api.download import StallLimit, result_lines
from batchd.api.errors import (
    ApiConnectionError,
    ApiStatusError,
    CreateNotSent,
    CreateOutcomeUnknown,
    ServerError,
    error_fields,
    status_error_class,
)
from batchd.api.retry import RetryPolicy, parse_retry_after, should_retry_header
from batchd.api.wire import (
    ANTHROPIC_VERSION,
    BATCHES_PATH,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    DeletedMessageBatch,
    MessageBatch,
    MessageBatchList,
)

log = structlog.get_logger("batchd.api.client")

_T = TypeVar("_T")
_CONNECT_TIMEOUT_S = 30.0
# A create body of up to 256 MB must not hit the control-plane total timeout while it
# uploads: allow this much extra time per byte (a slow 1 MB/s uplink).
_MIN_UPLOAD_BYTES_PER_S = 1_000_000
_DEFAULT_POLICY = RetryPolicy()  # frozen, so one shared default is safe


class BatchesClient:
    """The Batches API endpoints (spec §1) over one caller-owned `aiohttp.ClientSession`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        policy: RetryPolicy = _DEFAULT_POLICY,
        control_timeout_s: float = 60.0,
        results_sock_read_timeout_s: float = 300.0,
        results_stall: tuple[float, int] = (300.0, 64 * 1024),
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
        on_response: Callable[[str, int, float], None] | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._session = session
        self._batches_url = base_url.rstrip("/") + BATCHES_PATH
        self._api_key = api_key
        self._policy = policy
        self._control_timeout_s = control_timeout_s
        self._results_timeout = aiohttp.ClientTimeout(
            total=None,  # a results file can take longer than any fixed total (pitfalls.md)
            sock_connect=_CONNECT_TIMEOUT_S,
            sock_read=results_sock_read_timeout_s,
        )
        # (seconds, bytes): see `StallLimit`, which is why sock_read alone is not enough.
        self._results_stall = StallLimit(*results_stall)
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._on_response = on_response
        self._on_retry = on_retry  # metrics hook: called with the endpoint before each retry

    # ── endpoints ──

    async def create(self, body: RequestBody) -> MessageBatch:
        """POST a batch. Never retried: creates are not idempotent (spec §6.3, §8.3).

        Raises the `ApiStatusError` subclass when the API refused (4xx, 429: nothing was
        created), `CreateNotSent` when the connection was never opened (nothing can have
        been created), and `CreateOutcomeUnknown` when it may have created a batch.
        """
        timeout = aiohttp.ClientTimeout(
            total=self._control_timeout_s + body.size / _MIN_UPLOAD_BYTES_PER_S,
            # A connect that hangs then fails as a connect timeout, which proves nothing
            # was sent; under the total timeout alone it would read as "maybe created".
            sock_connect=min(_CONNECT_TIMEOUT_S, self._control_timeout_s),
        )
        try:
            return await self._send(
                "create",
                "POST",
                self._batches_url,
                shapes.message_batch,
                body=body,
                client_timeout=timeout,
            )
        except ApiConnectionError as exc:
            if not exc.connected:
                raise CreateNotSent(exc) from exc
            raise CreateOutcomeUnknown(exc) from exc
        except ServerError as exc:
            raise CreateOutcomeUnknown(exc) from exc

    async def retrieve(self, batch_id: str) -> MessageBatch:
        url = self._batch_url(batch_id)
        return await self._with_retries(
            "retrieve", lambda: self._send("retrieve", "GET", url, shapes.message_batch)
        )

    async def list_page(
        self,
        *,
        limit: int = LIST_LIMIT_DEFAULT,
        after_id: str | None = None,
        before_id: str | None = None,
    ) -> MessageBatchList:
        """One page, newest first (spec §1.1); follow `after_id=last_id` while `has_more`."""
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise ValueError(f"limit must be between 1 and {LIST_LIMIT_MAX}, not {limit}")
        params = {"limit": str(limit)}
        if after_id is not None:
            params["after_id"] = after_id
        if before_id is not None:
            params["before_id"] = before_id
        url = self._batches_url
        return await self._with_retries(
            "list",
            lambda: self._send("list", "GET", url, shapes.message_batch_list, params=params),
        )

    async def cancel(self, batch_id: str) -> MessageBatch:
        url = self._batch_url(batch_id) + "/cancel"
        return await self._with_retries(
            "cancel", lambda: self._send("cancel", "POST", url, shapes.message_batch)
        )

    async def delete(self, batch_id: str) -> DeletedMessageBatch:
        url = self._batch_url(batch_id)
        deleted = await self._with_retries(
            "delete", lambda: self._send("delete", "DELETE", url, shapes.with_id)
        )
        return cast(DeletedMessageBatch, deleted)

    @asynccontextmanager
    async def results(
        self, results_url: str, *, batch_id: str, max_line_bytes: int = 256 * 1024 * 1024
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream the results JSONL at `results_url` (absolute, from the batch: §1.2).

        Yields an iterator of non-blank lines without terminators. A cut-off or
        unframeable stream raises `ResultsStreamError` naming the batch and byte offset;
        one that ends cleanly inside a line yields the lines before it (a short stream).
        """
        response = await self._with_retries("results", lambda: self._open_results(results_url))
        lines = result_lines(
            response,
            url=results_url,
            batch_id=batch_id,
            max_line_bytes=max_line_bytes,
            stall=self._results_stall,
            describe=lambda exc: self._describe(exc, self._results_timeout),
        )
        async with response:
            try:
                yield lines
            finally:
                await lines.aclose()

    # ── plumbing ──

    def _batch_url(self, batch_id: str) -> str:
        return f"{self._batches_url}/{quote(batch_id, safe='')}"

    def _headers(self, *, accept: str = "application/json") -> dict[str, str]:
        return {
            "x-api-key": self._api_key,
            "anthropic-version": ANTHROPIC_VERSION,
            "accept": accept,
        }

    async def _with_retries(self, endpoint: str, attempt: Callable[[], Awaitable[_T]]) -> _T:
        retries_done = 0
        while True:
            try:
                return await attempt()
            except (ApiStatusError, ApiConnectionError) as exc:
                if retries_done >= self._policy.max_retries or not self._policy.should_retry(exc):
                    raise
                retry_after = exc.retry_after_s if isinstance(exc, ApiStatusError) else None
                delay = self._policy.delay_s(retries_done, retry_after, self._rng)
                retries_done += 1
                if self._on_retry is not None:
                    self._on_retry(endpoint)
                log.info(
                    "api_retry",
                    endpoint=endpoint,
                    retry=retries_done,
                    delay_s=delay,
                    error=str(exc),
                )
                await self._sleep(delay)

    async def _send(
        self,
        endpoint: str,
        method: str,
        url: str,
        shape: Callable[[Any], _T],
        *,
        params: Mapping[str, str] | None = None,
        body: RequestBody | None = None,
        client_timeout: aiohttp.ClientTimeout | None = None,
    ) -> _T:
        """One exchange on the control plane: the JSON checked by `shape`, or a typed error."""
        headers = self._headers()
        data = None
        if body is not None:
            # An async generator with an explicit length streams the body non-chunked:
            # ~40 MB peak for 256 MB instead of ~1 GB for one bytes object (pitfalls.md).
            headers["content-type"] = "application/json"
            headers["content-length"] = str(body.size)
            data = checked_chunks(body)
        timeout = client_timeout or aiohttp.ClientTimeout(total=self._control_timeout_s)
        path = yarl.URL(url).path
        started = time.monotonic()
        try:
            # No redirects: aiohttp would follow one to any host with our x-api-key.
            async with self._session.request(
                method,
                url,
                params=params,
                headers=headers,
                data=data,
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                payload = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._observe(endpoint, method, path, started, None)
            if isinstance(exc.__cause__, RequestBodySizeError):  # aiohttp wraps it
                raise exc.__cause__ from None
            raise ApiConnectionError(
                method, path, self._describe(exc, timeout), connected=not _never_opened(exc)
            ) from exc
        self._observe(endpoint, method, path, started, response)
        if not 200 <= response.status < 300:
            raise self._status_error(method, path, response.status, response.headers, payload)
        try:
            return shape(orjson.loads(payload))
        except orjson.JSONDecodeError as exc:
            reason = f"HTTP {response.status} with a body that is not JSON"
            raise ApiConnectionError(method, path, reason) from exc
        except shapes.MalformedResponse as exc:
            reason = f"HTTP {response.status} with a malformed body: {exc}"
            raise ApiConnectionError(method, path, reason) from exc

    async def _open_results(self, url: str) -> aiohttp.ClientResponse:
        """GET the results; an open 2xx response, or a typed error with the body released."""
        path = yarl.URL(url).path
        started = time.monotonic()
        headers = self._headers(accept="application/binary")  # as the SDKs send (§1.2)
        try:
            response = await self._session.get(
                url, headers=headers, timeout=self._results_timeout, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._observe("results", "GET", path, started, None)
            raise ApiConnectionError(
                "GET", path, self._describe(exc, self._results_timeout)
            ) from exc
        self._observe("results", "GET", path, started, response)
        if 200 <= response.status < 300:
            return response  # the Content-Type is not checked: it has varied (§1.2)
        async with response:
            try:
                payload = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                payload = b""  # the status alone decides; the body is only for the message
        raise self._status_error("GET", path, response.status, response.headers, payload)

    def _status_error(
        self, method: str, path: str, status: int, headers: Mapping[str, str], payload: bytes
    ) -> ApiStatusError:
        error_type, message = error_fields(status, payload)
        retry_after = parse_retry_after(headers, time.time())
        if retry_after is not None:
            # Negative or NaN waits mean "no hint"; huge ones are bounded by the policy.
            retry_after = (
                min(retry_after, self._policy.max_retry_after_s) if retry_after > 0 else None
            )
        return status_error_class(status)(
            method=method,
            path=path,
            status=status,
            error_type=error_type,
            message=self._redact(message),
            request_id=headers.get("request-id"),
            retry_after_s=retry_after,
            should_retry=should_retry_header(headers),
        )

    def _describe(self, exc: BaseException, timeout: aiohttp.ClientTimeout) -> str:
        if isinstance(exc, TimeoutError):
            limits = f"total={timeout.total}s, sock_read={timeout.sock_read}s"
            return f"timed out ({limits}); check the network or raise the timeout"
        text = str(exc) or type(exc).__name__
        return self._redact(f"{type(exc).__name__}: {text}")

    def _redact(self, text: str) -> str:
        """Defence in depth: no message we build may carry the key, whatever echoes it."""
        return text.replace(self._api_key, "<redacted>") if self._api_key else text

    def _observe(
        self,
        endpoint: str,
        method: str,
        path: str,
        started: float,
        response: aiohttp.ClientResponse | None,
    ) -> None:
        """Log and report one exchange; status 0 when no complete response arrived."""
        elapsed = time.monotonic() - started
        status = 0 if response is None else response.status
        request_id = None if response is None else response.headers.get("request-id")
        log.debug("api_response", method=method, path=path, status=status, request_id=request_id)
        if self._on_response is not None:
            self._on_response(endpoint, status, elapsed)


def _never_opened(exc: BaseException) -> bool:
    """The request's connection was never opened, so no byte of it was sent.

    aiohttp raises these from its connector alone, before the request is written: a
    refused or unroutable connect, a name that does not resolve, a failed TLS handshake
    (its SSL and certificate errors are `ClientConnectorError`s), a proxy unreachable, or
    the connect timeout. It never retries a POST on a fresh connection, so one of these
    cannot follow a first attempt that did send. Anything else (a reset, a disconnect, a
    read or total timeout) may come after the server received the request.
    """
    return isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
