"""Shared fixtures: a real collector on 127.0.0.1 port 0 with a SQLite file in tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auris.agent.manifest import dump_manifest, read_manifest
from auris.agent.signing import ModelTrust, key_id, private_key_pem, public_key_pem, sign_manifest
from auris.collector.client import CollectorClient
from auris.collector.config import CollectorConfig
from auris.collector.server import Collector
from auris.v1 import flow_pb2, model_pb2, verdict_pb2

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
PCAPS = DATA / "pcaps"
MODELS = REPO / "models"

# A model-signing key made for this test run, and a trust that accepts only it.
TEST_SIGNING_KEY = Ed25519PrivateKey.generate()
TEST_TRUST = ModelTrust({key_id(TEST_SIGNING_KEY.public_key()): TEST_SIGNING_KEY.public_key()})


def write_test_key(path: Path) -> Path:
    """Write the test signing key (PEM) to ``path``, its public half beside it (``.pub``)."""
    path.write_bytes(private_key_pem(TEST_SIGNING_KEY))
    path.with_suffix(".pub").write_text(public_key_pem(TEST_SIGNING_KEY.public_key()))
    return path


def resign(manifest_path: Path, key: Ed25519PrivateKey = TEST_SIGNING_KEY) -> None:
    """Sign a manifest file again (after a test edited it) with ``key``."""
    manifest = read_manifest(manifest_path, verify_file=False)
    sign_manifest(manifest, key)
    manifest_path.write_text(dump_manifest(manifest))


class CollectorThread:
    """A real collector serving from its own event loop in a background thread."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-collector", daemon=True)
        self.collector: Collector | None = None

    def start(self) -> str:
        self._thread.start()

        async def start() -> Collector:
            collector = Collector(self.config)
            await collector.start()
            return collector

        self.collector = asyncio.run_coroutine_threadsafe(start(), self._loop).result(30)
        return self.collector.address

    def stop(self) -> None:
        if self.collector is not None:
            asyncio.run_coroutine_threadsafe(self.collector.stop(), self._loop).result(30)
            self.collector = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def address(self) -> str:
        assert self.collector is not None
        return self.collector.address


@contextlib.contextmanager
def running_collector(db: Path, **settings: Any) -> Iterator[CollectorThread]:
    """A plaintext collector on 127.0.0.1, any free port, with ``settings`` over the defaults."""
    running = CollectorThread(
        CollectorConfig(**{"listen": "127.0.0.1:0", "insecure": True, "db": str(db), **settings})
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[CollectorThread]:
    with running_collector(tmp_path / "collector" / "auris.db") as running:
        yield running


@pytest.fixture
def client(collector: CollectorThread) -> Iterator[CollectorClient]:
    with CollectorClient(collector.address, insecure=True) as c:
        yield c


def free_port() -> int:
    """A loopback port nobody listens on right now (for servers that must start late)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


@dataclasses.dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


def run_cli(module: str, args: Sequence[str], timeout: float = 120, cwd: Path = REPO) -> Completed:
    """Run ``python -m module args`` as a real process, the way an operator would."""
    env = dict(os.environ)
    env.pop("AURIS_AGENT_MODELS_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        check=False,
    )
    return Completed(proc.returncode, proc.stdout, proc.stderr)


def bare_nfstream(pcap: Path, **options: Any) -> Any:
    """nfstream alone on a capture (no Auris code), its meter forked from a clean server process:
    this process runs gRPC threads, and nfstream's own fork beside them can leave a meter that
    never answers (gRPC warns "Other threads are currently calling into gRPC, skipping fork()
    handlers"; a test hung on it once)."""
    import multiprocessing

    from nfstream import NFStreamer

    streamer = NFStreamer(source=str(pcap), **options)
    streamer._mp_context = multiprocessing.get_context("forkserver")
    return streamer


def run_agent(address: str, pcaps: Sequence[Path], state_dir: Path, *extra: str) -> Completed:
    args = ["--collector", address, "--insecure", "--models-dir", str(MODELS), "--state-dir", str(state_dir)]
    for pcap in pcaps:
        args += ["--pcap", str(pcap)]
    return run_cli("auris.agent", [*args, *extra])


def make_verdict(
    sequence: int,
    *,
    agent_id: str = "agent-1",
    src_ip: str = "10.0.0.1",
    dst_ip: str = "10.0.0.2",
    dst_port: int = 443,
    label: str = "benign",
    anomalous: bool = False,
    score: float = 0.1,
    scored_ms: int | None = None,
) -> verdict_pb2.Verdict:
    """A well-formed verdict, as an agent would send it."""
    v = verdict_pb2.Verdict(
        agent_id=agent_id,
        sequence=sequence,
        flow=flow_pb2.FlowKey(
            src_ip=src_ip, dst_ip=dst_ip, src_port=40000 + sequence % 20000, dst_port=dst_port, ip_protocol=6
        ),
        counters=flow_pb2.FlowCounters(
            src_to_dst_packets=3, dst_to_src_packets=2, src_to_dst_bytes=300, dst_to_src_bytes=200
        ),
        model=model_pb2.ModelRef(model_id="m", version="1"),
        label=label,
        anomalous=anomalous,
        hostname="host-1",
    )
    v.scores.add(
        model=v.model, kind=model_pb2.MODEL_KIND_CLASSIFIER, score=score, threshold=0.5, anomalous=anomalous
    )
    ms = scored_ms if scored_ms is not None else int(time.time() * 1000)
    v.scored_time.FromMilliseconds(ms)
    v.first_seen_time.FromMilliseconds(ms - 1000)
    v.last_seen_time.FromMilliseconds(ms - 10)
    return v
