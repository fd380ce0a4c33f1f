"""Result lines of an ended batch, rendered lazily in ~1 MB chunks (spec §4).

The lines are derived from the compact per-request facts and the batch's seed, so a
second download returns the same lines in the same (shuffled, §4.3) order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import orjson

from batchd.api.wire import ErrorResponse, ResultLine
from batchd.fakeapi.state import FakeBatch, Timeline, new_id

CHUNK_BYTES = 1 << 20
# §4.1 [CAPTURE]: validation failures carry this undocumented `details` object.
USER_FACING: dict[str, object] = {"error_visibility": "user_facing"}


def shuffled_indices(batch: FakeBatch) -> list[int]:
    """§4.3: results are not in request order; a fake should shuffle them."""
    order = list(range(len(batch)))
    random.Random(batch.seed).shuffle(order)
    return order


def reply_text(user_text: str) -> str:
    """The fake's answer: contains the user's text verbatim, so a result written to
    the wrong task is visible to any test."""
    return f"Response to: {user_text}\n\n(This is a reply from the batchd fake API.)"


def message(batch: FakeBatch, index: int, message_id: str) -> dict[str, object]:
    """A succeeded `message` as the real API sends it (§4.2)."""
    requests = batch.requests
    text = reply_text(requests.texts[index])
    max_tokens = max(requests.max_tokens[index], 1)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": requests.models[index],
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": max(requests.input_bytes[index] // 4, 1),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": min(max(len(text) // 4, 1), max_tokens),
            "service_tier": "batch",
        },
    }


def errored_envelope(batch: FakeBatch, index: int) -> ErrorResponse:
    """§4.1: the doubly nested error; request_id null for validation failures."""
    validation = batch.requests.errors.get(index)
    if validation is not None:
        error_type, text = validation
        return {
            "type": "error",
            "error": {"details": USER_FACING, "type": error_type, "message": text},
            "request_id": None,
        }
    error_type, text, request_id = batch.injected_errors[index]
    return {
        "type": "error",
        "error": {"details": USER_FACING, "type": error_type, "message": text},
        "request_id": request_id,
    }


def result_lines(batch: FakeBatch, timeline: Timeline) -> Iterator[bytes]:
    """Each request's line (with its trailing newline), in the batch's shuffled order."""
    end_us, cutoff = batch.end_us(timeline)
    unfinished = "canceled" if cutoff == "canceled" else "expired"
    ids = random.Random(batch.seed ^ 0x5EED)
    custom_ids = batch.requests.custom_ids
    for index in shuffled_indices(batch):
        fate = batch.fates[index] if batch.finish_us[index] <= end_us else unfinished
        line: ResultLine
        if fate == "succeeded":
            line = {
                "custom_id": custom_ids[index],
                "result": {
                    "type": "succeeded",
                    "message": message(batch, index, new_id(ids, "msg_")),
                },
            }
        elif fate == "errored":
            line = {
                "custom_id": custom_ids[index],
                "result": {"type": "errored", "error": errored_envelope(batch, index)},
            }
        elif fate == "canceled":
            line = {"custom_id": custom_ids[index], "result": {"type": "canceled"}}
        else:
            line = {"custom_id": custom_ids[index], "result": {"type": "expired"}}
        yield orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


def result_chunks(
    batch: FakeBatch, timeline: Timeline, *, truncate: bool = False, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """The JSONL body in pieces of about `chunk_bytes`; never one giant string.

    With `truncate`, the body stops in the middle of the line at the halfway point
    (the caller then aborts the connection: a stream cut off midway).
    """
    stop_at = len(batch) // 2 if truncate else None
    buffer = bytearray()
    for count, line in enumerate(result_lines(batch, timeline)):
        if count == stop_at:
            buffer += line[: max(len(line) // 2, 1)]
            break
        buffer += line
        if len(buffer) >= chunk_bytes:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)
