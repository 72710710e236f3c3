"""Alerts: rules over real SQLite, the lifecycle over a real collector, and notifications to a real
local HTTP server (webhook retries and dead letters) and a JSON-lines file."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from auris.agent.config import ConfigError
from auris.collector import ctl
from auris.collector.alerts import AlertRule, Alerts, AlertSink, AlertStateError, Notifier
from auris.collector.client import CollectorClient
from auris.collector.config import load_collector_config
from auris.collector.store import VerdictStore
from auris.v1 import admin_service_pb2, agent_service_pb2, agent_service_pb2_grpc, verdict_pb2
from tests.conftest import make_verdict, running_collector, wait_for

OPEN = admin_service_pb2.ALERT_STATE_OPEN
ACKNOWLEDGED = admin_service_pb2.ALERT_STATE_ACKNOWLEDGED
RESOLVED = admin_service_pb2.ALERT_STATE_RESOLVED
MINUTE_MS = 60_000


def _store(tmp_path: Path, *rules: AlertRule) -> tuple[VerdictStore, Alerts]:
    store = VerdictStore(tmp_path / "auris.db")
    alerts = Alerts(store, rules, [])
    store.on_ingest = alerts.evaluate
    return store, alerts


def _all(alerts: Alerts) -> list[admin_service_pb2.Alert]:
    return alerts.page([], [], 1000, "")[0]


def test_a_single_match_rule_keeps_one_open_alert_per_key(tmp_path: Path) -> None:
    store, alerts = _store(tmp_path, AlertRule(name="attack", anomalous=True, group_by=("src_ip",)))
    result = store.ingest(
        "agent-1",
        [
            make_verdict(1, anomalous=True, src_ip="10.0.0.7"),
            make_verdict(2, anomalous=False, src_ip="10.0.0.7"),
            make_verdict(3, anomalous=True, src_ip="10.0.0.8"),
            make_verdict(4, anomalous=True, src_ip="10.0.0.7"),
        ],
    )
    by_key = {a.key: a for a in _all(alerts)}
    assert set(by_key) == {"src_ip=10.0.0.7", "src_ip=10.0.0.8"}
    assert sorted(result.alert_ids) == sorted(a.id for a in by_key.values())
    seven = by_key["src_ip=10.0.0.7"]
    assert (seven.state, seven.events, seven.severity, seven.rule) == (OPEN, 2, "warning", "attack")
    assert list(seven.verdict_ids) == [result.stored_ids[0], result.stored_ids[3]]
    assert "src_ip=10.0.0.7" in seven.summary
    # Later matches join the open alert instead of opening another.
    fifth = make_verdict(5, anomalous=True, src_ip="10.0.0.7")
    store.ingest("agent-1", [fifth])
    after = {a.key: a for a in _all(alerts)}
    assert len(after) == 2
    assert after["src_ip=10.0.0.7"].events == 3
    # A resent batch stores nothing and adds no events.
    again = store.ingest("agent-1", [fifth])
    assert again.duplicates == 1
    assert again.alert_ids == []
    assert {a.key: a for a in _all(alerts)}["src_ip=10.0.0.7"].events == 3


def test_conditions_by_named_model_score_and_label(tmp_path: Path) -> None:
    rule = AlertRule(name="ae", model="ae", min_score=5.0, group_by=())
    labelled = AlertRule(name="dos", labels=("DoS",), group_by=("dst_port",))
    store, alerts = _store(tmp_path, rule, labelled)
    verdicts = []
    for sequence, ae_score in ((1, 4.9), (2, 5.0), (3, 7.5)):
        v = make_verdict(sequence, label="DoS" if sequence == 3 else "benign")
        v.scores.add(model={"model_id": "ae", "version": "2"}, score=ae_score, anomalous=ae_score > 6)
        verdicts.append(v)
    verdicts.append(make_verdict(4, score=9.0))  # no "ae" score at all: the named-model rule ignores it
    store.ingest("agent-1", verdicts)
    by_rule = {a.rule: a for a in _all(alerts)}
    assert by_rule["ae"].key == ""
    assert by_rule["ae"].events == 2
    assert by_rule["dos"].key == "dst_port=443"
    assert by_rule["dos"].events == 1


def test_a_counting_rule_opens_only_when_enough_matches_fall_in_its_window(tmp_path: Path) -> None:
    rule = AlertRule(name="scan", anomalous=True, group_by=("src_ip",), count=3, window_minutes=5)
    store, alerts = _store(tmp_path, rule)
    t0 = 1_700_000_000_000
    # Two matches, then a third 10 minutes later: never 3 within 5 minutes.
    store.ingest(
        "agent-1",
        [make_verdict(1, anomalous=True, scored_ms=t0), make_verdict(2, anomalous=True, scored_ms=t0 + 1000)],
    )
    assert _all(alerts) == []
    store.ingest("agent-1", [make_verdict(3, anomalous=True, scored_ms=t0 + 10 * MINUTE_MS)])
    assert _all(alerts) == []
    # Two more within the window of the third: 3 in 5 minutes, one alert with exactly those three.
    result = store.ingest(
        "agent-1",
        [
            make_verdict(4, anomalous=True, scored_ms=t0 + 11 * MINUTE_MS),
            make_verdict(5, anomalous=False, scored_ms=t0 + 11 * MINUTE_MS),
            make_verdict(6, anomalous=True, scored_ms=t0 + 12 * MINUTE_MS),
        ],
    )
    (alert,) = _all(alerts)
    assert alert.events == 3
    first_ids = [r[0] for r in store.db.execute("SELECT id FROM verdicts WHERE sequence = 3")]
    assert list(alert.verdict_ids) == [*first_ids, result.stored_ids[0], result.stored_ids[2]]
    assert alert.first_time.ToMilliseconds() == t0 + 10 * MINUTE_MS
    assert alert.last_time.ToMilliseconds() == t0 + 12 * MINUTE_MS
    # Once open, every further match joins it; the pending window is emptied.
    store.ingest("agent-1", [make_verdict(7, anomalous=True, scored_ms=t0 + 13 * MINUTE_MS)])
    assert _all(alerts)[0].events == 4
    assert store.db.execute("SELECT COUNT(*) FROM alert_events").fetchone() == (0,)


def test_lifecycle_acknowledge_resolve_and_reopen(tmp_path: Path) -> None:
    store, alerts = _store(tmp_path, AlertRule(name="attack", anomalous=True))
    store.ingest("agent-1", [make_verdict(1, anomalous=True)])
    (alert,) = _all(alerts)
    acked = alerts.acknowledge(alert.id, "ana", "looking")
    assert (acked.state, acked.acknowledged_by, acked.note) == (ACKNOWLEDGED, "ana", "looking")
    store.ingest("agent-1", [make_verdict(2, anomalous=True)])  # joins the acknowledged alert
    assert _all(alerts)[0].events == 2
    resolved = alerts.resolve(alert.id, "bob", "")
    assert (resolved.state, resolved.resolved_by, resolved.note) == (RESOLVED, "bob", "looking")
    with pytest.raises(AlertStateError, match="already resolved"):
        alerts.acknowledge(alert.id, "ana", "")
    with pytest.raises(LookupError, match="no alert 999"):
        alerts.resolve(999, "ana", "")
    # A new match after resolution opens a new alert for the same key.
    store.ingest("agent-1", [make_verdict(3, anomalous=True)])
    states = sorted((a.state, a.events) for a in _all(alerts))
    assert states == [(OPEN, 1), (RESOLVED, 2)]
    assert [a.state for a in alerts.page([OPEN], [], 10, "")[0]] == [OPEN]
    assert alerts.page([], ["other"], 10, "")[0] == []


def test_quiet_alerts_resolve_on_their_own_and_stale_events_are_forgotten(tmp_path: Path) -> None:
    quiet = AlertRule(name="quiet", anomalous=True, resolve_after_minutes=30)
    counting = AlertRule(name="count", anomalous=True, count=5, window_minutes=1)
    store, alerts = _store(tmp_path, quiet, counting)
    store.ingest("agent-1", [make_verdict(1, anomalous=True)])
    assert store.db.execute("SELECT COUNT(*) FROM alert_events").fetchone() == (1,)
    now = time.time_ns()
    assert alerts.maintain(now + 29 * 60 * 10**9) == []
    (resolved,) = alerts.maintain(now + 31 * 60 * 10**9)
    (alert,) = alerts.get([resolved])
    assert alert.state == RESOLVED
    assert alert.resolved_by.startswith("auris (quiet")
    assert store.db.execute("SELECT COUNT(*) FROM alert_events").fetchone() == (0,)


def test_alert_pages_follow_a_cursor(tmp_path: Path) -> None:
    store, alerts = _store(tmp_path, AlertRule(name="per-port", anomalous=True, group_by=("dst_port",)))
    store.ingest("agent-1", [make_verdict(i, anomalous=True, dst_port=1000 + i) for i in range(1, 8)])
    seen: list[int] = []
    token = ""
    while True:
        page, token = alerts.page([], [], 3, token)
        assert len(page) <= 3
        seen += [a.id for a in page]
        if not token:
            break
    assert seen == sorted(seen, reverse=True)
    assert len(set(seen)) == 7


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('name = "r"', "needs a condition"),
        ('name = "r"\nanomalous = true\ngroup_by = ["mac"]', "cannot group by mac"),
        ('name = "r"\nanomalous = true\ncount = 3', "needs window_minutes"),
        ('name = "r"\nanomalous = true\nseverity = "high"', "severity must be one of"),
        ('name = "r"\nanomalous = 3', "expected true or false"),
        ('name = "r"\nanomaly = true', "unknown key 'anomaly'"),
        ("anomalous = true", "missing name"),
    ],
)
def test_bad_rules_are_one_line_config_errors(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"insecure = true\n[[alert_rules]]\n{table}\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_collector_config(path)
    assert "\n" not in str(info.value)
    assert "alert_rules[0]" in str(info.value)


def test_duplicate_names_and_bad_sinks_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'insecure = true\n[[alert_rules]]\nname = "r"\nanomalous = true\n'
        '[[alert_rules]]\nname = "r"\nlabels = ["x"]\n'
    )
    with pytest.raises(ConfigError, match="names must be unique"):
        load_collector_config(path)
    path.write_text('insecure = true\n[[alert_sinks]]\nname = "s"\nkind = "webhook"\nurl = "ftp://x"\n')
    with pytest.raises(ConfigError, match="http:// or https://"):
        load_collector_config(path)


class _Hook(http.server.BaseHTTPRequestHandler):
    """Answers POSTs with the next status of the server's script (then 200), recording bodies."""

    def do_POST(self) -> None:
        server = self.server
        assert isinstance(server, _HookServer)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with server.lock:
            status = server.script.pop(0) if server.script else 200
            server.requests.append((status, dict(self.headers), json.loads(body)))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _HookServer(http.server.ThreadingHTTPServer):
    def __init__(self, script: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), _Hook)
        self.script = script
        self.requests: list[tuple[int, dict[str, str], dict[str, object]]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def delivered(self) -> list[dict[str, object]]:
        with self.lock:
            return [body for status, _, body in self.requests if status == 200]


@pytest.fixture
def hook_server() -> Iterator[_HookServer]:
    server = _HookServer(script=[500, 503])  # two failures, then success
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _stream(client: CollectorClient, *verdicts: verdict_pb2.Verdict) -> None:
    stub = agent_service_pb2_grpc.AgentServiceStub(client.channel)
    request = agent_service_pb2.StreamVerdictsRequest(agent_id="agent-1", verdicts=verdicts)
    list(stub.StreamVerdicts(iter([request])))


def test_alerts_end_to_end_on_a_real_collector(tmp_path: Path, hook_server: _HookServer) -> None:
    """Rules from the configuration; webhook with retries; a dead-lettered webhook; a JSON-lines
    sink; list, subscribe, acknowledge and resolve over gRPC and through aurisctl."""
    down = _HookServer(script=[500] * 100)  # never succeeds
    threading.Thread(target=down.serve_forever, daemon=True).start()
    rules = (
        AlertRule(name="attack", anomalous=True, group_by=("src_ip",), severity="critical"),
        AlertRule(name="burst", anomalous=True, group_by=("dst_port",), count=3, window_minutes=1),
    )
    sinks = (
        AlertSink(name="hook", kind="webhook", url=hook_server.url, headers=("Authorization: Bearer t0k",),
                  retry_base_s=0.05),
        AlertSink(name="down", kind="webhook", url=down.url, max_attempts=2, retry_base_s=0.05,
                  events=("opened",), dead_letter=str(tmp_path / "dead.jsonl")),
        AlertSink(name="log", kind="jsonl", path=str(tmp_path / "alerts.jsonl")),
    )  # fmt: skip
    try:
        with (
            running_collector(tmp_path / "auris.db", alert_rules=rules, alert_sinks=sinks) as running,
            CollectorClient(running.address, insecure=True) as client,
        ):
            changes: list[admin_service_pb2.Alert] = []
            errors: list[BaseException] = []

            def follow() -> None:
                try:
                    changes.extend(client.subscribe_alerts(rules=["attack"]))
                except grpc.RpcError as exc:
                    errors.append(exc)

            threading.Thread(target=follow, daemon=True).start()
            assert running.collector is not None
            assert wait_for(lambda: running.collector.alert_broker.subscribers == 1, 10)  # type: ignore[union-attr]

            _stream(client, make_verdict(1, anomalous=True, src_ip="10.9.9.9"), make_verdict(2))
            _stream(client, *(make_verdict(s, anomalous=True, src_ip="10.9.9.9") for s in (3, 4)))
            listed = list(client.alerts())
            assert sorted((a.rule, a.key, a.events) for a in listed) == [
                ("attack", "src_ip=10.9.9.9", 3),
                ("burst", "dst_port=443", 3),
            ]
            attack = next(a for a in listed if a.rule == "attack")
            assert attack.severity == "critical"
            assert [a.id for a in client.alerts(states=[OPEN], rules=["burst"])] == [
                next(a.id for a in listed if a.rule == "burst")
            ]

            out = io.StringIO()
            assert ctl.main(["--collector", running.address, "--insecure", "alerts", "ack", str(attack.id),
                             "--note", "on it"], out=out) == 0  # fmt: skip
            assert f"alert {attack.id}: acknowledged" in out.getvalue()
            resolved = client.resolve_alert(attack.id, "false positive")
            assert resolved.state == RESOLVED
            assert resolved.note == "false positive"
            assert resolved.acknowledged_by.startswith("insecure ipv4:127.0.0.1")
            with pytest.raises(grpc.RpcError) as info:
                client.acknowledge_alert(attack.id)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.RpcError) as info:
                client.resolve_alert(10_000)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            out = io.StringIO()
            assert ctl.main(["--collector", running.address, "--insecure", "alerts", "list", "--state",
                             "resolved"], out=out) == 0  # fmt: skip
            assert "resolved (insecure" in out.getvalue()
            assert "burst" not in out.getvalue()

            # Subscribers saw every change of the rule they follow, in order.
            assert wait_for(lambda: len(changes) >= 4, 10), changes
            assert [(c.state, c.events) for c in changes] == [
                (OPEN, 1), (OPEN, 3), (ACKNOWLEDGED, 3), (RESOLVED, 3),
            ]  # fmt: skip
            assert not errors

            # Webhook: two failures, then every event delivered, with the configured header.
            def events(bodies: list[dict[str, object]]) -> list[tuple[object, object]]:
                return sorted((b["event"], b["alert"]["rule"]) for b in bodies)  # type: ignore[index]

            expected = [("acknowledged", "attack"), ("opened", "attack"), ("opened", "burst"),
                        ("resolved", "attack")]  # fmt: skip
            assert wait_for(lambda: len(hook_server.delivered()) == 4, 20), hook_server.requests
            assert events(hook_server.delivered()) == expected
            assert [status for status, _, _ in hook_server.requests[:2]] == [500, 503]
            assert all(h["Authorization"] == "Bearer t0k" for _, h, _ in hook_server.requests)
            # JSON lines: the same four notifications.
            log = tmp_path / "alerts.jsonl"
            assert wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 4, 10)
            assert events([json.loads(line) for line in log.read_text().splitlines()]) == expected
            # The dead webhook: two attempts per "opened" notification, then the dead-letter file.
            dead = tmp_path / "dead.jsonl"
            assert wait_for(lambda: dead.exists() and len(dead.read_text().splitlines()) == 2, 20)
            records = [json.loads(line) for line in dead.read_text().splitlines()]
            assert {r["notification"]["alert"]["rule"] for r in records} == {"attack", "burst"}
            assert all(r["attempts"] == 2 and "HTTP 500" in r["error"] for r in records)
            assert len(down.requests) == 4
            assert wait_for(
                lambda: (
                    running.collector.store.reader()  # type: ignore[union-attr]
                    .execute("SELECT COUNT(*) FROM alert_outbox")
                    .fetchone()
                    == (0,)
                ),
                10,
            )
    finally:
        down.shutdown()
        down.server_close()


def test_queued_notifications_survive_a_restart(tmp_path: Path, hook_server: _HookServer) -> None:
    """Notifications commit with the alert: a collector that stops before delivering them (its sink
    unreachable) delivers them after the next start."""
    hook_server.script.clear()
    rule = AlertRule(name="attack", anomalous=True)
    unreachable = AlertSink(name="hook", kind="webhook", url="http://127.0.0.1:9/nothing-listens",
                            retry_base_s=60, timeout_s=0.5)  # fmt: skip
    store = VerdictStore(tmp_path / "auris.db")
    alerts = Alerts(store, [rule], [unreachable])
    store.on_ingest = alerts.evaluate
    store.ingest("agent-1", [make_verdict(1, anomalous=True)])
    notifier = Notifier(store, [unreachable], tmp_path / "dead.jsonl")
    notifier.deliver_due()
    assert notifier.failed_attempts == 1
    assert notifier.delivered == 0
    store.close()
    # "Restart": the same database, the sink now reachable; the notification is due again at once.
    reachable = AlertSink(name="hook", kind="webhook", url=hook_server.url)
    store = VerdictStore(tmp_path / "auris.db")
    store.db.execute("UPDATE alert_outbox SET due_ns = 0")
    store.db.conn.commit()
    notifier = Notifier(store, [reachable], tmp_path / "dead.jsonl")
    notifier.deliver_due()
    assert notifier.delivered == 1
    ((status, _, body),) = hook_server.requests
    assert status == 200
    assert body["event"] == "opened"
    assert store.db.execute("SELECT COUNT(*) FROM alert_outbox").fetchone() == (0,)
    store.close()
