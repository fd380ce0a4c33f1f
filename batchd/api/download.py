"""Reading a results download: the body of an open results response, as result lines.

The framing is `resultstream.LineSplitter`'s (no I/O there); this module adds the
network side: chunked reads (never `readline()`, spec §8.5), the stall guard, network
faults and unframeable lines raised as `ResultsStreamError`, and a last line cut short
dropped rather than taken for a whole one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import aiohttp
import structlog

from batchd.api.errors import ResultsStreamError
from batchd.api.resultstream import LineSplitter, LineTooLongError, is_cut_off

log = structlog.get_logger("batchd.api.download")

_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class StallLimit:
    """A download that brings fewer than `min_bytes` in `window_s` seconds spent waiting
    for them is stuck.

    `sock_read` only catches total silence: a trickle resets it at every byte. Time the
    consumer spends away from the stream is not counted.
    """

    window_s: float
    min_bytes: int


async def result_lines(
    response: aiohttp.ClientResponse,
    *,
    url: str,
    batch_id: str,
    max_line_bytes: int,
    stall: StallLimit,
    describe: Callable[[BaseException], str],
) -> AsyncGenerator[bytes, None]:
    """The non-blank lines of `response`'s body, without terminators.

    `describe` words a network fault for the error message (the client's, which redacts).
    """
    # Never readline(): it caps line length at the reader's high-water mark (§8.5).
    splitter = LineSplitter(max_line_bytes)
    chunks = response.content.iter_chunked(_CHUNK_BYTES)
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
            if window_waited_s >= stall.window_s:
                if chunk and window_bytes < stall.min_bytes:
                    reason = (
                        f"stalled: {window_bytes} bytes in the last "
                        f"{stall.window_s:g} s spent waiting for the network"
                    )
                    raise ResultsStreamError(batch_id, url, splitter.offset, reason)
                window_waited_s, window_bytes = 0.0, 0
            lines = splitter.feed(chunk) if chunk else _last_lines(splitter, batch_id)
        except LineTooLongError as exc:
            raise ResultsStreamError(batch_id, url, exc.offset, str(exc)) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ResultsStreamError(batch_id, url, splitter.offset, describe(exc)) from exc
        for line in lines:
            yield line
        if not chunk:
            return


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
