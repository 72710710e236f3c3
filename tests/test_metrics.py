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
    import json

    monkeypatch.setenv("AURIS_AGENT_LOG_FORMAT", "json")
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
    assert "log_format: expected text or json" in bad.stderr
