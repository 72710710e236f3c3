"""Live capture that neither strands idle flows on a quiet link nor loses cached flows on stop.

nfstream 6.6's meter advances its flow clock only when packets arrive, and its
libpcap read blocks for as long as the link is quiet: idle flows are never expired
there, and ending the iteration kills the meter process with every cached flow in
it. Both are fixed inside the meter process, without copying nfstream's loop:

* a ticker thread wakes a read that has been blocked for ``TICK_S`` with libpcap's
  ``pcap_breakloop`` (libpcap 1.10 wakes a blocked read on Linux), and the engine's
  ``capture_next`` turns that wake-up into a *time tick* carrying the wall clock,
  which nfstream's loop already understands (it advances its clock and expires idle
  flows; nfstream itself uses ticks to keep several meters in step);
* after SIGUSR1 (sent by :func:`request_flush`) the next read reports end of
  capture, so nfstream expires every cached flow, sends it, and the iteration in
  the agent ends normally.

Capture files are untouched: their clock is the packets' own. Every meter started
through :func:`install` also exits when the agent that started it is gone (after a
``kill -9``, nobody would read its flows and it would linger forever).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

from auris.agent import lean  # noqa: F401  (before nfstream: it imports nfstream without pandas)

# isort: split
import _lib_engine  # nfstream's native engine, with libpcap linked in
import nfstream.meter
import nfstream.streamer
from nfstream.utils import NFMode

from auris.agent import meterserver

__all__ = ["TICK_S", "MeterSettings", "install", "meter_workflow", "request_flush"]

# How long a read may stay blocked before the meter's clock is advanced by hand.
TICK_S = 1.0
# After a stop request, packets the kernel already holds (libpcap hands them over in
# blocks, up to its timeout later) are still read for this long before the flush.
STOP_GRACE_S = 1.5
_STOP_SIGNAL = meterserver.FLUSH_SIGNAL
_END_OF_CAPTURE = -2
_TIME_TICK = 2
_original_workflow = nfstream.meter.meter_workflow
# nfstream's expiration id for flows a plugin ended early; the agent reports them as evicted.
EVICTED = -1


class _TickingEngine:
    """nfstream's engine, whose capture_next also returns wall-clock ticks and end of capture."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        self._ffi = ffi
        self._lib = lib
        self._breakloop = ctypes.CDLL(_lib_engine.__file__).pcap_breakloop
        self._breakloop.argtypes = [ctypes.c_void_p]
        self._handle: int | None = None
        self._last_return = time.monotonic()
        self._tick_pending = False
        self.stop = threading.Event()
        self._stop_at: float | None = None
        # Held while waking the read, and set once the capture ends: libpcap frees the handle then.
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._tick, name="auris-meter-ticker", daemon=True).start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def capture_next(self, capture: Any, nf_packet: Any, *args: Any) -> int:
        if self._handle is None:
            self._handle = int(self._ffi.cast("uintptr_t", capture))
        if self.stop.is_set():
            if self._stop_at is None:
                self._stop_at = time.monotonic()
            elif time.monotonic() - self._stop_at >= STOP_GRACE_S:
                with self._lock:
                    self._closed = True
                return _END_OF_CAPTURE
        ret: int = self._lib.capture_next(capture, nf_packet, *args)
        self._last_return = time.monotonic()
        if ret < 0 and self._tick_pending:
            # Our wake-up, not a capture error: report the time instead.
            self._tick_pending = False
            nf_packet.time = int(time.time() * 1000)
            return _TIME_TICK
        return ret

    def _tick(self) -> None:
        while True:
            time.sleep(TICK_S / 4)
            quiet = time.monotonic() - self._last_return >= (TICK_S / 4 if self.stop.is_set() else TICK_S)
            with self._lock:
                if self._closed:
                    return
                if self._handle is not None and quiet and not self._tick_pending:
                    self._tick_pending = True
                    self._breakloop(self._handle)


@dataclasses.dataclass(frozen=True)
class MeterSettings:
    """What the agent tells each meter process it starts (with nfstream's own arguments)."""

    agent_pid: int  # the meter exits once this process is gone
    max_flows: int = 0  # flows a meter holds at most (0: no cap)


def _exit_with_the_agent(agent: int) -> None:
    """End this meter process as soon as the agent that started it is gone."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(agent, 0)
            except ProcessLookupError:
                os._exit(0)  # no reader is left for our flows

    threading.Thread(target=watch, name="auris-meter-watchdog", daemon=True).start()


def _capped(scan: Any, cap: int) -> Any:
    """nfstream's idle scan, followed by evicting least recently used flows above ``cap``."""

    def capped_scan(
        meter_tick: int, cache: Any, idle_timeout: int, channel: Any, udps: Any, sync: bool, *engine: Any
    ) -> int:
        removed: int = scan(meter_tick, cache, idle_timeout, channel, udps, sync, *engine)
        while len(cache) > cap:
            key = cache.get_lru_key()
            flow = cache[key]
            flow.expiration_id = EVICTED
            channel.put(flow.expire(udps, sync, *engine))
            del cache[key]
            removed += 1
        return removed

    return capped_scan


def meter_workflow(settings: MeterSettings, *args: Any) -> None:
    """nfstream's meter workflow, with a ticking engine for live interfaces and a flow cap."""
    _exit_with_the_agent(settings.agent_pid)
    cap = settings.max_flows
    if cap > 0:  # nfstream looks its helpers up at call time: patch this meter process only
        nfstream.meter.meter_scan = _capped(nfstream.meter.meter_scan, cap)
    mode = args[7]  # (source, snaplen, decode_tunnels, bpf_filter, promisc, n_roots, root_idx, mode, ...)
    if mode == NFMode.INTERFACE:
        create_engine = nfstream.meter.create_engine
        engines: list[_TickingEngine] = []

        def ticking_engine() -> tuple[Any, Any]:
            ffi, lib = create_engine()
            if lib is None:
                return ffi, lib
            engines.append(_TickingEngine(ffi, lib))
            return ffi, engines[-1]

        def flush(signum: int, frame: object) -> None:
            for engine in engines:
                engine.stop.set()

        signal.signal(_STOP_SIGNAL, flush)
        nfstream.meter.create_engine = ticking_engine  # in this meter process only
    _original_workflow(*args)


def install(max_flows: int = 0) -> None:
    """Make nfstream start its meters through :func:`meter_workflow` (once, in the agent).

    ``max_flows`` caps the flows a meter holds (0: no cap); past it the least recently
    seen flows are expired early and reported as evicted. The settings travel with the
    arguments of each meter nfstream starts from then on (not through the environment: the
    forkserver meters come from may have started before the configuration was read).
    """
    # Ignored signals survive fork and exec: a meter that gets its flush request before it has
    # installed its handler ignores it (the agent repeats it) instead of dying of it. (The
    # forkserver the meters come from may have started before this: meterserver.start does it too.)
    signal.signal(_STOP_SIGNAL, signal.SIG_IGN)
    settings = MeterSettings(agent_pid=os.getpid(), max_flows=max_flows)
    nfstream.streamer.meter_workflow = functools.partial(meter_workflow, settings)


def request_flush() -> int:
    """Ask the running meters to expire their cached flows and finish; return how many were asked.

    The agent's only multiprocessing children are nfstream's meters. A capture-file
    meter has no handler for the signal, so this is only sent while capturing live.
    """
    meters = multiprocessing.active_children()
    for meter in meters:
        if meter.pid is not None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(meter.pid, _STOP_SIGNAL)
    return len(meters)
