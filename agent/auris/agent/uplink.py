"""The verdict uplink: batches to the collector over one gRPC stream, resent until acknowledged.

The producer hands batches to :meth:`Uplink.submit`; a background thread keeps a
``StreamVerdicts`` stream open, with at most ``window`` unacknowledged batches in
flight. A batch leaves memory only when the collector acknowledges its highest
sequence (the collector acknowledges only durable batches). On a broken stream
the thread reconnects with exponential backoff and resends every unacknowledged
batch; the collector stores each (agent id, sequence) once, so resends are safe.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import logging
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from auris.v1 import agent_service_pb2, agent_service_pb2_grpc, verdict_pb2

__all__ = ["Uplink", "UplinkStats", "is_loopback_target", "open_channel"]

logger = logging.getLogger(__name__)

# Errors after which retrying the same request cannot succeed.
_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}
_POLL_S = 0.2


def is_loopback_target(target: str) -> bool:
    """True when a host:port target names this machine."""
    host = target.rsplit(":", 1)[0].strip("[]") if ":" in target else target
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_channel(
    target: str, *, insecure: bool, ca_file: str = "", cert_file: str = "", key_file: str = ""
) -> grpc.Channel:
    """A channel to the collector: mTLS by default, plaintext only to loopback when insecure."""
    options = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ]
    if insecure:
        if not is_loopback_target(target):
            raise ValueError(f"--insecure only talks to a loopback collector, not {target}")
        return grpc.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes(),
        certificate_chain=Path(cert_file).read_bytes(),
    )
    return grpc.secure_channel(target, credentials, options=options)


@dataclasses.dataclass
class UplinkStats:
    verdicts_submitted: int = 0
    verdicts_acknowledged: int = 0
    duplicates: int = 0
    reconnects: int = 0
    acknowledged_sequence: int = 0


class Uplink:
    """Streams verdict batches to the collector from a background thread."""

    def __init__(
        self,
        channel: grpc.Channel,
        agent_id: str,
        *,
        window: int = 8,
        give_up_after_s: float = 300.0,
        backoff_max_s: float = 10.0,
    ) -> None:
        self._stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        self._agent_id = agent_id
        self._window = window
        self._give_up_after_s = give_up_after_s
        self._backoff_max_s = backoff_max_s
        self._queue: queue.Queue[list[verdict_pb2.Verdict] | None] = queue.Queue(maxsize=window * 4)
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[int, agent_service_pb2.StreamVerdictsRequest]] = (
            collections.deque()
        )
        self._input_closed = False
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auris-uplink", daemon=True)
        self.stats = UplinkStats()
        self.error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, verdicts: Sequence[verdict_pb2.Verdict]) -> None:
        """Queue one batch; blocks while the queue is full (backpressure to the meter)."""
        if not verdicts:
            return
        self.stats.verdicts_submitted += len(verdicts)
        while True:
            if self.error is not None:
                raise RuntimeError(self.error)
            try:
                self._queue.put(list(verdicts), timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def close(self, timeout: float | None = None) -> bool:
        """Signal end of input and wait until everything is acknowledged; True on success."""
        while self.error is None and self._thread.is_alive():
            try:
                self._queue.put(None, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        self._thread.join(timeout)
        return self.error is None and not self._thread.is_alive() and self.unacknowledged == 0

    def abort(self) -> None:
        self._abort.set()
        self._thread.join(5)

    @property
    def unacknowledged(self) -> int:
        with self._lock:
            pending = sum(len(req.verdicts) for _, req in self._pending)
        return pending + sum(len(b) for b in list(self._queue.queue) if b)

    def _requests(
        self, window: threading.Semaphore, dead: threading.Event
    ) -> Iterator[agent_service_pb2.StreamVerdictsRequest]:
        def acquire() -> bool:
            while not dead.is_set() and not self._abort.is_set():
                if window.acquire(timeout=_POLL_S):
                    return True
            return False

        with self._lock:
            resend = [req for _, req in self._pending]
        for req in resend:
            if not acquire():
                return
            yield req
        while not self._input_closed:
            if not acquire():
                return
            while True:
                if dead.is_set() or self._abort.is_set():
                    return
                try:
                    batch = self._queue.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    continue
            if batch is None:
                self._input_closed = True
                return
            req = agent_service_pb2.StreamVerdictsRequest(agent_id=self._agent_id, verdicts=batch)
            with self._lock:
                self._pending.append((batch[-1].sequence, req))
            yield req

    def _stream_once(self) -> None:
        window = threading.Semaphore(self._window)
        dead = threading.Event()
        responses = self._stub.StreamVerdicts(self._requests(window, dead))
        try:
            for response in responses:
                acked = response.acknowledged_sequence
                with self._lock:
                    while self._pending and self._pending[0][0] <= acked:
                        _, req = self._pending.popleft()
                        self.stats.verdicts_acknowledged += len(req.verdicts)
                    self.stats.acknowledged_sequence = max(self.stats.acknowledged_sequence, acked)
                    self.stats.duplicates += response.duplicates
                self._last_progress = time.monotonic()
                window.release()
        finally:
            dead.set()
            responses.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped

    def _run(self) -> None:
        backoff = 0.25
        self._last_progress = time.monotonic()
        while not self._abort.is_set():
            try:
                self._stream_once()
                with self._lock:
                    done = self._input_closed and not self._pending
                if done:
                    return
                backoff = 0.25
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                if code in _FATAL:
                    self.error = f"collector refused verdicts: {code.name}: {details}"
                    logger.error("%s", self.error)
                    return
                stalled = time.monotonic() - self._last_progress
                if stalled > self._give_up_after_s:
                    self.error = (
                        f"collector unreachable for {stalled:.0f}s ({code.name}: {details}); "
                        f"{self.unacknowledged} verdicts not acknowledged"
                    )
                    logger.error("%s", self.error)
                    return
                self.stats.reconnects += 1
                logger.warning("uplink %s: %s; retrying in %.1fs", code.name, details, backoff)
                self._abort.wait(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self._backoff_max_s)
