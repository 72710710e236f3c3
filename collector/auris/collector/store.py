"""Verdict storage in SQLite: schema and migrations through sqlite-utils, raw executemany on ingest.

One writer connection takes every write; readers use their own connections
(WAL lets them read while the writer commits). Storage is idempotent on
(agent_id, sequence): a resent verdict is counted as a duplicate, never stored twice.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import functools
import ipaddress
import itertools
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from auris.collector import talkers
from auris.v1 import admin_service_pb2, agent_service_pb2, model_pb2, query_service_pb2, verdict_pb2

__all__ = ["SCHEMA_VERSION", "IngestHook", "IngestResult", "QueryPage", "VerdictStore", "verdict_row"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 14

# Column order of the raw insert; verdict_row() produces tuples in this order.
_INSERT_COLUMNS = (
    "agent_id",
    "sequence",
    "hostname",
    "src_ip",
    "dst_ip",
    "src_port",
    "dst_port",
    "ip_protocol",
    "vlan_id",
    "first_seen_ns",
    "last_seen_ns",
    "scored_ns",
    "received_ns",
    "packets",
    "bytes",
    "model_id",
    "model_version",
    "label",
    "anomalous",
    "score",
    "application_name",
    "verdict_pb",
)
_ANOMALY_AGENT_INDEX = "verdicts_anomaly_agent_time"
# Top anomalies of given agents over a scored-time range read those agents' flagged verdicts in the
# range when there are at most this many (one index range, then a sort), else each model's best by
# score (an index walk that stops at the first ``limit`` that match).
_AGENT_ANOMALIES_READ = 20_000
_SELECT_STORED = (
    "SELECT id, received_ns, verdict_pb, analyst_label, analyst_note, analyst_author, analyst_labeled_ns"
    " FROM verdicts"
)
_INSERT_SQL = (
    f"INSERT OR IGNORE INTO verdicts ({', '.join(_INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _INSERT_COLUMNS)})"
)


_BLOB = _INSERT_COLUMNS.index("verdict_pb")
# Rows per INSERT statement on the ingest path (22 parameters each: SQLite allows 32766).
_INSERT_CHUNK = 256


@functools.lru_cache(maxsize=64)
def _insert_rows_sql(n: int) -> str:
    """INSERT of ``n`` rows in one statement: SQLite works through them without the GIL, where
    executemany takes it back for every row (and waits for it while the event loop runs)."""
    row = f"({', '.join('?' for _ in _INSERT_COLUMNS)})"
    return f"INSERT OR IGNORE INTO verdicts ({', '.join(_INSERT_COLUMNS)}) VALUES {', '.join([row] * n)}"


@functools.lru_cache(maxsize=64)
def _upsert_agents_sql(n: int) -> str:
    """Upsert of ``n`` agents rows (an agent twice is updated by its second row)."""
    return (
        "INSERT INTO agents (agent_id, hostname, first_seen_ns, last_seen_ns, acknowledged_sequence,"
        " verdicts_stored) VALUES "
        + ", ".join(["(?, ?, ?, ?, ?, ?)"] * n)
        + " ON CONFLICT(agent_id) DO UPDATE SET"
        " hostname = excluded.hostname, last_seen_ns = excluded.last_seen_ns,"
        " acknowledged_sequence = MAX(acknowledged_sequence, excluded.acknowledged_sequence),"
        " verdicts_stored = verdicts_stored + excluded.verdicts_stored"
    )


def _ns(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


Row = tuple[Any, ...]


def verdict_row(v: verdict_pb2.Verdict, received_ns: int) -> Row:
    """The stored row for one verdict, in _INSERT_COLUMNS order.

    services.validate_batch builds the same rows while it checks a batch (each protobuf field
    read once: on the ingest path every attribute access counts); a test holds the two equal.
    """
    model = v.model
    model_id, version = model.model_id, model.version
    decider = None
    for s in v.scores:
        ref = s.model
        if ref.model_id == model_id and ref.version == version:
            decider = s.score
            break
    flow, c = v.flow, v.counters
    first, last, scored = v.first_seen_time, v.last_seen_time, v.scored_time
    return (
        v.agent_id,
        v.sequence,
        v.hostname,
        flow.src_ip,
        flow.dst_ip,
        flow.src_port,
        flow.dst_port,
        flow.ip_protocol,
        flow.vlan_id,
        first.seconds * 1_000_000_000 + first.nanos,
        last.seconds * 1_000_000_000 + last.nanos,
        scored.seconds * 1_000_000_000 + scored.nanos,
        received_ns,
        c.src_to_dst_packets + c.dst_to_src_packets,
        c.src_to_dst_bytes + c.dst_to_src_bytes,
        model_id,
        version,
        v.label,
        int(v.anomalous),
        decider,
        v.application_name,
        v.SerializeToString(deterministic=True),
    )


class SequenceConflict(Exception):
    """An agent sent a sequence number it already used for a different verdict."""

    def __init__(self, message: str, stored_sequence: int) -> None:
        super().__init__(message)
        # The highest sequence stored for the agent: it can renumber what it has after this.
        self.stored_sequence = stored_sequence


@dataclasses.dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    # Ids of the newly stored verdicts, for live subscribers.
    stored_ids: list[int]
    # Ids of the alerts the batch opened or added to (IngestHook's answer).
    alert_ids: list[int] = dataclasses.field(default_factory=list)
    # The newly stored verdicts, in the order of stored_ids.
    verdicts: list[verdict_pb2.Verdict] = dataclasses.field(default_factory=list)
    # Their stored rows (verdict_row's), in the same order.
    rows: list[Row] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class IngestBatch:
    """One agent's batch, checked, with the rows to store (verdict_row's, in the same order)."""

    agent_id: str
    verdicts: Sequence[verdict_pb2.Verdict]
    rows: Sequence[Row]
    received_ns: int


# Runs inside the ingest transaction with the newly stored (id, verdict) pairs and the arrival
# time; returns the ids of alerts it opened or changed. Its writes commit with the batch.
IngestHook = Callable[[sqlite3.Connection, list[tuple[int, verdict_pb2.Verdict]], int], list[int]]


@dataclasses.dataclass(frozen=True)
class QueryPage:
    verdicts: list[verdict_pb2.StoredVerdict]
    next_page_token: str


def _migration_1(db: sqlite_utils.Database) -> None:
    db.table("verdicts").create(
        {
            "id": int,
            "agent_id": str,
            "sequence": int,
            "hostname": str,
            "src_ip": str,
            "dst_ip": str,
            "src_port": int,
            "dst_port": int,
            "ip_protocol": int,
            "vlan_id": int,
            "first_seen_ns": int,
            "last_seen_ns": int,
            "scored_ns": int,
            "received_ns": int,
            "packets": int,
            "bytes": int,
            "model_id": str,
            "model_version": str,
            "label": str,
            "anomalous": int,
            "score": float,
            "application_name": str,
            "analyst_label": str,
            "analyst_note": str,
            "analyst_author": str,
            "analyst_labeled_ns": int,
            "verdict_pb": bytes,
        },
        pk="id",
        not_null={"agent_id", "sequence", "scored_ns", "received_ns", "verdict_pb"},
    )
    verdicts = db.table("verdicts")
    verdicts.create_index(["agent_id", "sequence"], unique=True)
    verdicts.create_index(["scored_ns"])
    verdicts.create_index(["last_seen_ns"])
    verdicts.create_index(["anomalous", "id"])
    db.table("agents").create(
        {
            "agent_id": str,
            "hostname": str,
            "first_seen_ns": int,
            "last_seen_ns": int,
            "acknowledged_sequence": int,
            "verdicts_stored": int,
        },
        pk="agent_id",
    )


# Migration n brings a database from schema n-1 to n. Append; never edit a released one.
def _migration_2(db: sqlite_utils.Database) -> None:
    """Heartbeats: what each agent last reported about itself."""
    agents = db.table("agents")
    agents.add_column("agent_version", str)
    agents.add_column("models", str)  # "id@version, ..."
    agents.add_column("health_pb", bytes)  # the last AgentHealth, serialised
    agents.add_column("last_heartbeat_ns", int)


_ROLLUP_SELECT = (
    "SELECT (scored_ns / 60000000000) * 60000000000, agent_id, label, model_id, model_version,"
    " COUNT(*), SUM(anomalous), SUM(packets), SUM(bytes) FROM verdicts"
)
_ROLLUP_UPSERT = (
    "INSERT INTO rollups (minute_ns, agent_id, label, model_id, model_version, verdicts, anomalies,"
    " packets, bytes) {select} GROUP BY 1, 2, 3, 4, 5 ON CONFLICT DO UPDATE SET"
    " verdicts = verdicts + excluded.verdicts, anomalies = anomalies + excluded.anomalies,"
    " packets = packets + excluded.packets, bytes = bytes + excluded.bytes"
)


def _migration_3(db: sqlite_utils.Database) -> None:
    """Per-minute rollups per agent, label and model: they outlive the raw rows' retention."""
    db.execute(
        "CREATE TABLE rollups (minute_ns INTEGER NOT NULL, agent_id TEXT NOT NULL, label TEXT NOT NULL,"
        " model_id TEXT NOT NULL, model_version TEXT NOT NULL, verdicts INTEGER NOT NULL,"
        " anomalies INTEGER NOT NULL, packets INTEGER NOT NULL, bytes INTEGER NOT NULL,"
        " PRIMARY KEY (minute_ns, agent_id, label, model_id, model_version))"
    )
    db.execute(_ROLLUP_UPSERT.format(select=_ROLLUP_SELECT + " WHERE true"))


def _migration_4(db: sqlite_utils.Database) -> None:
    """Alerts: one open alert per (rule, key); pending events of counting rules; a notification outbox."""
    db.execute(
        "CREATE TABLE alerts (id INTEGER PRIMARY KEY, rule TEXT NOT NULL, key TEXT NOT NULL,"
        " state INTEGER NOT NULL, severity TEXT NOT NULL, summary TEXT NOT NULL, events INTEGER NOT NULL,"
        " first_ns INTEGER NOT NULL, last_ns INTEGER NOT NULL, touched_ns INTEGER NOT NULL,"
        " updated_ns INTEGER NOT NULL, verdict_ids TEXT NOT NULL, acknowledged_by TEXT NOT NULL DEFAULT '',"
        " resolved_by TEXT NOT NULL DEFAULT '', note TEXT NOT NULL DEFAULT '')"
    )
    # The database itself guarantees one open (not resolved) alert per rule and key.
    db.execute("CREATE UNIQUE INDEX alerts_open ON alerts (rule, key) WHERE state != 3")
    db.execute("CREATE INDEX alerts_state ON alerts (state, id)")
    # Top anomalous flows; partial, so ordinary verdicts cost nothing more at ingest.
    db.execute("CREATE INDEX verdicts_anomaly_score ON verdicts (score) WHERE anomalous = 1")
    db.execute(
        "CREATE TABLE alert_events (rule TEXT NOT NULL, key TEXT NOT NULL, time_ns INTEGER NOT NULL,"
        " verdict_id INTEGER NOT NULL)"
    )
    db.execute("CREATE INDEX alert_events_window ON alert_events (rule, key, time_ns)")
    db.execute(
        "CREATE TABLE alert_outbox (id INTEGER PRIMARY KEY, sink TEXT NOT NULL, payload TEXT NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, due_ns INTEGER NOT NULL)"
    )


def _migration_5(db: sqlite_utils.Database) -> None:
    """The model registry: each version's manifest, ONNX bytes and stage."""
    db.execute(
        "CREATE TABLE models (model_id TEXT NOT NULL, version TEXT NOT NULL, domain INTEGER NOT NULL,"
        " stage INTEGER NOT NULL, sha256 TEXT NOT NULL, manifest_pb BLOB NOT NULL, onnx BLOB NOT NULL,"
        " registered_ns INTEGER NOT NULL, promoted_ns INTEGER, PRIMARY KEY (model_id, version))"
    )
    # One production version per model id.
    db.execute("CREATE UNIQUE INDEX models_production ON models (model_id) WHERE stage = 2")


def _migration_6(db: sqlite_utils.Database) -> None:
    """Identity: API tokens and enrollment tokens (hashed), revoked agents, an append-only audit log."""
    db.execute(
        "CREATE TABLE api_tokens (token_id TEXT PRIMARY KEY, name TEXT NOT NULL, role INTEGER NOT NULL,"
        " secret_sha256 TEXT NOT NULL, created_ns INTEGER NOT NULL, expire_ns INTEGER, revoked_ns INTEGER)"
    )
    db.execute(
        "CREATE TABLE enrollment_tokens (token_id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL,"
        " note TEXT NOT NULL, created_ns INTEGER NOT NULL, expire_ns INTEGER NOT NULL, used_ns INTEGER,"
        " used_by TEXT)"
    )
    agents = db.table("agents")
    agents.add_column("revoked_ns", int)
    agents.add_column("revoked_reason", str)
    agents.add_column("cert_serial", str)
    db.execute(
        "CREATE TABLE audit (id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, actor TEXT NOT NULL,"
        " action TEXT NOT NULL, target TEXT NOT NULL, result TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX audit_time ON audit (time_ns)")
    for event in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER audit_append_only_{event.lower()} BEFORE {event} ON audit"
            " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
        )


_MINUTE_NS = 60_000_000_000
# Verdict ids fall in blocks of this many; the address indexes are ordered by block first.
ID_BLOCK = 4096
# meta key: the newest scored time of any raw verdict that retention deleted (-1: none). Rollup
# minutes after it still count exactly the raw rows, so aggregates over raw rows may read them.
RAW_DELETED_THROUGH = "raw_deleted_through_ns"


def _migration_7(db: sqlite_utils.Database) -> None:
    """Indexes for the query targets at a bearable ingest cost (bench/results/collector.md).

    - (agent_id, id): an agent's newest verdicts without sorting all of them.
    - The flow-time index becomes one on the minute of last_seen_ns: flows are reported minutes
      after their last packet, so an index on the exact value took its inserts all over a window
      of entries; per minute they append (equal keys are kept in id order).
    - Addresses: indexes on (id block, address). A lookup walks the blocks newest first; an insert
      lands in the newest block (a few pages), where an (address, id) index writes pages all over
      itself (inserts 4x slower).
    - Where retention has already deleted raw rows, rollup minutes count more than the raw rows:
      note the newest such minute (raw-row aggregates read rollups only after it).
    """
    db.execute("CREATE INDEX verdicts_agent_id ON verdicts (agent_id, id)")
    db.execute("DROP INDEX IF EXISTS idx_verdicts_last_seen_ns")
    db.execute(f"CREATE INDEX verdicts_last_seen_minute ON verdicts (last_seen_ns / {_MINUTE_NS})")
    for column in ("src_ip", "dst_ip"):
        db.execute(f"CREATE INDEX verdicts_{column}_block ON verdicts (id / {ID_BLOCK}, {column})")
    (minute,) = db.execute(
        "SELECT COALESCE(MAX(minute), -1) FROM (SELECT minute, SUM(n) AS difference FROM ("
        f" SELECT scored_ns / {_MINUTE_NS} * {_MINUTE_NS} AS minute, COUNT(*) AS n FROM verdicts GROUP BY 1"
        " UNION ALL SELECT minute_ns, -SUM(verdicts) FROM rollups GROUP BY 1"
        ") GROUP BY minute HAVING difference != 0)"
    ).fetchone()
    through = minute + _MINUTE_NS - 1 if minute >= 0 else -1
    db.table("meta").insert({"key": RAW_DELETED_THROUGH, "value": str(through)}, pk="key", replace=True)


def _migration_8(db: sqlite_utils.Database) -> None:
    """Model rollout: the models each agent refused, from its last heartbeat."""
    db.table("agents").add_column("refusals_pb", bytes)  # a HeartbeatRequest holding refused_models


def _migration_9(db: sqlite_utils.Database) -> None:
    """Feeds (feeds.py): scored transactions and ticks, and rejected records."""
    db.execute(
        "CREATE TABLE feed_records (id INTEGER PRIMARY KEY, feed_id TEXT NOT NULL,"
        " kind INTEGER NOT NULL, record_id TEXT NOT NULL, entity TEXT NOT NULL, time_ns INTEGER NOT NULL,"
        " received_ns INTEGER NOT NULL, model_id TEXT NOT NULL, model_version TEXT NOT NULL, score REAL,"
        " anomalous INTEGER NOT NULL, explanation TEXT NOT NULL, record_pb BLOB NOT NULL)"
    )
    db.execute("CREATE INDEX feed_records_feed ON feed_records (feed_id, id)")
    db.execute("CREATE INDEX feed_records_entity ON feed_records (feed_id, kind, entity, time_ns)")
    db.execute("CREATE INDEX feed_records_anomalous ON feed_records (feed_id, id) WHERE anomalous = 1")
    db.execute(
        "CREATE TABLE feed_rejects (id INTEGER PRIMARY KEY, feed_id TEXT NOT NULL,"
        " received_ns INTEGER NOT NULL, record_index INTEGER NOT NULL, record_id TEXT NOT NULL,"
        " reason TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX feed_rejects_feed ON feed_rejects (feed_id, id)")


def _migration_10(db: sqlite_utils.Database) -> None:
    """Top talkers: a heavy-hitter summary per minute and address (talkers.py).

    As released it also summarised the verdicts already stored; migration 11 replaces these
    tables and summarises every stored minute again (schema-10 rows are kept only where
    retention had taken raw rows), so it no longer does: an older database gets the summary
    once, from migration 11.
    """
    db.execute(
        "CREATE TABLE talkers (minute_ns INTEGER NOT NULL, ip TEXT NOT NULL, flows INTEGER NOT NULL,"
        " bytes INTEGER NOT NULL, anomalies INTEGER NOT NULL, partial INTEGER NOT NULL,"
        " PRIMARY KEY (minute_ns, ip)) WITHOUT ROWID"
    )
    db.execute(
        "CREATE TABLE talker_minutes (minute_ns INTEGER PRIMARY KEY, rest_flows INTEGER NOT NULL,"
        " rest_bytes INTEGER NOT NULL, rest_anomalies INTEGER NOT NULL)"
    )
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('talkers_closed_before_ns', '0')")


def _migration_11(db: sqlite_utils.Database) -> None:
    """Top talkers per slice (every verdict; each agent, label and deciding model; every
    anomalous verdict) with anomalous bytes, so that filtered queries are answered from the
    summary too (talkers.py). Summarises every stored minute again: 239 s on the benchmark's
    10M verdicts."""
    talkers.upgrade_10(db.conn, time.time_ns())


def _migration_12(db: sqlite_utils.Database) -> None:
    """Anomalous verdicts by deciding model and score: top anomalies rank each model's verdicts
    against its own threshold (an autoencoder's scores and a classifier's probabilities are on
    different scales), reading each model's best from this index."""
    db.execute(
        "CREATE INDEX verdicts_anomaly_model_score ON verdicts (model_id, model_version, score)"
        " WHERE anomalous = 1"
    )


def _migration_13(db: sqlite_utils.Database) -> None:
    """Anomalous verdicts by agent and scored time: top anomalies of one agent over a time range
    read that agent's flagged verdicts in the range (walking a model's best by score until enough
    of them are that agent's and in range took 117 ms at p50 on the benchmark's 10M verdicts)."""
    db.execute(f"CREATE INDEX {_ANOMALY_AGENT_INDEX} ON verdicts (agent_id, scored_ns) WHERE anomalous = 1")


def _migration_14(db: sqlite_utils.Database) -> None:
    """Feeds without the (feed, kind, entity, time) index: it took each batch's rows in as many
    places as the batch had symbols or customers (500 symbols a batch: 13.1 us a row stored,
    3.5 without it, in a microbenchmark). Its readers get their own: each tick links to its
    symbol's previous record (``prev_id``), ``feed_symbols`` holds each symbol's latest time and
    record, ``feed_totals`` each feed's count and latest time. Every tick row is written once
    (~13 s a million rows)."""
    ticks = admin_service_pb2.FEED_KIND_TICKS
    db.execute("ALTER TABLE feed_records ADD COLUMN prev_id INTEGER")
    db.execute(
        "UPDATE feed_records SET prev_id = p.prev FROM (SELECT id, lag(id) OVER"
        " (PARTITION BY feed_id, entity ORDER BY time_ns, id) AS prev FROM feed_records WHERE kind = ?) AS p"
        " WHERE feed_records.id = p.id AND p.prev IS NOT NULL",
        [ticks],
    )
    db.execute(
        "CREATE TABLE feed_symbols (feed_id TEXT NOT NULL, entity TEXT NOT NULL, latest_ns INTEGER NOT NULL,"
        " last_id INTEGER NOT NULL, PRIMARY KEY (feed_id, entity)) WITHOUT ROWID"
    )
    # Each symbol's last record in the links' order.
    db.execute(
        "INSERT INTO feed_symbols SELECT feed_id, entity, time_ns, id FROM"
        " (SELECT feed_id, entity, time_ns, id, row_number() OVER"
        " (PARTITION BY feed_id, entity ORDER BY time_ns DESC, id DESC) AS k"
        " FROM feed_records WHERE kind = ?) WHERE k = 1",
        [ticks],
    )
    db.execute(
        "CREATE TABLE feed_totals (feed_id TEXT NOT NULL, kind INTEGER NOT NULL, records INTEGER NOT NULL,"
        " latest_ns INTEGER NOT NULL, PRIMARY KEY (feed_id, kind)) WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO feed_totals SELECT feed_id, kind, COUNT(*), MAX(time_ns) FROM feed_records"
        " GROUP BY feed_id, kind"
    )
    db.execute("DROP INDEX feed_records_entity")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
    _migration_9,
    _migration_10,
    _migration_11,
    _migration_12,
    _migration_13,
    _migration_14,
]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _rollup_filter(flt: query_service_pb2.VerdictFilter, where: list[str], params: list[Any]) -> None:
    """The parts of ``flt`` the rollups keep (agents, labels, model), as SQL conditions."""
    for column, values in (("agent_id", list(flt.agent_ids)), ("label", list(flt.labels))):
        if values:
            where.append(f"{column} IN ({', '.join('?' for _ in values)})")
            params.extend(values)
    if flt.model_id:
        where.append("model_id = ?")
        params.append(flt.model_id)


class VerdictStore:
    """The collector's SQLite database. Thread-safe: writes are serialised on one connection."""

    def __init__(self, path: Path | str, synchronous: str = "normal", *, migrate: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._db = sqlite_utils.Database(_connect(self.path))
        self._db.enable_wal()
        # NORMAL: a committed batch survives a collector crash; FULL also survives an OS crash or
        # power loss, at one fsync per batch.
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        # The writer's page cache (default 2 MiB): index pages that inserts keep coming back to
        # (the newest block of each address index, the last minutes of flow time) stay in it.
        self._db.execute("PRAGMA cache_size=-65536")
        if migrate:
            self.migrate()
        self._local = threading.local()
        self._checkpointer: tuple[threading.Thread, threading.Event] | None = None
        self._summariser: tuple[threading.Thread, threading.Event] | None = None
        self.on_ingest: IngestHook | None = None

    @property
    def db(self) -> sqlite_utils.Database:
        """The writer's sqlite-utils handle (admin commands, migrations)."""
        return self._db

    def schema_version(self) -> int:
        if "meta" not in self._db.table_names():
            return 0
        rows = list(self._db.query("SELECT value FROM meta WHERE key = 'schema_version'"))
        return int(rows[0]["value"]) if rows else 0

    def migrate(self) -> int:
        """Bring the schema up to SCHEMA_VERSION; return the number of migrations applied."""
        with self._write_lock:
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path}: schema version {current} is newer than this collector ({SCHEMA_VERSION})"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                with self._db.atomic():
                    MIGRATIONS[version - 1](self._db)
                    self._db.table("meta").insert(
                        {"key": "schema_version", "value": str(version)}, pk="key", replace=True
                    )
            return SCHEMA_VERSION - current

    @contextlib.contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """The writer connection, inside one transaction, for store extensions (alerts)."""
        with self._write_lock, self._db.atomic():
            yield self._db.conn

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection."""
        return self._reader()

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
        return conn

    def checkpoint_in_background(self, interval_s: float = 0.05) -> None:
        """Copy the WAL into the database file from a thread of its own, every ``interval_s``.

        Left to the writer, SQLite checkpoints inside every commit that finds the WAL past 1000
        pages: with verdicts streaming in, a fifth of the writer's time (bench/results/collector.md).
        Here the writer's own checkpoint only comes past 4096 pages and then finds little left to
        copy. Durability is the WAL's either way; close() stops the thread.
        """
        if self._checkpointer is not None:
            return
        stop = threading.Event()

        def run() -> None:
            conn = _connect(self.path)
            try:
                while not stop.wait(interval_s):
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error as exc:  # busy or locked: the next round tries again
                        logger.debug("background checkpoint: %s", exc)
            finally:
                conn.close()

        with self._write_lock:
            self._db.execute("PRAGMA wal_autocheckpoint=4096")
        thread = threading.Thread(target=run, name="auris-checkpoint", daemon=True)
        thread.start()
        self._checkpointer = (thread, stop)

    def close_talker_minutes(self, now_ns: int | None = None) -> int:
        """Close the top-talker minutes that are due (talkers.py); how many. Reads on this
        thread's reader, then writes briefly."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        return talkers.close_due(self._reader(), self.writing, now_ns)

    def summarise_in_background(self, interval_s: float = 1.0) -> None:
        """Close top-talker minutes from a thread of their own, every ``interval_s`` (off the
        ingest path: reading a minute's verdicts once takes a few µs each); close() stops it."""
        if self._summariser is not None:
            return
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval_s):
                try:
                    while self.close_talker_minutes() and not stop.is_set():
                        pass  # a backlog: go on at once
                except sqlite3.Error as exc:  # busy or locked: the next round tries again
                    logger.warning("top talkers summary: %s", exc)

        thread = threading.Thread(target=run, name="auris-talkers", daemon=True)
        thread.start()
        self._summariser = (thread, stop)

    def close(self) -> None:
        for worker in (self._checkpointer, self._summariser):
            if worker is not None:
                thread, stop = worker
                stop.set()
                thread.join()
        self._checkpointer = self._summariser = None
        self._db.close()

    # -- ingest ---------------------------------------------------------------------------

    def ingest(self, agent_id: str, verdicts: Sequence[verdict_pb2.Verdict]) -> IngestResult:
        """Store one batch in one transaction; durable (WAL, synchronous=NORMAL) on return."""
        received_ns = time.time_ns()
        # The collector's batches are checked (services.validate_batch: sequences increase);
        # here a sequence repeated within the batch counts as a duplicate of its first copy.
        unique = list({v.sequence: v for v in reversed(verdicts)}.values())[::-1]
        rows = [verdict_row(v, received_ns) for v in unique]
        (outcome,) = self.ingest_group([IngestBatch(agent_id, unique, rows, received_ns)])
        if isinstance(outcome, SequenceConflict):
            raise outcome
        if len(unique) < len(verdicts):
            return dataclasses.replace(outcome, duplicates=outcome.duplicates + len(verdicts) - len(unique))
        return outcome

    def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult | SequenceConflict]:
        """Store batches (of any agents; sequences increasing within each) in one transaction:
        durable together on return.

        A batch that reuses a sequence for a different verdict is refused alone and writes
        nothing: its SequenceConflict takes its place in the answer. Anything else that fails
        (the disk, the ingest hook) rolls the whole group back and is raised. Few statements
        run per group, each doing much: SQLite releases the GIL while it works, and the event
        loop thread (gRPC, validation) needs it meanwhile.
        """
        conn = self._db.conn
        outcomes: list[IngestResult | SequenceConflict | None] = [None] * len(batches)
        # (index, rows to insert, their verdicts, rows resent)
        plans: list[tuple[int, Sequence[Row], Sequence[verdict_pb2.Verdict], int]] = []
        with self._write_lock, self._db.atomic():
            (first_id,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM verdicts").fetchone()
            stored = self._stored_sequences(conn, batches)
            # Agents with a batch resending what an earlier batch of the same group holds.
            repeated = {
                agent for agent, n in collections.Counter(b.agent_id for b in batches).items() if n > 1
            }
            for i, batch in enumerate(batches):
                rows, verdicts, agent_id = batch.rows, batch.verdicts, batch.agent_id
                if agent_id in stored:
                    try:
                        keep = self._not_resent(conn, agent_id, rows, stored[agent_id])
                    except SequenceConflict as exc:
                        outcomes[i] = exc
                        continue
                    if len(keep) < len(rows):
                        rows, verdicts = [rows[k] for k in keep], [verdicts[k] for k in keep]
                plans.append((i, rows, verdicts, len(batch.rows) - len(rows)))
                if agent_id in repeated:
                    stored.setdefault(agent_id, {}).update((row[1], row[_BLOB]) for row in rows)
            new_rows = [row for _, rows, _, _ in plans for row in rows]
            before = conn.total_changes
            for first in range(0, len(new_rows), _INSERT_CHUNK):
                chunk = new_rows[first : first + _INSERT_CHUNK]
                conn.execute(_insert_rows_sql(len(chunk)), list(itertools.chain.from_iterable(chunk)))
            if conn.total_changes - before != len(new_rows):
                raise RuntimeError(
                    f"{len(new_rows) - (conn.total_changes - before)} verdicts of a group were not stored"
                )
            # With one writer, new rows get the ids after the highest, in order.
            next_id = first_id + 1
            agents: list[Any] = []
            for i, rows, verdicts, resent in plans:
                batch = batches[i]
                ids = list(range(next_id, next_id + len(rows)))
                next_id += len(rows)
                alert_ids: list[int] = []
                if rows and self.on_ingest is not None:
                    alert_ids = self.on_ingest(conn, list(zip(ids, verdicts, strict=True)), batch.received_ns)
                outcomes[i] = IngestResult(len(rows), resent, ids, alert_ids, list(verdicts), list(rows))
                if batch.rows:
                    top = max(batch.rows[0][1], batch.rows[-1][1])
                    agents += (
                        batch.agent_id,
                        batch.rows[0][2],
                        batch.received_ns,
                        batch.received_ns,
                        top,
                        len(rows),
                    )
            if agents:
                conn.execute(_upsert_agents_sql(len(agents) // 6), agents)
            if new_rows:
                conn.execute(_ROLLUP_UPSERT.format(select=_ROLLUP_SELECT + " WHERE id > ?"), (first_id,))
                talkers.add_late(conn, first_id, min(row[11] for row in new_rows))
        return [outcome for outcome in outcomes if outcome is not None]

    @staticmethod
    def _stored_sequences(
        conn: sqlite3.Connection, batches: Sequence[IngestBatch]
    ) -> dict[str, dict[int, bytes]]:
        """agent id -> {sequence: stored verdict_pb} for verdicts already stored in the batches'
        sequence ranges: resends, or sequences reused. One statement for the whole group."""
        ranges: list[Any] = []
        for batch in batches:
            if batch.rows:
                sequences = [row[1] for row in batch.rows]
                ranges += (batch.agent_id, min(sequences), max(sequences))
        found: dict[str, dict[int, bytes]] = {}
        for first in range(0, len(ranges), 3 * 300):
            part = ranges[first : first + 3 * 300]
            values = ", ".join(["(?, ?, ?)"] * (len(part) // 3))
            for agent_id, sequence, blob in conn.execute(
                f"WITH r (agent_id, low, high) AS (VALUES {values})"
                " SELECT v.agent_id, v.sequence, v.verdict_pb FROM r JOIN verdicts AS v"
                " ON v.agent_id = r.agent_id AND v.sequence BETWEEN r.low AND r.high",
                part,
            ):
                found.setdefault(agent_id, {})[sequence] = blob
        return found

    @staticmethod
    def _not_resent(
        conn: sqlite3.Connection, agent_id: str, rows: Sequence[Row], stored: dict[int, bytes]
    ) -> list[int]:
        """Indexes of the rows not stored yet. A resend must be the very verdict stored before;
        anything else means a reused sequence (SequenceConflict)."""
        keep = []
        for k, row in enumerate(rows):
            before = stored.get(row[1])
            if before is None:
                keep.append(k)
            # Compare messages, not bytes: map fields may serialise in another order.
            elif before != row[_BLOB] and verdict_pb2.Verdict.FromString(
                before
            ) != verdict_pb2.Verdict.FromString(row[_BLOB]):
                (stored_max,) = conn.execute(
                    "SELECT MAX(sequence) FROM verdicts WHERE agent_id = ?", (agent_id,)
                ).fetchone()
                # Earlier batches of the group are not inserted yet, but will be.
                highest = max(stored_max or 0, *stored)
                raise SequenceConflict(
                    f"agent {agent_id} reused sequence {row[1]} for a different verdict "
                    f"(was its state directory lost or shared?); batch refused, stored up to {highest}",
                    int(highest),
                )
        return keep

    # -- queries --------------------------------------------------------------------------

    def query(self, flt: query_service_pb2.VerdictFilter, page_size: int, page_token: str) -> QueryPage:
        """One page of verdicts matching ``flt``, newest first, with a cursor to the next.

        Every plan returns the same rows (those of the one SQL statement filter_sql makes, by
        id descending); they differ in what they read to find them:

        - an address: its index is by (id block, address), walked block by block from the newest
          until the page is full;
        - several agents: each agent's newest from the (agent_id, id) index, merged;
        - a time range: the time index and a sort of all rows in range, or ids walked down from
          the newest until the page is full (when the range is recent, far less to read): SQLite
          has no statistics to choose, so two index probes estimate both costs.
        """
        conn = self._reader()
        before = decode_page_token(page_token) if page_token else None
        limit = page_size + 1
        if flt.src_ip or flt.dst_ip or flt.ip:
            rows = self._query_by_address(conn, flt, before, limit)
        elif len(flt.agent_ids) > 1:
            rows = []
            for agent_id in sorted(set(flt.agent_ids)):
                one = query_service_pb2.VerdictFilter()
                one.CopyFrom(flt)
                one.agent_ids[:] = [agent_id]
                rows += self._select_newest(conn, *filter_sql(one), before, limit)
            rows = sorted(rows, key=lambda row: -row[0])[:limit]
        else:
            rows = self._select_newest(
                conn, *filter_sql(flt, time_index=self._time_index_pays(conn, flt)), before, limit
            )
        more = len(rows) > page_size
        rows = rows[:page_size]
        verdicts = [stored_verdict(*row) for row in rows]
        token = encode_page_token(rows[-1][0]) if more and rows else ""
        return QueryPage(verdicts, token)

    @staticmethod
    def _select_newest(
        conn: sqlite3.Connection, where: list[str], params: list[Any], before: int | None, limit: int
    ) -> list[Any]:
        if before is not None:
            where = [*where, "id < ?"]
            params = [*params, before]
        sql = (
            _SELECT_STORED + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        )
        return conn.execute(sql, [*params, limit]).fetchall()

    def _query_by_address(
        self,
        conn: sqlite3.Connection,
        flt: query_service_pb2.VerdictFilter,
        before: int | None,
        limit: int,
    ) -> list[Any]:
        """The newest ``limit`` matches, walking the address index's blocks from the newest."""
        where, params = filter_sql(flt)
        # Two subqueries: SQLite finds a MIN or a MAX alone from the ends of the table, not both.
        (low, high) = conn.execute(
            "SELECT (SELECT MIN(id) FROM verdicts), (SELECT MAX(id) FROM verdicts)"
        ).fetchone()
        if high is None:
            return []
        if before is not None:
            high = min(high, before - 1)
            where.append("id < ?")
            params.append(before)
        if flt.src_ip or flt.dst_ip:
            column, address = ("src_ip", flt.src_ip) if flt.src_ip else ("dst_ip", flt.dst_ip)
            terms = [(column, _canonical(address))]
        else:
            terms = [("src_ip", _canonical(flt.ip)), ("dst_ip", _canonical(flt.ip))]
        rows: list[Any] = []
        block, last, chunk = high // ID_BLOCK, low // ID_BLOCK, 1
        while block >= last and len(rows) < limit:
            blocks = list(range(block, max(block - chunk, last - 1), -1))
            marks = ", ".join("?" for _ in blocks)
            lookup = " OR ".join(f"({_BLOCK} IN ({marks}) AND {column} = ?)" for column, _ in terms)
            sql = f"{_SELECT_STORED} WHERE ({lookup}) AND {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
            lookup_params = [x for _, address in terms for x in (*blocks, address)]
            rows += conn.execute(sql, [*lookup_params, *params, limit - len(rows)]).fetchall()
            block -= len(blocks)
            chunk = min(chunk * 4, _BLOCKS_PER_STATEMENT)
        return rows

    @staticmethod
    def _time_index_pays(conn: sqlite3.Connection, flt: query_service_pb2.VerdictFilter) -> bool:
        """Whether a page over a time range costs less through the time index (every row in
        range, sorted) than by walking ids down from the newest (every row newer than the
        range's end, then the range's newest). Ids follow arrival, which follows time closely
        enough to estimate both from the ids at the range's two ends."""
        column = _TIME_COLUMNS[flt.time_field]
        if column == "received_ns":
            return False  # not indexed: arrival order is id order
        start, end = _time_bounds(flt)
        if start is None and end is None:
            return True
        key = _LAST_SEEN_MINUTE if column == "last_seen_ns" else column
        scale = _MINUTE_NS if column == "last_seen_ns" else 1

        def id_at(bound: int | None, op: str, order: str) -> int | None:
            if bound is None:
                return None
            row = conn.execute(
                f"SELECT id FROM verdicts WHERE {key} {op} ? ORDER BY {key} {order} LIMIT 1",
                (bound // scale,),
            ).fetchone()
            return None if row is None else int(row[0])

        first = id_at(start, ">=", "ASC")
        newest = id_at(end - 1 if end is not None else None, "<=", "DESC")
        top = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM verdicts").fetchone()[0])
        in_range = abs((newest if newest is not None else top) - (first if first is not None else 0))
        skipped = top - (newest if newest is not None else top)
        return in_range < skipped

    def fetch(self, ids: Sequence[int]) -> list[verdict_pb2.StoredVerdict]:
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        rows = self._reader().execute(
            f"{_SELECT_STORED} WHERE id IN ({marks}) ORDER BY id",
            list(ids),
        )
        return [stored_verdict(*row) for row in rows]

    # -- agents ---------------------------------------------------------------------------

    def record_heartbeat(self, request: agent_service_pb2.HeartbeatRequest, received_ns: int) -> None:
        models = ", ".join(f"{m.model_id}@{m.version}" for m in request.models)
        refusals = agent_service_pb2.HeartbeatRequest(refused_models=request.refused_models[:64])
        with self._write_lock, self._db.atomic():
            self._db.conn.execute(
                "INSERT INTO agents (agent_id, hostname, first_seen_ns, last_seen_ns, acknowledged_sequence,"
                " verdicts_stored, agent_version, models, health_pb, last_heartbeat_ns, refusals_pb)"
                " VALUES (?, ?, ?, ?, 0, 0, ?, ?, ?, ?, ?) ON CONFLICT(agent_id) DO UPDATE SET"
                " hostname = excluded.hostname, last_seen_ns = excluded.last_seen_ns,"
                " agent_version = excluded.agent_version, models = excluded.models,"
                " health_pb = excluded.health_pb, last_heartbeat_ns = excluded.last_heartbeat_ns,"
                " refusals_pb = excluded.refusals_pb",
                (
                    request.agent_id,
                    request.hostname,
                    received_ns,
                    received_ns,
                    request.agent_version,
                    models,
                    request.health.SerializeToString(),
                    received_ns,
                    refusals.SerializeToString(),
                ),
            )

    def recent_features(self, feature_set: str, version: str, limit: int) -> list[list[float]]:
        """The newest ``limit`` feature vectors of ``feature_set`` at ``version`` that verdicts carry."""
        out: list[list[float]] = []
        sql = "SELECT verdict_pb FROM verdicts ORDER BY id DESC LIMIT ?"
        rows = self._reader().execute(sql, (limit * 4,))
        for (blob,) in rows:
            for vector in verdict_pb2.Verdict.FromString(blob).features:
                if (vector.feature_set, vector.version) == (feature_set, version):
                    out.append(list(vector.values))
                    break
            if len(out) >= limit:
                break
        return out

    def labelled_features(self, feature_set: str, version: str) -> list[tuple[int, str, list[float]]]:
        """(flow first-seen time, analyst label, values) of every labelled verdict that carries a
        vector of ``feature_set`` at ``version``: what retraining learns from."""
        rows = self._reader().execute(
            "SELECT first_seen_ns, analyst_label, verdict_pb FROM verdicts"
            " WHERE analyst_label IS NOT NULL AND analyst_label != '' ORDER BY id"
        )
        out = []
        for first_ns, label, blob in rows:
            for vector in verdict_pb2.Verdict.FromString(blob).features:
                if (vector.feature_set, vector.version) == (feature_set, version):
                    out.append((first_ns or 0, label, list(vector.values)))
                    break
        return out

    def compare_scores(
        self,
        production: model_pb2.ModelRef,
        shadow: model_pb2.ModelRef,
        since_ns: int,
        until_ns: int,
        limit: int,
    ) -> admin_service_pb2.CompareModelsResponse:
        """Production's and a shadow version's scores on the same flows (newest ``limit`` verdicts
        scored in [since, until))."""
        out = admin_service_pb2.CompareModelsResponse(production=production, shadow=shadow)
        prod_key = (production.model_id, production.version)
        shadow_key = (shadow.model_id, shadow.version)
        prod_sources: set[str] = set()
        shadow_sources: set[str] = set()
        rows = self._reader().execute(
            "SELECT src_ip, verdict_pb FROM verdicts WHERE scored_ns >= ? AND scored_ns < ?"
            " ORDER BY id DESC LIMIT ?",
            (since_ns, until_ns, limit),
        )
        for src_ip, blob in rows:
            found = {}
            for score in verdict_pb2.Verdict.FromString(blob).scores:
                key = (score.model.model_id, score.model.version)
                if key in (prod_key, shadow_key):
                    found[key] = score
            if len(found) < 2:
                continue
            p, s = found[prod_key], found[shadow_key]
            out.flows += 1
            out.agree += p.anomalous == s.anomalous
            out.production_anomalous += p.anomalous
            out.shadow_anomalous += s.anomalous
            out.only_production += p.anomalous and not s.anomalous
            out.only_shadow += s.anomalous and not p.anomalous
            out.label_changes += p.label != s.label
            if p.anomalous:
                prod_sources.add(src_ip)
            if s.anomalous:
                shadow_sources.add(src_ip)
        out.production_alert_keys = len(prod_sources)
        out.shadow_alert_keys = len(shadow_sources)
        return out

    def model_rollout(
        self, ref: model_pb2.ModelRef, offline_after_ns: int
    ) -> tuple[int, int, list[tuple[str, str]]]:
        """Among online, unrevoked agents: how many there are, how many run ``ref`` (by their last
        heartbeat), and (agent id, reason) for each that refused it."""
        since = time.time_ns() - offline_after_ns
        wanted = f"{ref.model_id}@{ref.version}"
        online = running = 0
        refusals: list[tuple[str, str]] = []
        rows = self._reader().execute(
            "SELECT agent_id, models, refusals_pb FROM agents"
            " WHERE revoked_ns IS NULL AND last_heartbeat_ns >= ? ORDER BY agent_id",
            (since,),
        )
        for agent_id, models, refusals_pb in rows:
            online += 1
            running += wanted in (models or "").split(", ")
            if refusals_pb:
                for refusal in agent_service_pb2.HeartbeatRequest.FromString(refusals_pb).refused_models:
                    if (refusal.model.model_id, refusal.model.version) == (ref.model_id, ref.version):
                        refusals.append((agent_id, refusal.reason))
        return online, running, refusals

    def record_enrollment(self, agent_id: str, hostname: str, cert_serial: str, now_ns: int) -> None:
        with self._write_lock, self._db.atomic():
            self._db.conn.execute(
                "INSERT INTO agents (agent_id, hostname, first_seen_ns, last_seen_ns, acknowledged_sequence,"
                " verdicts_stored, cert_serial) VALUES (?, ?, ?, ?, 0, 0, ?)"
                " ON CONFLICT(agent_id) DO UPDATE SET hostname = excluded.hostname,"
                " cert_serial = excluded.cert_serial",
                (agent_id, hostname[:255], now_ns, now_ns, cert_serial),
            )

    def record_certificate(self, agent_id: str, cert_serial: str) -> None:
        """The serial of the certificate an agent renewed."""
        with self._write_lock, self._db.atomic():
            self._db.conn.execute(
                "UPDATE agents SET cert_serial = ? WHERE agent_id = ?", (cert_serial, agent_id)
            )

    def agents(self, offline_after_ns: int, agent_id: str = "") -> list[admin_service_pb2.AgentInfo]:
        """Every agent (or one), online when its last heartbeat is younger than ``offline_after_ns``."""
        sql = (
            "SELECT agent_id, hostname, agent_version, models, health_pb, last_heartbeat_ns, first_seen_ns,"
            " verdicts_stored, revoked_ns, refusals_pb FROM agents"
        )
        params: list[Any] = []
        if agent_id:
            sql += " WHERE agent_id = ?"
            params.append(agent_id)
        now = time.time_ns()
        out = []
        for row in self._reader().execute(sql + " ORDER BY agent_id", params):
            agent, hostname, version, models, health, heartbeat_ns, first_ns, stored, revoked_ns, refused = (
                row
            )
            info = admin_service_pb2.AgentInfo(
                agent_id=agent,
                hostname=hostname or "",
                agent_version=version or "",
                verdicts_stored=stored or 0,
            )
            for ref in filter(None, (models or "").split(", ")):
                model_id, _, version_ = ref.rpartition("@")
                info.models.add(model_id=model_id, version=version_)
            if health:
                info.health.ParseFromString(health)
            if refused:
                info.refused_models.extend(
                    agent_service_pb2.HeartbeatRequest.FromString(refused).refused_models
                )
            info.enrolled_time.FromNanoseconds(first_ns)
            if heartbeat_ns:
                info.last_heartbeat_time.FromNanoseconds(heartbeat_ns)
            online = heartbeat_ns is not None and now - heartbeat_ns < offline_after_ns
            info.state = (
                admin_service_pb2.AGENT_STATE_REVOKED
                if revoked_ns is not None
                else admin_service_pb2.AGENT_STATE_ONLINE
                if online
                else admin_service_pb2.AGENT_STATE_OFFLINE
            )
            out.append(info)
        if agent_id and not out:
            raise LookupError(f"no agent {agent_id!r}")
        return out

    def aggregate(
        self,
        flt: query_service_pb2.VerdictFilter,
        group_by: Sequence[query_service_pb2.GroupBy.ValueType],
        bucket_ns: int = 0,
    ) -> list[query_service_pb2.AggregateRow]:
        """Counts per group and time bucket over the raw rows.

        When the filter and groups are ones the per-minute rollups keep (scored time, agent,
        label, model; buckets of whole minutes), the whole minutes of the range are read from
        the rollups and only its partial minutes at either end from the raw rows: the same
        answer (rollup minutes from which retention deleted raw rows are not used), from a few
        thousand rollup rows instead of every verdict in range.
        """
        columns = []
        for g in group_by:
            if g not in _GROUP_COLUMNS:
                raise ValueError(f"cannot group by {g}")
            columns.append(_GROUP_COLUMNS[g])
        if bucket_ns < 0:
            raise ValueError("bucket must not be negative")
        conn = self._reader()
        split = self._rollup_minutes(conn, flt, group_by, bucket_ns)
        if split is None:
            return [self._aggregate_row(values, len(columns) + 1) for values in self._aggregate_raw(
                conn, flt, columns, bucket_ns
            )]  # fmt: skip
        first, end = split
        totals: dict[tuple[Any, ...], list[int]] = {}
        parts = [self._aggregate_rollup_rows(conn, flt, group_by, bucket_ns, first, end)]
        start_ns, end_ns = _time_bounds(flt)
        for low, high in ((start_ns, first), (end, end_ns)):
            if (low is None or high is None or low < high) and (low, high) != (None, None):
                part = query_service_pb2.VerdictFilter()
                part.CopyFrom(flt)
                part.time_range.Clear()
                if low is not None:
                    part.time_range.start_time.FromNanoseconds(low)
                if high is not None:
                    part.time_range.end_time.FromNanoseconds(high)
                parts.append(self._aggregate_raw(conn, part, columns, bucket_ns))
        n_keys = len(columns) + 1
        for rows in parts:
            for values in rows:
                key, sums = tuple(values[:n_keys]), values[n_keys:]
                total = totals.setdefault(key, [0, 0, 0, 0])
                for i, value in enumerate(sums):
                    total[i] += value or 0
        ordered = sorted(totals.items(), key=lambda item: tuple("" if k is None else k for k in item[0]))
        return [self._aggregate_row((*key, *sums), n_keys) for key, sums in ordered[:_MAX_AGGREGATE_ROWS]]

    @staticmethod
    def _aggregate_raw(
        conn: sqlite3.Connection, flt: query_service_pb2.VerdictFilter, columns: Sequence[str], bucket_ns: int
    ) -> list[Any]:
        where, params = filter_sql(flt)
        time_column = _TIME_COLUMNS[flt.time_field]
        bucket = f"({time_column} / {int(bucket_ns)}) * {int(bucket_ns)}" if bucket_ns else "NULL"
        keys = [bucket, *columns]
        sql = (
            f"SELECT {', '.join(keys)}, COUNT(*), SUM(anomalous), SUM(packets), SUM(bytes) FROM verdicts"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)} LIMIT {_MAX_AGGREGATE_ROWS}"
        )
        return conn.execute(sql, params).fetchall()

    @staticmethod
    def _rollup_minutes(
        conn: sqlite3.Connection,
        flt: query_service_pb2.VerdictFilter,
        group_by: Sequence[query_service_pb2.GroupBy.ValueType],
        bucket_ns: int,
    ) -> tuple[int, int] | None:
        """[first, end) of the whole rollup minutes that can stand for the raw rows of ``flt``'s
        range, or None when the rollups cannot answer (a filter or group they do not keep)."""
        if (
            bucket_ns % _MINUTE_NS
            or flt.time_field not in _SCORED_TIME
            or not set(group_by) <= _ROLLUP_GROUPS
            or flt.hostnames
            or flt.ip
            or flt.src_ip
            or flt.dst_ip
            or any(flt.HasField(f) for f in ("src_port", "dst_port", "ip_protocol", "anomalous"))
            or flt.HasField("min_score")
            or flt.HasField("max_score")
        ):
            return None
        start, end = _time_bounds(flt)
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (RAW_DELETED_THROUGH,)).fetchone()
        deleted_through = int(row[0]) if row else 2**62  # unknown: never
        first = -(-(start if start is not None else 0) // _MINUTE_NS) * _MINUTE_NS
        first = max(first, (deleted_through // _MINUTE_NS + 1) * _MINUTE_NS)
        last = (end if end is not None else 2**62) // _MINUTE_NS * _MINUTE_NS
        return (first, last) if first < last else None

    @staticmethod
    def _aggregate_rollup_rows(
        conn: sqlite3.Connection,
        flt: query_service_pb2.VerdictFilter,
        group_by: Sequence[query_service_pb2.GroupBy.ValueType],
        bucket_ns: int,
        first: int,
        end: int,
    ) -> list[Any]:
        keys = [f"(minute_ns / {bucket_ns}) * {bucket_ns}" if bucket_ns else "NULL"]
        keys += [_GROUP_COLUMNS[g] for g in group_by]
        where = ["minute_ns >= ?", "minute_ns < ?"]
        params: list[Any] = [first, end]
        _rollup_filter(flt, where, params)
        sql = (
            f"SELECT {', '.join(keys)}, SUM(verdicts), SUM(anomalies), SUM(packets), SUM(bytes) FROM rollups"
            f" WHERE {' AND '.join(where)} GROUP BY {', '.join(keys)}"
        )
        return conn.execute(sql, params).fetchall()

    @staticmethod
    def _aggregate_row(values: Sequence[Any], n_keys: int) -> query_service_pb2.AggregateRow:
        start, *groups = values[:n_keys]
        count, anomalies, packets, total_bytes = values[n_keys:]
        row = query_service_pb2.AggregateRow(
            group_values=[str(v) for v in groups],
            verdicts=count or 0,
            anomalies=anomalies or 0,
            packets=packets or 0,
            bytes=total_bytes or 0,
        )
        if start is not None:
            row.bucket_start_time.FromNanoseconds(start)
        return row

    def top_talkers(
        self,
        flt: query_service_pb2.VerdictFilter,
        metric: query_service_pb2.TalkerMetric.ValueType,
        limit: int,
        *,
        exact: bool = False,
    ) -> query_service_pb2.ListTopTalkersResponse:
        """Addresses ranked by bytes, flows or anomalies, counting both ends of each flow.

        A range of scored time, with agents, labels or a model (one of the three) and the
        anomaly flag, is answered from the heavy-hitter summary (talkers.py): exact where the
        range's minutes kept every address, otherwise with each count's error bound and
        ``approximate`` set. Other filters (addresses, ports, scores, hostnames, flow or arrival
        time, two of agents/labels/model), ranges within a minute, and ``exact`` read the raw
        rows.
        """
        order = _TALKER_ORDER.get(metric)
        if order is None:
            raise ValueError(f"unknown talker metric {metric}")
        conn = self._reader()
        selection = None if exact else _talker_selection(flt)
        if selection is not None:
            start, end = _time_bounds(flt)
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (RAW_DELETED_THROUGH,)).fetchone()
            deleted_through = int(row[0]) if row else 2**62  # unknown: treat every raw row as gone
            answer = talkers.top(
                conn, start, end, _TALKER_METRICS.index(order), limit, deleted_through, selection
            )
            if answer is not None:
                return answer
        where, params = filter_sql(flt)
        clause = " WHERE " + " AND ".join(where) if where else ""
        # Each row read once, counted for both its ends.
        sql = (
            "SELECT CASE side WHEN 0 THEN src_ip ELSE dst_ip END AS ip, COUNT(*) AS flows,"
            " SUM(bytes) AS bytes, SUM(anomalous) AS anomalies"
            f" FROM verdicts CROSS JOIN (SELECT 0 AS side UNION ALL SELECT 1){clause}"
            f" GROUP BY ip ORDER BY {order} DESC, ip LIMIT ?"
        )
        return query_service_pb2.ListTopTalkersResponse(
            talkers=[
                query_service_pb2.Talker(ip=ip, flows=flows, bytes=total or 0, anomalies=anomalies or 0)
                for ip, flows, total, anomalies in conn.execute(sql, [*params, limit])
            ]
        )

    def aggregate_rollups(
        self,
        flt: query_service_pb2.VerdictFilter,
        group_by: Sequence[query_service_pb2.GroupBy.ValueType],
        bucket_ns: int = 0,
    ) -> list[query_service_pb2.AggregateRow]:
        """Like aggregate(), from the per-minute rollups (minutes, scored time, agent/label/model only)."""
        minute = 60_000_000_000
        unsupported = [
            name
            for name, present in (
                ("hostnames", bool(flt.hostnames)),
                ("ip", bool(flt.ip or flt.src_ip or flt.dst_ip)),
                ("ports", flt.HasField("src_port") or flt.HasField("dst_port")),
                ("ip_protocol", flt.HasField("ip_protocol")),
                ("anomalous", flt.HasField("anomalous")),
                ("score", flt.HasField("min_score") or flt.HasField("max_score")),
                ("time_field", flt.time_field not in _SCORED_TIME),
            )
            if present
        ]
        if unsupported:
            raise ValueError(f"rollups keep no {', '.join(unsupported)}: query the raw verdicts instead")
        columns = {
            query_service_pb2.GROUP_BY_AGENT: "agent_id",
            query_service_pb2.GROUP_BY_LABEL: "label",
            query_service_pb2.GROUP_BY_MODEL: "model_id || '@' || model_version",
        }
        keys = []
        for g in group_by:
            if g not in columns:
                raise ValueError(f"rollups cannot group by {g}: only agent, label and model")
            keys.append(columns[g])
        if bucket_ns < 0 or bucket_ns % minute:
            raise ValueError("a rollup bucket must be a whole number of minutes")
        where: list[str] = []
        params: list[Any] = []
        for present, ts, op in (
            (flt.time_range.HasField("start_time"), flt.time_range.start_time, ">="),
            (flt.time_range.HasField("end_time"), flt.time_range.end_time, "<"),
        ):
            if present:
                where.append(f"minute_ns {op} ?")
                params.append(_ns(ts) // minute * minute)
        _rollup_filter(flt, where, params)
        bucket = f"(minute_ns / {bucket_ns}) * {bucket_ns}" if bucket_ns else "NULL"
        keys = [bucket, *keys]
        sql = (
            f"SELECT {', '.join(keys)}, SUM(verdicts), SUM(anomalies), SUM(packets), SUM(bytes) FROM rollups"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)} LIMIT {_MAX_AGGREGATE_ROWS}"
        )
        return [self._aggregate_row(values, len(keys)) for values in self._reader().execute(sql, params)]

    def top_anomalies(
        self, flt: query_service_pb2.VerdictFilter, limit: int
    ) -> list[verdict_pb2.StoredVerdict]:
        """The verdicts flagged anomalous that are furthest above their deciding model's threshold
        (score / threshold, highest first; ties: newest first).

        Models score on their own scales (a classifier's probability, an autoencoder's error
        ratio), so each deciding model's best are read apart (an index per model and score) and
        ranked together by how far over its threshold each verdict is.
        """
        if flt.HasField("anomalous") and not flt.anomalous:
            raise ValueError("top anomalies are anomalous verdicts: drop anomalous=false from the filter")
        where, params = filter_sql(flt)
        where += ["anomalous = 1", "score IS NOT NULL", "model_id = ?", "model_version = ?"]
        conn = self._reader()
        select = _SELECT_STORED.replace("SELECT ", "SELECT score, ", 1)
        if self._few_agent_anomalies(conn, flt):
            select += f" INDEXED BY {_ANOMALY_AGENT_INDEX}"
        sql = f"{select} WHERE {' AND '.join(where)} ORDER BY score DESC, id DESC LIMIT ?"
        ranked: list[tuple[float, int, tuple[Any, ...]]] = []
        for model_id, version in self._anomalous_models(conn):
            threshold = self._decider_threshold(conn, model_id, version)
            for score, *row in conn.execute(sql, [*params, model_id, version, limit]):
                ranked.append((score / threshold, row[0], tuple(row)))
        ranked.sort(key=lambda r: (r[0], r[1]), reverse=True)
        return [stored_verdict(*row) for _, _, row in ranked[:limit]]

    @staticmethod
    def _few_agent_anomalies(conn: sqlite3.Connection, flt: query_service_pb2.VerdictFilter) -> bool:
        """Whether ``flt`` names agents and a scored-time range that hold few flagged verdicts
        (counted on the agent / time index of anomalous verdicts, stopping past the bound)."""
        start, end = _time_bounds(flt)
        if not flt.agent_ids or flt.time_field not in _SCORED_TIME or (start is None and end is None):
            return False
        agents = list(flt.agent_ids)
        (count,) = conn.execute(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM verdicts INDEXED BY {_ANOMALY_AGENT_INDEX}"
            f" WHERE anomalous = 1 AND agent_id IN ({', '.join('?' for _ in agents)})"
            " AND scored_ns >= ? AND scored_ns < ? LIMIT ?)",
            [*agents, start if start is not None else 0, end if end is not None else 2**63 - 1,
             _AGENT_ANOMALIES_READ + 1],
        ).fetchone()  # fmt: skip
        return bool(count <= _AGENT_ANOMALIES_READ)

    @staticmethod
    def _anomalous_models(conn: sqlite3.Connection) -> list[tuple[str, str]]:
        """Every (model, version) that decided an anomalous verdict, two index seeks each (a
        row-value comparison walked every anomalous verdict of the model before: 10-20 ms)."""
        select = (
            "SELECT model_id, model_version FROM verdicts INDEXED BY verdicts_anomaly_model_score"
            " WHERE anomalous = 1"
        )
        later_version = f"{select} AND model_id = ? AND model_version > ? ORDER BY model_version LIMIT 1"
        next_model = f"{select} AND model_id > ? ORDER BY model_id, model_version LIMIT 1"
        found: list[tuple[str, str]] = []
        row = conn.execute(f"{select} ORDER BY model_id, model_version LIMIT 1").fetchone()
        while row is not None:
            found.append((row[0], row[1]))
            row = conn.execute(later_version, row).fetchone() or conn.execute(next_model, row[:1]).fetchone()
        return found

    @staticmethod
    def _decider_threshold(conn: sqlite3.Connection, model_id: str, version: str) -> float:
        """The threshold a model's anomalous verdicts carry (1.0 when it has none above 0)."""
        row = conn.execute(
            "SELECT verdict_pb FROM verdicts INDEXED BY verdicts_anomaly_model_score"
            " WHERE anomalous = 1 AND model_id = ? AND model_version = ? LIMIT 1",
            (model_id, version),
        ).fetchone()
        if row is not None:
            verdict = verdict_pb2.Verdict.FromString(row[0])
            for s in verdict.scores:
                if (s.model.model_id, s.model.version) == (model_id, version) and s.threshold > 0:
                    return float(s.threshold)
        return 1.0

    def size_bytes(self) -> int:
        """Bytes the database's pages hold (free pages, reused before the file grows, excluded)."""
        conn = self._reader()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (free,) = conn.execute("PRAGMA freelist_count").fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        return int((pages - free) * page_size)

    def retain_size(self, max_bytes: int, talker_keep_ns: int = 0, now_ns: int | None = None) -> int:
        """Delete the oldest raw verdicts so that the database's used pages come down to about
        ``max_bytes``; rollups, alerts and the newest verdict stay. Returns the rows deleted.

        Rows to delete are estimated from the average bytes per verdict, once per call: index
        pages emptied only in part are not freed at once but refilled by new verdicts, so
        chasing the exact size in a loop would delete far more than needed. The top-talker
        summary is pruned as retain() does; when the raw rows alone cannot make up the excess,
        it goes with them whatever ``talker_keep_ns`` says (the cap is a cap).
        """
        used = self.size_bytes()
        if used <= max_bytes:
            return 0
        with self._write_lock, self._db.atomic():
            conn = self._db.conn
            (oldest, newest, rows) = conn.execute(
                "SELECT MIN(id), MAX(id), COUNT(*) FROM verdicts"
            ).fetchone()
            if not rows:
                return 0
            excess_rows = math.ceil((used - max_bytes) / (used / rows))
            deleted = 0
            if oldest != newest:
                (cut,) = conn.execute(
                    "SELECT id FROM verdicts ORDER BY id LIMIT 1 OFFSET ?", (min(excess_rows, rows - 1),)
                ).fetchone()
                deleted = self._delete_raw(conn, "id < ?", [cut])
            self._prune_talkers(conn, 0 if excess_rows >= rows else talker_keep_ns, now_ns)
            return deleted

    def vacuum(self) -> tuple[int, int]:
        """Rebuild the file to return free pages to the file system; (bytes before, after)."""
        before = self.path.stat().st_size
        with self._write_lock:
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return before, self.path.stat().st_size

    def retain(
        self, max_age_ns: int = 0, max_rows: int = 0, now_ns: int | None = None, talker_keep_ns: int = 0
    ) -> int:
        """Delete raw verdicts older than ``max_age_ns`` (by arrival) or beyond the newest
        ``max_rows``; rollups stay. The newest row always stays, so ids keep increasing.

        The top-talker summary of a minute goes once no raw verdict of that minute or an
        earlier one is left, or, with ``talker_keep_ns``, once the minute is also older than
        that (by scored time): it outlives the raw rows by that much at most.
        """
        now_ns = time.time_ns() if now_ns is None else now_ns
        deleted = 0
        with self._write_lock, self._db.atomic():
            conn = self._db.conn
            (newest,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM verdicts").fetchone()
            if max_age_ns > 0:
                deleted += self._delete_raw(conn, "received_ns < ? AND id < ?", [now_ns - max_age_ns, newest])
            if max_rows > 0:
                deleted += self._delete_raw(conn, "id <= ? AND id < ?", [newest - max_rows, newest])
            self._prune_talkers(conn, talker_keep_ns, now_ns)
        return deleted

    @staticmethod
    def _prune_talkers(conn: sqlite3.Connection, keep_ns: int, now_ns: int | None) -> None:
        (oldest,) = conn.execute("SELECT MIN(scored_ns) FROM verdicts").fetchone()
        if oldest is None:
            return
        if keep_ns > 0:
            oldest = min(oldest, (time.time_ns() if now_ns is None else now_ns) - keep_ns)
        talkers.prune(conn, oldest)

    @staticmethod
    def _delete_raw(conn: sqlite3.Connection, where: str, params: list[Any]) -> int:
        """Delete raw verdicts (inside the caller's transaction), first noting in meta the newest
        scored time deleted: rollup minutes up to it no longer match the raw rows."""
        (newest,) = conn.execute(f"SELECT MAX(scored_ns) FROM verdicts WHERE {where}", params).fetchone()
        if newest is None:
            return 0
        conn.execute(
            "UPDATE meta SET value = MAX(CAST(value AS INTEGER), ?) WHERE key = ?",
            (newest, RAW_DELETED_THROUGH),
        )
        return int(conn.execute(f"DELETE FROM verdicts WHERE {where}", params).rowcount)

    def label(self, ids: Sequence[int], label: verdict_pb2.AnalystLabel) -> int:
        """Attach an analyst's label to stored verdicts (kept for retraining); return how many."""
        if not ids:
            raise ValueError("no verdict ids to label")
        if len(ids) > 10_000:
            raise ValueError("at most 10000 verdicts per request")
        if not label.label or len(label.label) > 64:
            raise ValueError("label must be 1 to 64 characters (benign, unsure, or an attack class)")
        marks = ", ".join("?" for _ in ids)
        with self._write_lock, self._db.atomic():
            cursor = self._db.conn.execute(
                "UPDATE verdicts SET analyst_label = ?, analyst_note = ?, analyst_author = ?,"
                f" analyst_labeled_ns = ? WHERE id IN ({marks})",
                [label.label, label.note[:1000], label.author[:128] or "unknown", time.time_ns(), *ids],
            )
            return cursor.rowcount

    def count(self) -> int:
        (n,) = self._reader().execute("SELECT COUNT(*) FROM verdicts").fetchone()
        return int(n)


def stored_verdict(
    row_id: int,
    received_ns: int,
    blob: bytes,
    analyst_label: str | None,
    analyst_note: str | None,
    analyst_author: str | None,
    analyst_labeled_ns: int | None,
) -> verdict_pb2.StoredVerdict:
    stored = verdict_pb2.StoredVerdict(id=row_id)
    stored.verdict.ParseFromString(blob)
    stored.received_time.FromNanoseconds(received_ns)
    if analyst_label:
        stored.analyst_label.label = analyst_label
        stored.analyst_label.note = analyst_note or ""
        stored.analyst_label.author = analyst_author or ""
        stored.analyst_label.labeled_time.FromNanoseconds(analyst_labeled_ns or 0)
    return stored


_TIME_COLUMNS = {
    query_service_pb2.TIME_FIELD_UNSPECIFIED: "scored_ns",
    query_service_pb2.TIME_FIELD_SCORED: "scored_ns",
    query_service_pb2.TIME_FIELD_FLOW: "last_seen_ns",
    query_service_pb2.TIME_FIELD_RECEIVED: "received_ns",
}


_GROUP_COLUMNS = {
    query_service_pb2.GROUP_BY_AGENT: "agent_id",
    query_service_pb2.GROUP_BY_LABEL: "label",
    query_service_pb2.GROUP_BY_MODEL: "model_id || '@' || model_version",
    query_service_pb2.GROUP_BY_ANOMALOUS: "anomalous",
}
_TALKER_ORDER = {
    query_service_pb2.TALKER_METRIC_UNSPECIFIED: "bytes",
    query_service_pb2.TALKER_METRIC_BYTES: "bytes",
    query_service_pb2.TALKER_METRIC_FLOWS: "flows",
    query_service_pb2.TALKER_METRIC_ANOMALIES: "anomalies",
}
_TALKER_METRICS = ("flows", "bytes", "anomalies")  # talkers.top's metric numbers
_MAX_AGGREGATE_ROWS = 10_000
_LAST_SEEN_MINUTE = f"last_seen_ns / {_MINUTE_NS}"
_BLOCK = f"id / {ID_BLOCK}"
# Blocks looked up per statement at most, when an address filter walks its index (a rare
# address: every block of the table; 10M verdicts are 2,442 blocks).
_BLOCKS_PER_STATEMENT = 64
_SCORED_TIME = (query_service_pb2.TIME_FIELD_UNSPECIFIED, query_service_pb2.TIME_FIELD_SCORED)
_ROLLUP_GROUPS = {
    query_service_pb2.GROUP_BY_AGENT,
    query_service_pb2.GROUP_BY_LABEL,
    query_service_pb2.GROUP_BY_MODEL,
}


def filter_sql(
    flt: query_service_pb2.VerdictFilter, *, time_index: bool = True
) -> tuple[list[str], list[Any]]:
    """WHERE clauses and parameters for a VerdictFilter (all clauses ANDed). ``time_index``
    False keeps SQLite off the time indexes (to walk ids instead)."""
    where: list[str] = []
    params: list[Any] = []
    column = _TIME_COLUMNS.get(flt.time_field)
    if column is None:
        raise ValueError(f"unknown time_field {flt.time_field}")
    start, end = _time_bounds(flt)
    for bound, op in ((start, ">="), (end, "<")):
        if bound is not None:
            where.append(f"{'' if time_index else '+'}{column} {op} ?")
            params.append(bound)
    if time_index and column == "last_seen_ns" and (start is not None or end is not None):
        # The flow-time index is on the minute (migration 7).
        where.append(f"{_LAST_SEEN_MINUTE} BETWEEN ? AND ?")
        params += [
            (start if start is not None else 0) // _MINUTE_NS,
            (end - 1 if end is not None else 2**63 - 1) // _MINUTE_NS,
        ]

    def any_of(col: str, values: Sequence[Any]) -> None:
        if values:
            where.append(f"{col} IN ({', '.join('?' for _ in values)})")
            params.extend(values)

    any_of("agent_id", list(flt.agent_ids))
    any_of("hostname", list(flt.hostnames))
    any_of("label", list(flt.labels))
    if flt.ip:
        where.append("(src_ip = ? OR dst_ip = ?)")
        params += [_canonical(flt.ip)] * 2
    for column, wanted in (
        ("src_ip", _canonical(flt.src_ip)),
        ("dst_ip", _canonical(flt.dst_ip)),
        ("model_id", flt.model_id),
    ):
        if wanted:
            where.append(f"{column} = ?")
            params.append(wanted)
    for column, present, number in (
        ("src_port", flt.HasField("src_port"), flt.src_port),
        ("dst_port", flt.HasField("dst_port"), flt.dst_port),
        ("ip_protocol", flt.HasField("ip_protocol"), flt.ip_protocol),
    ):
        if present:
            where.append(f"{column} = ?")
            params.append(number)
    if flt.HasField("anomalous"):
        where.append("anomalous = ?")
        params.append(int(flt.anomalous))
    if flt.HasField("min_score"):
        where.append("score >= ?")
        params.append(flt.min_score)
    if flt.HasField("max_score"):
        where.append("score <= ?")
        params.append(flt.max_score)
    return where, params


def _talker_selection(flt: query_service_pb2.VerdictFilter) -> talkers.Selection | None:
    """The summary's view of ``flt`` (talkers.Selection), or None when the summary cannot
    answer it: it keeps scored time, and slices per agent, label and model (one of them at a
    time), each with its anomalous counts."""
    rest = query_service_pb2.VerdictFilter()
    rest.CopyFrom(flt)
    if rest.time_field not in _SCORED_TIME:
        return None
    for field in ("time_range", "time_field", "agent_ids", "labels", "model_id", "anomalous"):
        rest.ClearField(field)
    if rest.ByteSize():
        return None
    dimensions = [
        (prefix, values)
        for prefix, values in (
            ("a:", sorted(set(flt.agent_ids))),
            ("l:", sorted(set(flt.labels))),
            ("m:", [flt.model_id] if flt.model_id else []),
        )
        if values
    ]
    if len(dimensions) > 1:
        return None
    anomalous = flt.anomalous if flt.HasField("anomalous") else None
    # Anomalous verdicts alone: their own slice (more addresses kept, fewer rows to read).
    everything = (talkers.ANOMALOUS,) if anomalous else ("",)
    slices = tuple(prefix + value for prefix, values in dimensions for value in values) or everything
    # The raw rows it reads are those of a minute or two at the range's ends: the unary + keeps
    # SQLite on the scored-time index, off the agent and anomaly indexes (all of an agent's rows).
    where: list[str] = []
    params: list[Any] = []
    for column, values in (("agent_id", flt.agent_ids), ("label", flt.labels)):
        if values:
            where.append(f"+{column} IN ({', '.join('?' for _ in values)})")
            params += list(values)
    if flt.model_id:
        where.append("+model_id = ?")
        params.append(flt.model_id)
    if anomalous is not None:
        where.append("+anomalous = ?")
        params.append(int(anomalous))
    return talkers.Selection(slices, anomalous, tuple(where), tuple(params))


def _time_bounds(flt: query_service_pb2.VerdictFilter) -> tuple[int | None, int | None]:
    """The filter's time range in ns: [start, end), None where open."""
    bounds: list[int | None] = []
    for present, ts in (
        (flt.time_range.HasField("start_time"), flt.time_range.start_time),
        (flt.time_range.HasField("end_time"), flt.time_range.end_time),
    ):
        if present and not 0 <= ts.seconds <= 253_402_300_799:
            raise ValueError("time_range bounds must lie between 1970 and 9999")
        bounds.append(_ns(ts) if present else None)
    return bounds[0], bounds[1]


def _canonical(ip: str) -> str:
    """Addresses are stored canonical (ipaddress's compressed form): match them the same way."""
    if not ip:
        return ""
    try:
        return ipaddress.ip_address(ip).compressed
    except ValueError:
        raise ValueError(f"{ip[:64]!r} is not an IP address") from None


def encode_page_token(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def decode_page_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        prefix, value = text.split(":", 1)
        last_id = int(value)
        if prefix != "v1" or not 0 < last_id < 2**63:
            raise ValueError(prefix)
        return last_id
    except (ValueError, UnicodeDecodeError):
        raise ValueError("page_token is not a token this collector issued") from None
