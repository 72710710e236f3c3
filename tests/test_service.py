"""The collector as systemd runs it: a real ``auris-collector serve`` process that reports to a real
unix datagram socket given as NOTIFY_SOCKET (READY, RELOADING, WATCHDOG, STOPPING) and takes up a
changed configuration file on SIGHUP, or refuses a bad one and keeps running as before."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from auris.agent import sd_notify
from auris.collector.client import CollectorClient
from auris.v1 import agent_service_pb2, agent_service_pb2_grpc, verdict_pb2
from tests.conftest import MODELS, PCAPS, REPO, CollectorThread, make_verdict, wait_for


class NotifySocket:
    """What systemd listens on: a unix datagram socket; ``expect`` reads messages until one holds a line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)
        self.received: list[str] = []

    def expect(self, line: str) -> list[str]:
        """Messages up to and including the first with ``line``; TimeoutError after 30 s of silence."""
        seen = []
        while True:
            message = self.sock.recv(4096).decode()
            self.received.append(message)
            seen.append(message)
            if line in message.splitlines():
                return seen


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.sock.close()


def _config(tmp_path: Path, extra: str) -> str:
    return (
        f'insecure = true\nlisten = "127.0.0.1:0"\ndb = "{tmp_path / "auris.db"}"\n'
        f'address_file = "{tmp_path / "address"}"\n' + extra
    )


RULE_1 = '[[alert_rules]]\nname = "one"\nlabels = ["one"]\n'
RULE_2 = '[[alert_rules]]\nname = "two"\nlabels = ["two"]\n'
SIEM = '[[siem_sinks]]\nname = "siem"\npath = "{path}"\nverdicts = "anomalous"\nalert_events = []\n'


@contextlib.contextmanager
def _collector(config: Path, notify: NotifySocket, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="200000")
    env.pop("WATCHDOG_PID", None)
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "auris.collector", "--config", str(config), "serve"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _send(client: CollectorClient, *verdicts: verdict_pb2.Verdict) -> None:
    stub = agent_service_pb2_grpc.AgentServiceStub(client.channel)
    request = agent_service_pb2.StreamVerdictsRequest(agent_id="agent-1", verdicts=verdicts)
    list(stub.StreamVerdicts(iter([request])))


def _rules(client: CollectorClient) -> list[str]:
    return sorted(a.rule for a in client.alerts())


def test_sighup_reloads_rules_and_sinks_and_systemd_hears_of_it(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    config = tmp_path / "collector.toml"
    config.write_text(_config(tmp_path, RULE_1))
    log = tmp_path / "collector.log"
    siem = tmp_path / "siem.jsonl"
    with _collector(config, notify_socket, log) as proc:
        (ready,) = [m for m in notify_socket.expect("READY=1") if "READY=1" in m]
        address = (tmp_path / "address").read_text().strip()
        assert f"STATUS=serving on {address}" in ready.splitlines()
        notify_socket.expect("WATCHDOG=1")  # WatchdogSec=0.2 s: a ping every 0.1 s
        with CollectorClient(address, insecure=True) as client:
            _send(client, make_verdict(1, label="one", src_ip="10.0.0.1"), make_verdict(2, label="two"))
            assert _rules(client) == ["one"]

            # A new rule and a SIEM sink; a setting that needs a restart is named, not applied.
            config.write_text(
                _config(tmp_path, "max_page_size = 500\n" + RULE_1 + RULE_2 + SIEM.format(path=siem))
            )
            proc.send_signal(signal.SIGHUP)
            reload = notify_socket.expect("READY=1")
            assert any("RELOADING=1" in m.splitlines() for m in reload)
            assert any(line.startswith("MONOTONIC_USEC=") for m in reload for line in m.splitlines())
            text = log.read_text()
            assert "reloaded: alert_rules (+two); siem_sinks (+siem)" in text
            assert "reload: max_page_size changed; these take effect at the next restart" in text
            _send(client, make_verdict(3, label="two", anomalous=True))
            assert _rules(client) == ["one", "two"]
            assert wait_for(lambda: siem.exists() and siem.read_text().count("\n") == 1, 30)
            assert json.loads(siem.read_text())["auris"]["verdict"]["sequence"] == 3

            # A bad file: refused in one line, the running rules and sink stay.
            config.write_text(_config(tmp_path, "alert_ruls = []\n" + RULE_1 + RULE_2))
            proc.send_signal(signal.SIGHUP)
            notify_socket.expect("READY=1")
            refused = [line for line in log.read_text().splitlines() if "reload refused" in line]
            assert len(refused) == 1
            assert "keeping the running configuration" in refused[0]
            assert "unknown key 'alert_ruls'" in refused[0]
            _send(client, make_verdict(4, label="two", src_ip="10.0.0.4", anomalous=True))
            assert _rules(client) == ["one", "two", "two"]  # the key differs: a second alert
            assert wait_for(lambda: siem.read_text().count("\n") == 2, 30)

            # An unwritable sink path refuses the whole reload.
            blocked = tmp_path / "blocked"
            blocked.write_text("a file, not a folder")
            config.write_text(_config(tmp_path, RULE_1 + SIEM.format(path=blocked / "siem.jsonl")))
            proc.send_signal(signal.SIGHUP)
            notify_socket.expect("READY=1")
            assert sum("reload refused" in line for line in log.read_text().splitlines()) == 2
            _send(client, make_verdict(5, label="two", src_ip="10.0.0.5"))
            assert _rules(client) == ["one", "two", "two", "two"]  # rule two is still there

        proc.send_signal(signal.SIGTERM)
        notify_socket.expect("STOPPING=1")
        assert proc.wait(30) == 0


def test_notify_speaks_datagrams_and_reads_the_watchdog_settings(notify_socket: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(notify_socket.path)}
    assert sd_notify.notify("READY=1", "STATUS=ok", environ=env)
    assert notify_socket.expect("READY=1") == ["READY=1\nSTATUS=ok"]
    assert not sd_notify.notify("READY=1", environ={})  # not under systemd: nothing to do
    assert not sd_notify.notify("READY=1", environ={"NOTIFY_SOCKET": str(notify_socket.path) + ".gone"})
    assert sd_notify.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert (
        sd_notify.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    )
    assert sd_notify.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sd_notify.watchdog_interval_s({}) is None


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"auris-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert sd_notify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"STOPPING=1"


def test_the_agent_reports_ready_reloading_watchdog_and_stopping(
    collector: CollectorThread, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    pcaps = []
    for i in range(24):  # a replay long enough to signal it while it runs
        pcaps.append(tmp_path / f"part{i:02d}.pcap")
        shutil.copy(PCAPS / "masscan_tcp_0_1000_20190821.pcap", pcaps[-1])
    config = tmp_path / "agent.toml"
    config.write_text(f'drain_timeout_s = 2.0\nmodels_dir = "{MODELS}"\n')
    args = [sys.executable, "-m", "auris.agent", "--insecure", "--collector", collector.address,
            "--config", str(config), "--state-dir", str(tmp_path / "agent")]  # fmt: skip
    for p in pcaps:
        args += ["--pcap", str(p)]
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="200000")
    env.pop("WATCHDOG_PID", None)
    agent = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        ready = notify_socket.expect("READY=1")[-1]
        assert f"STATUS=metering {pcaps[0].resolve()}" in ready
        notify_socket.expect("WATCHDOG=1")
        agent.send_signal(signal.SIGHUP)
        reload = notify_socket.expect("READY=1")
        assert any("RELOADING=1" in m.splitlines() for m in reload)
        agent.send_signal(signal.SIGTERM)
        notify_socket.expect("STOPPING=1")
        _, err = agent.communicate(timeout=120)
        assert agent.returncode == 0, err
        assert "reloaded configuration and 2 model(s)" in err  # the two default models
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
