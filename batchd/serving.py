"""An aiohttp application served on a host and port, for as long as it is started: the
daemon's local listener (`service/web`) and the fake API (`fakeapi`) are both one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

from aiohttp import web


class StartStop(ABC):
    """`start` and `stop` as an async context manager; a start that fails half-way is
    stopped too, so `stop` must be safe on whatever `start` left (and safe twice)."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class AppServer:
    """`app` served on `host`:`port` (0: a free port) from `start` to `stop`, without an
    access log; requests still in flight at `stop` get `shutdown_timeout_s` to finish."""

    def __init__(
        self, app: web.Application, host: str, port: int, *, shutdown_timeout_s: float
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Bind and serve; the port bound. Raises OSError if the address is taken, and
        then holds nothing."""
        runner = web.AppRunner(
            self._app, access_log=None, shutdown_timeout=self._shutdown_timeout_s
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        return int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
