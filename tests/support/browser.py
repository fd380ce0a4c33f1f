"""Debian's Chromium, headless, driven over its own DevTools protocol (CDP) by aiohttp.

No driver package: Chromium opens a WebSocket on `--remote-debugging-port`, and the few
commands a test needs (evaluate a script, capture a screenshot, watch the network and the
console) are JSON messages on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.tools import require_executable

# What pitfalls.md lists for Chromium as root in a container, and nothing that phones home.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    "--window-size=1280,900",
)


class CdpError(Exception):
    pass


class Page:
    """One browser tab over CDP: commands answered by id, events kept for the test."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = answer
        await self._socket.send_json({"id": message_id, "method": method, "params": params})
        reply = await asyncio.wait_for(answer, 15)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise)."""
        reply = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in reply:
            raise CdpError(f"{expression!r} threw {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._socket.close()

    async def _read(self) -> None:
        async for message in self._socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = message.json()
            if "id" in data:
                waiter = self._waiting.pop(data["id"], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(data)
            else:
                self.events.append(data)


@asynccontextmanager
async def chromium_page(url: str, profile: Path) -> AsyncIterator[Page]:
    """Chromium started on `url` with a fresh profile; its first tab, attached over CDP."""
    binary = require_executable("chromium", "chromium")
    profile.mkdir(parents=True, exist_ok=True)
    # A profile used before keeps the last run's port file: never read a stale port.
    (profile / "DevToolsActivePort").unlink(missing_ok=True)
    log = (profile.parent / "chromium.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",  # a free port, written to DevToolsActivePort
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # its own process group: its helpers go with it
    )
    try:
        port = await _devtools_port(profile / "DevToolsActivePort", process)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            [tab] = [t for t in targets if t["type"] == "page"]
            socket = await http.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0)
            page = Page(socket)
            try:
                await page.send("Page.enable")
                await page.send("Runtime.enable")
                await page.send("Network.enable")
                await page.send("Page.navigate", url=url)
                yield page
            finally:
                await page.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        log.close()


async def _devtools_port(path: Path, process: asyncio.subprocess.Process) -> int:
    for _ in range(300):
        if process.returncode is not None:
            raise CdpError(f"chromium exited with {process.returncode} before listening")
        text = path.read_text() if path.exists() else ""
        if "\n" in text:
            return int(text.split("\n", 1)[0])
        await asyncio.sleep(0.05)
    raise CdpError("chromium did not open its DevTools port within 15 s")
