"""Create bodies of known size, streamed so a 256 MB body never sits in memory whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class RequestBodySizeError(ValueError):
    """A `RequestBody` yielded more or fewer bytes than its `size`: a bug, not an API fault.

    The upload is aborted before the server has a complete request, so nothing was created.
    """


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


async def checked_chunks(body: RequestBody) -> AsyncIterator[bytes]:
    """The body's chunks; a size mismatch aborts the upload instead of hanging the server."""
    sent = 0
    async for chunk in body.iter_chunks():
        sent += len(chunk)
        if sent > body.size:
            break
        yield chunk
    if sent != body.size:
        raise RequestBodySizeError(f"request body yielded {sent} bytes, not its size {body.size}")
