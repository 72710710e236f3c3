"""Fault injection with real processes: kill -9 of the collector and of the agent mid-stream.

Every verdict of a real capture must be stored exactly once at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from auris.collector.client import CollectorClient, verdict_filter
from auris.collector.config import CollectorConfig
from tests.conftest import MODELS, PCAPS, CollectorThread, free_port, wait_for
from tests.netns import veth_namespace
from tests.test_end_to_end import nfstream_reference, stored_facts

CAPTURE = PCAPS / "masscan_tcp_0_1000_20190821.pcap"
CYCLES = 5


def _copies(tmp_path: Path, n: int) -> list[Path]:
    """n distinct capture files (a replay is identified by its file), same real traffic."""
    folder = tmp_path / "pcaps"
    folder.mkdir()
    paths = []
    for i in range(n):
        paths.append(folder / f"part{i:02d}.pcap")
        shutil.copy(CAPTURE, paths[-1])
    return paths


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    # A new session, so that kill -9 reaches nfstream's meter processes too (as systemd's
    # control-group kill does).
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", *args], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill9(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _agent_args(address: str, state: Path, pcaps: list[Path]) -> list[str]:
    args = ["auris.agent", "--insecure", "--collector", address, "--models-dir", str(MODELS)]
    args += ["--state-dir", str(state)]
    for p in pcaps:
        args += ["--pcap", str(p)]
    return args


def _stored(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            (n,) = conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()
            return int(n)
    except sqlite3.OperationalError:
        return 0  # not created yet


def _assert_exactly_once(address: str, pcaps: list[Path]) -> None:
    expected = nfstream_reference(CAPTURE)
    with CollectorClient(address, insecure=True) as c:
        stored = list(c.query(verdict_filter(), page_size=1000))
    assert len(stored) == sum(expected.values()) * len(pcaps)
    for p in pcaps:
        assert stored_facts(stored, p.name) == expected, p.name


@pytest.mark.timeout(240)
def test_collector_killed_mid_stream(tmp_path: Path) -> None:
    pcaps = _copies(tmp_path, 6)
    port = free_port()
    address = f"127.0.0.1:{port}"
    db = tmp_path / "collector.db"
    ready = tmp_path / "collector.addr"
    collector_args = ["auris.collector", "serve", "--insecure", "--listen", address, "--db", str(db)]
    collector_args += ["--address-file", str(ready)]
    log = tmp_path / "processes.log"
    # Small batches, one in flight: the stream lasts long enough to be cut several times.
    slow = tmp_path / "agent.toml"
    slow.write_text("uplink_batch = 32\nuplink_window = 1\n")
    agent = _spawn([*_agent_args(address, tmp_path / "agent", pcaps), "--config", str(slow)], log)
    try:
        kills_mid_stream = 0
        for _ in range(CYCLES):
            before = _stored(db)
            collector = _spawn(collector_args, log)
            # Let some verdicts land, then kill it without warning.
            wait_for(lambda: _stored(db) > before, 30)  # noqa: B023
            time.sleep(0.05)
            _kill9(collector)
            kills_mid_stream += agent.poll() is None
        assert kills_mid_stream >= 3, (
            "the agent finished before the collector was killed: test proves nothing"
        )
        ready.unlink(missing_ok=True)
        collector = _spawn(collector_args, log)
        try:
            assert wait_for(ready.exists, 30)
            assert agent.wait(120) == 0, log.read_text()[-3000:]
            _assert_exactly_once(address, pcaps)
        finally:
            collector.terminate()
            collector.wait(30)
    finally:
        if agent.poll() is None:
            _kill9(agent)
    # The agent lived through every outage by reconnecting (resends, if any, were stored once).
    reconnects = re.search(r"(\d+) reconnects", log.read_text())
    assert reconnects is not None
    assert int(reconnects.group(1)) >= kills_mid_stream


@pytest.mark.timeout(240)
def test_agent_killed_mid_replay(collector: CollectorThread, tmp_path: Path) -> None:
    pcaps = _copies(tmp_path, 6)
    db = Path(collector.config.db)
    state = tmp_path / "agent"
    log = tmp_path / "agent.log"
    kills_mid_run = 0
    for _ in range(CYCLES):
        before = _stored(db)
        agent = _spawn(_agent_args(collector.address, state, pcaps), log)
        wait_for(lambda: _stored(db) > before + 200, 60)  # noqa: B023
        if agent.poll() is None:
            kills_mid_run += 1
        _kill9(agent)
    assert kills_mid_run >= 3, "the agent finished before it was killed: test proves nothing"
    final = _spawn(_agent_args(collector.address, state, pcaps), log)
    assert final.wait(120) == 0, log.read_text()[-3000:]
    _assert_exactly_once(collector.address, pcaps)
    assert "resuming" in log.read_text()


@pytest.mark.timeout(240)
def test_a_full_disk_under_the_agents_spool_loses_only_what_it_counts(tmp_path: Path) -> None:
    """The agent's state directory on a real, small filesystem that fills up mid-replay while the
    collector is away: the agent keeps going, counts the batches it could not spool, and once
    there is room and a collector, delivers the rest; every flow is stored at most once, and stored
    plus counted drops is every flow of the captures."""
    from tests.test_spool import _fill, _small_tmpfs

    pcaps = _copies(tmp_path, 6)
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "agent.log"
    with _small_tmpfs(tmp_path / "state", "16m") as state:
        slow = tmp_path / "agent.toml"
        slow.write_text("uplink_batch = 32\nuplink_window = 1\n")
        agent = _spawn([*_agent_args(address, state, pcaps), "--config", str(slow)], log)
        try:

            def used() -> int:
                return sum(f.stat().st_size for f in state.iterdir() if f.is_file())

            assert wait_for(lambda: used() > 512 * 1024, 60), log.read_text()[-3000:]
            filler = _fill(state)
            assert wait_for(lambda: "disk full" in log.read_text(), 60), log.read_text()[-3000:]
            assert agent.poll() is None, "the agent stopped on a full disk"
            filler.unlink()
            db = tmp_path / "collector.db"
            collector = CollectorThread(CollectorConfig(listen=address, insecure=True, db=str(db)))
            collector.start()
            try:
                assert agent.wait(120) == 0, log.read_text()[-3000:]
                with CollectorClient(address, insecure=True) as c:
                    stored = list(c.query(verdict_filter(), page_size=1000))
            finally:
                collector.stop()
        finally:
            if agent.poll() is None:
                _kill9(agent)
    text = log.read_text()
    found = re.search(r"(\d+) dropped by the spool cap, (\d+) for a full disk", text)
    assert found is not None, text[-3000:]
    dropped = int(found.group(2))
    expected = nfstream_reference(CAPTURE)
    assert dropped > 0
    assert len(stored) + dropped == sum(expected.values()) * len(pcaps)
    for p in pcaps:
        assert not stored_facts(stored, p.name) - expected, p.name  # nothing twice, nothing made up


@pytest.mark.timeout(240)
def test_a_network_partition_longer_than_the_backoff_loses_nothing(tmp_path: Path) -> None:
    """The agent in its own network namespace streams to the collector over a veth pair and mTLS;
    the link goes silent (down on the collector's side: no reset, no answer) for longer than the
    agent's acknowledgement timeout and reconnect backoff, then comes back. The agent notices,
    keeps reconnecting, and at the end every verdict of the captures is stored exactly once."""
    from auris.v1 import admin_service_pb2
    from tests.test_tls import issue, make_ca

    host_ip, peer_ip = "10.231.79.1", "10.231.79.2"
    pki = tmp_path / "pki"
    make_ca(pki, "ca")
    issue(pki, "ca", "collector", f"IP:{host_ip},IP:127.0.0.1")
    issue(pki, "ca", "agent-p", "DNS:agent-p")
    pcaps = _copies(tmp_path, 6)
    log = tmp_path / "agent.log"
    with veth_namespace("pt", host_ip, peer_ip, "a partition test") as (ns, here, _):
        collector = CollectorThread(
            CollectorConfig(
                listen=f"{host_ip}:0", api_listen="127.0.0.1:0", db=str(tmp_path / "collector.db"),
                ca_file=str(pki / "ca.pem"), cert_file=str(pki / "collector.pem"),
                key_file=str(pki / "collector.key"),
            )
        )  # fmt: skip
        collector.start()
        config = tmp_path / "agent.toml"
        config.write_text(
            f'ca_file = "{pki / "ca.pem"}"\ncert_file = "{pki / "agent-p.pem"}"\n'
            f'key_file = "{pki / "agent-p.key"}"\n'
            "uplink_batch = 32\nuplink_window = 1\nuplink_ack_timeout_s = 2\nuplink_backoff_max_s = 1\n"
        )
        args = ["--collector", collector.address, "--models-dir", str(MODELS), "--state-dir",
                str(tmp_path / "agent"), "--config", str(config)]  # fmt: skip
        for p in pcaps:
            args += ["--pcap", str(p)]
        with log.open("ab") as fh:
            agent = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "auris.agent", *args],
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            db = tmp_path / "collector.db"
            assert wait_for(lambda: _stored(db) > 200, 60), log.read_text()[-3000:]
            subprocess.run(["ip", "link", "set", here, "down"], check=True, capture_output=True)
            time.sleep(0.5)
            during = _stored(db)
            time.sleep(5)  # > uplink_ack_timeout_s + uplink_backoff_max_s
            assert _stored(db) == during, "verdicts crossed a link that was down: no partition"
            assert agent.poll() is None, "the agent finished before the partition: test proves nothing"
            subprocess.run(["ip", "link", "set", here, "up"], check=True, capture_output=True)
            assert agent.wait(120) == 0, log.read_text()[-3000:]
            assert collector.collector is not None
            token, _ = collector.collector.authority.create_token("test", admin_service_pb2.ROLE_READER)
            with CollectorClient(
                collector.collector.api_address, ca_file=str(pki / "ca.pem"), token=token
            ) as c:
                stored = list(c.query(verdict_filter(), page_size=1000))
        finally:
            if agent.poll() is None:
                _kill9(agent)
            collector.stop()
    expected = nfstream_reference(CAPTURE)
    assert len(stored) == sum(expected.values()) * len(pcaps)
    for p in pcaps:
        assert stored_facts(stored, p.name) == expected, p.name
    text = log.read_text()
    assert "no acknowledgement for 2s; reconnecting" in text
    reconnects = re.search(r"(\d+) reconnects", text)
    assert reconnects is not None
    assert int(reconnects.group(1)) >= 1
