"""Group commit: agents' batches from every stream share transactions, each acknowledged once durable.

While one group commits on the writer thread, the batches that arrive meanwhile gather; the
next group takes all of them (up to a cap). Under load many batches share each commit (and its
WAL write), unloaded a lone batch commits at once: no timer, no added wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from auris.collector.store import IngestBatch, IngestResult, SequenceConflict, VerdictStore

__all__ = ["Committed", "GroupCommitter"]

logger = logging.getLogger(__name__)

# Called on the event loop after a group commits (after the streams waiting on it have been
# woken to acknowledge), with each stored batch and its result, in commit order.
Committed = Callable[[list[tuple[IngestBatch, IngestResult]]], None]


class GroupCommitter:
    """Serialises ingest onto the writer executor, one transaction per gathered group."""

    def __init__(
        self,
        store: VerdictStore,
        writer: ThreadPoolExecutor,
        committed: Committed | None = None,
        max_group_verdicts: int = 16_384,
    ) -> None:
        self._store = store
        self._writer = writer
        self._committed = committed
        self._max = max_group_verdicts
        self._pending: list[tuple[IngestBatch, asyncio.Future[IngestResult]]] = []
        self._pump: asyncio.Task[None] | None = None
        # Statistics: groups committed and batches in them (the benchmark reports the ratio).
        self.groups = 0
        self.batches = 0

    async def ingest(self, batch: IngestBatch) -> IngestResult:
        """Store ``batch``; return once the transaction holding it has committed. Raises the
        batch's SequenceConflict, or whatever failed the whole group."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[IngestResult] = loop.create_future()
        self._pending.append((batch, future))
        if self._pump is None:
            self._pump = loop.create_task(self._run())
        return await future

    def _take(self) -> list[tuple[IngestBatch, asyncio.Future[IngestResult]]]:
        size = 0
        for n, (batch, _) in enumerate(self._pending):
            size += len(batch.rows)
            if size > self._max and n:
                group, self._pending = self._pending[:n], self._pending[n:]
                return group
        group, self._pending = self._pending, []
        return group

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                group = self._take()
                try:
                    outcomes = await loop.run_in_executor(
                        self._writer, self._store.ingest_group, [batch for batch, _ in group]
                    )
                except Exception as exc:  # the whole group is rolled back: every stream hears it
                    logger.error("ingest of %d batches failed: %s", len(group), exc)
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.groups += 1
                self.batches += len(group)
                stored: list[tuple[IngestBatch, IngestResult]] = []
                for (batch, future), outcome in zip(group, outcomes, strict=True):
                    if isinstance(outcome, SequenceConflict):
                        if not future.done():
                            future.set_exception(outcome)
                        continue
                    # A stream that went away meanwhile leaves its batch stored all the same
                    # (the agent's resend is then a duplicate).
                    if not future.done():
                        future.set_result(outcome)
                    stored.append((batch, outcome))
                if self._committed is not None and stored:
                    # After the woken streams have handed their acknowledgements to gRPC.
                    loop.call_soon(self._committed, stored)
        finally:
            self._pump = None
