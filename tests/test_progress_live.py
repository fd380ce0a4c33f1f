"""Progress as users see it from real processes: `status --watch` right after tasks
completed, the run's last progress line before `daemon_stopped`, and progress.py reading
only the store and the daemon's published state (issue 12's rule)."""

from __future__ import annotations

import ast
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import orjson

from batchd.cli import progress
from batchd.cli.progress import BatchProgress, ProgressSnapshot, render_line
from batchd.config import DatabaseConfig
from batchd.store import open_store
from tests.support.cli import batchd
from tests.support.params import request_params


async def test_watch_shows_the_rate_of_tasks_completed_just_before_it_started(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    database = tmp_path / "cli.db"
    store = await open_store(DatabaseConfig(path=database))
    await store.enqueue((f"w-{n}", request_params(f"q{n}")) for n in range(1000))
    await store.close()
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    with sqlite3.connect(database) as db:
        db.execute(
            "UPDATE tasks SET status = 'succeeded', completed_at = ? WHERE id <= 997", (now,)
        )
    watched = batchd("status", "--watch", "--count", "2", "--interval", "0.1", env=cli_env)
    assert watched.returncode == 0, watched.stderr.decode()
    lines = watched.stdout.decode().splitlines()
    assert len(lines) == 2
    for line in lines:  # 997 tasks in the last 5 minutes, from the first screen on
        assert line.startswith("done 997/1,000 (99.7%)"), line
        assert "rate 3.3 tasks/s" in line, line


def test_a_run_logs_metrics_listening_once_and_its_last_progress_before_stopping(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    config = Path(cli_env["BATCHD_CONFIG"])
    config.write_text(config.read_text() + "[metrics]\nenabled = true\nport = 0\n")
    lines = [
        orjson.dumps({"custom_id": f"r-{n}", "params": orjson.loads(request_params(f"q{n}"))})
        for n in range(6)
    ]
    assert batchd("enqueue", "-", env=cli_env, stdin=b"\n".join(lines)).returncode == 0
    run = batchd("run", "--exit-when-idle", env=cli_env)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    names = [orjson.loads(line)["event"] for line in run.stdout.splitlines()]
    assert names.count("metrics_listening") == 1
    assert names[-1] == "daemon_stopped"
    last_progress = max(i for i, name in enumerate(names) if name == "progress")
    assert last_progress < names.index("daemon_stopped")
    final = orjson.loads(run.stdout.splitlines()[last_progress])
    assert (final["done"], final["total"]) == (6, 6)


def test_progress_imports_neither_the_daemon_nor_its_components() -> None:
    source = Path(progress.__file__).read_text(encoding="utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not {name for name in imported if name.startswith("batchd.service")}
    assert not re.search(r"\.submitter\b|\.budget\b", source)


def test_requests_processed_by_the_api_show_before_their_results_are_written() -> None:
    running = ProgressSnapshot(
        {"submitted": 100, "succeeded": 0},
        (BatchProgress("msgbatch_a", "in_progress", 100, 40, 10.0),),
    )
    assert render_line(running, None).startswith("done 0/100 (0.0%) (+40 processed by the API)")
    # An ended batch's results are being written: those count as done, not twice.
    writing = ProgressSnapshot(
        {"submitted": 70, "succeeded": 30},
        (BatchProgress("msgbatch_a", "ended", 100, 100, 10.0),),
    )
    assert writing.processed_at_api == 0
    assert render_line(writing, None).startswith("done 30/100 (30.0%) pending")
