"""The typed errors of the Batches API client, and the class for each HTTP status.

Every failure talking to the API surfaces as an `ApiError` subclass whose message a user
can act on and which never contains the API key (spec §6.1).
"""

from __future__ import annotations

from typing import ClassVar

import orjson

_ERROR_SNIPPET_CHARS = 200


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
    """No usable response: connection failure, timeout, broken or malformed body.

    `connected`: False only when the connection was never opened (refused, no route, a
    name that does not resolve, a TLS handshake that failed, no connection within the
    connect timeout): then not a byte of the request reached the server. True, the safe
    default, whenever some of it may have: a reset, a timeout or a cut after connecting.
    """

    def __init__(self, method: str, path: str, reason: str, *, connected: bool = True) -> None:
        super().__init__(f"{method} {path}: {reason}")
        self.reason = reason
        self.connected = connected


class CreateNotSent(ApiError):
    """The create request never reached the API: its connection was never opened, so no
    batch can exist for it, and its requests may go out again at once (unlike
    `CreateOutcomeUnknown`, nothing is left to reconcile)."""

    def __init__(self, cause: ApiConnectionError) -> None:
        super().__init__(f"batch create not sent ({cause}); no batch was created")
        self.cause = cause


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


_STATUS_ERRORS: dict[int, type[ApiStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    413: RequestTooLargeError,
    422: BadRequestError,
    429: RateLimitError,
}


def status_error_class(status: int) -> type[ApiStatusError]:
    """The `ApiStatusError` subclass for a non-2xx status."""
    if status >= 500:
        return ServerError
    return _STATUS_ERRORS.get(status, ApiStatusError)


def error_fields(status: int, payload: bytes) -> tuple[str, str]:
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
