"""``auris-train network-cic``: models on the agent's ``cicflowmeter`` features from the CIC tables.

Three models, all on ``HARMONISED_COLUMNS`` of CIC-IDS2017 + TII-SSRC-23:

- ``cic-rf``: a random forest over one attack taxonomy. Its two heads are the agent's own reading
  of a classifier: binary = 1 - P(benign) against the threshold, per class = the likeliest attack
  class above it.
- ``cic-ae``: the MLP autoencoder, fitted on benign rows only.
- ``cic-iforest``: an isolation forest on benign rows only, exported as one tree ensemble.
- ``cic-kmeans``: distance to the nearest of 64 k-means centroids of benign rows (the zoo's
  best unsupervised kind on CIC-IDS2017), a challenger to the two above.

The headline split is by time inside each class of each table (the tables' clocks are unrelated:
CIC-IDS2017 is July 2017, TII-SSRC-23 mostly starts at the epoch). Precision and F1 are weighted to
CIC-IDS2017's natural benign share (about 75 %; 16 % in the sample); false-positive rates do not
depend on the balance. The same recipe on a random row split is reported beside. A forest on
TII-SSRC-23 alone (``_tii_only``) is judged against the 8-class and binary figures that the earlier
student project reported on a random split, on splits by time inside each traffic type (the headline)
and inside each subtype, and on random rows.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sklearn.cluster import KMeans
from sklearn.ensemble import IsolationForest, RandomForestClassifier
from sklearn.metrics import f1_score, precision_recall_fscore_support
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors

from auris.agent.cicflowmeter import CICFLOWMETER_COLUMNS
from auris.agent.features import CICFLOWMETER, FeatureSet
from auris.agent.scoring import LoadedModel, load_model, to_matrix
from auris.agent.signing import ModelTrust
from auris.training import reports
from auris.training.autoencoder import ERRORS_OUTPUT, fit_autoencoder
from auris.training.autoencoder import SCORE_OUTPUT as AE_SCORE
from auris.training.cic_tables import BENIGN, HARMONISED_COLUMNS, FlowFrame, load_flow_frames
from auris.training.export import (
    INPUT_NAME,
    PARITY_TOLERANCE,
    PROBABILITIES,
    export_classifier,
    parity,
    write_model,
)
from auris.training.isolation_forest import SCORE_OUTPUT as IF_SCORE
from auris.training.isolation_forest import isolation_forest_to_onnx
from auris.training.metrics import (
    classifier_evaluation,
    detector_evaluation,
    natural_balance_weights,
    split_by_time,
)
from auris.training.pcap_flows import capture_files, flow_table
from auris.training.zoo import SCORE as ZOO_SCORE
from auris.training.zoo import LogScaling, nearest_point_graph
from auris.v1 import model_pb2

__all__ = ["HARMONISED", "Options", "agent_labels", "best_threshold", "tii_heads", "train_network_cic"]

logger = logging.getLogger(__name__)

# The subset of the agent's set that both tables define alike; manifests name these columns.
HARMONISED = FeatureSet(
    name=CICFLOWMETER.name,
    version=CICFLOWMETER.version,
    columns=HARMONISED_COLUMNS,
    meter_options=CICFLOWMETER.meter_options,
    extract=CICFLOWMETER.extract,
)
_COLUMN_INDEX = np.array([CICFLOWMETER_COLUMNS.index(c) for c in HARMONISED_COLUMNS], dtype=np.intp)
NATURAL_BENIGN_SHARE = {"cicids2017": 0.75}
ATTACK = "attack"
TII_MALICIOUS = ("DoS", "Bruteforce", "Mirai", "Information Gathering")
# Upstream's random-forest figures; its 8-class test held 258 benign rows of 1053 (upstream_*.csv).
UPSTREAM = {"binary_f1": 0.967, "tii8_weighted_f1": 0.9335, "test_benign_share": 258 / 1053}
_SPLIT = (
    "by time inside each class of each table (CIC-IDS2017 Label, TII-SSRC-23 Traffic Type): the latest "
    "25% of each held out; precision and F1 weighted to CIC-IDS2017's natural 75% benign share"
)
_AE_FPR_TARGET = 0.01

# (items, description) -> the items, maybe wrapped in a progress bar.
Progress = Callable[[Sequence[Any], str], Iterable[Any]]


@dataclasses.dataclass(frozen=True)
class Options:
    data: Path
    out: Path
    candidates: Path
    reports: Path
    trees: int = 64
    max_depth: int = 16
    version: str = "1"
    # Which of "cic-rf", "cic-ae", "cic-iforest", "cic-kmeans" go to ``out`` (loaded by default); the rest go
    # to ``candidates``. Agents refuse unsigned models, so a default needs ``signing_key``.
    defaults: tuple[str, ...] = ()
    pcap_max_flows: int = 2000
    skip_pcaps: bool = False
    signing_key: Ed25519PrivateKey | None = None


@dataclasses.dataclass
class _Built:
    """One trained model before it is written."""

    model_id: str
    kind: model_pb2.ModelKind.ValueType
    onnx_bytes: bytes
    labels: list[str]
    score_output: str
    explanation_output: str
    threshold: float
    threshold_method: str
    evaluation: model_pb2.Evaluation
    description: str
    report: list[str]  # Markdown sections
    test_scores: npt.NDArray[np.float64]


def _no_progress(items: Sequence[Any], _desc: str) -> Iterable[Any]:
    return items


def agent_labels(
    probs: npt.NDArray[np.float64], classes: Sequence[str], normal: str, threshold: float
) -> list[str]:
    """What the agent's scoring writes: above threshold the likeliest non-normal class, else argmax."""
    n = classes.index(normal)
    others = probs.copy()
    others[:, n] = -1.0
    best = np.where(1.0 - probs[:, n] >= threshold, others.argmax(axis=1), probs.argmax(axis=1))
    return [classes[i] for i in best]


def _binary_figures(
    is_attack: npt.NDArray[np.bool_], flagged: npt.NDArray[np.bool_], w: npt.NDArray[np.float64]
) -> dict[str, float]:
    p, r, f, _ = precision_recall_fscore_support(
        is_attack, flagged, average="binary", zero_division=0, sample_weight=w
    )
    everything = np.ones_like(is_attack)
    _, _, base_f, _ = precision_recall_fscore_support(
        is_attack, everything, average="binary", zero_division=0, sample_weight=w
    )
    benign = ~is_attack
    fpr = float(np.average(flagged[benign], weights=w[benign])) if benign.any() else 0.0
    return {
        "precision": float(p),
        "recall": float(r),
        "f1": float(f),
        "fpr": fpr,
        "baseline_f1": float(base_f),
    }


def _forest(opts: Options) -> RandomForestClassifier:
    return RandomForestClassifier(
        n_estimators=opts.trees,
        max_depth=opts.max_depth,
        min_samples_leaf=2,
        class_weight="balanced",
        n_jobs=2,
        random_state=0,
    )


def _sample(n: int, k: int, seed: int = 0) -> npt.NDArray[np.intp]:
    if n <= k:
        return np.arange(n, dtype=np.intp)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).astype(np.intp)


def _classifier(
    opts: Options, frame: FlowFrame, tii: FlowFrame, train: npt.NDArray[np.intp], test: npt.NDArray[np.intp]
) -> _Built:
    x = frame.x[:, _COLUMN_INDEX]
    y = frame.label
    model = _forest(opts).fit(x[train], y[train])
    classes = [str(c) for c in model.classes_]
    threshold = 0.5
    probs = model.predict_proba(x[test])
    attack_score = 1.0 - probs[:, classes.index(BENIGN)]
    predicted = agent_labels(probs, classes, BENIGN, threshold)
    w = natural_balance_weights(frame.dataset[test], y[test], BENIGN, NATURAL_BENIGN_SHARE)
    evaluation = classifier_evaluation(
        y[test].tolist(), predicted, attack_score, classes, BENIGN, _SPLIT, sample_weight=w
    )
    is_attack = y[test] != BENIGN
    flagged = attack_score >= threshold
    extra = evaluation.extra
    figures: dict[str, dict[str, float]] = {
        "time split, natural balance": _binary_figures(is_attack, flagged, w)
    }
    ones = np.ones(len(test))
    figures["time split, rows as sampled"] = _binary_figures(is_attack, flagged, ones)
    for ds in ("cicids2017", "tii-ssrc-23"):
        m = frame.dataset[test] == ds
        figures[f"time split, {ds} rows only"] = _binary_figures(is_attack[m], flagged[m], w[m])
    extra["binary_precision"] = figures["time split, natural balance"]["precision"]
    extra["binary_recall"] = figures["time split, natural balance"]["recall"]
    extra["binary_f1"] = figures["time split, natural balance"]["f1"]
    extra["binary_f1_flag_everything"] = figures["time split, natural balance"]["baseline_f1"]
    extra["tii_binary_f1"] = figures["time split, tii-ssrc-23 rows only"]["f1"]
    extra["cic_binary_f1"] = figures["time split, cicids2017 rows only"]["f1"]
    roc_png = opts.reports / "cic-rf-curves.png"
    extra["roc_auc"] = reports.plot_curves(
        is_attack, attack_score, roc_png, "cic-rf, time split (natural balance)", w
    )
    reports.plot_confusion(
        y[test].tolist(), predicted, classes, opts.reports / "cic-rf-confusion.png", "cic-rf, time split"
    )

    # A forest trained on benign-vs-attack alone, to check the multi-class forest's binary head.
    binary_model = _forest(opts).fit(x[train], y[train] != BENIGN)
    binary_score = binary_model.predict_proba(x[test])[:, 1]
    figures["dedicated binary forest, time split"] = _binary_figures(is_attack, binary_score >= 0.5, w)
    extra["dedicated_binary_forest_f1"] = figures["dedicated binary forest, time split"]["f1"]

    # The same recipe on a random row split (stratified by source class).
    keys = np.char.add(np.char.add(frame.dataset, "/"), frame.source_class)
    r_train, r_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=keys)
    r_model = _forest(opts).fit(x[r_train], y[r_train])
    r_probs = r_model.predict_proba(x[r_test])
    r_classes = [str(c) for c in r_model.classes_]
    r_pred = agent_labels(r_probs, r_classes, BENIGN, threshold)
    r_w = natural_balance_weights(frame.dataset[r_test], y[r_test], BENIGN, NATURAL_BENIGN_SHARE)
    r_eval = classifier_evaluation(
        y[r_test].tolist(),
        r_pred,
        1.0 - r_probs[:, r_classes.index(BENIGN)],
        r_classes,
        BENIGN,
        "random",
        r_w,
    )
    r_attack = y[r_test] != BENIGN
    r_flagged = r_probs[:, r_classes.index(BENIGN)] <= 1.0 - threshold
    figures["random split, natural balance"] = _binary_figures(r_attack, r_flagged, r_w)
    r_tii = frame.dataset[r_test] == "tii-ssrc-23"
    figures["random split, tii-ssrc-23 rows only"] = _binary_figures(
        r_attack[r_tii], r_flagged[r_tii], r_w[r_tii]
    )
    extra["random_split_macro_f1"] = r_eval.macro_f1
    extra["random_split_weighted_f1"] = r_eval.weighted_f1
    extra["random_split_binary_f1"] = figures["random split, natural balance"]["f1"]
    extra["random_split_tii_binary_f1"] = figures["random split, tii-ssrc-23 rows only"]["f1"]

    upstream_rows, upstream_extra = _tii_only(opts, tii)
    extra.update(upstream_extra)

    onnx_bytes = export_classifier(model, x.shape[1])
    diff = parity(onnx_bytes, model, x[test])
    extra["onnx_parity_max_abs_diff"] = diff
    if diff > PARITY_TOLERANCE:
        raise RuntimeError(f"cic-rf: ONNX parity {diff:.2e} exceeds {PARITY_TOLERANCE:.0e}")

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    sub = _sample(len(test), 4000)
    benign_col = classes.index(BENIGN)
    importance = reports.permutation_importance(
        session, PROBABILITIES, x[test][sub], is_attack[sub], lambda o: 1.0 - o[:, benign_col], w[sub]
    )
    reports.plot_importances(
        HARMONISED_COLUMNS, importance, opts.reports / "cic-rf-importance.png", "cic-rf feature importance"
    )

    binary_rows = [
        (name, f["precision"], f["recall"], f["f1"], f["fpr"], f["baseline_f1"])
        for name, f in figures.items()
    ]
    random_text = reports.evaluation_markdown(r_eval).replace("Split: random.", "Split: random 75/25 rows.")
    report = [
        "## Per-class head (time split, the manifest's evaluation)\n\n"
        + reports.evaluation_markdown(evaluation),
        "![confusion matrix](cic-rf-confusion.png)\n",
        "## Binary head: attack = 1 - P(benign) >= 0.5\n\n"
        + reports.markdown_table(
            ("split / rows", "precision", "recall", "F1", "benign FPR", "F1 flag everything"), binary_rows
        )
        + f"\nROC AUC (time split, natural balance): {extra['roc_auc']:.4f}.\n\n"
        + "![PR and ROC](cic-rf-curves.png)\n",
        "## The same recipe on a random row split\n\nRandom splits put near-duplicate flows on both "
        "sides; the gap to the time split is how much they flatter a model.\n\n" + random_text,
        "## Against the earlier student project (TII-SSRC-23)\n\n" + upstream_rows,
        "## Feature importance\n\nPermutation importance through the exported ONNX graph on "
        f"{len(sub)} test rows (drop in weighted PR-AUC).\n\n![importance](cic-rf-importance.png)\n",
    ]
    return _Built(
        model_id="cic-rf",
        kind=model_pb2.MODEL_KIND_CLASSIFIER,
        onnx_bytes=onnx_bytes,
        labels=classes,
        score_output=PROBABILITIES,
        explanation_output="",
        threshold=threshold,
        threshold_method="0.5 on 1 - P(benign), not tuned",
        evaluation=evaluation,
        description=(
            f"Random forest ({opts.trees} trees, depth <= {opts.max_depth}, balanced class weights) over "
            f"{len(classes)} classes ({', '.join(classes)}) on the {len(HARMONISED_COLUMNS)} cicflowmeter "
            f"columns CIC-IDS2017 and TII-SSRC-23 define alike; trained on {len(train)} rows."
        ),
        report=report,
        test_scores=attack_score.astype(np.float64),
    )


def tii_heads(
    probs: npt.NDArray[np.float64], classes: Sequence[str], attack_classes: Sequence[str], threshold: float
) -> tuple[npt.NDArray[np.float64], list[str]]:
    """(P(attack), per-class labels) of a classifier whose normal side is several classes.

    P(attack) is the summed probability of ``attack_classes`` (the agent's 1 - P(normal)); a row at
    or above the threshold gets its likeliest attack class, any other row its likeliest normal one.
    """
    attack = np.isin(np.asarray(classes), list(attack_classes))
    p_attack = probs[:, attack].sum(axis=1)
    flagged = p_attack >= threshold
    masked = np.where(flagged[:, None] == attack[None, :], probs, -1.0)
    return p_attack, [classes[i] for i in masked.argmax(axis=1)]


def best_threshold(is_attack: npt.NDArray[np.bool_], p_attack: npt.NDArray[np.float64]) -> float:
    """The threshold (0.05 to 0.95 in steps of 0.05) with the best binary F1; the middle of a tie."""
    grid = np.round(np.arange(1, 20) * 0.05, 2)
    f1 = np.array([f1_score(is_attack, p_attack >= t, zero_division=0) for t in grid])
    best = grid[f1 >= f1.max() - 1e-12]
    return float(best[len(best) // 2])


def _tii_forest(opts: Options) -> RandomForestClassifier:
    # No class weights, no depth cap: chosen on the training part only (a time-carved calibration split
    # and subtypes held out of it; docs/ROADMAP.md, issue 5). "balanced" weighs each of the 18 training
    # rows of TII's Background type 86 times a DoS row, which can pull unfamiliar flows to rare benign types.
    return RandomForestClassifier(n_estimators=opts.trees, min_samples_leaf=1, n_jobs=2, random_state=0)


# (train rows) -> (fit rows, calibration rows), carved from the training part the way its split is made.
_Carve = Callable[[npt.NDArray[np.intp]], tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]]


def _tii_only(opts: Options, tii: FlowFrame) -> tuple[str, dict[str, float]]:
    """TII-SSRC-23 alone, its 8 traffic types, against the earlier student project's random-split figures.

    The recipe reads the agent's own columns (``HARMONISED_COLUMNS``); its binary head is the agent's
    reading, 1 - P(the four benign types), against a threshold chosen on a calibration split carved
    from the training part only. The previous recipe (the 76 columns TII-SSRC-23 has, some defined
    unlike the agent's; 8-class argmax) is kept beside it.
    """
    y, times, subtype = tii.source_class, tii.time_ns, tii.subtype
    by_type = split_by_time(y.tolist(), times.tolist())
    by_subtype = split_by_time(subtype.tolist(), times.tolist())
    by_rows = tuple(train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y))

    def carve_time(labels: npt.NDArray[np.str_]) -> _Carve:
        def carve(train: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
            fit, cal = split_by_time(labels[train].tolist(), times[train].tolist())
            return train[fit], train[cal]

        return carve

    def carve_rows(train: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        fit, cal = train_test_split(train, test_size=0.25, random_state=0, stratify=y[train])
        return np.sort(fit), np.sort(cal)

    splits: list[tuple[str, str, tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]], _Carve]] = [
        ("time", "time, latest 25% of each traffic type", by_type, carve_time(y)),
        ("time_subtype", "time, latest 25% of each traffic subtype", by_subtype, carve_time(subtype)),
        ("random", "random 75/25 rows", (by_rows[0], by_rows[1]), carve_rows),
    ]
    x = tii.x[:, _COLUMN_INDEX]
    old_columns = np.array(
        [i for i, c in enumerate(CICFLOWMETER_COLUMNS) if c not in ("Fwd RST Flags", "Bwd RST Flags")],
        dtype=np.intp,
    )
    x_old = tii.x[:, old_columns]
    classes = sorted(set(y.tolist()))
    rows: list[tuple[object, ...]] = []
    per_class: dict[str, list[float]] = {c: [] for c in classes}
    extra: dict[str, float] = {
        "upstream_binary_f1": UPSTREAM["binary_f1"],
        "upstream_tii8_weighted_f1": UPSTREAM["tii8_weighted_f1"],
    }
    headline: dict[str, float] = {}
    onnx_note = ""
    for key, name, (train, test), carve in splits:
        truth = y[test]
        is_attack = np.isin(truth, TII_MALICIOUS)
        train_labels = y[train].tolist()
        majority = max(sorted(set(train_labels)), key=train_labels.count)
        always = [majority] * len(test)
        base_w = float(f1_score(truth, always, labels=classes, average="weighted", zero_division=0))
        base_m = float(f1_score(truth, always, labels=classes, average="macro", zero_division=0))
        base_b = float(f1_score(is_attack, np.ones_like(is_attack), zero_division=0))
        unseen = sorted(set(subtype[test]) - set(subtype[train]))

        fit, cal = carve(train)
        calibrating = _tii_forest(opts).fit(x[fit], y[fit])
        cal_p, _ = tii_heads(
            calibrating.predict_proba(x[cal]), [str(c) for c in calibrating.classes_], TII_MALICIOUS, 0.5
        )
        threshold = best_threshold(np.isin(y[cal], TII_MALICIOUS), cal_p)
        model = _tii_forest(opts).fit(x[train], y[train])
        model_classes = [str(c) for c in model.classes_]
        p_attack, pred = tii_heads(model.predict_proba(x[test]), model_classes, TII_MALICIOUS, threshold)
        old = _forest(opts).fit(x_old[train], y[train]).predict(x_old[test])

        for recipe, guess, flagged in (
            ("agent columns, 1 - P(benign) >= threshold", pred, p_attack >= threshold),
            ("previous: 76 TII columns, argmax type", list(old), np.isin(old, TII_MALICIOUS)),
        ):
            wf1 = float(f1_score(truth, guess, labels=classes, average="weighted", zero_division=0))
            mf1 = float(f1_score(truth, guess, labels=classes, average="macro", zero_division=0))
            bp, br, bf1, _ = precision_recall_fscore_support(
                is_attack, flagged, average="binary", zero_division=0
            )
            shown_threshold: object = threshold if recipe.startswith("agent") else "-"
            rows.append(
                (name, recipe, len(test), shown_threshold, wf1, mf1, bf1, bp, br, ", ".join(unseen) or "-")
            )
            prefix = f"tii_only_{key}" if recipe.startswith("agent") else f"tii_only_previous_{key}"
            extra[f"{prefix}_8class_weighted_f1"] = wf1
            extra[f"{prefix}_8class_macro_f1"] = mf1
            extra[f"{prefix}_binary_f1"] = float(bf1)
        extra[f"tii_only_{key}_threshold"] = threshold
        extra[f"tii_only_{key}_8class_weighted_f1_majority"] = base_w
        extra[f"tii_only_{key}_8class_macro_f1_majority"] = base_m
        extra[f"tii_only_{key}_binary_f1_flag_everything"] = base_b
        rows.append(
            (
                name,
                f"baseline: always {majority!r} / flag everything",
                len(test),
                "-",
                base_w,
                base_m,
                base_b,
                "-",
                "-",
                "-",
            )
        )
        _, _, f1s, _ = precision_recall_fscore_support(truth, pred, labels=classes, zero_division=0)
        for c, f in zip(classes, f1s, strict=True):
            per_class[c].append(float(f))
        if key == "time":
            support = {c: int((truth == c).sum()) for c in classes}
            seen = ~np.isin(subtype[test], unseen)
            # Every row of a subtype seen in training right, the others as the model labels them.
            ceiling = np.where(seen, truth, np.asarray(pred))
            headline = {
                "weighted": extra["tii_only_time_8class_weighted_f1"],
                "binary": extra["tii_only_time_binary_f1"],
                "ceiling": float(
                    f1_score(truth, ceiling, labels=classes, average="weighted", zero_division=0)
                ),
                "unseen_rows": float((~seen).sum()),
            }
            extra["tii_only_time_8class_weighted_f1_if_seen_subtypes_right"] = headline["ceiling"]
            # Binary F1 depends on the attack share: also at upstream's benign share.
            share = UPSTREAM["test_benign_share"]
            n_attack, n_benign = int(is_attack.sum()), int((~is_attack).sum())
            w = np.where(is_attack, 1.0, share / (1.0 - share) * n_attack / max(n_benign, 1))
            headline["binary_at_share"] = float(f1_score(is_attack, p_attack >= threshold, sample_weight=w))
            headline["everything_at_share"] = float(
                f1_score(is_attack, np.ones_like(is_attack), sample_weight=w)
            )
            extra["tii_only_time_binary_f1_at_upstream_benign_share"] = headline["binary_at_share"]
            headline["benign_share"] = n_benign / len(test)
            onnx_bytes = export_classifier(model, x.shape[1])
            diff = parity(onnx_bytes, model, x[test])
            if diff > PARITY_TOLERANCE:
                raise RuntimeError(f"TII-only forest: ONNX parity {diff:.2e} exceeds {PARITY_TOLERANCE:.0e}")
            extra["tii_only_onnx_bytes"] = float(len(onnx_bytes))
            onnx_note = (
                "The headline forest exports to ONNX through the project's exporter "
                f"({len(onnx_bytes) / 1e6:.2f} MB, largest difference to scikit-learn {diff:.1e}).\n\n"
            )
    beaten = [
        f"{label} {ours:.4f} {'>' if ours > theirs else '<='} upstream {theirs:.4f} "
        f"({'beaten' if ours > theirs else 'NOT beaten'})"
        for label, ours, theirs in (
            ("binary F1", headline["binary"], UPSTREAM["binary_f1"]),
            ("8-class weighted F1", headline["weighted"], UPSTREAM["tii8_weighted_f1"]),
        )
    ]
    text = (
        f"Upstream (random forest, random row split): binary F1 {UPSTREAM['binary_f1']}, 8-class weighted F1 "
        f"{UPSTREAM['tii8_weighted_f1']}. Below, forests trained on TII-SSRC-23 alone (its 8 traffic types). "
        f"The recipe reads the agent's {len(HARMONISED_COLUMNS)} `cicflowmeter` columns that TII-SSRC-23 "
        f"defines as the agent does; {opts.trees} trees, no depth cap, no class weights. Its binary head is "
        "1 - P(the four benign types) against a threshold chosen (best binary F1) on a calibration split "
        "carved from the training part the way the split itself is made (latest 25% of each class of the "
        "training part; for the random split, random training rows); the 8-class head is the likeliest "
        "attack type above the threshold, the likeliest benign type below. The previous recipe (the 76 "
        "columns TII-SSRC-23 has, 19 of them defined unlike the agent's; balanced class weights, depth 16; "
        "binary = argmax type is an attack type) is kept beside it.\n\n"
        f"Headline (time split inside each traffic type): {'; '.join(beaten)}. With benign rows weighted to "
        f"upstream's test share ({UPSTREAM['test_benign_share']:.1%}; {headline['benign_share']:.1%} "
        f"here), binary F1 {headline['binary_at_share']:.4f} (flag everything "
        f"{headline['everything_at_share']:.4f}).\n\n"
        + reports.markdown_table(
            (
                "split",
                "model",
                "test rows",
                "threshold",
                "8-class weighted F1",
                "8-class macro F1",
                "binary F1",
                "binary precision",
                "binary recall",
                "test subtypes never seen in training",
            ),
            rows,
        )
        + "\nPer-class F1 of the recipe (support: test rows of the type split):\n\n"
        + reports.markdown_table(
            ("traffic type", "time, each type", "time, each subtype", "random rows", "support"),
            [(c, *per_class[c], support[c]) for c in classes],
        )
        + f"\n{onnx_note}"
        "Why the type split stays the headline, and what bounds it. The issue asks for a split by time "
        "inside each class, and the 8-class head's classes are the traffic types: the latest quarter of "
        "each type is the reading that matches, and the stricter one. DoS HTTP and DoS MAC come from short "
        "windows late in the DoS rows, so the latest quarter of DoS is mostly subtypes that never occur "
        "earlier: what a deployed sensor meets (variants it was not trained on), and the binary head still "
        "flags them. The 8-class head cannot name them: whether an unseen HTTP flood is 'DoS' or 'Mirai' "
        "is a naming convention the flows do not carry. With every test row of a subtype seen in training "
        f"right and the {int(headline['unseen_rows'])} others labelled as this forest labels them, weighted "
        f"F1 would be {headline['ceiling']:.4f}. For the split inside each subtype: every test subtype is "
        "also in training, and TII-SSRC-23's clocks (1970 dates but for Mirai) look capture-relative, so "
        "the order of different subtypes inside a type may reflect capture files more than time. It "
        "measures later flows of known variants, not new ones, and is reported beside the headline, not "
        "as it. The random split puts neighbouring flows of one capture on both sides.\n"
    )
    return text, extra


def _benign_split(
    frame: FlowFrame, train: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Benign training rows: the earliest 80% of each table's fit, the latest 20% calibrate."""
    fit: list[int] = []
    calibration: list[int] = []
    for ds in sorted(set(frame.dataset.tolist())):
        rows = train[(frame.label[train] == BENIGN) & (frame.dataset[train] == ds)]
        rows = rows[np.argsort(frame.time_ns[rows], kind="stable")]
        cut = round(len(rows) * 0.8)
        fit += rows[:cut].tolist()
        calibration += rows[cut:].tolist()
    return np.array(sorted(fit), dtype=np.intp), np.array(sorted(calibration), dtype=np.intp)


def _detector(
    opts: Options,
    frame: FlowFrame,
    train: npt.NDArray[np.intp],
    test: npt.NDArray[np.intp],
    model_id: str,
    kind: model_pb2.ModelKind.ValueType,
) -> _Built:
    x = frame.x[:, _COLUMN_INDEX]
    fit, calibration = _benign_split(frame, train)
    if kind == model_pb2.MODEL_KIND_AUTOENCODER:
        autoencoder = fit_autoencoder(x[fit])
        onnx_bytes = autoencoder.to_onnx()
        output, explanation = AE_SCORE, ERRORS_OUTPUT

        def reference(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
            return autoencoder.reference(rows)[0].astype(np.float64)

        what = (
            f"MLP autoencoder ({len(HARMONISED_COLUMNS)}-32-8-32-{len(HARMONISED_COLUMNS)}, relu); score = "
            "mean squared reconstruction error of log-scaled, standardised features (scaling in the graph)"
        )
        tolerance, parity_name = 1e-4, "onnx_parity_max_rel_diff"
    elif kind == model_pb2.MODEL_KIND_ANOMALY_SCORER:
        scaling = LogScaling.fit(x[fit])
        centroids = (
            KMeans(n_clusters=64, n_init=3, random_state=0).fit(scaling.apply(x[fit])).cluster_centers_
        ).astype(np.float32)
        onnx_bytes = nearest_point_graph(scaling, centroids, "auris_kmeans")
        output, explanation = ZOO_SCORE, ""
        nn = NearestNeighbors(n_neighbors=1).fit(centroids)

        def reference(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
            return np.asarray(nn.kneighbors(scaling.apply(rows))[0][:, 0], dtype=np.float64)

        what = (
            "k-means distance: Euclidean distance to the nearest of 64 centroids of log-scaled, "
            "standardised benign rows (scaling in the graph)"
        )
        # float32 expanded squares: ~1e-2 absolute near distance 0 (see tests/test_zoo.py).
        tolerance, parity_name = 2e-2, "onnx_parity_max_abs_diff"
    else:
        forest = IsolationForest(n_estimators=100, max_samples=256, random_state=0).fit(x[fit])
        onnx_bytes = isolation_forest_to_onnx(forest, x.shape[1])
        output, explanation = IF_SCORE, ""

        def reference(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
            return np.asarray(-forest.score_samples(rows), dtype=np.float64)

        what = (
            "Isolation forest (100 trees, 256 rows each) exported as one tree ensemble; score = "
            "2^(-mean path length / c(256)), scikit-learn's -score_samples"
        )
        tolerance, parity_name = 1e-5, "onnx_parity_max_abs_diff"
    threshold = float(np.quantile(reference(x[calibration]), 1.0 - _AE_FPR_TARGET))
    scores = reference(x[test])
    y = frame.label[test]
    w = natural_balance_weights(frame.dataset[test], y, BENIGN, NATURAL_BENIGN_SHARE)
    evaluation = detector_evaluation(y.tolist(), scores, threshold, BENIGN, _SPLIT, sample_weight=w)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (onnx_scores,) = session.run([output], {INPUT_NAME: x[test]})
    onnx_arr = np.asarray(onnx_scores, dtype=np.float64)
    if parity_name.endswith("rel_diff"):
        diff = float(np.max(np.abs(onnx_arr - scores) / np.maximum(1.0, np.abs(scores))))
    else:
        diff = float(np.max(np.abs(onnx_arr - scores)))
    evaluation.extra[parity_name] = diff
    if diff > tolerance:
        raise RuntimeError(f"{model_id}: ONNX parity {diff:.2e} exceeds {tolerance:.0e}")
    flagged = scores >= threshold
    is_attack = y != BENIGN
    binary = _binary_figures(is_attack, flagged, w)
    evaluation.extra["binary_f1"] = binary["f1"]
    evaluation.extra["binary_f1_flag_everything"] = binary["baseline_f1"]
    rows: list[tuple[object, ...]] = []
    for cls in sorted(set(y.tolist())):
        m = y == cls
        recall = float(flagged[m].mean())
        evaluation.extra[f"flagged_share_{cls}"] = recall
        rows.append((cls, "benign: FPR" if cls == BENIGN else "recall", recall, int(m.sum())))
    source_rows: list[tuple[object, ...]] = []
    for ds in ("cicids2017", "tii-ssrc-23"):
        for src in sorted(set(frame.source_class[test][frame.dataset[test] == ds].tolist())):
            m = (frame.dataset[test] == ds) & (frame.source_class[test] == src)
            source_rows.append((ds, src, frame.label[test][m][0], float(flagged[m].mean()), int(m.sum())))
    evaluation.extra["roc_auc"] = reports.plot_curves(
        is_attack, scores, opts.reports / f"{model_id}-curves.png", f"{model_id}, time split", w
    )
    reports.plot_confusion(
        np.where(is_attack, ATTACK, BENIGN).tolist(),
        np.where(flagged, ATTACK, BENIGN).tolist(),
        [ATTACK, BENIGN],
        opts.reports / f"{model_id}-confusion.png",
        f"{model_id}, time split",
    )
    sub = _sample(len(test), 4000)
    importance = reports.permutation_importance(
        session, output, x[test][sub], is_attack[sub], lambda o: o.reshape(len(o), -1)[:, 0], w[sub]
    )
    reports.plot_importances(
        HARMONISED_COLUMNS,
        importance,
        opts.reports / f"{model_id}-importance.png",
        f"{model_id} feature importance",
    )
    method = (
        f"{1 - _AE_FPR_TARGET:.2f} quantile of the scores of the benign calibration split (the latest 20% "
        f"of each table's benign training rows, {len(calibration)} rows, held out of fitting): "
        f"a {_AE_FPR_TARGET:.0%} target benign FPR"
    )
    report = [
        "## Benign vs attack (time split, the manifest's evaluation)\n\n"
        + reports.evaluation_markdown(evaluation)
        + "\n![confusion matrix]("
        + f"{model_id}-confusion.png)\n",
        "## Flagged share per class (recall; for benign the false-positive rate)\n\n"
        "The flag-everything baseline flags 1.0 of every class, benign included.\n\n"
        + reports.markdown_table(("class", "figure", "flagged share", "test rows"), rows)
        + "\nPer source class:\n\n"
        + reports.markdown_table(
            ("table", "source class", "taxonomy class", "flagged share", "rows"), source_rows
        ),
        f"## Curves\n\nROC AUC {evaluation.extra['roc_auc']:.4f}.\n\n![PR and ROC]({model_id}-curves.png)\n",
        "## Feature importance\n\nPermutation importance through the exported ONNX graph on "
        f"{len(sub)} test rows (drop in weighted PR-AUC).\n\n![importance]({model_id}-importance.png)\n",
    ]
    return _Built(
        model_id=model_id,
        kind=kind,
        onnx_bytes=onnx_bytes,
        labels=[],
        score_output=output,
        explanation_output=explanation,
        threshold=threshold,
        threshold_method=method,
        evaluation=evaluation,
        description=(
            f"{what}; fitted on {len(fit)} benign rows of CIC-IDS2017 and TII-SSRC-23 only, on the "
            f"{len(HARMONISED_COLUMNS)} cicflowmeter columns both tables define alike."
        ),
        report=report,
        test_scores=scores,
    )


def _write(
    built: _Built,
    folder: Path,
    opts: Options,
    provenance: dict[str, tuple[str, int]],
    signing_key: Ed25519PrivateKey | None,
) -> Path:
    return write_model(
        folder,
        built.model_id,
        built.onnx_bytes,
        model_id=built.model_id,
        version=opts.version,
        kind=built.kind,
        feature_set=HARMONISED,
        labels=built.labels,
        normal_label=BENIGN,
        score_output=built.score_output,
        explanation_output=built.explanation_output,
        threshold=built.threshold,
        threshold_method=built.threshold_method,
        evaluation=built.evaluation,
        provenance=provenance,
        description=built.description,
        signing_key=signing_key,
    )


def _attack_types(data: Path) -> dict[str, str]:
    with (data / "pcaps" / "attack" / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return {Path(row["path"]).name: row["attack_type"] for row in csv.DictReader(fh)}


def _pcap_run(
    opts: Options, models: list[LoadedModel], progress: Progress
) -> tuple[str, dict[str, dict[str, float]]]:
    """Meter the shared captures with the agent's own extractor and score them with the agent's code."""
    files = capture_files(opts.data)
    table = flow_table(files, CICFLOWMETER, opts.pcap_max_flows, progress=lambda fs: progress(fs, "captures"))
    matrix = to_matrix(table.rows, len(CICFLOWMETER.columns))
    labels = np.asarray(table.labels)
    captures = np.asarray(table.captures)
    kinds = _attack_types(opts.data)
    flagged = {m.manifest.model_id: np.array([s.anomalous for s in m.score_matrix(matrix)]) for m in models}
    ids = list(flagged)
    figures: dict[str, dict[str, float]] = {i: {} for i in ids}
    rows: list[tuple[object, ...]] = []
    # CIC-IDS2017's benign rows are nearly all two-sided flows; one-packet and one-sided flows
    # are common in short captures and are where the classifier is least sure.
    fwd, bwd = CICFLOWMETER.columns.index("Total Fwd Packet"), CICFLOWMETER.columns.index("Total Bwd packets")
    two_sided = (matrix[:, fwd] > 0) & (matrix[:, bwd] > 0)
    for label in ("benign", "attack"):
        for subset, mask, key in (
            ("all", two_sided | ~two_sided, ""),
            ("two-sided", two_sided, "_two_sided"),
        ):
            m = (labels == label) & mask
            n_caps = len(set(captures[m].tolist()))
            shares = [float(flagged[i][m].mean()) if m.any() else 0.0 for i in ids]
            for i, share in zip(ids, shares, strict=True):
                figures[i][f"pcap_{label}{key}_flagged_share"] = share
            rows.append((f"{subset} flows of {label} captures ({n_caps})", int(m.sum()), *shares))
    per_capture: list[tuple[object, ...]] = []
    for name in sorted(set(captures[labels == "attack"].tolist())):
        m = captures == name
        per_capture.append(
            (name, kinds.get(name, "?"), int(m.sum()), *[float(flagged[i][m].mean()) for i in ids])
        )
    benign_caps = sorted(set(captures[labels == "benign"].tolist()))
    any_flag = [c for c in benign_caps if any(flagged[i][captures == c].any() for i in ids)]
    text = (
        f"Every capture under pcaps/ metered by the agent's own meter and `cicflowmeter` plugin "
        f"(first {opts.pcap_max_flows} flows of each capture), scored by the agent's scoring code "
        "(`load_model` + `score_matrix`) with each model's shipped threshold. Labels are per capture: "
        "every flow of an attack capture counts as attack (some hold benign background flows). "
        "The trivial baseline flags 1.0 of both.\n\n"
        + reports.markdown_table(("flows", "count", *[f"{i} flagged" for i in ids]), rows)
        + "\nPer attack capture:\n\n"
        + reports.markdown_table(
            ("capture", "attack type", "flows", *[f"{i} flagged" for i in ids]), per_capture
        )
        + f"\n{len(any_flag)} of {len(benign_caps)} benign captures have at least one flow flagged "
        + "by some model.\n"
    )
    return text, figures


def train_network_cic(opts: Options, progress: Progress = _no_progress) -> list[Path]:
    """Train, evaluate, export and report the three models; return the manifest paths written."""
    cic, tii = load_flow_frames(opts.data)
    frame = FlowFrame.concat([cic, tii])
    keys = np.char.add(np.char.add(frame.dataset, "/"), frame.source_class)
    train, test = split_by_time(keys.tolist(), frame.time_ns.tolist())
    opts.reports.mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, Callable[[], _Built]]] = [
        ("cic-rf", lambda: _classifier(opts, frame, tii, train, test)),
        ("cic-ae", lambda: _detector(opts, frame, train, test, "cic-ae", model_pb2.MODEL_KIND_AUTOENCODER)),
        (
            "cic-iforest",
            lambda: _detector(opts, frame, train, test, "cic-iforest", model_pb2.MODEL_KIND_ISOLATION_FOREST),
        ),
        (
            "cic-kmeans",
            lambda: _detector(opts, frame, train, test, "cic-kmeans", model_pb2.MODEL_KIND_ANOMALY_SCORER),
        ),
    ]
    built = [make() for _, make in progress(steps, "training")]
    pcap_text = ""
    if not opts.skip_pcaps:
        # Through the agent's loader as it is, signature check included: a key for this run only.
        run_key = Ed25519PrivateKey.generate()
        trust = ModelTrust.load([], release=False).with_key(run_key.public_key())
        with tempfile.TemporaryDirectory(prefix="auris-train-") as tmp:
            loaded = [
                load_model(_write(b, Path(tmp), opts, frame.provenance, run_key), trust=trust) for b in built
            ]
            pcap_text, pcap_figures = _pcap_run(opts, loaded, progress)
        for b in built:
            b.evaluation.extra.update(pcap_figures[b.model_id])
    written: list[Path] = []
    for b in built:
        folder = opts.out if b.model_id in opts.defaults else opts.candidates
        manifest_path = _write(b, folder, opts, frame.provenance, opts.signing_key)
        written.append(manifest_path)
        _write_report(opts, b, manifest_path, len(train), len(test), pcap_text)
    return written


def _write_report(
    opts: Options, built: _Built, manifest_path: Path, n_train: int, n_test: int, pcap_text: str
) -> None:
    size = len(built.onnx_bytes)
    loaded_by_default = manifest_path.parent.resolve() == opts.out.resolve()
    head = (
        f"# {built.model_id} (version {opts.version})\n\n{built.description}\n\n"
        f"- Manifest: `{manifest_path.name}` in `{manifest_path.parent}` "
        f"({'loaded by default' if loaded_by_default else 'a candidate: not loaded by default'}); "
        f"ONNX {size / 1e6:.2f} MB.\n"
        f"- Features: feature set `cicflowmeter` v{CICFLOWMETER.version}, {len(HARMONISED_COLUMNS)} of its "
        f"{len(CICFLOWMETER_COLUMNS)} columns (those CIC-IDS2017 and TII-SSRC-23 define alike; "
        "`auris.training.cic_tables`), times rounded to the agent's millisecond clock.\n"
        f"- Rows: {n_train} train / {n_test} test (CIC-IDS2017 + TII-SSRC-23).\n"
        f"- Threshold {built.threshold:.6g}: {built.threshold_method}.\n"
        f"- Built by `auris-train network-cic`.\n"
    )
    sections = [head, *built.report]
    if pcap_text:
        sections.append("## Real captures through the agent's own extractor\n\n" + pcap_text)
    (opts.reports / f"{built.model_id}.md").write_text("\n".join(sections), encoding="utf-8")
