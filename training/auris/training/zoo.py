"""The model zoo: any of eight model kinds on any numeric table, exported to ONNX with a manifest.

``train_model(table, kind, label)`` is the library entry point (``auris-train zoo`` and, later,
``aurisctl models train`` call it). Supervised kinds need ``label``; the unsupervised ones fit
on the normal rows when a label is given (on every row otherwise) and take their threshold from
a calibration split. Rows are taken to be in time order: the split is by time (row order, or
``time_column``) inside each class, the latest 25% held out.

Distance-based kinds (one-class SVM, k-means, DBSCAN) and the autoencoder read features through
the same graph-side preprocessing, a sign-preserving log1p and standardisation with the
training statistics, because flow and transaction columns span many orders of magnitude; the
tree kinds read raw values (scaling in front of trees moves float32 rows across split values).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import timestamp_pb2
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.cluster import DBSCAN, KMeans
from sklearn.ensemble import IsolationForest, RandomForestClassifier
from sklearn.neighbors import NearestNeighbors
from sklearn.neural_network import MLPClassifier
from sklearn.svm import OneClassSVM

from auris.agent.cicflowmeter import CICFLOWMETER_COLUMNS
from auris.agent.manifest import MANIFEST_SUFFIX, MANIFEST_VERSION, dump_manifest
from auris.agent.signing import sign_manifest
from auris.training.autoencoder import ERRORS_OUTPUT, fit_autoencoder
from auris.training.autoencoder import SCORE_OUTPUT as AE_SCORE
from auris.training.export import INPUT_NAME, PROBABILITIES, library_versions
from auris.training.isolation_forest import isolation_forest_to_onnx
from auris.training.metrics import classifier_evaluation, detector_evaluation, split_by_time
from auris.v1 import model_pb2

__all__ = [
    "KINDS",
    "SUPERVISED",
    "LogScaling",
    "ZooModel",
    "compare",
    "nearest_point_graph",
    "read_table",
    "save_model",
    "table_matrix",
    "train_model",
]

SUPERVISED = ("random-forest", "gradient-boosting", "mlp")
UNSUPERVISED = ("isolation-forest", "one-class-svm", "kmeans", "dbscan", "autoencoder")
KINDS = SUPERVISED + UNSUPERVISED
SCORE = "score"
_IR_VERSION = 10
_OPSETS = {"": 17, "ai.onnx.ml": 3}
_NORMAL_NAMES = ("benign", "normal", "0", "false", "legitimate")
_TARGET_FPR = 0.01
# Kernel and neighbour methods cost O(rows^2): they learn from a sample of this size.
_MAX_FIT_ROWS = 3000

Matrix = npt.NDArray[np.float32]


@dataclasses.dataclass
class ZooModel:
    onnx_bytes: bytes
    manifest: model_pb2.ModelManifest
    # Held-out rows' scores (higher = more anomalous / more likely not normal) and truth.
    test_scores: npt.NDArray[np.float64]
    test_is_normal: npt.NDArray[np.bool_]


def _log_scale(x: Matrix) -> Matrix:
    return np.sign(x) * np.log1p(np.abs(x))


@dataclasses.dataclass(frozen=True)
class LogScaling:
    mean: Matrix
    std: Matrix

    @staticmethod
    def fit(x: Matrix) -> LogScaling:
        scaled = _log_scale(x)
        std = scaled.std(axis=0).astype(np.float32)
        std[std < 1e-6] = 1.0
        return LogScaling(scaled.mean(axis=0).astype(np.float32), std)

    def apply(self, x: Matrix) -> Matrix:
        return ((_log_scale(x) - self.mean) / self.std).astype(np.float32)

    def nodes(self) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """Graph nodes from ``features`` to ``z``."""
        nodes = [
            helper.make_node("Abs", [INPUT_NAME], ["abs"]),
            helper.make_node("Add", ["abs", "one"], ["abs1"]),
            helper.make_node("Log", ["abs1"], ["log"]),
            helper.make_node("Sign", [INPUT_NAME], ["sign"]),
            helper.make_node("Mul", ["log", "sign"], ["scaled"]),
            helper.make_node("Sub", ["scaled", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["z"]),
        ]
        inits = [
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
            numpy_helper.from_array(self.mean, "mean"),
            numpy_helper.from_array(self.std, "std"),
        ]
        return nodes, inits


def _finish(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], n: int, name: str) -> bytes:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, [None])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in _OPSETS.items()])
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def nearest_point_graph(scaling: LogScaling, points: Matrix, name: str) -> bytes:
    """score = Euclidean distance from the scaled row to the nearest of ``points`` (scaled space)."""
    nodes, inits = scaling.nodes()
    inits += [
        numpy_helper.from_array(np.ascontiguousarray(points.T.astype(np.float32)), "points_t"),
        numpy_helper.from_array((points.astype(np.float32) ** 2).sum(axis=1), "points_sq"),
        numpy_helper.from_array(np.array(-2.0, dtype=np.float32), "minus_two"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes += [
        helper.make_node("Mul", ["z", "z"], ["z_sq"]),
        helper.make_node("ReduceSum", ["z_sq", "axis1"], ["row_sq"], keepdims=1),
        helper.make_node("MatMul", ["z", "points_t"], ["dot"]),
        helper.make_node("Mul", ["dot", "minus_two"], ["dot2"]),
        helper.make_node("Add", ["dot2", "row_sq"], ["partial"]),
        helper.make_node("Add", ["partial", "points_sq"], ["dist_sq"]),
        helper.make_node("ReduceMin", ["dist_sq"], ["min_sq"], axes=[1], keepdims=0),
        helper.make_node("Max", ["min_sq", "zero"], ["clipped"]),
        helper.make_node("Sqrt", ["clipped"], [SCORE]),
    ]
    return _finish(nodes, inits, points.shape[1], name)


def _nearest_distance(scaling: LogScaling, points: Matrix, x: Matrix) -> npt.NDArray[np.float64]:
    nn = NearestNeighbors(n_neighbors=1).fit(points)
    distances, _ = nn.kneighbors(scaling.apply(x))
    return np.asarray(distances[:, 0], dtype=np.float64)


def _one_class_svm_graph(scaling: LogScaling, svm: OneClassSVM, n: int) -> bytes:
    """The scaling nodes, then the converted SVM with its decision value negated (higher = anomalous)."""
    converted = convert_sklearn(svm, initial_types=[("z", FloatTensorType([None, n]))], target_opset=_OPSETS)
    nodes, inits = scaling.nodes()
    scores = next(o.name for o in converted.graph.output if o.name != "label")
    nodes += list(converted.graph.node)
    inits += list(converted.graph.initializer)
    nodes += [
        helper.make_node("Neg", [scores], ["negated"]),
        helper.make_node("Reshape", ["negated", "flat"], [SCORE]),
    ]
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"))
    return _finish(nodes, inits, n, "auris_one_class_svm")


def _sklearn_classifier_onnx(model: Any, n: int) -> bytes:
    if type(model).__name__ == "LGBMClassifier":
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType as MLFloatTensorType

        converted = onnxmltools.convert_lightgbm(
            model, initial_types=[(INPUT_NAME, MLFloatTensorType([None, n]))], target_opset=15, zipmap=False
        )
        lgbm: bytes = converted.SerializeToString()
        return lgbm
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    converted = convert_sklearn(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n]))],
        options={id(final): {"zipmap": False}},
        target_opset=_OPSETS,
    )
    data: bytes = converted.SerializeToString()
    return data


def _normal_label(values: Sequence[str]) -> str:
    present = set(values)
    for name in present:
        if name.lower() in _NORMAL_NAMES:
            return name
    counts = pd.Series(list(values)).value_counts()
    return str(counts.index[0])


def _columns(table: pd.DataFrame, label: str | None, time_column: str | None) -> list[str]:
    skip = {label, time_column}
    return [
        c
        for c in table.columns
        if c not in skip
        and pd.api.types.is_numeric_dtype(table[c])
        and not pd.api.types.is_bool_dtype(table[c])
    ]


def _feature_set(columns: list[str]) -> model_pb2.FeatureSet:
    if set(columns) <= set(CICFLOWMETER_COLUMNS):
        ordered = [c for c in CICFLOWMETER_COLUMNS if c in columns]
        if ordered == columns:
            return model_pb2.FeatureSet(name="cicflowmeter", version="1", columns=columns)
    return model_pb2.FeatureSet(name="table", version="1", columns=columns)


def read_table(path: Path) -> pd.DataFrame:
    """A table a user brings: Parquet by its suffix, else CSV (gzip too); OSError/ValueError otherwise."""
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, low_memory=False)


def train_model(
    table: pd.DataFrame,
    kind: str,
    label: str | None = None,
    *,
    model_id: str | None = None,
    version: str = "1",
    time_column: str | None = None,
    columns: Sequence[str] | None = None,
    source: str = "",
    seed: int = 0,
) -> ZooModel:
    """Train one ``kind`` on ``table``; ``columns`` (default: every numeric column but label and time)
    are the features."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind in SUPERVISED and label is None:
        raise ValueError(f"{kind} is supervised: name the label column")
    if label is not None and label not in table.columns:
        raise ValueError(f"no column {label!r} in the table")
    if columns is None:
        columns = _columns(table, label, time_column)
    columns = list(columns)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"no column {missing[0]!r} in the table")
    if not columns:
        raise ValueError("the table has no numeric feature columns")
    x = _clean(table, columns)
    n = x.shape[1]
    order = table[time_column].rank(method="first").to_numpy() if time_column else np.arange(len(table))
    labels = table[label].astype(str).to_numpy() if label is not None else np.full(len(table), "")
    normal = _normal_label(labels.tolist()) if label is not None else ""
    train, test = split_by_time(labels.tolist(), order.astype(np.int64).tolist())
    split = (
        f"by time ({time_column or 'row order'}) inside each class: the latest 25% of each held out"
        if label is not None
        else f"by time ({time_column or 'row order'}): the latest 25% held out"
    )
    rng = np.random.default_rng(seed)
    manifest = model_pb2.ModelManifest(
        manifest_version=MANIFEST_VERSION,
        model_id=model_id or kind,
        version=version,
        domain=model_pb2.MODEL_DOMAIN_UNSPECIFIED,
        feature_set=_feature_set(columns),
        input_name=INPUT_NAME,
        normal_label=normal,
        library_versions=library_versions("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy"),
    )
    if kind in SUPERVISED:
        return _supervised(kind, x, labels, normal, train, test, split, manifest, seed, source)

    fit_rows = train[labels[train] == normal] if label is not None else train
    fit_rows = fit_rows[np.argsort(order[fit_rows], kind="stable")]
    cut = round(len(fit_rows) * 0.8)
    fit, calibration = fit_rows[:cut], fit_rows[cut:]
    scaling = LogScaling.fit(x[fit])
    sample = fit if len(fit) <= _MAX_FIT_ROWS else np.sort(rng.choice(fit, _MAX_FIT_ROWS, replace=False))
    threshold_method = ""
    explanation = ""
    score_output = SCORE
    model_kind: model_pb2.ModelKind.ValueType = model_pb2.MODEL_KIND_ANOMALY_SCORER
    if kind == "isolation-forest":
        forest = IsolationForest(n_estimators=100, max_samples=256, random_state=seed).fit(x[fit])
        onnx_bytes = isolation_forest_to_onnx(forest, n)
        model_kind = model_pb2.MODEL_KIND_ISOLATION_FOREST
        description = "Isolation forest (100 trees, 256 rows each) in one tree ensemble"
    elif kind == "one-class-svm":
        svm = OneClassSVM(nu=0.05, gamma="scale").fit(scaling.apply(x[sample]))
        onnx_bytes = _one_class_svm_graph(scaling, svm, n)
        description = f"One-class SVM (RBF, nu 0.05) on {len(sample)} log-scaled, standardised rows"
    elif kind == "kmeans":
        k = min(64, max(2, len(fit) // 20))
        km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(scaling.apply(x[fit]))
        onnx_bytes = nearest_point_graph(scaling, km.cluster_centers_.astype(np.float32), "auris_kmeans")
        description = f"k-means distance: distance to the nearest of {k} centroids (log-scaled, standardised)"
    elif kind == "dbscan":
        z = scaling.apply(x[sample])
        k_dist = NearestNeighbors(n_neighbors=5).fit(z).kneighbors(z)[0][:, -1]
        eps = float(np.quantile(k_dist, 0.95))
        db = DBSCAN(eps=eps, min_samples=5).fit(z)
        core = db.components_.astype(np.float32) if len(db.components_) else z
        onnx_bytes = nearest_point_graph(scaling, core, "auris_dbscan")
        description = (
            f"DBSCAN (eps {eps:.3g}, min_samples 5) on {len(sample)} rows as a nearest-core-point graph "
            f"({len(core)} core points): score = distance to the nearest core point, noise beyond eps"
        )
    else:
        autoencoder = fit_autoencoder(x[fit], seed=seed)
        onnx_bytes = autoencoder.to_onnx()
        score_output, explanation = AE_SCORE, ERRORS_OUTPUT
        model_kind = model_pb2.MODEL_KIND_AUTOENCODER
        description = "MLP autoencoder (32-8-32, relu), mean squared reconstruction error"

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])

    def score(rows: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
        if not len(rows):
            return np.zeros(0)
        (out,) = session.run([score_output], {INPUT_NAME: x[rows]})
        return np.asarray(out, dtype=np.float64).reshape(len(rows), -1)[:, 0]

    if kind == "dbscan":
        threshold = eps
        threshold_method = "eps: DBSCAN's own rule (farther than eps from every core point is noise)"
    else:
        threshold = float(np.quantile(score(calibration), 1 - _TARGET_FPR)) if len(calibration) else 0.0
        threshold_method = (
            f"{1 - _TARGET_FPR:.2f} quantile of the scores of the latest 20% of the "
            f"{'normal ' if label is not None else ''}training rows ({len(calibration)}, held out of fitting)"
        )
    test_scores = score(test)
    if label is not None:
        evaluation = detector_evaluation(labels[test].tolist(), test_scores, threshold, normal, split)
    else:
        evaluation = model_pb2.Evaluation(split=split, baseline_name="none (no label)")
        evaluation.extra["flagged_share_test"] = (
            float((test_scores >= threshold).mean()) if len(test) else 0.0
        )
    manifest.kind = model_kind
    manifest.score_output = score_output
    manifest.explanation_output = explanation
    manifest.threshold.CopyFrom(model_pb2.Threshold(value=threshold, method=threshold_method))
    manifest.evaluation.CopyFrom(evaluation)
    fitted_on = "normal rows" if label is not None else "rows"
    manifest.description = (
        f"{description}; fitted on {len(fit)} {fitted_on}{' of ' + source if source else ''}."
    )
    return _seal(onnx_bytes, manifest, test_scores, labels[test] == normal)


def _supervised(
    kind: str,
    x: Matrix,
    labels: npt.NDArray[np.str_],
    normal: str,
    train: npt.NDArray[np.intp],
    test: npt.NDArray[np.intp],
    split: str,
    manifest: model_pb2.ModelManifest,
    seed: int,
    source: str,
) -> ZooModel:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model: Any
    if kind == "random-forest":
        model = RandomForestClassifier(
            n_estimators=64,
            max_depth=16,
            min_samples_leaf=2,
            class_weight="balanced",
            n_jobs=2,
            random_state=seed,
        )
        description = "Random forest (64 trees, depth <= 16, balanced class weights)"
    elif kind == "gradient-boosting":
        # LightGBM, not scikit-learn: GradientBoostingClassifier's multi-class leaf values reached
        # 1e146 on CIC-IDS2017's small classes (NaN after a float32 softmax), and
        # HistGradientBoosting does not convert under protobuf 7.
        from lightgbm import LGBMClassifier

        model = LGBMClassifier(
            n_estimators=100,
            num_leaves=15,
            learning_rate=0.1,
            class_weight="balanced",
            n_jobs=2,
            verbose=-1,
            random_state=seed,
        )
        description = "LightGBM gradient-boosted trees (100 rounds, 15 leaves, balanced class weights)"
    else:
        # Standardising in front of an MLP is harmless (it is not a tree); heavy tails are clipped.
        model = make_pipeline(
            StandardScaler(), MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=200, random_state=seed)
        )
        description = "MLP classifier (64-32, relu) behind a standard scaler"
    model.fit(x[train], labels[train])
    classes = [str(c) for c in model.classes_]
    onnx_bytes = _sklearn_classifier_onnx(model, x.shape[1])
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (probs,) = session.run([PROBABILITIES], {INPUT_NAME: x[test]})
    probs = np.asarray(probs, dtype=np.float64)
    normal_index = classes.index(normal)
    attack_score = 1.0 - probs[:, normal_index]
    predicted = [classes[i] for i in probs.argmax(axis=1)]
    evaluation = classifier_evaluation(labels[test].tolist(), predicted, attack_score, classes, normal, split)
    reference = model.predict_proba(x[test])
    evaluation.extra["onnx_parity_max_abs_diff"] = (
        float(np.max(np.abs(reference - probs))) if len(test) else 0.0
    )
    manifest.kind = model_pb2.MODEL_KIND_CLASSIFIER
    manifest.score_output = PROBABILITIES
    manifest.labels.extend(classes)
    manifest.threshold.CopyFrom(model_pb2.Threshold(value=0.5, method=f"0.5 on 1 - P({normal}), not tuned"))
    manifest.evaluation.CopyFrom(evaluation)
    manifest.description = f"{description}; trained on {len(train)} rows{' of ' + source if source else ''}."
    return _seal(onnx_bytes, manifest, attack_score, labels[test] == normal)


def _seal(
    onnx_bytes: bytes,
    manifest: model_pb2.ModelManifest,
    scores: npt.NDArray[np.float64],
    is_normal: npt.NDArray[np.bool_],
) -> ZooModel:
    manifest.onnx_file = f"{manifest.model_id}.onnx"
    manifest.onnx_sha256 = hashlib.sha256(onnx_bytes).hexdigest()
    manifest.created_time.CopyFrom(timestamp_pb2.Timestamp())
    manifest.created_time.FromDatetime(dt.datetime.now(dt.UTC).replace(microsecond=0))
    return ZooModel(onnx_bytes, manifest, scores, is_normal)


def save_model(out_dir: Path, model: ZooModel, signing_key: Ed25519PrivateKey | None = None) -> Path:
    """Write ``ID.onnx`` and ``ID.manifest.json`` (signed when a key is given); return the manifest path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / model.manifest.onnx_file).write_bytes(model.onnx_bytes)
    if signing_key is not None:
        sign_manifest(model.manifest, signing_key)
    path = out_dir / f"{model.manifest.model_id}{MANIFEST_SUFFIX}"
    path.write_text(dump_manifest(model.manifest), encoding="utf-8")
    return path


def _inference_us_per_row(onnx_bytes: bytes, x: Matrix, batch: int = 64, repeats: int = 30) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    rows = x[:batch] if len(x) >= batch else np.resize(x, (batch, x.shape[1]))
    output = (
        session.get_outputs()[-1].name if len(session.get_outputs()) > 1 else session.get_outputs()[0].name
    )
    session.run([output], {INPUT_NAME: rows})
    started = time.perf_counter()
    for _ in range(repeats):
        session.run([output], {INPUT_NAME: rows})
    return (time.perf_counter() - started) / (repeats * batch) * 1e6


def compare(
    table: pd.DataFrame,
    kinds: Sequence[str],
    label: str,
    report_dir: Path,
    name: str,
    *,
    time_column: str | None = None,
    columns: Sequence[str] | None = None,
    normal_share: float | None = None,
    source: str = "",
    progress: Callable[[Sequence[str]], Iterable[str]] = lambda items: items,
) -> tuple[Path, dict[str, ZooModel]]:
    """Train every kind on one table and split; write ``name.md`` and ``name.png`` into report_dir.

    ``normal_share`` weights the held-out normal rows to that share (precision, F1 and PR-AUC at a
    natural balance); false-positive rates do not depend on it.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    from auris.training.reports import markdown_table, plot_comparison

    report_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, ZooModel] = {}
    rows: list[tuple[object, ...]] = []
    pr_aucs: list[float] = []
    f1s: list[float] = []
    prevalence = 0.0
    flag_all_f1 = 0.0
    for kind in progress(list(kinds)):
        started = time.perf_counter()
        model = train_model(table, kind, label, time_column=time_column, columns=columns, source=source)
        seconds = time.perf_counter() - started
        models[kind] = model
        is_attack = ~model.test_is_normal
        weights = np.ones(len(is_attack))
        if normal_share is not None and model.test_is_normal.any() and is_attack.any():
            weights[model.test_is_normal] = (
                normal_share / (1 - normal_share) * is_attack.sum() / model.test_is_normal.sum()
            )
        flagged = model.test_scores >= model.manifest.threshold.value
        tp = float(weights[is_attack & flagged].sum())
        fp = float(weights[~is_attack & flagged].sum())
        fn = float(weights[is_attack & ~flagged].sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        prevalence = float(weights[is_attack].sum() / weights.sum())
        flag_all_f1 = 2 * prevalence / (1 + prevalence)
        pr_auc = float(average_precision_score(is_attack, model.test_scores, sample_weight=weights))
        roc = float(roc_auc_score(is_attack, model.test_scores))
        fpr = float(flagged[model.test_is_normal].mean())
        recall = float(flagged[is_attack].mean())
        pr_aucs.append(pr_auc)
        f1s.append(f1)
        rows.append(
            (
                kind,
                "supervised" if kind in SUPERVISED else "normal rows only",
                pr_auc,
                roc,
                f1,
                recall,
                fpr,
                model.manifest.evaluation.macro_f1,
                f"{len(model.onnx_bytes) / 1000:.0f}",
                f"{_inference_us_per_row(model.onnx_bytes, table_matrix(table, model)):.2f}",
                f"{seconds:.1f}",
            )
        )
    (report_dir / f"{name}.png").unlink(missing_ok=True)
    plot_comparison(
        list(models),
        {"PR-AUC": pr_aucs, "F1 at the threshold": f1s},
        {"PR-AUC": prevalence, "F1 at the threshold": flag_all_f1},
        report_dir / f"{name}.png",
        f"model zoo on {source or name} (time split)",
    )
    first = next(iter(models.values()))
    balance = (
        f"normal rows weighted to a {normal_share:.0%} share"
        if normal_share is not None
        else "rows as sampled"
    )
    text = (
        f"# Model zoo: {source or name}\n\n"
        f"Every kind trained by `auris.training.zoo.train_model` on the same table and split "
        f"({first.manifest.evaluation.split}); {len(first.manifest.feature_set.columns)} feature columns. "
        f"Attack (not `{first.manifest.normal_label}`) is the positive class; {balance} for PR-AUC and F1. "
        "Supervised kinds: threshold 0.5 on 1 - P(normal); the others learn from normal training rows "
        "only, threshold from a normal calibration split (DBSCAN: eps).\n\n"
        f"Trivial baselines: flag everything has F1 {flag_all_f1:.4f}; a random score has PR-AUC "
        f"{prevalence:.4f} and ROC AUC 0.5.\n\n"
        + markdown_table(
            (
                "kind",
                "trained on",
                "PR-AUC",
                "ROC AUC",
                "F1 at threshold",
                "recall",
                "normal FPR",
                "macro F1 (manifest)",
                "ONNX kB",
                "µs/row (batch 64, 1 thread)",
                "fit + export s",
            ),
            rows,
        )
        + f"\n![comparison]({name}.png)\n"
    )
    path = report_dir / f"{name}.md"
    path.write_text(text, encoding="utf-8")
    return path, models


def table_matrix(table: pd.DataFrame, model: ZooModel, rows: int = 256) -> Matrix:
    """The first ``rows`` rows of ``table`` in the model's column order, cleaned as for training."""
    return _clean(table.head(rows), list(model.manifest.feature_set.columns))


def _clean(table: pd.DataFrame, columns: Sequence[str]) -> Matrix:
    """float32 features with NaN and infinities as 0 and magnitudes capped, as the agent's to_matrix."""
    values = table[list(columns)].to_numpy(dtype=np.float64)
    values[~np.isfinite(values)] = 0.0
    clipped: Matrix = np.clip(values, -1e12, 1e12).astype(np.float32)
    return clipped
