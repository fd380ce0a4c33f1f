"""Review 7 finding 11: a one-shot command (status, results, enqueue...) that meets an
unreachable PostgreSQL exits at once with 75 and says what to check; it never claims to
be "retrying". The daemon waits such an outage out (service/outage.py says so itself), so
the error's own text makes no promise either way.

Real `python -m batchd` processes against a loopback port nobody listens on."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import asyncpg
import pytest

from batchd.service.exits import EXIT_TEMPFAIL
from batchd.store.postgres.connection import PostgresTarget, translate
from batchd.store.postgres.errors import PostgresUnavailableError
from tests.support.cli import batchd


def dead_port() -> int:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    "command",
    [
        ("status",),
        ("results", "--status", "succeeded"),
        ("enqueue", "-"),
        ("retry", "t-1"),
        ("cancel", "--all"),
    ],
    ids=lambda command: command[0],
)
def test_a_one_shot_command_on_an_unreachable_server_exits_75_without_saying_retrying(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    config = tmp_path / "batchd.toml"
    url = f"postgresql://batchd:secret-pw@127.0.0.1:{dead_port()}/batchd"
    config.write_text(f'[database]\nurl = "{url}"\n')
    env = {**os.environ, "BATCHD_CONFIG": str(config)}
    result = batchd(*command, env=env, stdin=b"", timeout=60)
    err = result.stderr.decode()
    assert result.returncode == EXIT_TEMPFAIL, err
    assert "is the server running and listening there?" in err
    assert "retrying" not in err + result.stdout.decode()
    assert "secret-pw" not in err


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError(),
        ConnectionRefusedError(111, "Connect call failed"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_no_unavailable_message_promises_a_retry(error: BaseException) -> None:
    target = PostgresTarget("postgresql://batchd@127.0.0.1:1/batchd", "public")
    mapped = translate(error, target, "connect to")
    assert isinstance(mapped, PostgresUnavailableError)
    assert mapped.retryable
    assert "retrying" not in str(mapped)
    assert str(mapped).startswith("cannot connect to PostgreSQL at ")
