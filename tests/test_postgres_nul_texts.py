"""Texts from the API or a user that PostgreSQL cannot store as they came (a NUL; SQLite
stores it): the daemon's writes keep them with each NUL as the six characters `\\u0000`,
never failing every cycle; `batchd enqueue` refuses them with a clear error.

The API's words reach the store in a refused create's reason and per-request errors, a
task the refusal bisection convicts, a failed download's note and a lost batch's reason.
"""

from __future__ import annotations

import orjson
import pytest

from batchd.domain import TaskStatus
from batchd.store import Store
from tests.support.backends import Peek
from tests.support.cli import batchd
from tests.support.store import add_tasks, claim, pending_ids, submitted_batch

pytestmark = pytest.mark.both_stores


def kept(text: str, store_backend: str) -> str:
    """`text` as the store keeps it."""
    return text if store_backend == "sqlite" else text.replace("\x00", "\\u0000")


async def test_a_refused_create_quoting_a_nul_releases_its_tasks(
    store: Store, peek: Peek, store_backend: str
) -> None:
    await add_tasks(store, "a", "b")
    local_id = await claim(store, "a", "b")
    reason = "create refused: 400 invalid_request_error: requests.0: bad\x00value"

    await store.release_intent(local_id, reason, [("a", "bad\x00value")])

    assert peek.query("SELECT state, note FROM batches WHERE id = ?", local_id) == [
        ("rejected", kept(reason, store_backend))
    ]
    a, b = peek.task("a"), peek.task("b")
    assert (a["status"], a["error"]) == (TaskStatus.INVALID, kept("bad\x00value", store_backend))
    assert (b["status"], b["attempts"]) == (TaskStatus.PENDING, 0)


async def test_a_task_convicted_with_a_nul_in_the_reason_is_marked_invalid(
    store: Store, peek: Peek, store_backend: str
) -> None:
    await add_tasks(store, "c")
    [task_id] = await pending_ids(store, ("c",))

    assert await store.mark_invalid([(task_id, "refused: bad\x00value")]) == 1

    c = peek.task("c")
    assert (c["status"], c["error"]) == (
        TaskStatus.INVALID,
        kept("refused: bad\x00value", store_backend),
    )


async def test_a_download_failure_or_a_loss_quoting_a_nul_is_noted(
    store: Store, peek: Peek, store_backend: str
) -> None:
    failing = await submitted_batch(store, "msgbatch_f", "f1")
    assert await store.note_download_failed(failing, "500 api_error: oops\x00") == 1
    assert await store.note_short_stream(failing, "short\x00") == 1
    assert peek.query("SELECT download_attempts, note FROM batches WHERE id = ?", failing) == [
        (2, kept("short\x00", store_backend))
    ]
    lost = await submitted_batch(store, "msgbatch_l", "l1")

    assert await store.mark_lost(lost, "404 not_found_error: gone\x00") == 1

    assert peek.query("SELECT state, note FROM batches WHERE id = ?", lost) == [
        ("lost", kept("404 not_found_error: gone\x00", store_backend))
    ]
    l1 = peek.task("l1")
    assert (l1["status"], l1["error"]) == (
        TaskStatus.PENDING,
        kept("batch msgbatch_l lost: 404 not_found_error: gone\x00", store_backend),
    )


def test_enqueue_of_what_postgresql_cannot_store_is_refused_clearly(
    cli_env: dict[str, str], store_backend: str
) -> None:
    params = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x\x00"}]}
    nul_params = orjson.dumps({"custom_id": "nul-1", "params": params})
    nul_id = orjson.dumps({"custom_id": "nul\x00-2", "params": {**params, "messages": []}})
    assert b"\\u0000" in nul_params
    assert b"\\u0000" in nul_id

    done = [
        batchd("enqueue", "-", env=cli_env, stdin=line + b"\n") for line in (nul_params, nul_id)
    ]

    if store_backend == "sqlite":
        for each in done:
            assert each.returncode == 0, each.stderr
            assert each.stdout.startswith(b"enqueued 1 task(s)"), each.stdout
        return
    expected = (
        "the JSON holds the escape \\u0000, which jsonb cannot store: remove it",
        "the text holds a NUL character, which PostgreSQL cannot store: remove it",
    )
    for each, words in zip(done, expected, strict=True):
        error = each.stderr.decode()
        assert each.returncode != 0
        assert words in error, error
        assert "Traceback" not in error
        assert "internal error" not in error
