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
