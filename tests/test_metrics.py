"""Prometheus metrics: the text format, the agent's heartbeat as metrics, and a real collector's
/metrics endpoint scraped over HTTP after a real agent delivered verdicts."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from auris.agent.health import health_metrics
from auris.agent.metrics import Metric, MetricsServer, render
from auris.v1 import agent_service_pb2
from tests.conftest import MODELS, PCAPS, run_agent, running_collector

_SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        match = _SAMPLE.match(line)
        assert match, line
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def test_the_text_format() -> None:
    text = render(
        [
            Metric("b_total", "counter", "B things.", 3),
            Metric("a", "gauge", 'A "quoted"\nthing.', 0.5, {"model": 'x"y', "version": "1"}),
            Metric("a", "gauge", 'A "quoted"\nthing.', float("nan"), {"model": "z", "version": "2"}),
        ]
    )
    assert text.splitlines() == [
        '# HELP a A "quoted"\\nthing.',
        "# TYPE a gauge",
        'a{model="x\\"y",version="1"} 0.5',
        'a{model="z",version="2"} NaN',
        "# HELP b_total B things.",
        "# TYPE b_total counter",
        "b_total 3",
    ]


def test_the_agent_serves_its_heartbeat_as_metrics() -> None:
    beat = agent_service_pb2.HeartbeatRequest(agent_id="a")
    beat.health.flows_metered = 12
    beat.health.spool_depth = 3
    beat.models.add(model_id="nfstream-rf", version="1")
    server = MetricsServer("127.0.0.1:0", lambda: health_metrics(beat))
    server.start()
    try:
        samples = _scrape(server.port)
        assert samples["auris_agent_flows_metered_total"] == 12
        assert samples["auris_agent_spool_depth"] == 3
        assert samples['auris_agent_model_info{model="nfstream-rf",version="1"}'] == 1
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=10)
        assert caught.value.code == 404
    finally:
        server.stop()


def test_the_collector_reports_verdicts_agents_and_rollout(tmp_path: Path) -> None:
    with running_collector(
        tmp_path / "auris.db", models_dir=str(MODELS), metrics_listen="127.0.0.1:0"
    ) as running:
        assert running.collector is not None
        assert running.collector.metrics is not None
        port = running.collector.metrics.port
        before = _scrape(port)
        assert before["auris_collector_verdicts_stored_total"] == 0
        run = run_agent(running.address, [PCAPS / "steam.pcap"], tmp_path / "agent")
        assert run.returncode == 0, run.stderr
        after = _scrape(port)
        assert after["auris_collector_verdicts_stored_total"] > 0
        assert after['auris_collector_agents{state="online"}'] == 1
        assert after['auris_collector_model_agents_running{model="nfstream-rf",version="1"}'] == 1
        assert after["auris_collector_database_bytes"] > 0


def test_json_logs_from_a_real_agent_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logs are JSON when standard error is not a terminal (the default, "auto"), and on request."""
    import json

    with running_collector(tmp_path / "auris.db") as running:
        run = run_agent(running.address, [PCAPS / "steam.pcap"], tmp_path / "agent")
    assert run.returncode == 0, run.stderr
    entries = [json.loads(line) for line in run.stderr.splitlines() if line.strip()]
    assert entries
    assert all(set(e) >= {"time", "level", "logger", "message"} for e in entries)
    assert any(e["logger"] == "auris.agent.cli" and "metered" in e["message"] for e in entries)
    monkeypatch.setenv("AURIS_AGENT_LOG_FORMAT", "yaml")
    bad = run_agent("127.0.0.1:1", [PCAPS / "steam.pcap"], tmp_path / "agent")
    assert bad.returncode == 2
    assert "log_format: expected auto, text or json" in bad.stderr


def test_every_call_has_a_request_id_in_the_reply_and_in_the_log_lines_it_causes(tmp_path: Path) -> None:
    """The collector gives each call a request id (the caller's ``x-request-id`` when usable), sends
    it back in the trailing metadata, error or not, and puts it on the log lines the call causes;
    aurisctl prints it with an error."""
    import contextlib
    import io
    import json
    import logging

    import grpc

    from auris.agent.logs import configure_logging
    from auris.collector import ctl
    from auris.collector.client import CollectorClient
    from auris.v1 import admin_service_pb2, admin_service_pb2_grpc, feed_service_pb2, feed_service_pb2_grpc

    with (
        running_collector(tmp_path / "auris.db") as running,
        CollectorClient(running.address, insecure=True) as c,
    ):
        stub = admin_service_pb2_grpc.AdminServiceStub(c.channel)
        _, call = stub.ListAgents.with_call(admin_service_pb2.ListAgentsRequest(), timeout=10)
        generated = str(dict(call.trailing_metadata() or ())["x-request-id"])
        assert re.fullmatch(r"[0-9a-f]{12}", generated)
        _, call = stub.ListAgents.with_call(
            admin_service_pb2.ListAgentsRequest(), timeout=10, metadata=(("x-request-id", "ticket-42"),)
        )
        assert dict(call.trailing_metadata() or ())["x-request-id"] == "ticket-42"
        # An error carries it too, and the collector's log line about it has the same id.
        stream = io.StringIO()
        configure_logging("info", "json")
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        try:
            with pytest.raises(grpc.RpcError) as failed:
                stub.RevokeAgent(
                    admin_service_pb2.RevokeAgentRequest(agent_id="nobody"),
                    timeout=10,
                    metadata=(("x-request-id", "ticket-43"),),
                )
            # A call that logs: a feed batch with a rejected record.
            feeds = feed_service_pb2_grpc.FeedServiceStub(c.channel)
            bad = feed_service_pb2.Transaction(feed_id="cards", transaction_id="t", amount=-1.0)
            bad.time.FromNanoseconds(1_700_000_000_000_000_000)
            feeds.SubmitTransactions(
                feed_service_pb2.SubmitTransactionsRequest(transactions=[bad]),
                timeout=10,
                metadata=(("x-request-id", "ticket-44"),),
            )
        finally:
            logging.getLogger().handlers.clear()
        call_error = failed.value
        assert isinstance(call_error, grpc.Call)
        assert dict(call_error.trailing_metadata() or ())["x-request-id"] == "ticket-43"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = ctl.main(
                ["--collector", running.address, "--insecure", "agents", "revoke", "nobody"], io.StringIO()
            )
    assert code == ctl.EXIT_RPC
    assert re.search(r"^aurisctl: NOT_FOUND: .* \(request [0-9a-f]{12}\)$", err.getvalue().strip()), (
        err.getvalue()
    )
    logged = [json.loads(line) for line in stream.getvalue().splitlines() if "ticket-44" in line]
    assert logged, stream.getvalue()
    assert logged[0]["request_id"] == "ticket-44"
    assert "1 rejected" in logged[0]["message"]
