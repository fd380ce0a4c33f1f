"""The store: tasks, batches and results behind one interface (`Store`), whatever database.

Callers depend on the Protocols of `interface.py` and the values of `values.py`, and open a
store with `open_store`; every SQL statement lives below this package (`sqlite/`).
"""

from batchd.store.errors import (
    DatabaseMissingError,
    SchemaTooNewError,
    SchemaTooOldError,
    StoreError,
)
from batchd.store.factory import open_store
from batchd.store.interface import Store, StoreAccounts, WriteBackLane
from batchd.store.values import (
    AcknowledgeReport,
    AppliedRange,
    CancelReport,
    CandidateBatch,
    DuplicateBatch,
    EnqueueReport,
    FinishReport,
    ForgottenBatches,
    PendingFingerprint,
    PrunableTask,
    ResultGaps,
    ResultLine,
    SchemaVersions,
    SharedKeyEvidence,
    SizeTotals,
    StageReport,
    TakenBatch,
    UsageTotals,
    WaitingCancelReport,
)

__all__ = [
    "AcknowledgeReport",
    "AppliedRange",
    "CancelReport",
    "CandidateBatch",
    "DatabaseMissingError",
    "DuplicateBatch",
    "EnqueueReport",
    "FinishReport",
    "ForgottenBatches",
    "PendingFingerprint",
    "PrunableTask",
    "ResultGaps",
    "ResultLine",
    "SchemaTooNewError",
    "SchemaTooOldError",
    "SchemaVersions",
    "SharedKeyEvidence",
    "SizeTotals",
    "StageReport",
    "Store",
    "StoreAccounts",
    "StoreError",
    "TakenBatch",
    "UsageTotals",
    "WaitingCancelReport",
    "WriteBackLane",
    "open_store",
]
