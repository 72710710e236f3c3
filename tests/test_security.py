"""Identity on a real collector with a real CA (made by `aurisctl ca init`): enrollment, mTLS agents,
API tokens and roles, revocation, the audit log; and the attacks each of them must refuse."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from auris.collector.auth import POLICY
from auris.collector.client import CollectorClient, verdict_filter
from auris.collector.config import CollectorConfig
from auris.v1 import (
    admin_service_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    feed_service_pb2,
    query_service_pb2,
)
from tests.conftest import CollectorThread, make_verdict, run_cli

READER, ANALYST, ADMIN, ROLE_FEED = (
    admin_service_pb2.ROLE_READER,
    admin_service_pb2.ROLE_ANALYST,
    admin_service_pb2.ROLE_ADMIN,
    admin_service_pb2.ROLE_FEED,
)


class Secure:
    def __init__(self, running: CollectorThread, pki: Path, admin_token: str) -> None:
        self.running = running
        self.pki = pki
        self.admin_token = admin_token
        self.ca_pem = (pki / "ca.pem").read_bytes()

    @property
    def collector(self):  # type: ignore[no-untyped-def]
        assert self.running.collector is not None
        return self.running.collector

    def client(self, token: str = "") -> CollectorClient:
        return CollectorClient(self.collector.api_address, ca_file=str(self.pki / "ca.pem"), token=token)

    def api_channel(self) -> grpc.Channel:
        return grpc.secure_channel(self.collector.api_address, grpc.ssl_channel_credentials(self.ca_pem))

    def agent_channel(self, key_pem: bytes, cert_pem: bytes) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(self.ca_pem, key_pem, cert_pem)
        return grpc.secure_channel(self.collector.address, credentials)

    def enroll(self, token: str, agent_id: str) -> tuple[bytes, bytes]:
        """What an agent does: a fresh key, a request for it, the token; (key PEM, certificate PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, agent_id)]))
            .sign(key, hashes.SHA256())
        )
        with self.api_channel() as channel:
            response = agent_service_pb2_grpc.AgentServiceStub(channel).Enroll(
                agent_service_pb2.EnrollRequest(
                    token=token,
                    agent_id=agent_id,
                    hostname="host-1",
                    csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
                ),
                timeout=10,
            )
        assert response.agent_id == agent_id
        assert response.ca_certificate_pem.encode() == self.ca_pem
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return key_pem, response.certificate_pem.encode()


@contextlib.contextmanager
def secure_collector(tmp_path: Path, **settings: Any) -> Iterator[Secure]:
    """A collector with a real CA (`aurisctl ca init`), both ports on TLS, and a first admin
    token; ``settings`` over the defaults."""
    pki = tmp_path / "pki"
    made = run_cli("auris.collector.ctl", ["ca", "init", "--dir", str(pki), "--name", "127.0.0.1"])
    assert made.returncode == 0, made.stderr
    assert "CA sha256" in made.stdout
    db = tmp_path / "auris.db"
    running = CollectorThread(
        CollectorConfig(
            **{
                "listen": "127.0.0.1:0",
                "api_listen": "127.0.0.1:0",
                "db": str(db),
                "ca_file": str(pki / "ca.pem"),
                "cert_file": str(pki / "collector.pem"),
                "key_file": str(pki / "collector.key"),
                "ca_key_file": str(pki / "ca.key"),
                "signing_key_file": str(pki / "models.key"),
                **settings,
            }
        )
    )
    running.start()
    try:
        # The first admin token comes from the database on the collector's host.
        boot = run_cli(
            "auris.collector.ctl", ["tokens", "create", "--name", "root", "--role", "admin", "--db", str(db)]
        )
        assert boot.returncode == 0, boot.stderr
        yield Secure(running, pki, boot.stdout.strip().splitlines()[-1])
    finally:
        running.stop()


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Secure]:
    with secure_collector(tmp_path) as running:
        yield running


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code = caught.value.code()
    assert isinstance(code, grpc.StatusCode)
    return code


def test_every_rpc_of_the_contract_has_an_access_policy() -> None:
    from auris.v1 import admin_service_pb2 as admin
    from auris.v1 import agent_service_pb2 as agent

    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (agent, query_service_pb2, admin, feed_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods == set(POLICY)


def test_enrollment_gives_an_agent_its_certificate_and_tokens_are_single_use(secure: Secure) -> None:
    with secure.client(secure.admin_token) as admin:
        made = admin.create_enrollment_token(ttl=dt.timedelta(minutes=5), note="rack 7")
        short = admin.create_enrollment_token(ttl=dt.timedelta(seconds=1))
    assert made.ca_sha256 == secure.collector.signer.ca_sha256
    key_pem, cert_pem = secure.enroll(made.token, "edge-7")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "edge-7"

    # The certificate opens the agent port: heartbeat and verdicts as edge-7.
    with secure.agent_channel(key_pem, cert_pem) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        stub.Heartbeat(agent_service_pb2.HeartbeatRequest(agent_id="edge-7", hostname="host-1"), timeout=10)
        request = agent_service_pb2.StreamVerdictsRequest(
            agent_id="edge-7", verdicts=[make_verdict(1, agent_id="edge-7")]
        )
        (ack,) = stub.StreamVerdicts(iter([request]), timeout=10)
        assert ack.acknowledged_sequence == 1
    with secure.client(secure.admin_token) as admin:
        (agent,) = admin.list_agents()
        assert (agent.agent_id, agent.verdicts_stored) == ("edge-7", 1)

    # A used token, an expired one, a forged one, a bad request.
    assert _code(lambda: secure.enroll(made.token, "edge-8")) == grpc.StatusCode.UNAUTHENTICATED
    time.sleep(1.2)
    assert _code(lambda: secure.enroll(short.token, "edge-9")) == grpc.StatusCode.UNAUTHENTICATED
    forged = made.token.rsplit("_", 1)[0] + "_" + "A" * 43
    assert _code(lambda: secure.enroll(forged, "edge-10")) == grpc.StatusCode.UNAUTHENTICATED
    with secure.client(secure.admin_token) as admin:
        fresh = admin.create_enrollment_token(ttl=dt.timedelta(minutes=5))
    with secure.api_channel() as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        bad_csr = agent_service_pb2.EnrollRequest(
            token=fresh.token, agent_id="edge-11", csr_pem="not a request"
        )
        assert _code(lambda: stub.Enroll(bad_csr, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT


def test_roles_and_tokens(secure: Secure) -> None:
    with secure.client(secure.admin_token) as admin:
        reader_token, _ = admin.create_api_token("dashboard", READER)
        analyst_token, _ = admin.create_api_token("ana", ANALYST)
        revoked_token, revoked_id = admin.create_api_token("old", READER)
        brief_token, _ = admin.create_api_token("brief", READER, dt.timedelta(seconds=1))
        admin.revoke_api_token(revoked_id)
    with secure.client(reader_token) as reader:
        assert list(reader.query(verdict_filter())) == []  # reading is allowed
        assert _code(lambda: reader.label([1], "benign")) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: reader.create_api_token("x", ADMIN)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: list(reader.audit_events())) == grpc.StatusCode.PERMISSION_DENIED
    with secure.client(analyst_token) as analyst:
        assert analyst.label([1], "benign") == 0  # allowed (no such verdict)
        assert _code(lambda: analyst.revoke_agent("edge-1")) == grpc.StatusCode.PERMISSION_DENIED
    for token in ("", "auris_nope_nope", revoked_token, "garbage"):
        with secure.client(token) as anyone:
            assert _code(lambda: list(anyone.query(verdict_filter()))) == grpc.StatusCode.UNAUTHENTICATED
    time.sleep(1.2)
    with secure.client(brief_token) as expired:
        assert _code(lambda: list(expired.query(verdict_filter()))) == grpc.StatusCode.UNAUTHENTICATED


def test_agents_speak_only_for_themselves_and_revocation_is_immediate(secure: Secure) -> None:
    with secure.client(secure.admin_token) as admin:
        token = admin.create_enrollment_token(ttl=dt.timedelta(minutes=5)).token
    key_pem, cert_pem = secure.enroll(token, "edge-1")

    def batch(sequence: int, agent_id: str = "edge-1") -> agent_service_pb2.StreamVerdictsRequest:
        return agent_service_pb2.StreamVerdictsRequest(
            agent_id=agent_id, verdicts=[make_verdict(sequence, agent_id=agent_id)]
        )

    with secure.agent_channel(key_pem, cert_pem) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        # Its certificate says edge-1: it cannot pose as edge-2.
        assert _code(lambda: list(stub.StreamVerdicts(iter([batch(1, "edge-2")]), timeout=10))) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        # A live stream: one batch acknowledged, then the agent is revoked, and the next batch is refused.
        import queue

        outbox: queue.Queue[agent_service_pb2.StreamVerdictsRequest | None] = queue.Queue()
        outbox.put(batch(1))
        responses = iter(stub.StreamVerdicts(iter(outbox.get, None), timeout=20))
        assert next(responses).acknowledged_sequence == 1
        with secure.client(secure.admin_token) as admin:
            admin.revoke_agent("edge-1", "host decommissioned")
            assert admin.get_agent("edge-1").state == admin_service_pb2.AGENT_STATE_REVOKED
        outbox.put(batch(2))
        with pytest.raises(grpc.RpcError) as caught:
            next(responses)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        outbox.put(None)
        heartbeat = agent_service_pb2.HeartbeatRequest(agent_id="edge-1")
        assert _code(lambda: stub.Heartbeat(heartbeat, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
    # Nothing after the revocation was stored.
    assert secure.collector.store.count() == 1
    # A revoked id cannot come back with a new token either.
    with secure.client(secure.admin_token) as admin:
        again = admin.create_enrollment_token(ttl=dt.timedelta(minutes=5)).token
    assert _code(lambda: secure.enroll(again, "edge-1")) == grpc.StatusCode.PERMISSION_DENIED

    # Agent RPCs on the API port (no client certificate) and the agent port without one.
    with secure.api_channel() as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        assert _code(lambda: stub.Heartbeat(heartbeat, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    no_cert = grpc.secure_channel(secure.collector.address, grpc.ssl_channel_credentials(secure.ca_pem))
    with no_cert:
        stub = agent_service_pb2_grpc.AgentServiceStub(no_cert)
        assert _code(lambda: stub.Heartbeat(heartbeat, timeout=10)) == grpc.StatusCode.UNAVAILABLE


def test_actions_and_refusals_are_audited_in_an_append_only_log(secure: Secure, tmp_path: Path) -> None:
    with secure.client(secure.admin_token) as admin:
        reader_token, reader_id = admin.create_api_token("dashboard", READER)
    with secure.client(reader_token) as reader:
        _code(lambda: reader.revoke_api_token(reader_id))
    import io
    import json

    from auris.collector import ctl

    config = tmp_path / "ctl.toml"
    config.write_text(f'ca_file = "{secure.pki / "ca.pem"}"\ntoken = "{secure.admin_token}"\n')
    buffer = io.StringIO()
    assert (
        ctl.main(
            ["--config", str(config), "--collector", secure.collector.api_address, "audit", "--json"], buffer
        )
        == 0
    )
    events = [json.loads(line) for line in buffer.getvalue().splitlines()]
    seen = [(e["actor"], e["action"], e.get("target", ""), e["result"]) for e in events]
    assert ("token:root", "CreateApiToken", "name=dashboard", "OK") in seen
    assert any(
        action == "RevokeApiToken" and result == "PERMISSION_DENIED" and actor == "token:dashboard"
        for actor, action, _, result in seen
    ), seen
    with (
        sqlite3.connect(secure.collector.store.path) as conn,
        pytest.raises(sqlite3.DatabaseError, match="append-only"),
    ):
        conn.execute("DELETE FROM audit")


def test_the_agent_enrolls_with_a_pinned_ca_then_delivers_over_mtls(secure: Secure, tmp_path: Path) -> None:
    from tests.conftest import MODELS, PCAPS

    with secure.client(secure.admin_token) as admin:
        made = admin.create_enrollment_token(ttl=dt.timedelta(minutes=5))
    state = tmp_path / "agent-state"
    api = secure.collector.api_address
    # A wrong pin: the agent refuses before sending the token anywhere.
    common = ["--collector", api, "--token", made.token, "--state-dir", str(state), "--agent-id", "edge-42"]
    wrong = run_cli("auris.agent", ["enroll", *common, "--ca-sha256", "ab" * 32])
    assert wrong.returncode == 4
    assert "does not present the CA" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    done = run_cli("auris.agent", ["enroll", *common, "--ca-sha256", made.ca_sha256])
    assert done.returncode == 0, done.stderr
    assert "enrolled as edge-42" in done.stdout
    assert oct((state / "pki" / "agent.key").stat().st_mode & 0o777) == "0o600"
    # The collector's model-signing key arrives with the certificate (its private half stays put).
    assert oct((secure.pki / "models.key").stat().st_mode & 0o777) == "0o600"
    assert (state / "pki" / "models.pub").read_text() == (secure.pki / "models.pub").read_text()
    # No TLS settings given: the enrolled certificate is used, and its id.
    pcap = str(PCAPS / "trickbot.pcap")
    args = ["--collector", secure.collector.address, "--models-dir", str(MODELS), "--state-dir", str(state)]
    run = run_cli("auris.agent", [*args, "--pcap", pcap])
    assert run.returncode == 0, run.stderr
    with secure.client(secure.admin_token) as admin:
        stored = list(admin.query(verdict_filter()))
    assert stored
    assert {v.verdict.agent_id for v in stored} == {"edge-42"}


def test_a_feed_token_submits_records_and_nothing_else(secure: Secure) -> None:
    """The feed role is a producer's: it submits transactions and ticks (so do admins), and may not
    read anything back or reach any other RPC; readers may not submit."""
    tx = feed_service_pb2.Transaction(feed_id="cards", transaction_id="t1", customer_id="c", amount=3.5)
    tx.time.FromNanoseconds(1_700_000_000_000_000_000)
    tick = feed_service_pb2.Tick(feed_id="bars", symbol="X", price=10.0, size=1.0)
    tick.time.FromNanoseconds(1_700_000_000_000_000_000)
    with secure.client(secure.admin_token) as admin:
        producer_token, _ = admin.create_api_token("pos-gateway", ROLE_FEED)
        reader_token, _ = admin.create_api_token("dashboard", READER)
        second = feed_service_pb2.Transaction()
        second.CopyFrom(tx)
        second.transaction_id = "t2"
        assert admin.submit_transactions([second]).accepted == 1  # admins still may
    with secure.client(producer_token) as producer:
        assert producer.submit_transactions([tx]).accepted == 1
        assert producer.submit_ticks([tick]).accepted == 1
        for denied in (
            lambda: list(producer.feed_scores("cards")),
            lambda: list(producer.query(verdict_filter())),
            lambda: producer.list_feeds(),
            lambda: producer.create_api_token("x", ROLE_FEED),
        ):
            assert _code(denied) == grpc.StatusCode.PERMISSION_DENIED
    with secure.client(reader_token) as reader:
        assert _code(lambda: reader.submit_transactions([tx])) == grpc.StatusCode.PERMISSION_DENIED
        assert [s.record_id for s in reader.feed_scores("cards")] == ["t1", "t2"]  # newest first
