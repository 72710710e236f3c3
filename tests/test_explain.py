"""Per-feature contributions of the shipped forest to stored flows: the decomposition is exact, and a
real collector serves it for a verdict an agent sent with its feature vector."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest

from auris.agent.features import NFSTREAM
from auris.agent.manifest import read_manifest
from auris.agent.meter import meter_flows
from auris.agent.scoring import load_model, to_matrix
from auris.collector import ctl
from auris.collector.client import CollectorClient, verdict_filter
from auris.collector.explain import TreeExplainer
from tests.conftest import MODELS, PCAPS, run_agent, running_collector

RF = MODELS / "nfstream-rf.manifest.json"


def test_bias_plus_contributions_is_the_score_of_every_flow() -> None:
    flows = list(meter_flows([str(p) for p in sorted(PCAPS.glob("*.pcap"))], [NFSTREAM]))
    x = to_matrix([f.features["nfstream"] for f in flows], len(NFSTREAM.columns))
    manifest = read_manifest(RF)
    explainer = TreeExplainer(manifest, (MODELS / manifest.onnx_file).read_bytes(), x[::2])
    scores = [s.score for s in load_model(RF).score_matrix(x)]
    for row, score in zip(x, scores, strict=True):
        e = explainer.explain(row, top=len(NFSTREAM.columns))
        assert e.score == pytest.approx(score, abs=1e-5)
        assert e.bias + sum(v for _, v in e.contributions) == pytest.approx(score, abs=1e-5)
    e = explainer.explain(x[int(np.argmax(scores))], top=3)
    magnitudes = [abs(v) for _, v in e.contributions]
    assert len(magnitudes) == 3
    assert magnitudes == sorted(magnitudes, reverse=True)


def test_the_collector_explains_a_stored_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AURIS_AGENT_SEND_FEATURES", "all")
    pcaps = [PCAPS / "masscan_tcp_0_1000_20190821.pcap", PCAPS / "KakaoTalk_chat.pcap", PCAPS / "EAQ.pcap"]
    with running_collector(tmp_path / "auris.db", models_dir=str(MODELS)) as collector:
        run = run_agent(collector.address, pcaps, tmp_path / "agent")
        assert run.returncode == 0, run.stderr
        with CollectorClient(collector.address, insecure=True) as client:
            flagged = next(iter(client.query(verdict_filter(anomalous=True), page_size=1)))
            e = client.explain_verdict(flagged.id, top=5)
            stored_score = next(s.score for s in flagged.verdict.scores if s.model.model_id == "nfstream-rf")
            assert e.score == pytest.approx(stored_score, abs=1e-5)
            assert (e.model.model_id, len(e.contributions)) == ("nfstream-rf", 5)
            assert e.contributions[0].feature in NFSTREAM.columns
            assert "path contributions" in e.method
            # Where the autoencoder alone fired it decided the verdict; explaining it with no model
            # named explains the verdict's classifier. Where both fired, the classifier decided.
            stored = list(client.query(verdict_filter(anomalous=True), page_size=500))
            by_ae = [v for v in stored if v.verdict.model.model_id == "nfstream-ae"]
            assert by_ae
            assert all(v.verdict.label == "anomaly" for v in by_ae)
            assert client.explain_verdict(by_ae[0].id, top=3).model.model_id == "nfstream-rf"
            both = [v for v in stored if all(s.anomalous for s in v.verdict.scores)]
            assert both
            assert {v.verdict.model.model_id for v in both} == {"nfstream-rf"}
            with pytest.raises(grpc.RpcError) as caught:
                client.explain_verdict(10**9)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        out = io.StringIO()
        args = ["--collector", collector.address, "--insecure", "verdicts", "explain", str(flagged.id)]
        assert ctl.main(args, out) == 0
        assert f"attack score {e.score:.4f}" in out.getvalue()
        assert e.contributions[0].feature in out.getvalue()
