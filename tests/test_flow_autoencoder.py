"""The default network autoencoder (``nfstream-ae``): export parity and the agent scoring it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from auris.agent.features import NFSTREAM
from auris.agent.meter import meter_flows
from auris.agent.scoring import load_model, load_models, to_matrix
from auris.training.export import write_model
from auris.training.flow_autoencoder import fit_flow_autoencoder, flow_shapes
from auris.training.metrics import detector_evaluation
from auris.v1 import model_pb2
from tests.conftest import MODELS, PCAPS, TEST_SIGNING_KEY, TEST_TRUST

# Relative to max(1, |score|): float32 in the graph against scikit-learn's float64 MLP.
PARITY_TOLERANCE = 1e-4
BENIGN_CAPTURES = ("EAQ", "KakaoTalk_chat", "dns_fragmented", "http_ipv6", "kerberos", "netbios", "steam")


def _rows(*names: str) -> np.ndarray:
    flows = [f for name in names for f in meter_flows([str(PCAPS / f"{name}.pcap")], [NFSTREAM])]
    return to_matrix([f.features[NFSTREAM.name] for f in flows], len(NFSTREAM.columns))


@pytest.fixture(scope="module")
def benign() -> np.ndarray:
    return _rows(*BENIGN_CAPTURES)


@pytest.fixture(scope="module")
def scan() -> np.ndarray:
    return _rows("masscan_tcp_0_1000_20190821")


def test_the_graph_matches_its_source_and_the_agent_reads_it(
    tmp_path: Path, benign: np.ndarray, scan: np.ndarray
) -> None:
    assert set(flow_shapes(benign, NFSTREAM.columns).tolist()) == {0, 1, 2}  # every shape is fitted
    model = fit_flow_autoencoder(benign, NFSTREAM.columns, hidden=(16, 4, 16), seeds=(0, 1))
    rows = np.concatenate([benign, scan[:200]])
    reference, column_errors = model.reference(rows)
    np.testing.assert_allclose(column_errors.sum(axis=1), reference, rtol=1e-5)
    threshold = float(np.quantile(model.reference(benign)[0], 0.99))
    path = write_model(
        tmp_path,
        "ae",
        model.to_onnx(),
        model_id="ae",
        version="1",
        kind=model_pb2.MODEL_KIND_AUTOENCODER,
        feature_set=NFSTREAM,
        labels=[],
        normal_label="benign",
        score_output="score",
        explanation_output="feature_errors",
        threshold=threshold,
        threshold_method="test",
        evaluation=detector_evaluation(["benign"], np.zeros(1), threshold, "benign", "test"),
        provenance={},
        description="test model",
        signing_key=TEST_SIGNING_KEY,
    )
    loaded = load_model(path, trust=TEST_TRUST)
    scores = loaded.score_matrix(rows)
    ours = np.array([s.score for s in scores])
    assert np.max(np.abs(ours - reference) / np.maximum(1.0, np.abs(reference))) < PARITY_TOLERANCE
    # The explanation: the three largest per-column errors, by name, as the source computes them.
    columns = list(NFSTREAM.columns)
    for score, errors in zip(scores, column_errors, strict=True):
        assert len(score.top_features) == 3
        for name, value in score.top_features:
            assert value == pytest.approx(errors[columns.index(name)], rel=1e-3, abs=1e-5)
        assert score.top_features[0][1] == pytest.approx(errors.max(), rel=1e-3, abs=1e-5)
        largest = sorted(errors.tolist(), reverse=True)[:3]
        assert [value for _, value in score.top_features] == pytest.approx(largest, rel=1e-3, abs=1e-5)


def test_the_shipped_autoencoder_runs_without_training_libraries(
    tmp_path: Path, benign: np.ndarray, scan: np.ndarray
) -> None:
    """Scored by the agent's loader in a process where scikit-learn, onnx and torch cannot import."""
    np.save(tmp_path / "benign.npy", benign)
    np.save(tmp_path / "scan.npy", scan)
    script = textwrap.dedent(
        f"""
        import json, sys
        for name in ("sklearn", "skl2onnx", "torch", "onnx", "matplotlib"):
            sys.modules[name] = None  # import fails, as on an agent without the training extra
        import numpy as np
        from pathlib import Path
        from auris.agent.scoring import load_models
        models, errors = load_models(Path({str(MODELS)!r}))  # the release key only
        (ae,) = [m for m in models.models if m.manifest.model_id == "nfstream-ae"]
        out = {{}}
        for name in ("benign", "scan"):
            scores = ae.score_matrix(np.load(Path({str(tmp_path)!r}) / f"{{name}}.npy"))
            out[name] = [s.anomalous for s in scores]
            out[name + "_top"] = [s.top_features[0][0] for s in scores]
        print(json.dumps({{"errors": errors, **out}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["errors"] == []
    # A port scan is nothing like the benign flows; the benign fixtures (captures the model was
    # fitted on, so a behaviour check, not an evaluation) stay mostly quiet.
    assert np.mean(result["scan"]) > 0.95
    assert np.mean(result["benign"]) < 0.05
    # The explanation names what is odd about a SYN scan's one-packet flows: the SYN.
    assert np.mean([top == "src2dst_syn_packets" for top in result["scan_top"]]) > 0.9


def test_both_default_models_score_every_flow() -> None:
    models, errors = load_models(MODELS)
    assert errors == []
    flows = list(meter_flows([str(PCAPS / "masscan_tcp_0_1000_20190821.pcap")], models.feature_sets))[:64]
    for scores in models.score([f.features for f in flows]):
        assert {s.model_id for s in scores} == {"nfstream-rf", "nfstream-ae"}
        ae = next(s for s in scores if s.model_id == "nfstream-ae")
        assert ae.kind == model_pb2.MODEL_KIND_AUTOENCODER
        assert ae.anomalous == (ae.score >= ae.threshold)
