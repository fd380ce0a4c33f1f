"""Test-only: kill this process at a named point, to prove crash safety (tests/crash/).

`BATCHD_CRASH_AT=<point>:<n>` makes the n-th call of `crash_point("<point>")` in this
process send itself SIGKILL, exactly as `kill -9` would, after one line on stderr saying
where. Several may be given, comma-separated. Unset (always, outside the crash tests),
`crash_point` returns at once: the variable is read once, at import.

Never set it on a real deployment: it exists so the crash harness can stop the daemon
at a chosen moment (after the intent is committed, after a create returned, between two
result chunks...) instead of at a random one.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV_VAR = "BATCHD_CRASH_AT"


def _parse(text: str) -> dict[str, int]:
    targets: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, nth = item.partition(":")
        targets[name] = int(nth or "1")
    return targets


_TARGETS = _parse(os.environ.get(ENV_VAR, ""))
_hits: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Die here on the configured hit of `name`; free when no crash point is configured."""
    if not _TARGETS or name not in _TARGETS:
        return
    _hits[name] += 1
    if _hits[name] == _TARGETS[name]:
        sys.stderr.write(f"batchd crash point reached: {name}:{_hits[name]}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
