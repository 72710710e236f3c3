"""Packet capture in at the agent, verdicts out of the collector's query API."""

from __future__ import annotations

import collections
import csv
import datetime as dt
import io
import json
import threading
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from auris.collector import ctl
from auris.collector.client import CollectorClient, verdict_filter
from auris.collector.config import CollectorConfig
from auris.v1 import admin_service_pb2, query_service_pb2, verdict_pb2
from tests.conftest import PCAPS, CollectorThread, bare_nfstream, free_port, run_agent

FlowFacts = tuple[str, int, str, int, int, int, int, int, int, int, int]

ATTACK = PCAPS / "nmap_nmap_80_w_service_detection.pcap"
BENIGN = [PCAPS / "steam.pcap", PCAPS / "kerberos.pcap", PCAPS / "http_ipv6.pcap"]


def nfstream_reference(pcap: Path) -> collections.Counter[FlowFacts]:
    """What nfstream itself reports for a capture, with no Auris code involved."""
    return collections.Counter(
        (
            f.src_ip,
            f.src_port,
            f.dst_ip,
            f.dst_port,
            f.protocol,
            f.vlan_id,
            f.bidirectional_first_seen_ms,
            f.src2dst_packets,
            f.dst2src_packets,
            f.src2dst_bytes,
            f.dst2src_bytes,
        )
        for f in bare_nfstream(pcap, n_dissections=20, n_meters=1)
    )


def stored_facts(verdicts: list[verdict_pb2.StoredVerdict], source: str) -> collections.Counter[FlowFacts]:
    return collections.Counter(
        (
            s.verdict.flow.src_ip,
            s.verdict.flow.src_port,
            s.verdict.flow.dst_ip,
            s.verdict.flow.dst_port,
            s.verdict.flow.ip_protocol,
            s.verdict.flow.vlan_id,
            s.verdict.first_seen_time.ToMilliseconds(),
            s.verdict.counters.src_to_dst_packets,
            s.verdict.counters.dst_to_src_packets,
            s.verdict.counters.src_to_dst_bytes,
            s.verdict.counters.dst_to_src_bytes,
        )
        for s in verdicts
        if s.verdict.capture_source == source
    )


def test_capture_to_query(collector: CollectorThread, client: CollectorClient, tmp_path: Path) -> None:
    pcaps = [ATTACK, *BENIGN]
    done = run_agent(collector.address, pcaps, tmp_path / "agent")
    assert done.returncode == 0, done.stderr

    stored = list(client.query(verdict_filter(), page_size=7))  # small pages: exercise the cursor
    expected = {p.name: nfstream_reference(p) for p in pcaps}
    assert len(stored) == sum(sum(c.values()) for c in expected.values())
    for pcap in pcaps:
        assert stored_facts(stored, pcap.name) == expected[pcap.name], pcap.name

    agent_ids = {s.verdict.agent_id for s in stored}
    assert len(agent_ids) == 1
    sequences = sorted(s.verdict.sequence for s in stored)
    assert sequences == list(range(sequences[0], sequences[0] + len(stored)))
    for s in stored:
        assert sorted(m.model.model_id for m in s.verdict.scores) == ["nfstream-ae", "nfstream-rf"]
        assert s.verdict.anomalous == any(m.anomalous for m in s.verdict.scores)
        assert s.verdict.explanation

    # The shipped classifier flags most of an nmap service scan and most of these benign captures pass
    # (a verdict is anomalous when either default model says so).
    def share_anomalous(name: str) -> float:
        flows = [s for s in stored if s.verdict.capture_source == name]
        return sum(s.verdict.anomalous for s in flows) / len(flows)

    assert share_anomalous(ATTACK.name) > 0.5
    assert all(share_anomalous(p.name) < 0.5 for p in BENIGN)

    anomalous = list(client.query(verdict_filter(anomalous=True)))
    assert anomalous
    assert {s.id for s in anomalous} == {s.id for s in stored if s.verdict.anomalous}

    # The same through aurisctl, as an analyst would run it.
    out = io.StringIO()
    assert (
        ctl.main(
            ["--collector", collector.address, "--insecure", "verdicts", "--since", "1h", "--anomalous"], out
        )
        == 0
    )
    table = out.getvalue().splitlines()
    assert table[0].split()[:3] == ["ID", "LAST", "SEEN"]
    assert table[-1] == f"{len(anomalous)} verdict(s); * = anomalous"
    out = io.StringIO()
    args = [
        "--collector",
        collector.address,
        "--insecure",
        "verdicts",
        "--anomalous",
        "--json",
        "--limit",
        "0",
    ]
    assert ctl.main(args, out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted(int(x["id"]) for x in lines) == sorted(s.id for s in anomalous)
    assert all(x["verdict"]["anomalous"] for x in lines)


def test_flow_table_matches_golden_files(
    collector: CollectorThread, client: CollectorClient, tmp_path: Path
) -> None:
    """Per-flow packets and bytes equal the nfstream project's own golden files for these captures."""
    golden_dir = PCAPS.parent / "benign-expected"
    pcaps = sorted(p for p in PCAPS.iterdir() if (golden_dir / p.name).exists())
    assert len(pcaps) >= 5
    done = run_agent(collector.address, pcaps, tmp_path / "agent")
    assert done.returncode == 0, done.stderr
    stored = list(client.query(verdict_filter(), page_size=1000))
    for pcap in pcaps:
        with (golden_dir / pcap.name).open(newline="") as fh:
            golden = sorted(
                (int(r["bidirectional_packets"]), int(r["bidirectional_bytes"])) for r in csv.DictReader(fh)
            )
        ours = sorted(
            (
                s.verdict.counters.src_to_dst_packets + s.verdict.counters.dst_to_src_packets,
                s.verdict.counters.src_to_dst_bytes + s.verdict.counters.dst_to_src_bytes,
            )
            for s in stored
            if s.verdict.capture_source == pcap.name
        )
        assert ours == golden, pcap.name


def test_time_filters(collector: CollectorThread, client: CollectorClient, tmp_path: Path) -> None:
    assert run_agent(collector.address, [ATTACK], tmp_path / "agent").returncode == 0
    stored = list(client.query(verdict_filter()))
    assert stored
    # Scored just now: all of them are within the last hour, none in the future.
    now = dt.datetime.now(dt.UTC)
    hour_ago = now - dt.timedelta(hours=1)
    assert len(list(client.query(verdict_filter(since=hour_ago)))) == len(stored)
    assert not list(client.query(verdict_filter(since=now + dt.timedelta(minutes=1))))
    # By flow time (when the capture was recorded, years ago) the last hour holds nothing...
    by_flow = query_service_pb2.TIME_FIELD_FLOW
    assert not list(client.query(verdict_filter(since=hour_ago, time_field=by_flow)))
    # ...and a half-open range around the capture's own last-seen times holds exactly its flows.
    last_seen = sorted(s.verdict.last_seen_time.ToDatetime(dt.UTC) for s in stored)
    middle = last_seen[len(last_seen) // 2]
    early = [t for t in last_seen if t < middle]
    window = list(client.query(verdict_filter(since=last_seen[0], until=middle, time_field=by_flow)))
    assert len(window) == len(early)
    everything = verdict_filter(
        since=last_seen[0], until=last_seen[-1] + dt.timedelta(milliseconds=1), time_field=by_flow
    )
    assert len(list(client.query(everything))) == len(stored)


def test_reflection_lists_services(collector: CollectorThread, client: CollectorClient) -> None:
    services = set(ProtoReflectionDescriptorDatabase(client.channel).get_services())
    assert {"auris.v1.AgentService", "auris.v1.QueryService", "grpc.health.v1.Health"} <= services
    out = io.StringIO()
    assert ctl.main(["--collector", collector.address, "--insecure", "services"], out) == 0
    assert "auris.v1.QueryService" in out.getvalue()
    assert "SERVING" in out.getvalue()


def test_agent_waits_for_a_late_collector(tmp_path: Path) -> None:
    """Started before its collector, the agent retries and delivers every verdict once."""
    port = free_port()
    config = CollectorConfig(listen=f"127.0.0.1:{port}", insecure=True, db=str(tmp_path / "late.db"))
    late = CollectorThread(config)
    starter = threading.Timer(3.0, late.start)
    starter.start()
    try:
        done = run_agent(f"127.0.0.1:{port}", [ATTACK], tmp_path / "agent")
        assert done.returncode == 0, done.stderr
        assert "retrying" in done.stderr
        with CollectorClient(late.address, insecure=True) as c:
            stored = list(c.query(verdict_filter()))
        assert collections.Counter(stored_facts(stored, ATTACK.name)) == nfstream_reference(ATTACK)
    finally:
        starter.join()
        late.stop()


def test_spooled_verdicts_survive_an_unreachable_collector(tmp_path: Path) -> None:
    """Collector down: the agent exits 4 with everything spooled; the next start delivers it once."""
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text("uplink_deadline_s = 1.5\n")
    state = tmp_path / "agent"
    done = run_agent(f"127.0.0.1:{port}", [ATTACK], state, "--config", str(config))
    assert done.returncode == 4
    expected = nfstream_reference(ATTACK)
    assert "collector unreachable" in done.stderr
    assert f"{sum(expected.values())} verdicts stay spooled" in done.stderr

    late = CollectorThread(
        CollectorConfig(listen=f"127.0.0.1:{port}", insecure=True, db=str(tmp_path / "c.db"))
    )
    late.start()
    try:
        again = run_agent(late.address, [ATTACK], state)
        assert again.returncode == 0, again.stderr
        assert "replayed completely before" in again.stderr  # not metered a second time
        with CollectorClient(late.address, insecure=True) as c:
            stored = list(c.query(verdict_filter()))
        assert stored_facts(stored, ATTACK.name) == expected
        # --reprocess replays the capture again, as new verdicts.
        third = run_agent(late.address, [ATTACK], state, "--reprocess")
        assert third.returncode == 0, third.stderr
        with CollectorClient(late.address, insecure=True) as c:
            assert len(list(c.query(verdict_filter()))) == 2 * len(stored)
    finally:
        late.stop()


def test_unreadable_captures_are_reported_and_the_rest_delivered(
    collector: CollectorThread, client: CollectorClient, tmp_path: Path
) -> None:
    garbage = tmp_path / "random.pcap"
    garbage.write_bytes(bytes(range(256)) * 20)
    done = run_agent(collector.address, [tmp_path / "missing.pcap", garbage, ATTACK], tmp_path / "agent")
    assert done.returncode == 3
    assert "cannot meter random.pcap" in done.stderr
    assert "2 of 3 captures could not be read" in done.stderr
    stored = list(client.query(verdict_filter()))
    assert stored_facts(stored, ATTACK.name) == nfstream_reference(ATTACK)


def test_heartbeats_feed_the_agent_registry(tmp_path: Path) -> None:
    config = CollectorConfig(listen="127.0.0.1:0", insecure=True, db=str(tmp_path / "c.db"))
    running = CollectorThread(config)
    running.start()
    try:
        done = run_agent(running.address, [ATTACK], tmp_path / "agent")
        assert done.returncode == 0, done.stderr
        flows = sum(nfstream_reference(ATTACK).values())
        with CollectorClient(running.address, insecure=True) as c:
            (agent,) = c.list_agents()
            assert agent.state == admin_service_pb2.AGENT_STATE_ONLINE
            # The last heartbeat, sent at exit, carries the closing counters.
            assert agent.health.flows_metered == flows
            assert agent.health.verdicts_acknowledged == flows
            assert agent.health.spool_depth == 0
            assert agent.health.HasField("last_acknowledged_time")
            assert sorted(f"{m.model_id}@{m.version}" for m in agent.models) == [
                "nfstream-ae@2",
                "nfstream-rf@1",
            ]
            assert agent.verdicts_stored == flows
            assert c.get_agent(agent.agent_id).hostname == agent.hostname
            out = io.StringIO()
            assert ctl.main(["--collector", running.address, "--insecure", "agents", "list"], out) == 0
            assert agent.agent_id in out.getvalue()
            assert " online " in out.getvalue()
            # With no heartbeat within the offline window, the same agent reads as offline.
            assert running.collector is not None
            (later,) = running.collector.store.agents(offline_after_ns=1)
            assert later.state == admin_service_pb2.AGENT_STATE_OFFLINE
            with pytest.raises(grpc.RpcError) as caught:
                c.get_agent("nobody")
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        running.stop()


def test_an_agent_id_reused_with_a_fresh_state_dir_renumbers_instead_of_stalling(
    collector: CollectorThread, client: CollectorClient, tmp_path: Path
) -> None:
    """Same --agent-id, lost state: the collector refuses the reused sequences, the agent renumbers."""
    first = run_agent(collector.address, [ATTACK], tmp_path / "first", "--agent-id", "host-7")
    assert first.returncode == 0, first.stderr
    second_capture = PCAPS / "trickbot.pcap"
    second = run_agent(collector.address, [second_capture], tmp_path / "second", "--agent-id", "host-7")
    assert second.returncode == 0, second.stderr
    assert "renumbered after it" in second.stderr
    stored = list(client.query(verdict_filter(agent_ids=["host-7"])))
    assert stored_facts(stored, ATTACK.name) == nfstream_reference(ATTACK)
    assert stored_facts(stored, second_capture.name) == nfstream_reference(second_capture)
    sequences = [s.verdict.sequence for s in stored]
    assert len(sequences) == len(set(sequences))
