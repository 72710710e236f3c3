"""The SQLite store: durability settings, idempotent ingest, cursor pagination, filters, migrations."""

from __future__ import annotations

import sqlite3
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
    assert store.schema_version() == SCHEMA_VERSION == 2
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
