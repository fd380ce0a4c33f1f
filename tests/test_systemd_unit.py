"""systemd/batchd.service: what it promises, how systemd-analyze rates it, and MDWE."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchd.config import CREDENTIAL_NAME
from batchd.service.exits import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_SOFTWARE,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    NOT_RESTARTABLE,
)

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "batchd.service"
EXEC_START = "/usr/local/bin/batchd --config /etc/batchd/batchd.toml run"
# Daemon.run(shutdown_timeout_s=20.0): loops drain for 20 s, then are cancelled.
DAEMON_DRAIN_S = 20
MAX_EXPOSURE = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed on this machine"
)


def directives() -> dict[str, list[str]]:
    """`Key=value` lines of the [Service] section; a key may repeat (SystemCallFilter=)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith(("#", ";")) and section == "[Service]":
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


# --- what the unit promises (no systemd needed) ----------------------------------------


def test_unit_is_a_notify_service_with_a_watchdog_and_the_daemons_exit_codes() -> None:
    unit = directives()
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == [EXEC_START]
    assert unit["WatchdogSec"] == ["60"]
    assert unit["Restart"] == ["on-failure"]
    # Exactly the codes no restart fixes (usage, unforeseen error, configuration); the
    # temporary ones (another process holds a port or the lock) are restarted.
    prevented = {int(code) for code in unit["RestartPreventExitStatus"][0].split()}
    assert prevented == NOT_RESTARTABLE == {EXIT_USAGE, EXIT_SOFTWARE, EXIT_CONFIG}
    assert not prevented & {EXIT_FAILURE, EXIT_TEMPFAIL}
    assert unit["KillSignal"] == ["SIGTERM"]
    # Stop must outlast the daemon's drain plus closing the database, or systemd SIGKILLs it.
    assert int(unit["TimeoutStopSec"][0]) > DAEMON_DRAIN_S + 15


def test_unit_runs_as_a_static_user_whose_group_can_write_the_database() -> None:
    unit = directives()
    assert "DynamicUser" not in unit
    assert unit["User"] == ["batchd"]
    assert unit["Group"] == ["batchd"]
    assert unit["StateDirectory"] == ["batchd"]
    mode = int(unit["StateDirectoryMode"][0], 8)
    assert mode & 0o070 == 0o070  # group rwx
    assert mode & 0o007 == 0  # others nothing
    assert mode & 0o2000  # setgid: files made by group members belong to `batchd` too
    assert unit["UMask"] == ["0007"]


def test_api_key_comes_from_the_credential_the_config_reads() -> None:
    assert directives()["LoadCredential"] == [f"{CREDENTIAL_NAME}:/etc/batchd/api-key"]


def test_outbound_https_is_not_denied() -> None:
    unit = directives()
    assert "IPAddressDeny" not in unit
    assert "PrivateNetwork" not in unit
    families = unit["RestrictAddressFamilies"][0].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)


# --- systemd-analyze -------------------------------------------------------------------


@needs_systemd_analyze
def test_security_exposure_is_at_most_2_0() -> None:
    result = analyze("security", "--offline=yes", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for batchd\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@needs_systemd_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists. batchd is not installed at
    # /usr/local/bin here, so verify a copy whose only change is an executable that
    # exists; every other line is the real unit's.
    true = shutil.which("true")
    assert true is not None
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(f"ExecStart={EXEC_START}\n") == 1
    copy = tmp_path / "batchd.service"
    copy.write_text(text.replace("ExecStart=/usr/local/bin/batchd ", f"ExecStart={true} "))
    result = analyze("verify", str(copy))
    # verify exits 0 even on parse errors ("Failed to parse ..., ignoring"): read the output.
    # Other units installed on the host may have complaints of their own; ours must not.
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "batchd" in line or str(tmp_path) in line
    ]
    assert ours == []
    assert result.returncode == 0, result.stderr


@needs_systemd_analyze
def test_verify_of_the_real_file_only_misses_the_installed_binary() -> None:
    result = analyze("verify", str(UNIT))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "batchd" in line]
    if Path("/usr/local/bin/batchd").exists():
        assert complaints == []
    else:
        assert complaints
        assert all("/usr/local/bin/batchd is not executable" in line for line in complaints)


# --- MemoryDenyWriteExecute=yes --------------------------------------------------------

_MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, mmap, sys

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(77)
    try:  # the switch is on: a writable and executable mapping is now refused
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        pass
    else:
        sys.exit("W+X mapping still allowed")

    import asyncio, sqlite3
    import aiohttp, aiosqlite, orjson, structlog
    from aiohttp import web
    from batchd.service.health import Health
    from batchd.service.metrics import Registry
    from batchd.service.web.server import MetricsServer
    from batchd.service.notify import Notifier

    async def healthy():
        return Health()

    async def main():
        async with aiosqlite.connect(":memory:") as db:
            async with db.execute("SELECT json_object('n', 1)") as cursor:
                assert (await cursor.fetchone()) == ('{"n":1}',)
        async with MetricsServer(Registry(), healthy) as server:
            url = f"http://127.0.0.1:{server.port}/healthz"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                assert await response.text() == "ok\\n"
        assert orjson.loads(orjson.dumps({"a": [1, 2.5]})) == {"a": [1, 2.5]}
        structlog.get_logger().info("probe_done")
        Notifier.from_environment({}).close()
        # ctypes callbacks are libffi closures, the classic W+X user.
        assert ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)() == 7

    asyncio.run(main())
    """
)


def test_dependencies_run_without_writable_executable_memory() -> None:
    # systemd enforces MemoryDenyWriteExecute= with seccomp (or, on newer versions, this
    # same prctl): no W+X mappings, no making memory executable later. Under the kernel's
    # switch, our stack must still do its work.
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_MDWE is Linux-only")
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode == 77:
        release = os.uname().release
        pytest.skip(f"kernel {release} has no PR_SET_MDWE (Linux >= 6.3 needed)")
    assert result.returncode == 0, result.stderr
    assert "probe_done" in result.stdout + result.stderr
