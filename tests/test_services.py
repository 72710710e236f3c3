"""The collector's RPCs on a real server: acknowledgements, refusals and their statuses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from auris.collector.client import CollectorClient, verdict_filter
from auris.v1 import agent_service_pb2, agent_service_pb2_grpc, model_pb2, query_service_pb2, verdict_pb2
from tests.conftest import CollectorThread, make_verdict, running_collector


def _request(
    *verdicts: verdict_pb2.Verdict, agent_id: str = "agent-1"
) -> agent_service_pb2.StreamVerdictsRequest:
    return agent_service_pb2.StreamVerdictsRequest(agent_id=agent_id, verdicts=verdicts)


@pytest.fixture
def agent_stub(client: CollectorClient) -> agent_service_pb2_grpc.AgentServiceStub:
    return agent_service_pb2_grpc.AgentServiceStub(client.channel)


def test_each_batch_is_acknowledged_and_resends_are_stored_once(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub, client: CollectorClient
) -> None:
    batches = [_request(*(make_verdict(s) for s in range(i, i + 5))) for i in (1, 6, 11)]
    acks = list(agent_stub.StreamVerdicts(iter(batches)))
    assert [a.acknowledged_sequence for a in acks] == [5, 10, 15]
    assert [a.accepted for a in acks] == [5, 5, 5]
    # A reconnecting agent resends what it had not seen acknowledged.
    acks = list(agent_stub.StreamVerdicts(iter(batches[1:])))
    assert [(a.accepted, a.duplicates) for a in acks] == [(0, 5), (0, 5)]
    assert len(list(client.query(verdict_filter()))) == 15


def test_a_malformed_verdict_refuses_its_batch_and_keeps_the_rest(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub, client: CollectorClient
) -> None:
    good = _request(*(make_verdict(s) for s in range(1, 4)))
    bad_verdict = make_verdict(5)
    bad_verdict.flow.src_ip = "999.1.1.1"
    bad = _request(make_verdict(4), bad_verdict)
    responses: Iterator[agent_service_pb2.StreamVerdictsResponse] = iter(
        agent_stub.StreamVerdicts(iter([good, bad]))
    )
    assert next(responses).acknowledged_sequence == 3
    with pytest.raises(grpc.RpcError) as caught:
        next(responses)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "verdict 1: src_ip '999.1.1.1' is not an IP address"
    assert sorted(s.verdict.sequence for s in client.query(verdict_filter())) == [1, 2, 3]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (_request(make_verdict(2), make_verdict(2)), "verdict 1: sequence 2 does not increase"),
        (_request(make_verdict(1), agent_id=""), "agent_id must be"),
        (_request(make_verdict(1, agent_id="other")), "differs from the stream's"),
    ],
)
def test_invalid_batches(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub,
    request_: agent_service_pb2.StreamVerdictsRequest,
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(agent_stub.StreamVerdicts(iter([request_])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")


@pytest.fixture
def small_collector(tmp_path: Path) -> Iterator[CollectorThread]:
    with running_collector(tmp_path / "small.db", max_message_mib=1, max_page_size=5) as running:
        yield running


def test_oversize_message_and_page_cap(small_collector: CollectorThread) -> None:
    with CollectorClient(small_collector.address, insecure=True) as c:
        stub = agent_service_pb2_grpc.AgentServiceStub(c.channel)
        huge = make_verdict(1)
        huge.explanation = "x" * (2 * 1024 * 1024)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.StreamVerdicts(iter([_request(huge)])))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        list(stub.StreamVerdicts(iter([_request(*(make_verdict(s) for s in range(1, 13)))])))
        page = c.query_page(query_service_pb2.VerdictFilter(), page_size=1000)
        assert len(page.verdicts) == 5
        assert len(list(c.query(query_service_pb2.VerdictFilter(), page_size=1000))) == 12


def test_query_errors_map_to_statuses(client: CollectorClient) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.query_page(query_service_pb2.VerdictFilter(), page_token="garbage")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (caught.value.details() or "")


def test_model_watch_answers_at_once_and_enrollment_needs_a_ca_key(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub,
) -> None:
    # No model registered: the wanted set is empty (the agent keeps its own models).
    watch = agent_stub.WatchModelUpdates(agent_service_pb2.WatchModelUpdatesRequest(agent_id="agent-1"))
    assert list(next(iter(watch)).desired_models) == []
    watch.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
    with pytest.raises(grpc.RpcError) as caught:
        list(
            agent_stub.DownloadModel(
                agent_service_pb2.DownloadModelRequest(model=model_pb2.ModelRef(model_id="nope"))
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Enrollment needs the CA's key, which this collector was not given.
    with pytest.raises(grpc.RpcError) as caught:
        agent_stub.Enroll(agent_service_pb2.EnrollRequest(token="t"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _trailing(exc: grpc.RpcError) -> dict[str, str]:
    assert isinstance(exc, grpc.Call)
    return {str(k): str(v) for k, v in (exc.trailing_metadata() or ())}


def test_refusals_name_the_batch_only_when_a_verdict_is_at_fault(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub,
) -> None:
    huge = make_verdict(7)
    huge.counters.src_to_dst_bytes = 2**63 + 1  # past what SQLite can hold
    with pytest.raises(grpc.RpcError) as caught:
        list(agent_stub.StreamVerdicts(iter([_request(make_verdict(6), huge)])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "verdict 1: a counter is out of range" in (caught.value.details() or "")
    assert _trailing(caught.value)["auris-rejected-sequence"] == "7"

    far = make_verdict(8)
    far.scored_time.seconds = 10**13
    with pytest.raises(grpc.RpcError) as caught:
        list(agent_stub.StreamVerdicts(iter([_request(far)])))
    assert "scored_time is out of range" in (caught.value.details() or "")

    with pytest.raises(grpc.RpcError) as caught:
        list(agent_stub.StreamVerdicts(iter([_request(make_verdict(9), agent_id="x" * 200)])))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "auris-rejected-sequence" not in _trailing(caught.value)  # the stream, not a batch


def test_a_reused_sequence_with_other_content_is_refused(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub, client: CollectorClient
) -> None:
    list(agent_stub.StreamVerdicts(iter([_request(make_verdict(1), make_verdict(2))])))
    impostor = make_verdict(2, dst_port=8080)
    with pytest.raises(grpc.RpcError) as caught:
        list(agent_stub.StreamVerdicts(iter([_request(impostor, make_verdict(3))])))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "reused sequence 2" in (caught.value.details() or "")
    stored = list(client.query(verdict_filter()))
    assert sorted(s.verdict.sequence for s in stored) == [1, 2]  # the whole batch was refused
    assert {s.verdict.flow.dst_port for s in stored} == {443}


def test_addresses_are_stored_and_matched_canonically(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub, client: CollectorClient
) -> None:
    list(agent_stub.StreamVerdicts(iter([_request(make_verdict(1, src_ip="2001:DB8:0:0::1"))])))
    (stored,) = client.query(verdict_filter())
    assert stored.verdict.flow.src_ip == "2001:db8::1"
    flt = query_service_pb2.VerdictFilter(ip="2001:0db8::0001")
    assert len(list(client.query(flt))) == 1
    with pytest.raises(grpc.RpcError) as caught:
        client.query_page(query_service_pb2.VerdictFilter(ip="not-an-ip"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_analysts_label_verdicts_and_the_label_is_stored(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub, client: CollectorClient, collector: CollectorThread
) -> None:
    import io

    from auris.collector import ctl

    list(agent_stub.StreamVerdicts(iter([_request(*(make_verdict(s) for s in (1, 2, 3)))])))
    ids = sorted(s.id for s in client.query(verdict_filter()))
    assert client.label(ids[:2], "attack", note="port scan, confirmed", author="ana") == 2
    by_id = {s.id: s for s in client.query(verdict_filter())}
    assert by_id[ids[0]].analyst_label.label == "attack"
    assert by_id[ids[0]].analyst_label.note == "port scan, confirmed"
    assert by_id[ids[0]].analyst_label.author == "ana"
    assert by_id[ids[0]].analyst_label.HasField("labeled_time")
    assert not by_id[ids[2]].HasField("analyst_label")
    # Through aurisctl: an unknown id makes the exit status say so.
    out = io.StringIO()
    args = [
        "--collector",
        collector.address,
        "--insecure",
        "verdicts",
        "label",
        str(ids[2]),
        "999999",
        "--as",
        "benign",
    ]
    assert ctl.main(args, out) == 1
    assert out.getvalue().strip() == "labeled 1 of 2 verdict(s) as benign"
    with pytest.raises(grpc.RpcError) as caught:
        client.label(ids, "")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_aggregates_and_top_talkers(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub, client: CollectorClient, collector: CollectorThread
) -> None:
    import datetime as dt
    import io
    import json

    from auris.collector import ctl

    base = 1_789_999_980_000  # ms, on a minute boundary (29,833,333 minutes)
    verdicts = [
        make_verdict(1, src_ip="10.0.0.5", label="attack", anomalous=True, scored_ms=base + 1_000),
        make_verdict(2, src_ip="10.0.0.5", label="attack", anomalous=True, scored_ms=base + 2_000),
        make_verdict(3, src_ip="10.0.0.9", scored_ms=base + 61_000),
        make_verdict(4, src_ip="10.0.0.9", scored_ms=base + 62_000),
        make_verdict(5, src_ip="10.0.0.9", scored_ms=base + 63_000),
    ]
    list(agent_stub.StreamVerdicts(iter([_request(*verdicts)])))

    rows = client.aggregate(verdict_filter(), [query_service_pb2.GROUP_BY_LABEL])
    assert {(r.group_values[0], r.verdicts, r.anomalies) for r in rows} == {
        ("attack", 2, 2),
        ("benign", 3, 0),
    }
    assert sum(r.bytes for r in rows) == 5 * 500  # make_verdict: 300 + 200 bytes each
    per_minute = client.aggregate(verdict_filter(), [], dt.timedelta(minutes=1))
    assert [(r.bucket_start_time.ToMilliseconds(), r.verdicts) for r in per_minute] == [
        (base, 2),
        (base + 60_000, 3),
    ]

    by_anomalies = client.top_talkers(verdict_filter(), query_service_pb2.TALKER_METRIC_ANOMALIES, 2)
    # Both ends of the two anomalous flows, ties broken by address.
    assert [(t.ip, t.anomalies) for t in by_anomalies] == [("10.0.0.2", 2), ("10.0.0.5", 2)]
    by_flows = client.top_talkers(verdict_filter(), query_service_pb2.TALKER_METRIC_FLOWS, 3)
    # 10.0.0.2 is the destination of all five flows; each end of a flow counts for its address.
    assert [(t.ip, t.flows) for t in by_flows] == [("10.0.0.2", 5), ("10.0.0.9", 3), ("10.0.0.5", 2)]

    out = io.StringIO()
    args = [
        "--collector",
        collector.address,
        "--insecure",
        "stats",
        "--by",
        "label",
        "--by",
        "anomalous",
        "--json",
    ]
    assert ctl.main(args, out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted((x["group_values"][0], x["group_values"][1], int(x["verdicts"])) for x in lines) == [
        ("attack", "1", 2),
        ("benign", "0", 3),
    ]
    out = io.StringIO()
    assert ctl.main(["--collector", collector.address, "--insecure", "talkers", "--by", "flows"], out) == 0
    assert out.getvalue().splitlines()[1].split()[:2] == ["10.0.0.2", "5"]
    with pytest.raises(grpc.RpcError) as caught:
        client.aggregate(verdict_filter(), [query_service_pb2.GROUP_BY_UNSPECIFIED])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_aurisctl_exports_verdicts(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub,
    collector: CollectorThread,
    tmp_path: Path,
    suffix: str,
) -> None:
    import csv
    import io
    import json

    from auris.collector import ctl
    from auris.collector.client import EXPORT_COLUMNS

    verdicts = [
        make_verdict(s, anomalous=s % 2 == 0, label="attack" if s % 2 == 0 else "benign")
        for s in range(1, 251)
    ]
    list(agent_stub.StreamVerdicts(iter([_request(*verdicts)])))
    out_file = tmp_path / f"anomalous{suffix}"
    args = [
        "--collector",
        collector.address,
        "--insecure",
        "verdicts",
        "export",
        "--anomalous",
        "--out",
        str(out_file),
    ]
    out = io.StringIO()
    assert ctl.main(args, out) == 0
    assert out.getvalue().strip() == f"exported 125 verdict(s) to {out_file}"  # all, not the listing's 100
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out_file.read_text().splitlines()]
        assert sorted(int(r["verdict"]["sequence"]) for r in rows) == list(range(2, 251, 2))
    else:
        if suffix == ".csv":
            with out_file.open(newline="") as fh:
                table = list(csv.DictReader(fh))
            assert list(table[0]) == list(EXPORT_COLUMNS)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(out_file).to_pylist()
            assert list(table[0]) == list(EXPORT_COLUMNS)
        assert sorted(int(r["sequence"]) for r in table) == list(range(2, 251, 2))
        assert {str(r["label"]) for r in table} == {"attack"}
        assert {r["dst_port"] for r in table} in ({443}, {"443"})


def test_the_collector_applies_retention_and_rollups_keep_the_counts(tmp_path: Path) -> None:
    import io

    from auris.collector import ctl
    from tests.conftest import wait_for

    with (
        running_collector(tmp_path / "r.db", retention_max_rows=5, retention_interval_s=0.2) as running,
        CollectorClient(running.address, insecure=True) as c,
    ):
        stub = agent_service_pb2_grpc.AgentServiceStub(c.channel)
        list(stub.StreamVerdicts(iter([_request(*(make_verdict(s) for s in range(1, 21)))])))
        assert wait_for(lambda: len(list(c.query(verdict_filter()))) == 5, 10)
        (rolled,) = c.aggregate(verdict_filter(), [], rollups=True)
        assert rolled.verdicts == 20
        out = io.StringIO()
        args = ["--collector", running.address, "--insecure", "stats", "--rollups", "--by", "agent"]
        assert ctl.main(args, out) == 0
        assert out.getvalue().splitlines()[1].split() == ["all", "agent-1", "20", "0", "100", "10000"]


def test_top_anomalies_rank_each_model_against_its_own_threshold(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub, client: CollectorClient
) -> None:
    """A classifier's probabilities (threshold 0.5) and an autoencoder's error ratios (threshold 8)
    are on different scales: ranked by raw score, every autoencoder verdict would come first."""

    def autoencoder_verdict(sequence: int, score: float) -> verdict_pb2.Verdict:
        v = make_verdict(sequence, anomalous=True, score=score, label="anomaly")
        v.model.CopyFrom(model_pb2.ModelRef(model_id="ae", version="2"))
        del v.scores[:]
        v.scores.add(
            model=v.model, kind=model_pb2.MODEL_KIND_AUTOENCODER, score=score, threshold=8.0, anomalous=True
        )
        return v

    verdicts = [
        autoencoder_verdict(1, 9.0),  # 1.125 x its threshold
        make_verdict(2, anomalous=True, score=0.99, label="attack"),  # 1.98 x
        autoencoder_verdict(3, 40.0),  # 5 x
        make_verdict(4, anomalous=True, score=0.6, label="attack"),  # 1.2 x
        make_verdict(5, anomalous=True, score=0.7, label="attack"),  # 1.4 x, by another version
    ]
    verdicts[-1].model.version = verdicts[-1].scores[0].model.version = "2"
    list(agent_stub.StreamVerdicts(iter([_request(*verdicts)])))
    assert [v.verdict.sequence for v in client.top_anomalies(verdict_filter(), 10)] == [3, 2, 5, 4, 1]
    assert [v.verdict.sequence for v in client.top_anomalies(verdict_filter(), 2)] == [3, 2]
    # One model's own ranking, as before.
    assert [v.verdict.sequence for v in client.top_anomalies(verdict_filter(model_id="ae"), 10)] == [3, 1]


def test_top_anomalies_rank_anomalous_verdicts_by_score(
    agent_stub: agent_service_pb2_grpc.AgentServiceStub, client: CollectorClient, collector: CollectorThread
) -> None:
    import io
    import json

    from auris.collector import ctl

    scores = {1: 0.7, 2: 0.99, 3: 0.2, 4: 0.95, 5: 0.99, 6: 0.8}
    verdicts = [make_verdict(s, anomalous=s != 3, score=score, label="attack") for s, score in scores.items()]
    verdicts.append(make_verdict(7, anomalous=False, score=1.0))  # the highest score, but not anomalous
    list(agent_stub.StreamVerdicts(iter([_request(*verdicts)])))
    top = client.top_anomalies(verdict_filter(), 3)
    # Highest first; the tie at 0.99 goes to the newer verdict.
    assert [v.verdict.sequence for v in top] == [5, 2, 4]
    assert [v.verdict.sequence for v in client.top_anomalies(verdict_filter(min_score=0.75), 10)] == [
        5,
        2,
        4,
        6,
    ]
    assert client.top_anomalies(verdict_filter(model_id="other"), 10) == []
    with pytest.raises(grpc.RpcError) as caught:
        client.top_anomalies(verdict_filter(anomalous=False))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    out = io.StringIO()
    assert ctl.main(["--collector", collector.address, "--insecure", "verdicts", "top", "--limit", "2",
                     "--json"], out) == 0  # fmt: skip
    assert [int(json.loads(line)["verdict"]["sequence"]) for line in out.getvalue().splitlines()] == [5, 2]


def test_concurrent_agent_streams_are_each_stored_exactly_once(tmp_path: Path) -> None:
    """Eight agents stream at once over their own channels, each resending its last batch;
    every verdict is stored once, acknowledgements only grow, and alerts count every stream."""
    import threading

    from auris.collector.alerts import AlertRule

    agents, batches, size = 8, 15, 40
    rule = AlertRule(name="per-agent", anomalous=True, group_by=("agent_id",))
    acks: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    with running_collector(tmp_path / "c.db", alert_rules=(rule,)) as running:

        def agent(n: int) -> None:
            agent_id = f"agent-{n}"
            try:
                with CollectorClient(running.address, insecure=True) as c:
                    stub = agent_service_pb2_grpc.AgentServiceStub(c.channel)
                    requests = [
                        _request(
                            *(
                                make_verdict(s, agent_id=agent_id, anomalous=s % 10 == 0)
                                for s in range(b * size + 1, (b + 1) * size + 1)
                            ),
                            agent_id=agent_id,
                        )
                        for b in range(batches)
                    ]
                    responses = list(stub.StreamVerdicts(iter(requests)))
                    responses += list(stub.StreamVerdicts(iter(requests[-1:])))  # a resend
                    acks[agent_id] = [r.acknowledged_sequence for r in responses]
            except BaseException as exc:  # reported below, on the main thread
                errors.append(exc)

        threads = [threading.Thread(target=agent, args=(n,)) for n in range(agents)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        with CollectorClient(running.address, insecure=True) as c:
            assert running.collector is not None
            assert running.collector.store.count() == agents * batches * size
            for agent_id, seen in acks.items():
                assert seen[:-1] == [size * (b + 1) for b in range(batches)]
                assert seen[-1] == batches * size
                stored = [v.verdict.sequence for v in c.query(verdict_filter(agent_ids=[agent_id]))]
                assert sorted(stored) == list(range(1, batches * size + 1))
            assert {a.agent_id: a.verdicts_stored for a in c.list_agents()} == {
                f"agent-{n}": batches * size for n in range(agents)
            }
            alerts = {a.key: a.events for a in c.alerts()}
            assert alerts == {f"agent_id=agent-{n}": batches * size // 10 for n in range(agents)}
