"""Run the fake API: in-process (`async with FakeApiServer(config)`) or from the CLI.

async with FakeApiServer(FakeApiConfig(port=0, processing_seconds=0.3)) as server:
    server.base_url      # http://127.0.0.1:PORT, for a client's base_url
    server.state         # FakeState, for inspection
    server.faults.config = FaultConfig(http_fault_rate=0.5)   # at run time
    server.clock.advance(3600)                                 # move time on
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import structlog

from batchd.api.wire import MAX_BATCH_BYTES, RESULTS_RETENTION_DAYS
from batchd.fakeapi.admin import add_admin_routes
from batchd.fakeapi.app import FakeApi, create_app
from batchd.fakeapi.arguments import add_arguments as add_arguments  # noqa: PLC0414
from batchd.fakeapi.faults import (
    ENDPOINTS,
    FAULT_KINDS,
    FaultConfig,
    FaultInjector,
    parse_names,
)
from batchd.fakeapi.persistence import StateFileError, load_state
from batchd.fakeapi.state import FakeClock, FakeState, Timeline
from batchd.serving import AppServer, StartStop

log = structlog.get_logger("batchd.fakeapi")


@dataclass(frozen=True)
class FakeApiConfig:
    """How the fake behaves; every default is the real API's or off."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, see FakeApiServer.base_url
    api_key: str | None = None  # None: any non-empty key is accepted
    processing_seconds: float = 3.0  # each request finishes within this; 0: at once
    expiry_seconds: float = 24 * 3600.0
    cancel_delay_seconds: float = 1.0
    retention_seconds: float = RESULTS_RETENTION_DAYS * 86400.0
    incremental_counts: bool = False
    models: tuple[str, ...] = ()  # allow-list; empty: any model
    seed: int | None = None
    state_path: Path | None = None
    max_body_bytes: int = MAX_BATCH_BYTES
    faults: FaultConfig = field(default_factory=FaultConfig)


class FakeApiServer(StartStop):
    """The fake on a loopback port for the duration of an `async with`."""

    def __init__(self, config: FakeApiConfig | None = None) -> None:
        self.config = config or FakeApiConfig()
        self.clock = FakeClock()
        timeline = Timeline(
            processing_seconds=self.config.processing_seconds,
            expiry_seconds=self.config.expiry_seconds,
            cancel_delay_seconds=self.config.cancel_delay_seconds,
            retention_seconds=self.config.retention_seconds,
            incremental_counts=self.config.incremental_counts,
        )
        self.state = FakeState(clock=self.clock, timeline=timeline, seed=self.config.seed)
        self.faults = FaultInjector(config=self.config.faults, seed=self.config.seed)
        self.api = FakeApi(
            state=self.state,
            clock=self.clock,
            faults=self.faults,
            api_key=self.config.api_key,
            models=frozenset(self.config.models),
            max_body_bytes=self.config.max_body_bytes,
            state_path=self.config.state_path,
        )
        self._served: AppServer | None = None
        self.port = self.config.port

    @property
    def base_url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        state_path = self.config.state_path
        if state_path is not None and state_path.exists():
            self.clock.offset = timedelta(seconds=load_state(state_path, self.state))
        app = create_app(self.api)
        add_admin_routes(app)
        self._served = AppServer(app, self.config.host, self.config.port, shutdown_timeout_s=1.0)
        self.port = await self._served.start()

    async def stop(self) -> None:
        await self.api.drop_pending_creates()
        if self._served is not None:
            await self._served.stop()


def config_from_args(args: argparse.Namespace) -> FakeApiConfig:
    """Raises ValueError naming a bad fault setting."""
    faults = FaultConfig(
        error_rate=args.error_rate,
        retryable_error_share=args.retryable_error_share,
        expire_rate=args.expire_rate,
        http_fault_rate=args.fault_rate,
        http_fault_kinds=tuple(parse_names(args.fault_kinds, FAULT_KINDS)),  # type: ignore[arg-type]
        http_fault_endpoints=tuple(parse_names(args.fault_endpoints, ENDPOINTS)),  # type: ignore[arg-type]
        retry_after_seconds=args.retry_after,
        slow_seconds=args.slow_seconds,
        late_create_seconds=args.late_create_seconds,
        http_fault_limit=args.fault_limit,
        results_truncate_rate=args.results_truncate_rate,
        not_found_after_create_seconds=args.not_found_after_create_seconds,
        list_lag_seconds=args.list_lag_seconds,
    )
    return FakeApiConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        processing_seconds=args.processing_seconds,
        expiry_seconds=args.expiry_seconds,
        cancel_delay_seconds=args.cancel_delay_seconds,
        incremental_counts=args.incremental_counts,
        models=tuple(name.strip() for name in args.models.split(",") if name.strip()),
        seed=args.seed,
        state_path=args.state,
        faults=faults,
    )


async def serve(args: argparse.Namespace, *, json_logs: bool = False) -> int:
    """Serve until SIGINT or SIGTERM; say the base URL first. Returns the exit code.

    `json_logs`: its lines are JSON log lines (`batchd --log-format json fake-api`, with
    structlog configured by the caller), else the plain text lines scripts have read.
    """
    try:
        config = config_from_args(args)
    except ValueError as exc:
        return _failed(str(exc), 2, json_logs=json_logs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with FakeApiServer(config) as server:
            if json_logs:
                log.info("fake_api_listening", base_url=server.base_url)
            else:
                print(f"batchd fake-api listening on {server.base_url}", flush=True)
            await stop.wait()
    except (OSError, StateFileError) as exc:
        return _failed(str(exc), 1, json_logs=json_logs)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    if json_logs:
        log.info("fake_api_stopped")
    return 0


def _failed(message: str, exit_code: int, *, json_logs: bool) -> int:
    """As the other commands fail: a log line (if JSON), and a human line on stderr."""
    if json_logs:
        log.error("fake_api_failed", error=message, exit_code=exit_code)
    print(f"batchd fake-api: {message}", file=sys.stderr, flush=True)
    return exit_code
