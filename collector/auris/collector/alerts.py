"""Alerts: rules from the collector's configuration, grouped into one open alert per (rule, key).

A rule matches single verdicts (a model's score, the anomalous flag, labels). With
``count = 1`` the first match opens an alert; with ``count = N`` an alert opens when N
matches with the same key fall within ``window_minutes``. Later matches join the open
alert until it is resolved (by an analyst, or on its own after ``resolve_after_minutes``
without new events). Rules are evaluated inside the ingest transaction, so an alert,
the verdicts that raised it and its queued notifications commit together: a crash loses
none of them and repeats none.

Notifications leave through an outbox table: the ``Notifier`` thread hands each to its
sink (a webhook, with retries and a dead-letter file; or a JSON-lines file) and deletes
it only once delivered or dead-lettered.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from auris.agent import __version__
from auris.collector.store import VerdictStore, decode_page_token, encode_page_token
from auris.v1 import admin_service_pb2, agent_service_pb2, feed_service_pb2, verdict_pb2

__all__ = [
    "EVENTS",
    "SIEM_OUTBOX_PREFIX",
    "AlertRule",
    "AlertSink",
    "AlertStateError",
    "Alerts",
    "Notifier",
    "alert_wanted",
]

logger = logging.getLogger(__name__)

OPEN = admin_service_pb2.ALERT_STATE_OPEN
ACKNOWLEDGED = admin_service_pb2.ALERT_STATE_ACKNOWLEDGED
RESOLVED = admin_service_pb2.ALERT_STATE_RESOLVED
SEVERITIES = ("info", "warning", "critical")
# Notification events a sink can ask for.
EVENTS = ("opened", "acknowledged", "resolved")
# Outbox rows under this prefix belong to SIEM sinks (siem.py), not to the Notifier.
SIEM_OUTBOX_PREFIX = "siem:"
# Verdict ids kept on an alert (the first ones); `events` counts them all.
VERDICT_IDS_KEPT = 100
_MINUTE_NS = 60_000_000_000

_GROUP_FIELDS: dict[str, Callable[[verdict_pb2.Verdict], object]] = {
    "agent_id": lambda v: v.agent_id,
    "hostname": lambda v: v.hostname,
    "src_ip": lambda v: v.flow.src_ip,
    "dst_ip": lambda v: v.flow.dst_ip,
    "dst_port": lambda v: v.flow.dst_port,
    "ip_protocol": lambda v: v.flow.ip_protocol,
    "label": lambda v: v.label,
    "model": lambda v: v.model.model_id,
}


_FEED_GROUP_FIELDS: dict[str, Callable[[feed_service_pb2.FeedScore], object]] = {
    "feed_id": lambda s: s.feed_id,
    "entity": lambda s: s.entity,
    "model": lambda s: s.model.model_id,
}


def _ns(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


class AlertStateError(Exception):
    """The alert is not in a state that allows the change (acknowledging a resolved alert)."""


@dataclasses.dataclass(frozen=True)
class AlertRule:
    """One ``[[alert_rules]]`` table of the collector's configuration."""

    name: str
    # Judge by this model's score, flag and label; empty: the model that decided the verdict.
    model: str = ""
    # Conditions (all that are set must hold; at least one must be set).
    anomalous: bool | None = None
    min_score: float | None = None
    labels: tuple[str, ...] = ()
    # Verdict fields whose values make the alert's key: one open alert per rule and key.
    group_by: tuple[str, ...] = ("src_ip",)
    # Open an alert when `count` matches with one key fall within `window_minutes`.
    count: int = 1
    window_minutes: float = 0.0
    severity: str = "warning"
    # Resolve an alert on its own after this many minutes without a new match (0: never).
    resolve_after_minutes: float = 0.0
    # A drift rule: matches an agent's heartbeat whose window of a model (of `model`, or any)
    # has a score or feature PSI at or above this; keyed by agent and model version. It takes
    # no verdict condition.
    max_psi: float | None = None
    # A feed rule: judges the scores of this feed's records ("*": every feed) instead of verdicts,
    # with anomalous and min_score; group_by from feed_id, entity (symbol or hashed customer), model.
    feed: str = ""

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 64:
            raise ValueError("name must be 1 to 64 characters")
        if self.max_psi is not None:
            if self.anomalous is not None or self.min_score is not None or self.labels or self.count != 1:
                raise ValueError(
                    f"rule {self.name!r}: a drift rule (max_psi) takes no verdict condition or count"
                )
            if not (math.isfinite(self.max_psi) and self.max_psi > 0):
                raise ValueError(f"rule {self.name!r}: max_psi must be a positive number")
        elif self.anomalous is None and self.min_score is None and not self.labels:
            raise ValueError(f"rule {self.name!r} needs a condition: anomalous, min_score, labels or max_psi")
        if self.feed:
            if self.labels or self.max_psi is not None:
                raise ValueError(f"rule {self.name!r}: a feed rule takes anomalous and min_score only")
            if self.group_by == ("src_ip",):  # the verdict rules' default
                object.__setattr__(self, "group_by", ("feed_id", "entity"))
            bad = [f for f in self.group_by if f not in _FEED_GROUP_FIELDS]
            if bad:
                raise ValueError(f"rule {self.name!r}: a feed rule groups by {', '.join(_FEED_GROUP_FIELDS)}")
        unknown = [f for f in self.group_by if f not in _GROUP_FIELDS and not self.feed]
        if unknown:
            raise ValueError(f"rule {self.name!r}: cannot group by {', '.join(unknown)} "
                             f"(one of {', '.join(_GROUP_FIELDS)})")  # fmt: skip
        if self.count < 1:
            raise ValueError(f"rule {self.name!r}: count must be at least 1")
        if self.count > 1 and not self.window_minutes > 0:
            raise ValueError(f"rule {self.name!r}: count > 1 needs window_minutes > 0")
        if self.severity not in SEVERITIES:
            raise ValueError(f"rule {self.name!r}: severity must be one of {', '.join(SEVERITIES)}")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise ValueError(f"rule {self.name!r}: min_score must be a finite number")

    def judge(self, v: verdict_pb2.Verdict) -> bool:
        """Whether one verdict matches the rule's conditions."""
        if self.max_psi is not None or self.feed:
            return False  # drift rules judge heartbeats, feed rules feed scores
        if self.model:
            score = next((s for s in v.scores if s.model.model_id == self.model), None)
            if score is None:
                return False
            value, anomalous, label = score.score, score.anomalous, score.label
        else:
            value = next(
                (
                    s.score
                    for s in v.scores
                    if s.model.model_id == v.model.model_id and s.model.version == v.model.version
                ),
                math.nan,
            )
            anomalous, label = v.anomalous, v.label
        if self.anomalous is not None and anomalous != self.anomalous:
            return False
        if self.min_score is not None and not value >= self.min_score:  # NaN never passes
            return False
        return not self.labels or label in self.labels

    def judge_feed(self, s: feed_service_pb2.FeedScore) -> bool:
        if not self.feed or (self.feed != "*" and s.feed_id != self.feed):
            return False
        if self.model and s.model.model_id != self.model:
            return False
        if self.anomalous is not None and s.anomalous != self.anomalous:
            return False
        return self.min_score is None or s.score >= self.min_score  # NaN (unscored) never passes

    def feed_key(self, s: feed_service_pb2.FeedScore) -> str:
        return " ".join(f"{f}={_FEED_GROUP_FIELDS[f](s)}" for f in self.group_by)

    def key(self, v: verdict_pb2.Verdict) -> str:
        return " ".join(f"{f}={_GROUP_FIELDS[f](v)}" for f in self.group_by)

    def describe(self, key: str) -> str:
        """The alert's summary, e.g. "anomalous, score >= 0.9 (model ae); 20 within 5 min; src_ip=..."."""
        what = []
        if self.max_psi is not None:
            what.append(f"drift: PSI >= {self.max_psi:g}")
        if self.anomalous is not None:
            what.append("anomalous" if self.anomalous else "not anomalous")
        if self.min_score is not None:
            what.append(f"score >= {self.min_score:g}")
        if self.labels:
            what.append(f"label {' or '.join(self.labels)}")
        parts = [", ".join(what) + (f" (model {self.model})" if self.model else "")]
        if self.count > 1:
            parts.append(f"{self.count} within {self.window_minutes:g} min")
        if key:
            parts.append(key)
        return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class AlertSink:
    """One ``[[alert_sinks]]`` table: where notifications of alert changes go."""

    name: str
    # "webhook" (JSON POST) or "jsonl" (one JSON object a line, appended to `path`).
    kind: str
    url: str = ""
    path: str = ""
    # Extra HTTP headers for the webhook, "Name: value" each (e.g. an Authorization header).
    headers: tuple[str, ...] = ()
    events: tuple[str, ...] = EVENTS
    timeout_s: float = 5.0
    # Attempts before a notification goes to the dead-letter file; the wait between attempts
    # doubles from retry_base_s (at most 5 minutes).
    max_attempts: int = 5
    retry_base_s: float = 1.0
    # JSON-lines file for notifications that could not be delivered; empty means
    # alerts-dead-letter.jsonl beside the database.
    dead_letter: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")
        if self.name.startswith(SIEM_OUTBOX_PREFIX):
            raise ValueError(f"sink {self.name!r}: names starting with {SIEM_OUTBOX_PREFIX!r} are reserved")
        if self.kind == "webhook":
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"sink {self.name!r}: url must be an http:// or https:// address")
        elif self.kind == "jsonl":
            if not self.path:
                raise ValueError(f"sink {self.name!r}: a jsonl sink needs a path")
        else:
            raise ValueError(f"sink {self.name!r}: kind must be webhook or jsonl, not {self.kind!r}")
        bad = [e for e in self.events if e not in EVENTS]
        if bad:
            raise ValueError(f"sink {self.name!r}: unknown events {', '.join(bad)} (of {', '.join(EVENTS)})")
        if any(":" not in h for h in self.headers):
            raise ValueError(f"sink {self.name!r}: headers must read 'Name: value'")
        if self.max_attempts < 1:
            raise ValueError(f"sink {self.name!r}: max_attempts must be at least 1")


_ALERT_COLUMNS = (
    "id, rule, key, state, severity, summary, events, first_ns, last_ns, updated_ns, verdict_ids,"
    " acknowledged_by, resolved_by, note"
)


def _alert(row: Sequence[Any]) -> admin_service_pb2.Alert:
    (row_id, rule, key, state, severity, summary, events, first_ns, last_ns, updated_ns, ids,
     acknowledged_by, resolved_by, note) = row  # fmt: skip
    alert = admin_service_pb2.Alert(
        id=row_id,
        rule=rule,
        key=key,
        state=state,
        severity=severity,
        summary=summary,
        events=events,
        verdict_ids=json.loads(ids),
        acknowledged_by=acknowledged_by,
        resolved_by=resolved_by,
        note=note,
    )
    alert.first_time.FromNanoseconds(first_ns)
    alert.last_time.FromNanoseconds(last_ns)
    alert.update_time.FromNanoseconds(updated_ns)
    return alert


def alert_wanted(states: Sequence[int], rules: Sequence[str]) -> Callable[[admin_service_pb2.Alert], bool]:
    """The subscription predicate for SubscribeAlerts: the same meaning as ListAlerts' filter."""
    return lambda a: (not states or a.state in states) and (not rules or a.rule in rules)


class Alerts:
    """Rule evaluation (as the store's ingest hook), the alert lifecycle, and the outbox."""

    def __init__(
        self,
        store: VerdictStore,
        rules: Sequence[AlertRule],
        sinks: Sequence[AlertSink],
        outboxes: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._store = store
        self.configure(rules, sinks, outboxes)

    def configure(
        self,
        rules: Sequence[AlertRule],
        sinks: Sequence[AlertSink],
        outboxes: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Take up rules and sinks (at start, and on SIGHUP from the writer thread, between
        transactions). ``outboxes``: more outbox names (SIEM sinks) and the events each takes."""
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError("alert rule names must be unique")
        self.rules = {r.name: r for r in rules}
        self.sinks = {s.name: s for s in sinks}
        self._outboxes = {s.name: tuple(s.events) for s in sinks} | {
            name: tuple(events) for name, events in (outboxes or {}).items()
        }

    # -- evaluation (inside the ingest transaction) ------------------------------------------

    def evaluate(
        self, conn: sqlite3.Connection, items: list[tuple[int, verdict_pb2.Verdict]], now_ns: int
    ) -> list[int]:
        """Open or extend alerts for newly stored verdicts; return the ids of alerts that changed."""
        changed: list[int] = []
        for rule in self.rules.values():
            hits: dict[str, list[tuple[int, int]]] = {}
            for verdict_id, v in items:
                if rule.judge(v):
                    hits.setdefault(rule.key(v), []).append((verdict_id, _ns(v.scored_time)))
            for key, group in hits.items():
                alert_id = self._add(conn, rule, key, group, now_ns)
                if alert_id is not None:
                    changed.append(alert_id)
        return changed

    def evaluate_feed(
        self, conn: sqlite3.Connection, scores: Sequence[feed_service_pb2.FeedScore], now_ns: int
    ) -> list[int]:
        """Feed rules over newly stored feed scores, inside their transaction; ids of changed alerts."""
        changed: list[int] = []
        for rule in self.rules.values():
            hits: dict[str, list[tuple[int, int]]] = {}
            for s in scores:
                if rule.judge_feed(s):
                    hits.setdefault(rule.feed_key(s), []).append((0, _ns(s.time)))
            for key, group in hits.items():
                alert_id = self._add(conn, rule, key, group, now_ns)
                if alert_id is not None:
                    changed.append(alert_id)
        return changed

    @property
    def has_feed_rules(self) -> bool:
        return any(r.feed for r in self.rules.values())

    def evaluate_heartbeat(self, heartbeat: agent_service_pb2.HeartbeatRequest, now_ns: int) -> list[int]:
        """Drift rules against one heartbeat's windows; the ids of alerts opened or extended."""
        rules = [r for r in self.rules.values() if r.max_psi is not None]
        if not rules or not heartbeat.health.drift:
            return []
        changed: list[int] = []
        with self._store.writing() as conn:
            for rule in rules:
                assert rule.max_psi is not None
                for drift in heartbeat.health.drift:
                    if rule.model and drift.model.model_id != rule.model:
                        continue
                    if max(drift.score_psi, drift.max_feature_psi) < rule.max_psi:
                        continue
                    key = f"agent_id={heartbeat.agent_id} model={drift.model.model_id}@{drift.model.version}"
                    alert_id = self._add(conn, rule, key, [(0, now_ns)], now_ns)
                    if alert_id is not None:
                        changed.append(alert_id)
        return changed

    def _add(
        self, conn: sqlite3.Connection, rule: AlertRule, key: str, hits: list[tuple[int, int]], now_ns: int
    ) -> int | None:
        row = conn.execute(
            "SELECT id, verdict_ids FROM alerts WHERE rule = ? AND key = ? AND state != ?",
            (rule.name, key, RESOLVED),
        ).fetchone()
        if row is not None:
            alert_id, ids_json = row
            ids = json.loads(ids_json)
            ids += [
                verdict_id for verdict_id, _ in hits[: max(0, VERDICT_IDS_KEPT - len(ids))] if verdict_id > 0
            ]
            conn.execute(
                "UPDATE alerts SET events = events + ?, first_ns = MIN(first_ns, ?),"
                " last_ns = MAX(last_ns, ?), touched_ns = ?, updated_ns = ?, verdict_ids = ? WHERE id = ?",
                (
                    len(hits),
                    min(t for _, t in hits),
                    max(t for _, t in hits),
                    now_ns,
                    now_ns,
                    json.dumps(ids),
                    alert_id,
                ),
            )
            return int(alert_id)
        if rule.count > 1:
            conn.executemany(
                "INSERT INTO alert_events (rule, key, time_ns, verdict_id) VALUES (?, ?, ?, ?)",
                [(rule.name, key, t, verdict_id) for verdict_id, t in hits],
            )
            window_start = max(t for _, t in hits) - int(rule.window_minutes * _MINUTE_NS)
            conn.execute(
                "DELETE FROM alert_events WHERE rule = ? AND key = ? AND time_ns < ?",
                (rule.name, key, window_start),
            )
            hits = conn.execute(
                "SELECT verdict_id, time_ns FROM alert_events WHERE rule = ? AND key = ? ORDER BY time_ns",
                (rule.name, key),
            ).fetchall()
            if len(hits) < rule.count:
                return None
            conn.execute("DELETE FROM alert_events WHERE rule = ? AND key = ?", (rule.name, key))
        cursor = conn.execute(
            "INSERT INTO alerts (rule, key, state, severity, summary, events, first_ns, last_ns, touched_ns,"
            " updated_ns, verdict_ids) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rule.name,
                key,
                OPEN,
                rule.severity,
                rule.describe(key),
                len(hits),
                min(t for _, t in hits),
                max(t for _, t in hits),
                now_ns,
                now_ns,
                json.dumps([verdict_id for verdict_id, _ in hits[:VERDICT_IDS_KEPT] if verdict_id > 0]),
            ),
        )
        alert_id = int(cursor.lastrowid or 0)
        self._enqueue(conn, "opened", alert_id, now_ns)
        return alert_id

    def _enqueue(self, conn: sqlite3.Connection, event: str, alert_id: int, now_ns: int) -> None:
        sinks = [name for name, events in self._outboxes.items() if event in events]
        if not sinks:
            return
        (alert,) = self._fetch(conn, [alert_id])
        payload = json.dumps(
            {
                "event": event,
                "time": dt.datetime.fromtimestamp(now_ns / 1e9, dt.UTC).isoformat().replace("+00:00", "Z"),
                "alert": json_format.MessageToDict(alert, preserving_proto_field_name=True),
            },
            sort_keys=True,
        )
        conn.executemany(
            "INSERT INTO alert_outbox (sink, payload, due_ns) VALUES (?, ?, ?)",
            [(name, payload, now_ns) for name in sinks],
        )

    # -- queries and the lifecycle ------------------------------------------------------------

    @staticmethod
    def _fetch(conn: sqlite3.Connection, ids: Sequence[int]) -> list[admin_service_pb2.Alert]:
        marks = ", ".join("?" for _ in ids)
        rows = conn.execute(
            f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id IN ({marks}) ORDER BY id", list(ids)
        )
        return [_alert(row) for row in rows]

    def get(self, ids: Sequence[int]) -> list[admin_service_pb2.Alert]:
        return self._fetch(self._store.reader(), ids) if ids else []

    def page(
        self, states: Sequence[int], rules: Sequence[str], page_size: int, page_token: str
    ) -> tuple[list[admin_service_pb2.Alert], str]:
        """One page of alerts, newest first, and the cursor to the next page ('' at the end)."""
        where: list[str] = []
        params: list[Any] = []
        bad = [s for s in states if s not in (OPEN, ACKNOWLEDGED, RESOLVED)]
        if bad:
            raise ValueError(f"unknown alert state {bad[0]}")
        for column, values in (("state", list(states)), ("rule", list(rules))):
            if values:
                where.append(f"{column} IN ({', '.join('?' for _ in values)})")
                params.extend(values)
        if page_token:
            where.append("id < ?")
            params.append(decode_page_token(page_token))
        sql = f"SELECT {_ALERT_COLUMNS} FROM alerts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = (
            self._store.reader()
            .execute(sql + " ORDER BY id DESC LIMIT ?", [*params, page_size + 1])
            .fetchall()
        )
        alerts = [_alert(row) for row in rows[:page_size]]
        token = encode_page_token(alerts[-1].id) if len(rows) > page_size and alerts else ""
        return alerts, token

    def acknowledge(self, alert_id: int, actor: str, note: str) -> admin_service_pb2.Alert:
        return self._transition(alert_id, ACKNOWLEDGED, actor, note)

    def resolve(self, alert_id: int, actor: str, note: str) -> admin_service_pb2.Alert:
        return self._transition(alert_id, RESOLVED, actor, note)

    def _transition(self, alert_id: int, state: int, actor: str, note: str) -> admin_service_pb2.Alert:
        now_ns = time.time_ns()
        with self._store.writing() as conn:
            row = conn.execute("SELECT state FROM alerts WHERE id = ?", (alert_id,)).fetchone()
            if row is None:
                raise LookupError(f"no alert {alert_id}")
            if row[0] == RESOLVED:
                raise AlertStateError(f"alert {alert_id} is already resolved")
            who = "acknowledged_by" if state == ACKNOWLEDGED else "resolved_by"
            conn.execute(
                f"UPDATE alerts SET state = ?, {who} = ?, note = CASE WHEN ? != '' THEN ? ELSE note END,"
                " updated_ns = ? WHERE id = ?",
                (state, actor[:128], note[:1000], note[:1000], now_ns, alert_id),
            )
            self._enqueue(conn, "acknowledged" if state == ACKNOWLEDGED else "resolved", alert_id, now_ns)
            (alert,) = self._fetch(conn, [alert_id])
        return alert

    def maintain(self, now_ns: int | None = None) -> list[int]:
        """Resolve quiet alerts of rules with resolve_after_minutes; forget match events older
        than their rule's window. Returns the ids of the alerts resolved."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        resolved: list[int] = []
        with self._store.writing() as conn:
            for rule in self.rules.values():
                if rule.resolve_after_minutes > 0:
                    quiet_since = now_ns - int(rule.resolve_after_minutes * _MINUTE_NS)
                    ids = [
                        r[0]
                        for r in conn.execute(
                            "SELECT id FROM alerts WHERE rule = ? AND state != ? AND touched_ns < ?",
                            (rule.name, RESOLVED, quiet_since),
                        )
                    ]
                    for alert_id in ids:
                        conn.execute(
                            "UPDATE alerts SET state = ?, resolved_by = ?, updated_ns = ? WHERE id = ?",
                            (
                                RESOLVED,
                                f"auris (quiet for {rule.resolve_after_minutes:g} min)",
                                now_ns,
                                alert_id,
                            ),
                        )
                        self._enqueue(conn, "resolved", alert_id, now_ns)
                    resolved += ids
                if rule.count > 1:
                    conn.execute(
                        "DELETE FROM alert_events WHERE rule = ? AND time_ns < ?",
                        (rule.name, now_ns - int(rule.window_minutes * _MINUTE_NS)),
                    )
            # Events of rules no longer configured.
            names = list(self.rules)
            conn.execute(
                f"DELETE FROM alert_events WHERE rule NOT IN ({', '.join('?' for _ in names)})", names
            )
        return resolved


class SinkError(Exception):
    """A notification could not be delivered this time (one line)."""


def _send_webhook(sink: AlertSink, payload: str) -> None:
    headers = {"Content-Type": "application/json", "User-Agent": f"auris-collector/{__version__}"}
    for header in sink.headers:
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    request = urllib.request.Request(sink.url, data=payload.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=sink.timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise SinkError(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SinkError(f"cannot reach {sink.url}: {reason}") from None


def _append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


_MINE = f"sink NOT LIKE '{SIEM_OUTBOX_PREFIX}%'"
_DUE_SQL = (
    "SELECT id, sink, payload, attempts FROM alert_outbox"
    f" WHERE due_ns <= ? AND {_MINE} ORDER BY id LIMIT 100"
)


class Notifier:
    """Delivers the outbox on its own thread; ``wake()`` after a commit that queued notifications."""

    def __init__(self, store: VerdictStore, sinks: Sequence[AlertSink], default_dead_letter: Path) -> None:
        self._store = store
        self._sinks = {s.name: s for s in sinks}
        self._default_dead_letter = default_dead_letter
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auris-notifier", daemon=True)
        # Counters, for logs and metrics.
        self.delivered = 0
        self.failed_attempts = 0
        self.dead_lettered = 0

    def start(self) -> None:
        self._thread.start()

    def set_sinks(self, sinks: Sequence[AlertSink]) -> None:
        """New sinks (SIGHUP); notifications queued for a removed one are dropped when due."""
        self._sinks = {s.name: s for s in sinks}

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def dead_letter_path(self, sink: AlertSink) -> Path:
        return Path(sink.dead_letter) if sink.dead_letter else self._default_dead_letter

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                next_due = self.deliver_due()
            except Exception:  # a bug here must not end deliveries for good
                logger.exception("alert notifier failed; retrying in 5 s")
                next_due = time.time_ns() + 5_000_000_000
            wait_s = 1.0 if next_due is None else min(1.0, max(0.0, (next_due - time.time_ns()) / 1e9))
            self._wake.wait(wait_s)
            self._wake.clear()

    def deliver_due(self, now_ns: int | None = None) -> int | None:
        """Deliver every notification that is due; return when the next one falls due (None: none)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        rows = self._store.reader().execute(_DUE_SQL, (now_ns,)).fetchall()
        for row_id, name, payload, attempts in rows:
            if self._stop.is_set():
                break
            sink = self._sinks.get(name)
            if sink is None:
                logger.warning(
                    "alert notification %d: sink %r is no longer configured; dropped", row_id, name
                )
                self._done(row_id)
                continue
            try:
                if sink.kind == "webhook":
                    _send_webhook(sink, payload)
                else:
                    _append_line(Path(sink.path), payload)
            except (SinkError, OSError) as exc:
                self._failed(sink, row_id, payload, attempts + 1, str(exc))
                continue
            self.delivered += 1
            self._done(row_id)
        (next_due,) = (
            self._store.reader().execute(f"SELECT MIN(due_ns) FROM alert_outbox WHERE {_MINE}").fetchone()
        )
        return None if next_due is None else int(next_due)

    def _done(self, row_id: int) -> None:
        with self._store.writing() as conn:
            conn.execute("DELETE FROM alert_outbox WHERE id = ?", (row_id,))

    def _failed(self, sink: AlertSink, row_id: int, payload: str, attempts: int, error: str) -> None:
        self.failed_attempts += 1
        if attempts < sink.max_attempts:
            delay_s = min(300.0, sink.retry_base_s * 2 ** (attempts - 1))
            logger.warning(
                "alert sink %s: attempt %d of %d failed (%s); next in %.1f s",
                sink.name, attempts, sink.max_attempts, error, delay_s,
            )  # fmt: skip
            with self._store.writing() as conn:
                conn.execute(
                    "UPDATE alert_outbox SET attempts = ?, due_ns = ? WHERE id = ?",
                    (attempts, time.time_ns() + int(delay_s * 1e9), row_id),
                )
            return
        path = self.dead_letter_path(sink)
        record = {
            "sink": sink.name,
            "attempts": attempts,
            "error": error,
            "notification": json.loads(payload),
        }
        try:
            _append_line(path, json.dumps(record, sort_keys=True))
        except OSError as exc:
            # Keep it in the outbox rather than lose it; try again in a minute.
            logger.error("alert sink %s: cannot write dead-letter file %s: %s", sink.name, path, exc)
            with self._store.writing() as conn:
                conn.execute(
                    "UPDATE alert_outbox SET due_ns = ? WHERE id = ?",
                    (time.time_ns() + 60_000_000_000, row_id),
                )
            return
        self.dead_lettered += 1
        logger.error(
            "alert sink %s: giving up after %d attempts (%s); written to %s", sink.name, attempts, error, path
        )
        self._done(row_id)
