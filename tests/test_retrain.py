"""Retraining on a small labelled set: an agent sends feature vectors with its verdicts, an analyst
labels them, `aurisctl models retrain` trains a new version, judges it beside the production one on
the same held-back slice and registers it, signed, as a candidate that the agent can load."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from auris.agent.features import NFSTREAM
from auris.agent.manifest import dump_manifest
from auris.agent.scoring import load_model
from auris.agent.signing import key_id
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
    run_agent,
    running_collector,
    write_test_key,
)

BENIGN = ["KakaoTalk_chat.pcap", "EAQ.pcap", "steam.pcap", "kerberos.pcap", "netbios.pcap", "http_ipv6.pcap",
          "dns_fragmented.pcap"]  # fmt: skip
ATTACK = ["masscan_tcp_0_1000_20190821.pcap", "nmap_nmap_80_w_service_detection.pcap", "WebattackSQLinj.pcap"]


def test_retraining_from_labelled_flows_registers_a_loadable_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AURIS_AGENT_SEND_FEATURES", "all")
    key = write_test_key(tmp_path / "models.key")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for path in MODELS.glob("nfstream-rf.*"):
        shutil.copy(path, shipped)
    db = tmp_path / "auris.db"
    retrain = ["models", "retrain", "--model", "nfstream-rf", "--db", str(db), "--signing-key", str(key)]
    with running_collector(db, models_dir=str(shipped), signing_key_file=str(key)) as running:
        run = run_agent(running.address, [PCAPS / name for name in BENIGN + ATTACK], tmp_path / "agent")
        assert run.returncode == 0, run.stderr
        with CollectorClient(running.address, insecure=True) as client:
            stored = list(client.query(verdict_filter(), page_size=1000))
            sent = {(f.feature_set, len(f.values)) for v in stored for f in v.verdict.features}
            assert sent == {("nfstream", len(NFSTREAM.columns))}
            assert all(len(v.verdict.features) == 1 for v in stored)
            # Nothing labelled yet: a one-line refusal, nothing registered.
            assert ctl.main([*retrain, "--version", "2"], io.StringIO()) == 2
            by_label: dict[str, list[int]] = {"attack": [], "benign": [], "unsure": []}
            for i, v in enumerate(stored):
                label = "attack" if v.verdict.capture_source in ATTACK else "benign"
                by_label["unsure" if i % 10 == 0 else label].append(v.id)
            for label, ids in by_label.items():
                assert client.label(ids, label, author="analyst") == len(ids)

            out = io.StringIO()
            assert ctl.main([*retrain, "--version", "2", "--json"], out) == 0, out.getvalue()
            report = json.loads(out.getvalue())
            assert report["registered"] == "nfstream-rf@2"
            assert report["rows"] == len(stored) - len(by_label["unsure"])
            assert report["dropped"] == {"unsure": len(by_label["unsure"])}
            comparison = report["comparison"]
            assert {"macro F1", "false-positive rate", "F1 attack", "F1 benign"} <= set(comparison)
            for figures in comparison.values():
                assert 0.0 <= figures["active"] <= 1.0
                assert 0.0 <= figures["new"] <= 1.0
            # No claim that the new version is better: the shipped one was trained on these very
            # captures, so it has an edge on this slice; the figures are there to decide by.

            candidate = client.model("nfstream-rf", "2")
            assert candidate.stage == admin_service_pb2.MODEL_STAGE_CANDIDATE
            assert candidate.manifest.signing_key_id == key_id(TEST_SIGNING_KEY.public_key())
            evaluation = candidate.manifest.evaluation
            assert evaluation.extra["active_macro_f1"] == pytest.approx(comparison["macro F1"]["active"])
            assert evaluation.macro_f1 == pytest.approx(comparison["macro F1"]["new"])
            assert candidate.manifest.training_data[0].rows == report["rows"]
            text = io.StringIO()
            assert ctl.main([*retrain, "--version", "3"], text) == 0
            assert "SAME HELD-BACK SLICE" in text.getvalue()
            assert "registered nfstream-rf@3 as a candidate" in text.getvalue()
            # Promotion stays a separate step: production is unchanged.
            assert client.model("nfstream-rf").manifest.version == "1"

            # Base data (a table of the model's columns + label) joins the labelled flows, and
            # --promote-if-better promotes through the API only when no figure got worse.
            columns = list(candidate.manifest.feature_set.columns)
            base = tmp_path / "base.csv"
            with base.open("w") as fh:
                fh.write(",".join([*columns, "label"]) + "\n")
                for v in stored[:40]:
                    values = dict(zip(NFSTREAM.columns, v.verdict.features[0].values, strict=True))
                    label = "attack" if v.verdict.capture_source in ATTACK else "benign"
                    fh.write(",".join([*(repr(values[c]) for c in columns), label]) + "\n")
            out = io.StringIO()
            args = ["--collector", running.address, "--insecure", *retrain, "--version", "4", "--json",
                    "--base-data", str(base), "--promote-if-better"]  # fmt: skip
            assert ctl.main(args, out) == 0, out.getvalue()
            report = json.loads(out.getvalue())
            assert report["rows"] == len(stored) - len(by_label["unsure"]) + 40
            better = all(
                f["new"] <= f["active"] if name == "false-positive rate" else f["new"] >= f["active"]
                for name, f in report["comparison"].items()
            )
            assert report["promoted"] is better
            assert client.model("nfstream-rf").manifest.version == ("4" if better else "1")
            bad = tmp_path / "bad.csv"
            bad.write_text("a,b\n1,2\n")
            assert ctl.main([*retrain, "--version", "5", "--base-data", str(bad)], io.StringIO()) == 2

    # The registered version loads in the agent's runtime and scores the same vectors.
    store = VerdictStore(db)
    manifest, onnx = ModelRegistry(store).onnx(model_pb2.ModelRef(model_id="nfstream-rf", version="2"))
    rows = store.labelled_features("nfstream", NFSTREAM.version)
    store.close()
    folder = tmp_path / "loaded"
    folder.mkdir()
    (folder / manifest.onnx_file).write_bytes(onnx)
    (folder / "nfstream-rf.manifest.json").write_text(dump_manifest(manifest))
    model = load_model(folder / "nfstream-rf.manifest.json", trust=TEST_TRUST)
    scores = model.score_matrix(np.asarray([values for _, _, values in rows[:50]], dtype=np.float32))
    assert len(scores) == 50
    assert {s.model_version for s in scores} == {"2"}
