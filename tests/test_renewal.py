"""Agent certificate renewal on a real collector with a real CA: an agent renews only for itself,
only while not revoked, only from a collector holding its CA key; a running agent renews before
expiry and keeps delivering with the new certificate once the old one has expired; outside its
window the certificate is left alone."""

from __future__ import annotations

import datetime as dt
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from auris.agent.enroll import certificate_request
from auris.agent.health import health_metrics
from auris.agent.renewal import CertificateRenewer, ReopenableChannel, finish_interrupted_renewal
from auris.agent.spool import Spool
from auris.agent.uplink import Uplink, open_channel
from auris.collector.client import verdict_filter
from auris.collector.config import CollectorConfig
from auris.collector.pki import init_pki, load_ca, sign_agent_csr
from auris.v1 import agent_service_pb2, agent_service_pb2_grpc
from tests import test_security
from tests.conftest import MODELS, PCAPS, CollectorThread, make_verdict, run_cli
from tests.test_security import Secure, _code

secure = test_security.secure


def _key_pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value)


def _renew(channel: grpc.Channel, csr_pem: str) -> agent_service_pb2.RenewCertificateResponse:
    stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    return stub.RenewCertificate(agent_service_pb2.RenewCertificateRequest(csr_pem=csr_pem), timeout=10)


def _audit(db: Path, action: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute("SELECT actor, result FROM audit WHERE action = ? ORDER BY id", (action,)))


def test_an_agent_renews_for_itself_only_and_not_once_revoked(secure: Secure) -> None:
    with secure.client(secure.admin_token) as admin:
        token = admin.create_enrollment_token(ttl=dt.timedelta(minutes=5)).token
    key_pem, cert_pem = secure.enroll(token, "edge-1")
    old = x509.load_pem_x509_certificate(cert_pem)
    key, csr_pem = certificate_request("edge-1")
    _, other_csr = certificate_request("edge-2")
    with secure.agent_channel(key_pem, cert_pem) as channel:
        # The certificate says edge-1: it gets no certificate for edge-2, and garbage is refused.
        assert _code(lambda: _renew(channel, other_csr)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: _renew(channel, "not a request")) == grpc.StatusCode.INVALID_ARGUMENT
        response = _renew(channel, csr_pem)
        # Until the new certificate is first used, the replaced one still works (a lost answer
        # must not lock the agent out).
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        heartbeat = agent_service_pb2.HeartbeatRequest(agent_id="edge-1")
        stub.Heartbeat(heartbeat, timeout=10)
    new = x509.load_pem_x509_certificate(response.certificate_pem.encode())
    assert _common_name(new) == "edge-1"
    assert new.serial_number != old.serial_number
    assert new.public_key() == key.public_key()
    new.verify_directly_issued_by(x509.load_pem_x509_certificate(secure.ca_pem))
    days = (new.not_valid_after_utc - dt.datetime.now(dt.UTC)) / dt.timedelta(days=1)
    assert 364 < days <= 365  # agent_cert_days

    # The new pair opens the agent port; the collector knows the new serial; all of it is audited.
    new_key_pem = _key_pem(key)
    with secure.agent_channel(new_key_pem, response.certificate_pem.encode()) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        stub.Heartbeat(agent_service_pb2.HeartbeatRequest(agent_id="edge-1"), timeout=10)
    # Once it has been, the replaced certificate is refused.
    with secure.agent_channel(key_pem, cert_pem) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        assert _code(lambda: stub.Heartbeat(heartbeat, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: _renew(channel, csr_pem)) == grpc.StatusCode.PERMISSION_DENIED
    db = secure.collector.store.path
    with sqlite3.connect(db) as conn:
        (serial,) = conn.execute("SELECT cert_serial FROM agents WHERE agent_id = 'edge-1'").fetchone()
    assert serial == format(new.serial_number, "x")
    assert _audit(db, "RenewCertificate") == [
        ("agent:edge-1", "PERMISSION_DENIED"),
        ("agent:edge-1", "INVALID_ARGUMENT"),
        ("agent:edge-1", "OK"),
        ("agent:edge-1", "PERMISSION_DENIED"),  # the replaced certificate, asking again
    ]

    # Without a client certificate (the API port) there is nobody to renew for.
    with secure.api_channel() as channel:
        assert _code(lambda: _renew(channel, csr_pem)) == grpc.StatusCode.UNAUTHENTICATED
    # Revoked: neither the old nor the renewed certificate gets another one.
    with secure.client(secure.admin_token) as admin:
        admin.revoke_agent("edge-1", "stolen laptop")
    _, again = certificate_request("edge-1")
    for pair in ((key_pem, cert_pem), (new_key_pem, response.certificate_pem.encode())):
        with secure.agent_channel(*pair) as channel:
            assert _code(lambda: _renew(channel, again)) == grpc.StatusCode.PERMISSION_DENIED


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _agent_files(state: Path, pki: Path, agent_id: str, days: float) -> tuple[Path, Path, Path]:
    """What enrollment leaves in state_dir/pki, with a certificate valid for ``days``."""
    ca, ca_key = load_ca(pki / "ca.pem", pki / "ca.key")
    key, csr_pem = certificate_request(agent_id)
    cert_pem, _ = sign_agent_csr(ca, ca_key, csr_pem.encode(), agent_id, days)
    folder = state / "pki"
    folder.mkdir(parents=True)
    (folder / "ca.pem").write_bytes((pki / "ca.pem").read_bytes())
    (folder / "agent.pem").write_bytes(cert_pem)
    (folder / "agent.key").write_bytes(_key_pem(key))
    return folder / "ca.pem", folder / "agent.pem", folder / "agent.key"


def test_a_collector_without_its_ca_key_renews_nothing(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["127.0.0.1"])
    ca_file, cert_file, key_file = _agent_files(tmp_path / "state", pki, "edge-3", 1)
    running = CollectorThread(
        CollectorConfig(
            listen="127.0.0.1:0",
            db=str(tmp_path / "auris.db"),
            ca_file=str(pki / "ca.pem"),
            cert_file=str(pki / "collector.pem"),
            key_file=str(pki / "collector.key"),
        )
    )
    running.start()
    try:
        channel = open_channel(
            running.address,
            insecure=False,
            ca_file=str(ca_file),
            cert_file=str(cert_file),
            key_file=str(key_file),
        )
        with channel:
            _, csr_pem = certificate_request("edge-3")
            assert _code(lambda: _renew(channel, csr_pem)) == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        running.stop()


def _wait(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_running_agent_renews_before_expiry_and_delivers_with_the_new_certificate(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["127.0.0.1"])
    # A certificate that expires in 8 seconds: well inside the 30-day window, and long enough for
    # the collector to start and the renewal to go through on a slow, busy host (2 s was not).
    ca_file, cert_file, key_file = _agent_files(tmp_path / "state", pki, "edge-5", 8 / 86400)
    old = x509.load_pem_x509_certificate(cert_file.read_bytes())
    old_pair = (key_file.read_bytes(), cert_file.read_bytes())
    config = CollectorConfig(
        listen=f"127.0.0.1:{_free_port()}",
        db=str(tmp_path / "auris.db"),
        ca_file=str(pki / "ca.pem"),
        cert_file=str(pki / "collector.pem"),
        key_file=str(pki / "collector.key"),
        ca_key_file=str(pki / "ca.key"),
        shutdown_grace_s=0.1,
    )
    running = CollectorThread(config)
    address = running.start()
    channel = ReopenableChannel(
        lambda: open_channel(
            address, insecure=False, ca_file=str(ca_file), cert_file=str(cert_file), key_file=str(key_file)
        )
    )
    spool = Spool(tmp_path / "state" / "spool.db")
    uplink = Uplink(channel, "edge-5", spool, backoff_max_s=0.5)
    renewer = CertificateRenewer(
        channel, cert_file, key_file, ca_file, renew_before_days=30, on_renewed=channel.reopen
    )
    try:
        uplink.start()
        renewer.start()
        spool.append(lambda i, seq: make_verdict(seq, agent_id="edge-5"), 3)
        _wait(lambda: renewer.renewed == 1 and uplink.stats.acknowledged_sequence == 3)
        new = x509.load_pem_x509_certificate(cert_file.read_bytes())
        assert _common_name(new) == "edge-5"
        assert new.serial_number != old.serial_number
        assert key_file.read_bytes() != old_pair[0]
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        assert renewer.expires == new.not_valid_after_utc
        assert not list(cert_file.parent.glob("*.new"))

        # Past the old certificate's expiry, a collector restart makes every connection new: only
        # the renewed certificate gets in, and the agent keeps delivering without a restart.
        time.sleep(max(0.0, (old.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() + 0.5))
        running.stop()
        running = CollectorThread(config)
        running.start()
        with grpc.secure_channel(
            address, grpc.ssl_channel_credentials(ca_file.read_bytes(), *old_pair)
        ) as expired:
            stub = agent_service_pb2_grpc.AgentServiceStub(expired)
            heartbeat = agent_service_pb2.HeartbeatRequest(agent_id="edge-5")
            assert _code(lambda: stub.Heartbeat(heartbeat, timeout=5)) == grpc.StatusCode.UNAVAILABLE
        spool.append(lambda i, seq: make_verdict(seq, agent_id="edge-5"), 3)
        _wait(lambda: uplink.stats.acknowledged_sequence == 6)
        assert running.collector is not None
        assert running.collector.store.count() == 6
        assert renewer.renewed == 1
    finally:
        renewer.stop()
        uplink.stop()
        channel.close()
        spool.close()
        running.stop()


def test_the_agent_renews_at_start_within_its_window_and_not_outside(secure: Secure, tmp_path: Path) -> None:
    with secure.client(secure.admin_token) as admin:
        made = admin.create_enrollment_token(ttl=dt.timedelta(minutes=5))
    state = tmp_path / "agent-state"
    enroll = ["--collector", secure.collector.api_address, "--token", made.token, "--state-dir", str(state)]
    done = run_cli("auris.agent", ["enroll", *enroll, "--agent-id", "edge-42", "--ca-sha256", made.ca_sha256])
    assert done.returncode == 0, done.stderr
    cert_file = state / "pki" / "agent.pem"
    enrolled = x509.load_pem_x509_certificate(cert_file.read_bytes())
    pcap = str(PCAPS / "trickbot.pcap")
    args = ["--collector", secure.collector.address, "--models-dir", str(MODELS), "--state-dir", str(state)]

    # 365 days left, renewal 30 days before expiry: nothing to do (the check an agent makes at start).
    key_file, ca_file = state / "pki" / "agent.key", state / "pki" / "ca.pem"
    files = {"ca_file": str(ca_file), "cert_file": str(cert_file), "key_file": str(key_file)}
    with open_channel(secure.collector.address, insecure=False, **files) as channel:
        renewer = CertificateRenewer(
            channel,
            cert_file,
            key_file,
            ca_file,
            renew_before_days=30,
            on_renewed=lambda: pytest.fail("renewed"),
        )
        assert renewer.check() == 3600
    assert renewer.renewed == 0
    assert renewer.expires == enrolled.not_valid_after_utc
    assert x509.load_pem_x509_certificate(cert_file.read_bytes()) == enrolled

    # A window longer than the certificate's life: renewed at start, delivered all the same.
    config = tmp_path / "agent.toml"
    config.write_text("cert_renew_before_days = 400.0\n")
    run = run_cli("auris.agent", ["--config", str(config), *args, "--pcap", pcap])
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("renewed the agent certificate") == 1, run.stderr
    assert "Traceback" not in run.stderr
    renewed = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert _common_name(renewed) == "edge-42"
    assert renewed.serial_number != enrolled.serial_number
    with secure.client(secure.admin_token) as admin:
        stored = list(admin.query(verdict_filter()))
        agent = admin.get_agent("edge-42")
    assert stored
    assert {v.verdict.agent_id for v in stored} == {"edge-42"}
    # Its heartbeat reports the renewed certificate's expiry, and so do its metrics.
    assert agent.health.certificate_expire_time.ToDatetime(dt.UTC) == renewed.not_valid_after_utc
    metrics = {
        m.name: m.value for m in health_metrics(agent_service_pb2.HeartbeatRequest(health=agent.health))
    }
    assert (
        metrics["auris_agent_certificate_expiry_timestamp_seconds"] == renewed.not_valid_after_utc.timestamp()
    )
    assert _audit(secure.collector.store.path, "RenewCertificate") == [("agent:edge-42", "OK")]


def test_an_interrupted_renewal_is_completed_or_dropped_at_start(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["127.0.0.1"])
    _, cert_file, key_file = _agent_files(tmp_path / "state", pki, "edge-6", 1)
    old_cert, old_key = cert_file.read_bytes(), key_file.read_bytes()
    staged_cert, staged_key = cert_file.with_suffix(".pem.new"), key_file.with_suffix(".key.new")
    assert finish_interrupted_renewal(cert_file, key_file) == ""

    # Cut while writing the staged certificate: the old pair stays.
    staged_key.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    staged_cert.write_bytes(b"-----BEGIN CERT")
    assert "dropped" in finish_interrupted_renewal(cert_file, key_file)
    assert (cert_file.read_bytes(), key_file.read_bytes()) == (old_cert, old_key)
    assert not staged_cert.exists()
    assert not staged_key.exists()

    # Cut between the renames (new key in place, new certificate staged): completed.
    ca, ca_key = load_ca(pki / "ca.pem", pki / "ca.key")
    key, csr_pem = certificate_request("edge-6")
    new_cert, _ = sign_agent_csr(ca, ca_key, csr_pem.encode(), "edge-6", 1)
    key_file.write_bytes(_key_pem(key))
    staged_cert.write_bytes(new_cert)
    assert "completed" in finish_interrupted_renewal(cert_file, key_file)
    assert cert_file.read_bytes() == new_cert
    assert not staged_cert.exists()
