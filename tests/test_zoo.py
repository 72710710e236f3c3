"""The model zoo: every kind trains on a real table, exports, and runs in the agent's scoring code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from auris.agent.cicflowmeter import CICFLOWMETER_COLUMNS
from auris.agent.scoring import load_model
from auris.training.zoo import KINDS, SUPERVISED, LogScaling, nearest_point_graph, save_model, train_model
from auris.v1 import model_pb2
from tests.conftest import DATA, TEST_SIGNING_KEY, TEST_TRUST

SAMPLE = DATA / "network" / "cicids2017-sample.csv.gz"
# Distances through the expanded square |z|^2 - 2 z.c + |c|^2 in float32: the squared distance is
# off by ~eps32 * |z|^2, so a distance near 0 is off by up to ~1e-2 absolute; away from 0 the
# relative error is ~1e-6. Thresholds sit well away from 0 (eps, calibration quantiles).
NEAR_ZERO_TOLERANCE = 2e-2
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return pd.read_csv(SAMPLE, low_memory=False)


@pytest.mark.filterwarnings(
    "ignore:Stochastic Optimizer", "ignore:max_samples", "ignore:X does not have valid"
)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_exports_and_scores_in_the_agent(
    table: pd.DataFrame, kind: str, tmp_path: Path
) -> None:
    columns = [c for c in CICFLOWMETER_COLUMNS if c in table.columns]
    model = train_model(table, kind, "Label", time_column="Timestamp", columns=columns, source="sample")
    manifest = model.manifest
    assert manifest.feature_set.name == "cicflowmeter"  # the agent can feed it
    assert manifest.normal_label == "BENIGN"
    assert manifest.threshold.method
    assert manifest.evaluation.split.startswith("by time (Timestamp) inside each class")
    assert len(model.test_scores) == len(model.test_is_normal) > 0
    if kind in SUPERVISED:
        assert manifest.kind == model_pb2.MODEL_KIND_CLASSIFIER
        assert "BENIGN" in manifest.labels
        assert manifest.evaluation.extra["onnx_parity_max_abs_diff"] < 1e-5
    else:
        assert manifest.evaluation.baseline_name == "flag everything"
    path = save_model(tmp_path, model, TEST_SIGNING_KEY)
    loaded = load_model(path, trust=TEST_TRUST)
    rows = table[list(CICFLOWMETER_COLUMNS)].to_numpy(dtype=np.float32)
    scores = np.array([s.score for s in loaded.score_matrix(rows)])
    assert scores.shape == (len(table),)
    assert np.isfinite(scores).all()
    assert float(np.std(scores)) > 0


def test_nearest_point_graph_is_the_nearest_neighbour_distance(table: pd.DataFrame) -> None:
    import onnxruntime as ort
    from sklearn.neighbors import NearestNeighbors

    x = table[list(CICFLOWMETER_COLUMNS)].to_numpy(dtype=np.float32)
    scaling = LogScaling.fit(x[:200])
    points = scaling.apply(x[:200])[::3]
    session = ort.InferenceSession(
        nearest_point_graph(scaling, points, "t"), providers=["CPUExecutionProvider"]
    )
    (ours,) = session.run(["score"], {"features": x})
    theirs = NearestNeighbors(n_neighbors=1).fit(points).kneighbors(scaling.apply(x))[0][:, 0]
    np.testing.assert_allclose(ours, theirs, atol=NEAR_ZERO_TOLERANCE, rtol=0)
    far = theirs > 0.5
    assert far.sum() > 100
    np.testing.assert_allclose(ours[far], theirs[far], rtol=RELATIVE_TOLERANCE)


def test_one_class_svm_graph_negates_the_decision_function(table: pd.DataFrame) -> None:
    import onnxruntime as ort
    from sklearn.svm import OneClassSVM

    from auris.training.zoo import _one_class_svm_graph

    x = table[list(CICFLOWMETER_COLUMNS)].to_numpy(dtype=np.float32)
    scaling = LogScaling.fit(x)
    svm = OneClassSVM(nu=0.05, gamma="scale").fit(scaling.apply(x))
    graph = _one_class_svm_graph(scaling, svm, x.shape[1])
    (ours,) = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(["score"], {"features": x})
    np.testing.assert_allclose(ours, -svm.decision_function(scaling.apply(x)), atol=1e-4, rtol=1e-4)


def test_unsupervised_kinds_train_without_a_label(table: pd.DataFrame) -> None:
    model = train_model(table.drop(columns=["Label"]), "kmeans")
    assert model.manifest.feature_set.name == "table"  # id, ports, ... are not agent columns
    assert "flagged_share_test" in model.manifest.evaluation.extra
    with pytest.raises(ValueError, match="supervised: name the label column"):
        train_model(table, "random-forest")
    with pytest.raises(ValueError, match="unknown kind 'svm'"):
        train_model(table, "svm", "Label")


def test_zoo_command(tmp_path: Path) -> None:
    from auris.training.cli import main

    out = tmp_path / "models"
    assert (
        main(["zoo", "--data", str(SAMPLE), "--kind", "kmeans", "--label", "Label", "--out", str(out)]) == 0
    )
    assert (out / "kmeans.manifest.json").is_file()
    assert (out / "kmeans.onnx").is_file()
    assert main(["zoo", "--data", str(SAMPLE), "--kind", "svm", "--out", str(out)]) == 2
    assert main(["zoo", "--data", str(tmp_path / "none.csv"), "--kind", "kmeans", "--out", str(out)]) == 2
