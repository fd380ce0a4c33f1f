"""This daemon's part among the daemons of its database, as logs, STATUS, /healthz and the
metrics show it (docs/operations.md, "Several daemons").

The leader submits, reconciles, cancels and LISTENs; every daemon, leader or standby,
polls and collects (PostgreSQL). A SQLite file admits one daemon, which always leads.
"""

from __future__ import annotations

from batchd.service.metrics import LEADER, Registry
from batchd.store.interface import Leadership

STANDBY_WORK = "polls and collects"


class Role:
    """Whether this daemon leads, read from its leadership (None until it is entered)."""

    def __init__(self, registry: Registry, instance: str, *, shared: bool) -> None:
        self.leadership: Leadership | None = None
        self.instance = instance  # as the collection leases name it (`batches.collector`)
        self._shared = shared  # a database several daemons may share (PostgreSQL)
        # Tried for the lock and another daemon held it; until then (the first try at
        # start) this daemon is neither leader nor standby yet.
        self.standing_by = False
        registry.set_callback(LEADER, self._leader_gauge)

    @property
    def leading(self) -> bool:
        return self.leadership is not None and self.leadership.leading

    @property
    def name(self) -> str:
        if self.leading:
            return "leader"
        return "standby" if self.standing_by else "starting"

    def status_prefix(self) -> str:
        """Before the systemd STATUS line's counts: nothing for the leader."""
        return f"standby ({STANDBY_WORK}): " if self.name == "standby" else ""

    def health_note(self) -> str | None:
        """A /healthz note: what this daemon does (a standby is healthy); None where only
        one daemon can run (SQLite's file lock): it always does everything."""
        if not self._shared:
            return None
        if self.name == "leader":
            return f"role: leader (submits, polls and collects) as {self.instance}"
        if self.name == "standby":
            return f"role: standby ({STANDBY_WORK}; another daemon leads) as {self.instance}"
        return f"role: starting (trying for the leader lock) as {self.instance}"

    async def _leader_gauge(self) -> float:
        return 1.0 if self.leading else 0.0
