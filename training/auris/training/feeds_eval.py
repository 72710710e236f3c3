"""Figures for the feed models: weighted AUPRC, recall at a fixed precision, bootstrap intervals,
and precision/recall/F-scores at a threshold with the flag-everything baseline beside them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, precision_recall_curve

__all__ = [
    "BootstrapFigure",
    "ThresholdFigures",
    "auprc",
    "bootstrap",
    "recall_at_precision",
    "threshold_at_precision",
    "threshold_figures",
    "threshold_max_f1",
]

F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]


def auprc(y: B, scores: F64, w: F64 | None = None) -> float:
    """Average precision (step-wise area under the precision-recall curve), rows weighted."""
    if not y.any() or y.all():
        return float("nan")
    return float(average_precision_score(y, scores, sample_weight=w))


def recall_at_precision(y: B, scores: F64, target: float, w: F64 | None = None) -> float:
    """The largest recall among thresholds whose (weighted) precision is at least ``target``."""
    if not y.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(y, scores, sample_weight=w)
    ok = precision >= target
    return float(recall[ok].max()) if ok.any() else 0.0


def threshold_at_precision(y: B, scores: F64, target: float, w: F64 | None = None) -> float | None:
    """The lowest threshold whose (weighted) precision is at least ``target`` (most recall), or None."""
    precision, _, thresholds = precision_recall_curve(y, scores, sample_weight=w)
    ok = np.flatnonzero(precision[:-1] >= target)
    return float(thresholds[ok[0]]) if len(ok) else None


def threshold_max_f1(y: B, scores: F64, w: F64 | None = None, beta: float = 1.0) -> float:
    """The threshold with the best (weighted) F-beta; ties go to the higher threshold."""
    precision, recall, thresholds = precision_recall_curve(y, scores, sample_weight=w)
    p, r = precision[:-1], recall[:-1]
    b2 = beta * beta
    f = np.divide((1 + b2) * p * r, b2 * p + r, out=np.zeros_like(p), where=(b2 * p + r) > 0)
    best = np.flatnonzero(f >= f.max() - 1e-12)
    return float(thresholds[best[-1]])


@dataclasses.dataclass(frozen=True)
class ThresholdFigures:
    precision: float
    recall: float
    f1: float
    f2: float
    flagged_share: float
    # Flag everything: precision = prevalence, recall 1.
    baseline_f1: float
    baseline_f2: float


def _f(beta: float, p: float, r: float) -> float:
    b2 = beta * beta
    return (1 + b2) * p * r / (b2 * p + r) if (b2 * p + r) > 0 else 0.0


def threshold_figures(y: B, scores: F64, threshold: float, w: F64 | None = None) -> ThresholdFigures:
    weights = np.ones(len(y)) if w is None else w
    flagged = scores >= threshold
    tp = float(weights[flagged & y].sum())
    fp = float(weights[flagged & ~y].sum())
    positives = float(weights[y].sum())
    p = tp / (tp + fp) if tp + fp > 0 else 0.0
    r = tp / positives if positives > 0 else 0.0
    prevalence = positives / float(weights.sum()) if len(y) else 0.0
    return ThresholdFigures(
        precision=p,
        recall=r,
        f1=_f(1.0, p, r),
        f2=_f(2.0, p, r),
        flagged_share=float(weights[flagged].sum() / weights.sum()) if len(y) else 0.0,
        baseline_f1=_f(1.0, prevalence, 1.0),
        baseline_f2=_f(2.0, prevalence, 1.0),
    )


@dataclasses.dataclass(frozen=True)
class BootstrapFigure:
    value: float
    low: float
    high: float

    def text(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap(
    y: B,
    scores: Mapping[str, F64],
    metric: Callable[[B, F64, F64 | None], float],
    w: F64 | None = None,
    *,
    rounds: int = 1000,
    seed: int = 0,
    pairs: Mapping[str, tuple[str, str]] | None = None,
) -> dict[str, BootstrapFigure]:
    """95% percentile intervals of ``metric`` for each score, resampling rows within each class
    (the count of positives stays fixed); ``pairs`` name differences ``a - b`` computed on the same
    resamples (a paired interval)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    names = list(scores)
    pair_items = dict(pairs or {})
    draws: dict[str, list[float]] = {name: [] for name in [*names, *pair_items]}
    for _ in range(rounds):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        yw = None if w is None else w[idx]
        values = {name: metric(y[idx], scores[name][idx], yw) for name in names}
        for name in names:
            draws[name].append(values[name])
        for label, (a, b) in pair_items.items():
            draws[label].append(values[a] - values[b])
    full = {name: metric(y, scores[name], w) for name in names}
    for label, (a, b) in pair_items.items():
        full[label] = full[a] - full[b]
    return {
        name: BootstrapFigure(full[name], float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5)))
        for name, d in draws.items()
    }


def _pr_curve(y: B, w: F64, last: npt.NDArray[np.intp]) -> tuple[F64, F64]:
    """Precision and recall at each distinct threshold (high to low) of rows already sorted by
    score, descending; ``last`` indexes the last row of each group of equal scores."""
    tp = np.cumsum(w * y)[last]
    fp = np.cumsum(w * ~y)[last]
    flagged = tp + fp
    precision = np.divide(tp, flagged, out=np.ones_like(tp), where=flagged > 0)
    recall = tp / tp[-1] if tp[-1] > 0 else np.zeros_like(tp)
    return precision, recall


def bootstrap_pr(
    y: B,
    scores: Mapping[str, F64],
    w: F64 | None,
    *,
    target: float,
    rounds: int = 1000,
    seed: int = 0,
    pairs: Mapping[str, tuple[str, str]] | None = None,
) -> tuple[dict[str, BootstrapFigure], dict[str, BootstrapFigure]]:
    """(AUPRC, recall at precision ``target``) with 95% percentile intervals, like ``bootstrap`` with
    ``auprc`` and ``recall_at_precision`` (same figures), but each resample costs O(rows): rows
    are sorted once per score and a resample only reweights them (multinomial counts within each
    class, which is drawing rows with replacement)."""
    weights = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    prepared = {}
    for name, s in scores.items():
        order = np.argsort(-s, kind="stable")
        sorted_s = s[order]
        last = np.flatnonzero(np.r_[sorted_s[1:] != sorted_s[:-1], True])
        prepared[name] = (order, last)

    def figures(counts: F64) -> dict[str, tuple[float, float]]:
        out = {}
        for name, (order, last) in prepared.items():
            precision, recall = _pr_curve(y[order], (weights * counts)[order], last)
            ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
            ok = precision >= target
            out[name] = (ap, float(recall[ok].max()) if ok.any() else 0.0)
        return out

    full = figures(np.ones(len(y)))
    draws: dict[str, list[tuple[float, float]]] = {name: [] for name in scores}
    pair_items = dict(pairs or {})
    pair_draws: dict[str, list[tuple[float, float]]] = {label: [] for label in pair_items}
    for _ in range(rounds):
        counts = np.zeros(len(y))
        counts[pos] = rng.multinomial(len(pos), np.full(len(pos), 1.0 / len(pos)))
        counts[neg] = rng.multinomial(len(neg), np.full(len(neg), 1.0 / len(neg)))
        values = figures(counts)
        for name in scores:
            draws[name].append(values[name])
        for label, (a, b) in pair_items.items():
            pair_draws[label].append((values[a][0] - values[b][0], values[a][1] - values[b][1]))
    for label, (a, b) in pair_items.items():
        full[label] = (full[a][0] - full[b][0], full[a][1] - full[b][1])
        draws[label] = pair_draws[label]
    result: tuple[dict[str, BootstrapFigure], dict[str, BootstrapFigure]] = ({}, {})
    for name, d in draws.items():
        arr = np.asarray(d)
        for k in (0, 1):
            result[k][name] = BootstrapFigure(
                full[name][k], float(np.percentile(arr[:, k], 2.5)), float(np.percentile(arr[:, k], 97.5))
            )
    return result
