"""Read-only views for operators (issue 14): what `status --watch` needs beyond counts."""

from __future__ import annotations

from datetime import datetime

from batchd.store.sqlite.database import SqliteDatabase, format_time


class OperatorViews:
    """Reads for operator views (part of SqliteStore); nothing here writes."""

    _db: SqliteDatabase

    async def completed_since(self, since: datetime) -> tuple[int, datetime | None]:
        """Tasks that reached a final status at or after `since`, and the first such time.

        The throughput of `status --watch`: measured from the database, it is right from
        the first screen, however recently the view was started.
        """
        rows = await self._db.read(
            "SELECT count(*), min(completed_at) FROM tasks WHERE completed_at >= ?",
            (format_time(since),),
        )
        count, first = rows[0]
        return int(count), None if first is None else datetime.fromisoformat(str(first))
