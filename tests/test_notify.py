"""sd_notify over a real AF_UNIX datagram socket, in-process and from a subprocess."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from batchd.service.notify import MAX_STATUS_CHARS, Notifier
from tests.support.waiting import eventually

# sun_path holds 108 bytes; pytest's tmp_path can be longer than that for long test names.
_MAX_SOCKET_PATH = 100


class Receiver:
    """The systemd side: a bound datagram socket that reads what the Notifier sent."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # as it would appear in $NOTIFY_SOCKET

    async def recv(self, timeout_s: float = 2.0) -> str:
        loop = asyncio.get_running_loop()
        payload = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout_s)
        return payload.decode()

    def pending(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        received = []
        while True:
            try:
                received.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return received

    def recv_with_sender_pid(self) -> tuple[str, int]:
        """One datagram and the sender's pid, as systemd checks it for NotifyAccess=main."""
        payload, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("3i", data[:12])
                return payload.decode(), pid
        raise AssertionError("no SCM_CREDENTIALS on the datagram")


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    directory = tmp_path
    if len(str(tmp_path / "notify")) > _MAX_SOCKET_PATH:
        directory = Path(tempfile.mkdtemp(prefix="bn-"))
    path = str(directory / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    try:
        yield Receiver(sock, path)
    finally:
        sock.close()
        if directory != tmp_path:
            os.unlink(path)
            os.rmdir(directory)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"batchd-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


def notifier_for(receiver: Receiver, **env: str) -> Notifier:
    return Notifier.from_environment({"NOTIFY_SOCKET": receiver.address, **env})


async def test_ready_status_watchdog_stopping_arrive_as_datagrams(receiver: Receiver) -> None:
    notifier = notifier_for(receiver)
    try:
        assert notifier.enabled
        assert notifier.ready()
        assert notifier.status("1,204 pending, 3 batches in flight, 12,400 done")
        assert notifier.watchdog()
        assert notifier.stopping()
        assert notifier.notify(STATUS="draining", EXTEND_TIMEOUT_USEC=5_000_000)
        assert [await receiver.recv() for _ in range(5)] == [
            "READY=1",
            "STATUS=1,204 pending, 3 batches in flight, 12,400 done",
            "WATCHDOG=1",
            "STOPPING=1",
            "STATUS=draining\nEXTEND_TIMEOUT_USEC=5000000",
        ]
    finally:
        notifier.close()


async def test_abstract_namespace_address_works(abstract_receiver: Receiver) -> None:
    notifier = notifier_for(abstract_receiver)
    try:
        assert notifier.ready()
        assert await abstract_receiver.recv() == "READY=1"
    finally:
        notifier.close()


async def test_status_stays_one_line_and_within_systemds_datagram_limit(
    receiver: Receiver,
) -> None:
    notifier = notifier_for(receiver)
    try:
        notifier.status("two\nlines")
        assert await receiver.recv() == "STATUS=two lines"
        notifier.status("x" * 10_000)
        assert await receiver.recv() == "STATUS=" + "x" * MAX_STATUS_CHARS
    finally:
        notifier.close()


def test_field_names_must_be_upper_case(receiver: Receiver) -> None:
    notifier = notifier_for(receiver)
    try:
        with pytest.raises(ValueError, match="upper case"):
            notifier.notify(ready=1)
    finally:
        notifier.close()


async def test_without_notify_socket_nothing_happens() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "200000"})
    with capture_logs() as logs:
        assert not notifier.enabled
        assert notifier.watchdog_interval_s is None
        assert not notifier.ready()
        assert not notifier.status("idle")
        assert not notifier.watchdog()
        assert not notifier.stopping()
        # Returns at once rather than looping: there is nobody to ping.
        await asyncio.wait_for(notifier.watchdog_loop(_always(True)), 1.0)
        notifier.close()
    assert logs == []


def test_send_failures_never_raise_and_warn_once(tmp_path: Path) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    try:
        with capture_logs() as logs:
            assert not notifier.ready()
            assert not notifier.status("still here")
            assert not notifier.watchdog()
        assert [entry["event"] for entry in logs] == ["notify_failed"]
        assert logs[0]["log_level"] == "warning"
    finally:
        notifier.close()


def test_close_is_idempotent_and_later_sends_are_no_ops(receiver: Receiver) -> None:
    notifier = notifier_for(receiver)
    notifier.close()
    notifier.close()
    assert not notifier.ready()
    assert receiver.pending() == []


@pytest.mark.parametrize(
    ("env", "expected_s"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    receiver: Receiver, env: dict[str, str], expected_s: float | None
) -> None:
    notifier = notifier_for(receiver, **env)
    try:
        assert notifier.watchdog_interval_s == expected_s
    finally:
        notifier.close()


async def test_watchdog_loop_pings_only_while_healthy(receiver: Receiver) -> None:
    notifier = notifier_for(receiver, WATCHDOG_USEC="200000")  # a ping every 0.1 s
    healthy = True

    async def probe() -> bool:
        return healthy

    task = asyncio.create_task(notifier.watchdog_loop(probe), name="watchdog")
    try:
        assert await receiver.recv() == "WATCHDOG=1"
        assert await receiver.recv() == "WATCHDOG=1"
        healthy = False
        await asyncio.sleep(0.15)  # let a ping already decided on go out
        receiver.pending()
        await asyncio.sleep(0.35)  # three intervals without a ping
        assert receiver.pending() == []
        healthy = True
        assert await receiver.recv() == "WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()


async def test_watchdog_loop_withholds_pings_when_the_probe_raises(receiver: Receiver) -> None:
    notifier = notifier_for(receiver, WATCHDOG_USEC="200000")
    calls = 0

    async def probe() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("database wedged")

    with capture_logs() as logs:
        task = asyncio.create_task(notifier.watchdog_loop(probe), name="watchdog")
        # Three probes (0.35 s of a loaded machine's time once held only two).
        await eventually(lambda: calls, "three probes", 10, until=lambda n: n >= 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    notifier.close()
    assert calls >= 3  # the loop keeps probing; it does not die with the probe
    assert receiver.pending() == []
    assert "watchdog_probe_failed" in {entry["event"] for entry in logs}


_CHILD = textwrap.dedent(
    """
    from batchd.service.notify import Notifier

    notifier = Notifier.from_environment()
    notifier.ready()
    notifier.status("3 pending, 1 batches in flight, 0 done")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()
    """
)


def test_a_subprocess_with_notify_socket_reaches_the_socket_from_its_main_pid(
    receiver: Receiver,
) -> None:
    # The daemon-level version of this test (`batchd run` under NOTIFY_SOCKET) belongs
    # with the daemon wiring; this one proves the environment-to-datagram path end to end.
    receiver.sock.setblocking(True)
    receiver.sock.settimeout(10)
    env = {**os.environ, "NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "60000000"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD], env=env)
    try:
        received = [receiver.recv_with_sender_pid() for _ in range(4)]
    finally:
        assert child.wait(timeout=10) == 0
    assert received == [
        ("READY=1", child.pid),
        ("STATUS=3 pending, 1 batches in flight, 0 done", child.pid),
        ("WATCHDOG=1", child.pid),
        ("STOPPING=1", child.pid),
    ]


def _always(value: bool) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return value

    return probe
