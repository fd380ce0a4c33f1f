"""The store: tasks, batches and results behind one interface (`Store`), whatever database.

Callers depend on the Protocols of `interface.py` and the values of `values.py`, and open a
store with `open_store`; every SQL statement lives below this package (`sqlite/`,
`postgres/`).
"""

from batchd.store import values
from batchd.store.accounts import StoreAccounts
from batchd.store.errors import (
    DatabaseMissingError,
    SchemaTooNewError,
    SchemaTooOldError,
    StoreError,
)
from batchd.store.factory import open_store
from batchd.store.interface import Store, WriteBackLane

# Every value of values.py, by the list kept there (named once, not again here).
from batchd.store.values import *  # noqa: F403

__all__ = [
    "DatabaseMissingError",
    "SchemaTooNewError",
    "SchemaTooOldError",
    "Store",
    "StoreAccounts",
    "StoreError",
    "WriteBackLane",
    "open_store",
]
__all__ += values.__all__
