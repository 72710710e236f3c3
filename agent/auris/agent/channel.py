"""The channel nfstream's meter processes send flows on, with flows sent in batches.

CPython's ``multiprocessing.Queue`` pickles and writes every object by itself, from a feeder
thread that wakes once per object. For nfstream's meter that is a pickle of ~2.3 kB per flow
(each flow spells out the names of its ~100 slots), one pipe write, and a handoff of the meter
process's GIL between the thread that meters packets and the feeder, per flow: the meter spent
about a third of an agent's run waiting for its own GIL. Here a meter's flows are handed to the
feeder ``BATCH`` at a time (or after ``LINGER_S`` when flows come slowly, and at once for
anything that is not a flow: nfstream's end marker and errors) and pickled together, so a
flow's slot names are written once per batch: ~0.6 kB and about half the pickling and
unpickling time per flow, and one wake-up per batch.

A batch reaches nfstream's reader as one ``FlowBatch``, which it passes on as if it were one
flow; ``auris.agent.meter`` takes it apart. There a ``shape`` function has already made each
flow the agent's record, in the meter process: unpickling records costs the agent about a third
of what unpickling NFlows and building the records did (5 us a flow against 10 + 5), and the
meter pickles less (7.6 us a flow with the shaping, against 10). Messages that are not batches
(nfstream's end marker and errors, and what ``auris.agent.meter`` writes on the channel of a
meter that died) travel and are read by themselves, as before.
"""

from __future__ import annotations

import collections
import multiprocessing.queues
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from auris.agent import lean  # noqa: F401  (before nfstream: it imports nfstream without pandas)

# isort: split
from nfstream.flow import NFlow
from nfstream.utils import InternalError, NFEvent

__all__ = ["BATCH", "LINGER_S", "FlowBatch", "FlowChannel"]

# Flows per message. Past ~64 the pickle per flow gets no smaller (the slot names are already
# written once) and a batch waits longer for its last flow.
BATCH = 64
# How long a flow may wait for the rest of its batch: the flows of a quiet live link still reach
# the agent within about this (checked every LINGER_S / 2).
LINGER_S = 0.05


class FlowBatch(list):  # type: ignore[type-arg]
    """Flows (or what ``shape`` made of them) that travel as one message.

    nfstream's reader takes it for one flow: it checks and renumbers its ``id``, then yields it.
    """

    __slots__ = ("id",)
    id: NFEvent


class FlowChannel(multiprocessing.queues.Queue):  # type: ignore[type-arg]
    """A ``multiprocessing.Queue`` that sends a meter's flows in batches (see the module doc).

    ``shape`` (picklable: it travels to the meter process with the channel) turns each flow into
    what the reader wants, in the meter process, as the flow is put. ``get`` returns a
    ``FlowBatch`` for flows, and anything else as it was put.
    """

    # CPython's Queue internals this class and ``auris.agent.meter`` use (typeshed omits them).
    _buffer: collections.deque[Any]
    _closed: bool
    _notempty: threading.Condition
    _start_thread: Callable[[], None]  # starts the feeder thread
    _sem: Any  # multiprocessing BoundedSemaphore: one acquire per put, one release per get
    _thread: threading.Thread | None
    _wlock: Any  # multiprocessing Lock held while a message is written
    _writer: Any  # multiprocessing.connection.Connection

    def __init__(self, maxsize: int = 0, *, ctx: Any, shape: Callable[[NFlow], Any] | None = None) -> None:
        super().__init__(maxsize, ctx=ctx)
        self._shape = shape

    # (typeshed's Queue state is the base class's tuple; this one carries ``shape`` beside it)
    def __getstate__(self) -> tuple[Any, Callable[[NFlow], Any] | None]:  # type: ignore[override]
        return super().__getstate__(), self._shape

    def __setstate__(self, state: tuple[Any, Callable[[NFlow], Any] | None]) -> None:  # type: ignore[override]
        queue_state, self._shape = state
        super().__setstate__(queue_state)

    def _reset(self, after_fork: bool = False) -> None:
        super()._reset(after_fork)  # type: ignore[misc]
        self._batch = FlowBatch()  # the writer's flows not handed to the feeder yet
        self._batch_since = 0.0
        self._flusher: threading.Thread | None = None

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if not self._sem.acquire(block, timeout):
            raise queue.Full
        flow = type(obj) is NFlow
        if flow and self._shape is not None:
            try:
                obj = self._shape(obj)
            except Exception as exc:  # a bug, not bad input: end the source with it, in the agent
                obj, flow = InternalError(NFEvent.ERROR, f"cannot make a flow record: {exc!r}"), False
        with self._notempty:
            if self._thread is None:
                self._start_thread()
                self._flusher = threading.Thread(
                    target=self._flush_lingering, name="auris-channel-linger", daemon=True
                )
                self._flusher.start()
            batch = self._batch
            if flow:
                if not batch:
                    self._batch_since = time.monotonic()
                batch.append(obj)
                if len(batch) >= BATCH:
                    self._hand_over()
            else:  # nfstream's end marker or an error: after the flows before it, by itself
                if batch:
                    self._hand_over()
                self._buffer.append(obj)
                self._notempty.notify()

    def _hand_over(self) -> None:
        """Give the batch to the feeder thread (the caller holds ``_notempty``)."""
        self._batch.id = NFEvent.FLOW
        self._buffer.append(self._batch)
        self._batch = FlowBatch()
        self._notempty.notify()

    def _on_queue_feeder_error(self, e: Exception, obj: Any) -> None:
        """A message the feeder could not pickle is lost: say so, and give back the semaphore
        counts of its flows (the feeder gave back one)."""
        if type(obj) is FlowBatch:
            for _ in range(len(obj) - 1):
                self._sem.release()
        count = len(obj) if type(obj) is FlowBatch else 1
        print(f"auris meter: {count} flow(s) lost, cannot send them: {e!r}", file=sys.stderr, flush=True)

    def _flush_lingering(self) -> None:
        while not self._closed:
            time.sleep(LINGER_S / 2)
            with self._notempty:
                if self._batch and time.monotonic() - self._batch_since >= LINGER_S:
                    self._hand_over()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        message = super().get(block, timeout)  # released the semaphore for one put
        if type(message) is FlowBatch:
            release = self._sem.release
            for _ in range(len(message) - 1):
                release()
        return message
