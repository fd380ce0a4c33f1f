"""Tasks canceled by the user ─► their batches canceled on the API, once nothing in them waits.

Its own module, not the poller's: it shares no state with the poller and runs each submit
step (cancels reach the API within about a second, not a poll interval later), and it
moves a batch from `in_progress` to `canceling`, which the poller then follows as usual.
"""

from __future__ import annotations

import structlog

from batchd.api import ApiError, AuthenticationError, BatchesClient
from batchd.store import Store

log = structlog.get_logger("batchd.pipeline.cancels")


class Canceler:
    def __init__(self, store: Store, client: BatchesClient) -> None:
        self._store = store
        self._client = client

    async def cancel_requested(self) -> None:
        """Cancel batches in which every task still waiting was canceled by the user."""
        for batch in await self._store.batches_to_cancel():
            if batch.api_batch_id is None:
                continue
            try:
                await self._client.cancel(batch.api_batch_id)
            except AuthenticationError:
                raise
            except ApiError as exc:
                log.warning("batch_cancel_failed", batch_id=batch.api_batch_id, error=str(exc))
                continue
            await self._store.mark_canceling(batch.local_id)
            log.info("batch_canceling", batch_id=batch.api_batch_id)
