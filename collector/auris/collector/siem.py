"""SIEM export: verdicts and alert changes as JSON lines in an Elastic Common Schema layout.

One mapping (``ecs_verdict``, ``ecs_alert``) serves the collector's ``[[siem_sinks]]`` and
``aurisctl ... --format ecs``; docs/siem.md lists every field.

A sink runs on a thread of its own, off the ingest path: it reads verdicts from the database
after a cursor (the last exported verdict id, kept in ``siem-NAME.cursor`` beside the database)
and alert changes from the alert outbox (queued in the transaction that changed the alert, under
the name ``siem:NAME``). Records are written and flushed (fsync'd for files) before the cursor
moves or the outbox row goes, so a restart or a crash repeats at most the last batch and loses
nothing: delivery is at least once, and ``event.id`` names each record for deduplication.
Verdicts that retention deletes before a lagging sink reads them are not exported.

A sink is busy at most a quarter of the time (it rests three times as long as each batch took):
while ingest runs flat out it falls behind rather than slow it down, and catches up later.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format, timestamp_pb2

from auris.collector.alerts import EVENTS, SIEM_OUTBOX_PREFIX
from auris.collector.store import VerdictStore, stored_verdict
from auris.v1 import admin_service_pb2, flow_pb2, model_pb2, verdict_pb2

__all__ = ["ECS_VERSION", "SiemExport", "SiemSink", "community_id", "ecs_alert", "ecs_verdict"]

logger = logging.getLogger(__name__)

ECS_VERSION = "8.11.0"

_TRANSPORTS = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "ipv6-icmp", 132: "sctp"}
# event.severity: Elastic's detection-rule scale (low 21, medium 47, critical 99).
ALERT_SEVERITY = {"info": 21, "warning": 47, "critical": 99}
ANOMALOUS_VERDICT_SEVERITY = 47
# Alert key fields ("src_ip=10.0.0.9 dst_port=443") that have an ECS home.
_KEY_FIELDS = {
    "src_ip": ("source", "ip"),
    "dst_ip": ("destination", "ip"),
    "dst_port": ("destination", "port"),
    "agent_id": ("agent", "id"),
    "hostname": ("host", "name"),
}
_ALERT_ACTIONS = {"opened": "start", "acknowledged": "change", "resolved": "end"}


@functools.lru_cache(maxsize=4096)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _time(ts: timestamp_pb2.Timestamp) -> str | None:
    """RFC 3339 in UTC with 3, 6 or 9 decimals as needed (Timestamp.ToJsonString's text, a few
    times faster: every exported verdict has four)."""
    seconds, nanos = ts.seconds, ts.nanos
    if not (seconds or nanos):
        return None
    if nanos == 0:
        return f"{_second(seconds)}Z"
    if nanos % 1_000_000 == 0:
        return f"{_second(seconds)}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{_second(seconds)}.{nanos // 1_000:06d}Z"
    return f"{_second(seconds)}.{nanos:09d}Z"


def _packed(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


def _number(x: float) -> float | None:
    """JSON has no NaN or infinity: an unscored value is null."""
    return x if math.isfinite(x) else None


def _lower_name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def community_id(src_ip: str, dst_ip: str, src_port: int, dst_port: int, protocol: int, seed: int = 0) -> str:
    """The Community ID (v1) of a TCP, UDP or SCTP flow: the same string Zeek and Suricata give it,
    whichever side is called the source. Empty for other protocols or unparsable addresses."""
    if protocol not in (6, 17, 132):
        return ""
    try:
        src, dst = _packed(src_ip), _packed(dst_ip)
    except OSError:  # not an address
        return ""
    if (src, src_port) > (dst, dst_port):
        src, dst, src_port, dst_port = dst, src, dst_port, src_port
    data = (
        seed.to_bytes(2, "big")
        + src
        + dst
        + bytes((protocol, 0))
        + src_port.to_bytes(2, "big")
        + dst_port.to_bytes(2, "big")
    )
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode()


def _network(flow: flow_pb2.FlowKey, c: flow_pb2.FlowCounters, application: str) -> dict[str, Any]:
    network: dict[str, Any] = {
        "iana_number": str(flow.ip_protocol),
        "bytes": c.src_to_dst_bytes + c.dst_to_src_bytes,
        "packets": c.src_to_dst_packets + c.dst_to_src_packets,
    }
    if flow.ip_protocol in _TRANSPORTS:
        network["transport"] = _TRANSPORTS[flow.ip_protocol]
    if flow.ip_version in (4, 6):
        network["type"] = f"ipv{flow.ip_version}"
    if application:  # nDPI's "TLS.Google": the protocol is the part before the dot
        network["protocol"] = application.split(".", 1)[0].lower()
    if flow.vlan_id:
        network["vlan"] = {"id": str(flow.vlan_id)}
    cid = community_id(flow.src_ip, flow.dst_ip, flow.src_port, flow.dst_port, flow.ip_protocol)
    if cid:
        network["community_id"] = cid
    return network


def _score(s: verdict_pb2.ModelScore) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": {"id": s.model.model_id, "version": s.model.version},
        "kind": _lower_name(model_pb2.ModelKind, s.kind, "MODEL_KIND_"),
        "score": _number(s.score),
        "threshold": _number(s.threshold),
        "anomalous": s.anomalous,
    }
    if s.label:
        out["label"] = s.label
    if s.shadow:
        out["shadow"] = True
    if s.class_probabilities:
        out["class_probabilities"] = {k: _number(p) for k, p in sorted(s.class_probabilities.items())}
    if s.top_features:
        out["top_features"] = [{"feature": f.feature, "value": _number(f.value)} for f in s.top_features]
    return out


def ecs_verdict(stored: verdict_pb2.StoredVerdict) -> dict[str, Any]:
    """One stored verdict as an ECS document (docs/siem.md): a network connection event, of kind
    "alert" when the verdict is anomalous; the model's judgement under ``auris``."""
    v = stored.verdict
    flow, c = v.flow, v.counters
    decider = next(
        (s for s in v.scores if s.model.model_id == v.model.model_id and s.model.version == v.model.version),
        None,
    )
    event: dict[str, Any] = {
        "kind": "alert" if v.anomalous else "event",
        "category": ["network", "intrusion_detection"] if v.anomalous else ["network"],
        "type": ["connection"],
        "module": "auris",
        "dataset": "auris.verdict",
        # Unique across collectors: an agent numbers its verdicts once.
        "id": f"{v.agent_id}:{v.sequence}",
        "severity": ANOMALOUS_VERDICT_SEVERITY if v.anomalous else 0,
    }
    start, end = _time(v.first_seen_time), _time(v.last_seen_time)
    if start:
        event["start"] = start
    if end:
        event["end"] = end
    if start and end:
        first, last = v.first_seen_time, v.last_seen_time
        event["duration"] = max(0, (last.seconds - first.seconds) * 1_000_000_000 + last.nanos - first.nanos)
    if created := _time(stored.received_time):
        event["created"] = created
    auris: dict[str, Any] = {
        "verdict": {"id": stored.id, "sequence": v.sequence},
        "anomalous": v.anomalous,
        "label": v.label,
        "score": _number(decider.score) if decider is not None else None,
        "model": {"id": v.model.model_id, "version": v.model.version},
        "explanation": v.explanation,
        "scores": [_score(s) for s in v.scores],
    }
    if v.application_name:
        auris["application"] = v.application_name
    if v.capture_source:
        auris["capture_source"] = v.capture_source
    if v.end_reason:
        auris["flow_end_reason"] = _lower_name(flow_pb2.FlowEndReason, v.end_reason, "FLOW_END_REASON_")
    if stored.analyst_label.label:
        a = stored.analyst_label
        auris["analyst"] = {
            "label": a.label,
            "note": a.note,
            "author": a.author,
            "time": _time(a.labeled_time),
        }
    doc: dict[str, Any] = {
        "@timestamp": _time(v.scored_time) or _time(stored.received_time),
        "ecs": {"version": ECS_VERSION},
        "message": v.explanation or f"{v.label} ({'anomalous' if v.anomalous else 'normal'})",
        "event": event,
        "source": {
            "ip": flow.src_ip,
            "port": flow.src_port,
            "bytes": c.src_to_dst_bytes,
            "packets": c.src_to_dst_packets,
        },
        "destination": {
            "ip": flow.dst_ip,
            "port": flow.dst_port,
            "bytes": c.dst_to_src_bytes,
            "packets": c.dst_to_src_packets,
        },
        "network": _network(flow, c, v.application_name),
        "host": {"name": v.hostname},
        "agent": {"id": v.agent_id, "type": "auris-agent"},
        "rule": {"name": v.model.model_id, "version": v.model.version},
        "auris": auris,
    }
    return doc


def ecs_alert(alert: admin_service_pb2.Alert, action: str = "") -> dict[str, Any]:
    """One alert as an ECS document: the alert's state as it is, or one change of it (``action``:
    opened, acknowledged or resolved). The alert key's addresses fill source/destination fields."""
    state = _lower_name(admin_service_pb2.AlertState, alert.state, "ALERT_STATE_")
    event: dict[str, Any] = {
        "kind": "alert",
        "category": ["intrusion_detection"],
        "type": [_ALERT_ACTIONS.get(action, "info")],
        "module": "auris",
        "dataset": "auris.alert",
        # The same change of the same alert keeps its id, however often it is exported.
        "id": f"alert:{alert.id}:{alert.update_time.ToNanoseconds()}",
        "severity": ALERT_SEVERITY.get(alert.severity, 0),
    }
    if action:
        event["action"] = f"alert-{action}"
    if start := _time(alert.first_time):
        event["start"] = start
    if end := _time(alert.last_time):
        event["end"] = end
    doc: dict[str, Any] = {
        "@timestamp": _time(alert.update_time) or _time(alert.last_time),
        "ecs": {"version": ECS_VERSION},
        "message": alert.summary,
        "event": event,
        "rule": {"name": alert.rule, "description": alert.summary},
        "auris": {
            "alert": {
                "id": alert.id,
                "state": state,
                "key": alert.key,
                "severity": alert.severity,
                "events": alert.events,
                "verdict_ids": list(alert.verdict_ids),
                "acknowledged_by": alert.acknowledged_by,
                "resolved_by": alert.resolved_by,
                "note": alert.note,
            }
        },
    }
    for part in alert.key.split():
        name, _, value = part.partition("=")
        if name in _KEY_FIELDS and value:
            group, field = _KEY_FIELDS[name]
            doc.setdefault(group, {})[field] = int(value) if field == "port" and value.isdigit() else value
    return doc


def ecs_line(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


# -- the collector's sinks ---------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
VERDICT_CHOICES = ("all", "anomalous", "none")


@dataclasses.dataclass(frozen=True)
class SiemSink:
    """One ``[[siem_sinks]]`` table: where ECS records go (packaging/collector.toml)."""

    name: str
    # "file" (JSON lines appended to `path`, rotated by size) or "stdout".
    output: str = "file"
    path: str = ""
    # Rotate when the file would pass this many MiB (0: never), keeping `keep` older files
    # (PATH.1 the newest ... PATH.keep the oldest).
    max_mib: float = 100.0
    keep: int = 5
    # Which verdicts: all, anomalous (only), none.
    verdicts: str = "all"
    # Which alert changes: opened, acknowledged, resolved (empty: none).
    alert_events: tuple[str, ...] = EVENTS

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"siem sink name {self.name!r}: 1 to 64 letters, digits, '.', '_' or '-'")
        if self.output == "file":
            if not self.path:
                raise ValueError(f"siem sink {self.name!r}: a file output needs a path")
        elif self.output != "stdout":
            raise ValueError(f"siem sink {self.name!r}: output must be file or stdout, not {self.output!r}")
        if not (math.isfinite(self.max_mib) and self.max_mib >= 0):
            raise ValueError(f"siem sink {self.name!r}: max_mib must be 0 or more")
        if self.keep < 1:
            raise ValueError(f"siem sink {self.name!r}: keep must be at least 1")
        if self.verdicts not in VERDICT_CHOICES:
            raise ValueError(f"siem sink {self.name!r}: verdicts must be one of {', '.join(VERDICT_CHOICES)}")
        bad = [e for e in self.alert_events if e not in EVENTS]
        if bad:
            raise ValueError(
                f"siem sink {self.name!r}: unknown alert_events {', '.join(bad)} (of {', '.join(EVENTS)})"
            )

    @property
    def outbox(self) -> str:
        """Its name in the alert outbox."""
        return SIEM_OUTBOX_PREFIX + self.name


class _Output:
    """JSON lines to stdout or to a file rotated by size; ``commit()`` makes written lines durable."""

    def __init__(self, sink: SiemSink, stdout: TextIO | None = None) -> None:
        self._sink = sink
        self._max_bytes = int(sink.max_mib * 1024 * 1024)
        self._stdout = stdout
        self._fh: TextIO | None = None
        self._size = 0
        self.rotations = 0
        if sink.output == "file":  # fail now, on an unwritable path, rather than in the thread
            self._open()
            self.close()

    def open(self) -> None:
        if self._sink.output == "file" and self._fh is None:
            self._open()

    def _open(self) -> None:
        path = Path(self._sink.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")
        self._size = self._fh.tell()

    def write(self, lines: Sequence[str]) -> None:
        if self._fh is None:
            out = self._stdout or sys.stdout
            out.write("".join(line + "\n" for line in lines))
            return
        for line in lines:
            data = line + "\n"
            size = len(data.encode())
            if self._max_bytes and self._size and self._size + size > self._max_bytes:
                self._rotate()
            self._fh.write(data)
            self._size += size

    def _rotate(self) -> None:
        assert self._fh is not None
        self.commit()
        self._fh.close()
        path = Path(self._sink.path)
        for i in range(self._sink.keep - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
        os.replace(path, path.with_name(f"{path.name}.1"))
        self.rotations += 1
        self._open()

    def commit(self) -> None:
        if self._fh is None:
            (self._stdout or sys.stdout).flush()
            return
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# Records read per round: a batch is written, made durable, then the cursor moves.
_BATCH = 1000
# How often a sink looks for new verdicts when nothing wakes it.
_POLL_S = 0.5
# After a batch, a sink waits this many times as long as the batch took (busy at most 25 %).
_REST = 3.0


class _Exporter:
    def __init__(self, store: VerdictStore, sink: SiemSink, state_dir: Path, stdout: TextIO | None) -> None:
        self.sink = sink
        self._store = store
        self._cursor_path = state_dir / f"siem-{sink.name}.cursor"
        self._output = _Output(sink, stdout)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"auris-siem-{sink.name}", daemon=True)
        self.cursor = 0
        self.exported = 0

    def _load_cursor(self) -> int:
        (top,) = self._store.reader().execute("SELECT COALESCE(MAX(id), 0) FROM verdicts").fetchone()
        try:
            cursor = int(json.loads(self._cursor_path.read_text(encoding="utf-8"))["verdict_id"])
        except FileNotFoundError:
            cursor = None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("siem sink %s: unreadable cursor %s (%s); starting from now",
                           self.sink.name, self._cursor_path, exc)  # fmt: skip
            cursor = None
        if cursor is not None and cursor > top:
            # Ids only grow (retention keeps the newest row): this is another database than the
            # one the cursor was written for.
            logger.warning("siem sink %s: cursor %d is past the database's newest verdict %d (a new or "
                           "restored database?); starting from now", self.sink.name, cursor, top)  # fmt: skip
            cursor = None
        if cursor is None:
            # A new sink starts with the verdicts stored from now on (`aurisctl verdicts export
            # --format ecs` writes the past).
            cursor = int(top)
            self._save_cursor(cursor)
        return cursor

    def _save_cursor(self, verdict_id: int) -> None:
        self._cursor_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._cursor_path.with_name(self._cursor_path.name + ".tmp")
        tmp.write_text(json.dumps({"verdict_id": verdict_id}) + "\n", encoding="utf-8")
        os.replace(tmp, self._cursor_path)

    def prepare(self) -> None:
        """Open the output and read the cursor (start() does; tests call it to export by hand)."""
        self._output.open()
        self.cursor = self._load_cursor()

    def start(self) -> None:
        self.prepare()
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Finish the batch in hand and stop; the cursor keeps the place of the rest."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(30)
        self._output.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                done = self.export_once()
            except Exception:  # a bug or a full disk must not end the export for good
                logger.exception("siem sink %s failed; retrying in 5 s", self.sink.name)
                self._stop.wait(5)
                continue
            if done:
                # Rest _REST times as long as the batch took: the sink's share of the interpreter
                # (and of a busy machine's cores) stays small while ingest runs flat out; behind,
                # it catches up once ingest is quieter.
                self._stop.wait((time.monotonic() - started) * _REST)
            else:
                self._wake.wait(_POLL_S)
                self._wake.clear()

    def export_once(self) -> int:
        """Write one batch of alert changes and of verdicts after the cursor; return how many."""
        done = self._export_alerts() if self.sink.alert_events else 0
        if self.sink.verdicts != "none":
            done += self._export_verdicts()
        self.exported += done
        return done

    def _export_verdicts(self) -> int:
        where = "id > ?" + (" AND anomalous = 1" if self.sink.verdicts == "anomalous" else "")
        rows = (
            self._store.reader()
            .execute(
                "SELECT id, received_ns, verdict_pb, analyst_label, analyst_note, analyst_author,"
                f" analyst_labeled_ns FROM verdicts WHERE {where} ORDER BY id LIMIT ?",
                (self.cursor, _BATCH),
            )
            .fetchall()
        )
        if not rows:
            return 0
        self._output.write([ecs_line(ecs_verdict(stored_verdict(*row))) for row in rows])
        self._output.commit()
        self.cursor = int(rows[-1][0])
        self._save_cursor(self.cursor)
        return len(rows)

    def _export_alerts(self) -> int:
        rows = (
            self._store.reader()
            .execute(
                "SELECT id, payload FROM alert_outbox WHERE sink = ? ORDER BY id LIMIT ?",
                (self.sink.outbox, _BATCH),
            )
            .fetchall()
        )
        if not rows:
            return 0
        lines = []
        for _, payload in rows:
            notification = json.loads(payload)
            alert = json_format.ParseDict(notification["alert"], admin_service_pb2.Alert())
            lines.append(ecs_line(ecs_alert(alert, notification["event"])))
        self._output.write(lines)
        self._output.commit()
        with self._store.writing() as conn:
            conn.execute(
                "DELETE FROM alert_outbox WHERE sink = ? AND id <= ?", (self.sink.outbox, int(rows[-1][0]))
            )
        return len(rows)


class SiemExport:
    """The collector's SIEM sinks: ``start()``, ``wake()`` after alert changes, ``replace()`` on
    SIGHUP, ``stop()``."""

    def __init__(
        self, store: VerdictStore, sinks: Sequence[SiemSink], state_dir: Path, stdout: TextIO | None = None
    ) -> None:
        self._store = store
        self._state_dir = state_dir
        self._stdout = stdout
        self._exporters = [_Exporter(store, sink, state_dir, stdout) for sink in sinks]
        self._started = False

    @property
    def sinks(self) -> tuple[SiemSink, ...]:
        return tuple(e.sink for e in self._exporters)

    def outboxes(self) -> dict[str, tuple[str, ...]]:
        """Alert outbox names and the events each takes (Alerts queues notifications for them)."""
        return {e.sink.outbox: e.sink.alert_events for e in self._exporters if e.sink.alert_events}

    def start(self) -> None:
        self._started = True
        self.forget_removed()
        for exporter in self._exporters:
            exporter.start()

    def wake(self) -> None:
        for exporter in self._exporters:
            exporter.wake()

    def stop(self) -> None:
        for exporter in self._exporters:
            exporter.stop()

    def exported(self) -> dict[str, int]:
        """Records each sink wrote since the collector started."""
        return {e.sink.name: e.exported for e in self._exporters}

    def behind(self) -> dict[str, int]:
        """Verdicts stored after each sink's cursor (for an anomalous-only sink, an upper bound)."""
        (top,) = self._store.reader().execute("SELECT COALESCE(MAX(id), 0) FROM verdicts").fetchone()
        return {
            e.sink.name: max(0, int(top) - e.cursor) if e.sink.verdicts != "none" else 0
            for e in self._exporters
        }

    def replace(self, sinks: Sequence[SiemSink]) -> None:
        """Swap in a new set of sinks; OSError (an unwritable file) leaves the running set as it is.
        Unchanged sinks keep running."""
        keep = {e.sink: e for e in self._exporters if e.sink in sinks}
        fresh = [
            keep.get(sink) or _Exporter(self._store, sink, self._state_dir, self._stdout) for sink in sinks
        ]
        for exporter in self._exporters:
            if exporter not in fresh:
                exporter.stop()
        self._exporters = fresh
        if self._started:
            for exporter in fresh:
                if exporter not in keep.values():
                    exporter.start()

    def forget_removed(self) -> None:
        """Alert notifications queued for sinks no longer configured would wait forever."""
        names = [e.sink.outbox for e in self._exporters]
        marks = ", ".join("?" for _ in names)
        with self._store.writing() as conn:
            gone = conn.execute(
                f"DELETE FROM alert_outbox WHERE sink LIKE '{SIEM_OUTBOX_PREFIX}%'"
                + (f" AND sink NOT IN ({marks})" if names else ""),
                names,
            ).rowcount
        if gone:
            logger.warning("siem: dropped %d alert notifications of sinks no longer configured", gone)
