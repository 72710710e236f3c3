"""Retraining a network classifier from flows analysts labelled, judged against the active version.

The rows are the feature vectors agents sent with their verdicts (``send_features``) and the
labels analysts gave those verdicts. Labels map onto the active model's classes: its own
class names stay, its normal label stays, any other attack name becomes the model's attack
class when it has exactly one (a binary model), ``unsure`` is dropped. Both the new version
and the active one are scored on the same held-back slice (the latest quarter of each class
by flow time), and both sets of figures go into the new manifest, the active ones under
``evaluation.extra["active_*"]``. Registering and promoting are the caller's steps.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from google.protobuf import timestamp_pb2
from sklearn.ensemble import RandomForestClassifier

from auris.agent.manifest import check_manifest
from auris.agent.scoring import to_matrix
from auris.training.export import PARITY_TOLERANCE, export_classifier, library_versions, parity
from auris.training.metrics import classifier_evaluation, split_by_time
from auris.v1 import model_pb2

__all__ = ["LabelledFlow", "RetrainResult", "retrain_classifier"]

# Fewer labelled flows than this in a class, and that class cannot be learnt or judged.
MIN_PER_CLASS = 8


@dataclasses.dataclass(frozen=True)
class LabelledFlow:
    time_ns: int
    label: str
    values: Sequence[float]


@dataclasses.dataclass
class RetrainResult:
    manifest: model_pb2.ModelManifest
    onnx: bytes
    # Metric name -> (active version, new version), on the same held-back slice.
    comparison: dict[str, tuple[float, float]]
    # Labels dropped (unsure, or not mappable onto the model's classes) -> rows.
    dropped: dict[str, int]


def _map_labels(
    flows: Sequence[LabelledFlow], labels: Sequence[str], normal: str
) -> tuple[list[int], list[str], dict[str, int]]:
    attack_classes = [c for c in labels if c != normal]
    keep: list[int] = []
    mapped: list[str] = []
    dropped: dict[str, int] = {}
    for i, flow in enumerate(flows):
        label = flow.label
        if label not in labels:
            label = attack_classes[0] if label not in ("unsure", "") and len(attack_classes) == 1 else ""
        if not label:
            dropped[flow.label] = dropped.get(flow.label, 0) + 1
            continue
        keep.append(i)
        mapped.append(label)
    return keep, mapped, dropped


def _active_predictions(
    active: model_pb2.ModelManifest, onnx: bytes, x: npt.NDArray[np.float32]
) -> tuple[list[str], npt.NDArray[np.float64]]:
    """The active version's labels and attack scores, read the way the agent reads them."""
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    (probs,) = session.run([active.score_output], {active.input_name: x})
    probs = np.asarray(probs).reshape(len(x), -1)
    normal = list(active.labels).index(active.normal_label)
    attack = 1.0 - probs[:, normal]
    others = probs.copy()
    others[:, normal] = -1.0
    best = np.where(attack >= active.threshold.value, others.argmax(axis=1), probs.argmax(axis=1))
    return [active.labels[i] for i in best], attack.astype(np.float64)


def retrain_classifier(
    active: model_pb2.ModelManifest,
    active_onnx: bytes,
    flows: Sequence[LabelledFlow],
    set_columns: Sequence[str],
    version: str,
    *,
    trees: int = 40,
    max_depth: int = 12,
    seed: int = 0,
) -> RetrainResult:
    """A new version of the classifier ``active``, trained on ``flows`` (vectors in ``set_columns``
    order); ValueError (one line) when the labelled set cannot train or judge it."""
    if active.kind != model_pb2.MODEL_KIND_CLASSIFIER:
        raise ValueError(f"{active.model_id} is not a classifier; retraining covers classifiers")
    labels, normal = list(active.labels), active.normal_label
    keep, y_list, dropped = _map_labels(flows, labels, normal)
    counts = {c: y_list.count(c) for c in labels}
    thin = [f"{c} ({n})" for c, n in counts.items() if 0 < n < MIN_PER_CLASS]
    present = [c for c, n in counts.items() if n]
    if len(present) < 2 or normal not in present:
        raise ValueError(
            f"need labelled flows of {normal!r} and of at least one attack class; have "
            + (", ".join(f"{c} ({n})" for c, n in counts.items() if n) or "none")
        )
    if thin:
        raise ValueError(f"need at least {MIN_PER_CLASS} labelled flows per class; have {', '.join(thin)}")
    # Vectors arrive in the feature set's column order; the model reads its own columns of it.
    position = {c: i for i, c in enumerate(set_columns)}
    missing = [c for c in active.feature_set.columns if c not in position]
    if missing:
        raise ValueError(f"the feature set sent by the agents has no column {missing[0]!r}")
    width = len(active.feature_set.columns)
    x = to_matrix([flows[i].values for i in keep], len(set_columns))
    x = x[:, [position[c] for c in active.feature_set.columns]]
    y = np.asarray(y_list)
    times = [flows[i].time_ns for i in keep]
    train, test = split_by_time(y_list, times)
    forest = RandomForestClassifier(
        n_estimators=trees, max_depth=max_depth, class_weight="balanced", random_state=seed, n_jobs=1
    ).fit(x[train], y[train])
    onnx = export_classifier(forest, width)
    drift = parity(onnx, forest, x)
    if drift > PARITY_TOLERANCE:
        raise RuntimeError(f"exported forest differs from scikit-learn by {drift:.2g}")
    classes = [str(c) for c in forest.classes_]
    if classes != sorted(present):
        raise ValueError(f"the training slice lacks a class: {sorted(present)} vs {classes}")

    split = "by time inside each class: the latest 25% of each class's labelled flows held out"
    probs = forest.predict_proba(x[test])
    normal_index = classes.index(normal)
    new_attack = 1.0 - probs[:, normal_index]
    others = probs.copy()
    others[:, normal_index] = -1.0
    threshold = active.threshold.value
    new_pred = [
        classes[i] for i in np.where(new_attack >= threshold, others.argmax(axis=1), probs.argmax(axis=1))
    ]
    evaluation = classifier_evaluation(y[test].tolist(), new_pred, new_attack, classes, normal, split)
    active_pred, active_attack = _active_predictions(active, active_onnx, x[test])
    before = classifier_evaluation(y[test].tolist(), active_pred, active_attack, classes, normal, split)
    comparison = {
        "macro F1": (before.macro_f1, evaluation.macro_f1),
        "weighted F1": (before.weighted_f1, evaluation.weighted_f1),
        "PR-AUC": (before.pr_auc, evaluation.pr_auc),
        "false-positive rate": (before.false_positive_rate, evaluation.false_positive_rate),
        **{
            f"F1 {a.label}": (a.f1, b.f1) for a, b in zip(before.per_class, evaluation.per_class, strict=True)
        },
    }
    for name, (old, _) in comparison.items():
        evaluation.extra["active_" + name.lower().replace(" ", "_").replace("-", "_")] = old
    evaluation.extra["onnx_parity_max_abs_diff"] = drift

    manifest = model_pb2.ModelManifest()
    manifest.CopyFrom(active)
    manifest.version = version
    manifest.labels[:] = classes
    manifest.ClearField("evaluation")
    manifest.evaluation.CopyFrom(evaluation)
    manifest.ClearField("training_data")
    digest = hashlib.sha256()
    for i in keep:
        digest.update(f"{flows[i].time_ns}:{flows[i].label}:".encode())
        digest.update(np.asarray(flows[i].values, dtype=np.float32).tobytes())
    manifest.training_data.add(
        path=f"collector: analyst-labelled flows ({len(keep)} rows)",
        sha256=digest.hexdigest(),
        rows=len(keep),
    )
    manifest.library_versions.clear()
    manifest.library_versions.update(
        library_versions("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy")
    )
    manifest.onnx_sha256 = hashlib.sha256(onnx).hexdigest()
    manifest.onnx_file = f"{active.model_id}-{version}.onnx"
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(dt.datetime.now(dt.UTC).replace(microsecond=0))
    manifest.created_time.CopyFrom(created)
    manifest.description = (
        f"Random forest ({trees} trees, depth <= {max_depth}) retrained from {len(keep)} analyst-labelled "
        f"flows, judged against {active.model_id}@{active.version} on the same held-back slice."
    )
    manifest.ClearField("signature")
    manifest.ClearField("signing_key_id")
    check_manifest(manifest, f"{active.model_id}@{version}")
    return RetrainResult(manifest, onnx, comparison, dropped)
