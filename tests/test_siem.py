"""SIEM export: the ECS mapping, and a real collector's [[siem_sinks]] writing real files (a record
per verdict, rotation, anomalous-only, alert changes, no loss across a restart), checked against
``aurisctl ... --format ecs``, which uses the same mapping."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from auris.agent.config import ConfigError
from auris.collector import ctl
from auris.collector.alerts import AlertRule
from auris.collector.client import CollectorClient
from auris.collector.config import load_collector_config
from auris.collector.siem import SiemSink, community_id, ecs_alert, ecs_verdict
from auris.collector.store import VerdictStore
from auris.v1 import admin_service_pb2, agent_service_pb2, agent_service_pb2_grpc, model_pb2, verdict_pb2
from tests.conftest import CollectorThread, make_verdict, running_collector, wait_for


def _stream(client: CollectorClient, *verdicts: verdict_pb2.Verdict) -> None:
    stub = agent_service_pb2_grpc.AgentServiceStub(client.channel)
    request = agent_service_pb2.StreamVerdictsRequest(agent_id=verdicts[0].agent_id, verdicts=verdicts)
    list(stub.StreamVerdicts(iter([request])))


def _records(*paths: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in paths if p.exists() for line in p.read_text().splitlines()]


def _exported(running: CollectorThread) -> dict[str, int]:
    assert running.collector is not None
    return running.collector.siem.exported()


def test_community_id_matches_the_spec_and_ignores_direction() -> None:
    # The example of the Community ID specification (corelight/community-id-spec).
    assert community_id("128.232.110.120", "66.35.250.204", 34855, 80, 6) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    assert community_id("66.35.250.204", "128.232.110.120", 80, 34855, 6) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    assert community_id("10.0.0.1", "10.0.0.2", 0, 0, 1) == ""  # ICMP would need type/code mapping


def test_a_verdict_maps_to_ecs_fields() -> None:
    v = make_verdict(7, anomalous=True, label="DoS", score=0.97, src_ip="10.1.2.3", dst_ip="192.0.2.8")
    v.flow.ip_version = 4
    v.flow.vlan_id = 12
    v.application_name = "TLS.Google"
    v.explanation = "classifier: DoS p=0.97"
    v.scores[0].top_features.add(feature="flow_duration", value=0.5)
    v.scores.add(model=model_pb2.ModelRef(model_id="ae", version="2"), score=float("nan"), shadow=True)
    stored = verdict_pb2.StoredVerdict(id=42, verdict=v)
    stored.received_time.FromMilliseconds(v.scored_time.ToMilliseconds() + 5)
    stored.analyst_label.label = "benign"

    doc = ecs_verdict(stored)

    assert doc["@timestamp"] == v.scored_time.ToJsonString()
    assert doc["event"]["kind"] == "alert"
    assert doc["event"]["category"] == ["network", "intrusion_detection"]
    assert doc["event"]["type"] == ["connection"]
    assert doc["event"]["severity"] == 47
    assert doc["event"]["id"] == "agent-1:7"
    assert doc["event"]["duration"] == 990_000_000
    assert doc["event"]["start"] == v.first_seen_time.ToJsonString()
    assert doc["event"]["created"] == stored.received_time.ToJsonString()
    assert doc["source"] == {"ip": "10.1.2.3", "port": 40007, "bytes": 300, "packets": 3}
    assert doc["destination"] == {"ip": "192.0.2.8", "port": 443, "bytes": 200, "packets": 2}
    network = doc["network"]
    assert (network["transport"], network["iana_number"], network["type"]) == ("tcp", "6", "ipv4")
    assert (network["bytes"], network["packets"], network["protocol"]) == (500, 5, "tls")
    assert network["vlan"] == {"id": "12"}
    assert network["community_id"] == community_id("10.1.2.3", "192.0.2.8", 40007, 443, 6)
    assert doc["host"] == {"name": "host-1"}
    assert doc["agent"] == {"id": "agent-1", "type": "auris-agent"}
    assert doc["rule"] == {"name": "m", "version": "1"}
    auris = doc["auris"]
    assert (auris["score"], auris["label"], auris["anomalous"]) == (0.97, "DoS", True)
    assert auris["model"] == {"id": "m", "version": "1"}
    assert auris["explanation"] == doc["message"] == "classifier: DoS p=0.97"
    assert auris["verdict"] == {"id": 42, "sequence": 7}
    assert auris["scores"][0]["top_features"] == [{"feature": "flow_duration", "value": 0.5}]
    assert auris["scores"][1]["score"] is None  # NaN: null
    assert auris["scores"][1]["shadow"] is True
    assert auris["analyst"]["label"] == "benign"
    assert auris["application"] == "TLS.Google"
    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN anywhere

    normal = ecs_verdict(verdict_pb2.StoredVerdict(id=1, verdict=make_verdict(1)))
    assert (normal["event"]["kind"], normal["event"]["category"], normal["event"]["severity"]) == (
        "event",
        ["network"],
        0,
    )


def test_an_alert_maps_to_ecs_fields_with_its_key_as_addresses() -> None:
    alert = admin_service_pb2.Alert(
        id=3,
        rule="scanner",
        key="src_ip=10.9.9.9 dst_port=22",
        state=admin_service_pb2.ALERT_STATE_OPEN,
        severity="critical",
        summary="anomalous; 20 within 5 min; src_ip=10.9.9.9 dst_port=22",
        events=20,
        verdict_ids=[5, 6],
    )
    alert.first_time.FromSeconds(1_800_000_000)
    alert.last_time.FromSeconds(1_800_000_060)
    alert.update_time.FromSeconds(1_800_000_061)
    doc = ecs_alert(alert, "opened")
    assert doc["@timestamp"] == "2027-01-15T08:01:01Z"
    assert doc["event"]["kind"] == "alert"
    assert doc["event"]["type"] == ["start"]
    assert doc["event"]["action"] == "alert-opened"
    assert doc["event"]["severity"] == 99
    assert doc["event"]["id"] == f"alert:3:{1_800_000_061 * 10**9}"
    assert doc["rule"]["name"] == "scanner"
    assert doc["source"] == {"ip": "10.9.9.9"}
    assert doc["destination"] == {"port": 22}
    assert doc["auris"]["alert"]["state"] == "open"
    assert doc["auris"]["alert"]["verdict_ids"] == [5, 6]
    assert ecs_alert(alert)["event"]["type"] == ["info"]  # a listing, not a change
    assert "action" not in ecs_alert(alert)["event"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('name = "a b"', "letters, digits"),
        ('name = "s"\noutput = "file"', "needs a path"),
        ('name = "s"\noutput = "syslog"', "file or stdout"),
        ('name = "s"\noutput = "stdout"\nverdicts = "some"', "all, anomalous, none"),
        ('name = "s"\noutput = "stdout"\nkeep = 0', "keep must be at least 1"),
        ('name = "s"\noutput = "stdout"\nalert_events = ["closed"]', "unknown alert_events closed"),
    ],
)
def test_bad_siem_sinks_are_one_line_config_errors(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "collector.toml"
    path.write_text(f"insecure = true\n[[siem_sinks]]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        load_collector_config(path)


def test_siem_sinks_on_a_real_collector(tmp_path: Path) -> None:
    """Every verdict once in the full sink, only anomalous ones in the filtered one, rotation keeps
    `keep` files under the size limit, alert changes follow; aurisctl --format ecs writes the same
    records; a restart (and verdicts stored while no sink ran) loses nothing."""
    db = tmp_path / "state" / "auris.db"
    logs = tmp_path / "logs"
    sinks = (
        SiemSink(name="all", path=str(logs / "all.jsonl"), alert_events=()),
        SiemSink(name="rot", path=str(logs / "rot.jsonl"), max_mib=16 / 1024, keep=2, alert_events=()),
        SiemSink(name="anom", path=str(logs / "anom.jsonl"), verdicts="anomalous"),
    )
    rule = AlertRule(name="attack", anomalous=True, group_by=("src_ip",), severity="critical")
    verdicts = [make_verdict(s, anomalous=s % 10 == 0, src_ip="10.9.9.9" if s % 10 == 0 else "10.0.0.1")
                for s in range(1, 201)]  # fmt: skip
    with (
        running_collector(db, siem_sinks=sinks, alert_rules=(rule,)) as running,
        CollectorClient(running.address, insecure=True) as client,
    ):
        for chunk in range(0, 200, 50):
            _stream(client, *verdicts[chunk : chunk + 50])
        assert wait_for(lambda: _exported(running) == {"all": 200, "rot": 200, "anom": 21}, 30), _exported(
            running
        )
        (alert,) = client.alerts()
        client.acknowledge_alert(alert.id, "on it")
        assert wait_for(lambda: _exported(running)["anom"] == 22, 30)
        assert running.collector is not None
        assert running.collector.siem.behind() == {"all": 0, "rot": 0, "anom": 0}

        # The full sink: one record per verdict, in id order, each as aurisctl maps it.
        written = _records(logs / "all.jsonl")
        assert [r["auris"]["verdict"]["sequence"] for r in written] == list(range(1, 201))
        out = io.StringIO()
        assert ctl.main(["--collector", running.address, "--insecure", "verdicts", "export", "--format",
                         "ecs", "--out", "-"], out=out) == 0  # fmt: skip
        from_ctl = [json.loads(line) for line in out.getvalue().splitlines()]
        assert sorted(from_ctl, key=lambda r: r["auris"]["verdict"]["id"]) == written

        # Rotation: the live file and two older ones, none past the limit, the newest records kept.
        rotated = [logs / name for name in ("rot.jsonl.2", "rot.jsonl.1", "rot.jsonl")]
        assert all(p.exists() and 0 < p.stat().st_size <= 16 * 1024 for p in rotated)
        assert not (logs / "rot.jsonl.3").exists()
        kept = [r["auris"]["verdict"]["sequence"] for r in _records(*rotated)]
        assert kept == list(range(201 - len(kept), 201))
        assert len(kept) < 200

        # The anomalous sink: 20 anomalous verdicts, the alert opened and acknowledged.
        anomalous = _records(logs / "anom.jsonl")
        verdict_records = [r for r in anomalous if r["event"]["dataset"] == "auris.verdict"]
        assert [r["auris"]["verdict"]["sequence"] for r in verdict_records] == list(range(10, 201, 10))
        alert_records = [r for r in anomalous if r["event"]["dataset"] == "auris.alert"]
        assert [r["event"]["action"] for r in alert_records] == ["alert-opened", "alert-acknowledged"]
        assert alert_records[0]["source"] == {"ip": "10.9.9.9"}
        assert alert_records[1]["auris"]["alert"]["note"] == "on it"
        out = io.StringIO()
        assert ctl.main(["--collector", running.address, "--insecure", "alerts", "list", "--format",
                         "ecs"], out=out) == 0  # fmt: skip
        (listed,) = [json.loads(line) for line in out.getvalue().splitlines()]
        assert listed["event"]["id"] == alert_records[1]["event"]["id"]  # the same change, the same id

    # Stored while no sink ran (a collector without [[siem_sinks]], or one that crashed before
    # exporting): the cursor picks them up at the next start.
    store = VerdictStore(db)
    store.ingest("agent-1", [make_verdict(s) for s in range(201, 211)])
    store.close()
    with running_collector(db, siem_sinks=sinks[:1], metrics_listen="127.0.0.1:0") as running:
        assert wait_for(lambda: _exported(running)["all"] == 10, 30)
        assert running.collector is not None
        assert running.collector.metrics is not None
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{running.collector.metrics.port}/metrics").read()
        assert b'auris_collector_siem_records_total{sink="all"} 10' in scraped
        assert b'auris_collector_siem_verdicts_behind{sink="all"} 0' in scraped
    written = _records(logs / "all.jsonl")
    assert [r["auris"]["verdict"]["sequence"] for r in written] == list(range(1, 211))
    assert (db.parent / "siem-all.cursor").exists()
    # The removed sinks' queued alert notifications are dropped, not kept forever.
    store = VerdictStore(db)
    assert store.db.execute("SELECT COUNT(*) FROM alert_outbox").fetchone() == (0,)
    store.close()


def test_a_new_sink_starts_from_now_and_stdout_works(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "auris.db"
    store = VerdictStore(db)
    store.ingest("agent-1", [make_verdict(s) for s in range(1, 6)])
    store.close()
    sink = SiemSink(name="out", output="stdout", alert_events=())
    with (
        running_collector(db, siem_sinks=(sink,)) as running,
        CollectorClient(running.address, insecure=True) as client,
    ):
        _stream(client, make_verdict(6))
        assert wait_for(lambda: _exported(running)["out"] == 1, 30)
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert [json.loads(line)["auris"]["verdict"]["sequence"] for line in lines] == [6]


def test_a_cursor_from_another_database_is_not_trusted(tmp_path: Path) -> None:
    """The database was replaced (deleted, restored) but siem-NAME.cursor stayed beside it: the
    sink must not wait for ids the new database will take ages to reach."""
    db = tmp_path / "auris.db"
    (tmp_path / "siem-all.cursor").write_text('{"verdict_id": 5000}\n')
    sink = SiemSink(name="all", path=str(tmp_path / "siem.jsonl"), alert_events=())
    with (
        running_collector(db, siem_sinks=(sink,)) as running,
        CollectorClient(running.address, insecure=True) as client,
    ):
        _stream(client, make_verdict(1), make_verdict(2))
        assert wait_for(lambda: _exported(running)["all"] == 2, 30)
    assert json.loads((tmp_path / "siem-all.cursor").read_text()) == {"verdict_id": 2}
