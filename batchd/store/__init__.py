"""The store: every SQL statement of batchd lives below this package."""

from batchd.store.sqlite.store import (
    AppliedRange,
    CancelReport,
    EnqueueReport,
    FinishReport,
    ResultGaps,
    Row,
    SchemaTooNewError,
    SizeRow,
    StageReport,
    Store,
    StoreAccounts,
    StoreError,
    UsageRow,
    WriteBackLane,
)

__all__ = [
    "AppliedRange",
    "CancelReport",
    "EnqueueReport",
    "FinishReport",
    "ResultGaps",
    "Row",
    "SchemaTooNewError",
    "SizeRow",
    "StageReport",
    "Store",
    "StoreAccounts",
    "StoreError",
    "UsageRow",
    "WriteBackLane",
]
