"""Levels reach journald: with JOURNAL_STREAM naming the stream (as systemd sets it), every
line starts with its syslog priority `<N>`, which journald reads (SyslogLevelPrefix=).

The "journal" here is a file given to the real process as both stdout and stderr, as
systemd gives it one socket for both; JOURNAL_STREAM holds that file's device:inode.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson

from tests.support.cli import BATCHD

PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3}


def run_into(journal: Path, args: list[str], env: dict[str, str], *, stream_matches: bool) -> int:
    with journal.open("wb") as out:
        found = os.fstat(out.fileno())
        # A JOURNAL_STREAM inherited from elsewhere names another stream: no prefix then.
        named = f"{found.st_dev}:{found.st_ino}" if stream_matches else f"{found.st_dev}:1"
        return subprocess.run(
            [*BATCHD, *args],
            env={**env, "JOURNAL_STREAM": named},
            stdout=out,
            stderr=out,
            timeout=60,
            check=False,
        ).returncode


def split_priority(line: str) -> tuple[int, str]:
    assert line[0] == "<", line
    assert line[2] == ">", line
    return int(line[1]), line[3:]


def environment(tmp_path: Path, database: Path) -> dict[str, str]:
    config = tmp_path / "batchd.toml"
    config.write_text(f'[database]\npath = "{database}"\n')
    return {
        **os.environ,
        "BATCHD_CONFIG": str(config),
        "ANTHROPIC_API_KEY": "k",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",  # nothing listens: warnings follow
    }


def test_every_line_carries_its_level_as_a_syslog_priority(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    env = environment(tmp_path, tmp_path / "b.db")
    assert run_into(journal, ["run", "--exit-when-idle"], env, stream_matches=True) == 0
    seen: dict[str, int] = {}
    for line in journal.read_text().splitlines():
        priority, text = split_priority(line)
        event = orjson.loads(text)
        assert priority == PRIORITIES[event["level"]], line
        seen[event["event"]] = priority
    assert seen["daemon_started"] == 6
    assert seen["api_key_unchecked"] == 4  # `journalctl -p warning` shows it
    assert seen["daemon_stopped"] == 6


def test_a_failure_at_start_is_an_error_for_journald_both_lines(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    env = environment(tmp_path, tmp_path / "missing" / "b.db")
    assert run_into(journal, ["run"], env, stream_matches=True) == 78
    lines = [split_priority(line) for line in journal.read_text().splitlines()]
    assert [priority for priority, _ in lines] == [3, 3]  # the JSON line and the human one
    assert {text.startswith("{") for _, text in lines} == {True, False}


def test_no_prefix_when_the_stream_is_not_the_journal(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    env = environment(tmp_path, tmp_path / "missing" / "b.db")
    assert run_into(journal, ["run"], env, stream_matches=False) == 78
    for line in journal.read_text().splitlines():
        assert not line.startswith("<"), line
