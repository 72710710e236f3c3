"""Live subscriptions on a real collector: filtered fan-out, and slow subscribers cut off, not obeyed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from auris.collector.broker import matches
from auris.collector.client import CollectorClient, verdict_filter
from auris.collector.config import CollectorConfig
from auris.collector.store import VerdictStore
from auris.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
    verdict_pb2,
)
from tests.conftest import CollectorThread, make_verdict, running_collector, wait_for


def _send(
    client: CollectorClient, *verdicts: verdict_pb2.Verdict
) -> list[agent_service_pb2.StreamVerdictsResponse]:
    stub = agent_service_pb2_grpc.AgentServiceStub(client.channel)
    request = agent_service_pb2.StreamVerdictsRequest(agent_id="agent-1", verdicts=verdicts)
    return list(stub.StreamVerdicts(iter([request])))


def _collect(
    client: CollectorClient, flt: query_service_pb2.VerdictFilter, into: list[verdict_pb2.StoredVerdict]
) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for stored in client.subscribe(flt):
                into.append(stored)
        except grpc.RpcError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_subscribers_get_new_matching_verdicts(collector: CollectorThread, client: CollectorClient) -> None:
    _send(client, make_verdict(1, anomalous=True))  # before the subscription: not delivered
    assert collector.collector is not None
    anomalous: list[verdict_pb2.StoredVerdict] = []
    everything: list[verdict_pb2.StoredVerdict] = []
    _collect(client, verdict_filter(anomalous=True), anomalous)
    _collect(client, verdict_filter(), everything)
    assert wait_for(lambda: collector.collector.broker.subscribers == 2, 10)  # type: ignore[union-attr]
    _send(client, make_verdict(2), make_verdict(3, anomalous=True, label="attack"), make_verdict(4))
    assert wait_for(lambda: len(everything) == 3 and len(anomalous) == 1, 10)
    assert [s.verdict.sequence for s in everything] == [2, 3, 4]
    assert anomalous[0].verdict.sequence == 3
    assert anomalous[0].id == everything[1].id  # the stored id, as a query would show it


@pytest.fixture
def small_buffer(tmp_path: Path) -> Iterator[CollectorThread]:
    with running_collector(tmp_path / "s.db", subscriber_buffer=5, max_subscribers=1) as running:
        yield running


def test_a_slow_subscriber_is_cut_off_and_ingest_does_not_wait(small_buffer: CollectorThread) -> None:
    with CollectorClient(small_buffer.address, insecure=True) as client:
        # A subscriber that never reads its stream.
        call = query_service_pb2_grpc.QueryServiceStub(client.channel).SubscribeVerdicts(
            query_service_pb2.SubscribeVerdictsRequest(filter=verdict_filter())
        )
        assert small_buffer.collector is not None
        assert wait_for(lambda: small_buffer.collector.broker.active, 10)  # type: ignore[union-attr]
        # Only one subscriber is served.
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(client.subscribe(verdict_filter())))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        started = time.monotonic()
        acks = _send(client, *(make_verdict(s) for s in range(1, 201)))
        assert acks[-1].acknowledged_sequence == 200
        assert time.monotonic() - started < 5
        with pytest.raises(grpc.RpcError) as cut:
            for _ in call:
                pass
        assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "subscriber too slow" in (cut.value.details() or "")
        assert len(list(client.query(verdict_filter()))) == 200


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"anomalous": True},
        {"anomalous": False},
        {"dst_port": 22},
        {"ip": "192.0.2.7"},
        {"dst_ip": "2001:db8::1"},
        {"agent_ids": ["agent-2"]},
        {"labels": ["attack"]},
        {"min_score": 0.5, "max_score": 0.7},
        {"model_id": "m"},
        {"hostnames": ["host-1"]},
    ],
)
def test_the_subscription_filter_agrees_with_the_query_filter(
    tmp_path: Path, fields: dict[str, object]
) -> None:
    store = VerdictStore(tmp_path / "f.db")
    store.ingest(
        "agent-1",
        [
            make_verdict(1, dst_port=22, label="attack", anomalous=True, score=0.9),
            make_verdict(2, dst_port=443, score=0.2),
            make_verdict(3, src_ip="192.0.2.7", dst_port=53, score=0.6, anomalous=True, label="attack"),
        ],
    )
    store.ingest("agent-2", [make_verdict(1, agent_id="agent-2", dst_ip="2001:db8::1")])
    flt = query_service_pb2.VerdictFilter(**fields)  # type: ignore[arg-type]
    everything = store.query(query_service_pb2.VerdictFilter(), 100, "").verdicts
    by_sql = {v.id for v in store.query(flt, 100, "").verdicts}
    by_broker = {v.id for v in everything if matches(flt, v)}
    assert by_broker == by_sql


def test_aurisctl_verdicts_tail(tmp_path: Path) -> None:
    import io
    import json

    from auris.collector import ctl

    running = CollectorThread(CollectorConfig(listen="127.0.0.1:0", insecure=True, db=str(tmp_path / "t.db")))
    running.start()
    out = io.StringIO()
    codes: list[int] = []
    args = ["--collector", running.address, "--insecure", "verdicts", "tail", "--anomalous", "--json"]
    tail = threading.Thread(target=lambda: codes.append(ctl.main(args, out)), daemon=True)
    tail.start()
    try:
        assert running.collector is not None
        assert wait_for(lambda: running.collector.broker.subscribers == 1, 10)  # type: ignore[union-attr]
        with CollectorClient(running.address, insecure=True) as client:
            _send(client, make_verdict(1), make_verdict(2, anomalous=True), make_verdict(3, anomalous=True))
        assert wait_for(lambda: len(out.getvalue().splitlines()) == 2, 10)
        assert [json.loads(line)["verdict"]["sequence"] for line in out.getvalue().splitlines()] == ["2", "3"]
    finally:
        running.stop()
    tail.join(30)
    assert codes == [3]  # the collector went away: unreachable, one line on stderr
