"""Top talkers from the heavy-hitter summary (talkers.py) against exact counts of the same
verdicts: known heavy hitters found, every count within its reported bound, exact answers
exactly the raw answer, with or without filters of agents, labels, model and the anomaly flag;
late verdicts, migration from schema 10, retention of the summary, and the RPC."""

from __future__ import annotations

import io
import json
import random
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from auris.agent.config import ConfigError
from auris.collector import ctl, talkers
from auris.collector.client import CollectorClient
from auris.collector.config import load_collector_config
from auris.collector.store import MIGRATIONS, SCHEMA_VERSION, VerdictStore
from auris.v1 import agent_service_pb2, agent_service_pb2_grpc, verdict_pb2
from auris.v1 import query_service_pb2 as q
from tests.conftest import CollectorThread, make_verdict, running_collector, wait_for

MINUTE_MS = 60_000
# Whole minutes in 2023: long past, so the collector's clock never holds a minute open.
BASE_MS = 1_700_000_000_000 // MINUTE_MS * MINUTE_MS
HEAVY = ("198.51.100.1", "198.51.100.2", "2001:db8::7")
METRICS: tuple[q.TalkerMetric.ValueType, ...] = (
    q.TALKER_METRIC_FLOWS,
    q.TALKER_METRIC_BYTES,
    q.TALKER_METRIC_ANOMALIES,
)
Counts = dict[str, list[int]]
AGENTS = ("agent-1", "agent-2", "agent-3")


def workload(
    minutes: int, per_minute: int, seed: int = 3, agent_id: str = "agent-1"
) -> list[verdict_pb2.Verdict]:
    """Flows from ~2,000 client addresses to three heavy servers (half the flows, most bytes,
    most anomalies at the third) and to many light ones: hundreds of addresses a minute, so
    that closed minutes drop most of them."""
    rng = random.Random(seed)
    labels = random.Random(seed + 1000)
    out = []
    for i in range(minutes * per_minute):
        r = rng.random()
        heavy = 0 if r < 0.25 else 1 if r < 0.40 else 2 if r < 0.50 else -1
        dst = HEAVY[heavy] if heavy >= 0 else f"203.0.{rng.randrange(8)}.{rng.randrange(256)}"
        src = f"10.1.{rng.randrange(8)}.{rng.randrange(256)}"
        anomalous = rng.random() < (0.4 if heavy == 2 else 0.02)
        # Two labels for flagged flows, the second one decided by another model.
        label = "benign" if not anomalous else "attack" if labels.random() < 0.6 else "anomaly"
        v = make_verdict(
            i + 1,
            agent_id=agent_id,
            src_ip=src,
            dst_ip=dst,
            anomalous=anomalous,
            label=label,
            scored_ms=BASE_MS + i * MINUTE_MS // per_minute,
        )
        if label == "anomaly":
            v.model.model_id = v.scores[0].model.model_id = "ae"
        v.counters.dst_to_src_bytes = int(rng.paretovariate(1.1) * (20_000 if heavy >= 0 else 800))
        out.append(v)
    return out


def fleet(minutes: int, per_minute: int) -> list[verdict_pb2.Verdict]:
    """Three agents' workloads over the same minutes, interleaved as they would arrive."""
    streams = [workload(minutes, per_minute, seed=11 + k, agent_id=a) for k, a in enumerate(AGENTS)]
    return sorted((v for stream in streams for v in stream), key=lambda v: v.scored_time.ToNanoseconds())


def ingest(store: VerdictStore, verdicts: Sequence[verdict_pb2.Verdict], batch: int = 256) -> None:
    """Store the verdicts (each agent's in its batches, in order), closing the minutes that fall
    due as the collector's thread would."""
    for first in range(0, len(verdicts), batch):
        part = verdicts[first : first + batch]
        for agent in sorted({v.agent_id for v in part}):
            store.ingest(agent, [v for v in part if v.agent_id == agent])
        if first % (4 * batch) == 0:
            store.close_talker_minutes()
    while store.close_talker_minutes():
        pass


def matches(v: verdict_pb2.Verdict, flt: q.VerdictFilter) -> bool:
    """The filters these tests use (besides time), applied to a verdict."""
    return (
        (not flt.agent_ids or v.agent_id in flt.agent_ids)
        and (not flt.labels or v.label in flt.labels)
        and (not flt.model_id or v.model.model_id == flt.model_id)
        and (not flt.HasField("anomalous") or v.anomalous == flt.anomalous)
    )


def truth(
    verdicts: Sequence[verdict_pb2.Verdict], start_ms: int, end_ms: int, flt: q.VerdictFilter | None = None
) -> Counts:
    """Exact counts per address over scored time [start, end): both ends of each flow."""
    counts: Counts = {}
    for v in verdicts:
        if start_ms <= v.scored_time.ToMilliseconds() < end_ms and (flt is None or matches(v, flt)):
            total = v.counters.src_to_dst_bytes + v.counters.dst_to_src_bytes
            for ip in (v.flow.src_ip, v.flow.dst_ip):
                c = counts.setdefault(ip, [0, 0, 0])
                c[0] += 1
                c[1] += total
                c[2] += int(v.anomalous)
    return counts


def window(start_ms: int, end_ms: int, **fields: Any) -> q.VerdictFilter:
    flt = q.VerdictFilter(**fields)
    flt.time_range.start_time.FromMilliseconds(start_ms)
    flt.time_range.end_time.FromMilliseconds(end_ms)
    return flt


def check(
    answer: q.ListTopTalkersResponse, counts: Counts, metric: q.TalkerMetric.ValueType, limit: int
) -> None:
    """The answer keeps its word: each count within its bound, nothing left out above
    omitted_max; an answer not marked approximate is the exact answer."""
    k = METRICS.index(metric)
    for t in answer.talkers:
        true = counts.get(t.ip, [0, 0, 0])
        assert t.flows <= true[0] <= t.flows + t.flows_error, t
        assert t.bytes <= true[1] <= t.bytes + t.bytes_error, t
        assert t.anomalies <= true[2] <= t.anomalies + t.anomalies_error, t
    listed = {t.ip for t in answer.talkers}
    if answer.approximate:
        assert all(c[k] <= answer.omitted_max for ip, c in counts.items() if ip not in listed)
    else:
        expected = sorted(counts.items(), key=lambda kv: (-kv[1][k], kv[0]))[:limit]
        assert [(t.ip, [t.flows, t.bytes, t.anomalies]) for t in answer.talkers] == expected


def summary_rows(
    path: Path, slice_: str | None = "", since_ns: int = 0
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], int]:
    """(rows, rests) of one slice (None: all), from minute ``since_ns``, and the closed mark."""
    where = "minute_ns >= ?" + (" AND slice = ?" if slice_ is not None else "")
    params: list[Any] = [since_ns] + ([slice_] if slice_ is not None else [])
    with sqlite3.connect(path) as conn:
        rows = conn.execute(f"SELECT * FROM talkers WHERE {where} ORDER BY 1, 2, 3", params).fetchall()
        minutes = conn.execute(f"SELECT * FROM talker_minutes WHERE {where} ORDER BY 1, 2", params).fetchall()
        (closed,) = conn.execute("SELECT value FROM meta WHERE key = ?", (talkers.CLOSED_BEFORE,)).fetchone()
    return rows, minutes, int(closed)


@pytest.fixture(scope="module")
def verdicts() -> list[verdict_pb2.Verdict]:
    return workload(minutes=12, per_minute=300)


@pytest.fixture
def store(tmp_path: Path, verdicts: list[verdict_pb2.Verdict]) -> VerdictStore:
    store = VerdictStore(tmp_path / "talkers.db")
    ingest(store, verdicts)
    return store


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, verdicts: list[verdict_pb2.Verdict]) -> VerdictStore:
    """The same, for the tests that only read."""
    store = VerdictStore(tmp_path_factory.mktemp("talkers") / "talkers.db")
    ingest(store, verdicts)
    return store


def test_closed_minutes_are_bounded_and_keep_the_heavy_hitters(
    store: VerdictStore, verdicts: list[verdict_pb2.Verdict]
) -> None:
    rows, minutes, closed = summary_rows(store.path)
    # The minutes that ended LATENESS before the newest scored time (11 min 59.8 s) are closed;
    # the others are read from the raw rows.
    newest = max(v.scored_time.ToNanoseconds() for v in verdicts)
    n = ((newest - talkers.LATENESS_NS) // talkers.MINUTE_NS * talkers.MINUTE_NS - BASE_MS * 1_000_000) // (
        talkers.MINUTE_NS
    )
    assert 0 < n < 12
    assert closed == BASE_MS * 1_000_000 + n * talkers.MINUTE_NS
    per_minute: dict[int, int] = {}
    for _, minute, *_ in rows:
        per_minute[minute] = per_minute.get(minute, 0) + 1
    assert sorted(per_minute) == [BASE_MS * 1_000_000 + m * talkers.MINUTE_NS for m in range(n)]
    assert all(k <= 2 * (talkers.KEEP + talkers.KEEP_ANOMALOUS) for k in per_minute.values())
    # Each of them had far more addresses than it kept.
    assert all(
        len(truth(verdicts, BASE_MS + m * MINUTE_MS, BASE_MS + (m + 1) * MINUTE_MS)) > 400 for m in range(n)
    )
    assert len(minutes) == n
    assert all(rest_flows > 0 for _, _, rest_flows, *_ in minutes)
    # The same per agent, label and model: one agent here, so its slice is the whole minute.
    slices = {row[0] for row in summary_rows(store.path, None)[0]}
    assert slices == {"", "a:agent-1", "l:benign", "l:attack", "l:anomaly", "m:m", "m:ae", talkers.ANOMALOUS}
    # ... keeping at least its rows (more by the anomalous counts, when a minute has more).
    agent_rows = {row[1:] for row in summary_rows(store.path, "a:agent-1")[0]}
    assert {row[1:] for row in rows} <= agent_rows
    # Nothing more is due while verdicts keep arriving; once none has for a while, the clock
    # closes the newest minutes too.
    store.close_talker_minutes(now_ns=time.time_ns())
    store.close_talker_minutes(now_ns=time.time_ns() + 10 * talkers.LATENESS_NS)
    assert len(summary_rows(store.path)[1]) == 12
    answer = store.top_talkers(window(BASE_MS, BASE_MS + 12 * MINUTE_MS), q.TALKER_METRIC_FLOWS, 3)
    assert {t.ip for t in answer.talkers} == set(HEAVY)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("start_min", "end_min"),
    [(0, 12), (0, 11), (2.5, 9.25), (3, 4), (0.2, 1.7), (5.5, 12)],
)
def test_answers_are_within_their_bounds_and_exact_when_they_say_so(
    shared: VerdictStore,
    verdicts: list[verdict_pb2.Verdict],
    metric: q.TalkerMetric.ValueType,
    start_min: float,
    end_min: float,
) -> None:
    start, end = BASE_MS + int(start_min * MINUTE_MS), BASE_MS + int(end_min * MINUTE_MS)
    counts = truth(verdicts, start, end)
    for limit in (3, 10, 40):
        check(shared.top_talkers(window(start, end), metric, limit), counts, metric, limit)
    exact = shared.top_talkers(window(start, end), metric, 10, exact=True)
    check(exact, counts, metric, 10)
    assert not exact.approximate


def test_the_last_hour_newest_minute_included_is_exact_for_heavy_hitters(
    shared: VerdictStore, verdicts: list[verdict_pb2.Verdict]
) -> None:
    """As the benchmark asks: from a time inside a minute to just after the newest verdict."""
    newest = max(v.scored_time.ToMilliseconds() for v in verdicts)
    start, end = newest - 7 * MINUTE_MS - 1234, newest + 1
    answer = shared.top_talkers(window(start, end), q.TALKER_METRIC_BYTES, 3)
    check(answer, truth(verdicts, start, end), q.TALKER_METRIC_BYTES, 3)
    assert not answer.approximate  # heavy hitters are kept in every minute: their counts are exact


def test_late_verdicts_of_closed_minutes_keep_the_bounds(
    store: VerdictStore, verdicts: list[verdict_pb2.Verdict]
) -> None:
    # An agent's spool: verdicts of minutes 2 and 3, long closed, to heavy and to new addresses.
    late = workload(minutes=2, per_minute=300, seed=9, agent_id="agent-2")
    for v in late:
        v.scored_time.FromMilliseconds(v.scored_time.ToMilliseconds() + 2 * MINUTE_MS)
    ingest(store, late)
    rows, _, _ = summary_rows(store.path, None)
    assert any(partial for *_, partial in rows)
    for minute in (2, 3):
        start = (BASE_MS + minute * MINUTE_MS) * 1_000_000
        for slice_ in ("", "a:agent-2", "l:benign"):
            assert sum(1 for row in rows if row[:2] == (slice_, start)) <= 2 * (
                talkers.KEEP + talkers.KEEP_ANOMALOUS
            )  # closed again
    everything = [*verdicts, *late]
    filters: list[dict[str, Any]] = [
        {},
        {"agent_ids": ["agent-2"]},
        {"agent_ids": ["agent-1", "agent-2"]},
        {"labels": ["attack"]},
        {"anomalous": True},
    ]
    for metric in METRICS:
        for start_min, end_min in ((0, 12), (2, 4), (1.5, 3.5)):
            for fields in filters:
                start, end = BASE_MS + int(start_min * MINUTE_MS), BASE_MS + int(end_min * MINUTE_MS)
                flt = window(start, end, **fields)
                counts = truth(everything, start, end, flt)
                check(store.top_talkers(flt, metric, 10), counts, metric, 10)


def test_migrations_10_and_11_build_the_summary_of_a_schema_9_database(
    tmp_path: Path, store: VerdictStore, verdicts: list[verdict_pb2.Verdict]
) -> None:
    path = tmp_path / "v9.db"
    old = VerdictStore(path)
    ingest(old, verdicts)
    old.close()
    db = sqlite_utils.Database(path)
    db.execute("DROP TABLE talkers")
    db.execute("DROP TABLE talker_minutes")
    db.execute("DELETE FROM meta WHERE key IN (?, ?)", [talkers.CLOSED_BEFORE, talkers.SLICED_FROM])
    db.execute("DROP INDEX verdicts_anomaly_model_score")  # 12
    db.execute("DROP INDEX verdicts_anomaly_agent_time")  # 13
    for table in ("feed_symbols", "feed_totals"):  # 14
        db.execute(f"DROP TABLE {table}")
    db.execute("ALTER TABLE feed_records DROP COLUMN prev_id")
    db.execute("CREATE INDEX feed_records_entity ON feed_records (feed_id, kind, entity, time_ns)")
    db.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    db.conn.commit()
    db.close()
    migrated = VerdictStore(path)
    assert migrated.schema_version() == SCHEMA_VERSION == 14
    for one in (store, migrated):  # the newest minute too, in both (see _due)
        one.close_talker_minutes(now_ns=time.time_ns() + 10 * talkers.LATENESS_NS)
    # The same summary, every slice, as the one kept while the verdicts streamed in.
    assert summary_rows(path, None) == summary_rows(store.path, None)
    flt = window(BASE_MS, BASE_MS + 12 * MINUTE_MS)
    assert migrated.top_talkers(flt, q.TALKER_METRIC_BYTES, 5) == store.top_talkers(
        flt, q.TALKER_METRIC_BYTES, 5
    )
    # And it goes on from there.
    more = workload(minutes=1, per_minute=300, seed=5)
    for k, v in enumerate(more):
        v.sequence = len(verdicts) + k + 1
        v.scored_time.FromMilliseconds(v.scored_time.ToMilliseconds() + 12 * MINUTE_MS)
    ingest(migrated, more)
    counts = truth([*verdicts, *more], BASE_MS, BASE_MS + 13 * MINUTE_MS)
    check(migrated.top_talkers(window(BASE_MS, BASE_MS + 13 * MINUTE_MS), q.TALKER_METRIC_FLOWS, 5), counts,
          q.TALKER_METRIC_FLOWS, 5)  # fmt: skip


YEARS_NS = 10 * 365 * 86_400 * 10**9  # a talker horizon longer than these tests' data is old


def test_migration_11_slices_a_schema_10_database_and_keeps_what_retention_left(
    tmp_path: Path, verdicts: list[verdict_pb2.Verdict]
) -> None:
    """A schema-10 database (summary of every verdict only) whose oldest raw rows retention had
    already deleted: migration 11 keeps the schema-10 rows of the minutes retention emptied in
    part and summarises the others again, per slice; filtered queries read the raw rows before."""
    current = VerdictStore(tmp_path / "current.db")
    ingest(current, verdicts)
    current.close_talker_minutes(now_ns=time.time_ns() + 10 * talkers.LATENESS_NS)
    gone = len(verdicts) // 4 + 150  # minutes 0-2 and half of 3: raw rows deleted before the upgrade
    current.retain(max_rows=len(verdicts) - gone, talker_keep_ns=YEARS_NS)
    current.close()
    path = tmp_path / "v10.db"
    old = sqlite_utils.Database(path)
    for k, migration in enumerate(MIGRATIONS[:10]):
        migration(old)
        old.table("meta").insert({"key": "schema_version", "value": str(k + 1)}, pk="key", replace=True)
    old.execute("ATTACH DATABASE ? AS current", [str(tmp_path / "current.db")])
    for table in ("verdicts", "rollups", "agents"):
        old.execute(f"INSERT INTO {table} SELECT * FROM current.{table}")
    # The schema-10 summary: the every-verdict slice without anomalous bytes (the same rows the
    # schema-10 collector kept, or more: a valid summary either way).
    old.execute(
        "INSERT INTO talkers SELECT minute_ns, ip, flows, bytes, anomalies, partial FROM current.talkers"
        " WHERE slice = ''"
    )
    old.execute(
        "INSERT INTO talker_minutes SELECT minute_ns, rest_flows, rest_bytes, rest_anomalies"
        " FROM current.talker_minutes WHERE slice = ''"
    )
    old.execute(
        "UPDATE meta SET value = (SELECT value FROM current.meta WHERE key = meta.key) WHERE key IN (?, ?)",
        [talkers.CLOSED_BEFORE, "raw_deleted_through_ns"],
    )
    old.conn.commit()
    old.execute("DETACH DATABASE current")
    old.close()

    migrated = VerdictStore(path)
    assert migrated.schema_version() == SCHEMA_VERSION == 14
    migrated.close_talker_minutes(now_ns=time.time_ns() + 10 * talkers.LATENESS_NS)
    sliced_from = (BASE_MS + 4 * MINUTE_MS) * 1_000_000  # minute 3 lost raw rows
    (value,) = migrated.db.execute("SELECT value FROM meta WHERE key = ?", [talkers.SLICED_FROM]).fetchone()
    assert int(value) == sliced_from
    # Before: the schema-10 rows, every verdict only; from there: the same as summarised live.
    before = summary_rows(path, None)[0]
    assert {row[0] for row in before if row[1] < sliced_from} == {""}
    assert [row[1:] for row in before if row[1] < sliced_from] == [
        (*row[1:6], 0, row[7]) for row in summary_rows(tmp_path / "current.db")[0] if row[1] < sliced_from
    ]
    assert summary_rows(path, None, sliced_from) == summary_rows(tmp_path / "current.db", None, sliced_from)
    remaining = verdicts[gone:]
    for fields in ({}, {"anomalous": True}, {"labels": ["attack"]}, {"agent_ids": ["agent-1"]}):
        for metric in METRICS:
            flt = window(BASE_MS, BASE_MS + 12 * MINUTE_MS, **fields)
            answer = migrated.top_talkers(flt, metric, 10)
            # Every verdict: the summary still counts the deleted rows; filtered: minutes before
            # sliced_from come from what is left of the raw rows.
            counted = verdicts if not fields else remaining
            check(answer, truth(counted, BASE_MS, BASE_MS + 12 * MINUTE_MS, flt), metric, 10)


def minutes_kept(store: VerdictStore) -> set[int]:
    rows = store.db.execute(
        "SELECT DISTINCT minute_ns FROM talkers UNION SELECT minute_ns FROM talker_minutes"
    )
    return {minute for (minute,) in rows}


def test_the_summary_follows_raw_retention_by_default(
    store: VerdictStore, verdicts: list[verdict_pb2.Verdict]
) -> None:
    every = minutes_kept(store)
    assert len(every) > 6  # the closed minutes
    deleted = store.retain(max_rows=len(verdicts) // 2)
    assert deleted == len(verdicts) // 2
    oldest = verdicts[len(verdicts) // 2].scored_time.ToNanoseconds()
    first = oldest // talkers.MINUTE_NS * talkers.MINUTE_NS
    # Minutes with no raw row left are gone from every slice; the first with some stays whole.
    assert minutes_kept(store) == {m for m in every if m >= first}
    assert min(minutes_kept(store)) == first
    start = first // 1_000_000
    for fields in ({}, {"anomalous": True}, {"agent_ids": ["agent-1"]}):
        for metric in METRICS:
            flt = window(start, BASE_MS + 12 * MINUTE_MS, **fields)
            check(
                store.top_talkers(flt, metric, 10),
                truth(verdicts, start, BASE_MS + 12 * MINUTE_MS, flt),
                metric,
                10,
            )


def test_a_talker_horizon_keeps_the_summary_and_its_bounds_after_the_raw_rows(
    store: VerdictStore, verdicts: list[verdict_pb2.Verdict]
) -> None:
    every = minutes_kept(store)
    deleted = store.retain(max_rows=len(verdicts) // 2, talker_keep_ns=YEARS_NS)
    assert deleted == len(verdicts) // 2
    assert minutes_kept(store) == every
    # Whole minutes whose raw rows are gone still count every verdict they had, like the rollups;
    # a range starting inside such a minute can only be bounded there.
    for start_min, end_min in ((0, 12), (2.5, 9.25)):
        start, end = BASE_MS + int(start_min * MINUTE_MS), BASE_MS + int(end_min * MINUTE_MS)
        counts = truth(verdicts, start, end)
        answer = store.top_talkers(window(start, end), q.TALKER_METRIC_FLOWS, 10)
        check(answer, counts, q.TALKER_METRIC_FLOWS, 10)
        assert {t.ip for t in answer.talkers[:3]} == set(HEAVY)
        flagged = store.top_talkers(window(start, end, anomalous=True), q.TALKER_METRIC_ANOMALIES, 10)
        check(
            flagged, truth(verdicts, start, end, window(0, 1, anomalous=True)), q.TALKER_METRIC_ANOMALIES, 10
        )
    start, end = BASE_MS + 2 * MINUTE_MS + 1, BASE_MS + 9 * MINUTE_MS
    for metric in METRICS:
        for limit in (3, 30):
            partly = store.top_talkers(window(start, end), metric, limit)
            check(partly, truth(verdicts, start, end), metric, limit)
            assert partly.approximate
    assert store.top_talkers(window(start, end), q.TALKER_METRIC_FLOWS, 3).talkers[0].flows_error > 0
    # The raw rows answer for what is left of them.
    exact = store.top_talkers(
        window(BASE_MS, BASE_MS + 12 * MINUTE_MS), q.TALKER_METRIC_FLOWS, 10, exact=True
    )
    remaining = truth(verdicts[len(verdicts) // 2 :], BASE_MS, BASE_MS + 12 * MINUTE_MS)
    check(exact, remaining, q.TALKER_METRIC_FLOWS, 10)
    # Past the horizon (by scored time) the summary follows the raw rows again.
    newest = max(v.scored_time.ToNanoseconds() for v in verdicts)
    store.retain(talker_keep_ns=time.time_ns() - newest)
    first = verdicts[len(verdicts) // 2].scored_time.ToNanoseconds() // talkers.MINUTE_NS * talkers.MINUTE_NS
    assert min(minutes_kept(store)) == first
    # A size cap the raw rows cannot meet alone takes the summary with them, horizon or not.
    store.retain_size(1, talker_keep_ns=YEARS_NS)
    assert store.count() == 1
    assert minutes_kept(store) <= {newest // talkers.MINUTE_NS * talkers.MINUTE_NS}


@pytest.fixture(scope="module")
def fleet_verdicts() -> list[verdict_pb2.Verdict]:
    return fleet(minutes=8, per_minute=250)


@pytest.fixture(scope="module")
def fleet_store(
    tmp_path_factory: pytest.TempPathFactory, fleet_verdicts: list[verdict_pb2.Verdict]
) -> VerdictStore:
    store = VerdictStore(tmp_path_factory.mktemp("fleet") / "fleet.db")
    ingest(store, fleet_verdicts)
    return store


def read_tables(
    store: VerdictStore, flt: q.VerdictFilter, metric: q.TalkerMetric.ValueType
) -> tuple[set[str], q.ListTopTalkersResponse]:
    """The answer, and which of talkers / verdicts the store's statements read for it."""
    statements: list[str] = []
    store.reader().set_trace_callback(statements.append)
    try:
        answer = store.top_talkers(flt, metric, 10)
    finally:
        store.reader().set_trace_callback(None)
    return {t for t in ("talkers", "verdicts") for sql in statements if f"FROM {t} " in sql}, answer


SUMMARY_FILTERS: list[dict[str, Any]] = [
    {"agent_ids": ["agent-2"]},
    {"agent_ids": ["agent-1", "agent-3"]},
    {"labels": ["attack"]},
    {"labels": ["attack", "anomaly"]},
    {"model_id": "ae"},
    {"anomalous": True},
    {"anomalous": False},
    {"agent_ids": ["agent-3"], "anomalous": True},
    {"labels": ["benign"], "anomalous": False},
]


@pytest.mark.parametrize("fields", SUMMARY_FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_filtered_answers_come_from_the_summary_within_their_bounds(
    fleet_store: VerdictStore, fleet_verdicts: list[verdict_pb2.Verdict], fields: dict[str, Any]
) -> None:
    newest = max(v.scored_time.ToMilliseconds() for v in fleet_verdicts)
    for start, end in (
        (BASE_MS, BASE_MS + 8 * MINUTE_MS),
        (BASE_MS + MINUTE_MS + 12_345, BASE_MS + 6 * MINUTE_MS + 40_000),
        (newest - 5 * MINUTE_MS - 999, newest + 1),  # the open minutes too
    ):
        flt = window(start, end, **fields)
        counts = truth(fleet_verdicts, start, end, flt)
        assert counts  # the filter selects something
        for metric in METRICS:
            for limit in (3, 10, 40):
                check(fleet_store.top_talkers(flt, metric, limit), counts, metric, limit)
        # From the summary (and the raw rows of the minutes at the ends), not all raw rows.
        tables, answer = read_tables(fleet_store, flt, METRICS[1])
        assert "talkers" in tables
        exact = fleet_store.top_talkers(flt, METRICS[1], 10, exact=True)
        check(exact, counts, METRICS[1], 10)
        assert not exact.approximate
        if not answer.approximate:
            assert answer == exact


def test_bounds_hold_when_every_slice_drops_most_addresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fleet_verdicts: list[verdict_pb2.Verdict]
) -> None:
    """A summary far narrower than the traffic: every slice, the anomalous one included, drops
    addresses each minute, so every answer leans on rests, and must still keep its word."""
    monkeypatch.setattr(talkers, "KEEP", 6)
    monkeypatch.setattr(talkers, "KEEP_ANOMALOUS", 3)
    store = VerdictStore(tmp_path / "narrow.db")
    ingest(store, fleet_verdicts)
    (dropping,) = store.db.execute(
        "SELECT COUNT(DISTINCT slice) FROM talker_minutes WHERE rest_flows > 0 AND rest_anomalies > 0"
    ).fetchone()
    assert dropping >= 6  # '', three agents, x:, l:attack ...
    approximate = 0
    start, end = BASE_MS + MINUTE_MS + 12_345, BASE_MS + 8 * MINUTE_MS
    for fields in [{}, *SUMMARY_FILTERS]:
        flt = window(start, end, **fields)
        counts = truth(fleet_verdicts, start, end, flt)
        for metric in METRICS:
            for limit in (1, 5, 20):
                answer = store.top_talkers(flt, metric, limit)
                check(answer, counts, metric, limit)
                approximate += answer.approximate
    assert approximate > 0


def test_the_summary_finds_each_agents_heavy_hitters_exactly(
    fleet_store: VerdictStore, fleet_verdicts: list[verdict_pb2.Verdict]
) -> None:
    start, end = BASE_MS, BASE_MS + 6 * MINUTE_MS
    for agent in AGENTS:
        flt = window(start, end, agent_ids=[agent])
        answer = fleet_store.top_talkers(flt, q.TALKER_METRIC_FLOWS, 3)
        assert {t.ip for t in answer.talkers} == set(HEAVY)
        assert not any(t.flows_error for t in answer.talkers)
    flagged = fleet_store.top_talkers(window(start, end, anomalous=True), q.TALKER_METRIC_ANOMALIES, 1)
    assert flagged.talkers[0].ip == HEAVY[2]
    assert not flagged.talkers[0].anomalies_error


def test_other_filters_and_short_ranges_read_the_raw_rows(
    fleet_store: VerdictStore, fleet_verdicts: list[verdict_pb2.Verdict]
) -> None:
    start, end = BASE_MS + 4 * MINUTE_MS + 1000, BASE_MS + 4 * MINUTE_MS + 50_000
    counts = truth(fleet_verdicts, start, end)
    answer = fleet_store.top_talkers(window(start, end), q.TALKER_METRIC_BYTES, 10)
    check(answer, counts, q.TALKER_METRIC_BYTES, 10)
    assert not answer.approximate
    start, end = BASE_MS, BASE_MS + 8 * MINUTE_MS
    # Two of agents / labels / model, or a filter the summary keeps nothing of: the raw rows.
    for fields, keep in (
        (
            {"agent_ids": ["agent-1"], "labels": ["attack"]},
            lambda v: v.agent_id == "agent-1" and v.label == "attack",
        ),
        ({"dst_port": 443}, lambda v: v.flow.dst_port == 443),
        ({"hostnames": ["host-1"]}, lambda v: v.hostname == "host-1"),
        ({"min_score": 0.05}, lambda v: True),
    ):
        flt = window(start, end, **fields)
        tables, answer = read_tables(fleet_store, flt, q.TALKER_METRIC_FLOWS)
        assert tables == {"verdicts"}
        check(answer, truth([v for v in fleet_verdicts if keep(v)], start, end), q.TALKER_METRIC_FLOWS, 10)
        assert not answer.approximate


def test_the_rpc_and_aurisctl_say_when_an_answer_is_approximate(
    collector: CollectorThread, client: CollectorClient
) -> None:
    verdicts = workload(minutes=6, per_minute=300)
    stub = agent_service_pb2_grpc.AgentServiceStub(client.channel)
    requests = [
        agent_service_pb2.StreamVerdictsRequest(agent_id="agent-1", verdicts=verdicts[first : first + 256])
        for first in range(0, len(verdicts), 256)
    ]
    assert sum(ack.accepted for ack in stub.StreamVerdicts(iter(requests))) == len(verdicts)

    newest = max(v.scored_time.ToNanoseconds() for v in verdicts)
    due = (newest - talkers.LATENESS_NS) // talkers.MINUTE_NS * talkers.MINUTE_NS

    def closed() -> bool:  # by the collector's own thread
        return summary_rows(Path(collector.config.db))[2] >= due

    assert wait_for(closed, timeout=20)
    start, end = BASE_MS + 30_000, BASE_MS + 6 * MINUTE_MS
    counts = truth(verdicts, start, end)
    # Top 40 by bytes reaches addresses that closed minutes dropped: bounds, not exact counts.
    answer = client.list_top_talkers(window(start, end), q.TALKER_METRIC_BYTES, 40)
    check(answer, counts, q.TALKER_METRIC_BYTES, 40)
    assert answer.approximate
    assert answer.omitted_max > 0
    assert any(t.bytes_error for t in answer.talkers)
    exact = client.list_top_talkers(window(start, end), q.TALKER_METRIC_BYTES, 40, exact=True)
    check(exact, counts, q.TALKER_METRIC_BYTES, 40)
    assert not exact.approximate
    # Filtered: from the summary's slices, with the same honesty.
    for fields in ({"anomalous": True}, {"agent_ids": ["agent-1"]}, {"labels": ["attack", "anomaly"]}):
        flt = window(start, end, **fields)
        for metric in METRICS:
            check(client.list_top_talkers(flt, metric, 10), truth(verdicts, start, end, flt), metric, 10)
    out = io.StringIO()
    args = ["--collector", collector.address, "--insecure", "talkers", "--by", "bytes", "--limit", "40",
            "--since", "2023-11-14T22:13:30Z", "--until", "2023-11-14T22:19:00Z"]  # fmt: skip
    assert ctl.main(args, out) == 0
    assert "approximate" in out.getvalue().splitlines()[-1]
    out = io.StringIO()
    assert ctl.main([*args, "--json"], out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 40
    assert all(line["approximate"] is True for line in lines)
    assert {line["omitted_max"] for line in lines} == {str(answer.omitted_max)}


def test_a_backlog_closes_in_short_rounds_to_the_same_summary(
    tmp_path: Path, store: VerdictStore, verdicts: list[verdict_pb2.Verdict]
) -> None:
    """A collector that was down: every due minute at once, a few per read transaction."""
    behind = VerdictStore(tmp_path / "behind.db")
    for first in range(0, len(verdicts), 256):
        behind.ingest("agent-1", verdicts[first : first + 256])
    rounds = []
    while closed := behind.close_talker_minutes():
        rounds.append(closed)
    assert len(rounds) > 1
    assert max(rounds) <= talkers._MINUTES_PER_ROUND
    assert summary_rows(behind.path) == summary_rows(store.path)


def test_the_collector_prunes_the_summary_with_the_raw_rows(tmp_path: Path) -> None:
    verdicts = workload(minutes=6, per_minute=300)
    path = tmp_path / "r.db"
    with (
        running_collector(path, retention_max_rows=900, retention_interval_s=0.2) as running,
        CollectorClient(running.address, insecure=True) as client,
    ):
        stub = agent_service_pb2_grpc.AgentServiceStub(client.channel)
        requests = [
            agent_service_pb2.StreamVerdictsRequest(
                agent_id="agent-1", verdicts=verdicts[first : first + 300]
            )
            for first in range(0, len(verdicts), 300)
        ]
        assert sum(ack.accepted for ack in stub.StreamVerdicts(iter(requests))) == len(verdicts)
        # The newest 900 are minutes 3-5; minutes 4 and 5 are not closed yet (see _due). Minutes
        # 0-2 were either never summarised (retention came first) or pruned with their rows.
        third = (BASE_MS + 3 * MINUTE_MS) * 1_000_000

        def settled() -> bool:
            with sqlite3.connect(path) as conn:
                minutes = {m for (m,) in conn.execute("SELECT DISTINCT minute_ns FROM talkers")}
                (raw,) = conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()
            return raw == 900 and minutes == {third}

        assert wait_for(settled, timeout=20)
        start, end = BASE_MS + 3 * MINUTE_MS, BASE_MS + 6 * MINUTE_MS
        for fields in ({}, {"anomalous": True}):
            flt = window(start, end, **fields)
            check(client.list_top_talkers(flt, q.TALKER_METRIC_FLOWS, 10), truth(verdicts, start, end, flt),
                  q.TALKER_METRIC_FLOWS, 10)  # fmt: skip


def test_talker_retention_days_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("insecure = true\ntalker_retention_days = 7.5\n")
    assert load_collector_config(path).talker_retention_days == 7.5
    path.write_text("insecure = true\ntalker_retention_days = -1\n")
    with pytest.raises(ConfigError, match="talker_retention_days must not be negative"):
        load_collector_config(path)
