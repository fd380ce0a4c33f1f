"""Failures at start as operators meet them: the real `python -m batchd` process, one JSON
log line, one human line on stderr, no traceback (unless --debug), a documented exit code."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from batchd.config import DatabaseConfig
from batchd.service.exits import EXIT_CONFIG, EXIT_TEMPFAIL, EXIT_USAGE, NOT_RESTARTABLE
from batchd.store import open_store
from tests.support.cli import batchd

# Nothing listens there: these failures all happen before the first API call.
DEAD_API = "http://127.0.0.1:9"


def environment(config: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BATCHD_CONFIG": str(config),
        "ANTHROPIC_API_KEY": "sk-test-secret-key",
        "ANTHROPIC_BASE_URL": DEAD_API,
    }


def write_config(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "batchd.toml"
    config.write_text(text)
    return config


def log_events(stream: bytes) -> list[dict[str, object]]:
    """Every line must be one JSON object: `journalctl -o cat | jq` reads them all."""
    return [orjson.loads(line) for line in stream.splitlines() if line.strip()]


def assert_reported_once(
    result: subprocess.CompletedProcess[bytes],
    *,
    code: int,
    event: str,
    says: str,
    log_stream: str = "stdout",
) -> None:
    """Exit code, one JSON line with the event at level error, one human line, no traceback.

    `run` logs on stdout (the unit sends both streams to the journal), the others on stderr.
    """
    stdout, stderr = result.stdout, result.stderr
    assert result.returncode == code, stdout + stderr
    logs = (
        stdout
        if log_stream == "stdout"
        else b"\n".join(line for line in stderr.splitlines() if line.startswith(b"{"))
    )
    failures = [e for e in log_events(logs) if e["level"] == "error"]
    assert [e["event"] for e in failures] == [event]
    assert says in str(failures[0]["error"])
    assert failures[0]["exit_code"] == code
    human = [line for line in stderr.decode().splitlines() if not line.startswith("{")]
    assert len(human) == 1, stderr
    assert human[0].startswith("batchd: ")
    assert says in human[0]
    assert b"Traceback" not in stdout + stderr
    assert b"sk-test-secret-key" not in stdout + stderr


def test_a_database_in_a_directory_that_does_not_exist_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    database = tmp_path / "no-such-dir" / "batchd.db"
    config = write_config(tmp_path, f'[database]\npath = "{database}"\n')
    result = batchd("run", env=environment(config))
    assert_reported_once(
        result,
        code=EXIT_CONFIG,
        event="database_directory_missing",
        says=f"{database.parent} does not exist",
    )
    assert not database.parent.exists()  # nothing created on the way


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    database = tmp_path / "no-such-dir" / "batchd.db"
    config = write_config(tmp_path, f'[database]\npath = "{database}"\n')
    result = batchd("--debug", "status", env=environment(config))
    assert result.returncode == EXIT_CONFIG
    assert b"Traceback" in result.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process (here: this one) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_the_metrics_port_already_taken_is_temporary(tmp_path: Path, taken_port: int) -> None:
    config = write_config(
        tmp_path,
        f'[database]\npath = "{tmp_path / "b.db"}"\n'
        f"[metrics]\nenabled = true\nport = {taken_port}\n",
    )
    result = batchd("run", env=environment(config))
    assert_reported_once(
        result,
        code=EXIT_TEMPFAIL,
        event="metrics_listen_failed",
        says=f"cannot listen for metrics on 127.0.0.1:{taken_port}",
    )
    assert EXIT_TEMPFAIL not in NOT_RESTARTABLE  # the other process may let go of it


async def test_a_schema_newer_than_this_batchd_is_a_configuration_error(tmp_path: Path) -> None:
    database = tmp_path / "b.db"
    await (await open_store(DatabaseConfig(path=database))).close()
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 'from_the_future', 'now')")
    config = write_config(tmp_path, f'[database]\npath = "{database}"\n')
    result = batchd("run", env=environment(config))
    assert_reported_once(
        result, code=EXIT_CONFIG, event="schema_too_new", says="schema version 999 is newer"
    )
    # A read-only command reads a newer schema where it can (tests/test_readonly_commands.py)
    # and refuses only a read that needs what the newer version changed.
    with sqlite3.connect(database) as db:
        db.execute("ALTER TABLE missing_results RENAME COLUMN reason TO why")
    status = batchd("status", env=environment(config))
    assert_reported_once(
        status,
        code=EXIT_CONFIG,
        event="schema_too_new",
        says="schema version 999, newer than this batchd supports",
        log_stream="stderr",
    )


def test_retry_offers_only_final_statuses(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[database]\npath = "{tmp_path / "b.db"}"\n')
    result = batchd("retry", "--status", "submitted", env=environment(config))
    assert result.returncode == EXIT_USAGE
    assert b"invalid choice: 'submitted'" in result.stderr
    assert b"Traceback" not in result.stderr
    assert not (tmp_path / "b.db").exists()


def test_fake_api_refuses_a_port_out_of_range() -> None:
    result = batchd("fake-api", "--port", "99999", env=dict(os.environ))
    assert result.returncode == EXIT_USAGE
    assert b"--port must be between 0 and 65535, not 99999" in result.stderr
    assert b"Traceback" not in result.stderr


def test_status_count_without_watch_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[database]\npath = "{tmp_path / "b.db"}"\n')
    result = batchd("status", "--count", "3", env=environment(config))
    assert result.returncode == EXIT_USAGE
    assert b"--count and --interval need --watch" in result.stderr


def test_a_key_file_that_cannot_be_read_is_a_configuration_error(tmp_path: Path) -> None:
    key_file = tmp_path / "missing-key"
    config = write_config(
        tmp_path,
        f'[database]\npath = "{tmp_path / "b.db"}"\n[api]\napi_key_file = "{key_file}"\n',
    )
    result = batchd("run", env=environment(config))
    assert_reported_once(
        result, code=EXIT_CONFIG, event="api_key_unusable", says=f"cannot read {key_file}"
    )


def test_results_to_a_file_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[database]\npath = "{tmp_path / "b.db"}"\n')
    target = tmp_path / "nowhere" / "out.jsonl"
    assert batchd("migrate", env=environment(config)).returncode == 0  # results never creates
    result = batchd("results", "-o", str(target), env=environment(config))
    assert result.returncode == EXIT_USAGE
    assert f"cannot create {target}".encode() in result.stderr
    assert b"Traceback" not in result.stderr
