"""Shared fixtures: a real SQLite file, the fake API on loopback, a daemon config."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.config import Config
from batchd.fakeapi import validation
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.service.logs import configure_logging
from batchd.store import Store
from batchd.store.sqlite import SqliteStore

# Fixtures for tests that run batchd as users do (`fake_api_process`, `cli_env`).
pytest_plugins = [
    "tests.cli_support",
    "tests.support.postgres",  # a PostgreSQL server and a database per session
]


def request_params(text: str, *, max_tokens: int = 50, **extra: Any) -> str:
    """The JSON text of a Messages API request whose user message is `text`."""
    return orjson.dumps(
        {
            "model": "claude-haiku-4-5-20251001",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}],
            **extra,
        }
    ).decode()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "batchd.db"


@pytest.fixture
def store_clock() -> Callable[[], datetime] | None:
    """The store's clock: real time here; a module overrides this fixture to fix time."""
    return None


@pytest.fixture
async def store(db_path: Path, store_clock: Callable[[], datetime] | None) -> AsyncIterator[Store]:
    opened = await SqliteStore.open(db_path, clock=store_clock)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeApiServer]:
    """The fake API with a short timeline, started in-process on a free port."""
    async with FakeApiServer(FakeApiConfig(port=0, processing_seconds=0.3, seed=1)) as server:
        yield server


@pytest.fixture
def daemon_config(db_path: Path) -> Callable[..., Config]:
    """A Config for the daemon under test, with quick timings; override per test."""

    def make(base_url: str, **batching: Any) -> Config:
        config = Config()
        return replace(
            config,
            database=replace(config.database, path=db_path),
            api=replace(config.api, base_url=base_url, max_retries=3, request_timeout_s=10.0),
            batching=replace(config.batching, linger_s=0.05, **batching),
            polling=replace(config.polling, interval_s=0.1, not_found_grace_s=1.0),
        )

    return make


@pytest.fixture(autouse=True, scope="session")
def quiet_logs() -> None:
    """Warnings and errors only, so a failing test's output shows what matters."""
    configure_logging("console", "warning")


def refuse_in_fake(
    monkeypatch: pytest.MonkeyPatch, refused: set[str], message: Callable[[int], str]
) -> None:
    """Make the fake refuse any create holding one of `refused`, with `message(index)`.

    Our chunker already refuses every custom_id the real API would, so this emulates a
    server-side rule the client cannot know about.
    """
    check_envelope = validation._check_envelope

    def stricter(index: int, item: object) -> tuple[str, dict[str, object]]:
        custom_id, params = check_envelope(index, item)
        if custom_id in refused:
            raise validation.CreateRejected(message(index))
        return custom_id, params

    monkeypatch.setattr(validation, "_check_envelope", stricter)
