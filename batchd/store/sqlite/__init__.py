"""The SQLite store: one file, WAL, a writer connection, a reader, and two write-back lanes."""

from batchd.store.sqlite.store import SqliteStore
from batchd.store.sqlite.writeback import SqliteWriteBackLane

__all__ = ["SqliteStore", "SqliteWriteBackLane"]
