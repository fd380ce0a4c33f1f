"""The Message Batches API over one aiohttp session: headers, retries, typed errors.

Knows status codes, `retry-after` and `x-should-retry` (spec §1, §6); knows nothing about
tasks. Every failure surfaces as an `ApiError` subclass whose message a user can act on
and which never contains the API key.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Protocol, TypeVar, cast
from urllib.parse import quote

import aiohttp
import orjson
import structlog
import yarl

from batchd.api import shapes
from batchd.api.resultstream import LineSplitter, LineTooLongError, is_cut_off
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
_RESULTS_CHUNK_BYTES = 1 << 20
_RESULTS_CONNECT_TIMEOUT_S = 30.0
# A create body of up to 256 MB must not hit the control-plane total timeout while it
# uploads: allow this much extra time per byte (a slow 1 MB/s uplink).
_MIN_UPLOAD_BYTES_PER_S = 1_000_000
_ERROR_SNIPPET_CHARS = 200


# ─── errors ──────────────────────────────────────────────────────────────────────────


class ApiError(Exception):
    """Any failure talking to the Batches API."""


class ApiStatusError(ApiError):
    """The API answered with a non-2xx status (spec §6.1)."""

    hint: ClassVar[str] = ""

    def __init__(
        self,
        *,
        method: str,
        path: str,
        status: int,
        error_type: str,
        message: str,
        request_id: str | None,
        retry_after_s: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        text = f"{method} {path} failed: HTTP {status} {error_type}: {message}"
        if request_id:
            text += f" (request-id {request_id})"
        if self.hint:
            text += f"; {self.hint}"
        super().__init__(text)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.should_retry = should_retry


class AuthenticationError(ApiStatusError):
    hint = "check the API key (ANTHROPIC_API_KEY) and the workspace it belongs to"


class NotFoundError(ApiStatusError):
    pass


class RateLimitError(ApiStatusError):
    hint = "the organisation's batch rate limit or processing-queue limit was reached"


class RequestTooLargeError(ApiStatusError):
    hint = "the create body is over the API's 256 MB limit: lower the batch byte limit"


class BadRequestError(ApiStatusError):
    pass


class ServerError(ApiStatusError):
    hint = "the API is failing or overloaded; this is not caused by the request"


class ApiConnectionError(ApiError):
    """No usable response: connection failure, timeout, broken or malformed body."""

    def __init__(self, method: str, path: str, reason: str) -> None:
        super().__init__(f"{method} {path}: {reason}")
        self.reason = reason


class CreateOutcomeUnknown(ApiError):
    """The create request may have reached the server; a batch may or may not exist.

    Spec §6.3/§8.3: creates carry no idempotency key, so never re-POST blindly:
    reconcile through the list endpoint first.
    """

    def __init__(self, cause: ApiError) -> None:
        super().__init__(
            f"batch create outcome unknown ({cause}); a batch may have been created: "
            "look for it on the list endpoint before sending these requests again"
        )
        self.cause = cause


class ResultsStreamError(ApiError):
    """The results stream broke off or could not be framed; download it again."""

    def __init__(self, batch_id: str, url: str, offset: int, reason: str) -> None:
        super().__init__(
            f"results of batch {batch_id} ({url}) failed at byte offset {offset}: {reason}"
        )
        self.batch_id = batch_id
        self.url = url
        self.offset = offset


class RequestBodySizeError(ValueError):
    """A `RequestBody` yielded more or fewer bytes than its `size`: a bug, not an API fault.

    The upload is aborted before the server has a complete request, so nothing was created.
    """


_STATUS_ERRORS: dict[int, type[ApiStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    413: RequestTooLargeError,
    422: BadRequestError,
    429: RateLimitError,
}


def _status_error_class(status: int) -> type[ApiStatusError]:
    if status >= 500:
        return ServerError
    return _STATUS_ERRORS.get(status, ApiStatusError)


# ─── retry policy ────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The SDKs' retry rules (spec §6.3), with more retries and long `retry-after` honoured."""

    max_retries: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    # The daemon has no deadline, so a long retry-after is obeyed (the Python SDK ignores
    # values over 60 s and retries sooner, only to be refused again) up to this bound.
    max_retry_after_s: float = 900.0

    def should_retry(self, error: ApiError) -> bool:
        """Connection faults, 408, 409, 429 and 5xx; `x-should-retry` overrides the status."""
        if isinstance(error, ApiConnectionError):
            return True
        if not isinstance(error, ApiStatusError):
            return False
        if error.should_retry is not None:
            return error.should_retry
        return error.status in (408, 409, 429) or error.status >= 500

    def delay_s(self, retries_done: int, retry_after_s: float | None, rng: random.Random) -> float:
        """The server's wait if it gave one, else `min(base*2**n, max) * U(0.75, 1]`."""
        if retry_after_s is not None and retry_after_s > 0:
            return min(retry_after_s, self.max_retry_after_s)
        backoff = min(self.base_delay_s * 2.0**retries_done, self.max_delay_s)
        return backoff * (1 - 0.25 * rng.random())


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait per `retry-after-ms`, then `retry-after` as seconds or HTTP-date."""
    if (millis := headers.get("retry-after-ms")) is not None:
        try:
            return float(millis) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return parsedate_to_datetime(value).timestamp() - now
    except (TypeError, ValueError):
        return None


def _should_retry_header(headers: Mapping[str, str]) -> bool | None:
    value = headers.get("x-should-retry", "").strip().lower()
    return {"true": True, "false": False}.get(value)


# ─── request bodies ──────────────────────────────────────────────────────────────────


class RequestBody(Protocol):
    """A create body of known size, streamed so a 256 MB body never sits in memory whole."""

    size: int

    def iter_chunks(self) -> AsyncIterator[bytes]: ...


class BytesBody:
    """A `RequestBody` held in memory: for small bodies and tests."""

    def __init__(self, data: bytes, chunk_bytes: int = 1 << 20) -> None:
        self._data = data
        self._chunk_bytes = chunk_bytes
        self.size = len(data)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self._data), self._chunk_bytes):
            yield self._data[start : start + self._chunk_bytes]


async def _checked_chunks(body: RequestBody) -> AsyncIterator[bytes]:
    """The body's chunks; a size mismatch aborts the upload instead of hanging the server."""
    sent = 0
    async for chunk in body.iter_chunks():
        sent += len(chunk)
        if sent > body.size:
            break
        yield chunk
    if sent != body.size:
        raise RequestBodySizeError(f"request body yielded {sent} bytes, not its size {body.size}")


# ─── the client ──────────────────────────────────────────────────────────────────────


class BatchesClient:
    """The Batches API endpoints (spec §1) over one caller-owned `aiohttp.ClientSession`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        policy: RetryPolicy = RetryPolicy(),  # frozen, so one shared default is safe
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
            sock_connect=_RESULTS_CONNECT_TIMEOUT_S,
            sock_read=results_sock_read_timeout_s,
        )
        # A download that brings fewer than this many bytes in this many seconds of waiting
        # for them is stuck (sock_read only catches total silence: a trickle resets it at
        # every byte). Time the consumer spends away from the stream is not counted.
        self._results_stall_s, self._results_stall_bytes = results_stall
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._on_response = on_response
        self._on_retry = on_retry  # metrics hook: called with the endpoint before each retry

    # ── endpoints ──

    async def create(self, body: RequestBody) -> MessageBatch:
        """POST a batch. Never retried: creates are not idempotent (spec §6.3, §8.3).

        Raises the `ApiStatusError` subclass when the API refused (4xx, 429: nothing was
        created) and `CreateOutcomeUnknown` when it may have created a batch.
        """
        timeout = aiohttp.ClientTimeout(
            total=self._control_timeout_s + body.size / _MIN_UPLOAD_BYTES_PER_S
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
        except (ApiConnectionError, ServerError) as exc:
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
        lines = self._result_lines(response, results_url, batch_id, max_line_bytes)
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
            data = _checked_chunks(body)
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
            raise ApiConnectionError(method, path, self._describe(exc, timeout)) from exc
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

    async def _result_lines(
        self, response: aiohttp.ClientResponse, url: str, batch_id: str, max_line_bytes: int
    ) -> AsyncGenerator[bytes, None]:
        # Never readline(): it caps line length at the reader's high-water mark (§8.5).
        splitter = LineSplitter(max_line_bytes)
        chunks = response.content.iter_chunked(_RESULTS_CHUNK_BYTES)
        # The stall window counts only time spent waiting for the next chunk: while the
        # consumer holds this generator suspended (the collector staging lines, perhaps
        # minutes behind SQLite's write lock) the network is not being waited on, and what
        # arrived meanwhile is read at once when it comes back.
        window_waited_s, window_bytes = 0.0, 0
        while True:
            # Only reading and splitting are guarded, so the consumer's own exceptions
            # (raised at the yield) are never mistaken for stream faults.
            try:
                read_started = time.monotonic()
                chunk = await anext(chunks, b"")
                window_waited_s += time.monotonic() - read_started
                window_bytes += len(chunk)
                if window_waited_s >= self._results_stall_s:
                    if chunk and window_bytes < self._results_stall_bytes:
                        reason = (
                            f"stalled: {window_bytes} bytes in the last "
                            f"{self._results_stall_s:g} s spent waiting for the network"
                        )
                        raise ResultsStreamError(batch_id, url, splitter.offset, reason)
                    window_waited_s, window_bytes = 0.0, 0
                lines = splitter.feed(chunk) if chunk else self._last_lines(splitter, batch_id)
            except LineTooLongError as exc:
                raise ResultsStreamError(batch_id, url, exc.offset, str(exc)) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = self._describe(exc, self._results_timeout)
                raise ResultsStreamError(batch_id, url, splitter.offset, reason) from exc
            for line in lines:
                yield line
            if not chunk:
                return

    @staticmethod
    def _last_lines(splitter: LineSplitter, batch_id: str) -> list[bytes]:
        """The line left without a terminator at the end, unless it is a fragment.

        A fragment is dropped, not yielded: counted as a line it would make a short stream
        look whole (the batch finished and its last request sent, and paid, again) and be
        kept as a malformed result. Without it the stream is short, and downloaded again.
        """
        end = splitter.offset
        lines = splitter.finish()
        if lines and is_cut_off(lines[-1]):
            fragment = lines.pop()
            log.warning(
                "results_stream_ended_mid_line",
                batch_id=batch_id,
                offset=end - len(fragment),
                bytes=len(fragment),
            )
        return lines

    def _status_error(
        self, method: str, path: str, status: int, headers: Mapping[str, str], payload: bytes
    ) -> ApiStatusError:
        error_type, message = _error_fields(status, payload)
        retry_after = parse_retry_after(headers, time.time())
        if retry_after is not None:
            # Negative or NaN waits mean "no hint"; huge ones are bounded by the policy.
            retry_after = (
                min(retry_after, self._policy.max_retry_after_s) if retry_after > 0 else None
            )
        return _status_error_class(status)(
            method=method,
            path=path,
            status=status,
            error_type=error_type,
            message=self._redact(message),
            request_id=headers.get("request-id"),
            retry_after_s=retry_after,
            should_retry=_should_retry_header(headers),
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


def _error_fields(status: int, payload: bytes) -> tuple[str, str]:
    """`error.type` and `error.message` of the §6.1 envelope; tolerate any other body
    (a 413 from the edge proxy may be HTML, §3.3)."""
    try:
        envelope = orjson.loads(payload)
    except orjson.JSONDecodeError:
        envelope = None
    error = envelope.get("error") if isinstance(envelope, dict) else None
    if isinstance(error, dict):
        error_type, message = error.get("type"), error.get("message")
        if isinstance(error_type, str) and isinstance(message, str):
            return error_type, message
    snippet = payload[:_ERROR_SNIPPET_CHARS].decode(errors="replace").strip()
    fallback_type = "request_too_large" if status == 413 else "unknown_error"
    return fallback_type, snippet or "(empty body)"
