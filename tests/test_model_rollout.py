"""Model lifecycle across a real collector and two real live agents: promotion reaches both, they
swap between batches and report it, rollback restores the old version, and models an agent must not
run (a key it does not trust, a feature set it cannot compute, a modified download) are refused
while the old version keeps scoring."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auris.agent.manifest import ManifestError, find_manifests, read_manifest
from auris.agent.model_updates import ModelCatalog
from auris.agent.signing import ModelTrust, public_key_pem, sign_manifest
from auris.collector import ctl
from auris.collector.client import CollectorClient, verdict_filter
from auris.collector.registry import ModelRegistry
from auris.collector.store import VerdictStore
from auris.v1 import admin_service_pb2, model_pb2
from tests.conftest import (
    MODELS,
    PCAPS,
    TEST_SIGNING_KEY,
    TEST_TRUST,
    CollectorThread,
    run_agent,
    running_collector,
    wait_for,
    write_test_key,
)
from tests.test_live import PEER_IP, _wait_for_capture, veth  # noqa: F401  # the fixture

RF = "nfstream-rf"


def _shipped() -> tuple[model_pb2.ModelManifest, bytes]:
    manifest = read_manifest(MODELS / f"{RF}.manifest.json")
    return manifest, (MODELS / manifest.onnx_file).read_bytes()


def _version(version: str, *, threshold: float | None = None) -> model_pb2.ModelManifest:
    """The shipped classifier as another version (same graph), unsigned: the collector signs it."""
    manifest, _ = _shipped()
    manifest.version = version
    if threshold is not None:
        manifest.threshold.value = threshold
    manifest.ClearField("signature")
    manifest.ClearField("signing_key_id")
    return manifest


def _shipped_set() -> list[str]:
    """What an agent runs when the collector wants nothing: every default model in models/."""
    manifests = (read_manifest(p) for p in find_manifests(MODELS))
    return sorted(f"{m.model_id}@{m.version}" for m in manifests)


def _running(client: CollectorClient) -> dict[str, list[str]]:
    return {a.agent_id: sorted(f"{m.model_id}@{m.version}" for m in a.models) for a in client.list_agents()}


def _udp_flow() -> None:
    """One new UDP flow to the peer's echo server (a fresh source port each time)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(2)
        udp.sendto(b"auris" * 10, (PEER_IP, 5300))
        udp.recvfrom(2048)


@pytest.fixture
def rollout_collector(tmp_path: Path) -> Iterator[tuple[CollectorThread, Ed25519PrivateKey]]:
    foreign = Ed25519PrivateKey.generate()  # trusted by the collector, not by the agents
    (tmp_path / "foreign.pub").write_text(public_key_pem(foreign.public_key()))
    models = tmp_path / "collector-models"
    models.mkdir()
    for path in MODELS.glob(f"{RF}.*"):
        shutil.copy(path, models)
    with running_collector(
        tmp_path / "auris.db",
        models_dir=str(models),
        signing_key_file=str(write_test_key(tmp_path / "models.key")),
        model_keys=(str(tmp_path / "foreign.pub"),),
        agent_offline_after_s=30.0,
    ) as collector:
        yield collector, foreign


def _start_agent(
    collector: CollectorThread, interface: str, tmp_path: Path, name: str
) -> subprocess.Popen[str]:
    state = tmp_path / name
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'interface = "{interface}"\nbpf_filter = "udp"\nidle_timeout_s = 1\nheartbeat_interval_s = 1.0\n'
        f'agent_id = "{name}"\nmodel_keys = ["{tmp_path / "models.pub"}"]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AURIS_AGENT_")}
    return subprocess.Popen(
        [sys.executable, "-m", "auris.agent", "--insecure", "--collector", collector.address,
         "--config", str(config), "--models-dir", str(MODELS), "--state-dir", str(state)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip


def test_promotion_reaches_two_agents_and_rollback_restores(
    veth: tuple[str, str],  # noqa: F811
    rollout_collector: tuple[CollectorThread, Ed25519PrivateKey],
    tmp_path: Path,
) -> None:
    collector, foreign = rollout_collector
    interface, _ = veth
    agents = [_start_agent(collector, interface, tmp_path, f"agent-{i}") for i in (1, 2)]
    try:
        with CollectorClient(collector.address, insecure=True) as client:
            shipped = f"{RF}@{_shipped()[0].version}"
            assert wait_for(lambda: _running(client) == {"agent-1": [shipped], "agent-2": [shipped]}, 60)
            for agent in agents:
                _wait_for_capture(agent)
            rollout = client.model(RF).rollout
            assert (rollout.agents_running, rollout.agents_online) == (2, 2)

            # A new version comes in unsigned; the collector signs it; a candidate until promoted.
            _, onnx = _shipped()
            registered = client.register_model(_version("2", threshold=0.4), onnx)
            assert registered.stage == admin_service_pb2.MODEL_STAGE_CANDIDATE
            TEST_TRUST.verify(registered.manifest, "test")
            client.promote_model(RF, "2")
            want = {"agent-1": [f"{RF}@2"], "agent-2": [f"{RF}@2"]}
            assert wait_for(lambda: _running(client) == want, 30), _running(client)
            assert client.model(RF).rollout.agents_running == 2
            # Flows metered after the swap are scored by the new version.
            _udp_flow()

            def scored() -> list[tuple[int, list[str]]]:
                stored = client.query(verdict_filter(ip=PEER_IP), page_size=100)
                return [
                    (v.verdict.flow.src_port, [s.model.version for s in v.verdict.scores]) for v in stored
                ]

            assert wait_for(lambda: any("2" in versions for _, versions in scored()), 20), scored()

            # Rollback: both agents go back to the shipped version (from their own disk).
            assert client.rollback_model(RF).manifest.version == _shipped()[0].version
            assert wait_for(lambda: _running(client) == {"agent-1": [shipped], "agent-2": [shipped]}, 30)

            # A version signed by a key the collector trusts but the agents do not: refused by both,
            # which keep running the old one and say why; the collector shows it in the rollout.
            foreign_version = _version("3-foreign")
            sign_manifest(foreign_version, foreign)
            client.register_model(foreign_version, onnx)
            client.promote_model(RF, "3-foreign")

            def refused_by_both() -> bool:
                refusals = client.model(RF).rollout.refusals
                return {r.agent_id for r in refusals} == {"agent-1", "agent-2"}

            assert wait_for(refused_by_both, 30)
            reasons = {r.reason for r in client.model(RF).rollout.refusals}
            assert all("which is not trusted here" in r for r in reasons), reasons
            assert _running(client) == {"agent-1": [shipped], "agent-2": [shipped]}
            assert client.model(RF).rollout.agents_running == 0

            # A feature set no agent computes: refused the same way.
            zeek = _version("4-zeek")
            zeek.feature_set.name = "zeek-conn"
            client.register_model(zeek, onnx)
            client.promote_model(RF, "4-zeek")
            assert wait_for(
                lambda: any("unknown feature set" in r.reason for r in client.model(RF).rollout.refusals), 30
            )
            assert _running(client) == {"agent-1": [shipped], "agent-2": [shipped]}
            # Still scoring with the old version.
            before = len(list(client.query(verdict_filter(ip=PEER_IP), page_size=1000)))
            _udp_flow()
            assert wait_for(
                lambda: len(list(client.query(verdict_filter(ip=PEER_IP), page_size=1000))) > before, 20
            )
            newest = next(iter(client.query(verdict_filter(ip=PEER_IP), page_size=1)))
            assert [f"{s.model.model_id}@{s.model.version}" for s in newest.verdict.scores] == [shipped]

            # Retiring the production version leaves the model with none: the collector wants nothing
            # of it, and the agents fall back to their shipped models.
            assert client.retire_model(RF, "4-zeek").stage == admin_service_pb2.MODEL_STAGE_RETIRED
            with pytest.raises(grpc.RpcError) as caught:
                client.model(RF)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert wait_for(lambda: all(not a.refused_models for a in client.list_agents()), 30)
            defaults = _shipped_set()
            assert shipped in defaults
            assert _running(client) == {"agent-1": defaults, "agent-2": defaults}
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
            _, err = agent.communicate(timeout=30)
            assert agent.returncode == 0, err
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()


def test_a_tampered_download_is_refused_and_a_restart_runs_the_wanted_set(tmp_path: Path) -> None:
    """What the watcher stores: a flipped byte or an untrusted signature never reaches the disk; what
    was stored and wanted is what a restarted agent runs, even with no collector."""
    trust = ModelTrust.load([]).with_key(TEST_SIGNING_KEY.public_key())
    catalog = ModelCatalog(MODELS, tmp_path / "state", trust)
    manifest, onnx = _version("7"), _shipped()[1]
    sign_manifest(manifest, TEST_SIGNING_KEY)
    flipped = bytearray(onnx)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(ManifestError, match="do not match the manifest's sha256"):
        catalog.store(manifest, bytes(flipped))
    assert not (tmp_path / "state" / "models" / f"{RF}@7").exists()
    stranger = Ed25519PrivateKey.generate()
    other = _version("8")
    sign_manifest(other, stranger)
    with pytest.raises(ManifestError, match="not trusted here"):
        catalog.store(other, onnx)

    stored = catalog.store(manifest, onnx)
    assert (
        hashlib.sha256((stored.parent / manifest.onnx_file).read_bytes()).hexdigest() == manifest.onnx_sha256
    )
    catalog.save_desired([model_pb2.ModelRef(model_id=RF, version="7")])
    # A new catalog (a restarted agent) runs the wanted version from its own disk.
    models, refusals, errors = ModelCatalog(MODELS, tmp_path / "state", trust).compose()
    assert [m.ref for m in models.models] == [f"{RF}@7"]
    assert (refusals, errors) == ([], [])
    # Wanting something it does not have: refused, and with nothing running before, the shipped set.
    catalog.save_desired([model_pb2.ModelRef(model_id=RF, version="99")])
    models, refusals, _ = catalog.compose()
    assert [r.reason for r in refusals] == [f"{RF}@99 is not downloaded yet"]
    assert sorted(m.ref for m in models.models) == _shipped_set()


def test_a_shadow_version_scores_beside_production_and_compare_counts_it(tmp_path: Path) -> None:
    key = write_test_key(tmp_path / "models.key")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for path in MODELS.glob(f"{RF}.*"):
        shutil.copy(path, shipped)
    db = tmp_path / "auris.db"
    with running_collector(db, models_dir=str(shipped), signing_key_file=str(key)) as collector:
        with CollectorClient(collector.address, insecure=True) as client:
            _, onnx = _shipped()
            # The same graph with a lower threshold: it flags every flow production flags, and more.
            client.register_model(_version("2", threshold=0.05), onnx)
            shadowed = client.shadow_model(RF, "2")
            assert shadowed.stage == admin_service_pb2.MODEL_STAGE_SHADOW
        # What the agent would have downloaded and kept: a restart runs it from its disk at once.
        store = VerdictStore(db)
        manifest, signed_onnx = ModelRegistry(store).onnx(model_pb2.ModelRef(model_id=RF, version="2"))
        store.close()
        catalog = ModelCatalog(
            MODELS, tmp_path / "agent", ModelTrust.load([]).with_key(TEST_SIGNING_KEY.public_key())
        )
        catalog.store(manifest, signed_onnx)
        catalog.save_desired(
            [model_pb2.ModelRef(model_id=RF, version="1")], [model_pb2.ModelRef(model_id=RF, version="2")]
        )
        config = tmp_path / "agent.toml"
        config.write_text(f'model_keys = ["{tmp_path / "models.pub"}"]\n')
        pcaps = [PCAPS / "masscan_tcp_0_1000_20190821.pcap", PCAPS / "KakaoTalk_chat.pcap"]
        run = run_agent(collector.address, pcaps, tmp_path / "agent", "--config", str(config))
        assert run.returncode == 0, run.stderr
        with CollectorClient(collector.address, insecure=True) as client:
            stored = list(client.query(verdict_filter(), page_size=1000))
            assert stored
            for v in stored:
                by_version = {s.model.version: s for s in v.verdict.scores}
                assert set(by_version) == {"1", "2"}
                assert by_version["2"].shadow
                assert not by_version["1"].shadow
                # Production alone decides the verdict.
                assert v.verdict.model.version == "1"
                assert v.verdict.anomalous == by_version["1"].anomalous
            since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
            c = client.compare_models(RF, "2", since=since)
            assert c.flows == len(stored)
            assert c.production_anomalous == sum(v.verdict.anomalous for v in stored)
            assert c.only_production == 0
            assert c.shadow_anomalous >= c.production_anomalous
            assert c.agree == c.flows - c.only_shadow
            out = io.StringIO()
            assert (
                ctl.main(
                    ["--collector", collector.address, "--insecure", "models", "compare", f"{RF}@2"], out
                )
                == 0
            )
            assert f"agreement {c.agree / c.flows:.1%}" in out.getvalue()
            assert (
                client.shadow_model(RF, "2", enabled=False).stage == admin_service_pb2.MODEL_STAGE_CANDIDATE
            )
