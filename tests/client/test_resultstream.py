import random
import re
from collections.abc import AsyncIterator, Iterable

import pytest

from batchd.api.resultstream import LineSplitter, LineStreamError, LineTooLongError, iter_lines

_REFERENCE_EOL = re.compile(rb"\r\n|\r|\n")


def reference_lines(data: bytes) -> list[bytes]:
    """What the splitter must return for `data` as a whole, however it is chunked."""
    return [line for line in _REFERENCE_EOL.split(data) if line]


def split_all(chunks: Iterable[bytes], max_line_bytes: int = 1 << 30) -> list[bytes]:
    splitter = LineSplitter(max_line_bytes)
    lines: list[bytes] = []
    for chunk in chunks:
        lines.extend(splitter.feed(chunk))
    lines.extend(splitter.finish())
    return lines


def random_chunks(data: bytes, rng: random.Random, max_size: int) -> list[bytes]:
    chunks, position = [], 0
    while position < len(data):
        size = rng.randint(0, max_size)  # 0 included: empty chunks must be harmless
        chunks.append(data[position : position + size])
        position += size
    return chunks


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a\nb\n", [b"a", b"b"]),
        (b"a\r\nb\r\n", [b"a", b"b"]),
        (b"a\rb\r", [b"a", b"b"]),
        (b"a\r\nb\rc\nd", [b"a", b"b", b"c", b"d"]),
        (b"last line without newline", [b"last line without newline"]),
        (b"\n\n a \n\r\n\r\rb\n\n", [b" a ", b"b"]),
        (b"", []),
    ],
)
def test_terminators_blank_lines_and_unterminated_last_line(
    data: bytes, expected: list[bytes]
) -> None:
    assert split_all([data]) == expected


def test_crlf_split_across_chunks_is_one_terminator() -> None:
    assert split_all([b"a\r", b"\nb\r", b"\n", b"c"]) == [b"a", b"b", b"c"]


def test_cr_at_chunk_end_followed_by_text_ends_the_line() -> None:
    assert split_all([b"a\r", b"b\r", b"", b"c"]) == [b"a", b"b", b"c"]


def test_byte_at_a_time_matches_whole_feed() -> None:
    data = b'{"a":1}\r\n{"b":2}\r{"c":3}\n\n{"d":4}'
    assert split_all([data[i : i + 1] for i in range(len(data))]) == reference_lines(data)


def test_random_mixed_terminators_at_random_boundaries_match_reference() -> None:
    rng = random.Random(7)
    for _ in range(200):
        data = bytes(rng.choice(b"ab\r\n") for _ in range(rng.randint(0, 300)))
        assert split_all(random_chunks(data, rng, 17)) == reference_lines(data), data


def test_100k_small_lines_at_awkward_boundaries() -> None:
    lines = [b'{"custom_id":"t-%d","result":{"type":"succeeded"}}' % n for n in range(100_000)]
    data = b"\r\n".join(lines)  # CRLF everywhere, and no trailing terminator
    rng = random.Random(3)
    assert split_all(random_chunks(data, rng, 70_000)) == lines


def test_3mb_single_line_across_1mib_chunks() -> None:
    line = b"x" * (3 * 1024 * 1024)
    data = b"first\n" + line + b"\r\nlast"
    chunks = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    assert split_all(chunks, max_line_bytes=4 * 1024 * 1024) == [b"first", line, b"last"]


def test_line_of_exactly_the_cap_is_accepted() -> None:
    assert split_all([b"abc\n0123456789\n", b"xyz"], max_line_bytes=10) == [
        b"abc",
        b"0123456789",
        b"xyz",
    ]


def test_line_over_the_cap_names_its_start_offset() -> None:
    splitter = LineSplitter(10)
    with pytest.raises(LineTooLongError) as caught:
        splitter.feed(b"ok\r\n" + b"y" * 11 + b"\n")
    assert caught.value.offset == 4
    assert isinstance(caught.value, LineStreamError)
    assert "offset 4" in str(caught.value)


def test_line_growing_over_the_cap_across_chunks_raises_before_its_end() -> None:
    splitter = LineSplitter(10)
    assert splitter.feed(b"ok\r") == [b"ok"]
    assert splitter.feed(b"\nabcdef") == []
    with pytest.raises(LineTooLongError) as caught:
        splitter.feed(b"ghijk")  # no terminator yet: refused without buffering further
    assert caught.value.offset == 4


def test_unterminated_last_line_over_the_cap_raises() -> None:
    with pytest.raises(LineTooLongError) as caught:
        split_all([b"a\n", b"b" * 6, b"b" * 6], max_line_bytes=10)
    assert caught.value.offset == 2


def test_offset_counts_every_byte_fed() -> None:
    splitter = LineSplitter(100)
    splitter.feed(b"ab\r")
    splitter.feed(b"\ncd")
    assert splitter.offset == 6


def test_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        LineSplitter(0)


async def test_iter_lines_over_an_async_stream() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for piece in (b"a\r", b"\nb", b"b\n", b"c"):
            yield piece

    assert [line async for line in iter_lines(chunks(), 10)] == [b"a", b"bb", b"c"]


async def test_iter_lines_raises_past_the_cap() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"short\n" + b"z" * 20

    with pytest.raises(LineTooLongError):
        [line async for line in iter_lines(chunks(), 10)]
