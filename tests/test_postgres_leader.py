"""Two daemons in one process on one PostgreSQL database: one leads, the other stands by
(alive for the watchdog; it polls and collects, never submits), and takes over when the
leader stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from batchd.config import Config
from batchd.fakeapi.server import FakeApiServer
from batchd.service.daemon import Daemon, run_daemon
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.params import request_params
from tests.support.waiting import eventually

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("store_backend", ["postgresql"],
                                                             indirect=True)]  # fmt: skip


async def test_a_standby_is_alive_submits_nothing_and_takes_over_when_the_leader_stops(
    fake_api: FakeApiServer, daemon_config: Callable[..., Config], peek: Peek
) -> None:
    config = daemon_config(fake_api.base_url)
    daemons: list[Daemon] = []
    statuses: list[list[str]] = []

    async def keep(daemon: Daemon) -> None:
        statuses.append([])
        daemon._on_status = statuses[len(daemons)].append  # the STATUS lines it publishes
        daemons.append(daemon)

    first = asyncio.create_task(run_daemon(config, "test-key", on_started=keep))
    async with asyncio.timeout(30):
        while not daemons or not daemons[0]._loops_started:
            await asyncio.sleep(0.02)
    second = asyncio.create_task(run_daemon(config, "test-key", on_started=keep))
    try:
        async with asyncio.timeout(30):
            while len(daemons) < 2:
                await asyncio.sleep(0.02)
        standby = daemons[1]
        # It tried for the lock and stands by (said in its STATUS), its loops running; the
        # leader said its own STATUS (a fixed 1.5 s was once too short on a loaded machine).
        await eventually(
            lambda: standby.role.standing_by and standby._loops_started and all(statuses),
            "the second daemon standing by, both with a STATUS",
            30,
        )
        assert daemons[0].role.leading
        assert not standby.role.leading  # polls and collects only (test_shared_collection)
        assert standby._loops_started
        assert await standby.alive()  # the watchdog keeps a standby
        assert "role: standby" in " ".join((await standby.health()).notes)
        assert statuses[1]
        assert statuses[1][-1].startswith("standby")  # its lock try said so, or a tick
        assert not statuses[0][-1].startswith("standby")
        for daemon, leading in ((daemons[0], 1), (standby, 0)):
            await daemon.registry.refresh()
            assert f"batchd_leader {leading}.0\n" in daemon.registry.render()
        peek.execute(
            "INSERT INTO tasks (custom_id, params) VALUES (?, ?)", "t1", request_params("one")
        )
        async with asyncio.timeout(30):
            while peek.query("SELECT status FROM tasks") != [("succeeded",)]:
                await asyncio.sleep(0.05)
        daemons[0].stop()
        assert await first == 0
        stopped = time.monotonic()
        async with asyncio.timeout(10):
            while not standby.role.leading:
                await asyncio.sleep(0.02)
        takeover_s = time.monotonic() - stopped
        peek.execute(
            "INSERT INTO tasks (custom_id, params) VALUES (?, ?)", "t2", request_params("two")
        )
        async with asyncio.timeout(30):
            while peek.query("SELECT count(*) FROM tasks WHERE status = 'succeeded'") != [(2,)]:
                await asyncio.sleep(0.05)
        assert takeover_s < 3  # a stopped leader's session ends at once; next try <= 1 s
    finally:
        for daemon in daemons:
            daemon.stop()
        await asyncio.gather(first, second, return_exceptions=True)
    assert await second == 0


async def test_the_leaders_watch_ends_when_the_daemon_stops_not_only_when_cancelled(
    store: Store,
) -> None:
    """The daemon's stop ends the leadership task by itself: a shutdown that relied on one
    cancel hung for ever when Python 3.11's wait_for swallowed it (the cancel arriving as a
    ping's answer did; the daemon then never exited)."""
    stop = asyncio.Event()
    async with store.leadership(stop, lambda _text: None) as lead:
        assert await lead.acquired()
        [task] = [t for t in asyncio.all_tasks() if t.get_name() == "batchd-leadership"]
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=5.0)
        assert task in done  # ended by the stop, before the context's cancel
        assert not task.cancelled()
        assert not lead.leading
