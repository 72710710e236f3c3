"""Evaluation figures for classifiers, always with the trivial baseline beside them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

from auris.v1 import model_pb2

__all__ = ["classifier_evaluation", "detector_evaluation", "natural_balance_weights", "split_by_time"]


def split_by_time(
    labels: Sequence[str], times: Sequence[int], test_fraction: float = 0.25
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Indices of (train, test): inside each class, the latest ``test_fraction`` by time is test."""
    labels_arr = np.asarray(labels)
    times_arr = np.asarray(times)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(set(labels)):
        idx = np.flatnonzero(labels_arr == label)
        idx = idx[np.argsort(times_arr[idx], kind="stable")]
        cut = round(len(idx) * (1 - test_fraction))
        train.extend(idx[:cut].tolist())
        test.extend(idx[cut:].tolist())
    return np.array(sorted(train), dtype=np.intp), np.array(sorted(test), dtype=np.intp)


def classifier_evaluation(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    attack_score: npt.NDArray[np.float64],
    classes: Sequence[str],
    normal_label: str,
    split: str,
    sample_weight: npt.NDArray[np.float64] | None = None,
) -> model_pb2.Evaluation:
    """Per-class precision/recall/F1, macro and weighted F1, PR-AUC and FPR, plus the majority baseline.

    ``sample_weight`` re-weights rows (for example to a natural class balance); supports stay
    row counts.
    """
    w = sample_weight
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=list(classes), zero_division=0, sample_weight=w
    )
    _, _, _, support = precision_recall_fscore_support(y_true, y_pred, labels=list(classes), zero_division=0)
    evaluation = model_pb2.Evaluation(split=split)
    for i, label in enumerate(classes):
        evaluation.per_class.add(
            label=label,
            precision=float(precision[i]),
            recall=float(recall[i]),
            f1=float(f1[i]),
            support=int(support[i]),
        )
    evaluation.macro_f1 = float(
        f1_score(y_true, y_pred, labels=list(classes), average="macro", zero_division=0, sample_weight=w)
    )
    evaluation.weighted_f1 = float(
        f1_score(y_true, y_pred, labels=list(classes), average="weighted", zero_division=0, sample_weight=w)
    )
    is_attack = np.asarray([y != normal_label for y in y_true])
    if is_attack.any() and not is_attack.all():
        evaluation.pr_auc = float(average_precision_score(is_attack, attack_score, sample_weight=w))
    normal_mask = ~is_attack
    predicted_attack = np.asarray([y != normal_label for y in y_pred])
    if normal_mask.any():
        evaluation.false_positive_rate = float(
            np.average(predicted_attack[normal_mask], weights=None if w is None else w[normal_mask])
        )
    weights = np.ones(len(y_true)) if w is None else w
    values = sorted(set(y_true))
    totals = [weights[np.asarray(y_true) == v].sum() for v in values]
    majority = str(values[int(np.argmax(totals))])
    baseline = [majority] * len(y_true)
    evaluation.baseline_name = f"always {majority!r}"
    evaluation.baseline_macro_f1 = float(
        f1_score(y_true, baseline, labels=list(classes), average="macro", zero_division=0, sample_weight=w)
    )
    evaluation.baseline_weighted_f1 = float(
        f1_score(y_true, baseline, labels=list(classes), average="weighted", zero_division=0, sample_weight=w)
    )
    return evaluation


def natural_balance_weights(
    groups: Sequence[str] | npt.NDArray[np.str_],
    labels: Sequence[str] | npt.NDArray[np.str_],
    normal_label: str,
    normal_share: dict[str, float],
) -> npt.NDArray[np.float64]:
    """Row weights that give ``normal_label`` the share ``normal_share[group]`` inside each group.

    Groups (datasets) not named keep weight 1, as do all attack rows.
    """
    groups_arr, labels_arr = np.asarray(groups), np.asarray(labels)
    weights = np.ones(len(labels_arr))
    for group, share in normal_share.items():
        in_group = groups_arr == group
        normal = in_group & (labels_arr == normal_label)
        n_normal, n_attack = int(normal.sum()), int((in_group & ~normal).sum())
        if n_normal and n_attack:
            weights[normal] = share / (1.0 - share) * n_attack / n_normal
    return weights


def detector_evaluation(
    y_true: Sequence[str],
    scores: npt.NDArray[np.float64],
    threshold: float,
    normal_label: str,
    split: str,
    sample_weight: npt.NDArray[np.float64] | None = None,
) -> model_pb2.Evaluation:
    """A one-score anomaly detector judged as benign-vs-attack, beside the flag-everything baseline."""
    attack_label = "attack"
    predicted = [attack_label if s >= threshold else normal_label for s in scores]
    truth = [normal_label if y == normal_label else attack_label for y in y_true]
    evaluation = classifier_evaluation(
        truth, predicted, scores, [attack_label, normal_label], normal_label, split, sample_weight
    )
    everything = [attack_label] * len(truth)
    labels = [attack_label, normal_label]
    evaluation.baseline_name = "flag everything"
    evaluation.baseline_macro_f1 = float(
        f1_score(
            truth, everything, labels=labels, average="macro", zero_division=0, sample_weight=sample_weight
        )
    )
    evaluation.baseline_weighted_f1 = float(
        f1_score(
            truth, everything, labels=labels, average="weighted", zero_division=0, sample_weight=sample_weight
        )
    )
    return evaluation
