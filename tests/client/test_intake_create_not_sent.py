"""Review 7 finding 7: a create whose connection never opened cannot have created a batch
(`CreateNotSent`: its tasks may go out again at once); one whose connection opened and
then failed may have (`CreateOutcomeUnknown`: reconcile first). aiohttp's own exceptions
through aioresponses, then real sockets on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from aioresponses import aioresponses
from yarl import URL

from batchd.api import (
    ApiConnectionError,
    BytesBody,
    CreateNotSent,
    CreateOutcomeUnknown,
    RetryPolicy,
)
from tests.support.client import BATCHES, Sleeps, batch_json

_KEY = ConnectionKey("api.example.test", 443, True, True, None, None, None)

NEVER_OPENED = [
    aiohttp.ClientConnectorError(_KEY, ConnectionRefusedError(111, "Connect call failed")),
    aiohttp.ClientConnectorDNSError(_KEY, OSError(-2, "Name or service not known")),
    aiohttp.ClientConnectorCertificateError(
        _KEY, ssl.SSLCertVerificationError(1, "certificate verify failed")
    ),
    aiohttp.ClientProxyConnectionError(_KEY, ConnectionRefusedError(111, "proxy refused")),
    aiohttp.ConnectionTimeoutError("Connection timeout to host api.example.test"),
]
MAYBE_SENT = [
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientOSError(104, "Connection reset by peer"),
    aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
    aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
    aiohttp.ClientPayloadError("Response payload is not completed"),
    TimeoutError(),  # the total timeout: it may fire after the body went out
]


def posts(mock: aioresponses) -> int:
    return len(mock.requests.get(("POST", URL(BATCHES)), []))


@pytest.mark.parametrize("error", NEVER_OPENED, ids=lambda error: type(error).__name__)
async def test_a_create_whose_connection_never_opened_is_not_sent(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps, error: Exception
) -> None:
    mocked.post(BATCHES, exception=error, repeat=True)
    with pytest.raises(CreateNotSent, match="no batch was created") as caught:
        await make_client().create(BytesBody(b"{}"))
    assert isinstance(caught.value.cause, ApiConnectionError)
    assert caught.value.cause.connected is False
    assert not isinstance(caught.value, CreateOutcomeUnknown)
    assert posts(mocked) == 1  # never retried, as any create
    assert sleeps == []


@pytest.mark.parametrize("error", MAYBE_SENT, ids=lambda error: type(error).__name__)
async def test_a_create_whose_connection_failed_after_opening_stays_unknown(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps, error: Exception
) -> None:
    mocked.post(BATCHES, exception=error, repeat=True)
    with pytest.raises(CreateOutcomeUnknown, match="list endpoint") as caught:
        await make_client().create(BytesBody(b"{}"))
    assert isinstance(caught.value.cause, ApiConnectionError)
    assert caught.value.cause.connected is True
    assert posts(mocked) == 1
    assert sleeps == []


async def test_other_calls_still_retry_a_refused_connection(
    mocked: aioresponses, make_client: Any, sleeps: Sleeps
) -> None:
    mocked.get(f"{BATCHES}/b", exception=NEVER_OPENED[0])
    mocked.get(f"{BATCHES}/b", payload=batch_json("b"))
    batch = await make_client().retrieve("b")
    assert batch["id"] == "b"
    assert len(sleeps) == 1


# ─── real sockets on loopback ────────────────────────────────────────────────────────


def dead_port() -> int:
    """A loopback port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_create_to_a_port_nobody_listens_on_is_not_sent(make_client: Any) -> None:
    client = make_client(f"http://127.0.0.1:{dead_port()}", policy=RetryPolicy(max_retries=0))
    with pytest.raises(CreateNotSent, match="no batch was created") as caught:
        await client.create(BytesBody(b'{"requests":[]}'))
    assert "Cannot connect to host 127.0.0.1" in str(caught.value)


@pytest.fixture
async def resetting_api() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that reads the whole create request, then resets the connection (RST)
    without answering: the request arrived, the answer never comes."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        received.append(await reader.readexactly(length))
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.close()
        await server.wait_closed()


async def test_a_create_reset_after_it_was_received_stays_unknown(
    resetting_api: tuple[str, list[bytes]], make_client: Any
) -> None:
    base_url, received = resetting_api
    with pytest.raises(CreateOutcomeUnknown) as caught:
        await make_client(base_url).create(BytesBody(b'{"requests":[]}'))
    assert received == [b'{"requests":[]}']  # the server had the whole request
    assert isinstance(caught.value.cause, ApiConnectionError)
    assert caught.value.cause.connected is True
