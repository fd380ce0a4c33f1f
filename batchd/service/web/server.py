"""The local listener: /metrics, /healthz, the web view at / and its JSON at /api/status.

Read-only: every route is a GET that reads. The page and its script and style ship inside
the package (no CDN, works offline) and a Content-Security-Policy keeps the browser from
loading anything from elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
import structlog
from aiohttp import web

from batchd.service.health import Health, HealthCheck
from batchd.service.metrics import CONTENT_TYPE, Registry
from batchd.serving import AppServer, StartStop

log = structlog.get_logger("batchd.service.web")

StatusSource = Callable[[], Awaitable[dict[str, Any]]]

# Browser tabs left open each ask every few seconds: answers this fresh are shared.
STATUS_MAX_AGE_S = 1.0
_STATIC = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
_SECURITY_HEADERS = {
    # Only our own files, no inline script, no frames: the page can fetch /api/status
    # and nothing else.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class MetricsServer(StartStop):
    """Serves the local listener on a port; start() and stop() explicitly.

    Without a `status` source there is no web view, only /metrics and /healthz.
    """

    def __init__(
        self,
        registry: Registry,
        health: HealthCheck,
        *,
        status: StatusSource | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        health_timeout_s: float = 5.0,
    ) -> None:
        self._registry = registry
        self._health = health
        self._status = status
        self._host = host
        self._requested_port = port
        self._health_timeout_s = health_timeout_s
        self._served: AppServer | None = None
        self._port: int | None = None
        self._status_cache: tuple[float, bytes] | None = None
        self._status_lock = asyncio.Lock()

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0); only after start()."""
        if self._port is None:
            raise RuntimeError("MetricsServer is not started")
        return self._port

    async def start(self) -> None:
        """Bind and serve; raises OSError if the address is taken."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        if self._status is not None:
            app.router.add_get("/api/status", self._api_status)
            files = resources.files(__package__).joinpath("static")
            for name, content_type in _STATIC.items():
                body = files.joinpath(name).read_bytes()
                path = "/" if name == "index.html" else f"/static/{name}"
                app.router.add_get(path, _static_file(body, content_type))
        # No access log (AppServer keeps none): a scrape every 15 s would drown the daemon's
        # own events.
        # A short shutdown timeout: a scrape in flight must not hold up the daemon's stop.
        served = AppServer(app, self._host, self._requested_port, shutdown_timeout_s=2.0)
        self._port = await served.start()
        self._served = served
        log.info("metrics_listening", host=self._host, port=self._port)  # once, here only

    async def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        served, self._served = self._served, None
        if served is not None:
            await served.stop()

    async def _metrics(self, request: web.Request) -> web.Response:
        # prometheus_client's collectors are synchronous: the database is read here,
        # awaited, and only then rendered.
        await self._registry.refresh()
        return web.Response(
            body=self._registry.render().encode("utf-8"),
            headers={"Content-Type": CONTENT_TYPE},
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            health = await asyncio.wait_for(self._health(), self._health_timeout_s)
        except TimeoutError:
            health = Health((f"health check did not answer within {self._health_timeout_s} s",))
        except Exception as exc:  # noqa: BLE001 - a failing check is itself the answer: 503
            log.warning("health_check_failed", error=str(exc), error_type=type(exc).__name__)
            health = Health((f"health check failed: {type(exc).__name__}",))
        if health.healthy:
            return web.Response(text="".join(f"{line}\n" for line in ("ok", *health.notes)))
        lines = (*health.reasons, *health.notes)
        return web.Response(status=503, text="".join(f"{line}\n" for line in lines))

    async def _api_status(self, request: web.Request) -> web.Response:
        assert self._status is not None
        async with self._status_lock:
            cached = self._status_cache
            if cached is None or time.monotonic() - cached[0] >= STATUS_MAX_AGE_S:
                body = orjson.dumps(await self._status())
                cached = self._status_cache = (time.monotonic(), body)
        return web.Response(
            body=cached[1],
            headers={"Content-Type": "application/json", **_SECURITY_HEADERS},
        )


def _static_file(
    body: bytes, content_type: str
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(
            body=body,
            headers={"Content-Type": f"{content_type}; charset=utf-8", **_SECURITY_HEADERS},
        )

    return serve
