"""Heartbeats: the agent's health counters, sent to the collector at start, every interval and at exit."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from auris.v1 import agent_service_pb2, agent_service_pb2_grpc

__all__ = ["Heartbeat"]

logger = logging.getLogger(__name__)


class Heartbeat:
    """Sends ``snapshot()`` every ``interval_s`` from a background thread.

    A heartbeat that fails is not retried: the next one carries fresher counters.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        snapshot: Callable[[], agent_service_pb2.HeartbeatRequest],
        interval_s: float,
        timeout_s: float = 5.0,
    ) -> None:
        self._stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        self._snapshot = snapshot
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auris-heartbeat", daemon=True)
        self._failing = False
        self.sent = 0

    def start(self) -> None:
        self._thread.start()

    def send_now(self) -> bool:
        try:
            self._stub.Heartbeat(self._snapshot(), timeout=self._timeout_s)
        except grpc.RpcError as exc:
            if not self._failing:  # one line per outage, not one per beat
                code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
                logger.warning("heartbeat failed (%s); will keep trying every %.0fs", code, self._interval_s)
            self._failing = True
            return False
        if self._failing:
            logger.info("heartbeat delivered again")
        self._failing = False
        self.sent += 1
        return True

    def poke(self) -> None:
        """Send the next heartbeat now (after a model swap, so the collector sees it at once)."""
        self._wake.set()

    def stop(self, final: bool = True) -> None:
        """Stop the thread; with ``final`` send one last heartbeat with the closing counters."""
        self._stop.set()
        self._wake.set()
        self._thread.join(self._timeout_s + 1)
        if final:
            self.send_now()

    def _run(self) -> None:
        self.send_now()
        while True:
            self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.send_now()
