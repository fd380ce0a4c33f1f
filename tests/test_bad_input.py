"""Bad input: unusable rows end `invalid` with the reason while the rest is served; a bad
config, an unwritable, full or too-new database is refused with a message naming it; a
user's INSERT never waits on the daemon longer than the busy timeout."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

import batchd.store.sqlite.staging
from batchd.config import Config
from batchd.fakeapi.server import FakeApiServer
from batchd.service.daemon import Daemon, run_daemon
from batchd.store import Store
from batchd.store.sqlite import SqliteStore
from tests.support.params import request_params

BATCHD = [sys.executable, "-m", "batchd"]
MAX_BYTES = 20_000


def params(**fields: object) -> str:
    return orjson.dumps(fields).decode()


MESSAGES = [{"role": "user", "content": "hello"}]
MODEL = "claude-haiku-4-5-20251001"
# custom_id -> (params, a phrase the error must contain)
BAD_ROWS: dict[str, tuple[str, str]] = {
    "not-json": ("{oops", "not valid JSON"),
    "empty-params": ("", "not valid JSON"),
    "not-object-list": ("[1, 2]", "must be a JSON object"),
    "not-object-string": ('"hello"', "must be a JSON object"),
    "json-null": ("null", "must be a JSON object"),
    "no-model": (params(max_tokens=5, messages=MESSAGES), "params.model"),
    "model-not-string": (params(model=5, max_tokens=5, messages=MESSAGES), "params.model"),
    "no-messages": (params(model=MODEL, max_tokens=5), "params.messages"),
    "empty-messages": (params(model=MODEL, max_tokens=5, messages=[]), "params.messages"),
    "no-max-tokens": (params(model=MODEL, messages=MESSAGES), "params.max_tokens"),
    "max-tokens-zero": (params(model=MODEL, max_tokens=0, messages=MESSAGES), "max_tokens"),
    "max-tokens-bool": (params(model=MODEL, max_tokens=True, messages=MESSAGES), "max_tokens"),
    "max-tokens-text": (params(model=MODEL, max_tokens="5", messages=MESSAGES), "max_tokens"),
    "streaming": (request_params("s", stream=True), "stream"),
    "too-large": (request_params("y" * (MAX_BYTES + 100)), "at most 20000 bytes"),
    "x" * 65: (request_params("long id"), "1-64 characters"),
    "bad id": (request_params("space"), "1-64 characters"),
    "dotted.id": (request_params("dot"), "1-64 characters"),
    "ünïcode": (request_params("unicode"), "1-64 characters"),
    "": (request_params("empty id"), "1-64 characters"),
}


def rows(db_path: Path) -> dict[str, tuple[str, str | None, int]]:
    with sqlite3.connect(db_path) as db:
        found = db.execute("SELECT custom_id, status, error, attempts FROM tasks").fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in found}


async def test_every_kind_of_bad_row_is_invalid_with_its_reason_and_the_rest_are_served(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    good = [f"good-{n}" for n in range(6)]
    await store.enqueue((cid, request_params(f"good question {cid}")) for cid in good)
    with sqlite3.connect(db_path) as db:  # users' own INSERTs, bypassing every check
        db.executemany(
            "INSERT INTO tasks (custom_id, params) VALUES (?, ?)",
            [(cid, text) for cid, (text, _) in BAD_ROWS.items()],
        )
    await store.enqueue((f"late-{n}", request_params(f"late {n}")) for n in range(3))
    await store.close()

    config = daemon_config(fake_api.base_url, max_bytes=MAX_BYTES)
    assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30) == 0

    found = rows(db_path)
    for cid, (_, phrase) in BAD_ROWS.items():
        status, error, attempts = found[cid]
        assert (status, attempts) == ("invalid", 0), cid
        assert error is not None
        assert phrase in error, (cid, error)
    served = good + [f"late-{n}" for n in range(3)]
    assert {found[cid][0] for cid in served} == {"succeeded"}
    assert set(fake_api.state.stats.submissions) == set(served)  # nothing bad was sent
    print(f"\nbad rows tried: {len(BAD_ROWS)}")


async def test_rows_that_are_not_text_are_invalid_and_do_not_stop_submission(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    good = [f"good-{n}" for n in range(3)]
    await store.enqueue((cid, request_params(f"good question {cid}")) for cid in good)
    json_bytes = request_params("sent as bytes").encode()
    latin1 = request_params("caf\u00e9").encode().replace("é".encode(), b"\xe9")
    # What a user's own INSERT can store: bytes bound as a BLOB, or text that is not UTF-8
    # (sqlite3 refuses to decode such a row; the whole page of pending rows with it).
    unreadable: list[tuple[object, object, str]] = [
        ("params-blob", json_bytes, "params is stored as a BLOB"),
        (b"id-blob", request_params("id blob"), "custom_id is stored as a BLOB"),
        ("params-latin1", latin1, "params is not valid UTF-8"),
        (b"id-\xff", request_params("id latin1"), "custom_id is not valid UTF-8"),
    ]
    with sqlite3.connect(db_path) as db:
        for custom_id, task_params, _ in unreadable:
            text_id = "CAST(? AS TEXT)" if custom_id == b"id-\xff" else "?"
            text_params = "CAST(? AS TEXT)" if task_params is latin1 else "?"
            db.execute(
                f"INSERT INTO tasks (custom_id, params) VALUES ({text_id}, {text_params})",
                (custom_id, task_params),
            )
    db.close()
    await store.close()

    config = daemon_config(fake_api.base_url)
    assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30) == 0

    with sqlite3.connect(db_path) as db:
        found = {
            raw.decode(errors="replace"): (status, error, attempts)
            for raw, status, error, attempts in db.execute(
                "SELECT CAST(custom_id AS BLOB), status, error, attempts FROM tasks"
            )
        }
    db.close()
    for custom_id, _, phrase in unreadable:
        name = custom_id.decode(errors="replace") if isinstance(custom_id, bytes) else custom_id
        status, error, attempts = found[str(name)]
        assert (status, attempts) == ("invalid", 0), name
        assert phrase in error, (name, error)
    assert {found[cid][0] for cid in good} == {"succeeded"}
    assert set(fake_api.state.stats.submissions) == set(good)


def test_a_duplicate_custom_id_fails_the_users_insert_and_enqueue_reports_it(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "dup.db"
    config = tmp_path / "batchd.toml"
    config.write_text(f'[database]\npath = "{db_path}"\n')
    env = {**os.environ, "BATCHD_CONFIG": str(config)}
    line = orjson.dumps({"custom_id": "same", "params": orjson.loads(request_params("q"))})
    first = subprocess.run(
        [*BATCHD, "enqueue", "-"], input=line + b"\n", env=env, capture_output=True, check=False
    )
    assert first.returncode == 0, first.stderr
    with sqlite3.connect(db_path) as db, pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        db.execute("INSERT INTO tasks (custom_id, params) VALUES ('same', '{}')")
    again = subprocess.run(
        [*BATCHD, "enqueue", "-"], input=line + b"\n", env=env, capture_output=True, check=False
    )
    assert "1 duplicate custom_id(s) skipped (first: same)" in again.stdout.decode()
    assert rows(db_path)["same"][0] == "pending"


@pytest.mark.parametrize(
    ("toml", "phrase"),
    [
        ("[batching\nmax_requests = 5\n", "is not valid TOML"),
        ('[batching]\nmax_requests = "many"\n', "[batching] max_requests: expected a whole number"),
        ("[polling]\ninterval_seconds = -1\n", "[polling] interval_seconds: must be > 0"),
        ("[batching]\nmax_request = 5\n", "[batching] max_request: unknown key"),
    ],
)
def test_a_corrupted_config_stops_run_at_start_naming_the_problem(
    toml: str, phrase: str, tmp_path: Path
) -> None:
    config = tmp_path / "batchd.toml"
    config.write_text(toml)
    run = subprocess.run(
        [*BATCHD, "--config", str(config), "run"],
        env={**os.environ, "ANTHROPIC_API_KEY": "k"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 78  # EX_CONFIG
    assert phrase in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "batchd.db").exists()


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BATCHD, "--config", str(config), *args],
        env={**os.environ, "ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_database_of_a_newer_schema_is_refused_at_start_and_left_alone(
    store: Store, db_path: Path, tmp_path: Path
) -> None:
    await store.close()
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 'from_the_future', 'now')")
    config = tmp_path / "batchd.toml"
    config.write_text(f'[database]\npath = "{db_path}"\n')
    before = dump(db_path)
    run = run_cli(config, "run")
    assert run.returncode == 78  # EX_CONFIG: a restart cannot fix it
    assert str(db_path) in run.stderr
    assert "schema version 999 is newer than this batchd supports" in run.stderr
    assert dump(db_path) == before  # never altered


def dump(db_path: Path) -> list[str]:
    with sqlite3.connect(db_path) as db:
        return list(db.iterdump())


# Root ignores file modes: the daemon runs as nobody, importing first what it needs.
_AS_NOBODY = """
import asyncio, os, sys
import batchd.cli.main
# The commands import the daemon on first use; this interpreter's packages are root's.
import batchd.cli.runprogress, batchd.service.daemon
asyncio.new_event_loop().close()
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(batchd.cli.main.main(sys.argv[1:]))
"""


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="batchd-bad-"))
    directory.chmod(0o755)
    yield directory
    directory.chmod(0o755)
    shutil.rmtree(directory)


async def test_a_read_only_database_stops_run_at_start_naming_the_path(
    world_readable_dir: Path,
) -> None:
    path = world_readable_dir / "batchd.db"
    await (await SqliteStore.open(path)).close()
    config = world_readable_dir / "batchd.toml"
    config.write_text(f'[database]\npath = "{path}"\n')
    path.chmod(0o444)
    world_readable_dir.chmod(0o555)
    run = subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, "--config", str(config), "run"],
        env={**os.environ, "ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 78, run.stdout + run.stderr
    assert f"database {path}" in run.stderr
    assert "readonly database" in run.stderr
    assert "write the file and its directory" in run.stderr


async def test_a_full_database_pauses_the_write_back_and_the_daemon_catches_up_after(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    # Results echo the prompt: 40 answers of 4 KB need new pages, which the cap refuses.
    await store.enqueue((f"t-{n}", request_params(f"{n} " + "z" * 4000)) for n in range(40))
    await store.close()

    async def writers(daemon: Daemon) -> list[Any]:
        # The cap is a connection's: every connection that writes (the write-back lanes too).
        lanes = await daemon._store.lanes.opened()  # type: ignore[attr-defined]
        return [daemon._store.database.writer, *(lane.connection.db for lane in lanes._queue)]  # type: ignore[attr-defined]

    capped: list[Any] = []

    async def cap_the_file(daemon: Daemon) -> None:
        capped.extend(await writers(daemon))
        for writer in capped:  # a page cap is how SQLite fills a disk
            pages = next(iter(await writer.execute_fetchall("PRAGMA page_count")))[0]
            await writer.execute_fetchall(f"PRAGMA max_page_count = {pages + 2}")

    config = daemon_config(fake_api.base_url, max_requests=40)
    running = asyncio.create_task(
        run_daemon(config, "k", exit_when_idle=True, on_started=cap_the_file)
    )
    deadline = time.monotonic() + 20
    while not _batch_in(db_path, "ended"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    assert _batch_in(db_path, "ended")  # the write-back keeps failing: disk full
    assert not running.done()  # ...and the daemon keeps running
    for writer in capped:
        await writer.execute_fetchall("PRAGMA max_page_count = 1073741823")  # space freed

    assert await asyncio.wait_for(running, 20) == 0
    assert {status for status, _, _ in rows(db_path).values()} == {"succeeded"}


async def test_a_full_staging_file_fails_the_download_which_is_retried(
    store: Store,
    fake_api: FakeApiServer,
    daemon_config: Callable[..., Config],
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await store.enqueue((f"t-{n}", request_params(f"{n} " + "z" * 4000)) for n in range(40))
    await store.close()
    attach = batchd.store.sqlite.staging.attach_staging
    attached: list[bool] = []

    def disk_full(logs: list[Any]) -> list[Any]:
        return [e for e in logs if e["event"] == "step_failed" and "full" in e["error"]]

    async def attach_while_the_disk_is_full(db: Any) -> None:
        # The temporary directory is full until the first download has failed for it (a
        # page cap is how SQLite fills a disk); the next staging files have room again.
        await attach(db)
        full = not disk_full(logs)
        attached.append(full)
        if full:
            await db.execute_fetchall("PRAGMA staging.max_page_count = 1")

    monkeypatch.setattr(
        batchd.store.sqlite.staging, "attach_staging", attach_while_the_disk_is_full
    )
    config = daemon_config(fake_api.base_url, max_requests=40)
    with capture_logs() as logs:
        code = await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 30)
    assert code == 0
    assert len(disk_full(logs)) == 1, [e["event"] for e in logs]
    assert attached.count(False) >= 1  # staged again on a file with room
    assert {status for status, _, _ in rows(db_path).values()} == {"succeeded"}


def _batch_in(db_path: Path, state: str) -> bool:
    with sqlite3.connect(db_path) as db:
        return bool(db.execute("SELECT 1 FROM batches WHERE state = ?", (state,)).fetchone())


async def test_a_users_insert_never_waits_longer_than_the_busy_timeout_during_write_back(
    store: Store, fake_api: FakeApiServer, daemon_config: Callable[..., Config], db_path: Path
) -> None:
    busy_timeout_s = 5.0
    await store.enqueue((f"big-{n}", request_params(f"question {n}")) for n in range(10_000))
    await store.close()
    waits: list[float] = []
    stop = threading.Event()

    def user_inserts() -> None:
        with sqlite3.connect(db_path, timeout=busy_timeout_s, isolation_level=None) as db:
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                db.execute(
                    "INSERT INTO tasks (custom_id, params, status) VALUES (?, ?, 'canceled')",
                    (f"user-{n}", request_params("x")),
                )
                waits.append(time.monotonic() - started)
                n += 1
                time.sleep(0.005)

    inserter = threading.Thread(target=user_inserts)
    inserter.start()
    try:
        config = daemon_config(fake_api.base_url)  # 10,000 per batch, 5,000-line chunks
        assert await asyncio.wait_for(run_daemon(config, "k", exit_when_idle=True), 60) == 0
    finally:
        stop.set()
        await asyncio.to_thread(inserter.join)
    found = rows(db_path)
    assert sum(status == "succeeded" for status, _, _ in found.values()) == 10_000
    assert len(waits) > 50
    print(f"\nuser INSERTs: {len(waits)}, longest wait {max(waits) * 1000:.0f} ms")
    assert max(waits) < busy_timeout_s
