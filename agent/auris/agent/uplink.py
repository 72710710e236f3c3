"""The verdict uplink: spooled verdicts to the collector over one gRPC stream, until acknowledged.

A background thread keeps a ``StreamVerdicts`` stream open and sends batches read
from the :class:`~auris.agent.spool.Spool` in sequence order, with at most
``window`` unacknowledged batches in flight. The collector acknowledges a batch
only once it is durable; only then is it pruned from the spool. On a broken
stream the thread reconnects with jittered exponential backoff and resumes from
the last acknowledgement, so unacknowledged batches are replayed under the same
window. The collector stores each (agent id, sequence) once: at-least-once
delivery with an exactly-once effect.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import logging
import random
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

from auris.agent.spool import Spool
from auris.agent.wire import length_prefix
from auris.v1 import agent_service_pb2

__all__ = ["Uplink", "UplinkStats", "encode_batch", "is_loopback_target", "open_channel"]

logger = logging.getLogger(__name__)

_POLL_S = 0.2
# How long a partial batch waits for more verdicts before it is sent anyway.
_LINGER_S = 0.05
# Expected while a collector restarts or the network heals; anything else needs an operator.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# Trailing metadata with which the collector names the highest sequence of a refused batch,
# and, on a sequence conflict, the highest sequence it holds for this agent.
_REJECTED_SEQUENCE_KEY = "auris-rejected-sequence"
_STORED_SEQUENCE_KEY = "auris-stored-sequence"
# Trailing metadata of a rate-limit refusal (RESOURCE_EXHAUSTED): milliseconds to wait.
_RETRY_AFTER_KEY = "auris-retry-after-ms"


def _cancel(call: grpc.RpcContext | None) -> None:
    if call is not None:
        call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped


# Tags of StreamVerdictsRequest's fields 1 (agent_id) and 2 (verdicts), both length-delimited.
_AGENT_ID_TAG = bytes([(1 << 3) | 2])
_VERDICT_TAG = bytes([(2 << 3) | 2])


def encode_batch(agent_id: str, verdicts: Iterable[bytes]) -> bytes:
    """A serialised StreamVerdictsRequest, built from verdicts already serialised in the spool.

    Sending the spool's bytes as they are saves parsing and re-serialising every verdict.
    """
    name = agent_id.encode()
    parts = [_AGENT_ID_TAG, length_prefix(len(name)), name]
    for blob in verdicts:
        parts += [_VERDICT_TAG, length_prefix(len(blob)), blob]
    return b"".join(parts)


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
    target: str,
    *,
    insecure: bool,
    ca_file: str = "",
    cert_file: str = "",
    key_file: str = "",
    token: str = "",
) -> grpc.Channel:
    """A channel to the collector: TLS (with a client certificate when given: mTLS; with an API
    token when given) by default, plaintext only to loopback when insecure."""
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
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    return grpc.secure_channel(target, credentials, options=options)


@dataclasses.dataclass
class UplinkStats:
    verdicts_sent: int = 0
    verdicts_acknowledged: int = 0
    # Acknowledged verdicts the collector already had (resent after a reconnect).
    duplicates: int = 0
    # Verdicts the collector refused as malformed (dropped from the spool, never retried).
    rejected: int = 0
    # Verdicts given new sequences because the collector held their old ones from an earlier
    # life of this agent id.
    renumbered: int = 0
    reconnects: int = 0
    # Streams the collector ended because this agent was over its rate limit (the refused
    # verdicts stay spooled and are sent again after the wait it named).
    throttled: int = 0
    acknowledged_sequence: int = 0
    # Wall-clock time of the last acknowledgement (for health reports), and the same on the
    # monotonic clock (for timeouts).
    last_ack_time: float = 0.0
    last_ack_monotonic: float = 0.0


class Uplink:
    """Streams the spool to the collector from a background thread."""

    def __init__(
        self,
        channel: grpc.Channel,
        agent_id: str,
        spool: Spool,
        *,
        batch: int = 256,
        window: int = 8,
        backoff_max_s: float = 10.0,
        ack_timeout_s: float = 60.0,
    ) -> None:
        service = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
        # The generated stub would serialise messages; this one sends encode_batch()'s bytes.
        self._stream_verdicts = channel.stream_stream(
            f"/{service}/StreamVerdicts",
            request_serializer=None,
            response_deserializer=agent_service_pb2.StreamVerdictsResponse.FromString,
        )
        self._agent_id = agent_id
        self._spool = spool
        self._batch = batch
        self._window = window
        self._backoff_max_s = backoff_max_s
        self._ack_timeout_s = ack_timeout_s
        # The open stream, so that stop() and the acknowledgement watchdog can cancel it.
        self._call: grpc.RpcContext | None = None
        self._input_closed = threading.Event()
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="auris-uplink", daemon=True)
        self.stats = UplinkStats()
        self.last_error = ""

    def start(self) -> None:
        self._thread.start()

    def finish(
        self, stall_timeout_s: float, stop: threading.Event | None = None, drain_timeout_s: float = 10.0
    ) -> bool:
        """No more verdicts will be spooled: drain the spool, return True once all are acknowledged.

        Gives up (False) when no acknowledgement arrived for ``stall_timeout_s``, or
        ``drain_timeout_s`` after ``stop`` is set (also when it is set while draining);
        what was not acknowledged stays in the spool for the next start.
        """
        self._input_closed.set()
        last_progress = time.monotonic()
        stopped_at: float | None = None
        acked = self.stats.verdicts_acknowledged
        while self._thread.is_alive():
            if self._spool.stats.depth == 0:
                self.stop()  # all acknowledged; the thread may be waiting on a collector we no longer need
                return True
            self._thread.join(_POLL_S)
            now = time.monotonic()
            if stop is not None and stop.is_set() and stopped_at is None:
                stopped_at = now
            if self.stats.verdicts_acknowledged != acked:
                acked = self.stats.verdicts_acknowledged
                last_progress = now
            elif now - last_progress > stall_timeout_s or (
                stopped_at is not None and now - stopped_at > drain_timeout_s
            ):
                self.stop()
                return False
        return self._spool.stats.depth == 0

    def stop(self) -> None:
        self._abort.set()
        _cancel(self._call)
        self._thread.join(10)

    def _requests(
        self,
        window: threading.Semaphore,
        dead: threading.Event,
        in_flight: collections.deque[tuple[int, int]],
    ) -> Iterator[bytes]:
        """Batches after the last acknowledgement; runs on gRPC's request-consuming thread."""
        sent = self.stats.acknowledged_sequence
        last_progress = time.monotonic()
        while True:
            while not window.acquire(timeout=_POLL_S):
                if dead.is_set() or self._abort.is_set():
                    return
                # A collector that keeps the stream open but stops acknowledging: start over.
                acked = self.stats.last_ack_monotonic
                if in_flight and time.monotonic() - max(acked, last_progress) > self._ack_timeout_s:
                    logger.warning("no acknowledgement for %.0fs; reconnecting", self._ack_timeout_s)
                    _cancel(self._call)
                    return
            lingered = False
            while True:
                if dead.is_set() or self._abort.is_set():
                    return
                available = self._spool.last_sequence - sent
                if available < self._batch and not lingered and not self._input_closed.is_set():
                    # A partial batch: give it a moment to fill (fewer, fuller batches cost the
                    # agent and the collector less), then send what there is.
                    if available > 0:
                        lingered = True
                        self._spool.wait_for_more(sent, _LINGER_S, self._batch)
                    else:
                        self._spool.wait_for_more(sent, _POLL_S)
                    continue
                batch = self._spool.read_raw_after(sent, self._batch)
                if batch:
                    break
                if self._input_closed.is_set() and self._spool.stats.last_sequence <= sent:
                    return  # everything is sent: half-close, then wait for the last acks
                lingered = False
                self._spool.wait_for_more(sent, _POLL_S)
            sent = batch[-1][0]
            last_progress = time.monotonic()
            with self._lock:
                in_flight.append((sent, len(batch)))
                self.stats.verdicts_sent += len(batch)
            yield encode_batch(self._agent_id, (blob for _, blob in batch))

    def _stream_once(self, in_flight: collections.deque[tuple[int, int]]) -> None:
        window = threading.Semaphore(self._window)
        dead = threading.Event()
        responses = self._stream_verdicts(self._requests(window, dead, in_flight))
        self._call = responses
        try:
            for response in responses:
                acked = response.acknowledged_sequence
                self._spool.acknowledge(acked)
                with self._lock:
                    while in_flight and in_flight[0][0] <= acked:
                        in_flight.popleft()
                    self.stats.verdicts_acknowledged += response.accepted + response.duplicates
                    self.stats.duplicates += response.duplicates
                    self.stats.acknowledged_sequence = max(self.stats.acknowledged_sequence, acked)
                    self.stats.last_ack_time = time.time()
                    self.stats.last_ack_monotonic = time.monotonic()
                window.release()
        finally:
            dead.set()
            _cancel(responses)

    def _reject(self, exc: grpc.Call, in_flight: collections.deque[tuple[int, int]], details: str) -> bool:
        """Drop the batch the collector refused as malformed, if it named one; True if it did."""
        named = dict(exc.trailing_metadata() or ()).get(_REJECTED_SEQUENCE_KEY)
        batch = next(((top, count) for top, count in in_flight if str(top) == named), None)
        if batch is None:
            return False
        top, count = batch
        self._spool.acknowledge(top)
        with self._lock:
            self.stats.rejected += count
            self.stats.acknowledged_sequence = max(self.stats.acknowledged_sequence, top)
        logger.error(
            "collector refused %d verdicts (up to sequence %d) as malformed: %s", count, top, details
        )
        return True

    def _renumber(self, stored: int) -> None:
        moved = self._spool.renumber_after(stored)
        with self._lock:
            self.stats.renumbered += moved
            self.stats.acknowledged_sequence = max(self.stats.acknowledged_sequence, stored)
        logger.error(
            "the collector already holds sequences up to %d of agent %s from an earlier life (state "
            "directory lost or shared?); %d spooled verdicts renumbered after it",
            stored,
            self._agent_id,
            moved,
        )

    def _run(self) -> None:
        backoff = 0.25
        while not self._abort.is_set():
            in_flight: collections.deque[tuple[int, int]] = collections.deque()
            try:
                self._stream_once(in_flight)
                if self._input_closed.is_set() and self._spool.stats.depth == 0:
                    return
                backoff = 0.25
                continue
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = (exc.details() if isinstance(exc, grpc.Call) else str(exc)) or ""
                self.last_error = f"{code.name}: {details}"
                if self._abort.is_set():
                    return
                if (
                    code == grpc.StatusCode.INVALID_ARGUMENT
                    and isinstance(exc, grpc.Call)
                    and self._reject(exc, in_flight, details)
                ):
                    continue  # a batch-level refusal: the rest of the spool goes on
                stored = (
                    dict(exc.trailing_metadata() or ()).get(_STORED_SEQUENCE_KEY)
                    if code == grpc.StatusCode.FAILED_PRECONDITION and isinstance(exc, grpc.Call)
                    else None
                )
                retry_after = (
                    dict(exc.trailing_metadata() or ()).get(_RETRY_AFTER_KEY)
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and isinstance(exc, grpc.Call)
                    else None
                )
                if retry_after is not None and str(retry_after).isdigit():
                    # Over the collector's rate limit: wait as long as it says (not the growing
                    # backoff, which would slow the agent far below its allowed rate), then resend
                    # from the last acknowledgement.
                    wait_s = min(int(retry_after) / 1000, 60.0) * (1 + 0.25 * random.random())
                    with self._lock:
                        self.stats.throttled += 1
                        throttled = self.stats.throttled
                    # A summary, not a line per refusal: the first, then every hundredth.
                    if throttled == 1 or throttled % 100 == 0:
                        logger.warning(
                            "uplink rate-limited by the collector (%d times so far); resending in %.2fs",
                            throttled,
                            wait_s,
                        )
                    self._abort.wait(wait_s)
                    continue
                if stored is not None:
                    # Then back off like any refusal: two running agents sharing one id would
                    # otherwise renumber against each other without pause.
                    self._renumber(int(stored))
                else:
                    self.stats.reconnects += 1
                    log = logger.warning if code in _TRANSIENT else logger.error
                    log("uplink %s: %s; retrying in %.1fs", code.name, details, backoff)
            except Exception:  # never let the uplink thread die: the spool keeps everything
                logger.exception("uplink failed unexpectedly; retrying in %.1fs", backoff)
            self._abort.wait(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._backoff_max_s)
