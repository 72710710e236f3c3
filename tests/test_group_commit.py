"""Group commit: batches of several streams share a transaction, each acknowledged only once it is
durable; resends and reused sequences inside one group; live subscribers get batched messages, in
id order, none lost."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from auris.collector.client import CollectorClient, verdict_filter
from auris.collector.ingest import GroupCommitter
from auris.collector.services import validate_batch
from auris.collector.store import IngestBatch, IngestResult, SequenceConflict, VerdictStore, verdict_row
from auris.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
    verdict_pb2,
)
from tests.conftest import make_verdict, running_collector, wait_for

SCORED_MS = 1_700_000_000_000
T = TypeVar("T")


def _batch(agent_id: str, sequences: range, **fields: object) -> IngestBatch:
    verdicts = [make_verdict(s, agent_id=agent_id, scored_ms=SCORED_MS, **fields) for s in sequences]  # type: ignore[arg-type]
    return IngestBatch(agent_id, verdicts, [verdict_row(v, 1_000) for v in verdicts], 1_000)


def _stored(path: Path, agent_id: str) -> list[int]:
    """Sequences another connection sees: what is committed."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT sequence FROM verdicts WHERE agent_id = ? ORDER BY sequence", (agent_id,))
        return [row[0] for row in rows]


def test_batches_of_concurrent_streams_share_a_commit_and_are_acknowledged_once_durable(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.db"
    store = VerdictStore(path)
    writer = ThreadPoolExecutor(max_workers=1)
    committed: list[list[tuple[IngestBatch, IngestResult]]] = []
    durable_at_ack: dict[str, list[int]] = {}

    async def stream(committer: GroupCommitter, agent_id: str) -> list[IngestResult]:
        results = []
        for first in (1, 11):
            results.append(await committer.ingest(_batch(agent_id, range(first, first + 10))))
            # Acknowledged: a reader elsewhere must already see the batch.
            durable_at_ack.setdefault(agent_id, []).extend(_stored(path, agent_id)[-10:])
        return results

    async def main() -> list[list[IngestResult]]:
        committer = GroupCommitter(store, writer, committed.append)
        results = await asyncio.gather(*(stream(committer, f"agent-{n}") for n in range(6)))
        await asyncio.sleep(0)  # the committed callback runs after the acknowledgements
        assert (committer.groups, committer.batches) == (2, 12)  # six streams, two rounds
        return results

    try:
        results = asyncio.run(main())
    finally:
        writer.shutdown()
    for n, (first, second) in enumerate(results):
        assert (first.accepted, second.accepted) == (10, 10)
        assert durable_at_ack[f"agent-{n}"] == list(range(1, 21))
    # Ids in commit order, each group's verdicts handed on once, after its commit.
    ids = [i for group in committed for _, result in group for i in result.stored_ids]
    assert ids == list(range(1, 121))
    assert [len(group) for group in committed] == [6, 6]
    assert store.count() == 120


def test_resends_and_reused_sequences_within_one_group(tmp_path: Path) -> None:
    store = VerdictStore(tmp_path / "r.db")
    store.ingest("a", [make_verdict(s, agent_id="a", scored_ms=SCORED_MS) for s in range(1, 4)])
    outcomes = store.ingest_group(
        [
            _batch("a", range(3, 7)),  # 3 is a resend of a stored verdict
            _batch("b", range(1, 4)),
            _batch("a", range(5, 9)),  # 5 and 6 resend the first batch of this very group
            _batch("b", range(3, 5), dst_port=22),  # 3 again, but another verdict
            _batch("c", range(1, 3)),
        ]
    )
    a1, b1, a2, b2, c1 = outcomes
    assert isinstance(a1, IngestResult)
    assert isinstance(a2, IngestResult)
    assert isinstance(b1, IngestResult)
    assert isinstance(b2, SequenceConflict)
    assert isinstance(c1, IngestResult)
    assert [(r.accepted, r.duplicates) for r in (a1, b1, a2, c1)] == [(3, 1), (3, 0), (2, 2), (2, 0)]
    assert b2.stored_sequence == 3  # b's first batch, committed with this group
    assert c1.stored_ids == [a2.stored_ids[-1] + 1, a2.stored_ids[-1] + 2]
    assert _stored(store.path, "a") == list(range(1, 9))
    assert _stored(store.path, "b") == [1, 2, 3]  # the refused batch wrote nothing
    assert {row[0]: row[1] for row in store.db.execute("SELECT agent_id, verdicts_stored FROM agents")} == {
        "a": 8,
        "b": 3,
        "c": 2,
    }
    # Every stored verdict counted once in the rollups.
    assert sum(r.verdicts for r in store.aggregate_rollups(query_service_pb2.VerdictFilter(), [])) == 13


def test_validate_batch_builds_the_rows_verdict_row_builds() -> None:
    verdicts = [make_verdict(s, src_ip="2001:DB8:0::7", dst_ip="192.0.2.1") for s in range(1, 4)]
    verdicts[1].ClearField("agent_id")
    verdicts[2].scores.add(model=verdicts[2].model, score=0.99)  # the first match decides
    request = agent_service_pb2.StreamVerdictsRequest(agent_id="agent-1", verdicts=verdicts)
    top, rows = validate_batch(request, 0, 123)
    assert top == 3
    assert rows == [verdict_row(v, 123) for v in request.verdicts]
    assert {row[3] for row in rows} == {"2001:db8::7"}


def _read(stream: Iterator[T], into: list[T]) -> None:
    """Collect a subscription until it is cancelled (or the channel closes)."""
    try:
        for item in stream:
            into.append(item)
    except grpc.RpcError:
        pass


def test_subscribers_get_batched_messages_in_id_order_with_none_lost(tmp_path: Path) -> None:
    agents, batches, size = 4, 10, 50
    with (
        running_collector(tmp_path / "s.db") as running,
        CollectorClient(running.address, insecure=True) as client,
    ):
        query = query_service_pb2_grpc.QueryServiceStub(client.channel)
        batched = query.SubscribeVerdicts(
            query_service_pb2.SubscribeVerdictsRequest(filter=verdict_filter(), max_batch=64)
        )
        single = query.SubscribeVerdicts(
            query_service_pb2.SubscribeVerdictsRequest(filter=verdict_filter(anomalous=True))
        )
        anomalous: list[verdict_pb2.StoredVerdict] = []
        via_client: list[verdict_pb2.StoredVerdict] = []
        messages: list[query_service_pb2.SubscribeVerdictsResponse] = []
        threads = [
            threading.Thread(target=_read, args=(batched, messages), daemon=True),
            threading.Thread(target=_read, args=((r.verdict for r in single), anomalous), daemon=True),
            threading.Thread(
                target=_read,
                args=(client.subscribe(verdict_filter(labels=["attack"])), via_client),
                daemon=True,
            ),
        ]
        for thread in threads:
            thread.start()
        assert running.collector is not None
        assert wait_for(lambda: running.collector.broker.subscribers == 3, 10)  # type: ignore[union-attr]

        def agent(n: int) -> None:
            stub = agent_service_pb2_grpc.AgentServiceStub(client.channel)
            requests = [
                agent_service_pb2.StreamVerdictsRequest(
                    agent_id=f"agent-{n}",
                    verdicts=[
                        make_verdict(
                            s,
                            agent_id=f"agent-{n}",
                            anomalous=s % 7 == 0,
                            label="attack" if s % 5 else "benign",
                        )
                        for s in range(b * size + 1, (b + 1) * size + 1)
                    ],
                )
                for b in range(batches)
            ]
            list(stub.StreamVerdicts(iter(requests)))

        senders = [threading.Thread(target=agent, args=(n,)) for n in range(agents)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(60)
        total = agents * batches * size
        assert wait_for(lambda: sum(len(m.verdicts) for m in messages) == total, 30)
        assert wait_for(lambda: len(anomalous) == agents * (batches * size // 7), 30)
        assert wait_for(lambda: len(via_client) == total - total // 5, 30)
        batched.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leave it untyped
        single.cancel()  # type: ignore[no-untyped-call]
        everything = [v for m in messages for v in m.verdicts]
        assert all(not m.HasField("verdict") and 1 <= len(m.verdicts) <= 64 for m in messages)
        assert len(messages) < total  # batched: fewer messages than verdicts
        assert [v.id for v in everything] == list(range(1, total + 1))
        # What a query returns for the same ids, analyst label and all.
        stored = {v.id: v for v in client.query(verdict_filter())}
        assert all(v == stored[v.id] for v in everything)
        assert all(v == stored[v.id] for v in anomalous)  # one a message (max_batch 0), as before
        assert [v.id for v in anomalous] == [v.id for v in everything if v.verdict.anomalous]
        assert [v.id for v in via_client] == [v.id for v in everything if v.verdict.label == "attack"]


def test_a_subscriber_asking_for_huge_batches_gets_the_page_cap(tmp_path: Path) -> None:
    with (
        running_collector(tmp_path / "c.db", max_page_size=10) as running,
        CollectorClient(running.address, insecure=True) as client,
    ):
        call = query_service_pb2_grpc.QueryServiceStub(client.channel).SubscribeVerdicts(
            query_service_pb2.SubscribeVerdictsRequest(filter=verdict_filter(), max_batch=10_000)
        )
        assert running.collector is not None
        assert wait_for(lambda: running.collector.broker.active, 10)  # type: ignore[union-attr]
        stub = agent_service_pb2_grpc.AgentServiceStub(client.channel)
        request = agent_service_pb2.StreamVerdictsRequest(
            agent_id="agent-1", verdicts=[make_verdict(s) for s in range(1, 26)]
        )
        list(stub.StreamVerdicts(iter([request])))
        sizes: list[int] = []

        def read() -> None:
            for message in call:
                sizes.append(len(message.verdicts))
                if sum(sizes) == 25:
                    call.cancel()  # type: ignore[no-untyped-call]

        with pytest.raises(grpc.RpcError) as cancelled:
            read()
        assert cancelled.value.code() == grpc.StatusCode.CANCELLED
        assert sizes == [10, 10, 5]


def test_a_subscription_can_also_be_followed_one_item_at_a_time() -> None:
    from auris.collector.broker import Broker

    async def main() -> None:
        broker: Broker[int] = Broker(buffer=4, max_subscribers=2)
        odd = broker.subscribe(lambda n: n % 2 == 1)
        everything = broker.subscribe(lambda n: True)
        broker.publish([1, 2, 3])
        broker.publish([4, 5])
        assert odd.queue.maxsize == 4
        assert [await odd.queue.get() for _ in range(3)] == [1, 3, 5]
        assert everything.overflowed.is_set()  # 5 items for a buffer of 4: cut off
        assert broker.subscribers == 1
        later = asyncio.create_task(odd.queue.get())
        await asyncio.sleep(0)
        broker.publish([7, 8])
        assert await later == 7

    asyncio.run(main())
