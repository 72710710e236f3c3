"""Live capture on a veth pair into a network namespace, with real TCP, UDP and ICMP traffic.

Needs root and iproute2 (CI on this project's machines has both); skipped with the
reason otherwise. Traffic stays between this sandbox's own namespaces.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auris.collector.client import CollectorClient, verdict_filter
from auris.v1 import flow_pb2, verdict_pb2
from tests.conftest import MODELS, CollectorThread, wait_for
from tests.netns import veth_namespace

HOST_IP, PEER_IP = "10.231.77.1", "10.231.77.2"


@pytest.fixture
def veth() -> Iterator[tuple[str, str]]:
    """A veth pair: one end here, the other in a fresh namespace with a TCP and a UDP echo server."""
    with veth_namespace("lv", HOST_IP, PEER_IP, "live capture") as (ns, host_if, _):
        servers = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _ECHO_SERVERS, PEER_IP],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert servers.stdout is not None
            assert servers.stdout.readline().strip() == "ready"
            yield host_if, ns
        finally:
            servers.kill()
            servers.wait()


_ECHO_SERVERS = """
import socket, sys, threading
ip = sys.argv[1]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind((ip, 5300))
tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((ip, 8080))
tcp.listen()
def udp_echo():
    while True:
        data, peer = udp.recvfrom(2048); udp.sendto(data, peer)
def tcp_echo():
    while True:
        conn, _ = tcp.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)
threading.Thread(target=udp_echo, daemon=True).start()
threading.Thread(target=tcp_echo, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def _icmp_echo(count: int) -> None:
    """Echo requests from a raw socket (root); the peer's kernel answers them."""
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(2)
        for seq in range(count):
            header = struct.pack("!BBHHH", 8, 0, 0, 0x4155, seq)
            payload = b"auris-live-tests"  # even length: the checksum sums 16-bit words
            words = struct.unpack(f"!{(len(header) + len(payload)) // 2}H", header + payload)
            csum = sum(words)
            csum = (csum >> 16) + (csum & 0xFFFF)
            csum = ~(csum + (csum >> 16)) & 0xFFFF
            s.sendto(struct.pack("!BBHHH", 8, 0, csum, 0x4155, seq) + payload, (PEER_IP, 0))
            s.recvfrom(2048)


def _start_agent(collector: CollectorThread, config: Path, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "auris.agent", "--insecure", "--collector", collector.address,
         "--config", str(config), "--models-dir", str(MODELS), "--state-dir", str(tmp_path / "agent")],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _wait_for_capture(agent: subprocess.Popen[str]) -> None:
    """Until the agent's meter process runs (then a moment for libpcap to open the interface)."""
    assert wait_for(lambda: _meter_processes(agent.pid), 30), "the meter did not start"
    time.sleep(1.0)


def _stored(client: CollectorClient) -> list[verdict_pb2.StoredVerdict]:
    return list(client.query(verdict_filter(ip=PEER_IP), page_size=1000))


def test_live_capture_on_a_veth_pair(
    veth: tuple[str, str], collector: CollectorThread, tmp_path: Path
) -> None:
    interface, _ = veth
    config = tmp_path / "agent.toml"
    config.write_text(f'interface = "{interface}"\nbpf_filter = "ip"\nidle_timeout_s = 2\n')
    agent = _start_agent(collector, config, tmp_path)
    try:
        _wait_for_capture(agent)
        with socket.create_connection((PEER_IP, 8080), timeout=5) as tcp:
            for _ in range(3):
                tcp.sendall(b"x" * 500)
                assert len(tcp.recv(4096)) == 500
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((HOST_IP, 40001))
        udp.settimeout(2)
        for _ in range(4):
            udp.sendto(b"y" * 100, (PEER_IP, 5300))
            udp.recvfrom(2048)
        _icmp_echo(3)
        with CollectorClient(collector.address, insecure=True) as client:
            # The link is quiet now: idle flows must still come out after idle_timeout_s.
            assert wait_for(lambda: len(_stored(client)) >= 3, 20), agent.stderr
            quiet = {(v.verdict.flow.ip_protocol, v.verdict.flow.dst_port) for v in _stored(client)}
            assert {(6, 8080), (17, 5300), (1, 0)} <= quiet
            # A flow still open when the agent stops is flushed, not lost.
            late = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            late.bind((HOST_IP, 40002))
            late.settimeout(2)
            late.sendto(b"z" * 60, (PEER_IP, 5300))
            late.recvfrom(2048)
            time.sleep(0.5)
            agent.send_signal(signal.SIGTERM)
            _, err = agent.communicate(timeout=30)
            assert agent.returncode == 0, err
            stored = _stored(client)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()

    flows = collections.Counter(
        (v.verdict.flow.ip_protocol, v.verdict.flow.src_port, v.verdict.flow.dst_port) for v in stored
    )
    assert all(n == 1 for n in flows.values()), flows  # each flow exactly once
    by_key = {
        (v.verdict.flow.ip_protocol, v.verdict.flow.src_port, v.verdict.flow.dst_port): v.verdict
        for v in stored
    }
    udp_flow = by_key[(17, 40001, 5300)]
    assert (udp_flow.counters.src_to_dst_packets, udp_flow.counters.dst_to_src_packets) == (4, 4)
    assert udp_flow.counters.src_to_dst_bytes == 4 * (14 + 20 + 8 + 100)  # frames: Ethernet + IP + UDP + data
    late_flow = by_key[(17, 40002, 5300)]
    assert (late_flow.counters.src_to_dst_packets, late_flow.counters.dst_to_src_packets) == (1, 1)
    icmp = [v.verdict for v in stored if v.verdict.flow.ip_protocol == 1]
    assert sum(f.counters.src_to_dst_packets + f.counters.dst_to_src_packets for f in icmp) == 6
    tcp_flow = next(v.verdict for v in stored if v.verdict.flow.dst_port == 8080)
    assert tcp_flow.counters.src_to_dst_packets >= 6  # handshake, 3 sends, acks, fin
    assert tcp_flow.counters.dst_to_src_bytes >= 3 * 500
    assert all(v.verdict.capture_source == interface for v in stored)


def test_the_live_flow_cap_evicts_and_counts(
    veth: tuple[str, str], collector: CollectorThread, tmp_path: Path
) -> None:
    """Past max_live_flows the oldest flows leave the meter early, as EVICTED, and nothing is lost."""
    interface, _ = veth
    config = tmp_path / "agent.toml"
    config.write_text(
        f'interface = "{interface}"\nbpf_filter = "udp"\nidle_timeout_s = 600\nmax_live_flows = 5\n'
        "heartbeat_interval_s = 0.5\n"
    )
    agent = _start_agent(collector, config, tmp_path)
    try:
        _wait_for_capture(agent)
        for port in range(41000, 41020):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((HOST_IP, port))
            s.settimeout(2)
            s.sendto(b"q" * 40, (PEER_IP, 5300))
            s.recvfrom(2048)
            s.close()
            time.sleep(0.02)
        with CollectorClient(collector.address, insecure=True) as client:
            assert wait_for(lambda: len(_stored(client)) >= 15, 20)
            agent.send_signal(signal.SIGTERM)
            _, err = agent.communicate(timeout=30)
            assert agent.returncode == 0, err
            stored = _stored(client)
            (registered,) = client.list_agents()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    ports = collections.Counter(v.verdict.flow.src_port for v in stored)
    assert ports == collections.Counter(range(41000, 41020))  # every flow, once
    evicted = [v for v in stored if v.verdict.end_reason == flow_pb2.FLOW_END_REASON_EVICTED]
    assert len(evicted) >= 15  # the cap held the meter to 5 flows
    assert all(v.verdict.counters.src_to_dst_packets == 1 for v in stored)
    assert registered.health.flows_evicted == len(evicted)
    assert registered.health.packets_seen >= 40


def _meter_processes(agent_pid: int) -> list[int]:
    """nfstream's meters: children of the agent's forkserver (itself a child of the agent)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return [meter for server in children.get(agent_pid, []) for meter in children.get(server, [])]


def test_a_meter_killed_on_a_quiet_link_ends_the_agent_instead_of_hanging_it(
    veth: tuple[str, str], collector: CollectorThread, tmp_path: Path
) -> None:
    interface, _ = veth
    config = tmp_path / "agent.toml"
    config.write_text(f'interface = "{interface}"\nbpf_filter = "udp"\n')
    agent = _start_agent(collector, config, tmp_path)
    try:
        assert wait_for(lambda: _meter_processes(agent.pid), 20), "the meter did not start"
        time.sleep(1.0)
        # nfstream imports pandas; the agent, its forkserver and its meters do without (lean.py).
        for pid in [agent.pid, *_meter_processes(agent.pid)]:
            assert "/pandas/" not in Path(f"/proc/{pid}/maps").read_text(), pid
        for meter in _meter_processes(agent.pid):
            os.kill(meter, signal.SIGKILL)  # as the OOM killer would
        _, err = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 3, err
    assert "the meter process died (exit code -9)" in err


def test_a_meter_killed_while_sending_a_flow_fails_its_source_instead_of_hanging(
    veth: tuple[str, str],
) -> None:
    """The meter dies holding the channel's write lock, half a flow written: the reader waits for
    bytes that will never come (and the lock will never be released). The dead-meter watchdog (a
    thread of meter.py's wherever captures are read) completes the broken message, so the read
    fails and the source is reported dead. The broken write is made by hand on the real channel of
    a real meter on a live interface (killing a meter at that exact instant cannot be timed), then
    the meter is killed as the OOM killer would."""
    from auris.agent import meter as meters
    from auris.agent.features import NFSTREAM

    interface, _ = veth
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            for _ in meters.meter_source(interface, [NFSTREAM], meters.MeterOptions(bpf_filter="udp")):
                pass
            outcome.append(None)
        except BaseException as exc:  # the outcome is what the test checks
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert wait_for(lambda: meters._METERS and meters._METERS[-1].process.pid, 20), "no meter started"
    meter = meters._METERS[-1]
    time.sleep(0.5)  # the reader is now waiting on the channel
    assert meter.channel._wlock.acquire(True, 5)  # what the meter held when it died
    try:
        os.write(meter.channel._writer.fileno(), struct.pack("!i", 5000) + b"\x80\x05" + bytes(98))
        time.sleep(0.2)
        with meters._METERS_LOCK:  # the watchdog waits for this lock
            os.kill(meter.process.pid, signal.SIGKILL)
            reader.join(2)
            assert reader.is_alive(), "the reader did not wait on the half-written flow: test proves nothing"
        reader.join(30)  # the watchdog looks once a second, with nobody calling it
        assert not reader.is_alive(), "the reader still waits for the rest of the broken message"
    finally:
        meter.channel._wlock.release()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ValueError)
    assert "the meter process died (exit code -9) while sending a flow" in str(outcome[0])
