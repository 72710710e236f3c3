"""The agent's pipeline: meter thread -> micro-batched scoring -> durable spool -> uplink.

The meter runs in its own thread (nfstream blocks while it waits for flows), handing
flows over a bounded hand-off list. The main thread scores them in batches of
``score_batch`` (or whatever is waiting after ``flush_interval_s``, so a quiet link
still gets its verdicts out), builds verdicts and spools them. The uplink thread
streams the spool to the collector.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from google.protobuf import timestamp_pb2

from auris.agent import __version__, live, sd_notify
from auris.agent.config import AgentConfig
from auris.agent.early import EarlyMeter, meter_options, metering_sources
from auris.agent.meter import (
    FlowRecord,
    MeterOptions,
    capture_counters,
    meter_batches,
    source_label,
)
from auris.agent.model_updates import Refusal
from auris.agent.scoring import ModelSet
from auris.agent.spool import Spool
from auris.agent.uplink import Uplink
from auris.agent.verdicts import VerdictBuilder
from auris.v1 import agent_service_pb2, flow_pb2, model_pb2

__all__ = ["Agent", "RunReport", "replay_key"]

logger = logging.getLogger(__name__)

_QUEUE_FLOWS = 8192


def replay_key(source: str, metering: str = "") -> str | None:
    """Identity of a replay for resuming it: the file (path, size, modification time) and how it
    is metered (``metering``: flow splitting and order change with filter, timeouts, feature sets)."""
    path = Path(source)
    if not path.is_file():
        return None
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{metering}"


@dataclasses.dataclass
class RunReport:
    flows: int = 0
    anomalies: int = 0
    # Packets in the flows metered.
    packets: int = 0
    # Flows expired early by the live-flow cap.
    evicted: int = 0
    # Flows of a resumed replay that were already spooled by an earlier run.
    flows_skipped: int = 0
    sources_skipped: int = 0
    sources_failed: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    delivered: bool = False
    stopped: bool = False
    elapsed_s: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Flows:
    """Flows of one capture, as the meter sent them (one item per batch, not per flow)."""

    key: str | None
    flows: list[FlowRecord]


@dataclasses.dataclass(frozen=True)
class _SourceDone:
    """Every flow of this capture has been queued."""

    key: str | None


class _End:
    """The meter thread is done with every source."""


_Item = _Flows | _SourceDone | _End


class _Handoff:
    """Items from the meter thread to the scoring loop, counted in flows.

    A bounded list rather than a ``queue.Queue``, and the consumer is woken only when a whole
    batch of flows is waiting (or an end-of-source marker, or when the oldest item has waited
    ``max_delay_s``): on a 2-core host every wake-up can preempt a thread that holds the GIL,
    so a busy pipeline costs one wake-up per batch instead of one or two per flow.
    """

    def __init__(self, limit: int, batch: int) -> None:
        self._items: list[_Item] = []
        # Flows in _items.
        self._flows = 0
        self._limit = limit
        self.batch = batch
        self._urgent = False
        # When the oldest waiting item came (time.monotonic()).
        self._first_at = 0.0
        self._cond = threading.Condition()

    @property
    def _wanted(self) -> int:
        return max(1, min(self.batch, self._limit))

    def put(self, item: _Item) -> None:
        with self._cond:
            while self._flows >= self._limit:  # backpressure on the meter thread
                self._cond.wait()
            if not self._items:
                self._first_at = time.monotonic()
            self._items.append(item)
            if type(item) is _Flows:
                self._flows += len(item.flows)
                if self._flows >= self._wanted:
                    self._cond.notify_all()
            else:
                self._urgent = True
                self._cond.notify_all()

    def take(self, max_delay_s: float, timeout_s: float) -> list[_Item]:
        """What is waiting, once a batch of flows (or more) is, an end marker came, or the oldest
        item has waited ``max_delay_s``; [] if nothing came within ``timeout_s``.

        When woken by a full batch, whole batches of flows are taken (an item split where they
        end) and the rest waits for its own."""
        with self._cond:
            now = time.monotonic()
            deadline = now + timeout_s
            while True:
                waiting = self._flows
                if waiting >= self._wanted or self._urgent:
                    break
                if self._items and now - self._first_at >= max_delay_s:
                    break
                if not self._items and now >= deadline:
                    return []
                self._cond.wait((self._first_at + max_delay_s if self._items else deadline) - now)
                now = time.monotonic()
            full = waiting >= self._limit
            if self._urgent or waiting < self._wanted:
                items, self._items = self._items, []
                self._flows = 0
                self._urgent = False
            else:
                items = self._whole_batches(waiting - waiting % self._wanted)
                self._first_at = now  # the rest came after the batch that woke us: a close bound
            if full:
                self._cond.notify_all()  # the producer may wait for room
            return items

    def _whole_batches(self, count: int) -> list[_Item]:
        """Take the first ``count`` flows (only _Flows are waiting: no marker came)."""
        taken: list[_Item] = []
        left = count
        while left:
            item = self._items[0]
            assert type(item) is _Flows
            if len(item.flows) <= left:
                taken.append(self._items.pop(0))
                left -= len(item.flows)
            else:
                taken.append(_Flows(item.key, item.flows[:left]))
                self._items[0] = _Flows(item.key, item.flows[left:])
                left = 0
        self._flows -= count
        return taken


class Agent:
    """One run of the agent over its configured sources."""

    def __init__(
        self,
        config: AgentConfig,
        models: ModelSet,
        spool: Spool,
        uplink: Uplink,
        agent_id: str,
        hostname: str,
        *,
        reprocess: bool = False,
        flush_interval_s: float = 1.0,
        reload: Callable[[], tuple[AgentConfig, ModelSet] | None] | None = None,
        early: EarlyMeter | None = None,
    ) -> None:
        self.config = config
        self.models = models
        self.spool = spool
        self.uplink = uplink
        self.agent_id = agent_id
        self.hostname = hostname
        self.report = RunReport()
        self._reprocess = reprocess
        self._flush_interval_s = flush_interval_s
        self._reload = reload
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        self._queue = _Handoff(_QUEUE_FLOWS, config.score_batch)
        self._started = time.monotonic()
        # A model set offered by the model watcher, swapped in by the scoring loop between batches.
        self._offered: tuple[ModelSet, list[Refusal]] | None = None
        self._offer_lock = threading.Lock()
        self.model_refusals: list[Refusal] = []
        self.on_models_swapped: Callable[[], None] | None = None
        self._watchdog_s = sd_notify.watchdog_interval_s()
        self._watchdog_due = 0.0
        # The first source's metering, when it started before the models were loaded.
        self._early = early

    def heartbeat(self) -> agent_service_pb2.HeartbeatRequest:
        """The agent's identity and health counters, as a heartbeat carries them."""
        spooled = self.spool.stats
        sent = self.uplink.stats
        capture = capture_counters()
        health = agent_service_pb2.AgentHealth(
            # The meters' counters lag by up to a second; flows already metered are a floor.
            packets_seen=max(capture.packets_processed, self.report.packets),
            packets_dropped=capture.packets_dropped,
            flows_metered=self.report.flows,
            flows_evicted=self.report.evicted,
            verdicts_anomalous=self.report.anomalies,
            verdicts_sent=sent.verdicts_sent,
            verdicts_acknowledged=sent.verdicts_acknowledged,
            verdicts_rejected=sent.rejected,
            spool_depth=spooled.depth,
            spool_dropped=spooled.dropped,
            scoring_errors=self.models.errors,
            uptime_seconds=time.monotonic() - self._started,
        )
        if sent.last_ack_time:
            health.last_acknowledged_time.FromNanoseconds(int(sent.last_ack_time * 1e9))
        request = agent_service_pb2.HeartbeatRequest(
            agent_id=self.agent_id, hostname=self.hostname, agent_version=__version__, health=health
        )
        for model in self.models.models:
            request.models.add(model_id=model.manifest.model_id, version=model.manifest.version)
        request.refused_models.extend(r.to_proto() for r in self.model_refusals)
        for model in self.models.models:
            if model.drift is not None:
                ref = model_pb2.ModelRef(model_id=model.manifest.model_id, version=model.manifest.version)
                request.health.drift.append(model.drift.report(ref))
        return request

    def offer_models(self, models: ModelSet, refusals: list[Refusal]) -> None:
        """Hand over a new model set (from any thread); it replaces the running one between batches."""
        with self._offer_lock:
            self._offered = (models, refusals)

    def _swap_models(self) -> None:
        with self._offer_lock:
            offered, self._offered = self._offered, None
        if offered is None:
            return
        models, refusals = offered
        before = sorted(m.ref for m in self.models.models)
        if models is not self.models:  # the error counter is the agent's, not the set's
            models.errors += self.models.errors
        self.models, self.model_refusals = models, refusals
        after = sorted(m.ref for m in models.models)
        if after != before:
            logger.info("now running %s (was %s)", ", ".join(after), ", ".join(before))
        if self.on_models_swapped is not None:
            self.on_models_swapped()

    def request_stop(self) -> None:
        """Stop metering, spool what was metered, drain briefly, exit (SIGTERM).

        A live meter is asked to expire and hand over every flow it still caches, so
        stopping loses none; a replay stops after the batch of flows in hand (at most 64) and
        resumes after it.
        """
        if self.config.interface:
            live.request_flush()
        self._stop.set()

    def request_reload(self) -> None:
        """Reload configuration and models between batches, all or nothing (SIGHUP)."""
        self._reload_requested.set()

    @property
    def sources(self) -> list[str]:
        """The capture files (each once, however often it is named) or the interface."""
        return metering_sources(self.config)

    def _batches(self, source: str, options: MeterOptions) -> Iterator[list[FlowRecord]]:
        """The source's flows: from the metering started early when it is this one, else anew."""
        early, self._early = self._early, None
        if early is not None:
            if early.claim(source, self.models.feature_sets, options):
                logger.info("metering of %s started before the models were loaded", source_label(source))
                return early.batches()
            if early.source == source:
                logger.info(
                    "metering %s anew: what started before the models were loaded has other feature sets",
                    source_label(source),
                )
            early.cancel()
        return meter_batches(source, self.models.feature_sets, options)

    def _drop_early(self) -> None:
        if self._early is not None:
            self._early.cancel()
            self._early = None

    def _metering(self) -> str:
        """A digest of everything that decides how a capture splits into flows, and their order."""
        c = self.config
        parts = [c.bpf_filter, c.snapshot_length, c.idle_timeout_s, c.active_timeout_s, c.max_live_flows]
        parts += sorted(f"{fs.name}@{fs.version}" for fs in self.models.feature_sets)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    def _meter(self) -> None:
        options = meter_options(self.config)
        try:
            for source in self.sources:
                if self._stop.is_set():
                    break
                key = replay_key(source, self._metering())
                skip, complete = self.spool.replay_progress(key) if key else (0, False)
                if key and self._reprocess:
                    self.spool.forget_replay(key)
                    skip, complete = 0, False
                if complete:
                    self.report.sources_skipped += 1
                    logger.info(
                        "%s was replayed completely before; pass --reprocess to replay it again", source
                    )
                    self._drop_early()  # it may be metering this one
                    continue
                if skip:
                    logger.info("resuming %s after the %d flows spooled by an earlier run", source, skip)
                try:
                    seen = 0
                    for flows in self._batches(source, options):
                        seen += len(flows)
                        if skip:
                            skipped = min(skip, len(flows))
                            self.report.flows_skipped += skipped
                            skip -= skipped
                            flows = flows[skipped:]
                        if flows:
                            self._queue.put(_Flows(key, flows))
                        # A live meter ends by itself once flushed; its last flows are still coming.
                        if self._stop.is_set() and key is not None:
                            logger.info("stop requested: metering of %s stopped after flow %d", source, seen)
                            break
                    else:
                        self._queue.put(_SourceDone(key))
                except Exception as exc:  # nfstream's errors and any other: this source fails, not the run
                    self.report.sources_failed += 1
                    self.report.errors.append(f"{source_label(source)}: {exc}")
                    logger.error("cannot meter %s: %s", source_label(source), exc)
        finally:
            self._drop_early()  # a stop came first, or no source was metered
            self._queue.put(_End())

    def _spool_batch(self, key: str | None, flows: list[FlowRecord]) -> None:
        if not flows:
            return
        scored_time = timestamp_pb2.Timestamp()
        scored_time.GetCurrentTime()
        scores = self.models.score([f.features for f in flows])
        build = VerdictBuilder(
            agent_id=self.agent_id,
            hostname=self.hostname,
            scored_time=scored_time,
            flows=flows,
            scores=scores,
            feature_sets=[(fs.name, fs.version) for fs in self.models.feature_sets],
            features_when=self.config.send_features,
        )
        verdicts = self.spool.append(build, len(flows), replay=(key, len(flows)) if key else None)
        self.report.flows += len(flows)
        self.report.packets += sum(f.packets for f in flows)
        self.report.evicted += sum(f.end_reason == flow_pb2.FLOW_END_REASON_EVICTED for f in flows)
        self.report.anomalies += sum(v.anomalous for v in verdicts)

    def _apply_reload(self) -> None:
        self._reload_requested.clear()
        if self._reload is None:
            return
        sd_notify.reloading()
        try:
            loaded = self._reload()
        finally:
            sd_notify.notify("READY=1")
        if loaded is None:
            return  # the reloader logged why; the old configuration stays
        config, models = loaded
        self.config, self.models = config, models
        self._queue.batch = config.score_batch

    def _ping_watchdog(self) -> None:
        """WATCHDOG=1 at most every half WatchdogSec, from the scoring loop: it proves the loop turns."""
        if self._watchdog_s is None:
            return
        now = time.monotonic()
        if now >= self._watchdog_due:
            sd_notify.notify("WATCHDOG=1")
            self._watchdog_due = now + self._watchdog_s

    def _housekeeping(self) -> None:
        """Once per flush interval: repeat a flush request after stop (dead meters: meter.py's watchdog)."""
        if self._stop.is_set() and self.config.interface:
            live.request_flush()  # a meter that started after the stop request gets it too

    def run(self) -> RunReport:
        # Counted from the first capture's start (before this call when it started early).
        started = self._early.started_at if self._early is not None else time.monotonic()
        meter = threading.Thread(target=self._meter, name="auris-meter", daemon=True)
        meter.start()
        pending: list[FlowRecord] = []
        pending_key: str | None = None
        ended = False
        housekeeping_due = time.monotonic() + self._flush_interval_s
        while not ended:
            self._ping_watchdog()
            if self._reload_requested.is_set():
                self._apply_reload()
            if self._offered is not None:
                self._swap_models()
            # A flow waits at most flush_interval_s for its batch to fill (a quiet link).
            items = self._queue.take(self._flush_interval_s, self._flush_interval_s)
            for item in items:
                if isinstance(item, _Flows):
                    if item.key != pending_key:
                        self._spool_batch(pending_key, pending)
                        pending = []
                        pending_key = item.key
                    pending += item.flows
                    batch = self.config.score_batch
                    while len(pending) >= batch:
                        self._spool_batch(pending_key, pending[:batch])
                        pending = pending[batch:]
                elif isinstance(item, _SourceDone):
                    self._spool_batch(pending_key, pending)
                    pending = []
                    if item.key:
                        self.spool.mark_replay_complete(item.key)
                else:  # _End: nothing follows it
                    ended = True
            # take() hands over whole batches, or flows that waited long enough: nothing is held back.
            self._spool_batch(pending_key, pending)
            pending = []
            if time.monotonic() >= housekeeping_due:
                self._housekeeping()
                housekeeping_due = time.monotonic() + self._flush_interval_s
        self._spool_batch(pending_key, pending)
        meter.join()
        # A stop request (before or while draining) drains only briefly; whatever is left stays
        # spooled for the next start.
        self.report.delivered = self.uplink.finish(
            self.config.uplink_deadline_s, stop=self._stop, drain_timeout_s=self.config.drain_timeout_s
        )
        self.report.stopped = self._stop.is_set()
        self.report.elapsed_s = time.monotonic() - started
        return self.report
