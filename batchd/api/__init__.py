"""The Message Batches API: the client, its errors and retry policy, request bodies, the
results download, wire types, response shapes and the JSONL line splitter.

The rest of batchd imports the client's public names from here, not from the modules
that hold them: `errors` (typed errors, the class for each status), `retry` (when and how
long), `bodies` (streamed create bodies), `client` (the endpoints), `download` (result
lines off an open response). `wire`, `shapes` and `resultstream` are imported by path.

`BatchesClient` is imported on first use: it pulls in aiohttp (~0.2 s of a command's
start), and the commands that never call the API (`status`, `enqueue`, `results`, `prune`)
reach this package only for its wire types (domain.py -> wire.py).
"""

from typing import TYPE_CHECKING

from batchd.api.bodies import BytesBody, RequestBody, RequestBodySizeError
from batchd.api.errors import (
    ApiConnectionError,
    ApiError,
    ApiStatusError,
    AuthenticationError,
    BadRequestError,
    CreateNotSent,
    CreateOutcomeUnknown,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
    ResultsStreamError,
    ServerError,
)
from batchd.api.retry import RetryPolicy, parse_retry_after

if TYPE_CHECKING:
    from batchd.api.client import BatchesClient

__all__ = [
    "ApiConnectionError",
    "ApiError",
    "ApiStatusError",
    "AuthenticationError",
    "BadRequestError",
    "BatchesClient",
    "BytesBody",
    "CreateNotSent",
    "CreateOutcomeUnknown",
    "NotFoundError",
    "RateLimitError",
    "RequestBody",
    "RequestBodySizeError",
    "RequestTooLargeError",
    "ResultsStreamError",
    "RetryPolicy",
    "ServerError",
    "parse_retry_after",
]


def __getattr__(name: str) -> object:
    if name == "BatchesClient":
        from batchd.api.client import BatchesClient  # noqa: PLC0415

        return BatchesClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
