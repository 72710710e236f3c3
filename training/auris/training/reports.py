"""Evaluation reports: a Markdown page per model with its figures as PNG (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from auris.training.export import INPUT_NAME
from auris.v1 import model_pb2

__all__ = [
    "evaluation_markdown",
    "markdown_table",
    "permutation_importance",
    "plot_comparison",
    "plot_confusion",
    "plot_curves",
    "plot_importances",
]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def evaluation_markdown(evaluation: model_pb2.Evaluation) -> str:
    """The manifest's evaluation as Markdown: per-class table, summary with the baseline beside it."""
    rows = [(c.label, c.precision, c.recall, c.f1, c.support) for c in evaluation.per_class]
    text = f"Split: {evaluation.split}.\n\n"
    text += markdown_table(("class", "precision", "recall", "F1", "support (rows)"), rows)
    text += "\n" + markdown_table(
        ("figure", "model", f"baseline ({evaluation.baseline_name})"),
        [
            ("macro F1", evaluation.macro_f1, evaluation.baseline_macro_f1),
            ("weighted F1", evaluation.weighted_f1, evaluation.baseline_weighted_f1),
            ("PR-AUC (attack vs benign)", evaluation.pr_auc, "-"),
            ("benign false-positive rate", evaluation.false_positive_rate, "-"),
        ],
    )
    return text


def plot_confusion(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str],
    path: Path,
    title: str,
) -> None:
    """Row-normalised confusion matrix with raw counts in each cell."""
    counts = confusion_matrix(y_true, y_pred, labels=list(labels))
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if counts[i, j]:
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(
    is_attack: npt.NDArray[np.bool_],
    scores: npt.NDArray[np.float64],
    path: Path,
    title: str,
    sample_weight: npt.NDArray[np.float64] | None = None,
) -> float:
    """PR and ROC curves side by side (attack is the positive class); returns the ROC AUC."""
    precision, recall, _ = precision_recall_curve(is_attack, scores, sample_weight=sample_weight)
    fpr, tpr, _ = roc_curve(is_attack, scores, sample_weight=sample_weight)
    auc = float(roc_auc_score(is_attack, scores, sample_weight=sample_weight))
    weights = np.ones(len(is_attack)) if sample_weight is None else sample_weight
    prevalence = float(weights[is_attack].sum() / weights.sum())
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.plot(recall, precision)
    left.axhline(prevalence, color="grey", linestyle="--", label=f"flag everything ({prevalence:.2f})")
    left.set_xlabel("recall")
    left.set_ylabel("precision")
    left.set_title("precision-recall")
    left.legend(loc="lower left")
    right.plot(fpr, tpr, label=f"AUC {auc:.4f}")
    right.plot([0, 1], [0, 1], color="grey", linestyle="--", label="chance")
    right.set_xscale("symlog", linthresh=1e-3)
    right.set_xlabel("false-positive rate (symlog)")
    right.set_ylabel("true-positive rate")
    right.set_title("ROC")
    right.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return auc


def permutation_importance(
    session: ort.InferenceSession,
    output: str,
    x: npt.NDArray[np.float32],
    is_attack: npt.NDArray[np.bool_],
    score_of: Callable[[npt.NDArray[Any]], npt.NDArray[np.float64]],
    w: npt.NDArray[np.float64],
    seed: int = 0,
) -> npt.NDArray[np.float64]:
    """Drop in weighted PR-AUC when one column is shuffled, through the exported graph itself."""
    rng = np.random.default_rng(seed)

    def pr_auc(rows: npt.NDArray[np.float32]) -> float:
        (out,) = session.run([output], {INPUT_NAME: rows})
        return float(average_precision_score(is_attack, score_of(np.asarray(out)), sample_weight=w))

    base = pr_auc(x)
    drops = np.zeros(x.shape[1])
    for j in range(x.shape[1]):
        shuffled = x.copy()
        shuffled[:, j] = rng.permutation(shuffled[:, j])
        drops[j] = base - pr_auc(shuffled)
    return drops


def plot_importances(names: Sequence[str], values: npt.NDArray[np.float64], path: Path, title: str) -> None:
    """Horizontal bars for the 20 largest values."""
    order = np.argsort(values)[::-1][:20][::-1]
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.barh([names[i] for i in order], values[order])
    ax.set_xlabel("drop in PR-AUC when the feature is shuffled")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(
    kinds: Sequence[str],
    series: dict[str, Sequence[float]],
    baselines: dict[str, float],
    path: Path,
    title: str,
) -> None:
    """Grouped bars, one group per model kind; dashed lines mark each series' trivial baseline."""
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(kinds) + 2), 4.5))
    width = 0.8 / max(1, len(series))
    positions = np.arange(len(kinds))
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(positions + i * width, values, width, label=name)
        if name in baselines:
            ax.axhline(
                baselines[name],
                color=bars.patches[0].get_facecolor(),
                linestyle="--",
                linewidth=1,
                label=f"{name}: trivial baseline",
            )
    ax.set_xticks(positions + width * (len(series) - 1) / 2, kinds, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
