"""Model manifests and ONNX scoring: the shipped models, refusals, and training/agent parity."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from auris.agent.features import NFSTREAM
from auris.agent.manifest import ManifestError, dump_manifest, find_manifests, read_manifest
from auris.agent.meter import meter_flows
from auris.agent.scoring import load_model, load_models, to_matrix
from auris.agent.signing import ModelTrust, sign_manifest
from auris.v1 import model_pb2, verdict_pb2
from tests.conftest import MODELS, PCAPS, TEST_SIGNING_KEY, TEST_TRUST, resign


def test_shipped_models_load_and_carry_their_evaluation() -> None:
    models, errors = load_models(MODELS)
    assert errors == []
    by_id = {m.manifest.model_id: m.manifest for m in models.models}
    assert set(by_id) == {"nfstream-rf", "nfstream-ae"}
    manifest = by_id["nfstream-rf"]
    assert manifest.kind == model_pb2.MODEL_KIND_CLASSIFIER
    assert list(manifest.feature_set.columns) == list(NFSTREAM.columns)
    evaluation = manifest.evaluation
    assert "by time" in evaluation.split
    assert {c.label for c in evaluation.per_class} == {"attack", "benign"}
    assert all(c.support > 0 for c in evaluation.per_class)
    assert evaluation.baseline_name
    assert evaluation.macro_f1 > evaluation.baseline_macro_f1
    assert manifest.training_data
    assert evaluation.extra["onnx_parity_max_abs_diff"] < 1e-5


def _copy_model(tmp_path: Path) -> Path:
    manifest = MODELS / "nfstream-rf.manifest.json"
    for path in (manifest, MODELS / read_manifest(manifest).onnx_file):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / manifest.name


def test_a_modified_onnx_file_is_refused(tmp_path: Path) -> None:
    manifest = _copy_model(tmp_path)
    onnx = tmp_path / read_manifest(manifest, verify_file=False).onnx_file
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    models, errors = load_models(tmp_path)
    assert not models.models
    assert len(errors) == 1
    assert "refusing a modified model" in errors[0]


def test_unsigned_modified_and_foreign_models_are_refused(tmp_path: Path) -> None:
    """The release key verifies the shipped model; any edit, no signature or another key: refused."""
    path = _copy_model(tmp_path)
    models, errors = load_models(tmp_path)  # default trust: the release keys only
    assert errors == []
    assert len(models.models) == 1
    shipped = read_manifest(path)

    def refusal(manifest: model_pb2.ModelManifest, trust: ModelTrust | None = None) -> str:
        path.write_text(dump_manifest(manifest))
        models, errors = load_models(tmp_path, trust=trust)
        assert not models.models
        assert len(errors) == 1
        assert len(errors[0].splitlines()) == 1
        return errors[0]

    lowered = model_pb2.ModelManifest()
    lowered.CopyFrom(shipped)
    lowered.threshold.value = 0.99  # a quieter model, same signature: must not pass
    assert "signature of nfstream-rf@1 does not verify" in refusal(lowered)
    unsigned = model_pb2.ModelManifest()
    unsigned.CopyFrom(shipped)
    unsigned.ClearField("signature")
    assert "is not signed" in refusal(unsigned)
    # Unsigned passes only where a developer asked for it; a bad signature never does.
    path.write_text(dump_manifest(unsigned))
    assert load_models(tmp_path, trust=ModelTrust({}, allow_unsigned=True))[0].models
    assert "does not verify" in refusal(lowered, ModelTrust.load([], allow_unsigned=True))
    sign_manifest(unsigned, TEST_SIGNING_KEY)
    assert "which is not trusted here" in refusal(unsigned)  # a key the agent does not know
    assert load_models(tmp_path, trust=TEST_TRUST)[0].models


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["feature_set"].update(name="zeek-conn"), "unknown feature set 'zeek-conn'"),
        (lambda m: m["feature_set"].update(version="9"), "the model wants 9"),
        (lambda m: m["feature_set"]["columns"].append("no_such_column"), "has no column 'no_such_column'"),
        (lambda m: m.update(surprise=1), "not a valid manifest"),
        (lambda m: m.update(manifest_version=99), "newer than this reader"),
        (lambda m: m.update(normal_label="nothing"), "normal_label"),
        (lambda m: m.update(input_name="x"), "graph has no input 'x'"),
        (lambda m: m.update(description="caf\udce9"), "not UTF-8 text"),
    ],
)
def test_manifests_the_agent_cannot_honour_are_refused(tmp_path: Path, edit: object, message: str) -> None:
    path = _copy_model(tmp_path)
    data = json.loads(path.read_text())
    edit(data)  # type: ignore[operator]
    path.write_bytes(json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogateescape"))
    with contextlib.suppress(ManifestError):  # one the reader cannot parse stays as written
        resign(path)
    models, errors = load_models(tmp_path, trust=TEST_TRUST)
    assert not models.models
    assert message in errors[0]
    assert len(errors[0].splitlines()) == 1


def test_to_matrix_cleans_non_finite_values() -> None:
    m = to_matrix([[1.0, float("nan"), float("inf"), -float("inf")]], 4)
    assert m.dtype == np.float32
    assert np.isfinite(m).all()
    assert m[0, 1] == 0.0
    with pytest.raises(ValueError, match="expected rows of 3"):
        to_matrix([[1.0, 2.0]], 3)


def test_training_export_and_agent_scoring_agree(tmp_path: Path) -> None:
    """A model trained on the agent's own features scores the same in scikit-learn and in the agent."""
    from sklearn.ensemble import RandomForestClassifier

    from auris.training.export import INPUT_NAME, export_classifier, parity, write_model
    from auris.training.metrics import classifier_evaluation
    from auris.training.pcap_flows import CaptureFile, flow_table

    files = [CaptureFile(PCAPS / "masscan_tcp_0_1000_20190821.pcap", "attack")]
    files += [
        CaptureFile(PCAPS / n, "benign") for n in ("steam.pcap", "kerberos.pcap", "KakaoTalk_chat.pcap")
    ]
    table = flow_table(files, NFSTREAM, max_flows_per_capture=200)
    x = to_matrix(table.rows, len(NFSTREAM.columns))
    y = np.asarray(table.labels)
    forest = RandomForestClassifier(n_estimators=5, max_depth=6, random_state=0).fit(x, y)
    onnx_bytes = export_classifier(forest, x.shape[1])
    assert parity(onnx_bytes, forest, x) < 1e-5

    classes = [str(c) for c in forest.classes_]
    probabilities = forest.predict_proba(x)
    attack = 1.0 - probabilities[:, classes.index("benign")]
    predicted = np.where(attack >= 0.5, "attack", "benign")
    evaluation = classifier_evaluation(
        y.tolist(), predicted.tolist(), attack, classes, "benign", split="train"
    )
    manifest_path = write_model(
        tmp_path,
        "tiny",
        onnx_bytes,
        model_id="tiny",
        version="1",
        kind=model_pb2.MODEL_KIND_CLASSIFIER,
        feature_set=NFSTREAM,
        labels=classes,
        normal_label="benign",
        threshold=0.5,
        threshold_method="test",
        evaluation=evaluation,
        provenance={str(f.path): ("0" * 64, 1) for f in files},
        description="test model",
        signing_key=TEST_SIGNING_KEY,
    )
    model = load_model(manifest_path, trust=TEST_TRUST)
    assert model.manifest.input_name == INPUT_NAME
    # Fresh flows through the agent's meter and the loaded model: same scores as scikit-learn.
    flows = list(meter_flows([str(PCAPS / "trickbot.pcap")], [NFSTREAM]))
    rows = to_matrix([f.features["nfstream"] for f in flows], len(NFSTREAM.columns))
    ours = np.array([s.score for s in model.score_matrix(rows)])
    theirs = 1.0 - forest.predict_proba(rows)[:, classes.index("benign")]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_scoring_survives_empty_and_failing_batches() -> None:
    models, _ = load_models(MODELS)
    assert models.score([]) == []
    flows = list(meter_flows([str(PCAPS / "steam.pcap")], [NFSTREAM]))
    features = [f.features for f in flows]
    assert all(len(s) == len(models.models) == 2 for s in models.score(features))
    for model in models.models:
        model.manifest.input_name = "not-an-input"  # every call to onnxruntime now fails
    scores = models.score(features)
    assert scores == [[] for _ in flows]  # the flows survive, unscored
    assert models.errors == 2


def test_classifier_and_autoencoder_score_every_flow_with_explanations(tmp_path: Path) -> None:
    """Both kinds loaded side by side: class probabilities from one, top features from the other."""
    from google.protobuf import timestamp_pb2

    from auris.agent.verdicts import build_verdict

    for path in MODELS.glob("nfstream-*.*"):
        shutil.copy(path, tmp_path / path.name)
    models, errors = load_models(tmp_path)
    assert errors == []
    kinds = {m.manifest.model_id: m.manifest.kind for m in models.models}
    assert kinds == {
        "nfstream-rf": model_pb2.MODEL_KIND_CLASSIFIER,
        "nfstream-ae": model_pb2.MODEL_KIND_AUTOENCODER,
    }
    flows = list(meter_flows([str(PCAPS / "trickbot.pcap")], models.feature_sets))
    per_flow = models.score([f.features for f in flows])
    now = timestamp_pb2.Timestamp()
    for flow, scores in zip(flows, per_flow, strict=True):
        by_id = {s.model_id: s for s in scores}
        assert set(by_id) == set(kinds)
        rf, ae = by_id["nfstream-rf"], by_id["nfstream-ae"]
        assert set(rf.probabilities) == {"attack", "benign"}
        assert rf.score == pytest.approx(rf.probabilities["attack"], abs=1e-6)
        assert len(ae.top_features) == 3
        assert all(name in NFSTREAM.columns for name, _ in ae.top_features)
        contributions = [value for _, value in ae.top_features]
        assert contributions == sorted(contributions, reverse=True)
        # The score is the sum of every column's share of the error, so at least the top three's.
        assert ae.score >= sum(contributions) - 1e-5
        verdict = build_verdict(
            agent_id="a", sequence=1, flow=flow, scores=scores, hostname="h", scored_time=now
        )
        assert len(verdict.scores) == 2
        ae_score = next(s for s in verdict.scores if s.model.model_id == "nfstream-ae")
        assert [f.feature for f in ae_score.top_features] == [name for name, _ in ae.top_features]
        if ae.anomalous:
            assert ae.top_features[0][0] in verdict.explanation


def test_the_default_autoencoder_beats_flag_everything_on_its_honest_split() -> None:
    """Shipped beside the classifier because its manifest shows it above the trivial baseline."""
    manifest = read_manifest(MODELS / "nfstream-ae.manifest.json")
    assert manifest.kind == model_pb2.MODEL_KIND_AUTOENCODER
    assert list(manifest.feature_set.columns) == list(NFSTREAM.columns)
    evaluation = manifest.evaluation
    assert "by time inside each capture" in evaluation.split
    assert evaluation.baseline_name == "flag everything"
    attack = next(c for c in evaluation.per_class if c.label == "attack")
    extra = evaluation.extra
    assert attack.f1 > extra["attack_f1_flag_everything"] + 0.2
    assert evaluation.pr_auc > extra["pr_auc_flag_everything"]
    assert evaluation.macro_f1 > evaluation.baseline_macro_f1
    # On captures and on benign captures it never saw, attack flows are flagged far more often.
    assert extra["test_attack_flag_rate"] > 10 * extra["test_benign_flag_rate"]
    assert extra["capture_holdout_attack_recall_min"] > 10 * extra["capture_holdout_benign_fpr_max"]
    assert "benign calibration flows" in manifest.threshold.method
    assert extra["onnx_parity_max_rel_diff"] < 1e-4
    assert (MODELS / manifest.onnx_file).stat().st_size < 1_000_000
    assert sorted(p.name for p in find_manifests(MODELS)) == [
        "nfstream-ae.manifest.json",
        "nfstream-rf.manifest.json",
    ]


def test_every_shipped_model_carries_a_release_signature() -> None:
    """Defaults and candidates alike: an agent with no other key runs any of them."""
    trust = ModelTrust.load([])
    manifests = find_manifests(MODELS) + find_manifests(MODELS / "candidates")
    assert len(manifests) >= 2
    for path in manifests:
        trust.verify(read_manifest(path), str(path))


def _reference_verdict(flow: Any, scores: Sequence[Any], sequence: int, now: Any, sets: Any) -> bytes:
    """The verdict as written out field by field, the way build_verdict did before the batch
    encoding (decide() included): an independent statement of what a verdict must hold."""
    from auris.agent.verdicts import _set_time_ms

    live = [s for s in scores if not s.shadow]
    fired = [s for s in live if s.anomalous]
    classifiers = [s for s in live if s.kind == model_pb2.MODEL_KIND_CLASSIFIER]

    def why(s: Any) -> str:
        text = f"{s.model_id} {s.score:.3g} >= {s.threshold:.3g}"
        if s.top_features:
            return text + " (" + ", ".join(name for name, _ in s.top_features) + ")"
        return text + (f" ({s.label} p={s.probabilities.get(s.label, s.score):.2f})" if s.label else "")

    if not live:
        decider, label, anomalous, explanation = None, "benign", False, "no model scored this flow"
    elif fired:
        fired_classifier = next((s for s in fired if s.kind == model_pb2.MODEL_KIND_CLASSIFIER), None)
        decider, anomalous = fired_classifier or fired[0], True
        label = fired_classifier.label if fired_classifier else "anomaly"
        explanation = "; ".join(why(s) for s in fired)
    else:
        decider, label, anomalous = (classifiers or live)[0], "benign", False
        explanation = f"{decider.model_id} {decider.score:.3g} < {decider.threshold:.3g}"
    v = verdict_pb2.Verdict(agent_id="a", sequence=sequence, label=label, anomalous=anomalous,
                            explanation=explanation[:200], application_name=flow.application_name,
                            end_reason=flow.end_reason, hostname="h",
                            capture_source=flow.capture_source)  # fmt: skip
    v.flow.src_ip, v.flow.dst_ip, v.flow.src_port, v.flow.dst_port = flow[0], flow[1], flow[2], flow[3]
    v.flow.ip_protocol, v.flow.ip_version, v.flow.vlan_id = flow.protocol, flow.ip_version, flow.vlan_id
    _set_time_ms(v.first_seen_time, flow.first_seen_ms)
    _set_time_ms(v.last_seen_time, flow.last_seen_ms)
    v.counters.src_to_dst_packets, v.counters.dst_to_src_packets = flow.src2dst_packets, flow.dst2src_packets
    v.counters.src_to_dst_bytes, v.counters.dst_to_src_bytes = flow.src2dst_bytes, flow.dst2src_bytes
    v.scored_time.CopyFrom(now)
    if decider is not None:
        v.model.model_id, v.model.version = decider.model_id, decider.model_version
    for s in scores:
        entry = v.scores.add(kind=s.kind, score=s.score, threshold=s.threshold, anomalous=s.anomalous,
                             label=s.label, shadow=s.shadow)  # fmt: skip
        entry.model.model_id, entry.model.version = s.model_id, s.model_version
        entry.class_probabilities.update(s.probabilities)
        for name, value in s.top_features:
            entry.top_features.add(feature=name, value=value)
    if anomalous:
        for name, version in sets:
            v.features.add(feature_set=name, version=version, values=flow.features[name])
    return v.SerializeToString(deterministic=True)


def test_a_batch_of_verdicts_holds_what_each_flow_gets_written_out_by_hand(tmp_path: Path) -> None:
    """VerdictBuilder encodes the batch's shared fields and each score as bytes: the verdicts must
    equal the field-by-field ones, with a shadow model, classifiers and detectors firing, features
    attached to anomalous flows, flows whose models differ from the first flow's, and
    build_verdict's one-flow path."""
    from google.protobuf import timestamp_pb2

    from auris.agent.verdicts import VerdictBuilder, build_verdict

    models, _ = load_models(MODELS)
    flows = list(meter_flows([str(PCAPS / "KakaoTalk_chat.pcap")], models.feature_sets))
    models.models[1].shadow = True
    per_flow = models.score([f.features for f in flows])
    for i, model in enumerate(models.models):  # so that each fires on some flows, not on all
        values = [scores[i].score for scores in per_flow]
        model.manifest.threshold.value = (min(values) + max(values)) / 2
    per_flow = models.score([f.features for f in flows])
    fired = {(s.model_id, s.anomalous) for scores in per_flow for s in scores}
    assert {(m.manifest.model_id, a) for m in models.models for a in (True, False)} <= fired
    now = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
    sets = [(fs.name, fs.version) for fs in models.feature_sets]
    mixed = [s[::-1] if i % 3 == 1 else s[:1] if i % 3 == 2 else s for i, s in enumerate(per_flow)]
    for scores in (per_flow, mixed):
        build = VerdictBuilder(agent_id="a", hostname="h", scored_time=now, flows=flows, scores=scores,
                               feature_sets=sets, features_when="anomalous")  # fmt: skip
        expected = [
            _reference_verdict(f, s, 100 + i, now, sets)
            for i, (f, s) in enumerate(zip(flows, scores, strict=True))
        ]
        assert [
            build(i, 100 + i).SerializeToString(deterministic=True) for i in range(len(flows))
        ] == expected
        alone = [
            build_verdict(agent_id="a", sequence=100 + i, flow=f, scores=s, hostname="h", scored_time=now,
                          feature_sets=sets, features_when="anomalous").SerializeToString(deterministic=True)
            for i, (f, s) in enumerate(zip(flows, scores, strict=True))
        ]  # fmt: skip
        assert alone == expected
    assert any(verdict_pb2.Verdict.FromString(b).features for b in expected)


def test_encoded_scores_hold_long_names_and_labels() -> None:
    """Score entries are encoded by hand: names and labels past one-byte (and two-byte) lengths
    must come out as protobuf's own encoding of them."""
    from auris.agent.scoring import Score
    from auris.agent.verdicts import _score_field

    for size in (5, 130, 1100, 20_000):
        name = "f" * size
        score = Score("m" * size, "1", model_pb2.MODEL_KIND_CLASSIFIER, 0.75, 0.5, True, "x" * size,
                      {name: 0.75, "benign": 0.25}, ((name, 2.5), ("b", 0.0)))  # fmt: skip
        parsed = verdict_pb2.Verdict.FromString(_score_field(score)).scores[0]
        assert parsed.model.model_id == "m" * size
        assert parsed.label == "x" * size
        assert dict(parsed.class_probabilities) == {name: 0.75, "benign": 0.25}
        assert [(f.feature, f.value) for f in parsed.top_features] == [(name, 2.5), ("b", 0.0)]
        assert (parsed.score, parsed.threshold, parsed.anomalous) == (0.75, 0.5, True)
