"""One result line ─► an `Outcome`: what happened, a readable reason, retryable or not, usage.

Spec §4: `{"custom_id": ..., "result": {"type": succeeded|errored|canceled|expired, ...}}`.
Parsing is defensive (unknown keys allowed, null usage fields are zero) but a line we
cannot attribute or classify raises `MalformedResultLine`: the daemon keeps such lines
aside, it never drops them.

Two paths, as in the chunker. The common one decodes a line once into typed structs
(msgspec) and keeps the `result` object's text as the API sent it (never re-serialised);
it answers only for a line whose every field has the expected type. Any other line (an
error, a null where a number belongs, malformed JSON) goes through the general path
(orjson and explicit checks), which defines the outcome and names what is wrong, so both
paths give the same outcome for every line the typed one accepts.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import orjson

from batchd.domain import Outcome, Usage

# §4.1 / §8.9: transient failures; resubmitting the same request can succeed.
_TRANSIENT_ERROR_TYPES = frozenset(
    {"api_error", "overloaded_error", "rate_limit_error", "timeout_error"}
)
# The request itself (or our account) is the problem: resubmitting it as is would only
# fail again, possibly after another day's wait.
_CLIENT_ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
    }
)
# The result types of a request the batch ended before processing, and the reason shown.
_NOT_PROCESSED = {
    "expired": "expired: the batch reached its 24 hour expiry before this request was processed",
    "canceled": "canceled: the batch was canceled before this request was processed",
}
_SNIPPET_BYTES = 80


class MalformedResultLine(ValueError):
    """A results line that is not a result we can attribute to a task and classify."""


# Token counts within orjson's integer range (it reads larger ones as floats, counted as
# zero by the general path) and msgspec's int64 bounds; anything else goes the general way.
_Count = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _UsageFields(msgspec.Struct, gc=False):
    input_tokens: _Count | None = None
    output_tokens: _Count | None = None
    cache_creation_input_tokens: _Count | None = None
    cache_read_input_tokens: _Count | None = None


class _Message(msgspec.Struct, gc=False):
    model: str | None = None
    usage: _UsageFields | None = None


class _Result(msgspec.Struct, gc=False):
    type: str
    message: _Message | None = None


class _Line(msgspec.Struct, gc=False):
    custom_id: str
    result: msgspec.Raw  # its text is what is stored


_LINE = msgspec.json.Decoder(_Line)
_RESULT = msgspec.json.Decoder(_Result)


def parse_result_line(line: bytes) -> Outcome:
    """Parse one JSONL result line; raises `MalformedResultLine` with the reason."""
    outcome = _typed(line)
    return outcome if outcome is not None else _general(line)


def _typed(line: bytes) -> Outcome | None:
    """The common path: succeeded, expired or canceled lines of the expected shape only."""
    try:
        record = _LINE.decode(line)
        result = _RESULT.decode(record.result)
        # msgspec only scans the text it keeps raw: decoding it checks it is UTF-8.
        result_json = str(record.result, "utf-8")
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None
    custom_id = record.custom_id
    if not custom_id:
        return None
    kind = result.type
    if kind == "succeeded":
        message = result.message
        if message is None:
            return None
        usage = message.usage
        return _succeeded_outcome(
            custom_id,
            result_json,
            Usage()
            if usage is None
            else Usage(
                usage.input_tokens or 0,
                usage.output_tokens or 0,
                usage.cache_creation_input_tokens or 0,
                usage.cache_read_input_tokens or 0,
            ),
            message.model,
        )
    if kind in _NOT_PROCESSED:
        return _not_processed(custom_id, kind, result_json)
    return None  # errored (its reason is read the general way) or unknown


def _general(line: bytes) -> Outcome:
    """The general path: defines the outcome of any line, or why it is malformed."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise MalformedResultLine(f"not JSON ({exc}): {line[:_SNIPPET_BYTES]!r}") from exc
    if not isinstance(record, dict):
        raise MalformedResultLine(f"not a JSON object: {line[:_SNIPPET_BYTES]!r}")
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise MalformedResultLine(f"no custom_id: {line[:_SNIPPET_BYTES]!r}")
    result = record.get("result")
    if not isinstance(result, dict):
        raise MalformedResultLine(f"custom_id {custom_id!r}: no result object")
    result_type = result.get("type")
    result_json = orjson.dumps(result).decode()
    if result_type == "succeeded":
        return _succeeded(custom_id, result, result_json)
    if result_type == "errored":
        return _errored(custom_id, result, result_json)
    # isinstance first: a list or object as the type is unhashable, and malformed.
    if isinstance(result_type, str) and result_type in _NOT_PROCESSED:
        return _not_processed(custom_id, result_type, result_json)
    raise MalformedResultLine(f"custom_id {custom_id!r}: unknown result.type {result_type!r}")


def _succeeded(custom_id: str, result: dict[str, Any], result_json: str) -> Outcome:
    message = result.get("message")
    if not isinstance(message, dict):
        raise MalformedResultLine(f"custom_id {custom_id!r}: succeeded without a message object")
    model = message.get("model")
    return _succeeded_outcome(
        custom_id,
        result_json,
        _usage(message.get("usage")),
        model if isinstance(model, str) else None,
    )


def _succeeded_outcome(
    custom_id: str, result_json: str, usage: Usage, model: str | None
) -> Outcome:
    return Outcome(
        custom_id, "succeeded", result_json, error=None, retryable=False, usage=usage, model=model
    )


def _not_processed(custom_id: str, kind: str, result_json: str) -> Outcome:
    """Expired or canceled. Retryable here means "not the request's fault"; the store
    decides with the task's cancel flag and attempts whether it goes back to pending."""
    return Outcome(custom_id, kind, result_json, _NOT_PROCESSED[kind], retryable=True)


def _tokens(value: object) -> int:
    # `type() is int`, not isinstance: JSON true/false must not count as 1/0 tokens.
    return value if type(value) is int else 0


def _usage(raw: object) -> Usage:
    """§4.2: only input/output tokens are certain; the cache counts may be absent or null."""
    if not isinstance(raw, dict):
        return Usage()
    get = raw.get
    return Usage(
        _tokens(get("input_tokens")),
        _tokens(get("output_tokens")),
        _tokens(get("cache_creation_input_tokens")),
        _tokens(get("cache_read_input_tokens")),
    )


def _errored(custom_id: str, result: dict[str, Any], result_json: str) -> Outcome:
    error_type, message = _error_details(result.get("error"))
    if error_type is None:
        reason = "errored: the result carries no error type"
    elif message:
        reason = f"errored: {error_type}: {message}"
    else:
        reason = f"errored: {error_type}"
    return Outcome(custom_id, "errored", result_json, reason, retryable=is_retryable(error_type))


def _error_details(envelope: object) -> tuple[str | None, str | None]:
    """§4.1: the type is at `result.error.error.type`; some doc examples put it one level up."""
    if not isinstance(envelope, dict):
        return None, None
    inner = envelope.get("error")
    source = inner if isinstance(inner, dict) else envelope
    error_type = source.get("type")
    message = source.get("message")
    return (
        error_type if isinstance(error_type, str) and error_type else None,
        message if isinstance(message, str) else None,
    )


def is_retryable(error_type: str | None) -> bool:
    """Whether an errored request may be resubmitted unchanged.

    Types outside §4.1's list may appear ("type values will grow over time", §6.1).
    An unknown `*_error` type is treated as transient: the store caps attempts, so the
    worst case is a few unbilled retries (errored requests are not billed, §5), while
    calling it permanent would fail work that a resubmission would finish. Anything not
    shaped like an error type, or a missing type, we cannot judge: not retryable.
    """
    if error_type is None or error_type in _CLIENT_ERROR_TYPES:
        return False
    return error_type in _TRANSIENT_ERROR_TYPES or error_type.endswith("_error")
