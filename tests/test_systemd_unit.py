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
from tests.support.tools import require_executable

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "batchd.service"
EXEC_START = "/usr/local/bin/batchd --config /etc/batchd/batchd.toml run"
# Daemon.run(shutdown_timeout_s=20.0): loops drain for 20 s, then are cancelled.
DAEMON_DRAIN_S = 20
MAX_EXPOSURE = 2.0


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


@pytest.fixture
def systemd_analyze() -> str:
    """The program's path; without it the test fails under CI (.ci/run installs it), else skips."""
    return require_executable("systemd-analyze", "systemd")


def analyze(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [program, *args], capture_output=True, text=True, env=env, timeout=60, check=False
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


def test_security_exposure_is_at_most_2_0(systemd_analyze: str) -> None:
    result = analyze(systemd_analyze, "security", "--offline=yes", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for batchd\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_verify_is_clean(systemd_analyze: str, tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists. batchd is not installed at
    # /usr/local/bin here, so verify a copy whose only change is an executable that
    # exists; every other line is the real unit's.
    true = shutil.which("true")
    assert true is not None
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(f"ExecStart={EXEC_START}\n") == 1
    copy = tmp_path / "batchd.service"
    copy.write_text(text.replace("ExecStart=/usr/local/bin/batchd ", f"ExecStart={true} "))
    result = analyze(systemd_analyze, "verify", str(copy))
    # verify exits 0 even on parse errors ("Failed to parse ..., ignoring"): read the output.
    # Other units installed on the host may have complaints of their own; ours must not.
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "batchd" in line or str(tmp_path) in line
    ]
    assert ours == []
    assert result.returncode == 0, result.stderr


def test_verify_of_the_real_file_only_misses_the_installed_binary(systemd_analyze: str) -> None:
    result = analyze(systemd_analyze, "verify", str(UNIT))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "batchd" in line]
    if Path("/usr/local/bin/batchd").exists():
        assert complaints == []
    else:
        assert complaints
        assert all("/usr/local/bin/batchd is not executable" in line for line in complaints)


# --- MemoryDenyWriteExecute=yes --------------------------------------------------------
# systemd enforces it in one of two ways: before version 254 (Debian 12 ships 252) a
# seccomp filter refusing, with EPERM, mmap with PROT_WRITE and PROT_EXEC both set,
# mprotect and pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC; from 254 on, where the
# kernel has it (Linux >= 6.3), prctl(PR_SET_MDWE). The probe switches either on, in a
# process of its own, then runs our stack under it.

# The seccomp filter, as classic BPF over struct seccomp_data (nr at 0, arch at 4, the low
# 32 bits of args[2] at 32 on little-endian machines): syscall numbers per architecture.
_SECCOMP_SYSCALLS = {  # AUDIT_ARCH_*: (mmap, mprotect, pkey_mprotect, shmat)
    "x86_64": (0xC000003E, (9, 10, 329, 30)),
    "aarch64": (0xC00000B7, (222, 226, 288, 196)),
}

_MDWE_SWITCHES = {
    "prctl": """
        PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            # EINVAL: a kernel without PR_SET_MDWE; any other error is the probe's failure.
            code = ctypes.get_errno()
            sys.exit(77 if code == errno.EINVAL else "prctl: " + os.strerror(code))
    """,
    "seccomp": """
        import platform
        arch, numbers = SECCOMP_SYSCALLS[platform.machine()]
        mmap_nr, mprotect_nr, pkey_mprotect_nr, shmat_nr = numbers
        LD, JEQ, JSET, AND, RET = 0x20, 0x15, 0x45, 0x54, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ...
        ALLOW, EPERM = 0x7FFF0000, 0x00050000 | errno.EPERM
        W_X, X, SHM_EXEC = mmap.PROT_WRITE | mmap.PROT_EXEC, mmap.PROT_EXEC, 0o100000
        program = [  # (code, jump if true, jump if false, k); a jump skips that many
            (LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, ALLOW),  # 0-2: another ABI
            (LD, 0, 0, 0),  # 3: the syscall
            (JEQ, 4, 0, mmap_nr), (JEQ, 8, 0, mprotect_nr),  # 4-5: to 9, to 14
            (JEQ, 7, 0, pkey_mprotect_nr), (JEQ, 10, 0, shmat_nr),  # 6-7: to 14, to 18
            (RET, 0, 0, ALLOW),  # 8
            (LD, 0, 0, 32), (AND, 0, 0, W_X), (JEQ, 0, 1, W_X),  # 9-11: mmap's prot
            (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW),  # 12-13
            (LD, 0, 0, 32), (JSET, 0, 1, X), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW),  # 14-17
            (LD, 0, 0, 32), (JSET, 0, 1, SHM_EXEC), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW),
        ]

        class SockFilter(ctypes.Structure):
            _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                        ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

        filters = (SockFilter * len(program))(*(SockFilter(*op) for op in program))
        fprog = SockFprog(len(program), filters)
        PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(
            PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0
        ) != 0:
            sys.exit("seccomp: " + os.strerror(ctypes.get_errno()))
    """,
}

_MDWE_PROBE = """
import ctypes, errno, mmap, os, sys

libc = ctypes.CDLL(None, use_errno=True)
SECCOMP_SYSCALLS = {syscalls!r}
{switch}
# The switch is on: a writable and executable mapping is refused, and so is making a
# writable mapping executable later.
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("W+X mapping still allowed")
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE)
address = ctypes.addressof(ctypes.c_char.from_buffer(page))
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
if libc.mprotect(address, 4096, mmap.PROT_READ | mmap.PROT_EXEC) == 0:
    sys.exit("mprotect(PROT_EXEC) still allowed")

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
            assert (await cursor.fetchone()) == ('{{"n":1}}',)
    async with MetricsServer(Registry(), healthy) as server:
        url = f"http://127.0.0.1:{{server.port}}/healthz"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert await response.text() == "ok\\n"
    assert orjson.loads(orjson.dumps({{"a": [1, 2.5]}})) == {{"a": [1, 2.5]}}
    structlog.get_logger().info("probe_done")
    Notifier.from_environment({{}}).close()
    # ctypes callbacks are libffi closures, the classic W+X user.
    assert ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)() == 7

asyncio.run(main())
"""


@pytest.mark.parametrize("switch", ["seccomp", "prctl"])
def test_dependencies_run_without_writable_executable_memory(switch: str) -> None:
    # No W+X mappings, no making memory executable later: under either of systemd's ways
    # of enforcing MemoryDenyWriteExecute=, our stack must still do its work. Skips only
    # where the switch cannot exist, with a reason the suite's summary shows (-ra):
    # another OS, an architecture the filter has no syscall numbers for, a kernel without
    # PR_SET_MDWE. A switch that exists but fails to turn on is a failure.
    if not sys.platform.startswith("linux"):
        pytest.skip("MemoryDenyWriteExecute= is Linux-only")
    if switch == "seccomp" and os.uname().machine not in _SECCOMP_SYSCALLS:
        pytest.skip(f"the probe's seccomp filter has no syscall numbers for {os.uname().machine}")
    probe = _MDWE_PROBE.format(
        syscalls=_SECCOMP_SYSCALLS, switch=textwrap.dedent(_MDWE_SWITCHES[switch])
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
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
