"""`batchd --log-format FORMAT fake-api` is honoured as by the other commands: real
`python -m batchd` processes, their output read from pipes (so `auto` means JSON)."""

from __future__ import annotations

import re
import signal
import subprocess
from typing import Any

import orjson
import pytest

from tests.support.cli import BATCHD

_URL = re.compile(r"http://127\.0\.0\.1:(\d+)")


def start(*options: str, port: str = "0") -> tuple[subprocess.Popen[bytes], str]:
    """`batchd OPTIONS fake-api --port PORT`; the process and its first stdout line."""
    process = subprocess.Popen(
        [*BATCHD, *options, "fake-api", "--port", port],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    return process, process.stdout.readline().decode()


def stop(process: subprocess.Popen[bytes]) -> tuple[str, str]:
    """SIGTERM (a clean stop); the rest of stdout and all of stderr."""
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    return out.decode(), err.decode()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines()]  # each must parse


@pytest.mark.parametrize("log_format", ["json", "auto"])  # auto: stdout is a pipe here
def test_json_log_lines_from_start_to_stop(log_format: str) -> None:
    process, first = start("--log-format", log_format)
    try:
        listening = orjson.loads(first)
    finally:
        rest, err = stop(process)
    assert listening["event"] == "fake_api_listening"
    assert _URL.fullmatch(listening["base_url"])
    assert listening["level"] == "info"
    assert "timestamp" in listening
    assert [line["event"] for line in json_lines(rest)] == ["fake_api_stopped"]
    assert err == ""


@pytest.mark.parametrize("options", [("--log-format", "console"), ()])
def test_console_lines_are_the_plain_text_scripts_read(options: tuple[str, ...]) -> None:
    process, first = start(*options)
    rest, err = stop(process)
    assert re.fullmatch(r"batchd fake-api listening on http://127\.0\.0\.1:\d+\n", first)
    assert (rest, err) == ("", "")


def test_a_failure_is_a_json_log_line_and_a_human_line() -> None:
    running, first = start("--log-format", "json")
    try:
        port = _URL.search(first)
        assert port is not None
        taken = subprocess.run(
            [*BATCHD, "--log-format", "json", "fake-api", "--port", port.group(1)],
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        stop(running)
    assert taken.returncode == 1
    [failed] = json_lines(taken.stdout.decode())
    assert (failed["event"], failed["level"], failed["exit_code"]) == (
        "fake_api_failed",
        "error",
        1,
    )
    assert port.group(1) in failed["error"]
    assert taken.stderr.decode().startswith("batchd fake-api: ")
