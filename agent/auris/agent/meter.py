"""Flow metering: packets in, bidirectional flow records out (nfstream is the engine)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import pickle
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, NamedTuple

from auris.agent import lean  # noqa: F401  (before nfstream: it imports nfstream without pandas)

# isort: split
from nfstream import NFStreamer
from nfstream.utils import InternalError, NFEvent

from auris.agent import meterserver
from auris.agent.channel import FlowBatch, FlowChannel
from auris.agent.features import FeatureSet
from auris.v1 import flow_pb2

__all__ = [
    "CaptureCounters",
    "FlowRecord",
    "MeterOptions",
    "MeterStats",
    "capture_counters",
    "meter_batches",
    "meter_flows",
    "meter_source",
    "preload_in_meter_processes",
    "report_dead_meters",
    "source_label",
    "stop_meters",
]

logger = logging.getLogger(__name__)

# nfstream's expiration_id -> our end reason. nfstream expires the flows still cached when
# a capture ends with the idle id, so those read as idle timeouts too.
_END_REASONS = {
    0: flow_pb2.FLOW_END_REASON_IDLE_TIMEOUT,
    1: flow_pb2.FLOW_END_REASON_ACTIVE_TIMEOUT,
    -1: flow_pb2.FLOW_END_REASON_EVICTED,
}


class FlowRecord(NamedTuple):
    """One metered bidirectional flow and its feature vectors (a tuple: a quarter of a frozen
    dataclass's cost to build, and built once per flow)."""

    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    protocol: int
    ip_version: int
    vlan_id: int
    first_seen_ms: int
    last_seen_ms: int
    src2dst_packets: int
    dst2src_packets: int
    src2dst_bytes: int
    dst2src_bytes: int
    application_name: str
    end_reason: flow_pb2.FlowEndReason.ValueType
    capture_source: str
    # Feature set name -> values in that set's column order.
    features: dict[str, array[float]]

    @property
    def packets(self) -> int:
        return self.src2dst_packets + self.dst2src_packets

    def __reduce__(self) -> tuple[Any, tuple[type[FlowRecord], tuple[Any, ...]]]:
        # Unpickled by tuple.__new__ itself, not by the Python __new__ NamedTuple writes: records
        # cross from the meter process in every batch (0.7 us a record less to read).
        return tuple.__new__, (FlowRecord, tuple(self))

    @property
    def bytes(self) -> int:
        return self.src2dst_bytes + self.dst2src_bytes


@dataclasses.dataclass(frozen=True)
class MeterOptions:
    """Capture and flow-expiry settings shared by pcap replay and live capture."""

    bpf_filter: str = ""
    snapshot_length: int = 1536
    promiscuous: bool = True
    idle_timeout_s: int = 120
    active_timeout_s: int = 1800


@dataclasses.dataclass
class MeterStats:
    """Counters a meter run accumulates; read by health reports."""

    flows: int = 0
    sources_failed: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


_FORKSERVER = multiprocessing.get_context("forkserver")


def preload_in_meter_processes(*modules: str) -> None:
    """Import ``modules`` once in the forkserver that starts nfstream's meter processes.

    multiprocessing re-runs the main script in every child it starts this way; when that
    script is a console entry point, its imports (grpc, onnxruntime, scikit-learn...) would
    cost up to a second per capture. Preloaded, they are inherited instead. Call this from
    an entry point before the first capture is metered. Programs that meter captures from
    a plain script need the usual ``if __name__ == "__main__":`` guard, as with any
    multiprocessing start method other than fork.
    """
    meterserver.preload(*modules)


class _Shape:
    """Makes a FlowRecord of an NFlow in the meter process, as the meter sends it (see
    auris.agent.channel). It travels there pickled: its capture label and each feature set's
    name and extractor (a module-level function, pickled by name)."""

    def __init__(self, label: str, extractors: Sequence[tuple[str, Callable[[Any], array[float]]]]) -> None:
        self._label = label
        self._extract = tuple(extractors)

    def __call__(self, flow: Any) -> FlowRecord:
        return FlowRecord(
            flow.src_ip,
            flow.dst_ip,
            flow.src_port,
            flow.dst_port,
            flow.protocol,
            flow.ip_version,
            flow.vlan_id,
            flow.bidirectional_first_seen_ms,
            flow.bidirectional_last_seen_ms,
            flow.src2dst_packets,
            flow.dst2src_packets,
            flow.src2dst_bytes,
            flow.dst2src_bytes,
            flow.application_name or "",
            _END_REASONS.get(flow.expiration_id, flow_pb2.FLOW_END_REASON_UNSPECIFIED),
            self._label,
            {name: extract(flow) for name, extract in self._extract},
        )


def _streamer(source: str, options: MeterOptions, feature_sets: Sequence[FeatureSet]) -> Any:
    kwargs: dict[str, Any] = {}
    for fs in feature_sets:
        kwargs.update(fs.meter_options)
    streamer = NFStreamer(
        source=source,
        bpf_filter=options.bpf_filter or None,
        snapshot_length=options.snapshot_length,
        promiscuous_mode=options.promiscuous,
        idle_timeout=options.idle_timeout_s,
        active_timeout=options.active_timeout_s,
        n_dissections=20,
        n_meters=1,
        **kwargs,
    )
    # nfstream forks its meter process from whatever thread calls it; in the agent, gRPC's
    # threads are running by then, and forking a process that holds gRPC's locks is unsafe.
    # A forkserver child starts from a clean, single-threaded process instead (nfstream 6.6
    # keeps the context in this attribute; tests cover it through every metering run).
    shape = _Shape(source_label(source), [(fs.name, fs.extract) for fs in feature_sets])
    streamer._mp_context = _CountingContext(_FORKSERVER, shape)
    return streamer


# nfstream's meters publish (dropped by the kernel, processed, ignored) packet counts in shared
# values it passes to each meter process; these are all of them, for health reports.
_TRACKERS: list[Any] = []
_TRACKER_ARG = 16  # position of the tracker in nfstream 6.6's meter_workflow arguments


# Meter processes with the channel they send flows on, so that a meter that dies (OOM killer,
# a crash) can be reported instead of leaving nfstream waiting on that channel forever.
_METERS: list[_Meter] = []
_METERS_LOCK = threading.Lock()  # readers add and prune, the watchdog scans
_WATCHDOG: threading.Thread | None = None
# How often the watchdog looks for meter processes that died.
_WATCH_S = 1.0


@dataclasses.dataclass(eq=False)
class _Meter:
    process: Any
    channel: FlowChannel
    # Its packet counters (in _TRACKERS), as nfstream passed them.
    tracker: Any = None
    exit_code: int | None = None  # set once the meter is found dead
    ended: bool = False  # its channel holds the end (or the rest of a broken message)
    done: bool = False  # the source is no longer read
    stopped: bool = False  # ended by stop_meters: its death is no error


class _CountingContext:
    """A multiprocessing context that keeps each meter's counters, process and channel."""

    def __init__(self, context: Any, shape: _Shape) -> None:
        self._context = context
        self._shape = shape
        self._channel: FlowChannel | None = None
        self.meters: list[_Meter] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def Queue(self, maxsize: int = 0) -> FlowChannel:
        self._channel = FlowChannel(maxsize, ctx=self._context, shape=self._shape)
        return self._channel

    def Process(self, *args: Any, **kwargs: Any) -> Any:
        process = self._context.Process(*args, **kwargs)
        meter_args = kwargs.get("args", ())
        if len(meter_args) > _TRACKER_ARG and self._channel is not None:
            _TRACKERS.append(meter_args[_TRACKER_ARG])
            meter = _Meter(process, self._channel, meter_args[_TRACKER_ARG])
            with _METERS_LOCK:
                _METERS.append(meter)
            self.meters.append(meter)
        return process

    def dead_meter(self) -> _Meter | None:
        return next((m for m in self.meters if m.exit_code is not None), None)


def _end_channel(meter: _Meter) -> bool:
    """Put an end on a dead meter's channel that nfstream's reader cannot wait past; True once done.

    A meter writes each message whole under the channel's write lock (CPython's Queue: a length
    header, then the pickled flow). If the lock is free, the meter died between messages: send
    nfstream's own error message, which ends the iteration with a ValueError. If the lock is
    taken, the meter died holding it, perhaps halfway through a message the reader is now
    waiting to complete: complete it with zeros, which do not unpickle, so the read fails and
    ``meter_source`` reports the death (more zeros at the next call, while the source is read).
    """
    channel = meter.channel
    message = f"the meter process died (exit code {meter.exit_code})"
    if channel._wlock.acquire(False):
        try:
            if not channel._sem.acquire(False):
                return False  # the channel is full: the reader is behind, try again later
            channel._writer.send_bytes(ForkingPickler.dumps(InternalError(NFEvent.ERROR, message)))
            return True
        finally:
            channel._wlock.release()
    with contextlib.suppress(OSError):  # full (the reader is behind) or closed: try again later
        fd = channel._writer.fileno()
        os.set_blocking(fd, False)
        os.write(fd, bytes(65536))
    return False


def report_dead_meters() -> int:
    """Make the metering of any source whose meter process died fail with a ValueError.

    nfstream would wait for such a meter's flows forever; an end put on its channel ends the
    iteration. Call it regularly while sources are read: a meter killed in the middle of writing
    a flow may need more than one call. Returns how many dead meters were newly found (not
    counting those ``stop_meters`` ended on purpose).
    """
    found = 0
    with _METERS_LOCK:
        meters = list(_METERS)
    for meter in meters:
        if meter.done or meter.ended:
            continue
        if meter.exit_code is None:
            code = meter.process.exitcode
            if code in (None, 0):
                continue
            meter.exit_code = code
            found += not meter.stopped
        meter.ended = _end_channel(meter)
    return found


def _watch_meters() -> None:
    while True:
        time.sleep(_WATCH_S)
        if report_dead_meters():
            logger.error("a meter process died; its capture is reported as unreadable")


def _start_watchdog() -> None:
    """One thread per process that ends the reads of dead meters (see report_dead_meters), for
    every reader of captures: the agent, training pipelines, tests."""
    global _WATCHDOG
    with _METERS_LOCK:
        if _WATCHDOG is None or not _WATCHDOG.is_alive():
            _WATCHDOG = threading.Thread(target=_watch_meters, name="auris-dead-meters", daemon=True)
            _WATCHDOG.start()


@dataclasses.dataclass(frozen=True)
class CaptureCounters:
    packets_processed: int
    packets_dropped: int  # by the kernel or the interface, as libpcap reports them
    packets_ignored: int  # not IP, or otherwise not metered


def capture_counters() -> CaptureCounters:
    """Packet counters of every meter this process started (updated once a second of capture time)."""
    dropped = processed = ignored = 0
    for tracker in _TRACKERS:
        dropped += tracker[0].value
        processed += tracker[1].value
        ignored += tracker[2].value
    return CaptureCounters(processed, dropped, ignored)


def source_label(source: str) -> str:
    """How a source appears in verdicts and logs: a capture's file name, or the interface name."""
    return Path(source).name if Path(source).is_file() else source


def meter_source(
    source: str, feature_sets: Sequence[FeatureSet], options: MeterOptions | None = None
) -> Iterator[FlowRecord]:
    """Yield a FlowRecord for every flow of one pcap file or interface.

    Raises ValueError (from nfstream) when the source cannot be opened.
    """
    for batch in meter_batches(source, feature_sets, options):
        yield from batch


def meter_batches(
    source: str,
    feature_sets: Sequence[FeatureSet],
    options: MeterOptions | None = None,
    meters: list[Any] | None = None,
) -> Iterator[list[FlowRecord]]:
    """meter_source's flows, in the batches the meter sent them (at most ``channel.BATCH``
    flows each, never empty): for consumers that hand flows on, a step per batch, not per flow.

    ``meters``, when given, gets the meter processes once they run (``stop_meters`` ends them)."""
    _start_watchdog()
    streamer = _streamer(source, options or MeterOptions(), feature_sets)
    context: _CountingContext = streamer._mp_context
    if meters is not None:
        context.meters = meters
    try:
        for batch in _read(streamer, context):
            if type(batch) is not FlowBatch:
                raise TypeError(f"the meter sent a {type(batch).__name__}, not flows")
            if batch:
                yield batch
    finally:
        for meter in context.meters:
            meter.done = True
        with _METERS_LOCK:
            _METERS[:] = [m for m in _METERS if not m.done]


def stop_meters(meters: Sequence[Any]) -> None:
    """End meter processes (``meter_batches``' ``meters``) whose flows nobody will read: the
    dead-meter watchdog then ends the read of their source with an error. Their packets leave
    the capture counters: nothing they metered is used."""
    for meter in meters:
        meter.stopped = True
        deadline = time.monotonic() + 5.0
        while meter.process.pid is None and time.monotonic() < deadline:  # made, not started yet
            time.sleep(0.01)
        with contextlib.suppress(OSError, ValueError, AttributeError):  # gone, or never started
            meter.process.terminate()
        if any(t is meter.tracker for t in _TRACKERS):
            _TRACKERS[:] = [t for t in _TRACKERS if t is not meter.tracker]


def _read(streamer: Any, context: _CountingContext) -> Iterator[Any]:
    """nfstream's flows; a read broken by a meter that died mid-write becomes the ValueError
    nfstream raises for its own meter errors."""
    try:
        yield from streamer
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
        dead = context.dead_meter()
        if dead is None:
            raise
        if isinstance(exc, ValueError) and "meter process died" in str(exc):
            raise
        raise ValueError(
            f"the meter process died (exit code {dead.exit_code}) while sending a flow"
        ) from None


def meter_flows(
    sources: Sequence[str],
    feature_sets: Sequence[FeatureSet],
    options: MeterOptions | None = None,
    stats: MeterStats | None = None,
) -> Iterator[FlowRecord]:
    """Yield a FlowRecord for every flow in ``sources`` (pcap files or one interface).

    A source that cannot be opened is counted in ``stats`` and skipped: one bad
    capture never stops the others.
    """
    stats = stats if stats is not None else MeterStats()
    for source in sources:
        try:
            for flow in meter_source(source, feature_sets, options):
                stats.flows += 1
                yield flow
        except ValueError as exc:
            # nfstream raises ValueError for unreadable files and unusable interfaces.
            stats.sources_failed += 1
            stats.errors.append(f"{source_label(source)}: {exc}")
            logger.error("cannot meter %s: %s", source_label(source), exc)
