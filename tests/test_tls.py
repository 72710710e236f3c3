"""mTLS, the default transport: certificates from a real CA made with openssl for each test."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from auris.collector.client import CollectorClient, verdict_filter
from auris.collector.config import CollectorConfig
from auris.v1 import admin_service_pb2, query_service_pb2, query_service_pb2_grpc
from tests.conftest import MODELS, PCAPS, CollectorThread, run_cli

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    return folder / f"{name}.pem"


def issue(folder: Path, ca: str, name: str, san: str) -> tuple[Path, Path]:
    (folder / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip
    return folder / f"{name}.pem", folder / f"{name}.key"


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    make_ca(folder, "ca")
    issue(folder, "ca", "collector", "IP:127.0.0.1,DNS:localhost")
    issue(folder, "ca", "agent-1", "DNS:agent-1")
    make_ca(folder, "rogue-ca")
    issue(folder, "rogue-ca", "rogue", "DNS:rogue")
    return folder


@pytest.fixture
def tls_collector(tmp_path: Path, pki: Path) -> Iterator[CollectorThread]:
    config = CollectorConfig(
        listen="127.0.0.1:0",
        db=str(tmp_path / "tls.db"),
        ca_file=str(pki / "ca.pem"),
        cert_file=str(pki / "collector.pem"),
        key_file=str(pki / "collector.key"),
        api_listen="127.0.0.1:0",
    )
    running = CollectorThread(config)
    running.start()
    yield running
    running.stop()


def test_agent_delivers_over_mtls(tls_collector: CollectorThread, pki: Path, tmp_path: Path) -> None:
    pcap = PCAPS / "trickbot.pcap"
    args = [
        "--collector",
        tls_collector.address,
        "--models-dir",
        str(MODELS),
        "--state-dir",
        str(tmp_path / "a"),
    ]
    config = tmp_path / "agent.toml"
    config.write_text(
        f'ca_file = "{pki / "ca.pem"}"\n'
        f'cert_file = "{pki / "agent-1.pem"}"\n'
        f'key_file = "{pki / "agent-1.key"}"\n'
    )
    done = run_cli("auris.agent", [*args, "--config", str(config), "--pcap", str(pcap)])
    assert done.returncode == 0, done.stderr
    assert "INSECURE" not in done.stderr
    assert tls_collector.collector is not None
    token, _ = tls_collector.collector.authority.create_token("test", admin_service_pb2.ROLE_READER)
    with CollectorClient(tls_collector.collector.api_address, ca_file=str(pki / "ca.pem"), token=token) as c:
        stored = list(c.query(verdict_filter()))
    # The agent took its id from its certificate.
    assert len(stored) > 0
    assert {v.verdict.agent_id for v in stored} == {"agent-1"}


@pytest.mark.parametrize("who", ["rogue", "plaintext"])
def test_clients_without_a_certificate_from_our_ca_are_refused(
    tls_collector: CollectorThread, pki: Path, who: str
) -> None:
    if who == "plaintext":
        channel = grpc.insecure_channel(tls_collector.address)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(pki / "ca.pem").read_bytes(),
            private_key=(pki / "rogue.key").read_bytes(),
            certificate_chain=(pki / "rogue.pem").read_bytes(),
        )
        channel = grpc.secure_channel(tls_collector.address, credentials)
    with channel:
        stub = query_service_pb2_grpc.QueryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.QueryVerdicts(query_service_pb2.QueryVerdictsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
