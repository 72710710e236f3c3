"""The SQLite store: durability settings, idempotent ingest, cursor pagination, filters, migrations."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from auris.collector.store import SCHEMA_VERSION, VerdictStore
from auris.v1 import query_service_pb2
from tests.conftest import make_verdict


@pytest.fixture
def store(tmp_path: Path) -> VerdictStore:
    return VerdictStore(tmp_path / "auris.db")


def test_wal_and_schema_version(store: VerdictStore) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert store.schema_version() == SCHEMA_VERSION
    assert {"verdicts", "agents", "meta"} <= set(store.db.table_names())


def test_ingest_is_idempotent_on_agent_and_sequence(store: VerdictStore) -> None:
    batch = [make_verdict(i) for i in range(1, 11)]
    first = store.ingest("agent-1", batch)
    assert (first.accepted, first.duplicates) == (10, 0)
    assert first.stored_ids == list(range(1, 11))
    again = store.ingest("agent-1", [*batch[5:], make_verdict(11)])
    assert (again.accepted, again.duplicates) == (1, 5)
    assert again.stored_ids == [11]
    assert store.count() == 11
    # The same sequence from another agent is a different verdict.
    other = store.ingest("agent-2", [make_verdict(1, agent_id="agent-2")])
    assert other.accepted == 1
    row = store.db.execute(
        "SELECT acknowledged_sequence, verdicts_stored FROM agents WHERE agent_id='agent-1'"
    )
    assert row.fetchone() == (11, 11)


def test_cursor_pagination_is_stable_under_inserts(store: VerdictStore) -> None:
    store.ingest("agent-1", [make_verdict(i) for i in range(1, 26)])
    flt = query_service_pb2.VerdictFilter()
    page = store.query(flt, 10, "")
    assert len(page.verdicts) == 10
    assert page.next_page_token
    ids = [v.id for v in page.verdicts]
    assert ids == sorted(ids, reverse=True)
    # New arrivals between pages do not shift or repeat what the cursor walks.
    store.ingest("agent-1", [make_verdict(i) for i in range(26, 31)])
    seen = list(ids)
    token = page.next_page_token
    while token:
        page = store.query(flt, 10, token)
        seen += [v.id for v in page.verdicts]
        token = page.next_page_token
    assert len(seen) == len(set(seen)) == 25
    assert store.query(flt, 100, "").verdicts[0].verdict.sequence == 30


def test_bad_page_token_is_a_value_error(store: VerdictStore) -> None:
    with pytest.raises(ValueError, match="page_token"):
        store.query(query_service_pb2.VerdictFilter(), 10, "not-a-token")


def test_filters(store: VerdictStore) -> None:
    store.ingest(
        "agent-1",
        [
            make_verdict(1, dst_port=22, label="attack", anomalous=True, score=0.9),
            make_verdict(2, dst_port=443, score=0.2),
            make_verdict(3, src_ip="192.0.2.7", dst_port=53, score=0.6, anomalous=True, label="attack"),
        ],
    )
    store.ingest("agent-2", [make_verdict(1, agent_id="agent-2", dst_ip="2001:db8::1")])

    def seqs(**fields: object) -> list[tuple[str, int]]:
        flt = query_service_pb2.VerdictFilter(**fields)  # type: ignore[arg-type]
        return sorted((v.verdict.agent_id, v.verdict.sequence) for v in store.query(flt, 100, "").verdicts)

    assert seqs(anomalous=True) == [("agent-1", 1), ("agent-1", 3)]
    assert seqs(anomalous=False) == [("agent-1", 2), ("agent-2", 1)]
    assert seqs(dst_port=22) == [("agent-1", 1)]
    assert seqs(ip="192.0.2.7") == [("agent-1", 3)]
    assert seqs(dst_ip="2001:db8::1") == [("agent-2", 1)]
    assert seqs(agent_ids=["agent-2"]) == [("agent-2", 1)]
    assert seqs(labels=["attack"]) == [("agent-1", 1), ("agent-1", 3)]
    assert seqs(min_score=0.5, max_score=0.7) == [("agent-1", 3)]


def test_migrates_an_older_database_and_refuses_a_newer_one(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    # A database from before the schema existed (version 0): only a stray table.
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
        conn.execute("INSERT INTO notes VALUES ('kept')")
    store = VerdictStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.migrate() == 0  # already current: nothing to do
    assert store.db.execute("SELECT text FROM notes").fetchone() == ("kept",)
    store.ingest("a", [make_verdict(1, agent_id="a")])
    store.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    store.db.conn.commit()
    store.close()
    with pytest.raises(RuntimeError, match="newer than this collector"):
        VerdictStore(path)


def test_migrates_a_version_1_database(tmp_path: Path) -> None:
    """A database written by schema 1 (before heartbeats) opens, migrates, and keeps its rows."""
    import sqlite_utils

    from auris.collector.store import MIGRATIONS

    path = tmp_path / "v1.db"
    old = sqlite_utils.Database(path)
    MIGRATIONS[0](old)
    old.table("meta").insert({"key": "schema_version", "value": "1"}, pk="key")
    old.table("agents").insert(
        {"agent_id": "a", "hostname": "h", "first_seen_ns": 1, "last_seen_ns": 1, "acknowledged_sequence": 3,
         "verdicts_stored": 3}
    )  # fmt: skip
    old.close()
    store = VerdictStore(path)
    assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)
    assert "refusals_pb" in store.db.table("agents").columns_dict
    assert {"alerts", "alert_events", "alert_outbox"} <= set(store.db.table_names())
    assert "last_heartbeat_ns" in store.db.table("agents").columns_dict
    (agent,) = store.agents(offline_after_ns=10**9)
    assert (agent.agent_id, agent.hostname, agent.verdicts_stored) == ("a", "h", 3)
    assert store.ingest("a", [make_verdict(4, agent_id="a")]).accepted == 1


def test_a_resend_with_reordered_map_fields_is_a_duplicate_not_a_conflict(store: VerdictStore) -> None:
    """protobuf may write map entries in any order (it differs between processes); a resend of the
    same verdict must be recognised as one, whatever order its stored copy was written in."""
    from auris.v1 import verdict_pb2

    original = make_verdict(1)
    original.scores[0].class_probabilities.update({"attack": 0.25, "benign": 0.75})
    store.ingest("agent-1", [original])
    (stored,) = store.db.execute("SELECT verdict_pb FROM verdicts").fetchone()

    # Build the same verdict's bytes with the two map entries in each order, by hand.
    score = verdict_pb2.ModelScore()
    score.CopyFrom(original.scores[0])
    score.ClearField("class_probabilities")
    entries = [verdict_pb2.ModelScore(class_probabilities={k: v}).SerializeToString() for k, v in
               (("attack", 0.25), ("benign", 0.75))]  # fmt: skip
    bare = verdict_pb2.Verdict()
    bare.CopyFrom(original)
    bare.ClearField("scores")
    variants = []
    for first, second in (entries, entries[::-1]):
        body = score.SerializeToString() + first + second
        variants.append(bare.SerializeToString() + bytes([(8 << 3) | 2, len(body)]) + body)
    assert all(verdict_pb2.Verdict.FromString(v) == original for v in variants)
    other_order = next(v for v in variants if v != stored)
    store.db.execute("UPDATE verdicts SET verdict_pb = ?", [other_order])
    store.db.conn.commit()

    result = store.ingest("agent-1", [original])
    assert (result.accepted, result.duplicates) == (0, 1)


def test_rollups_survive_retention(store: VerdictStore) -> None:
    from auris.v1 import query_service_pb2 as q

    base = 1_789_999_980_000  # ms, a minute boundary
    store.ingest(
        "agent-1",
        [
            make_verdict(1, label="attack", anomalous=True, scored_ms=base + 1_000),
            make_verdict(2, scored_ms=base + 2_000),
            make_verdict(3, scored_ms=base + 61_000),
        ],
    )
    store.ingest("agent-1", [make_verdict(3, scored_ms=base + 61_000)])  # a resend: counted once
    by_label = {
        r.group_values[0]: r.verdicts for r in store.aggregate_rollups(q.VerdictFilter(), [q.GROUP_BY_LABEL])
    }
    assert by_label == {"attack": 1, "benign": 2}
    raw_before = store.aggregate(q.VerdictFilter(), [q.GROUP_BY_LABEL])

    # Everything but the newest row is older than a minute: retention removes it, rollups stay.
    later = time.time_ns() + 3_600 * 10**9
    assert store.retain(max_age_ns=60 * 10**9, now_ns=later) == 2
    assert store.count() == 1
    assert {
        r.group_values[0]: r.verdicts for r in store.aggregate_rollups(q.VerdictFilter(), [q.GROUP_BY_LABEL])
    } == by_label
    assert sum(r.verdicts for r in store.aggregate(q.VerdictFilter(), [])) == 1
    assert sum(r.verdicts for r in raw_before) == 3
    # New rows still get increasing ids after retention.
    result = store.ingest("agent-1", [make_verdict(4, scored_ms=base + 121_000)])
    assert result.stored_ids[0] > 3

    per_minute = store.aggregate_rollups(q.VerdictFilter(), [], bucket_ns=60 * 10**9)
    assert [(r.bucket_start_time.ToMilliseconds(), r.verdicts) for r in per_minute] == [
        (base, 2),
        (base + 60_000, 1),
        (base + 120_000, 1),
    ]
    with pytest.raises(ValueError, match="rollups keep no anomalous"):
        store.aggregate_rollups(q.VerdictFilter(anomalous=True), [])
    with pytest.raises(ValueError, match="whole number of minutes"):
        store.aggregate_rollups(q.VerdictFilter(), [], bucket_ns=30 * 10**9)


def test_retention_by_row_count_keeps_the_newest(store: VerdictStore) -> None:
    store.ingest("agent-1", [make_verdict(s) for s in range(1, 21)])
    assert store.retain(max_rows=5) == 15
    assert [v.verdict.sequence for v in store.query(query_service_pb2.VerdictFilter(), 100, "").verdicts] == [
        20, 19, 18, 17, 16,
    ]  # fmt: skip


def test_migration_3_backfills_rollups_from_existing_verdicts(tmp_path: Path) -> None:
    import sqlite_utils

    from auris.collector.store import MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "v2.db"
    store = VerdictStore(path)
    store.ingest("agent-1", [make_verdict(s) for s in range(1, 4)])
    store.close()
    # Make it a schema-2 database again: no rollups (3), alerts (4), model registry (5), identity (6),
    # query indexes (7), model refusals (8), feeds (9), top talkers (10, 11), top anomalies' indexes
    # (12, 13), feed symbols and totals (14).
    db = sqlite_utils.Database(path)
    for table in ("rollups", "alerts", "alert_events", "alert_outbox", "models", "api_tokens",
                  "enrollment_tokens", "audit", "feed_records", "feed_rejects", "talkers",
                  "talker_minutes", "feed_symbols", "feed_totals"):  # fmt: skip
        db.execute(f"DROP TABLE {table}")
    for column in ("revoked_ns", "revoked_reason", "cert_serial", "refusals_pb"):
        db.execute(f"ALTER TABLE agents DROP COLUMN {column}")
    db.execute("DROP INDEX verdicts_anomaly_score")
    db.execute("DROP INDEX verdicts_anomaly_model_score")  # 12
    db.execute("DROP INDEX verdicts_anomaly_agent_time")  # 13
    for index in ("verdicts_agent_id", "verdicts_last_seen_minute", "verdicts_src_ip_block",
                  "verdicts_dst_ip_block"):  # fmt: skip
        db.execute(f"DROP INDEX {index}")
    db.execute("CREATE INDEX idx_verdicts_last_seen_ns ON verdicts (last_seen_ns)")
    db.execute("DELETE FROM meta WHERE key IN ('raw_deleted_through_ns', 'talkers_closed_before_ns')")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.conn.commit()
    db.close()
    assert len(MIGRATIONS) == SCHEMA_VERSION
    again = VerdictStore(path)
    assert again.schema_version() == SCHEMA_VERSION
    assert sum(r.verdicts for r in again.aggregate_rollups(query_service_pb2.VerdictFilter(), [])) == 3


def test_retention_by_size_deletes_the_oldest_until_the_database_fits(store: VerdictStore) -> None:
    for first in range(1, 20_001, 1000):
        store.ingest("agent-1", [make_verdict(s) for s in range(first, first + 1000)])
    used = store.size_bytes()
    assert store.retain_size(used * 2) == 0  # fits: nothing to do
    deleted = store.retain_size(used // 2)
    assert 8_000 <= deleted <= 12_000  # about half the rows, estimated from bytes per verdict
    remaining = [
        v.verdict.sequence for v in store.query(query_service_pb2.VerdictFilter(), 1000, "").verdicts
    ]
    assert remaining[0] == 20_000  # the newest stay
    assert store.count() == 20_000 - deleted
    assert store.db.execute("SELECT MIN(sequence) FROM verdicts").fetchone() == (
        deleted + 1,
    )  # the oldest went
    # Rollups keep counting what was deleted.
    assert sum(r.verdicts for r in store.aggregate_rollups(query_service_pb2.VerdictFilter(), [])) == 20_000
    # Freed pages are reused: storing as many rows again barely grows the used size.
    for first in range(20_001, 20_001 + deleted, 1000):
        store.ingest("agent-1", [make_verdict(s) for s in range(first, min(first + 1000, 20_001 + deleted))])
    assert store.size_bytes() < used * 1.2


def test_migration_7_adds_the_query_indexes_to_a_version_6_database(tmp_path: Path) -> None:
    """A schema-6 database with verdicts, rollups and rows retention already deleted: migration 7
    indexes it, queries answer the same, and the rollup minutes retention emptied in part are noted."""
    import sqlite_utils

    from auris.collector.store import _INSERT_SQL, _ROLLUP_SELECT, _ROLLUP_UPSERT, MIGRATIONS, verdict_row

    path = tmp_path / "v6.db"
    old = sqlite_utils.Database(path)
    for migration in MIGRATIONS[:6]:
        migration(old)
    old.table("meta").insert({"key": "schema_version", "value": "6"}, pk="key")
    base = 1_700_000_040_000  # a whole minute, in ms
    verdicts = [
        make_verdict(
            s,
            src_ip=f"10.0.0.{s % 3}",
            dst_ip="2001:db8::1" if s % 2 else "10.9.9.9",
            scored_ms=base + s * 7_000,
        )
        for s in range(1, 41)
    ]
    old.conn.executemany(_INSERT_SQL, [verdict_row(v, 10**18 + v.sequence) for v in verdicts])
    old.execute(_ROLLUP_UPSERT.format(select=_ROLLUP_SELECT + " WHERE true"))
    old.execute("DELETE FROM verdicts WHERE sequence <= 10")  # retention, before the upgrade
    old.conn.commit()
    old.close()

    store = VerdictStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    indexes = {row[1]: row[2] for row in store.db.execute("PRAGMA index_list(verdicts)").fetchall()}
    assert {"verdicts_agent_id", "verdicts_last_seen_minute", "verdicts_src_ip_block",
            "verdicts_dst_ip_block"} <= set(indexes)  # fmt: skip
    assert "idx_verdicts_last_seen_ns" not in indexes
    # Sequence 10 was scored at base + 70 s: its minute is the newest that lost raw rows.
    (through,) = store.db.execute("SELECT value FROM meta WHERE key = 'raw_deleted_through_ns'").fetchone()
    assert int(through) == (base + 60_000) * 1_000_000 + 60_000_000_000 - 1
    assert store.db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    def seqs(**fields: object) -> list[int]:
        flt = query_service_pb2.VerdictFilter(**fields)  # type: ignore[arg-type]
        return [v.verdict.sequence for v in store.query(flt, 100, "").verdicts]

    assert seqs(src_ip="10.0.0.1") == [s for s in range(40, 10, -1) if s % 3 == 1]
    assert seqs(ip="2001:db8::1") == [s for s in range(40, 10, -1) if s % 2]
    assert seqs(agent_ids=["agent-1"]) == list(range(40, 10, -1))
    flow = query_service_pb2.VerdictFilter(time_field=query_service_pb2.TIME_FIELD_FLOW)
    flow.time_range.start_time.FromMilliseconds(base + 20 * 7_000 - 10)
    flow.time_range.end_time.FromMilliseconds(base + 30 * 7_000 - 10)
    assert [v.verdict.sequence for v in store.query(flow, 100, "").verdicts] == list(range(29, 19, -1))
    assert store.ingest("agent-1", [make_verdict(41)]).accepted == 1
