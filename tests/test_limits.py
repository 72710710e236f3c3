"""Rate limits on a real collector with a real CA: a token over its rate is refused with
RESOURCE_EXHAUSTED (others are not), and works again once its bucket refills; an agent over its
rate is refused without losing a verdict (the uplink waits as told and resends from its spool)."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from auris.agent.config import ConfigError
from auris.agent.spool import Spool
from auris.agent.uplink import Uplink, open_channel
from auris.collector.config import load_collector_config
from auris.collector.limits import RETRY_AFTER_KEY, KeyedBuckets, TokenBucket
from auris.v1 import admin_service_pb2
from tests.conftest import make_verdict
from tests.test_security import secure_collector


def _scrape(port: int, name: str, kind: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf'^{name}{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
    assert found, text
    return float(found.group(1))


def _retry_after_ms(refusal: object) -> int:
    assert isinstance(refusal, grpc.Call)
    metadata = {key: value for key, value in refusal.trailing_metadata() or ()}
    return int(metadata[RETRY_AFTER_KEY])


def test_a_bucket_admits_its_burst_then_its_rate_and_big_requests_in_debt() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert all(bucket.take(1, 0.0).admitted for _ in range(5))
    refused = bucket.take(1, 0.0)
    assert not refused.admitted
    assert refused.first_refusal
    assert refused.retry_after_s == pytest.approx(0.1)
    assert not bucket.take(1, 0.05).first_refusal  # the same run of refusals
    assert bucket.take(1, 0.1).admitted
    # Larger than the burst: admitted once the bucket is full, which then owes the rest.
    assert bucket.take(50, 10.0).admitted
    owed = bucket.take(1, 10.0)
    assert not owed.admitted
    assert owed.retry_after_s == pytest.approx(4.6)
    # Keys do not share buckets; rate 0 is no limit.
    keyed = KeyedBuckets(1, 1, clock=lambda: 0.0)
    assert keyed.take("a").admitted
    assert keyed.take("b").admitted
    assert not keyed.take("a").admitted
    assert keyed.refused == 1
    assert all(KeyedBuckets(0, 0).take("a", 10**9).admitted for _ in range(3))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"agent_rate_limit": -1.0}, "agent_rate_limit must not be negative"),
        ({"token_rate_limit": 5.0, "token_rate_burst": 0.5}, "token_rate_burst must be at least 1"),
    ],
)
def test_bad_rate_limits_are_one_line_config_errors(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_collector_config(overrides={"insecure": True, **settings})


def test_a_token_over_its_rate_is_refused_alone_and_recovers(tmp_path: Path) -> None:
    settings = {"token_rate_limit": 2.0, "token_rate_burst": 3.0, "metrics_listen": "127.0.0.1:0"}
    with secure_collector(tmp_path, **settings) as secure:
        with secure.client(secure.admin_token) as admin:
            hasty, _ = admin.create_api_token("hasty", admin_service_pb2.ROLE_READER)
            calm, _ = admin.create_api_token("calm", admin_service_pb2.ROLE_READER)
        with secure.client(hasty) as client:
            admitted = 0
            refusal: grpc.RpcError | None = None
            for _ in range(20):
                try:
                    client.list_agents()
                except grpc.RpcError as exc:
                    refusal = exc
                    break
                admitted += 1
            # At least the burst passes (the bucket refills a little while the calls are made).
            assert isinstance(refusal, grpc.Call)
            assert admitted >= 3
            assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = refusal.details()
            assert "token:hasty is over its rate limit of 2 calls/s (burst 3)" in details
            assert "\n" not in details
            retry_ms = _retry_after_ms(refusal)
            assert 0 < retry_ms <= 500
            # Refused again straight away: the same run of refusals, audited once.
            with pytest.raises(grpc.RpcError) as again:
                client.list_agents()
            assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Another token has a bucket of its own.
            with secure.client(calm) as other:
                other.list_agents()
            # Once the bucket has refilled for the time the refusal named, calls pass again.
            time.sleep(_retry_after_ms(again.value) / 1000 + 0.05)
            client.list_agents()
        assert secure.collector.metrics is not None
        assert _scrape(secure.collector.metrics.port, "auris_collector_rate_limited_total", "token") >= 2
        assert _scrape(secure.collector.metrics.port, "auris_collector_rate_limited_total", "agent") == 0
        with sqlite3.connect(secure.collector.store.path) as conn:
            audited = conn.execute(
                "SELECT actor, action FROM audit WHERE result = 'RESOURCE_EXHAUSTED'"
            ).fetchall()
        assert audited == [("token:hasty", "ListAgents")]


def test_an_agent_over_its_rate_is_refused_and_loses_nothing(tmp_path: Path) -> None:
    total = 600
    settings = {"agent_rate_limit": 400.0, "agent_rate_burst": 100.0}
    with secure_collector(tmp_path, **settings) as secure:
        with secure.client(secure.admin_token) as admin:
            token = admin.create_enrollment_token(ttl=dt.timedelta(minutes=5)).token
        key_pem, cert_pem = secure.enroll(token, "edge-1")
        (tmp_path / "agent.key").write_bytes(key_pem)
        (tmp_path / "agent.pem").write_bytes(cert_pem)
        spool = Spool(tmp_path / "spool.db")
        spool.append(lambda _, sequence: make_verdict(sequence, agent_id="edge-1"), total)
        channel = open_channel(
            secure.collector.address,
            insecure=False,
            ca_file=str(secure.pki / "ca.pem"),
            cert_file=str(tmp_path / "agent.pem"),
            key_file=str(tmp_path / "agent.key"),
        )
        uplink = Uplink(channel, "edge-1", spool, batch=50, window=8)
        uplink.start()
        try:
            assert uplink.finish(stall_timeout_s=30), uplink.last_error
        finally:
            uplink.stop()
            channel.close()
        assert uplink.stats.throttled >= 1
        assert "RESOURCE_EXHAUSTED" in uplink.last_error
        assert "agent:edge-1 is over its rate limit of 400 verdicts/s" in uplink.last_error
        assert uplink.stats.rejected == 0
        assert spool.stats.depth == 0
        spool.close()
        assert secure.collector.limits.agents.refused >= 1
        with sqlite3.connect(secure.collector.store.path) as conn:
            count, distinct, low, high = conn.execute(
                "SELECT COUNT(*), COUNT(DISTINCT sequence), MIN(sequence), MAX(sequence) FROM verdicts"
                " WHERE agent_id = 'edge-1'"
            ).fetchone()
            audited = conn.execute(
                "SELECT actor, action FROM audit WHERE result = 'RESOURCE_EXHAUSTED'"
            ).fetchall()
        assert (count, distinct, low, high) == (total, total, 1, total)
        assert ("agent:edge-1", "StreamVerdicts") in audited
        # The admin's token was never limited by the agent's bucket.
        with secure.client(secure.admin_token) as admin:
            assert [a.agent_id for a in admin.list_agents()] == ["edge-1"]


def test_calls_without_credentials_are_limited_per_address_before_they_flood_the_audit_log(
    tmp_path: Path,
) -> None:
    with secure_collector(tmp_path, peer_rate_limit=0.5, peer_rate_burst=3.0) as secure:
        codes: list[grpc.StatusCode] = []
        with secure.client("auris_deadbeef_not-a-real-secret") as forged:
            for _ in range(8):
                with pytest.raises(grpc.RpcError) as caught:
                    forged.list_agents()
                codes.append(caught.value.code())
        assert codes[:3] == [grpc.StatusCode.UNAUTHENTICATED] * 3
        assert set(codes[3:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        # A valid token from the same address is not held back by that.
        with secure.client(secure.admin_token) as admin:
            admin.list_agents()
        with sqlite3.connect(secure.collector.store.path) as conn:
            refusals = conn.execute(
                "SELECT result, COUNT(*) FROM audit WHERE action = 'ListAgents' GROUP BY result"
            ).fetchall()
        # Three refusals and one entry for the run of rate-limit refusals, not eight.
        assert sorted(refusals) == [("RESOURCE_EXHAUSTED", 1), ("UNAUTHENTICATED", 3)]
        assert secure.collector.limits.peers.refused == 5
