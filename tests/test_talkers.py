"""Top talkers from the heavy-hitter summary (talkers.py) against exact counts of the same
verdicts: known heavy hitters found, every count within its reported bound, exact answers
exactly the raw answer; late verdicts, migration from schema 9, retention, and the RPC."""

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

from auris.collector import ctl, talkers
from auris.collector.client import CollectorClient
from auris.collector.store import SCHEMA_VERSION, VerdictStore
from auris.v1 import agent_service_pb2, agent_service_pb2_grpc, verdict_pb2
from auris.v1 import query_service_pb2 as q
from tests.conftest import CollectorThread, make_verdict, wait_for

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


def workload(
    minutes: int, per_minute: int, seed: int = 3, agent_id: str = "agent-1"
) -> list[verdict_pb2.Verdict]:
    """Flows from ~2,000 client addresses to three heavy servers (half the flows, most bytes,
    most anomalies at the third) and to many light ones: hundreds of addresses a minute, so
    that closed minutes drop most of them."""
    rng = random.Random(seed)
    out = []
    for i in range(minutes * per_minute):
        r = rng.random()
        heavy = 0 if r < 0.25 else 1 if r < 0.40 else 2 if r < 0.50 else -1
        dst = HEAVY[heavy] if heavy >= 0 else f"203.0.{rng.randrange(8)}.{rng.randrange(256)}"
        v = make_verdict(
            i + 1,
            agent_id=agent_id,
            src_ip=f"10.1.{rng.randrange(8)}.{rng.randrange(256)}",
            dst_ip=dst,
            anomalous=rng.random() < (0.4 if heavy == 2 else 0.02),
            scored_ms=BASE_MS + i * MINUTE_MS // per_minute,
        )
        v.counters.dst_to_src_bytes = int(rng.paretovariate(1.1) * (20_000 if heavy >= 0 else 800))
        out.append(v)
    return out


def ingest(store: VerdictStore, verdicts: Sequence[verdict_pb2.Verdict], batch: int = 256) -> None:
    """Store the verdicts, closing the minutes that fall due as the collector's thread would."""
    for first in range(0, len(verdicts), batch):
        part = verdicts[first : first + batch]
        store.ingest(part[0].agent_id, part)
        if first % (4 * batch) == 0:
            store.close_talker_minutes()
    while store.close_talker_minutes():
        pass


def truth(verdicts: Sequence[verdict_pb2.Verdict], start_ms: int, end_ms: int) -> Counts:
    """Exact counts per address over scored time [start, end): both ends of each flow."""
    counts: Counts = {}
    for v in verdicts:
        if start_ms <= v.scored_time.ToMilliseconds() < end_ms:
            total = v.counters.src_to_dst_bytes + v.counters.dst_to_src_bytes
            for ip in (v.flow.src_ip, v.flow.dst_ip):
                c = counts.setdefault(ip, [0, 0, 0])
                c[0] += 1
                c[1] += total
                c[2] += int(v.anomalous)
    return counts


def window(start_ms: int, end_ms: int) -> q.VerdictFilter:
    flt = q.VerdictFilter()
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


def summary_rows(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], int]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT * FROM talkers ORDER BY minute_ns, ip").fetchall()
        minutes = conn.execute("SELECT * FROM talker_minutes ORDER BY minute_ns").fetchall()
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
    for minute, *_ in rows:
        per_minute[minute] = per_minute.get(minute, 0) + 1
    assert sorted(per_minute) == [BASE_MS * 1_000_000 + m * talkers.MINUTE_NS for m in range(n)]
    assert all(k <= 3 * talkers.KEEP for k in per_minute.values())
    # Each of them had far more addresses than it kept.
    assert all(
        len(truth(verdicts, BASE_MS + m * MINUTE_MS, BASE_MS + (m + 1) * MINUTE_MS)) > 400 for m in range(n)
    )
    assert len(minutes) == n
    assert all(rest_flows > 0 for _, rest_flows, _, _ in minutes)
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
    rows, _, _ = summary_rows(store.path)
    assert any(partial for *_, partial in rows)
    for minute in (2, 3):
        start = (BASE_MS + minute * MINUTE_MS) * 1_000_000
        assert sum(1 for row in rows if row[0] == start) <= 3 * talkers.KEEP  # closed again
    everything = [*verdicts, *late]
    for metric in METRICS:
        for start_min, end_min in ((0, 12), (2, 4), (1.5, 3.5)):
            start, end = BASE_MS + int(start_min * MINUTE_MS), BASE_MS + int(end_min * MINUTE_MS)
            counts = truth(everything, start, end)
            check(store.top_talkers(window(start, end), metric, 10), counts, metric, 10)


def test_migration_10_builds_the_summary_of_a_schema_9_database(
    tmp_path: Path, store: VerdictStore, verdicts: list[verdict_pb2.Verdict]
) -> None:
    path = tmp_path / "v9.db"
    old = VerdictStore(path)
    ingest(old, verdicts)
    old.close()
    db = sqlite_utils.Database(path)
    db.execute("DROP TABLE talkers")
    db.execute("DROP TABLE talker_minutes")
    db.execute("DELETE FROM meta WHERE key = ?", [talkers.CLOSED_BEFORE])
    db.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    db.conn.commit()
    db.close()
    migrated = VerdictStore(path)
    assert migrated.schema_version() == SCHEMA_VERSION == 10
    for one in (store, migrated):  # the newest minute too, in both (see _due)
        one.close_talker_minutes(now_ns=time.time_ns() + 10 * talkers.LATENESS_NS)
    # The same summary as the one kept while the verdicts streamed in.
    assert summary_rows(path) == summary_rows(store.path)
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


def test_retention_keeps_the_summary_and_its_bounds(
    store: VerdictStore, verdicts: list[verdict_pb2.Verdict]
) -> None:
    deleted = store.retain(max_rows=len(verdicts) // 2)
    assert deleted == len(verdicts) // 2
    # Whole minutes whose raw rows are gone still count every verdict they had, like the rollups;
    # a range starting inside such a minute can only be bounded there.
    for start_min, end_min in ((0, 12), (2.5, 9.25)):
        start, end = BASE_MS + int(start_min * MINUTE_MS), BASE_MS + int(end_min * MINUTE_MS)
        counts = truth(verdicts, start, end)
        answer = store.top_talkers(window(start, end), q.TALKER_METRIC_FLOWS, 10)
        check(answer, counts, q.TALKER_METRIC_FLOWS, 10)
        assert {t.ip for t in answer.talkers[:3]} == set(HEAVY)
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


def test_other_filters_and_short_ranges_read_the_raw_rows(
    shared: VerdictStore, verdicts: list[verdict_pb2.Verdict]
) -> None:
    start, end = BASE_MS + 4 * MINUTE_MS + 1000, BASE_MS + 4 * MINUTE_MS + 50_000
    counts = truth(verdicts, start, end)
    answer = shared.top_talkers(window(start, end), q.TALKER_METRIC_BYTES, 10)
    check(answer, counts, q.TALKER_METRIC_BYTES, 10)
    assert not answer.approximate
    flt = window(BASE_MS, BASE_MS + 12 * MINUTE_MS)
    flt.anomalous = True
    anomalous = truth([v for v in verdicts if v.anomalous], BASE_MS, BASE_MS + 12 * MINUTE_MS)
    answer = shared.top_talkers(flt, q.TALKER_METRIC_FLOWS, 10)
    check(answer, anomalous, q.TALKER_METRIC_FLOWS, 10)
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
