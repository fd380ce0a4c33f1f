"""Shared pieces of the benchmarks: tasks, the fake API and the daemon as child processes.

The fake and the daemon run in processes of their own, so neither's CPU time or memory
is counted against the other's.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from batchd.fakeapi.faults import FaultConfig
from batchd.fakeapi.results import result_lines
from batchd.fakeapi.state import FakeClock, FakeState, Timeline
from batchd.fakeapi.validation import parse_create_body
from batchd.store.dsn import mask_dsn

MODEL = "claude-haiku-4-5-20251001"
_LISTENING = re.compile(r"listening on (http://\S+)")
_WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
]


def prompt(n: int, size: int = 300) -> str:
    """A user prompt of about `size` bytes that names task `n` (so a misfiled answer shows)."""
    head = f"Task {n}: summarise the following notes in one sentence. "
    words: list[str] = []
    length = len(head)
    i = n
    while length < size:
        word = _WORDS[i % len(_WORDS)]
        words.append(word)
        length += len(word) + 1
        i = i * 7 + 3
    return (head + " ".join(words))[:size]


def params_json(n: int, size: int = 300) -> str:
    return orjson.dumps(
        {
            "model": MODEL,
            "max_tokens": 200,
            "messages": [{"role": "user", "content": prompt(n, size)}],
        }
    ).decode()


def custom_id(n: int) -> str:
    return f"task-{n:07d}"


def tasks(count: int, size: int = 300) -> Iterator[tuple[str, str]]:
    for n in range(count):
        yield custom_id(n), params_json(n, size)


def fake_lines(count: int, first: int) -> list[bytes]:
    """The fake's result lines for tasks first..first+count, in its shuffled order."""
    body = b'{"requests":[%s]}' % b",".join(
        b'{"custom_id":"%s","params":%s}' % (cid.encode(), params.encode())
        for cid, params in list(tasks(first + count))[first:]
    )
    state = FakeState(clock=FakeClock(), timeline=Timeline(processing_seconds=0.0), seed=1)
    batch = state.create(parse_create_body(bytearray(body), frozenset()), FaultConfig())
    return [line.rstrip(b"\n") for line in result_lines(batch, state.timeline)]


def ended_batch(batch_id: str) -> dict[str, Any]:
    """An ended batch as the API shows it, for a store's `mark_created` in the store-only
    benchmarks (no fake, no HTTP)."""
    now = datetime.now(UTC).isoformat()
    counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    return {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": "ended",
        "request_counts": counts,
        "ended_at": now,
        "created_at": now,
        "expires_at": now,
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": f"http://127.0.0.1/{batch_id}/results",
    }


def machine() -> str:
    mem = subprocess.run(["free", "-h"], capture_output=True, text=True, check=False).stdout
    total = next((line.split()[1] for line in mem.splitlines() if line.startswith("Mem:")), "?")
    python = platform.python_version()
    return f"{os.cpu_count()} cores, {total} RAM, Python {python}, {platform.machine()}"


def batchd_command(*args: str) -> list[str]:
    """`batchd ARGS` through this interpreter (the same code as the console script)."""
    return [sys.executable, "-m", "batchd", *args]


class FakeApiProcess:
    """`batchd fake-api --port 0` in a child process; `base_url` once it listens."""

    def __init__(self, *extra: str) -> None:
        self.args = batchd_command("fake-api", "--port", "0", *extra)
        self.base_url = ""
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> FakeApiProcess:
        self._proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        match = _LISTENING.search(line)
        if match is None:
            self._proc.kill()
            raise RuntimeError(f"fake API did not start: {line!r}")
        self.base_url = match.group(1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)


@dataclass
class DaemonRun:
    """What one `batchd run --exit-when-idle` did: wall time, peak RSS, its log events."""

    exit_code: int
    wall_s: float
    peak_rss_mb: float  # the kernel's high-water mark for this child (ru_maxrss)
    cpu_s: float
    events: list[dict[str, Any]] = field(default_factory=list)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (unix time, MB)

    def times(self, event: str) -> list[float]:
        return [e["t"] for e in self.events if e["event"] == event]


def write_config(
    path: Path,
    db: Path,
    base_url: str,
    *,
    url: str | None = None,
    schema: str | None = None,
    **batching: object,
) -> Path:
    """A daemon config on the SQLite file `db`, or on PostgreSQL (`url`, `schema`)."""
    database = [f'path = "{db}"'] if url is None else [f'url = "{url}"', f'schema = "{schema}"']
    lines = [
        "[database]",
        *database,
        "[api]",
        f'base_url = "{base_url}"',
        "[batching]",
        "linger_seconds = 0.0",
        *(f"{key} = {value}" for key, value in batching.items()),
        "[polling]",
        "interval_seconds = 0.1",
        "[logging]",
        'format = "json"',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_daemon(config: Path, *, profile: Path | None = None) -> DaemonRun:
    """Run the daemon until idle; peak RSS from wait4 (this child only), RSS sampled too."""
    args = batchd_command("--config", str(config), "run", "--exit-when-idle")
    if profile is not None:
        args = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "batchd", *args[3:]]
    env = {**os.environ, "ANTHROPIC_API_KEY": "bench"}
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env)
    events: list[dict[str, Any]] = []
    samples: list[tuple[float, float]] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=_read_events, args=(proc.stdout, events), daemon=True)
    sampler = threading.Thread(target=_sample_rss, args=(proc.pid, samples), daemon=True)
    reader.start()
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    return DaemonRun(
        exit_code=proc.returncode,
        wall_s=wall,
        peak_rss_mb=usage.ru_maxrss / 1024,
        cpu_s=usage.ru_utime + usage.ru_stime,
        events=events,
        rss_samples=samples,
    )


def _read_events(stream: IO[bytes], events: list[dict[str, Any]]) -> None:
    for raw in stream:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        event["t"] = datetime.fromisoformat(event["timestamp"]).timestamp()
        events.append(event)


def _sample_rss(pid: int, samples: list[tuple[float, float]]) -> None:
    path = f"/proc/{pid}/status"
    while True:
        try:
            with open(path, encoding="ascii") as status:
                text = status.read()
        except OSError:
            return
        match = re.search(r"VmRSS:\s+(\d+) kB", text)
        if match is None:  # a zombie: the daemon has exited
            return
        samples.append((time.time(), int(match.group(1)) / 1024))
        time.sleep(0.02)


def peak_between(samples: list[tuple[float, float]], start: float, end: float) -> float:
    inside = [mb for t, mb in samples if start <= t <= end]
    return max(inside, default=0.0)


def command_line() -> str:
    """The command that reproduces a run; a database URL's password shown as ***."""
    shown = [mask_dsn(arg) if arg.startswith("postgres") else arg for arg in sys.argv]
    return shlex.join(["python3", *shown])


def print_header() -> None:
    """The two comment lines every benchmark's output starts with: when and on what it
    ran, and the command that reproduces it."""
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"# reproduce: {command_line()}")
