from collections.abc import AsyncIterator, Iterator

import orjson
import pytest

from batchd.domain import PendingTask
from batchd.pipeline import chunker
from batchd.pipeline.chunker import Chunk, encode_request, validate_task


def params(text: str = "hello", **extra: object) -> str:
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }
    return orjson.dumps(body).decode()


def task(
    n: int, text: str = "hello", custom_id: str | None = None, raw: str | None = None
) -> PendingTask:
    return PendingTask(n, custom_id or f"t-{n}", raw if raw is not None else params(text), 0)


async def feed(tasks: list[PendingTask]) -> AsyncIterator[PendingTask]:
    for t in tasks:
        yield t


@pytest.fixture(autouse=True)
def close_bodies(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every chunk's spooled body is closed after the test (filterwarnings=error)."""
    built: list[Chunk] = []
    original = chunker.build_chunk

    async def tracking(*args: object, **kwargs: object) -> Chunk:
        chunk = await original(*args, **kwargs)  # type: ignore[arg-type]
        built.append(chunk)
        return chunk

    monkeypatch.setattr(chunker, "build_chunk", tracking)
    yield
    for chunk in built:
        chunk.body.close()


async def test_body_is_valid_json_with_the_params_verbatim_and_size_exact() -> None:
    tasks = [task(i, f"prompt {i}") for i in range(1, 6)]
    chunk = await chunker.build_chunk(feed(tasks), max_requests=100, max_bytes=1_000_000)
    body = chunk.body.read_all()
    assert len(body) == chunk.body.size
    decoded = orjson.loads(body)
    assert [r["custom_id"] for r in decoded["requests"]] == [t.custom_id for t in tasks]
    assert decoded["requests"][2]["params"] == orjson.loads(tasks[2].params)
    assert chunk.task_ids == [1, 2, 3, 4, 5]
    assert not chunk.full


async def test_count_limit_fills_exactly_and_marks_full() -> None:
    chunk = await chunker.build_chunk(
        feed([task(i) for i in range(1, 11)]), max_requests=4, max_bytes=1_000_000
    )
    assert chunk.task_ids == [1, 2, 3, 4]
    assert chunk.full


async def test_byte_limit_is_never_passed_and_is_reached_as_closely_as_items_allow() -> None:
    tasks = [task(i, "x" * 1000) for i in range(1, 50)]
    item = len(encode_request(tasks[0]))
    max_bytes = 13 + 3 * item + 2 + 2 - 1  # head + 3 items + 2 separators + tail, one short
    chunk = await chunker.build_chunk(feed(tasks), max_requests=100, max_bytes=max_bytes)
    assert chunk.body.size <= max_bytes
    assert len(chunk) == 2
    assert chunk.full
    roomy = await chunker.build_chunk(feed(tasks), max_requests=100, max_bytes=max_bytes + 1)
    assert len(roomy) == 3
    assert roomy.body.size == max_bytes + 1


async def test_a_request_too_big_for_any_batch_is_invalid_and_the_rest_go_on() -> None:
    tasks = [task(1), task(2, "y" * 5000), task(3)]
    chunk = await chunker.build_chunk(feed(tasks), max_requests=10, max_bytes=2048)
    assert chunk.task_ids == [1, 3]
    assert chunk.invalid[0][0] == 2
    assert "at most 2048 bytes" in chunk.invalid[0][1]


@pytest.mark.parametrize(
    ("raw", "custom_id", "reason"),
    [
        ("{not json", "ok", "not valid JSON"),
        ("[1, 2]", "ok", "must be a JSON object"),
        ('{"max_tokens": 5, "messages": [{"role":"user","content":"x"}]}', "ok", "params.model"),
        ('{"model": "m", "max_tokens": 5}', "ok", "params.messages"),
        ('{"model": "m", "messages": [{"role":"user","content":"x"}]}', "ok", "params.max_tokens"),
        (
            '{"model": "m", "max_tokens": 0, "messages": [{"role":"user","content":"x"}]}',
            "ok",
            "params.max_tokens",
        ),
        ('{"model": "m", "max_tokens": 5, "stream": true, "messages": [1]}', "ok", "stream"),
        (params(), "has space", "custom_id"),
        (params(), "x" * 65, "custom_id"),
        (params(), "trailing-newline\n", "custom_id"),
    ],
)
def test_validation_names_the_problem(raw: str, custom_id: str, reason: str) -> None:
    problem = validate_task(PendingTask(1, custom_id, raw, 0))
    assert problem is not None
    assert reason in problem


def test_a_good_task_is_valid() -> None:
    assert validate_task(task(1)) is None


async def test_large_body_spills_to_disk_and_reads_back_in_chunks() -> None:
    tasks = [task(i, "z" * 10_000) for i in range(1, 2001)]  # ~20 MB
    chunk = await chunker.build_chunk(feed(tasks), max_requests=100_000, max_bytes=256_000_000)
    received = b"".join([piece async for piece in chunk.body.iter_chunks()])
    assert len(received) == chunk.body.size
    assert len(orjson.loads(received)["requests"]) == 2000


_MESSAGES = '"messages": [{"role": "user", "content": "x"}]'


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        # Shapes the typed path does not take: the general path still decides, the same way.
        (f'{{"model": "m", "max_tokens": 5, "stream": false, {_MESSAGES}}}', None),
        (f'{{"model": "m", "max_tokens": 5, "stream": null, {_MESSAGES}}}', None),
        (f'{{"model": "m", "max_tokens": 5, "stream": "yes", {_MESSAGES}}}', None),
        (f'{{"model": "m", "max_tokens": 9223372036854775808, {_MESSAGES}}}', None),
        (f'{{"model": "m", "max_tokens": 18446744073709551616, {_MESSAGES}}}', "max_tokens"),
        (f'{{"model": "m", "max_tokens": 5.0, {_MESSAGES}}}', "params.max_tokens"),
        (f'{{"model": "m", "max_tokens": true, {_MESSAGES}}}', "params.max_tokens"),
        (f'{{"model": "m", "max_tokens": -3, {_MESSAGES}}}', "params.max_tokens"),
        (f'{{"model": "", "max_tokens": 5, {_MESSAGES}}}', "params.model"),
        (f'{{"model": 7, "max_tokens": 5, {_MESSAGES}}}', "params.model"),
        ('{"model": "m", "max_tokens": 5, "messages": []}', "params.messages"),
        ('{"model": "m", "max_tokens": 5, "messages": {"role": "user"}}', "params.messages"),
        (f'{{"model": "m", "max_tokens": 5, "store": null, {_MESSAGES}}}', "params.store"),
        (f'{{"model": "m", "max_tokens": 5, "cache_hint": 1, {_MESSAGES}}}', "params.cache_hint"),
        # Repeated keys: the last one counts, on both paths.
        (f'{{"model": "m", "max_tokens": 5, "max_tokens": 0, {_MESSAGES}}}', "params.max_tokens"),
        (f'{{"model": "m", "max_tokens": 0, "max_tokens": 5, {_MESSAGES}}}', None),
        # Nested deeper than orjson reads: not valid JSON, as before.
        (
            '{"model": "m", "max_tokens": 5, "messages": [' + "[" * 1100 + "]" * 1100 + "]}",
            "not valid JSON",
        ),
        (f'{{"model": "m", "max_tokens": 5, {_MESSAGES}}} trailing', "not valid JSON"),
        (f'{{"model": "m", "max_tokens": 5, "extra": {{"any": [1]}}, {_MESSAGES}}}', None),
    ],
)
def test_every_params_shape_gets_the_general_answer(raw: str, reason: str | None) -> None:
    """The typed path accepts only what the general checks accept, and every refusal
    carries the general path's reason."""
    problem = validate_task(PendingTask(1, "ok", raw, 0))
    assert problem == chunker._params_problem(raw)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None
        assert reason in problem


async def test_a_chunk_of_thousands_is_the_same_body_as_one_write_per_request() -> None:
    """The body is written in pieces of many requests: byte for byte what encode_request splices."""
    tasks = [task(i, "w" * (i % 700)) for i in range(1, 6001)]
    tasks[100] = task(101, raw="[1]")
    chunk = await chunker.build_chunk(feed(tasks), max_requests=100_000, max_bytes=256_000_000)
    body = chunk.body.read_all()
    valid = [t for t in tasks if t.id != 101]
    assert body == b'{"requests":[' + b",".join(map(encode_request, valid)) + b"]}"
    assert len(body) == chunk.body.size > 2 * chunker._FLUSH_BYTES
    assert chunk.invalid == [(101, "params must be a JSON object, got list")]
