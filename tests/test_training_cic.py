"""Training on the cicflowmeter set: table mapping, export parity, and scoring without training libraries."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from auris.agent.cicflowmeter import CICFLOWMETER_COLUMNS
from auris.agent.features import CICFLOWMETER
from auris.agent.manifest import read_manifest
from auris.agent.meter import meter_flows
from auris.agent.scoring import load_model, load_models, to_matrix
from auris.agent.signing import public_key_pem
from auris.training.cic_tables import (
    BENIGN,
    HARMONISED_COLUMNS,
    TAXONOMY,
    FlowFrame,
    at_agent_resolution,
    cic_frame,
    clean_features,
    tii_frame,
)
from auris.v1 import model_pb2
from tests.conftest import DATA, MODELS, PCAPS, TEST_SIGNING_KEY, TEST_TRUST, resign

NETWORK = DATA / "network"
CIC_SAMPLE = NETWORK / "cicids2017-sample.csv.gz"
TII_SAMPLE = NETWORK / "tii-ssrc-23-sample.csv.gz"
# Trees compare float32 inputs on both sides; the autoencoder's float32 matmuls differ in rounding.
TREE_TOLERANCE = 1e-5
AE_RELATIVE_TOLERANCE = 1e-4
CANDIDATES = ("cic-rf", "cic-ae", "cic-iforest", "cic-kmeans")


@pytest.fixture(scope="module")
def frame() -> FlowFrame:
    return FlowFrame.concat([cic_frame(CIC_SAMPLE), tii_frame(TII_SAMPLE)])


def _harmonised(x: np.ndarray) -> np.ndarray:
    return x[:, [CICFLOWMETER_COLUMNS.index(c) for c in HARMONISED_COLUMNS]]


def test_tables_map_onto_the_agents_columns_and_one_taxonomy(frame: FlowFrame) -> None:
    assert frame.x.shape == (len(frame), len(CICFLOWMETER_COLUMNS))
    assert frame.x.dtype == np.float32
    assert np.isfinite(frame.x).all()
    # The harmonised columns keep the agent's order and leave out what TII-SSRC-23 lacks.
    assert list(HARMONISED_COLUMNS) == [c for c in CICFLOWMETER_COLUMNS if c in HARMONISED_COLUMNS]
    assert "Fwd RST Flags" not in HARMONISED_COLUMNS
    tii = frame.dataset == "tii-ssrc-23"
    assert (frame.x[tii, CICFLOWMETER_COLUMNS.index("Fwd RST Flags")] == 0).all()
    assert set(frame.label.tolist()) <= set(TAXONOMY.values())
    assert {"benign", "dos", "ddos", "scan", "bruteforce"} <= set(frame.label[tii].tolist())
    assert set(frame.label[frame.source_class == "Video"].tolist()) == {BENIGN}
    mirai_scan = frame.subtype == "Mirai Scan Bruteforce"
    assert set(frame.label[mirai_scan].tolist()) == {"bruteforce"}
    # The agent's clock: every duration a whole millisecond, rates recomputed from it.
    duration = frame.x[:, CICFLOWMETER_COLUMNS.index("Flow Duration")]
    assert (duration % 1000 == 0).all()
    packets = frame.x[:, CICFLOWMETER_COLUMNS.index("Flow Packets/s")]
    assert (packets[duration == 0] == 0).all()
    assert frame.time_ns.dtype == np.int64
    assert len(set(frame.provenance)) == 2


def test_cleaning_writes_undefined_values_as_the_agent_does() -> None:
    table = pd.DataFrame(
        {"Flow Duration": ["1500", "0"], "Flow Bytes/s": ["Infinity", "NaN"], "Flow IAT Mean": [1.0, -np.inf]}
    )
    x = clean_features(table)
    assert x.shape == (2, len(CICFLOWMETER_COLUMNS))
    assert x[0, CICFLOWMETER_COLUMNS.index("Flow Bytes/s")] == 0
    assert x[1, CICFLOWMETER_COLUMNS.index("Flow IAT Mean")] == 0
    assert x[0, CICFLOWMETER_COLUMNS.index("Flow Duration")] == 1500
    rounded = at_agent_resolution(x)
    assert rounded[0, CICFLOWMETER_COLUMNS.index("Flow Duration")] == 2000


def test_single_ensemble_isolation_forest_matches_scikit_learn(frame: FlowFrame) -> None:
    import onnxruntime as ort
    from sklearn.ensemble import IsolationForest

    from auris.training.isolation_forest import INPUT_NAME, SCORE_OUTPUT, isolation_forest_to_onnx

    x = _harmonised(frame.x)
    forest = IsolationForest(n_estimators=25, max_samples=64, random_state=1).fit(x[frame.label == BENIGN])
    session = ort.InferenceSession(
        isolation_forest_to_onnx(forest, x.shape[1]), providers=["CPUExecutionProvider"]
    )
    # Rows on both sides of every split value, where float32 rounding of a threshold would bite.
    tree = forest.estimators_[0].tree_
    edges = []
    for node in np.flatnonzero(tree.children_left != -1)[:20]:
        t = np.float64(tree.threshold[node])
        below = np.float32(t) if np.float32(t) <= t else np.nextafter(np.float32(t), np.float32(-np.inf))
        for value in (below, np.nextafter(below, np.float32(np.inf))):
            row = x[0].copy()
            row[tree.feature[node]] = value
            edges.append(row)
    rows = np.vstack([x, np.array(edges, dtype=np.float32)])
    (ours,) = session.run([SCORE_OUTPUT], {INPUT_NAME: rows})
    theirs = -forest.score_samples(rows)
    assert np.asarray(ours).shape == (len(rows),)
    np.testing.assert_allclose(ours, theirs, atol=TREE_TOLERANCE, rtol=0)
    assert (np.asarray(ours) > 0).all()
    assert (np.asarray(ours) < 1).all()


def _metered_rows() -> np.ndarray:
    """Real flows through the agent's meter and cicflowmeter plugin."""
    flows = []
    for name in ("steam.pcap", "masscan_tcp_0_1000_20190821.pcap", "WebattackSQLinj.pcap"):
        flows += list(meter_flows([str(PCAPS / name)], [CICFLOWMETER]))
    return to_matrix([f.features["cicflowmeter"] for f in flows], len(CICFLOWMETER.columns))


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")  # a tiny autoencoder fit, parity is the point
def test_exported_models_score_alike_in_the_agent_without_training_libraries(
    frame: FlowFrame, tmp_path: Path
) -> None:
    """sklearn and the agent's onnxruntime agree; the agent side runs with sklearn and torch unimportable."""
    from sklearn.ensemble import IsolationForest, RandomForestClassifier

    from auris.training.autoencoder import ERRORS_OUTPUT, fit_autoencoder
    from auris.training.autoencoder import SCORE_OUTPUT as AE_SCORE
    from auris.training.export import export_classifier, write_model
    from auris.training.isolation_forest import SCORE_OUTPUT as IF_SCORE
    from auris.training.isolation_forest import isolation_forest_to_onnx
    from auris.training.metrics import classifier_evaluation
    from auris.training.network_cic import HARMONISED

    x = _harmonised(frame.x)
    y = frame.label
    benign = x[y == BENIGN]
    forest = RandomForestClassifier(n_estimators=10, max_depth=8, random_state=0).fit(x, y)
    isolation = IsolationForest(n_estimators=20, max_samples=64, random_state=0).fit(benign)
    autoencoder = fit_autoencoder(benign)
    classes = [str(c) for c in forest.classes_]
    evaluation = classifier_evaluation(y.tolist(), y.tolist(), np.zeros(len(y)), classes, BENIGN, "train")
    models_dir = tmp_path / "models"
    graphs = {
        "rf": (export_classifier(forest, x.shape[1]), model_pb2.MODEL_KIND_CLASSIFIER, "probabilities", ""),
        "if": (
            isolation_forest_to_onnx(isolation, x.shape[1]),
            model_pb2.MODEL_KIND_ISOLATION_FOREST,
            IF_SCORE,
            "",
        ),
        "ae": (autoencoder.to_onnx(), model_pb2.MODEL_KIND_AUTOENCODER, AE_SCORE, ERRORS_OUTPUT),
    }
    for name, (onnx_bytes, kind, output, explanation) in graphs.items():
        write_model(
            models_dir,
            name,
            onnx_bytes,
            model_id=name,
            version="1",
            kind=kind,
            feature_set=HARMONISED,
            labels=classes if name == "rf" else [],
            normal_label=BENIGN,
            score_output=output,
            explanation_output=explanation,
            threshold=0.5,
            threshold_method="test",
            evaluation=evaluation,
            provenance={str(CIC_SAMPLE): ("0" * 64, len(y))},
            description="test model",
            signing_key=TEST_SIGNING_KEY,
        )
    # The shipped candidates on the same set, signed here with the test key (they ship unsigned).
    for stem in CANDIDATES:
        for suffix in (".onnx", ".manifest.json"):
            shutil.copy(MODELS / "candidates" / f"{stem}{suffix}", models_dir / f"{stem}{suffix}")
        resign(models_dir / f"{stem}.manifest.json")
    full_rows = _metered_rows()
    assert len(full_rows) > 100
    np.save(tmp_path / "rows.npy", full_rows)
    (tmp_path / "test.pub").write_text(public_key_pem(TEST_SIGNING_KEY.public_key()))

    script = textwrap.dedent(
        f"""
        import json, sys
        for name in ("sklearn", "skl2onnx", "torch", "onnx", "matplotlib"):
            sys.modules[name] = None  # import fails, as on an agent without the training extra
        import numpy as np
        from pathlib import Path
        from auris.agent.scoring import load_models
        from auris.agent.signing import ModelTrust
        trust = ModelTrust.load([Path({str(tmp_path / "test.pub")!r})], release=False)
        models, errors = load_models(Path({str(models_dir)!r}), trust=trust)
        rows = np.load({str(tmp_path / "rows.npy")!r})
        out = {{m.manifest.model_id: [s.score for s in m.score_matrix(rows)] for m in models.models}}
        assert "sklearn" not in {{k for k, v in sys.modules.items() if v is not None}}
        print(json.dumps({{"errors": errors, "scores": out}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["errors"] == []
    scores = {k: np.asarray(v) for k, v in result["scores"].items()}
    assert set(scores) == {"rf", "if", "ae", *CANDIDATES}
    rows = _harmonised(full_rows)
    np.testing.assert_allclose(
        scores["rf"], 1.0 - forest.predict_proba(rows)[:, classes.index(BENIGN)], atol=TREE_TOLERANCE, rtol=0
    )
    np.testing.assert_allclose(scores["if"], -isolation.score_samples(rows), atol=TREE_TOLERANCE, rtol=0)
    reference = autoencoder.reference(rows)[0]
    assert (
        np.max(np.abs(scores["ae"] - reference) / np.maximum(1.0, np.abs(reference))) < AE_RELATIVE_TOLERANCE
    )
    # The shipped candidates: the same figures through the agent in this process.
    for stem in CANDIDATES:
        model = load_model(models_dir / f"{stem}.manifest.json", trust=TEST_TRUST)
        np.testing.assert_allclose(scores[stem], [s.score for s in model.score_matrix(full_rows)], atol=1e-6)


def test_shipped_cicflowmeter_candidates_carry_honest_evaluations() -> None:
    """Their manifests state how they were judged: time split, baseline, data, pcap run, report."""
    for stem in CANDIDATES:
        manifest = read_manifest(MODELS / "candidates" / f"{stem}.manifest.json")
        assert (MODELS / "candidates" / manifest.onnx_file).stat().st_size < 5_000_000
        assert manifest.feature_set.name == "cicflowmeter"
        assert list(manifest.feature_set.columns) == list(HARMONISED_COLUMNS)
        evaluation = manifest.evaluation
        assert evaluation.split.startswith("by time inside each class")
        assert evaluation.baseline_name
        assert evaluation.macro_f1 > evaluation.baseline_macro_f1
        assert {d.path for d in manifest.training_data} == {
            "network/cicids2017/flows.csv.gz",
            "network/tii-ssrc-23/flows.csv.gz",
        }
        assert "pcap_benign_flagged_share" in evaluation.extra
        assert (MODELS / "reports" / f"{stem}.md").is_file()
    rf = read_manifest(MODELS / "candidates" / "cic-rf.manifest.json")
    assert BENIGN in rf.labels
    assert rf.evaluation.extra["binary_f1"] > rf.evaluation.extra["binary_f1_flag_everything"]
    assert rf.evaluation.extra["onnx_parity_max_abs_diff"] < TREE_TOLERANCE
    assert "random_split_macro_f1" in rf.evaluation.extra
    assert "tii_only_time_8class_weighted_f1" in rf.evaluation.extra


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer", "ignore:max_samples")  # tiny samples
def test_network_cic_pipeline_writes_models_and_reports(tmp_path: Path) -> None:
    """The whole pipeline on the committed samples (no pcap run): loadable models, reports with figures."""
    from auris.training.network_cic import Options, train_network_cic

    data = tmp_path / "data"
    for sample, rel in ((CIC_SAMPLE, "cicids2017"), (TII_SAMPLE, "tii-ssrc-23")):
        (data / "network" / rel).mkdir(parents=True)
        shutil.copy(sample, data / "network" / rel / "flows.csv.gz")
    out = tmp_path / "models"
    options = Options(
        data=data,
        out=out,
        candidates=out / "candidates",
        reports=out / "reports",
        trees=8,
        max_depth=6,
        defaults=("cic-rf",),
        skip_pcaps=True,
        signing_key=TEST_SIGNING_KEY,
    )
    written = train_network_cic(options)
    assert [p.name for p in written] == [
        "cic-rf.manifest.json",
        "cic-ae.manifest.json",
        "cic-iforest.manifest.json",
        "cic-kmeans.manifest.json",
    ]
    assert written[0].parent == out
    assert {p.parent for p in written[1:]} == {out / "candidates"}
    models, errors = load_models(out, trust=TEST_TRUST)
    assert errors == []
    assert [m.manifest.model_id for m in models.models] == ["cic-rf"]
    for path in written:
        manifest = load_model(path, trust=TEST_TRUST).manifest
        assert manifest.threshold.method
        assert manifest.evaluation.per_class
        report = (out / "reports" / f"{manifest.model_id}.md").read_text()
        for image in ("confusion", "curves", "importance"):
            assert f"({manifest.model_id}-{image}.png)" in report
            assert (out / "reports" / f"{manifest.model_id}-{image}.png").stat().st_size > 1000
    # The comparison with the earlier student project: both heads, their baselines, all three splits.
    extra = read_manifest(written[0]).evaluation.extra
    for split in ("time", "time_subtype", "random"):
        for figure in ("8class_weighted_f1", "8class_macro_f1", "binary_f1"):
            assert 0 <= extra[f"tii_only_{split}_{figure}"] <= 1
            assert f"tii_only_previous_{split}_{figure}" in extra
        assert 0.05 <= extra[f"tii_only_{split}_threshold"] <= 0.95
        assert 0 < extra[f"tii_only_{split}_binary_f1_flag_everything"] < 1
        assert 0 < extra[f"tii_only_{split}_8class_weighted_f1_majority"] < 1
    assert extra["upstream_tii8_weighted_f1"] == pytest.approx(0.9335)
    assert 0 <= extra["tii_only_time_binary_f1_at_upstream_benign_share"] <= 1
    rf_report = (out / "reports" / "cic-rf.md").read_text()
    assert "time, latest 25% of each traffic type" in rf_report
    assert "baseline: always" in rf_report
    detector = read_manifest(out / "candidates" / "cic-iforest.manifest.json")
    assert "benign calibration split" in detector.threshold.method
    assert detector.kind == model_pb2.MODEL_KIND_ISOLATION_FOREST
    assert detector.evaluation.baseline_name == "flag everything"


def test_natural_balance_weights_give_the_stated_benign_share() -> None:
    from auris.training.metrics import natural_balance_weights

    groups = ["cic"] * 10 + ["tii"] * 4
    labels = ["benign"] * 2 + ["dos"] * 8 + ["benign", "dos", "dos", "dos"]
    w = natural_balance_weights(groups, labels, "benign", {"cic": 0.75})
    cic = np.arange(10)
    benign = np.asarray(labels) == "benign"
    assert w[cic][benign[:10]].sum() / w[cic].sum() == pytest.approx(0.75)
    assert (w[10:] == 1).all()  # a table without a stated share keeps its rows as sampled
    assert (w[~benign] == 1).all()


def test_tii_heads_read_several_benign_classes_as_the_normal_side() -> None:
    """P(attack) sums the attack classes; flagged rows get the likeliest attack class, others a benign one."""
    from auris.training.network_cic import tii_heads

    classes = ["Audio", "DoS", "Mirai", "Video"]
    probs = np.array(
        [
            [0.5, 0.2, 0.25, 0.05],  # P(attack) 0.45: benign side, Audio
            [0.3, 0.1, 0.45, 0.15],  # 0.55: attack side, Mirai though Audio is likelier than DoS
            [0.05, 0.4, 0.0, 0.55],  # 0.40: benign side, Video though DoS is the second likeliest
        ]
    )
    p_attack, labels = tii_heads(probs, classes, ("DoS", "Mirai"), 0.5)
    np.testing.assert_allclose(p_attack, [0.45, 0.55, 0.40])
    assert labels == ["Audio", "Mirai", "Video"]
    _, lower = tii_heads(probs, classes, ("DoS", "Mirai"), 0.4)
    assert lower == ["Mirai", "Mirai", "DoS"]


def test_best_threshold_takes_the_middle_of_the_best_range() -> None:
    from auris.training.network_cic import best_threshold

    is_attack = np.array([True, True, False, False])
    # Every threshold in (0.3, 0.7] separates the rows: 0.35 .. 0.70, middle 0.55 (upper of two).
    assert best_threshold(is_attack, np.array([0.8, 0.7, 0.3, 0.1])) == pytest.approx(0.55)
    # Scores upside down: flagging everything (0.05 and 0.10) is the best F1 left.
    assert best_threshold(is_attack, np.array([0.1, 0.1, 0.9, 0.9])) == pytest.approx(0.10)
