"""A command that never calls the API nor PostgreSQL does not import their libraries:
aiohttp and asyncpg are ~0.3 s of CPU at every start (bench/README.md, "Session 6")."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("aiohttp", "asyncpg", "batchd.service.daemon", "batchd.fakeapi.server")


def test_the_command_line_imports_no_client_server_or_daemon_until_a_command_needs_one() -> None:
    check = (
        f"import sys, batchd.cli.main; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""


def test_the_lazy_names_still_resolve() -> None:
    check = (
        "from batchd.api import BatchesClient; from batchd.fakeapi.server import add_arguments; "
        "import batchd.fakeapi.arguments as a; assert add_arguments is a.add_arguments; "
        "print(BatchesClient.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "batchd.api.client"
