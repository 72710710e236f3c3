"""Heartbeats: the agent's health counters, sent to the collector at start, every interval and at exit."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from auris.agent.metrics import Metric
from auris.v1 import agent_service_pb2, agent_service_pb2_grpc

__all__ = ["Heartbeat", "health_metrics"]

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


# AgentHealth field -> (metric name, kind, help).
_HEALTH = {
    "packets_seen": ("auris_agent_packets_seen_total", "counter", "Packets the meters processed."),
    "packets_dropped": ("auris_agent_packets_dropped_total", "counter", "Packets the kernel dropped."),
    "flows_metered": ("auris_agent_flows_metered_total", "counter", "Flows metered and scored."),
    "flows_evicted": ("auris_agent_flows_evicted_total", "counter", "Flows expired by the flow cap."),
    "verdicts_anomalous": ("auris_agent_verdicts_anomalous_total", "counter", "Flows judged anomalous."),
    "verdicts_sent": ("auris_agent_verdicts_sent_total", "counter", "Verdicts sent to the collector."),
    "verdicts_acknowledged": ("auris_agent_verdicts_acknowledged_total", "counter", "Verdicts acknowledged."),
    "verdicts_rejected": (
        "auris_agent_verdicts_rejected_total",
        "counter",
        "Verdicts the collector refused.",
    ),
    "spool_depth": ("auris_agent_spool_depth", "gauge", "Verdicts spooled, not yet acknowledged."),
    "spool_dropped": ("auris_agent_spool_dropped_total", "counter", "Verdicts dropped (cap, full disk)."),
    "scoring_errors": ("auris_agent_scoring_errors_total", "counter", "Batches a model failed to score."),
    "uptime_seconds": ("auris_agent_uptime_seconds", "gauge", "Seconds since the agent started."),
}


def health_metrics(heartbeat: agent_service_pb2.HeartbeatRequest) -> list[Metric]:
    """The agent's heartbeat as Prometheus metrics (what the collector sees, scraped locally)."""
    h = heartbeat.health
    out = [Metric(name, kind, text, float(getattr(h, key))) for key, (name, kind, text) in _HEALTH.items()]
    for m in heartbeat.models:
        labels = {"model": m.model_id, "version": m.version}
        out.append(Metric("auris_agent_model_info", "gauge", "Models the agent runs.", 1.0, labels))
    for d in h.drift:
        labels = {"model": d.model.model_id, "version": d.model.version}
        out.append(
            Metric(
                "auris_agent_model_score_psi",
                "gauge",
                "Score PSI, last hour vs training.",
                d.score_psi,
                labels,
            )
        )
        worst = d.max_feature_psi
        out.append(
            Metric(
                "auris_agent_model_max_feature_psi", "gauge", "Largest feature PSI, last hour.", worst, labels
            )
        )
    if h.HasField("certificate_expire_time"):
        expires = h.certificate_expire_time.ToNanoseconds() / 1e9
        out.append(
            Metric(
                "auris_agent_certificate_expiry_timestamp_seconds",
                "gauge",
                "When the agent's certificate expires (Unix time).",
                expires,
            )
        )
    refused = float(len(heartbeat.refused_models))
    out.append(Metric("auris_agent_models_refused", "gauge", "Wanted models the agent refused.", refused))
    return out
