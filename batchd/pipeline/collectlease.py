"""This daemon's hold on an ended batch while it collects it (docs/postgresql-design.md).

On PostgreSQL any daemon collects; one batch is collected by one daemon at a time under a
row lease (`Store.take_ended_batch`). The holder renews it every third of its length while
it downloads and applies; a renewal that finds the lease taken over marks it lost, and
the collector stops the batch at its next chunk (its writes so far were guarded, so
harmless). The finish is guarded by the lease in the store too: a holder cut off for
longer than the lease can never requeue as missing what the new holder writes.

A lease is taken over at its expiry, or at once when its holder is known dead: the daemon
holds a liveness lock for its whole life (`Store.collector_liveness`, entered by the
daemon's collect loop), and a lease whose holder's lock is gone is free. A holder that is
only cut off from that lock meets the same end as one frozen past its lease: its renewal
finds the batch taken and it stops; its finish is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from types import TracebackType

import structlog

from batchd.service.metrics import COLLECTIONS, Registry
from batchd.store import Store, StoreError, TakenBatch

log = structlog.get_logger("batchd.pipeline.collectlease")


def instance_name() -> str:
    """Who this daemon is in `batches.collector`: host, pid, and a few random hex digits
    (two containers may share a host name and a pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class CollectionLeaseLost(Exception):
    """Another daemon took over the batch this one was collecting: stop, write nothing more."""


class CollectionLease:
    """Renews `holder`'s lease on one batch while the context lasts; gives it back at the
    end unless the batch was finished (or the lease lost)."""

    def __init__(
        self,
        store: Store,
        local_id: int,
        api_batch_id: str | None,
        *,
        holder: str,
        lease_s: float,
        registry: Registry | None = None,
    ) -> None:
        self._store = store
        self._local_id = local_id
        self._api_batch_id = api_batch_id
        self._holder = holder
        self._lease_s = lease_s
        self._registry = registry
        self._renewing: asyncio.Task[None] | None = None
        self.lost = False
        self.finished = False

    def check(self) -> None:
        """Raise CollectionLeaseLost once a renewal found the batch taken over."""
        if self.lost:
            raise CollectionLeaseLost(f"collection of batch {self._api_batch_id} taken over")

    def lapsed(self) -> None:
        """The store refused the finish: the lease had lapsed (a renewal came too late)."""
        self._lose("finish refused: the lease had lapsed")

    async def stop_renewing(self) -> None:
        """Before the finish: its own guard checks the lease, and a renewal racing the
        finish would find the batch no longer `ended` and call the lease lost."""
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
            self._renewing = None

    async def __aenter__(self) -> CollectionLease:
        self._renewing = asyncio.create_task(
            self._renew_loop(), name=f"collection-lease-{self._local_id}"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop_renewing()
        if self.finished or self.lost:
            return
        # Stopped without finishing (a failed download, a shutdown): any daemon may take
        # the batch at once instead of after the expiry.
        with contextlib.suppress(StoreError):
            await self._store.give_back_collection(self._local_id, self._holder)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                held = await self._store.renew_collection(
                    self._local_id, self._holder, self._lease_s
                )
            except StoreError as exc:
                # The database is away: the lease may lapse meanwhile, and the finish's
                # guard then refuses; keep trying while the collection goes on.
                log.warning(
                    "collection_lease_renewal_failed", batch_id=self._api_batch_id, error=str(exc)
                )
                continue
            if not held:
                self._lose("another daemon took the batch over")
                return

    def _lose(self, why: str) -> None:
        if self.lost:
            return
        self.lost = True
        log.warning(
            "collection_lease_lost",
            batch_id=self._api_batch_id,
            local_id=self._local_id,
            holder=self._holder,
            reason=why,
        )
        if self._registry is not None and self._registry.declares(COLLECTIONS):
            self._registry.inc(COLLECTIONS, event="lease_lost")


def note_taken(found: TakenBatch, holder: str, registry: Registry | None) -> None:
    """Count a batch taken for collection, and say so when it was taken over."""
    event = "taken" if found.taken_over_from is None else "taken_over"
    if found.taken_over_from is not None:
        # The holder stopped renewing (killed, or cut off from the database) and its
        # lease ran out, or its liveness lock's session ended before that: its staging is
        # gone, this daemon downloads and applies again (lines it already wrote are
        # skipped by the apply's guard).
        log.warning(
            "collection_taken_over",
            batch_id=found.batch.api_batch_id,
            local_id=found.batch.local_id,
            previous_holder=found.taken_over_from,
            holder=holder,
            reason="holder_gone" if found.holder_gone else "lease_lapsed",
        )
    if registry is not None and registry.declares(COLLECTIONS):
        registry.inc(COLLECTIONS, event=event)
