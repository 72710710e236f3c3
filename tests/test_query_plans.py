"""Query plans of the store give the answers of the plain SQL: address block walks, agents merged,
time ranges by index or by id walk, aggregates served from rollups (also after retention)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

import auris.collector.store as store_module
from auris.collector.store import _GROUP_COLUMNS, ID_BLOCK, VerdictStore, filter_sql, stored_verdict
from auris.v1 import query_service_pb2 as q
from tests.conftest import make_verdict

MINUTE_MS = 60_000
BASE_MS = 1_700_000_000_000 // MINUTE_MS * MINUTE_MS


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> VerdictStore:
    """Three blocks' worth of verdicts from three agents over 90 minutes, addresses skewed."""
    rng = random.Random(7)
    store = VerdictStore(tmp_path_factory.mktemp("plans") / "plans.db")
    sequences = {"agent-a": 0, "agent-b": 0, "agent-c": 0}
    total = 3 * ID_BLOCK + 500
    for first in range(0, total, 500):
        agent = rng.choice(list(sequences))
        batch = []
        for i in range(first, min(first + 500, total)):
            sequences[agent] += 1
            batch.append(
                make_verdict(
                    sequences[agent],
                    agent_id=agent,
                    src_ip=f"10.0.0.{min(int(rng.expovariate(0.3)), 250)}",
                    dst_ip=rng.choice(["192.0.2.1", "2001:db8::1", f"198.51.100.{rng.randrange(200)}"]),
                    label=rng.choice(["benign", "benign", "attack", "anomaly"]),
                    anomalous=rng.random() < 0.1,
                    score=rng.random(),
                    # Scored times mostly follow arrival, some late (an agent's spool).
                    scored_ms=BASE_MS + i * 90 * MINUTE_MS // total - (rng.random() < 0.05) * 600_000,
                )
            )
        store.ingest(agent, batch)
    return store


def _plain(store: VerdictStore, flt: q.VerdictFilter, limit: int, before: int | None = None) -> list[int]:
    """What the single SQL statement of filter_sql returns: the reference answer."""
    where, params = filter_sql(flt)
    if before is not None:
        where.append("id < ?")
        params.append(before)
    sql = "SELECT id FROM verdicts" + (" WHERE " + " AND ".join(where) if where else "")
    return [row[0] for row in store.reader().execute(sql + " ORDER BY id DESC LIMIT ?", [*params, limit])]


def _pages(store: VerdictStore, flt: q.VerdictFilter, size: int) -> list[int]:
    ids: list[int] = []
    token = ""
    while True:
        page = store.query(flt, size, token)
        ids += [v.id for v in page.verdicts]
        token = page.next_page_token
        if not token:
            return ids


def _window(start_min: float | None, end_min: float | None, **fields: Any) -> q.VerdictFilter:
    flt = q.VerdictFilter(**fields)
    if start_min is not None:
        flt.time_range.start_time.FromMilliseconds(BASE_MS + int(start_min * MINUTE_MS))
    if end_min is not None:
        flt.time_range.end_time.FromMilliseconds(BASE_MS + int(end_min * MINUTE_MS))
    return flt


@pytest.mark.parametrize(
    "fields",
    [
        {"src_ip": "10.0.0.0"},  # frequent
        {"src_ip": "10.0.0.20"},  # rare: every block walked
        {"src_ip": "10.0.0.251"},  # absent
        {"dst_ip": "2001:db8:0::1"},  # matched canonically
        {"ip": "192.0.2.1"},
        {"ip": "10.0.0.3", "anomalous": True},
        {"agent_ids": ["agent-a", "agent-c"]},
        {"agent_ids": ["agent-b"], "labels": ["attack"]},
    ],
)
def test_address_and_agent_plans_page_like_the_plain_statement(
    store: VerdictStore, fields: dict[str, Any]
) -> None:
    flt = q.VerdictFilter(**fields)
    everything = _plain(store, flt, 10**9)
    assert _pages(store, flt, 97) == everything
    first = store.query(flt, 10, "")
    assert [v.id for v in first.verdicts] == everything[:10]
    # The stored verdicts themselves, not only their ids.
    (row,) = store.reader().execute(
        "SELECT id, received_ns, verdict_pb, analyst_label, analyst_note, analyst_author, analyst_labeled_ns"
        " FROM verdicts WHERE id = ?",
        (everything[0],),
    ) if everything else [None]  # fmt: skip
    if row is not None:
        assert first.verdicts[0] == stored_verdict(*row)


@pytest.mark.parametrize(
    ("start_min", "end_min", "time_field"),
    [
        (80, None, q.TIME_FIELD_SCORED),  # recent: ids walked down
        (10, 11.5, q.TIME_FIELD_SCORED),  # old and narrow: the time index
        (None, 30, q.TIME_FIELD_SCORED),
        (45, 60, q.TIME_FIELD_FLOW),  # the flow-time index is per minute
        (None, None, q.TIME_FIELD_FLOW),
        (0, 200, q.TIME_FIELD_RECEIVED),
    ],
)
def test_time_range_plans_page_like_the_plain_statement(
    store: VerdictStore, start_min: float | None, end_min: float | None, time_field: q.TimeField.ValueType
) -> None:
    flt = _window(start_min, end_min, time_field=time_field)
    if time_field == q.TIME_FIELD_RECEIVED:
        flt.time_range.Clear()
    if (start_min, end_min) == (80, None):
        assert not store._time_index_pays(store.reader(), flt)
    if (start_min, end_min) == (10, 11.5):
        assert store._time_index_pays(store.reader(), flt)
    assert _pages(store, flt, 113) == _plain(store, flt, 10**9)
    with_label = _window(start_min, end_min, time_field=time_field, labels=["attack"])
    assert _pages(store, with_label, 50) == _plain(store, with_label, 10**9)


def _raw_aggregate(
    store: VerdictStore, flt: q.VerdictFilter, group_by: list[Any], bucket_ns: int
) -> list[q.AggregateRow]:
    rows = store._aggregate_raw(store.reader(), flt, [_GROUP_COLUMNS[g] for g in group_by], bucket_ns)
    return [store._aggregate_row(values, len(group_by) + 1) for values in rows]


AGGREGATES = [
    (_window(30.5, 75.25), [q.GROUP_BY_LABEL], 0),
    (_window(30.5, 75.25, agent_ids=["agent-a", "agent-b"]), [q.GROUP_BY_AGENT, q.GROUP_BY_LABEL], 0),
    (_window(None, 44.9, labels=["attack"]), [q.GROUP_BY_MODEL], 10 * 60 * 10**9),
    (_window(12, None, model_id="m"), [], 60 * 10**9),
    (_window(0.2, 0.7), [q.GROUP_BY_LABEL], 0),  # inside one minute: raw rows only
    (q.VerdictFilter(), [q.GROUP_BY_AGENT], 0),
]


@pytest.mark.parametrize(("flt", "group_by", "bucket_ns"), AGGREGATES)
def test_aggregates_from_rollups_equal_the_raw_rows(
    store: VerdictStore, flt: q.VerdictFilter, group_by: list[Any], bucket_ns: int
) -> None:
    assert store._rollup_minutes(store.reader(), flt, group_by, bucket_ns) is not None or (
        flt.time_range.end_time.ToMilliseconds() - flt.time_range.start_time.ToMilliseconds() < MINUTE_MS
    )
    expected = _raw_aggregate(store, flt, group_by, bucket_ns)
    assert sum(r.verdicts for r in expected) > 0
    assert store.aggregate(flt, group_by, bucket_ns) == expected


def test_filters_the_rollups_do_not_keep_are_answered_from_raw_rows(store: VerdictStore) -> None:
    for flt, group_by in (
        (_window(30, 60, anomalous=True), [q.GROUP_BY_LABEL]),
        (_window(30, 60, src_ip="10.0.0.1"), [q.GROUP_BY_LABEL]),
        (_window(30, 60), [q.GROUP_BY_ANOMALOUS]),
        (_window(30, 60, time_field=q.TIME_FIELD_FLOW), [q.GROUP_BY_LABEL]),
    ):
        assert store._rollup_minutes(store.reader(), flt, group_by, 0) is None
        assert store.aggregate(flt, group_by) == _raw_aggregate(store, flt, group_by, 0)


def test_after_retention_rollups_stand_only_for_minutes_with_all_their_raw_rows(tmp_path: Path) -> None:
    store = VerdictStore(tmp_path / "r.db")
    store.ingest("agent-1", [make_verdict(s, scored_ms=BASE_MS + s * 7_000) for s in range(1, 101)])
    # Sequence 30 (scored at 210 s, minute 3) and older go.
    assert store.retain(max_rows=70) == 30
    flt = _window(0, 12)
    assert store._rollup_minutes(store.reader(), flt, [q.GROUP_BY_LABEL], 0) == (
        (BASE_MS + 4 * MINUTE_MS) * 10**6,
        (BASE_MS + 12 * MINUTE_MS) * 10**6,
    )
    (row,) = store.aggregate(flt, [q.GROUP_BY_LABEL])
    assert row.verdicts == 70 == _raw_aggregate(store, flt, [q.GROUP_BY_LABEL], 0)[0].verdicts
    # Rollups themselves keep every verdict ever stored.
    assert sum(r.verdicts for r in store.aggregate_rollups(flt, [])) == 100


def test_top_talkers_count_both_ends_of_each_flow(store: VerdictStore) -> None:
    flt = _window(20, 50)
    where, params = filter_sql(flt)
    counts: dict[str, list[int]] = {}
    for src, dst, total, anomalous in store.reader().execute(
        "SELECT src_ip, dst_ip, bytes, anomalous FROM verdicts WHERE " + " AND ".join(where), params
    ):
        for ip in (src, dst):
            c = counts.setdefault(ip, [0, 0, 0])
            c[0] += 1
            c[1] += total
            c[2] += anomalous
    expected = sorted(counts.items(), key=lambda kv: (-kv[1][0], kv[0]))[:5]
    exact = store.top_talkers(flt, q.TALKER_METRIC_FLOWS, 5, exact=True)
    assert [(t.ip, [t.flows, t.bytes, t.anomalies]) for t in exact.talkers] == expected
    assert not exact.approximate
    # From the summary: each count within its bound of the truth.
    for t in store.top_talkers(flt, q.TALKER_METRIC_FLOWS, 5).talkers:
        truth = counts[t.ip]
        assert t.flows <= truth[0] <= t.flows + t.flows_error
        assert t.bytes <= truth[1] <= t.bytes + t.bytes_error
        assert t.anomalies <= truth[2] <= t.anomalies + t.anomalies_error


def test_top_anomalies_seek_each_models_best_on_one_index(store: VerdictStore) -> None:
    """Every statement ListTopAnomalies runs searches the (model, version, score) index of anomalous
    verdicts: no scan of the anomalous rows, no sort of them (10M verdicts hold ~200k)."""
    conn = store._reader()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        top = store.top_anomalies(q.VerdictFilter(), 5)
    finally:
        conn.set_trace_callback(None)
    assert len(top) == 5
    assert statements
    for statement in statements:
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement))
        assert "USING INDEX verdicts_anomaly_model_score" in plan, (statement, plan)
        assert "TEMP B-TREE" not in plan, (statement, plan)


@pytest.mark.parametrize(
    "flt",
    [
        _window(30, 60, agent_ids=["agent-a"]),
        _window(0, 90, agent_ids=["agent-b", "agent-c"]),
        _window(None, 45, agent_ids=["agent-c"], labels=["attack"]),
    ],
)
def test_top_anomalies_of_agents_over_a_time_range_read_their_flagged_verdicts(
    store: VerdictStore, flt: q.VerdictFilter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agents and a scored-time range: the agent / time index of anomalous verdicts, then a sort
    (walking each model's best by score until enough match cost 117 ms at p50 on 10M verdicts);
    the same answer as that walk."""
    conn = store._reader()
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        top = [v.id for v in store.top_anomalies(flt, 7)]
    finally:
        conn.set_trace_callback(None)
    ranked = [s for s in statements if "ORDER BY score DESC" in s]
    assert ranked
    for statement in ranked:
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement))
        assert "USING INDEX verdicts_anomaly_agent_time (agent_id=? AND scored_ns" in plan, plan
    monkeypatch.setattr(store_module, "_AGENT_ANOMALIES_READ", 0)  # too many: each model's best by score
    assert [v.id for v in store.top_anomalies(flt, 7)] == top
    assert len(top) == 7
