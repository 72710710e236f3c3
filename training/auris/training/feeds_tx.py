"""Transaction models: gradient boosting alone against the autoencoder + gradient boosting hybrid.

The hybrid: an MLP autoencoder fitted on normal transactions only; its per-feature squared
reconstruction errors and their mean join the raw features as the input of a LightGBM
classifier. During training the classifier sees out-of-fold errors (each row's errors come from
an autoencoder that never saw that row), which is what it meets when serving new rows. Both parts
are exported into ONE ONNX graph (input ``features``, outputs ``probabilities`` and the
autoencoder's ``feature_errors``, which explain a score). Gradient boosting alone is trained on the
raw features with the same settings; when it ships, its graph still carries the autoencoder, whose
errors then only explain and never score.

Which one ships is decided on the evaluation split: the hybrid only when the paired bootstrap
interval of (hybrid - GB alone) AUPRC lies above zero.

Two tables:
- ``ulb-pca`` (real): the ULB card rows (V1..V28 + amount). Split by ``Time``: every row before the
  median time of the random-sample subset trains; the subset's rows from that time on evaluate
  (never trained on). Precision is corrected to the natural fraud rate by weighting the subset's
  normal rows 57.8x (the data README's figure).
- ``tx-windows`` (SIMULATED): the Fraud Detection Handbook stream, featured with
  ``auris.collector.feed_features.TransactionWindows`` (the collector's own code); split by
  month. Its figures describe the simulator, not real fraud.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pandas as pd
from onnx import TensorProto, helper, numpy_helper

from auris.agent.manifest import file_sha256
from auris.collector.feed_features import TX_ULB, TX_WINDOWS, FeedFeatureSet, TransactionWindows
from auris.training.autoencoder import ERRORS_OUTPUT, Autoencoder, fit_autoencoder
from auris.training.autoencoder import INPUT_NAME as AE_INPUT
from auris.training.autoencoder import SCORE_OUTPUT as AE_SCORE
from auris.training.feeds_eval import (
    BootstrapFigure,
    auprc,
    bootstrap_pr,
    threshold_figures,
    threshold_max_f1,
)

__all__ = [
    "HANDBOOK",
    "NATURAL_NORMAL_WEIGHT",
    "PRECISION_TARGET",
    "ULB",
    "TxTable",
    "TxTrained",
    "handbook_table",
    "hybrid_graph",
    "train_transactions",
    "ulb_table",
]

logger = logging.getLogger(__name__)

ULB = Path("transactions/creditcard-ulb/transactions.csv.gz")
HANDBOOK = Path("transactions/handbook-sim/transactions.parquet")
# The ULB README: weight the random sample's normals ~57.8x to reach the natural 0.17% fraud rate.
NATURAL_NORMAL_WEIGHT = 57.8
PRECISION_TARGET = 0.9
PROBABILITIES = "probabilities"
LABELS = ["normal", "fraud"]
# Trees compare float32 on both sides: anything above this is an export bug.
TREE_PARITY = 1e-5
AE_PARITY_REL = 1e-4
_IR_VERSION = 10
_OPSET = 17

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Idx = npt.NDArray[np.intp]
T = TypeVar("T")
Progress = Callable[[Iterable[T], str], Iterable[T]]


def _no_progress(items: Iterable[T], desc: str) -> Iterable[T]:
    return items


@dataclasses.dataclass
class TxTable:
    """A featured transaction table with its honest split."""

    name: str
    feature_set: FeedFeatureSet
    x: F32
    y: npt.NDArray[np.bool_]
    time: F64
    fit: Idx  # rows that train (all parts)
    evaluate: Idx  # rows that judge, never trained on
    calibrate: Idx  # training rows whose out-of-fold scores choose the threshold
    weights: F64  # per row, for precision at the natural fraud rate (1 where already natural)
    split: str
    source: Path
    sha256: str
    extra_rows: dict[str, Idx] = dataclasses.field(default_factory=dict)  # named eval slices

    @property
    def columns(self) -> tuple[str, ...]:
        return self.feature_set.columns


def ulb_table(path: Path) -> TxTable:
    frame = pd.read_csv(path)
    x = frame[[f"V{i}" for i in range(1, 29)] + ["Amount"]].to_numpy(np.float32)
    y = frame["Class"].to_numpy() == 1
    time = frame["Time"].to_numpy(np.float64)
    subset = frame["in_random_sample_bhavyasoni01"].to_numpy(bool)
    cut = float(np.median(time[subset]))
    fit = np.flatnonzero(time < cut)
    evaluate = np.flatnonzero(subset & (time >= cut))
    weights = np.where(subset & ~y, NATURAL_NORMAL_WEIGHT, 1.0)
    split = (
        f"by Time: every row with Time < {cut:.0f} s (the median time of the random-sample subset) "
        f"trains ({len(fit)} rows, {int(y[fit].sum())} frauds); the random-sample subset's rows with "
        f"Time >= {cut:.0f} s evaluate ({len(evaluate)} rows, {int(y[evaluate].sum())} frauds), never "
        f"trained on; precision at the natural fraud rate (subset normals weighted "
        f"{NATURAL_NORMAL_WEIGHT}x)"
    )
    return TxTable(
        name="ulb",
        feature_set=TX_ULB,
        x=x,
        y=y,
        time=time,
        fit=fit,
        evaluate=evaluate,
        calibrate=fit[subset[fit]],  # only the random sample has a known sampling rate
        weights=weights,
        split=split,
        source=path,
        sha256=file_sha256(path),
    )


def handbook_table(path: Path, batch: int = 50_000, progress: Progress[int] = _no_progress) -> TxTable:
    """The simulated stream through ``TransactionWindows`` in time order, batch by batch."""
    frame = pd.read_parquet(
        path,
        columns=["TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD", "TX_FRAUD_SCENARIO"],
    )
    frame = frame.sort_values("TX_DATETIME", kind="stable").reset_index(drop=True)
    times = frame["TX_DATETIME"].to_numpy("datetime64[ms]").astype(np.int64) / 1e3
    customers = frame["CUSTOMER_ID"].astype(str).tolist()
    terminals = frame["TERMINAL_ID"].astype(str).tolist()
    amounts = frame["TX_AMOUNT"].to_numpy(np.float64)
    windows = TransactionWindows()
    parts = []
    for start in progress(range(0, len(frame), batch), "transaction windows"):
        end = start + batch
        parts.append(
            windows.update(times[start:end], customers[start:end], terminals[start:end], amounts[start:end])
        )
    x = np.concatenate(parts).astype(np.float32)
    y = frame["TX_FRAUD"].to_numpy() == 1
    month = frame["TX_DATETIME"].dt.month.to_numpy()
    day = frame["TX_DATETIME"].dt.day.to_numpy()
    # The first week fills the 7-day windows: not trained on. April-June train, July is left out
    # (a gap, as when labels arrive late), August evaluates.
    fit = np.flatnonzero(((month == 4) & (day > 7)) | (month == 5) | (month == 6))
    evaluate = np.flatnonzero(month == 8)
    scenario = frame["TX_FRAUD_SCENARIO"].to_numpy()
    split = (
        f"SIMULATED data. By month: 8 April - 30 June trains ({len(fit)} rows, {int(y[fit].sum())} "
        f"frauds; the first week only fills the 7-day windows), July is a gap, August evaluates "
        f"({len(evaluate)} rows, {int(y[evaluate].sum())} frauds); the simulator's 0.8% fraud rate "
        f"stands as it is (no weighting)"
    )
    return TxTable(
        name="handbook",
        feature_set=TX_WINDOWS,
        x=x,
        y=y,
        time=times,
        fit=fit,
        evaluate=evaluate,
        calibrate=fit,
        weights=np.ones(len(y)),
        split=split,
        source=path,
        sha256=file_sha256(path),
        extra_rows={f"scenario {s}": evaluate[(scenario[evaluate] == s)] for s in (1, 2, 3)},
    )


def _lgbm(seed: int, n_estimators: int) -> Any:
    from lightgbm import LGBMClassifier

    return LGBMClassifier(
        n_estimators=n_estimators,
        learning_rate=0.05,
        num_leaves=15,
        min_child_samples=20,
        subsample=0.8,
        subsample_freq=1,
        colsample_bytree=0.8,
        reg_lambda=1.0,
        random_state=seed,
        n_jobs=2,
        verbose=-1,
    )


def _time_folds(rows: Idx, time: F64, k: int) -> list[Idx]:
    order = rows[np.argsort(time[rows], kind="stable")]
    return [np.sort(part) for part in np.array_split(order, k)]


def _ae_errors(ae: Autoencoder, x: F32) -> tuple[F32, F32]:
    """(per-feature errors, mean error) through the autoencoder's own ONNX graph: the float32
    figures the served hybrid computes."""
    session = ort.InferenceSession(ae.to_onnx(), providers=["CPUExecutionProvider"])
    errors, score = session.run([ERRORS_OUTPUT, AE_SCORE], {AE_INPUT: x})
    return np.asarray(errors, dtype=np.float32), np.asarray(score, dtype=np.float32)


def _hybrid_input(x: F32, errors: F32, score: F32) -> F32:
    return np.concatenate([x, errors, score[:, None]], axis=1).astype(np.float32)


def _rename(graph: onnx.GraphProto, prefix: str, keep: set[str]) -> None:
    """Prefix every edge, node and initializer name in place, except those in ``keep``."""

    def new(name: str) -> str:
        return name if (not name or name in keep) else prefix + name

    for node in graph.node:
        node.name = new(node.name) if node.name else node.name
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
    for init in graph.initializer:
        init.name = new(init.name)
    for value in list(graph.output) + list(graph.value_info):
        value.name = new(value.name)


def hybrid_graph(ae_onnx: bytes, gb_onnx: bytes, n_features: int, *, hybrid: bool) -> bytes:
    """One graph: input ``features``; the autoencoder's ``feature_errors`` and ``ae_score``; the
    classifier's ``probabilities`` over [features, errors, mean error] (hybrid) or over the raw
    features (gradient boosting alone)."""
    ae = onnx.load_from_string(ae_onnx)
    gb = onnx.load_from_string(gb_onnx)
    _rename(ae.graph, "ae_", {AE_INPUT})
    gb_in = gb.graph.input[0].name
    _rename(gb.graph, "gb_", {gb_in, PROBABILITIES})
    nodes = list(ae.graph.node)
    inits = list(ae.graph.initializer) + list(gb.graph.initializer)
    if hybrid:
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "unsqueeze_axes"))
        nodes += [
            helper.make_node("Unsqueeze", ["ae_" + AE_SCORE, "unsqueeze_axes"], ["ae_score_column"]),
            helper.make_node("Concat", [AE_INPUT, "ae_" + ERRORS_OUTPUT, "ae_score_column"], [gb_in], axis=1),
        ]
    else:
        nodes.append(helper.make_node("Identity", [AE_INPUT], [gb_in]))
    nodes += list(gb.graph.node)
    nodes += [
        helper.make_node("Identity", ["ae_" + ERRORS_OUTPUT], [ERRORS_OUTPUT]),
    ]  # the autoencoder's mean error is already named "ae_score"
    assert "ae_" + AE_SCORE == "ae_score"
    graph = helper.make_graph(
        nodes,
        "auris_tx_hybrid" if hybrid else "auris_tx_gb",
        [helper.make_tensor_value_info(AE_INPUT, TensorProto.FLOAT, [None, n_features])],
        [
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [None, 2]),
            helper.make_tensor_value_info(ERRORS_OUTPUT, TensorProto.FLOAT, [None, n_features]),
            helper.make_tensor_value_info("ae_score", TensorProto.FLOAT, [None]),
        ],
        initializer=inits,
    )
    ml = next(o.version for o in gb.opset_import if o.domain == "ai.onnx.ml")
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET), helper.make_opsetid("ai.onnx.ml", ml)]
    )
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def _float32_at_most(value: float) -> float:
    """The largest float32 <= value: for float32 x, ``x <= value`` exactly when ``x <= this``."""
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


def _split_thresholds(model: Any) -> dict[tuple[int, int], float]:
    """LightGBM's double thresholds keyed by (tree, node id) as onnxmltools numbers the nodes: the
    root 0, then pre-order, both children of a split numbered before descending into the left."""
    out: dict[tuple[int, int], float] = {}
    for tree, info in enumerate(model.booster_.dump_model()["tree_info"]):
        counter = iter(range(1 << 30))

        def visit(node: dict[str, Any], node_id: int, tree: int = tree, counter: Any = counter) -> None:
            if "left_child" not in node:
                return
            left, right = next(counter), next(counter)
            out[(tree, node_id)] = float(node["threshold"])
            visit(node["left_child"], left)
            visit(node["right_child"], right)

        visit(info["tree_structure"], next(counter))
    return out


def _gb_onnx(model: Any, n_inputs: int) -> bytes:
    """LightGBM through onnxmltools, with every ``<=`` threshold moved to the largest float32 not
    above LightGBM's double threshold (onnxmltools rounds to nearest, so a float32 input equal to a
    threshold rounded up went the other way)."""
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    converted = onnxmltools.convert_lightgbm(
        model, initial_types=[("gb_input", FloatTensorType([None, n_inputs]))], target_opset=15, zipmap=False
    )
    exact = _split_thresholds(model)
    (ensemble,) = [n for n in converted.graph.node if n.op_type == "TreeEnsembleClassifier"]
    attrs = {a.name: a for a in ensemble.attribute}
    trees, nodes = list(attrs["nodes_treeids"].ints), list(attrs["nodes_nodeids"].ints)
    modes = [m.decode() for m in attrs["nodes_modes"].strings]
    values = list(attrs["nodes_values"].floats)
    for i, mode in enumerate(modes):
        if mode == "LEAF":
            continue
        if mode != "BRANCH_LEQ":
            raise RuntimeError(f"unexpected LightGBM split mode {mode} in the ONNX graph")
        values[i] = _float32_at_most(exact[(trees[i], nodes[i])])
    del attrs["nodes_values"].floats[:]
    attrs["nodes_values"].floats.extend(values)
    data: bytes = converted.SerializeToString()
    return data


@dataclasses.dataclass
class TxVariant:
    """One shippable model: its graph, scores and threshold."""

    name: str  # "gb" or "hybrid"
    onnx_bytes: bytes
    eval_scores: F64
    fit_scores: F64  # in-sample, for the reference distribution
    threshold: float
    threshold_method: str
    parity_tree: float  # onnxruntime vs LightGBM, max |diff| of P(fraud)
    parity_ae: float  # onnxruntime vs scikit-learn autoencoder, max relative diff of the mean error
    n_estimators: int


@dataclasses.dataclass
class TxTrained:
    table: TxTable
    variants: dict[str, TxVariant]
    ae_eval_scores: F64
    auprc: dict[str, BootstrapFigure]
    recall_at_p: dict[str, BootstrapFigure]
    shipped: str  # "gb" or "hybrid"
    decision: str
    autoencoder: Autoencoder
    bootstrap_rounds: int

    @property
    def eval_y(self) -> npt.NDArray[np.bool_]:
        return self.table.y[self.table.evaluate]

    @property
    def eval_w(self) -> F64:
        return self.table.weights[self.table.evaluate]


def _choose_threshold(y: npt.NDArray[np.bool_], scores: F64, w: F64) -> tuple[float, str]:
    return threshold_max_f1(y, scores, w), (
        "best F1 at the natural fraud rate on out-of-fold scores of the training rows (time-blocked "
        "folds); the evaluation rows play no part"
    )


def train_transactions(
    table: TxTable,
    *,
    n_estimators: int = 300,
    folds: int = 4,
    ae_fit_rows: int = 150_000,
    bootstrap_rounds: int = 1000,
    seed: int = 0,
    progress: Progress[int] = _no_progress,
) -> TxTrained:
    """Fit the autoencoder, GB alone and the hybrid; judge them on the evaluation rows."""
    rng = np.random.default_rng(seed)
    x, y, fit = table.x, table.y, table.fit
    steps = iter(progress(range(2 * folds + 5), f"{table.name} models"))

    def step() -> None:
        next(steps, None)

    def normals(rows: Idx) -> Idx:
        chosen = rows[~y[rows]]
        if len(chosen) > ae_fit_rows:
            chosen = np.sort(rng.choice(chosen, ae_fit_rows, replace=False))
        return chosen

    # Out-of-fold autoencoder errors for the training rows (time-blocked folds).
    parts = _time_folds(fit, table.time, folds)
    n = x.shape[1]
    oof_errors = np.zeros((len(x), n), dtype=np.float32)
    oof_score = np.zeros(len(x), dtype=np.float32)
    for part in parts:
        others = np.setdiff1d(fit, part, assume_unique=True)
        ae_k = fit_autoencoder(x[normals(others)], seed=seed)
        oof_errors[part], oof_score[part] = _ae_errors(ae_k, x[part])
        step()
    ae = fit_autoencoder(x[normals(fit)], seed=seed)
    ev = table.evaluate
    eval_errors, eval_score = _ae_errors(ae, x[ev])
    step()

    inputs = {
        "gb": (x, x[ev]),
        "hybrid": (_hybrid_input(x, oof_errors, oof_score), _hybrid_input(x[ev], eval_errors, eval_score)),
    }
    # Out-of-fold classifier scores choose each threshold.
    calibrate = table.calibrate
    oof_prob: dict[str, F64] = {name: np.zeros(len(x)) for name in inputs}
    for part in parts:
        others = np.setdiff1d(fit, part, assume_unique=True)
        for name, (train_x, _) in inputs.items():
            model = _lgbm(seed, n_estimators).fit(train_x[others], y[others].astype(np.int64))
            oof_prob[name][part] = model.predict_proba(train_x[part])[:, 1]
        step()

    variants: dict[str, TxVariant] = {}
    ae_onnx = ae.to_onnx()
    for name, (train_x, eval_x) in inputs.items():
        model = _lgbm(seed, n_estimators).fit(train_x[fit], y[fit].astype(np.int64))
        graph = hybrid_graph(ae_onnx, _gb_onnx(model, train_x.shape[1]), n, hybrid=name == "hybrid")
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        probabilities, ae_out = session.run([PROBABILITIES, "ae_score"], {AE_INPUT: x[ev]})
        served = np.asarray(probabilities, dtype=np.float64)[:, 1]
        reference = model.predict_proba(eval_x)[:, 1]
        ae_reference = ae.reference(x[ev])[0]
        threshold, method = _choose_threshold(
            y[calibrate], oof_prob[name][calibrate], table.weights[calibrate]
        )
        fit_scores = np.asarray(session.run([PROBABILITIES], {AE_INPUT: x[fit]})[0], dtype=np.float64)[:, 1]
        variants[name] = TxVariant(
            name=name,
            onnx_bytes=graph,
            eval_scores=served,
            fit_scores=fit_scores,
            threshold=threshold,
            threshold_method=method,
            parity_tree=float(np.max(np.abs(served - reference))) if len(ev) else 0.0,
            parity_ae=float(
                np.max(np.abs(np.asarray(ae_out) - ae_reference) / np.maximum(1.0, np.abs(ae_reference)))
            ),
            n_estimators=n_estimators,
        )
        step()

    y_ev, w_ev = y[ev], table.weights[ev]
    scores = {"gb": variants["gb"].eval_scores, "hybrid": variants["hybrid"].eval_scores}
    scores["autoencoder"] = eval_score.astype(np.float64)
    pairs = {"hybrid - gb": ("hybrid", "gb")}
    auprc_ci, recall_ci = bootstrap_pr(
        y_ev, scores, w_ev, target=PRECISION_TARGET, rounds=bootstrap_rounds, seed=seed, pairs=pairs
    )
    step()
    diff = auprc_ci["hybrid - gb"]
    if diff.low > 0:
        shipped = "hybrid"
        decision = (
            f"hybrid shipped: its AUPRC is higher than GB alone's by {diff.value:.4f}, paired 95% "
            f"bootstrap interval [{diff.low:.4f}, {diff.high:.4f}] above zero"
        )
    else:
        shipped = "gb"
        decision = (
            f"gradient boosting alone shipped: hybrid - GB AUPRC = {diff.value:+.4f}, paired 95% bootstrap "
            f"interval [{diff.low:+.4f}, {diff.high:+.4f}] does not lie above zero"
        )
    return TxTrained(
        table=table,
        variants=variants,
        ae_eval_scores=eval_score.astype(np.float64),
        auprc=auprc_ci,
        recall_at_p=recall_ci,
        shipped=shipped,
        decision=decision,
        autoencoder=ae,
        bootstrap_rounds=bootstrap_rounds,
    )


def summary_rows(trained: TxTrained) -> list[tuple[str, str, str, str, str, str, str]]:
    """(model, AUPRC [CI], recall@P0.9 [CI], threshold, precision, recall, F1) on the evaluation rows."""
    y, w = trained.eval_y, trained.eval_w
    rows = []
    for name in ("gb", "hybrid", "autoencoder"):
        if name == "autoencoder":
            scores = trained.ae_eval_scores
            thr_text, p, r, f = "-", "-", "-", "-"
        else:
            variant = trained.variants[name]
            scores = variant.eval_scores
            figures = threshold_figures(y, scores, variant.threshold, w)
            thr_text = f"{variant.threshold:.4f}"
            p, r, f = f"{figures.precision:.3f}", f"{figures.recall:.3f}", f"{figures.f1:.3f}"
        del scores
        rows.append((name, trained.auprc[name].text(), trained.recall_at_p[name].text(), thr_text, p, r, f))
    return rows


# ---------------------------------------------------------------------------------------------
# Shipping: manifests, signatures, reports

MODEL_PREFIX = {"ulb": "tx-ulb", "handbook": "tx-windows"}
_TITLES = {
    "ulb": "ULB card transactions (real)",
    "handbook": "Fraud Detection Handbook stream (SIMULATED)",
}


def model_id(trained: TxTrained, variant: str) -> str:
    return f"{MODEL_PREFIX[trained.table.name]}-{variant}"


def tx_evaluation(trained: TxTrained, variant: str) -> Any:
    """The manifest's Evaluation of one variant on the evaluation rows, with the baselines."""
    from auris.training.metrics import classifier_evaluation

    table, v = trained.table, trained.variants[variant]
    y, w = trained.eval_y, trained.eval_w
    truth = np.where(y, "fraud", "normal").tolist()
    predicted = np.where(v.eval_scores >= v.threshold, "fraud", "normal").tolist()
    evaluation = classifier_evaluation(
        truth, predicted, v.eval_scores, ["fraud", "normal"], "normal", table.split, w
    )
    flags = threshold_figures(y, v.eval_scores, v.threshold, w)
    evaluation.baseline_name = "flag everything"
    evaluation.baseline_macro_f1 = (flags.baseline_f1 + 0.0) / 2  # fraud F1 of flag-all; normal F1 is 0
    evaluation.baseline_weighted_f1 = float(flags.baseline_f1 * w[y].sum() / w.sum())
    extra = evaluation.extra
    extra["fraud_f1_flag_everything"] = flags.baseline_f1
    for name in ("gb", "hybrid", "autoencoder"):
        figure, recall = trained.auprc[name], trained.recall_at_p[name]
        extra[f"{name}_auprc"] = figure.value
        extra[f"{name}_auprc_ci_low"] = figure.low
        extra[f"{name}_auprc_ci_high"] = figure.high
        extra[f"{name}_recall_at_precision_0.9"] = recall.value
        extra[f"{name}_recall_at_precision_0.9_ci_low"] = recall.low
        extra[f"{name}_recall_at_precision_0.9_ci_high"] = recall.high
    diff = trained.auprc["hybrid - gb"]
    extra["hybrid_minus_gb_auprc"] = diff.value
    extra["hybrid_minus_gb_auprc_ci_low"] = diff.low
    extra["hybrid_minus_gb_auprc_ci_high"] = diff.high
    extra["onnx_parity_tree_max_abs_diff"] = v.parity_tree
    extra["onnx_parity_ae_max_rel_diff"] = v.parity_ae
    for name, recall_share in scenario_recall_of(trained, variant).items():
        extra[f"recall_{name.replace(' ', '_')}"] = recall_share
    return evaluation


def scenario_recall_of(trained: TxTrained, variant: str) -> dict[str, float]:
    v = trained.variants[variant]
    position = {int(r): i for i, r in enumerate(trained.table.evaluate)}
    out = {}
    for name, rows in trained.table.extra_rows.items():
        picked = np.array([position[int(r)] for r in rows], dtype=np.intp)
        if len(picked):
            out[name] = float(np.mean(v.eval_scores[picked] >= v.threshold))
    return out


def _plot_pr(path: Path, y: npt.NDArray[np.bool_], scores: dict[str, F64], w: F64, title: str) -> None:
    from sklearn.metrics import precision_recall_curve

    from auris.training import reports

    plt: Any = reports.plt  # type: ignore[attr-defined]  # matplotlib, Agg backend set by reports
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, s in scores.items():
        precision, recall, _ = precision_recall_curve(y, s, sample_weight=w)
        ax.plot(recall, precision, label=f"{name} (AUPRC {auprc(y, s, w):.3f})")
    prevalence = float(w[y].sum() / w.sum())
    ax.axhline(prevalence, color="grey", linestyle="--", label=f"flag everything ({prevalence:.4f})")
    ax.axhline(PRECISION_TARGET, color="black", linestyle=":", linewidth=1, label="precision 0.9")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (natural fraud rate)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ship_transactions(
    trained: Sequence[TxTrained],
    out: Path,
    candidates: Path,
    reports_dir: Path,
    *,
    version: str,
    data_root: Path,
    signing_key: Any = None,
) -> list[Path]:
    """The winner of each table into ``out``, the other variant into ``candidates``; one report."""
    from auris.agent.drift import reference_distribution
    from auris.training import reports
    from auris.training.feeds_export import write_feed_model
    from auris.v1 import model_pb2

    written: list[Path] = []
    reports_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Transaction models (issue 6)\n\n",
        "Generated by `auris-train transactions`. Gradient boosting (LightGBM) alone against the hybrid "
        "(autoencoder fitted on normal rows; its per-feature errors and their mean join the raw features "
        "of a LightGBM classifier, trained on out-of-fold errors). Both are one ONNX graph each; the "
        "autoencoder's per-feature errors explain every score (for GB alone they only explain). "
        f"95% intervals: {trained[0].bootstrap_rounds if trained else 0} bootstrap resamples of the "
        "evaluation rows within each class, paired for the difference. "
        "The hybrid ships only when the paired interval of (hybrid - GB) AUPRC lies above zero.\n",
    ]
    for t in trained:
        table = t.table
        rel = (
            str(table.source.relative_to(data_root))
            if table.source.is_relative_to(data_root)
            else str(table.source)
        )
        for variant in ("gb", "hybrid"):
            v = t.variants[variant]
            mid = model_id(t, variant)
            shipped = variant == t.shipped
            description = (
                ("LightGBM classifier" if variant == "gb" else "Hybrid: autoencoder errors + LightGBM")
                + f" ({v.n_estimators} trees, 15 leaves) on {table.feature_set.name} columns, trained on "
                + f"{_TITLES[table.name]}. {t.decision}."
                + ("" if shipped else " Not shipped by default (candidate).")
            )
            preprocessing = (
                "none: V1..V28 from Transaction.features, the amount field; scaling is inside the graph"
                if table.name == "ulb"
                else "auris.collector.feed_features.TransactionWindows (entity windows over earlier "
                "transactions, calendar flags, UTC); scaling is inside the graph"
            )
            path = write_feed_model(
                out if shipped else candidates,
                v.onnx_bytes,
                model_id=mid,
                version=version,
                kind=model_pb2.MODEL_KIND_CLASSIFIER,
                domain=model_pb2.MODEL_DOMAIN_TRANSACTION,
                feature_set=table.feature_set,
                input_name=AE_INPUT,
                score_output=PROBABILITIES,
                explanation_output=ERRORS_OUTPUT,
                labels=tuple(LABELS),
                normal_label="normal",
                threshold=v.threshold,
                threshold_method=v.threshold_method,
                evaluation=tx_evaluation(t, variant),
                training_data=[(rel, table.sha256, len(table.fit))],
                description=description,
                preprocessing=preprocessing,
                libraries=("lightgbm", "onnxmltools", "scikit-learn"),
                reference=reference_distribution(table.x[table.fit], v.fit_scores, table.columns),
                signing_key=signing_key,
            )
            written.append(path)
        y, w = t.eval_y, t.eval_w
        png = f"feeds-transactions-{table.name}-pr.png"
        _plot_pr(
            reports_dir / png,
            y,
            {"gb alone": t.variants["gb"].eval_scores, "hybrid": t.variants["hybrid"].eval_scores,
             "autoencoder alone": t.ae_eval_scores},
            w,
            f"{_TITLES[table.name]}: evaluation split",
        )  # fmt: skip
        lines.append(f"\n## {_TITLES[table.name]}\n\n")
        lines.append(f"Split: {table.split}.\n\n")
        lines.append(
            reports.markdown_table(
                (
                    "model",
                    "AUPRC [95% CI]",
                    "recall at precision 0.9 [95% CI]",
                    "threshold",
                    "precision",
                    "recall",
                    "F1",
                ),
                summary_rows(t),
            )
        )
        flags = threshold_figures(y, t.variants["gb"].eval_scores, 0.0, w)
        lines.append(
            f"\nFlag everything: precision {flags.precision:.4f}, F1 {flags.baseline_f1:.4f} (AUPRC of a "
            f"random score = the fraud share, {flags.precision:.4f}).\n\n"
            f"Hybrid - GB alone: AUPRC {t.auprc['hybrid - gb'].text(4)}, recall at precision 0.9 "
            f"{t.recall_at_p['hybrid - gb'].text(3)}.\n\n**Decision:** {t.decision}. Shipped: "
            f"`{model_id(t, t.shipped)}`; candidate: "
            f"`{model_id(t, 'hybrid' if t.shipped == 'gb' else 'gb')}`.\n"
        )
        if table.extra_rows:
            lines.append(
                "\nRecall of the shipped model by simulated fraud scenario (1: amount > 220; 2: compromised "
                "terminal, every transaction there fraudulent for 28 days, which needs terminal fraud "
                "history the windows do not carry; 3: compromised customer, a third of their amounts x5): "
                + ", ".join(f"{k}: {v:.3f}" for k, v in scenario_recall_of(t, t.shipped).items())
                + ".\n"
            )
        lines.append(
            f"\nONNX parity (evaluation rows): P(fraud) vs LightGBM max |diff| "
            f"{t.variants['gb'].parity_tree:.1e} (GB), {t.variants['hybrid'].parity_tree:.1e} (hybrid); "
            f"autoencoder mean error vs scikit-learn max relative diff {t.variants['gb'].parity_ae:.1e}.\n"
        )
        lines.append(f"\n![precision-recall]({png})\n")
    report = reports_dir / "feeds-transactions.md"
    report.write_text("".join(lines), encoding="utf-8")
    written.append(report)
    return written
