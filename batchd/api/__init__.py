"""The Message Batches API: the client, its errors and retry policy, request bodies, the
results download, wire types, response shapes and the JSONL line splitter.

The rest of batchd imports the client's public names from here, not from the modules
that hold them: `errors` (typed errors, the class for each status), `retry` (when and how
long), `bodies` (streamed create bodies), `client` (the endpoints), `download` (result
lines off an open response). `wire`, `shapes` and `resultstream` are imported by path.
"""

from batchd.api.bodies import BytesBody, RequestBody, RequestBodySizeError
from batchd.api.client import BatchesClient
from batchd.api.errors import (
    ApiConnectionError,
    ApiError,
    ApiStatusError,
    AuthenticationError,
    BadRequestError,
    CreateOutcomeUnknown,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
    ResultsStreamError,
    ServerError,
)
from batchd.api.retry import RetryPolicy, parse_retry_after

__all__ = [
    "ApiConnectionError",
    "ApiError",
    "ApiStatusError",
    "AuthenticationError",
    "BadRequestError",
    "BatchesClient",
    "BytesBody",
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
