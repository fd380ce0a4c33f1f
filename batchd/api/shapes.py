"""The API's answers checked against the shapes batchd relies on, before anything uses them.

A 2xx whose JSON is not what the spec describes (§1.1, §2) must not reach the store or
the poller, where a missing key or an unparsable date would crash a loop (and, under
systemd, crash it again at every restart). The client turns `MalformedResponse` into a
transport error: retried, and for a create an unknown outcome (it may exist).
Only what batchd reads is checked; unknown keys are allowed, as the SDK allows them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast, get_args

from batchd.api.wire import MessageBatch, MessageBatchList, ProcessingStatus, parse_timestamp

_PROCESSING_STATUSES = frozenset(get_args(ProcessingStatus))
_COUNTS = ("processing", "succeeded", "errored", "canceled", "expired")
_REQUIRED_TIMES = ("created_at", "expires_at")
_OPTIONAL_TIMES = ("ended_at", "archived_at", "cancel_initiated_at")


class MalformedResponse(ValueError):
    """A 2xx body that is not the object the endpoint promises; says what is wrong."""


def message_batch(value: Any) -> MessageBatch:
    """`value` as a MessageBatch (§2), or MalformedResponse naming the first problem."""
    if not isinstance(value, dict):
        raise MalformedResponse(f"a batch must be a JSON object, got {type(value).__name__}")
    batch_id = value.get("id")
    if not isinstance(batch_id, str) or not batch_id:
        raise MalformedResponse("a batch without a string id")
    if value.get("processing_status") not in _PROCESSING_STATUSES:
        status = value.get("processing_status")
        raise MalformedResponse(f"batch {batch_id}: unknown processing_status {status!r}")
    counts = value.get("request_counts")
    if not isinstance(counts, dict) or not all(_count(counts.get(key)) for key in _COUNTS):
        raise MalformedResponse(f"batch {batch_id}: request_counts is not five whole numbers")
    for key in _REQUIRED_TIMES:
        _timestamp(batch_id, key, value.get(key))
    for key in _OPTIONAL_TIMES:
        if value.get(key) is not None:
            _timestamp(batch_id, key, value.get(key))
    results_url = value.get("results_url")
    if results_url is not None and not isinstance(results_url, str):
        raise MalformedResponse(f"batch {batch_id}: results_url is not a string")
    return cast(MessageBatch, value)


def message_batch_list(value: Any) -> MessageBatchList:
    """`value` as a page of the list endpoint (§1.1), every batch in it checked."""
    if not isinstance(value, dict) or not isinstance(value.get("data"), list):
        raise MalformedResponse("a list page must be an object with a data array")
    if not isinstance(value.get("has_more"), bool):
        raise MalformedResponse("a list page without a has_more boolean")
    for key in ("first_id", "last_id"):
        if value.get(key) is not None and not isinstance(value.get(key), str):
            raise MalformedResponse(f"a list page whose {key} is not a string")
    for batch in value["data"]:
        message_batch(batch)
    return cast(MessageBatchList, value)


def with_id(value: Any) -> dict[str, Any]:
    """Any object that names what it is about by a string id (a deleted batch, §1.1)."""
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        raise MalformedResponse("expected an object with a string id")
    return value


def _count(value: object) -> bool:
    return type(value) is int and value >= 0  # not bool, which is an int


def _timestamp(batch_id: str, key: str, value: object) -> datetime:
    if not isinstance(value, str):
        raise MalformedResponse(f"batch {batch_id}: {key} is not a timestamp string")
    try:
        parsed = parse_timestamp(value)
    except ValueError:
        message = f"batch {batch_id}: {key} {value[:40]!r} is not a timestamp"
        raise MalformedResponse(message) from None
    if parsed.tzinfo is None:
        raise MalformedResponse(f"batch {batch_id}: {key} {value[:40]!r} has no time zone")
    return parsed
