"""`--state FILE`: the fake's state as one JSON document, written atomically.

A fake restarted with the same file still knows its batches, so daemon restarts can
be tested against a long-lived "server". Written after every mutation (create,
cancel, delete, clock advance); fault counters are run-time only and not kept.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from batchd.api.wire import format_timestamp, parse_timestamp
from batchd.fakeapi.faults import RequestFate
from batchd.fakeapi.state import FakeBatch, FakeState, Stats
from batchd.fakeapi.validation import ParsedRequests

FORMAT_VERSION = 1
FATE_CODES: dict[RequestFate, str] = {"succeeded": "s", "errored": "e", "expired": "x"}
FATES_BY_CODE: dict[str, RequestFate] = {code: fate for fate, code in FATE_CODES.items()}


class StateFileError(Exception):
    """The state file cannot be read back."""


def save_state(path: Path, state: FakeState, clock_offset_seconds: float) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    document = {
        "version": FORMAT_VERSION,
        "clock_offset_seconds": clock_offset_seconds,
        "seq_by_id": state.seq_by_id,
        "stats": {
            "creates_attempted": state.stats.creates_attempted,
            "creates_accepted": state.stats.creates_accepted,
            "requests_received": state.stats.requests_received,
            "submissions": dict(state.stats.submissions),
        },
        "batches": [_batch_json(batch) for batch in state.batches.values()],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as out:
        out.write(orjson.dumps(document))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def load_state(path: Path, state: FakeState) -> float:
    """Fill an empty `state` from `path`; return the saved clock offset in seconds."""
    try:
        document = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise StateFileError(f"cannot read fake API state {path}: {exc}") from exc
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        raise StateFileError(f"{path}: not a fake API state file of version {FORMAT_VERSION}")
    try:
        stats = document["stats"]
        state.stats = Stats(
            creates_attempted=stats["creates_attempted"],
            creates_accepted=stats["creates_accepted"],
            requests_received=stats["requests_received"],
        )
        state.stats.submissions.update(stats["submissions"])
        for batch in document["batches"]:
            state.add(_batch_from_json(batch))
        state.seq_by_id.update(document["seq_by_id"])
        offset = float(document["clock_offset_seconds"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"{path}: damaged fake API state ({exc!r})") from exc
    state.reseed()
    return offset


def _batch_json(batch: FakeBatch) -> dict[str, Any]:
    requests = batch.requests
    return {
        "id": batch.id,
        "seq": batch.seq,
        "created_at": format_timestamp(batch.created_at),
        "expires_at": format_timestamp(batch.expires_at),
        "cancel_initiated_at": (
            format_timestamp(batch.cancel_initiated_at) if batch.cancel_initiated_at else None
        ),
        "seed": batch.seed,
        "custom_ids": requests.custom_ids,
        "models": requests.models,
        "max_tokens": requests.max_tokens,
        "texts": requests.texts,
        "input_bytes": requests.input_bytes,
        "errors": [[index, *error] for index, error in requests.errors.items()],
        "fates": "".join(FATE_CODES[fate] for fate in batch.fates),
        "finish_us": batch.finish_us,
        "injected_errors": [[index, *error] for index, error in batch.injected_errors.items()],
    }


def _batch_from_json(saved: dict[str, Any]) -> FakeBatch:
    requests = ParsedRequests(
        custom_ids=saved["custom_ids"],
        models=saved["models"],
        max_tokens=saved["max_tokens"],
        texts=saved["texts"],
        input_bytes=saved["input_bytes"],
        errors={int(index): (kind, text) for index, kind, text in saved["errors"]},
    )
    cancel = saved["cancel_initiated_at"]
    return FakeBatch(
        id=saved["id"],
        seq=int(saved["seq"]),
        created_at=parse_timestamp(saved["created_at"]),
        expires_at=parse_timestamp(saved["expires_at"]),
        seed=int(saved["seed"]),
        requests=requests,
        fates=[FATES_BY_CODE[code] for code in saved["fates"]],
        finish_us=[int(offset) for offset in saved["finish_us"]],
        cancel_initiated_at=parse_timestamp(cancel) if cancel else None,
        injected_errors={
            int(index): (kind, text, request_id)
            for index, kind, text, request_id in saved["injected_errors"]
        },
    )
