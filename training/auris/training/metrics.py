"""Evaluation figures for classifiers, always with the trivial baseline beside them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

from auris.v1 import model_pb2

__all__ = ["classifier_evaluation", "split_by_time"]


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
) -> model_pb2.Evaluation:
    """Per-class precision/recall/F1, macro and weighted F1, PR-AUC and FPR, plus the majority baseline."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(classes), zero_division=0
    )
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
        f1_score(y_true, y_pred, labels=list(classes), average="macro", zero_division=0)
    )
    evaluation.weighted_f1 = float(
        f1_score(y_true, y_pred, labels=list(classes), average="weighted", zero_division=0)
    )
    is_attack = np.asarray([y != normal_label for y in y_true])
    if is_attack.any() and not is_attack.all():
        evaluation.pr_auc = float(average_precision_score(is_attack, attack_score))
    normal_mask = ~is_attack
    predicted_attack = np.asarray([y != normal_label for y in y_pred])
    if normal_mask.any():
        evaluation.false_positive_rate = float(predicted_attack[normal_mask].mean())
    values, counts = np.unique(np.asarray(y_true), return_counts=True)
    majority = str(values[counts.argmax()])
    baseline = [majority] * len(y_true)
    evaluation.baseline_name = f"always {majority!r}"
    evaluation.baseline_macro_f1 = float(
        f1_score(y_true, baseline, labels=list(classes), average="macro", zero_division=0)
    )
    evaluation.baseline_weighted_f1 = float(
        f1_score(y_true, baseline, labels=list(classes), average="weighted", zero_division=0)
    )
    return evaluation


def detector_evaluation(
    y_true: Sequence[str],
    scores: npt.NDArray[np.float64],
    threshold: float,
    normal_label: str,
    split: str,
) -> model_pb2.Evaluation:
    """A one-score anomaly detector judged as benign-vs-attack, beside the flag-everything baseline."""
    attack_label = "attack"
    predicted = [attack_label if s >= threshold else normal_label for s in scores]
    truth = [normal_label if y == normal_label else attack_label for y in y_true]
    evaluation = classifier_evaluation(
        truth, predicted, scores, [attack_label, normal_label], normal_label, split
    )
    everything = [attack_label] * len(truth)
    evaluation.baseline_name = "flag everything"
    evaluation.baseline_macro_f1 = float(
        f1_score(truth, everything, labels=[attack_label, normal_label], average="macro", zero_division=0)
    )
    evaluation.baseline_weighted_f1 = float(
        f1_score(truth, everything, labels=[attack_label, normal_label], average="weighted", zero_division=0)
    )
    return evaluation
