"""Review 7 finding 7, end to end: `batchd run --exit-when-idle` with the API on a port
nobody listens on. Its first create is refused before a connection opens: the tasks are
released at once (no batch can exist, nothing is watched for), and once `batchd fake-api`
comes up on that port the daemon finishes and exits, instead of watching the intent for
`duplicate_watch_seconds` (10 minutes) as if the batch might have been created.

Real processes: `batchd enqueue`, `batchd run`, `batchd fake-api`; on both stores."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from batchd.config import DatabaseConfig
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.cli import BATCHD, batchd
from tests.support.params import request_params

pytestmark = pytest.mark.both_stores


def dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Lines:
    """A process's stdout lines, read by a thread of their own as they come."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        assert process.stdout is not None
        stream = process.stdout
        self._thread = threading.Thread(
            target=lambda: self.lines.extend(line.decode() for line in stream), daemon=True
        )
        self._thread.start()

    def wait_for(self, text: str, within_s: float) -> str:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {within_s} s: {self.lines[-20:]}")


@pytest.fixture
def stopped() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes to stop at the end, whatever happened."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_run_releases_a_create_refused_before_connecting_and_exits_once_done(
    tmp_path: Path,
    store: Store,
    database_config: DatabaseConfig,
    peek: Peek,
    stopped: list[subprocess.Popen[bytes]],
) -> None:
    del store  # migrated by the fixture
    port = dead_port()
    config = tmp_path / "batchd.toml"
    if database_config.url is None:
        database = f'path = "{database_config.path}"\n'
    else:
        database = f'url = "{database_config.url}"\nschema = "{database_config.schema}"\n'
    config.write_text(
        f"[database]\n{database}"
        "[batching]\nlinger_seconds = 0.05\nmax_requests = 4\n"
        "[polling]\ninterval_seconds = 0.1\n"
    )
    env = {
        **os.environ,
        "BATCHD_CONFIG": str(config),
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
        "ANTHROPIC_API_KEY": "sk-test-key",
    }
    lines = b"".join(
        orjson.dumps({"custom_id": f"d-{n}", "params": orjson.loads(request_params(f"q{n}"))})
        + b"\n"
        for n in range(6)
    )
    assert batchd("enqueue", "-", env=env, stdin=lines).returncode == 0

    daemon = subprocess.Popen(
        [*BATCHD, "run", "--exit-when-idle"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    stopped.append(daemon)
    logs = Lines(daemon)
    refused = orjson.loads(logs.wait_for('"batch_create_not_sent"', 30))
    assert "Cannot connect to host 127.0.0.1" in refused["error"]
    # Released at once: back to pending, the intent rejected and watched for nothing.
    assert peek.query("SELECT count(*) FROM tasks WHERE status = 'submitted'") == [(0,)]
    assert peek.query("SELECT count(*) FROM batches WHERE watch_until IS NOT NULL") == [(0,)]
    rejected = peek.query("SELECT state, note FROM batches ORDER BY id LIMIT 1")
    assert rejected[0][0] == "rejected"
    assert rejected[0][1].startswith("create not sent: ")

    fake = subprocess.Popen(
        [*BATCHD, "fake-api", "--port", str(port), "--processing-seconds", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stopped.append(fake)
    assert fake.stdout is not None
    assert re.search(rf"http://127\.0\.0\.1:{port}", fake.stdout.readline().decode())

    # Creates wait 1, 2, 4... s while the API is unreachable: well within a minute.
    assert daemon.wait(timeout=60) == 0, logs.lines[-30:]
    assert peek.query("SELECT status, count(*) FROM tasks GROUP BY status") == [("succeeded", 6)]
    assert not [line for line in logs.lines if '"batch_create_unknown"' in line]
