"""Pending rows ─► one create-batch request body within the count and byte limits.

The body is spliced from the stored params text (validated, never re-serialised: 10x
faster than parse-and-dump) into a spooled temporary file, so a 256 MB body costs a few
MB of memory and its size is known exactly before it is sent.

Validation has two paths. The common one decodes the params once into a typed struct
(msgspec: the messages are only scanned, never built as Python objects) and accepts a
request only if every check passes. Anything it does not accept, for whatever reason,
goes through the general path (orjson and explicit checks), which is the definition of
valid and names the reason; so a request is refused exactly when, and for exactly the
reason that, the general path says.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Annotated

import msgspec
import orjson

from batchd.api.wire import CUSTOM_ID_PATTERN
from batchd.domain import PendingTask

_BODY_HEAD = b'{"requests":['
_BODY_TAIL = b"]}"
_SEPARATOR = b","
# Bodies up to this size stay in memory; larger ones spill to a temporary file.
_SPOOL_IN_MEMORY_BYTES = 8 * 1024 * 1024
_READ_CHUNK_BYTES = 1 << 20
# Keys the Batches API rejects inside params (spec §3.2), as errored lines a day later:
# refusing them here saves the wait.
_UNSUPPORTED_PARAMS = ("speed", "store", "previous_thread_event_id", "cache_hint", "context_hint")
# The body is written to its file in pieces of about this size, a few hundred requests
# each: one write per request cost ~3 µs each through SpooledTemporaryFile, and pieces of
# 1 MB held ~2 MB more while building (bench/memory.py).
_FLUSH_BYTES = 256 * 1024
# Within orjson's integer range (it reads larger numbers as floats, refused as max_tokens),
# so the typed path never accepts what the general path refuses; msgspec bounds stop at
# int64, so the rare number above that goes the general way.
_OrjsonInt = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Request(msgspec.Struct, gc=False):
    """The params fields the checks read; unknown keys are allowed, as the API allows them."""

    model: str
    messages: list[msgspec.Raw]
    max_tokens: _OrjsonInt
    # Present at all (even null) is refused by the general path: UNSET means absent.
    stream: object = msgspec.UNSET
    speed: object = msgspec.UNSET
    store: object = msgspec.UNSET
    previous_thread_event_id: object = msgspec.UNSET
    cache_hint: object = msgspec.UNSET
    context_hint: object = msgspec.UNSET


_REQUEST = msgspec.json.Decoder(_Request)


class SpooledBody:
    """A request body of known size, readable as chunks any number of times."""

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY_BYTES)  # noqa: SIM115
        self.size = 0

    def write(self, piece: bytes) -> None:
        self._file.write(piece)
        self.size += len(piece)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        self._file.seek(0)
        while piece := self._file.read(_READ_CHUNK_BYTES):
            yield piece

    def read_all(self) -> bytes:
        """For tests and small bodies only."""
        self._file.seek(0)
        return self._file.read()

    def close(self) -> None:
        self._file.close()


@dataclass(slots=True)
class Chunk:
    """The tasks chosen for one batch, in body order, and the rows found invalid on the way."""

    task_ids: list[int] = field(default_factory=list)
    custom_ids: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)  # each task's row as read (the claim's)
    invalid: list[tuple[int, str]] = field(default_factory=list)
    invalid_versions: list[str] = field(default_factory=list)  # each as read: marked only so
    body: SpooledBody = field(default_factory=SpooledBody)
    full: bool = False  # a limit was reached: send now, no linger

    def __len__(self) -> int:
        return len(self.task_ids)


def validate_task(task: PendingTask) -> str | None:
    """Why the API would refuse this request, or None. Catches what costs a round trip."""
    if task.unreadable is not None:
        return task.unreadable
    if not CUSTOM_ID_PATTERN.fullmatch(task.custom_id):
        return (
            f"custom_id {task.custom_id[:80]!r} must be 1-64 characters of letters, "
            "digits, '-' and '_'"
        )
    if _plainly_valid(task.params):
        return None
    return _params_problem(task.params)


def _plainly_valid(params: str) -> bool:
    """The typed path: True only if every check of `_validate_params` would pass."""
    try:
        request = _REQUEST.decode(params)
    except (msgspec.DecodeError, RecursionError):
        return False  # the general path says why (or, for a shape it allows, that it is fine)
    return (
        bool(request.model)
        and bool(request.messages)
        and request.max_tokens >= 1
        and request.stream is msgspec.UNSET
        and request.speed is msgspec.UNSET
        and request.store is msgspec.UNSET
        and request.previous_thread_event_id is msgspec.UNSET
        and request.cache_hint is msgspec.UNSET
        and request.context_hint is msgspec.UNSET
    )


def _params_problem(text: str) -> str | None:
    """The general path: the definition of valid params, with the reason when they are not."""
    try:
        params = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return f"params is not valid JSON: {exc}"
    if not isinstance(params, dict):
        return f"params must be a JSON object, got {type(params).__name__}"
    return _validate_params(params)


def _validate_params(params: dict[str, object]) -> str | None:
    model = params.get("model")
    if not isinstance(model, str) or not model:
        return "params.model is required (a model name string)"
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        return "params.messages is required (a non-empty list)"
    max_tokens = params.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        return "params.max_tokens is required (a whole number >= 1)"
    if params.get("stream") is True:
        return "params.stream=true is not supported by the Message Batches API"
    for key in _UNSUPPORTED_PARAMS:
        if key in params:
            return f"params.{key} is not supported by the Message Batches API"
    return None


def encode_request(task: PendingTask) -> bytes:
    """One element of `requests`, spliced from the stored (already validated) params text."""
    return b"".join(
        (b'{"custom_id":', orjson.dumps(task.custom_id), b',"params":', task.params.encode(), b"}")
    )


def _encode_valid(task: PendingTask) -> bytes:
    """`encode_request` for a task whose custom_id passed the pattern: letters, digits,
    '-' and '_' need no JSON escaping, so it is quoted as is."""
    return b'{"custom_id":"%b","params":%b}' % (task.custom_id.encode(), task.params.encode())


async def build_chunk(
    pending: AsyncIterator[PendingTask], *, max_requests: int, max_bytes: int
) -> Chunk:
    """Fill one body from the oldest pending tasks until a limit would be passed.

    The caller owns `pending` and closes it: a task that did not fit is simply left
    pending for the next chunk.
    """
    chunk = Chunk()
    try:
        await _fill(chunk, pending, max_requests=max_requests, max_bytes=max_bytes)
    except BaseException:
        # A store error or a stop while reading: the body (a temp file past a few MB) is
        # nobody's to close but ours.
        chunk.body.close()
        raise
    return chunk


async def _fill(
    chunk: Chunk, pending: AsyncIterator[PendingTask], *, max_requests: int, max_bytes: int
) -> None:
    chunk.body.write(_BODY_HEAD)
    envelope = len(_BODY_HEAD) + len(_BODY_TAIL)
    size = len(_BODY_HEAD)  # the body so far: written, plus what waits in `unwritten`
    unwritten: list[bytes] = []  # separators and items, written _FLUSH_BYTES at a time
    unwritten_bytes = 0
    async for task in pending:
        reason = validate_task(task)
        item = b"" if reason else _encode_valid(task)
        if reason is None and envelope + len(item) > max_bytes:
            reason = (
                f"request is {len(item)} bytes; a batch body may hold at most {max_bytes} "
                "bytes ([batching] max_bytes)"
            )
        if reason is not None:
            chunk.invalid.append((task.id, reason))
            chunk.invalid_versions.append(task.version)
            continue
        separator = _SEPARATOR if chunk.task_ids else b""
        added = len(separator) + len(item)
        if size + added + len(_BODY_TAIL) > max_bytes:
            chunk.full = True
            break
        unwritten.append(separator)
        unwritten.append(item)
        size += added
        unwritten_bytes += added
        if unwritten_bytes >= _FLUSH_BYTES:
            chunk.body.write(b"".join(unwritten))
            unwritten.clear()
            unwritten_bytes = 0
        chunk.task_ids.append(task.id)
        chunk.custom_ids.append(task.custom_id)
        chunk.versions.append(task.version)
        if len(chunk.task_ids) >= max_requests:
            chunk.full = True
            break
    chunk.body.write(b"".join(unwritten))
    chunk.body.write(_BODY_TAIL)
    assert chunk.body.size == size + len(_BODY_TAIL)
